"""Trains the matting network.

  python train.py --config configs/smoke.py --workdir /tmp/run [--config.batch_size=8 ...]

Rerunning with the same --workdir resumes from its last checkpoint. Ctrl-C or SIGTERM
stops after the current step with its checkpoint written (exit status 130 / 143); a
second Ctrl-C stops at once. Errors print one line (--verbose: with the traceback). One
run at a time per workdir: a second is refused, naming the process that holds it.

Several hosts (JAX's multi-controller runtime, one process per host, every process with
the same command and --workdir on storage they share):
  python train.py ... --coordinator_address HOST0:1234 --num_processes N --process_id I
(each process says what it waits for, and gives up after --distributed_timeout seconds,
naming the missing process or the coordinator it cannot reach; a process that dies mid-run
is named by the others, which stop at once)
or, where JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes):
  python train.py ... --config.distributed=True
"""

import difflib
import logging
import os
import signal
import sys
import traceback

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
flags.DEFINE_float("distributed_timeout", 300, "Multi-process runs: seconds to wait at "
                   "start-up for every process to join before giving up.")
flags.DEFINE_float("heartbeat_timeout", 30, "Multi-process runs: seconds without news of a "
                   "process (a host that vanished) before the others stop. A process that "
                   "dies outright is named by the others at once.")
flags.DEFINE_bool("verbose", False, "On errors, print the traceback too.")
flags.mark_flags_as_required(["config", "workdir"])


def _load_config(argv: list[str]):
  """The config that --config names (FILE or FILE:ARGUMENT), loaded as config_flags does;
  None when it cannot be."""
  import importlib.util

  values = _config_files(argv)
  if not values:
    return None
  path, _, argument = values[-1].partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_for_errors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()
  except Exception:  # The override's own error is reported instead.
    return None


def _override_error(argv: list[str], error: Exception) -> str:
  """One line for a --config.PATH override that failed: the unknown field and its nearest
  valid names, or the parser's own complaint about the value."""
  config = _load_config(argv)
  for arg in argv[1:] if config is not None else ():
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, where = config, "config"
    for part in path.split("."):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        if not fields:
          return f"--config.{path}: {where} is a value, not a group of fields"
        nearest = difflib.get_close_matches(part, fields, n=3, cutoff=0.5)
        hint = (f"did you mean {' or '.join(nearest)}?" if nearest
                else f"its fields are {', '.join(sorted(fields))}")
        return f"--config.{path}: {where} has no field {part!r}; {hint}"
      node, where = node[part], f"{where}.{part}"
  return f"--config: {str(error).strip()}"


def _flag_values(argv: list[str], name: str) -> list[str]:
  """The values of every --NAME VALUE / --NAME=VALUE in `argv`."""
  values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in (f"--{name}", f"-{name}")]
  return values + [arg.split("=", 1)[1] for arg in argv
                   if arg.startswith((f"--{name}=", f"-{name}="))]


def _config_files(argv: list[str]) -> list[str]:
  """The values of every --config FILE / --config=FILE in `argv`."""
  return _flag_values(argv, "config")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors instead of tracebacks."""
  configs = _config_files(argv)
  if len(configs) > 1:
    sys.exit(f"error: --config is given {len(configs)} times ({', '.join(configs)}); give "
             f"one config file, and change its fields with --config.FIELD=VALUE")
  workdirs = _flag_values(argv, "workdir")
  if len(workdirs) > 1:
    sys.exit(f"error: --workdir is given {len(workdirs)} times ({', '.join(workdirs)}); give "
             f"one")
  try:
    parsed = flags.FLAGS(argv)
  except flags.Error as error:
    text = str(error)
    if "Traceback (most recent call last)" in text:  # config_flags quotes the config's own
      lines = [line.strip() for line in text.splitlines() if line.strip()]
      text = f"{text.splitlines()[0].rstrip(': ')}: {lines[-1]}"
    sys.exit(f"error: {text} (--helpfull lists the flags)")
  except Exception as error:  # ml_collections' errors for bad --config.PATH overrides
    sys.exit(f"error: {_override_error(argv, error)}")
  if flags.FLAGS.workdir is not None and not flags.FLAGS.workdir.strip():
    sys.exit("error: --workdir is empty; name the run's folder (--workdir DIR)")
  return parsed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
  logging.getLogger("a2u_jax").setLevel(logging.INFO)
  from a2u_jax import distributed

  FLAGS = flags.FLAGS
  try:
    FLAGS.config.keys()  # A config file that failed to load is reported on first use.
  except OSError as error:
    lines = [line.strip() for line in str(error.__cause__ or error).splitlines()
             if line.strip()]
    sys.exit(f"error: --config: {lines[-1] if lines else error}")
  try:
    # First, before anything asks JAX for its devices.
    distributed.initialize(auto=FLAGS.config.distributed,
                           coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                           timeout=FLAGS.distributed_timeout,
                           heartbeat_timeout=FLAGS.heartbeat_timeout)
  except ValueError as error:
    sys.exit(f"error: {error}")
  from a2u_jax import checkpointing
  from a2u_jax.training import loop
  try:
    try:
      last = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Exception as error:
      distributed.wait_for_lost_process(error)  # which then says which process, and exits
      raise
  except loop.Interrupted as stop:
    print(stop, file=sys.stderr)
    sys.exit(128 + getattr(signal, stop.signal_name))
  except checkpointing.StorageError as error:
    if FLAGS.verbose:
      traceback.print_exc()
    print(f"error: {error}", file=sys.stderr, flush=True)
    # Not sys.exit: the threads of orbax's failed save can wait minutes for signals that
    # will not come, holding the exit, then print their tracebacks. Everything the run
    # keeps is written (the loop waited for its other saves and flushed its logs).
    os._exit(1)
  except (ValueError, ImportError, OSError, loop.NonFiniteError) as error:
    if FLAGS.verbose:
      raise
    sys.exit(f"error: {error}")
  if distributed.is_lead():
    print(f"done: {FLAGS.workdir} (last metrics: "
          f"{ {k: round(v, 5) for k, v in last.items()} })")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
