"""The image-reconstruction experiment of IndexNet / A2U (benchmarks/reconstruction.py).

A small encoder-decoder downsamples a 32x32 grey image twice and upsamples it back with
each operator of `a2u_jax.upsamplers`, trained to reproduce its input (L1 loss). The CPU
default runs the built-in synthetic toy set for a few hundred steps; `get_config("full")`
(`--full` on the script) is the long run on Fashion-MNIST for a GPU.
"""

import ml_collections

from a2u_jax import upsamplers


def get_config(mode: str = "quick") -> ml_collections.ConfigDict:
  if mode not in ("quick", "full"):
    raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
  config = ml_collections.ConfigDict()
  config.operators = upsamplers.RESAMPLERS
  config.width = 32            # channels of every feature map (A2U's GroupNorm needs 32)
  config.levels = 2            # 2x downsamplings (32 -> 8)
  config.image_size = 32       # Fashion-MNIST's 28x28 is zero-padded to 32x32
  config.data = "synthetic"    # or "fashion_mnist" (needs fashion_mnist_dir)
  config.fashion_mnist_dir = ""
  config.train_images = 2048   # synthetic set sizes (Fashion-MNIST: all 60000 / 10000)
  config.test_images = 256
  config.batch_size = 32
  config.steps = 300
  config.learning_rate = 1e-3
  config.seed = 0
  config.figure_images = 6
  if mode == "full":
    config.data = "fashion_mnist"
    config.batch_size = 100
    config.steps = 60_000      # 100 epochs of the 60000 training images
  return config
