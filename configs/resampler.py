"""The matting recipe with another resampler: one row of the paper's comparison.

  python train.py --config configs/resampler.py:carafe --workdir runs/carafe \
      [--config.model.resampler_options.up_kernel_size=3]

  python train.py --config configs/resampler.py:carafe,synthetic --workdir /tmp/carafe \
      --config.num_train_steps=20     # no data to download: the synthetic set

The argument after the colon is a name of `a2u_jax.resamplers.RESAMPLERS` (nearest,
bilinear, deconv, pixel_shuffle, max_unpool, carafe, indexnet, a2u, fade, sapa, dysample),
optionally followed by ",synthetic" to train on the built-in synthetic composites (through
the JAX pipeline, no TensorFlow needed) instead of the Adobe set. Every option of that
operator is listed under config.model.resampler_options with its default, so each can be
overridden from the command line. "a2u" gives configs/a2u_matting.py.
"""

import ml_collections

from configs import a2u_matting


def get_config(argument: str = "carafe") -> ml_collections.ConfigDict:
  name, _, data = argument.partition(",")
  if data not in ("", "synthetic"):
    raise ValueError(f"configs/resampler.py:{argument}: expected NAME or NAME,synthetic")
  config = a2u_matting.get_config()
  if data == "synthetic":
    config.data.source, config.data.pipeline = "synthetic", "jax"
    config.data.options = ml_collections.ConfigDict(dict(
        num_foregrounds=8, num_backgrounds=16, min_size=320, max_size=640, seed=0))
  a2u_matting.use_resampler(config, name)
  return config
