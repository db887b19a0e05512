"""The matting recipe with another upsampling operator: one row of the paper's comparison.

  python train.py --config configs/upsampler.py:carafe --workdir runs/carafe \
      [--config.model.resampler_options.up_kernel_size=3]

The argument after the colon is a name of `a2u_jax.upsamplers.RESAMPLERS` (nearest,
bilinear, deconv, pixel_shuffle, max_unpool, carafe, indexnet, a2u, fade, sapa, dysample).
Every option of that operator is listed under config.model.resampler_options with its
default, so each can be overridden from the command line. "a2u" gives configs/a2u_matting.py.
"""

import ml_collections

from a2u_jax import upsamplers
from configs import a2u_matting

MODEL_SET = ("dtype", "axis_name")  # given by the model, not by the config


def get_config(name: str = "carafe") -> ml_collections.ConfigDict:
  config = a2u_matting.get_config()
  config.model.resampler = name
  if name != "a2u":
    options = upsamplers.make_resampler(name).options
    config.model.resampler_options = ml_collections.ConfigDict(
        {key: value for key, value in options.items() if key not in MODEL_SET})
  return config
