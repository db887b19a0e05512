"""Trimap erosion without TensorFlow: OpenCV's elliptic structuring element and a SciPy
erosion that gives OpenCV's masks (anchor at size // 2, nothing erodes from the border).

The tf.data pipeline (`data_pipeline.morphology`) uses the same element inside its graph;
this module serves everything that runs on NumPy: the synthetic evaluation sets and the
TensorFlow-free synthetic training stream.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

TRIMAP_UNKNOWN = 128


@functools.lru_cache(maxsize=None)
def ellipse_footprint(size: int) -> np.ndarray:
  """The (size, size) uint8 elliptic structuring element of OpenCV's MORPH_ELLIPSE.

  Row i spans columns [c - dx, c + dx] (clipped) with r = c = size // 2,
  dy = i - r and dx = round_half_even(c * sqrt((r^2 - dy^2) / r^2)); the anchor is (r, c).
  """
  if not 1 <= size:
    raise ValueError(f"kernel size must be >= 1, got {size}")
  r = c = size // 2
  inv_r2 = 1.0 / (r * r) if r else 0.0
  element = np.zeros((size, size), np.uint8)
  for i in range(size):
    dy = i - r
    if abs(dy) <= r:
      dx = int(np.rint(c * np.sqrt((r * r - dy * dy) * inv_r2)))
      element[i, max(c - dx, 0):min(c + dx + 1, size)] = 1
  return element


def ellipse_row_runs(size: int) -> list[tuple[int, int, int]]:
  """(row offset, first column offset, width) of each non-empty row of the element,
  offsets relative to its anchor (size // 2, size // 2)."""
  element = ellipse_footprint(size)
  anchor = size // 2
  runs = []
  for i in range(size):
    columns = np.flatnonzero(element[i])
    if columns.size:
      runs.append((i - anchor, int(columns[0]) - anchor, int(columns.size)))
  return runs


def erode(mask: np.ndarray, size: int) -> np.ndarray:
  """Binary erosion of a (H, W) {0, 1} mask by the ellipse of `size`, as `cv2.erode`.

  SciPy centres a footprint at index size // 2 on each axis, which is OpenCV's default
  anchor for odd and even sizes alike; `border_value=1` is OpenCV's erosion border.
  """
  footprint = ellipse_footprint(int(size)).astype(bool)
  return ndimage.binary_erosion(np.asarray(mask, bool), structure=footprint,
                                border_value=1).astype(np.uint8)


def trimap_from_alpha(alpha: np.ndarray, fg_size: int, bg_size: int) -> np.ndarray:
  """The Deep Image Matting trimap of a (H, W) uint8 alpha: the definite foreground
  (255) and background (0) eroded by ellipses of the given sizes, 128 elsewhere."""
  trimap = np.full(alpha.shape, TRIMAP_UNKNOWN, np.uint8)
  trimap[erode(alpha == 255, fg_size) == 1] = 255
  trimap[erode(alpha == 0, bg_size) == 1] = 0
  return trimap
