"""One run per workdir: a lock that names its holder, and a refusal to restart over another
run's results.

The lock is an advisory `flock` on WORKDIR/.lock taken by process 0 of a run. The kernel
drops it when the process ends, however it ends (SIGKILL included), so a killed run never
leaves it stuck; the file itself stays, holding the last holder's pid, host and start time.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_FILE = ".lock"
# What a run leaves in its workdir besides checkpoints/: metrics.jsonl and the model
# checkpoints (model/, best_model/) and the best training state (best/).
RESULTS = ("metrics.jsonl", "model", "best_model", "best")
_held: dict[pathlib.Path, object] = {}


def claim(workdir: pathlib.Path, *, lead: bool) -> None:
  """Makes `workdir` this run's, or raises ValueError saying why it cannot be.

  Every process checks that a workdir holding another run's results (RESULTS) also holds
  its checkpoints/ (without them the run would restart from step 0 over those results);
  process 0 (`lead`) also takes the lock, refusing a workdir another process holds. Release
  with `release(workdir)`. In a multi-process run this is collective: when one process
  refuses, every process raises (the others would otherwise wait for it at their first
  collective until JAX aborts).
  """
  try:
    _claim(workdir, lead=lead)
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


def _claim(workdir: pathlib.Path, *, lead: bool) -> None:
  workdir = pathlib.Path(workdir).absolute()
  checkpoints = workdir / "checkpoints"
  if not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
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
