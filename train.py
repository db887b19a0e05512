"""Trains the matting network.

  python train.py --config configs/smoke.py --workdir /tmp/run [--config.batch_size=8 ...]

Rerunning with the same --workdir resumes from its last checkpoint.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the final model.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  logging.getLogger("a2u_jax").setLevel(logging.INFO)
  from a2u_jax.training import loop
  last = loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  print(f"done: {flags.FLAGS.workdir} (last metrics: "
        f"{ {k: round(v, 5) for k, v in last.items()} })")


if __name__ == "__main__":
  app.run(main)
