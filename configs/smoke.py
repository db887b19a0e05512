"""A tiny run for CPUs and tests: synthetic data, small crops, a checkpoint every 5 steps.

The data goes through the JAX pipeline (the whole protocol), so it needs no TensorFlow.

  python train.py --config configs/smoke.py --workdir /tmp/run
"""

import ml_collections

from configs import a2u_matting


def get_config() -> ml_collections.ConfigDict:
  config = a2u_matting.get_config()
  config.batch_size = 4
  config.crop_size = 64
  config.num_train_steps = 20
  config.steps_per_epoch = 10
  config.learning_rate = 1e-3
  config.data.source = "synthetic"
  config.data.pipeline = "jax"
  config.data.options = ml_collections.ConfigDict(dict(
      num_foregrounds=4, num_backgrounds=4, min_size=80, max_size=128, seed=0))
  config.validation.options = ml_collections.ConfigDict(dict(
      count=2, min_size=64, max_size=96))
  config.validation.batch_size = 2
  config.log_every = 1
  config.image_summary_every = 10
  config.checkpoint_every = 5
  config.eval_every = 10
  return config
