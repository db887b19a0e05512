"""Matting metrics with the semantics of the Deep Image Matting MATLAB evaluation code.

The authors score predictions with `compute_sad_loss.m`, `compute_mse_loss.m`,
`compute_gradient_loss.m` (+ `gaussgradient.m`) and `compute_connectivity_error.m`. Python
ports elsewhere differ from them in details that move the numbers, so these functions follow
the MATLAB code step by step (docs/design.md §5):

- Every metric is taken over the unknown region, the pixels where the trimap is exactly 128.
- SAD, Grad and Conn are sums reported divided by 1000; MSE is a mean over the unknown pixels.
- Grad rescales each alpha by its own minimum and maximum first (`mat2gray`), then takes
  first-derivative-of-Gaussian gradients (sigma 1.4, half-size 4, kernel scaled to unit L2
  norm) by convolution with replicated borders, in double precision; the gradient
  magnitudes are rounded to single precision before they are compared, as in MATLAB.
- Conn works in single precision like the MATLAB code (`single(pred)/255`). Thresholds are
  MATLAB's `0:step:1` and are inclusive (`alpha >= t`). For each threshold the largest
  4-connected component of (pred >= t) & (gt >= t) is kept; a tie between components of
  equal size goes to the one MATLAB's `bwconncomp` lists first (column-major scan order).
  A pixel's level is the last threshold at which it was still in the kept component. When
  a threshold leaves no component at all, MATLAB skips it (`continue`) and every pixel not
  assigned by then keeps level 1; that is reproduced, not "fixed".

Inputs: `pred` and `gt` hold 8-bit alpha values: uint8 (or another integer type) or floats
in 0..255, shape (H, W) or (H, W, 1). Float alphas whose maximum is at most 1 look like
[0, 1] alphas and are refused rather than guessed at. `trimap` has the same shape.

A trimap without unknown pixels gives SAD, Grad and Conn 0.0 (the empty sum, as in MATLAB)
and MSE nan (MATLAB's 0/0); callers averaging over a test set decide what to do with it
(`a2u_jax.evaluate` leaves such images out of the MSE mean and says so).

Sums are accumulated in double precision. MATLAB accumulates single-precision sums in single;
the difference is far below the digits the papers print.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

UNKNOWN = 128
GRAD_SIGMA = 1.4
CONN_STEP = 0.1
CONN_THETA = 0.15


def _as_alpha(name: str, value) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f"{name}: expected an (H, W) or (H, W, 1) alpha, got shape {array.shape}")
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise ValueError(f"{name}: expected uint8 or float values in 0..255, got dtype "
                     f"{array.dtype}")
  if array.size == 0:
    raise ValueError(f"{name}: empty alpha of shape {array.shape}")
  low, high = array.min(), array.max()
  if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
    raise ValueError(f"{name}: contains nan or inf")
  if low < 0 or high > 255:
    raise ValueError(f"{name}: values must be 8-bit alpha in 0..255, got [{low:g}, {high:g}]")
  if np.issubdtype(array.dtype, np.floating) and 0 < high <= 1:
    raise ValueError(f"{name}: float values in [{low:g}, {high:g}] look like a [0, 1] alpha; "
                     f"these metrics take 8-bit values: pass alpha * 255 (rounded as your "
                     f"saved PNGs are)")
  return array


def _prepare(pred, gt, trimap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  pred, gt = _as_alpha("pred", pred), _as_alpha("gt", gt)
  trimap = np.asarray(trimap)
  if trimap.ndim == 3 and trimap.shape[-1] == 1:
    trimap = trimap[..., 0]
  if not pred.shape == gt.shape == trimap.shape:
    raise ValueError(f"pred, gt and trimap must have the same (H, W) shape, got "
                     f"{pred.shape}, {gt.shape} and {trimap.shape}")
  return pred, gt, trimap == UNKNOWN


def sad(pred, gt, trimap) -> float:
  """Sum of absolute differences over the unknown region, in [0, 1] alpha units, / 1000."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  error = np.abs(pred.astype(np.float32) - gt.astype(np.float32)) / np.float32(255)
  return float(np.sum(error[unknown], dtype=np.float64) / 1000.0)


