"""Trains the matting network.

  python train.py --config configs/smoke.py --workdir /tmp/run [--config.batch_size=8 ...]

Rerunning with the same --workdir resumes from its last checkpoint.

Several hosts (JAX's multi-controller runtime, one process per host, every process with
the same command and --workdir on storage they share):
  python train.py ... --coordinator_address HOST0:1234 --num_processes N --process_id I
or, where JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes):
  python train.py ... --config.distributed=True
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the final model.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: HOST:PORT where process 0 serves the coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process, 0..N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  logging.getLogger("a2u_jax").setLevel(logging.INFO)
  from a2u_jax import distributed

  FLAGS = flags.FLAGS
  try:
    # First, before anything asks JAX for its devices.
    distributed.initialize(auto=FLAGS.config.distributed,
                           coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except ValueError as error:
    raise app.UsageError(str(error))
  from a2u_jax.training import loop
  last = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if distributed.is_lead():
    print(f"done: {FLAGS.workdir} (last metrics: "
          f"{ {k: round(v, 5) for k, v in last.items()} })")


if __name__ == "__main__":
  app.run(main)
