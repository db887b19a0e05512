"""Validation during training: the validation set that config.validation names, and its
mean SAD and MSE, which choose best/ and best_model/ (docs/design.md, "Validation during
training")."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from a2u_jax import distributed, inputs
from a2u_jax import metrics as matting_metrics, predict, sad_rules
from a2u_jax.training import config_checks


def validation_items(config: ml_collections.ConfigDict) -> Sequence[Any]:
  """The validation set named by config.validation (its rule checked too, before training).

  "composition1k" reads config.validation.data_dir: a folder with image/ and trimap/ (and
  alpha/) subfolders, or else the TFDS data_dir of the prepared builder."""
  import data_pipeline

  validation = config.validation
  if validation.sad_rule not in sad_rules.SAD_RULES:
    raise ValueError(f"config.validation.sad_rule must be one of "
                     f"{', '.join(sad_rules.SAD_RULES)}, got {validation.sad_rule!r}")
  readers = config_checks.validation_readers()
  if validation.source == "composition1k":
    if not validation.data_dir:
      raise ValueError("config.validation.source='composition1k' needs "
                       "config.validation.data_dir: the TFDS data_dir where "
                       "data_pipeline.tfds_builders.prepare('composition1k', ...) wrote the "
                       "test set, or a folder with image/, trimap/ and alpha/")
    root = pathlib.Path(validation.data_dir).expanduser()
    if (root / "image").is_dir() and (root / "trimap").is_dir():
      items = data_pipeline.folder_items(root)
    else:
      items = data_pipeline.tfds_items("composition1k", str(root))
  elif validation.source not in readers:
    raise ValueError(f"config.validation.source must be one of composition1k, "
                     f"{', '.join(readers)}, got {validation.source!r}")
  else:
    items = readers[validation.source](**validation.options)
  if not len(items):
    raise ValueError(f"config.validation: source {validation.source!r} gave no images; "
                     f"validation needs at least one")
  return items


def validate(predictor: predict.Predictor, items, batch_size: int, sad_rule: str
             ) -> dict[str, float]:
  """Mean SAD and MSE (the papers' units) over evaluation items with ground truth.

  The SAD follows `sad_rule` (a name in `sad_rules.SAD_RULES`: "authors", their training's
  validation SAD of the float alpha, or "matlab", the published SAD of the saved 8-bit
  alpha); it is what chooses best_model/. The MSE is the published one (8-bit alpha).

  Every process of a multi-host run takes its slice of each global batch
  (`eval_batches`' shards), predicts it with `predictor` (over every process's devices,
  called by all together) and scores its images; the scores are gathered, so every
  process returns the same means (or raises the same error).
  """
  import data_pipeline

  sad = sad_rules.SAD_RULES[sad_rule]
  local = predictor.runtime.local_devices
  batch_size = -(-batch_size // local) * local
  scores = []  # per batch slot: (sad, mse, 1 a real image | 0 a filler | -1 no alpha)
  unscored = []
  for batch in data_pipeline.eval_batches(items, batch_size=batch_size,
                                          shard_index=jax.process_index(),
                                          num_shards=jax.process_count()):
    alphas = predictor(batch["image"], batch["trimap"])
    rows = []
    for i in np.flatnonzero(batch["valid"]):
      if not batch["has_alpha"][i]:
        unscored.append(batch["name"][i])
        rows.append((0.0, 0.0, -1.0))
        continue
      h, w = int(batch["height"][i]), int(batch["width"][i])
      alpha, gt, trimap = (alphas[i, :h, :w, 0], batch["alpha"][i, :h, :w, 0],
                           batch["trimap"][i, :h, :w, 0])
      rows.append((sad(alpha, gt, trimap),
                   matting_metrics.mse(inputs.quantize_alpha(alpha), gt, trimap), 1.0))
    scores += rows + [(0.0, 0.0, 0.0)] * (batch_size - len(rows))
  gathered = distributed.allgather(np.array(scores, np.float64).reshape(-1, 3))
  sad_values, mse, kind = gathered.reshape(-1, 3).T
  if (kind == -1).any():  # raised by every process, after the collective
    example = f", e.g. {unscored[0]}" if unscored else ""
    raise ValueError(f"{int((kind == -1).sum())} validation image(s) have no ground-truth "
                     f"alpha{example}; validation scores every image")
  real = kind == 1.0
  return {"sad": float(np.mean(sad_values[real])), "mse": float(np.nanmean(mse[real]))}
