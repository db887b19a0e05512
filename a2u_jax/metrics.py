"""Matting metrics on the unknown region, in the units the papers report (design.md §5).

Inputs are 8-bit-valued alphas (uint8, or floats in 0..255) and a trimap whose 128 marks
the unknown region.
"""

from __future__ import annotations

import numpy as np


def _prepare(pred, gt, trimap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  trimap = np.asarray(trimap)
  if pred.shape != gt.shape or pred.shape != trimap.shape:
    raise ValueError(f"pred, gt and trimap must have the same shape, got {pred.shape}, "
                     f"{gt.shape} and {trimap.shape}")
  for name, value in (("pred", pred), ("gt", gt)):
    if value.size and (value.min() < 0 or value.max() > 255):
      raise ValueError(f"{name}: values must be in 0..255 (8-bit alpha), got "
                       f"[{value.min():g}, {value.max():g}]")
  return pred, gt, trimap == 128


def sad(pred, gt, trimap) -> float:
  """Sum of absolute differences over the unknown region, / 255 / 1000."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  return float(np.sum(np.abs(pred - gt)[unknown]) / 255.0 / 1000.0)


def mse(pred, gt, trimap) -> float:
  """Mean squared error over the unknown region on [0, 1] alphas (0 if none is unknown)."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  count = np.count_nonzero(unknown)
  return float(np.sum(((pred - gt) / 255.0)[unknown] ** 2) / count) if count else 0.0
