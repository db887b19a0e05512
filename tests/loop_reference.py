"""Straight loop transcriptions of docs/design.md §2.2, in float64 NumPy, for tests only."""

import numpy as np


def reassemble_up(features, kernels, kernel_size, groups=1):
  f, m = np.asarray(features, np.float64), np.asarray(kernels, np.float64)
  n, h, w, c = f.shape
  k, r, per_group = kernel_size, (kernel_size - 1) // 2, c // groups
  out = np.zeros((n, 2 * h, 2 * w, c))
  for yy in range(2 * h):
    for xx in range(2 * w):
      for ky in range(k):
        for kx in range(k):
          sy, sx = yy // 2 + ky - r, xx // 2 + kx - r
          if not (0 <= sy < h and 0 <= sx < w):
            continue
          for ch in range(c):
            g = ch // per_group
            out[:, yy, xx, ch] += f[:, sy, sx, ch] * m[:, yy, xx, (g * k + ky) * k + kx]
  return out


def reassemble_down(features, kernels, kernel_size, groups=1):
  f, m = np.asarray(features, np.float64), np.asarray(kernels, np.float64)
  n, hh, ww, c = f.shape
  k, r, per_group = kernel_size, (kernel_size - 2) // 2, c // groups
  out = np.zeros((n, hh // 2, ww // 2, c))
  for y in range(hh // 2):
    for x in range(ww // 2):
      for ky in range(k):
        for kx in range(k):
          sy, sx = 2 * y + ky - r, 2 * x + kx - r
          if not (0 <= sy < hh and 0 <= sx < ww):
            continue
          for ch in range(c):
            g = ch // per_group
            out[:, y, x, ch] += f[:, sy, sx, ch] * m[:, y, x, (g * k + ky) * k + kx]
  return out
