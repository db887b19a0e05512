"""The SAD rules that training validation scores with, and so chooses best_model/ by
(`config.validation.sad_rule`; docs/design.md §5).

Each rule takes one validation image: `alpha` float32 (H, W), the post-processed prediction
in [0, 1] (clipped, the trimap's known regions set to 0 and 1, `inputs.postprocess_alpha`),
`gt` uint8 (H, W) and `trimap` uint8 (H, W) in {0, 128, 255}; it returns that image's SAD
in the papers' unit (thousands of alpha units).

  authors  What the authors' training validates with (their trainval.py validate(), which
           calls utils.compute_sad_loss): the float prediction times 255, with the known
           regions set to the trimap's 0 and 255, and the float ground truth are each
           stretched to [0, 255] over the whole image by OpenCV's
           normalize(NORM_MINMAX, CV_32F); the SAD is the sum of |p - g| / 255 over the
           unknown region, divided by 1000, in float32 as there. The stretch changes
           nothing for an image that holds both 0 and 255 (nearly always the prediction,
           since its trimap has both); it rescales the ground truth of an image with no
           fully opaque (or no fully transparent) pixel.
  matlab   The published metric (`metrics.sad`, the MATLAB script) on the 8-bit alpha the
           authors' test.py saves (`inputs.quantize_alpha`): what a2u-evaluate reports.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from a2u_jax import inputs, metrics

_DBL_EPSILON = float(np.finfo(np.float64).eps)


def normalize_minmax(values: np.ndarray) -> np.ndarray:
  """cv2.normalize(values, None, 0, 255, cv2.NORM_MINMAX, dtype=cv2.CV_32F), bit for bit.

  values: (H, W) float32. OpenCV takes the minimum and maximum in double precision; the
  scale 255 / (max - min) (0 when max - min <= DBL_EPSILON) and the shift -min * scale
  are rounded to float32, and each value becomes round_to_float32(v * scale + shift),
  one rounding (a float32 product is exact in float64). Returns float32 (H, W).
  """
  values = np.asarray(values, np.float32)
  low, high = float(values.min()), float(values.max())
  scale = float(np.float32(255.0 * (1.0 / (high - low) if high - low > _DBL_EPSILON else 0.0)))
  shift = float(np.float32(0.0) - np.float32(low * scale))
  return (values.astype(np.float64) * scale + shift).astype(np.float32)


def authors_sad(alpha: np.ndarray, gt: np.ndarray, trimap: np.ndarray) -> float:
  """The authors' validation SAD (see the module docstring)."""
  unknown = np.asarray(trimap) == metrics.UNKNOWN
  # Their prediction: clip(output, 0, 1) * 255, and (1 - mask) * trimap + mask * that.
  prediction = np.where(unknown, np.asarray(alpha, np.float32) * np.float32(255),
                        np.asarray(trimap, np.float32))
  # Their ground truth: cv2.imread(path, 0).astype(float32) / 255., then * 255. again.
  truth = np.asarray(gt, np.float32) / np.float32(255) * np.float32(255)
  error = np.abs(normalize_minmax(prediction) - normalize_minmax(truth)) / np.float32(255)
  return float(np.sum(error * unknown.astype(np.float32)) / np.float32(1000))


def matlab_sad(alpha: np.ndarray, gt: np.ndarray, trimap: np.ndarray) -> float:
  """The published SAD of the saved 8-bit alpha (see the module docstring)."""
  return metrics.sad(inputs.quantize_alpha(alpha), gt, trimap)


SAD_RULES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "authors": authors_sad,
    "matlab": matlab_sad,
}