def mse(pred, gt, trimap) -> float:
  """Mean squared error over the unknown region on [0, 1] alphas (nan if none is unknown)."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  count = np.count_nonzero(unknown)
  if not count:
    return math.nan
  error = (pred.astype(np.float32) - gt.astype(np.float32)) / np.float32(255)
  return float(np.sum(np.square(error)[unknown], dtype=np.float64) / count)


def mat2gray(image: np.ndarray) -> np.ndarray:
  """MATLAB's `mat2gray(A)`: double, rescaled by its own minimum and maximum to [0, 1]; a
  constant image is returned as double and clipped to [0, 1]."""
  image = np.asarray(image, np.float64)
  low, high = image.min(), image.max()
  if high != low:
    scale = 1.0 / (high - low)
    image = scale * image + (-low * scale)  # imlincomb(delta, A, -low * delta)
  return np.clip(image, 0.0, 1.0)


def gaussian_derivative_kernels(sigma: float = GRAD_SIGMA, epsilon: float = 1e-2
                                ) -> tuple[np.ndarray, np.ndarray]:
  """`gaussgradient.m`'s separable factors: hx = outer(smooth, derivative), where smooth runs
  down the rows and derivative along the columns; hy = hx.T. Half-size
  ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma epsilon))), whole 2-D kernel at unit L2 norm."""
  half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
  u = np.arange(-half, half + 1, dtype=np.float64)
  smooth = np.exp(-u ** 2 / (2.0 * sigma ** 2)) / (sigma * math.sqrt(2.0 * math.pi))
  derivative = -u * smooth / sigma ** 2
  norm = math.sqrt(np.sum(np.square(np.outer(smooth, derivative))))
  return smooth, derivative / norm


def gaussian_gradient(image: np.ndarray, sigma: float = GRAD_SIGMA
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(gx, gy) of `gaussgradient.m`: imfilter(image, h, 'replicate', 'conv'), in double."""
  smooth, derivative = gaussian_derivative_kernels(sigma)
  image = np.asarray(image, np.float64)
  # ndimage.convolve1d is a true convolution (kernel flipped) and mode="nearest" replicates
  # the border, as imfilter's 'conv' and 'replicate'.
  gx = ndimage.convolve1d(ndimage.convolve1d(image, smooth, axis=0, mode="nearest"),
                          derivative, axis=1, mode="nearest")
  gy = ndimage.convolve1d(ndimage.convolve1d(image, derivative, axis=0, mode="nearest"),
                          smooth, axis=1, mode="nearest")
  return gx, gy


def grad(pred, gt, trimap) -> float:
  """Gradient error: sum over the unknown region of (|grad mat2gray(pred)| -
  |grad mat2gray(gt)|)^2, / 1000."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  amplitudes = []
  for alpha in (pred, gt):
    gx, gy = gaussian_gradient(mat2gray(alpha))
    amplitudes.append(np.sqrt(gx ** 2 + gy ** 2).astype(np.float32))
  error = np.square(amplitudes[0] - amplitudes[1])
  return float(np.sum(error[unknown], dtype=np.float64) / 1000.0)


def matlab_colon(start: float, step: float, stop: float) -> np.ndarray:
  """MATLAB's `start:step:stop` for step > 0: the first half counted up from `start`, the
  second half down from the last element, so `0:0.1:1` ends exactly at 1 and its 0.6 and
  0.7 are the doubles nearest 0.6 and 0.7 (np.arange gives 0.6000000000000001)."""
  if step <= 0:
    raise ValueError(f"step must be positive, got {step}")
  count = math.floor((stop - start) / step + 1e-10)
  last = start + count * step
  k = np.arange(count + 1)
  return np.where(k < count / 2, start + k * step, last - (count - k) * step)


def connectivity_levels(pred: np.ndarray, gt: np.ndarray, step: float = CONN_STEP
                        ) -> np.ndarray:
  """The level map `l_map` of `compute_connectivity_error.m` (float64, (H, W)).

  pred and gt: float32 alphas in [0, 1] (single(alpha) / 255).
  """
  thresholds = matlab_colon(0.0, step, 1.0)
  # Relational operators compare single with double exactly; float64 copies do the same.
  pred64, gt64 = pred.astype(np.float64), gt.astype(np.float64)
  levels = np.full(pred.shape, -1.0)
  for index in range(1, len(thresholds)):
    both = (pred64 >= thresholds[index]) & (gt64 >= thresholds[index])
    # Labelling the transpose numbers components in column-major order, as bwconncomp does.
    labels, count = ndimage.label(both.T)
    if count == 0:
      continue  # MATLAB's `continue`: unassigned pixels end at level 1.
    sizes = np.bincount(labels.ravel())[1:]
    largest = (labels == np.argmax(sizes) + 1).T  # argmax: the first of equal sizes.
    levels[(levels == -1) & ~largest] = thresholds[index - 1]
  levels[levels == -1] = 1.0
  return levels


def conn(pred, gt, trimap, step: float = CONN_STEP) -> float:
  """Connectivity error: sum over the unknown region of |phi(pred) - phi(gt)|, / 1000,
  with phi = 1 - d * [d >= 0.15], d = alpha - level."""
  pred, gt, unknown = _prepare(pred, gt, trimap)
  pred = pred.astype(np.float32) / np.float32(255)
  gt = gt.astype(np.float32) / np.float32(255)
  levels = connectivity_levels(pred, gt, step).astype(np.float32)

  def phi(alpha):
    distance = alpha - levels
    return np.float32(1) - distance * (distance.astype(np.float64) >= CONN_THETA)

  error = np.abs(phi(pred) - phi(gt))
  return float(np.sum(error[unknown], dtype=np.float64) / 1000.0)


METRICS = {"sad": sad, "mse": mse, "grad": grad, "conn": conn}


def all_metrics(pred, gt, trimap) -> dict[str, float]:
  """{"sad", "mse", "grad", "conn"} for one image."""
  return {name: metric(pred, gt, trimap) for name, metric in METRICS.items()}
