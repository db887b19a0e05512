"""One run per workdir: a lock that names its holder, a refusal to restart over another
run's results, and a refusal to resume with a config that would change what the run's
earlier steps computed.

The lock is an advisory `flock` on WORKDIR/.lock taken by process 0 of a run. The kernel
drops it when the process ends, however it ends (SIGKILL included), so a killed run never
leaves it stuck; the file itself stays, holding the last holder's pid, host and start time.

WORKDIR/config.json records the config of the run; a resumed run (one with a checkpoint to
resume from) may change only the fields of RESUMABLE_FIELDS, and config.json is rewritten
only once the resume is accepted.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time
from typing import Any

import ml_collections

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# The config fields a resumed run may change. They decide how far the run goes and what it
# logs, keeps, validates when, and caches: not a step's data, model, loss or learning
# rate, nor how validation scores a step (which chooses best/). Every other field is the
# same for every step of a run, so that config.json says what each of them computed.
RESUMABLE_FIELDS = frozenset({
    "num_train_steps", "num_epochs",  # how far the run goes (the schedule reads neither)
    "log_every", "image_summary_every", "checkpoint_every", "keep_checkpoints",
    "eval_every", "validation.batch_size",  # when it validates, in how many images at once
    "compilation_cache_dir", "distributed",  # how the program is compiled and started
})
# What a run leaves in its workdir besides checkpoints/: metrics.jsonl and the model
# checkpoints (model/, best_model/) and the best training state (best/).
RESULTS = ("metrics.jsonl", "model", "best_model", "best")
_held: dict[pathlib.Path, object] = {}


def claim(workdir: pathlib.Path, *, lead: bool,
          config: ml_collections.ConfigDict | None = None) -> None:
  """Makes `workdir` this run's, or raises ValueError saying why it cannot be.

  Every process checks that a workdir holding another run's results (RESULTS) also holds
  its checkpoints/ (without them the run would restart from step 0 over those results),
  and, given the run's `config`, that a resumed run changes no field of its config.json
  but those of RESUMABLE_FIELDS; process 0 (`lead`) also takes the lock, refusing a
  workdir another process holds, and once every process accepted, writes `config` to
  config.json. Release with `release(workdir)`. In a multi-process run this is collective:
  when one process refuses, every process raises (the others would otherwise wait for it
  at their first collective until JAX aborts).
  """
  try:
    _claim(workdir, lead=lead, config=config)
    refused = None
  except ValueError as error:
    refused = error
  import jax
  import numpy as np

  if jax.process_count() > 1:
    from a2u_jax import distributed

    flags = distributed.allgather(np.array([refused is not None], np.int32)).reshape(-1)
    if refused is None and flags.any():
      release(workdir)
      raise ValueError(f"--workdir {pathlib.Path(workdir).absolute()}: refused by process "
                       f"{int(np.flatnonzero(flags)[0])} (its error says why)")
  if refused is not None:
    raise refused
  if lead and config is not None:
    _write_config(pathlib.Path(workdir).absolute() / CONFIG_FILE, config)


def _claim(workdir: pathlib.Path, *, lead: bool,
           config: ml_collections.ConfigDict | None) -> None:
  workdir = pathlib.Path(workdir).absolute()
  checkpoints = workdir / "checkpoints"
  resuming = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
  if resuming and config is not None:
    check_resumed_config(workdir / CONFIG_FILE, config)
  if not resuming:
    # A run killed before its first checkpoint leaves an empty checkpoints/ and a few
    # metrics rows, which a restart rightly drops; model checkpoints and best/ come only
    # with a checkpoint of the same step.
    found = [name for name in RESULTS if _has_results(workdir / name) and not (
        name == "metrics.jsonl" and checkpoints.is_dir())]
    if found:
      raise ValueError(
          f"--workdir {workdir}: holds another run's results ({', '.join(found)}) but no "
          f"checkpoints/ to resume from; starting over would replace them. Use another "
          f"--workdir, or move those away first")
  if lead:
    lock(workdir, "--workdir")


def check_resumed_config(path: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, in one line naming the first changed fields and their two values,
  when `config` differs from the run's config.json at `path` in a field that is not in
  RESUMABLE_FIELDS. Fields only one of them has (a config.json of another a2u-jax version)
  are not compared; nor is anything when there is no config.json (a run of a version that
  did not write one: the checkpoint's own seed and batch size are still checked)."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return
  try:
    recorded = _leaves(json.loads(text))
  except ValueError:
    raise ValueError(f"{path}: not valid JSON, so what this run's checkpoints were trained "
                     f"with is unknown; restore it from a copy (or remove it to resume with "
                     f"this config unchecked)") from None
  asked = _leaves(json.loads(config.to_json_best_effort()))
  changed = [name for name in sorted(recorded.keys() & asked.keys())
             if recorded[name] != asked[name] and name not in RESUMABLE_FIELDS]
  if changed:
    listed = "; ".join(f"config.{name}: {json.dumps(recorded[name])} there, "
                       f"{json.dumps(asked[name])} here" for name in changed[:3])
    more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
    raise ValueError(
        f"--workdir {path.parent}: resuming with a config that changes what its steps "
        f"compute ({listed}{more}, as {path.name} records the run); a resumed run may change "
        f"only {', '.join(sorted(RESUMABLE_FIELDS))}. Rerun with the recorded values, or "
        f"use another --workdir")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted field name: value} of a JSON object; lists are values."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  leaves = {}
  for key, value in tree.items():
    leaves.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
  return leaves


def _write_config(path: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Writes config.json whole or not at all: a run killed while writing it must not leave
  a torn record that its resume would refuse."""
  staging = path.with_name(f".{path.name}.{os.getpid()}")
  try:
    staging.write_text(config.to_json_best_effort(indent=2) + "\n")
    os.replace(staging, path)
  except BaseException:
    staging.unlink(missing_ok=True)
    raise


def lock(folder: pathlib.Path, flag: str) -> None:
  """Takes `folder`'s lock for this process (again: no change), or raises ValueError
  naming the process that holds it; `flag` names the folder's option in the message.
  Release with `release(folder)`."""
  folder = pathlib.Path(folder).absolute()
  if folder in _held:
    return
  handle = open(folder / LOCK_FILE, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    handle.seek(0)
    holder = _describe(handle.read())
    handle.close()
    raise ValueError(f"{flag} {folder}: in use by another run ({holder}); wait for it to "
                     f"finish or stop it, or use another {flag}") from None
  handle.seek(0)
  handle.truncate()
  handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")
  handle.flush()
  _held[folder] = handle


def release(workdir: pathlib.Path) -> None:
  """Drops this process's lock on `workdir`, if it holds one."""
  handle = _held.pop(pathlib.Path(workdir).absolute(), None)
  if handle is not None:
    handle.close()  # closing the file releases the flock


def _has_results(path: pathlib.Path) -> bool:
  if path.is_dir():
    return any(path.iterdir())
  return path.exists() and path.stat().st_size > 0


def _describe(text: str) -> str:
  try:
    holder = json.loads(text)
    return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
  except (ValueError, KeyError, TypeError):
    return "a process that did not say which"
