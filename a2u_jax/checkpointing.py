"""Model checkpoints on disk: orbax-saved variables plus the model options that built them.

A model checkpoint folder holds ``variables/`` (an orbax StandardCheckpointer tree with
``params`` and ``batch_stats``) and ``model.json`` (keyword arguments of
`a2u_jax.models.build_model`: the resampler, its options and the other `MattingNet`
attributes, plus "format_version").

Format versions:
  1  (no "format_version") A2U's options were top-level keys and its four generators were
     variables "gen0".."gen3"; the down modules of other operators were "gen0".."gen3".
  2  every operator goes through `a2u_jax.resamplers.make_resampler`: its options are under
     "resampler_options" and its down modules are "down0".."down3" (A2U's generator inside
     them as "generator").
Older checkpoints are migrated when they are loaded; the folder itself is left as it is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import sys
import threading
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from a2u_jax import models

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 2
# Version 1 kept A2U's options as model.json keys of their own.
_V1_A2U_OPTIONS = ("share", "up_kernel_size", "encode_kernel_size", "rank", "groups")
# Writes that fail because of where they go, not of what is written: the cause, and what
# the user does about it.
_STORAGE_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or raise the quota"),
    errno.EROFS: ("the file system is read-only", "make it writable (remount it read-write)"),
    errno.EACCES: ("permission denied", "give this user write permission there"),
    errno.EPERM: ("operation not permitted", "give this user write permission there"),
    errno.EFBIG: ("a file grew past this process's file size limit",
                  "raise the limit (ulimit -f)"),
}


class StorageError(OSError):
  """A write failed because of its storage (full, read-only, not writable by this user).

  Its message is one line: the folder, the cause, and what to do. Attributes: errno,
  folder (pathlib.Path)."""

  def __init__(self, number: int, folder: pathlib.Path, message: str):
    super().__init__(number, message)
    self.folder = folder

  def __str__(self) -> str:
    return self.strerror


def storage_fault(error: BaseException) -> int | None:
  """The errno of the storage fault behind `error`, or None for any other error: an
  OSError in its chain of causes, or the OS error tensorstore quotes in the errors that
  orbax raises ("... No space left on device [os_error_code='28']")."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _STORAGE_FAULTS:
      return error.errno
    text = str(error)
    quoted = re.search(r"os_error_code='?(\d+)", text)
    if quoted and int(quoted[1]) in _STORAGE_FAULTS:
      return int(quoted[1])
    for number in _STORAGE_FAULTS:
      if os.strerror(number) in text:
        return number
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def storage_faults_named(folder: str | os.PathLike, what: str, then: str) -> Iterator[None]:
  """Runs a write of `what` into `folder`; when it fails because of the storage, raises
  StorageError: "FOLDER: cannot write WHAT: CAUSE; DO THIS, then THEN".

  File descriptor 2 is held in memory meanwhile (replayed when the write succeeds): when
  orbax's write fails, each of its writes still under way reports into an event loop
  already closed, from tensorstore's threads, in hundreds of tracebacks that would bury
  the cause. They are dropped, once they have stopped coming."""
  held = _HeldStderr()
  try:
    with held:
      try:
        yield
      except BaseException:
        held.settle()
        raise
  except Exception as error:  # pylint: disable=broad-except
    number = storage_fault(error)
    if number is None:
      raise
    cause, remedy = _STORAGE_FAULTS[number]
    folder = pathlib.Path(folder)
    raise StorageError(number, folder, f"{folder}: cannot write {what}: {cause}; {remedy}, "
                                       f"then {then}") from None


