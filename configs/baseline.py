"""The paper's baseline network (stride-2 down, bilinear up), same recipe."""

import ml_collections

from configs import a2u_matting


def get_config() -> ml_collections.ConfigDict:
  config = a2u_matting.get_config()
  a2u_matting.use_resampler(config, "baseline")
  return config
