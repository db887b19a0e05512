"""A line-by-line, loop-based transcription of the authors' MATLAB metric scripts.

Written from matlab_testcode/*.m (dongdong93/a2u_matting) without SciPy, to check
`a2u_jax.metrics` against a second formulation: the Gaussian-derivative kernel is built with
the script's double loop, `imfilter(..., 'replicate', 'conv')` is a sum of shifted copies of
an edge-padded image with the 180°-rotated full 2-D kernel, and `bwconncomp(..., 4)` is a
breadth-first search started from pixels in column-major order. Slow; for small arrays and
for computing the reference values the tests write down.
"""

from __future__ import annotations

import collections
import math

import numpy as np


def compute_sad_loss(pred, target, trimap):
  error_map = np.abs(np.float32(pred) - np.float32(target)) / np.float32(255)
  return float(np.sum(error_map * np.float32(trimap == 128), dtype=np.float64)) / 1000


def compute_mse_loss(pred, target, trimap):
  error_map = (np.float32(pred) - np.float32(target)) / np.float32(255)
  unknown = np.float32(trimap == 128)
  return float(np.sum(error_map ** 2 * unknown, dtype=np.float64) / np.sum(unknown))


def _mat2gray(a):
  a = np.array(a, np.float64)
  lo, hi = a.min(), a.max()
  if hi == lo:
    out = a
  else:
    delta = 1 / (hi - lo)
    out = delta * a - lo * delta
  return np.maximum(0, np.minimum(out, 1))


def _gauss(x, sigma):
  return math.exp(-x ** 2 / (2 * sigma ** 2)) / (sigma * math.sqrt(2 * math.pi))


def _dgauss(x, sigma):
  return -x * _gauss(x, sigma) / sigma ** 2


def _imfilter_replicate_conv(image, kernel):
  rotated = kernel[::-1, ::-1]  # 'conv' correlates with the rotated kernel
  half_y, half_x = kernel.shape[0] // 2, kernel.shape[1] // 2
  padded = np.pad(image, ((half_y, half_y), (half_x, half_x)), mode="edge")
  out = np.zeros_like(image)
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      out += rotated[i, j] * padded[i:i + image.shape[0], j:j + image.shape[1]]
  return out


def _gaussgradient(image, sigma):
  epsilon = 1e-2
  halfsize = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * epsilon)))
  size = 2 * halfsize + 1
  hx = np.zeros((size, size))
  for i in range(1, size + 1):
    for j in range(1, size + 1):
      u = (i - halfsize - 1, j - halfsize - 1)
      hx[i - 1, j - 1] = _gauss(u[0], sigma) * _dgauss(u[1], sigma)
  hx = hx / math.sqrt(np.sum(np.abs(hx) * np.abs(hx)))
  hy = hx.T
  return _imfilter_replicate_conv(image, hx), _imfilter_replicate_conv(image, hy)


def compute_gradient_loss(pred, target, trimap):
  pred_x, pred_y = _gaussgradient(_mat2gray(pred), 1.4)
  target_x, target_y = _gaussgradient(_mat2gray(target), 1.4)
  pred_amp = np.sqrt(pred_x ** 2 + pred_y ** 2)
  target_amp = np.sqrt(target_x ** 2 + target_y ** 2)
  error_map = (np.float32(pred_amp) - np.float32(target_amp)) ** 2
  return float(np.sum(error_map * np.float32(trimap == 128), dtype=np.float64)) / 1000


def _bwconncomp4(mask):
  """Components as lists of pixels, numbered in column-major order of their first pixel."""
  height, width = mask.shape
  seen = np.zeros_like(mask, bool)
  components = []
  for x in range(width):
    for y in range(height):
      if mask[y, x] and not seen[y, x]:
        seen[y, x] = True
        queue, pixels = collections.deque([(y, x)]), []
        while queue:
          cy, cx = queue.popleft()
          pixels.append((cy, cx))
          for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
            if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
              seen[ny, nx] = True
              queue.append((ny, nx))
        components.append(pixels)
  return components


def _colon(a, d, b):
  n = int(math.floor((b - a) / d + 1e-10))
  c = a + n * d
  return [a + k * d if k < n / 2 else c - (n - k) * d for k in range(n + 1)]


def compute_connectivity_error(pred, target, trimap, step=0.1):
  pred = np.float32(pred) / np.float32(255)
  target = np.float32(target) / np.float32(255)
  thresh_steps = _colon(0, step, 1)
  l_map = np.ones(pred.shape) * -1
  for ii in range(1, len(thresh_steps)):
    pred_alpha_thresh = pred.astype(np.float64) >= thresh_steps[ii]
    target_alpha_thresh = target.astype(np.float64) >= thresh_steps[ii]
    cc = _bwconncomp4(pred_alpha_thresh & target_alpha_thresh)
    if not cc:
      continue
    size_vec = [len(c) for c in cc]
    max_id = size_vec.index(max(size_vec))
    omega = np.zeros(pred.shape)
    for y, x in cc[max_id]:
      omega[y, x] = 1
    flag = (l_map == -1) & (omega == 0)
    l_map[flag] = thresh_steps[ii - 1]
  l_map[l_map == -1] = 1
  # single - double is single in MATLAB.
  pred_d = pred - np.float32(l_map)
  target_d = target - np.float32(l_map)
  pred_phi = np.float32(1) - pred_d * np.float32(pred_d.astype(np.float64) >= 0.15)
  target_phi = np.float32(1) - target_d * np.float32(target_d.astype(np.float64) >= 0.15)
  loss = np.sum(np.abs(pred_phi - target_phi) * np.float32(trimap == 128), dtype=np.float64)
  return float(loss) / 1000
