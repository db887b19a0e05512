"""The authors' recipe with the "unshare" generator (separate up and down encodings)."""

import ml_collections

from configs import a2u_matting


def get_config() -> ml_collections.ConfigDict:
  config = a2u_matting.get_config()
  config.model.resampler_options.share = False
  return config