class _HeldStderr:
  """File descriptor 2 read into memory by a thread while the block runs, written out
  after it when the block succeeds and dropped when it fails (`settle` first waits for the
  writers to fall quiet). A pipe, not a file: the disk may be the one that is full."""

  def __init__(self):
    self._chunks: list[bytes] = []
    self._last = time.monotonic()

  def __enter__(self) -> "_HeldStderr":
    sys.stderr.flush()
    try:
      self._saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a daemon): nothing to hold
      self._saved = None
      return self
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    self._reader = threading.Thread(target=self._read, args=(read,), daemon=True,
                                    name="held-stderr")
    self._reader.start()
    return self

  def _read(self, fd: int) -> None:
    while chunk := os.read(fd, 1 << 16):
      self._chunks.append(chunk)
      self._last = time.monotonic()
    os.close(fd)

  def settle(self, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Waits until nothing has been written for `quiet` seconds (`limit` at most)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and time.monotonic() - self._last < quiet:
      time.sleep(0.05)

  def __exit__(self, kind, value, traceback) -> None:
    if self._saved is None:
      return
    sys.stderr.flush()
    os.dup2(self._saved, 2)  # the pipe's last writer: the reader sees its end
    os.close(self._saved)
    self._reader.join(timeout=5)
    if kind is None and self._chunks:
      with open(2, "wb", closefd=False) as stderr:
        stderr.write(b"".join(self._chunks))


def _process_local_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer for this process alone: model checkpoints hold host arrays, are
  written by one process (process 0 of a training run) and read by each process on its
  own, so nothing here may wait for the other processes of a multi-host run."""
  index = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=index, active_processes={index}))


# What a training run that stopped on a failed write does next.
RESUME = ("rerun the same command: it resumes from the last complete checkpoint, which the "
          "failed write left as it was")


def save_training_checkpoint(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite,
                             metrics: dict[str, float] | None = None) -> None:
  """`manager.save(step, args=args, metrics=metrics)`, waited for. Collective.

  Waiting makes a save that fails stop the run at its own step (orbax's background write
  would raise only at a later save, steps on). A write that fails because of the storage
  raises StorageError, one line naming the folder and the cause, and what is left of the
  step's partial folder is removed (by a single process: in a multi-host run the others may
  still be writing into it); the checkpoints before it are untouched.
  """
  folder = pathlib.Path(manager.directory)
  try:
    with storage_faults_named(folder, f"the checkpoint of step {step}", RESUME):
      manager.save(step, args=args, metrics=metrics)
      manager.wait_until_finished()
  except StorageError:
    if jax.process_count() == 1:
      for partial in folder.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(partial, ignore_errors=True)
    raise


def save_model_checkpoint(directory: str | os.PathLike, variables: dict[str, Any],
                          model_config: dict[str, Any], *, force: bool = False,
                          then: str = "write it again") -> pathlib.Path:
  """Writes variables + model.json to `directory`, atomically.

  Everything is written to a temporary sibling folder first and renamed into place, so a
  failure never leaves a half-written checkpoint. A non-empty `directory` is refused unless
  `force` is true (then it is replaced). A write that fails because of the storage (full,
  read-only) raises StorageError, one line ending in what to do `then`. In a multi-host run
  only one process calls it.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not force:
    raise FileExistsError(f"{directory} exists and is not empty; pass force=True (--force) "
                          f"to replace it")
  with storage_faults_named(directory, "the model checkpoint", then):
    return _save_model_checkpoint(directory, variables, model_config)


