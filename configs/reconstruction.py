"""The image-reconstruction experiment of IndexNet / A2U (benchmarks/reconstruction.py).

Two protocols, one network per operator of `a2u_jax.resamplers`, trained to reproduce
its input:

* "quick" (the default): a small encoder-decoder (width 32, two 2x resamplings) on the
  built-in synthetic toy set, a few hundred Adam steps. A smoke test of the plumbing that
  runs on a laptop CPU; its ranking says more about short training than about operators.
* "paper": IndexNet's reconstruction protocol, which the A2U paper reuses: the RecoverNet
  encoder-decoder (conv3x3-BN-ReLU stages 32 -> 64 -> 128, three 2x resamplings, a 256 /
  128 middle, a mirrored decoder), weights N(0, 0.02), L1 loss, batch 100, 100 epochs of
  SGD (momentum 0.9, lr 0.01, x0.1 at epochs 50, 70 and 85), Fashion-MNIST resized to
  32x32 with the input normalised by mean 0.1307 / std 0.3081.
"""

import ml_collections

from a2u_jax import resamplers

PROTOCOLS = ("quick", "paper")


def get_config(protocol: str = "quick") -> ml_collections.ConfigDict:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
  config = ml_collections.ConfigDict()
  config.protocol = protocol
  config.operators = resamplers.RESAMPLERS
  config.image_size = 32       # Fashion-MNIST's 28x28 is resized (bilinear) to 32x32
  config.data = "synthetic"    # or "fashion_mnist" (needs fashion_mnist_dir)
  config.fashion_mnist_dir = ""
  config.train_images = 2048   # synthetic set sizes (Fashion-MNIST: all 60000 / 10000)
  config.test_images = 256
  config.seed = 0
  config.figure_images = 6
  config.eval_batch_size = 1000
  if protocol == "quick":
    config.width = 32          # channels of every feature map (A2U's GroupNorm needs 32)
    config.levels = 2          # 2x resamplings (32 -> 8)
    config.batch_size = 32
    config.steps = 300
    config.learning_rate = 1e-3  # Adam
  else:
    config.widths = (32, 64, 128)  # encoder stages; the decoder mirrors them
    config.middle = (256, 128)
    config.init_std = 0.02     # conv/dense kernels N(0, std), BatchNorm scales N(1, std)
    config.input_mean = 0.1307
    config.input_std = 0.3081
    config.batch_size = 100
    config.epochs = 100
    config.learning_rate = 0.01  # SGD
    config.momentum = 0.9
    # lr x decay at these epochs of a `milestone_scale`-epoch run; a run of E epochs decays
    # at the same fractions of its length (E = 1: after 50%, 70% and 85% of its steps).
    config.milestones = (50, 70, 85)
    config.milestone_scale = 100
    config.decay = 0.1
  return config
