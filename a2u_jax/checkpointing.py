"""Model checkpoints on disk: orbax-saved variables plus the model options that built them.

A model checkpoint folder holds ``variables/`` (an orbax StandardCheckpointer tree with
``params`` and ``batch_stats``) and ``model.json`` (keyword arguments of
`a2u_jax.models.build_model`: the resampler and the other `MattingNet` attributes).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from a2u_jax import models

MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


def _process_local_checkpointer() -> ocp.StandardCheckpointer:
  """A checkpointer for this process alone: model checkpoints hold host arrays, are
  written by one process (process 0 of a training run) and read by each process on its
  own, so nothing here may wait for the other processes of a multi-host run."""
  index = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=index, active_processes={index}))


def save_model_checkpoint(directory: str | os.PathLike, variables: dict[str, Any],
                          model_config: dict[str, Any], *, force: bool = False) -> pathlib.Path:
  """Writes variables + model.json to `directory`, atomically.

  Everything is written to a temporary sibling folder first and renamed into place, so a
  failure never leaves a half-written checkpoint. A non-empty `directory` is refused unless
  `force` is true (then it is replaced). In a multi-host run only one process calls it.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not force:
    raise FileExistsError(f"{directory} exists and is not empty; pass force=True (--force) "
                          f"to replace it")
  directory.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  try:
    checkpointer = _process_local_checkpointer()
    checkpointer.save(staging / VARIABLES_DIR, jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    (staging / MODEL_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    if directory.exists():
      shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    staging.rename(directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def load_model_checkpoint(directory: str | os.PathLike
                          ) -> tuple[models.MattingNet, dict[str, Any]]:
  """Returns (model, variables) from a folder written by `save_model_checkpoint`."""
  directory = pathlib.Path(directory).absolute()
  config_path = directory / MODEL_FILE
  if not config_path.is_file() or not (directory / VARIABLES_DIR).is_dir():
    raise FileNotFoundError(f"{directory} is not a model checkpoint: expected {MODEL_FILE} "
                            f"and {VARIABLES_DIR}/ inside it")
  model_config = json.loads(config_path.read_text())
  variables = _process_local_checkpointer().restore(directory / VARIABLES_DIR)
  return models.build_model(model_config), variables