def _save_model_checkpoint(directory: pathlib.Path, variables: dict[str, Any],
                           model_config: dict[str, Any]) -> pathlib.Path:
  directory.parent.mkdir(parents=True, exist_ok=True)
  # Made as mkdir makes folders, 0777 less the umask (mkdtemp's are 0700 whatever the
  # umask), so the checkpoint renamed from it is as readable as the user's other files.
  staging = directory.with_name(f".{directory.name}.{secrets.token_hex(6)}")
  staging.mkdir()
  try:
    checkpointer = _process_local_checkpointer()
    checkpointer.save(staging / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    described = {**model_config, "format_version": FORMAT_VERSION}
    (staging / MODEL_FILE).write_text(json.dumps(described, indent=2, sort_keys=True))
    if directory.exists():
      shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    staging.rename(directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def load_model_checkpoint(directory: str | os.PathLike
                          ) -> tuple[models.MattingNet, dict[str, Any]]:
  """Returns (model, variables) from a folder written by `save_model_checkpoint`.

  Raises FileNotFoundError for a folder that is not a model checkpoint, and ValueError, in
  one line naming the file, for a model.json that is not an object of MattingNet options, a
  variables/ folder that cannot be read (damaged: a truncated or missing data file), and
  variables that are not those of the network model.json describes (another resampler,
  share, kernel size, the baseline's weights: the first differing module is named)."""
  directory = pathlib.Path(directory).absolute()
  config_path = directory / MODEL_FILE
  if not config_path.is_file() or not (directory / VARIABLES_DIR).is_dir():
    inside = [name for name in ("model", "best_model") if (directory / name / MODEL_FILE).is_file()]
    hint = (f" (a train.py workdir: give {directory / inside[0]}"
            f"{' or ' + str(directory / inside[1]) if len(inside) > 1 else ''})" if inside else "")
    raise FileNotFoundError(f"{directory} is not a model checkpoint: expected {MODEL_FILE} "
                            f"and {VARIABLES_DIR}/ inside it{hint}")
  try:
    model_config = json.loads(config_path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{config_path}: not valid JSON ({error})") from None
  except UnicodeDecodeError:
    raise ValueError(f"{config_path}: not a text file (the checkpoint is damaged)") from None
  if not isinstance(model_config, dict):
    raise ValueError(f"{config_path}: expected a JSON object of model options (as "
                     f"save_model_checkpoint writes), got a {type(model_config).__name__}")
  version = model_config.pop("format_version", 1)
  if version not in (1, FORMAT_VERSION):
    raise ValueError(f"{config_path}: format_version {version!r} is not one this a2u-jax "
                     f"reads (1 to {FORMAT_VERSION}); was it written by a newer version?")
  try:
    variables = _restore_quietly(directory / VARIABLES_DIR)
  except Exception as error:  # orbax/tensorstore: byte ranges, zstd, missing files ...
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raise ValueError(f"{directory / VARIABLES_DIR}: damaged or incomplete, cannot be read "
                     f"({type(error).__name__}: {lines[0][:200] if lines else ''}); copy the "
                     f"checkpoint again or write a new one") from None
  if version == 1:
    model_config, variables = migrate_from_version_1(model_config, variables)
  try:
    model = models.build_model(model_config)
    model.family()
  except (TypeError, ValueError) as error:
    raise ValueError(f"{config_path}: does not describe a network this a2u-jax builds "
                     f"({error})") from None
  _check_variables(model, variables, directory)
  return model, variables


def _check_variables(model: models.MattingNet, variables: dict[str, Any],
                     directory: pathlib.Path) -> None:
  """Raises ValueError naming the first module where `variables` differ (in names or
  shapes) from those `model` makes; traces the initialisation only (no compute)."""
  from data_pipeline.files import NETWORK_STRIDE

  side = NETWORK_STRIDE * 2
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, side, side, 4), np.float32))

  def shapes(tree):
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  want, have = shapes(dict(expected)), shapes(dict(variables))
  for name in sorted(set(want) | set(have)):
    if want.get(name) != have.get(name):
      module = name.rsplit("/", 1)[0]
      if name not in have:
        detail = f"{name} is missing from {VARIABLES_DIR}/"
      elif name not in want:
        detail = f"{VARIABLES_DIR}/ has {name}, which that network does not"
      else:
        detail = f"{name} is {have[name]} in {VARIABLES_DIR}/ but {want[name]} in that network"
      raise ValueError(f"{directory}: {MODEL_FILE} and {VARIABLES_DIR}/ describe different "
                       f"networks, first in module {module} ({detail}): the checkpoint is "
                       f"damaged, or its {MODEL_FILE} is another network's (another resampler, "
                       f"share, kernel size or the baseline)")


def _restore_quietly(path: pathlib.Path) -> dict[str, Any]:
  """The variables at `path`. When the restore fails, tensorstore's reads still under way
  report into orbax's closed event loop from their threads, printing tracebacks on
  stderr after the error (and after any message about it): file descriptor 2 is held
  while restoring, replayed on success and dropped, once those reads have ended, on
  failure."""
  with _HeldStderr() as held:
    try:
      return _process_local_checkpointer().restore(path)
    except BaseException:
      held.settle(quiet=0.5)  # the other reads end (and report) here
      raise


def migrate_from_version_1(model_config: dict[str, Any], variables: dict[str, Any]
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(model.json options, variables) of a version-1 checkpoint in the current layout.

  A2U's top-level options move under "resampler_options" (other operators ignored them);
  the variables "gen{i}" become "down{i}", for A2U as "down{i}/generator".
  """
  model_config = dict(model_config)
  resampler = model_config.get("resampler", "a2u")
  a2u_options = {key: model_config.pop(key) for key in _V1_A2U_OPTIONS if key in model_config}
  if resampler == "a2u":
    model_config["resampler_options"] = {**a2u_options,
                                         **(model_config.get("resampler_options") or {})}

  def rename(tree: dict[str, Any]) -> dict[str, Any]:
    renamed = {}
    for name, subtree in tree.items():
      level = re.fullmatch(r"gen(\d)", name)
      if level is None:
        renamed[name] = subtree
      else:
        renamed[f"down{level[1]}"] = {"generator": subtree} if resampler == "a2u" else subtree
    return renamed

  return model_config, {collection: rename(tree) for collection, tree in variables.items()}
