"""The authors' per-sample training transform in NumPy + OpenCV (their approach, our code).

A transcription of the Deep Image Matting protocol as the authors' PyTorch `DataGenerator`
runs it (merge, 640 resize, RandomAffine, RandomHorizontalFlip, GenTrimap, RandomCrop,
RandomJitter, Composite), in RGB order. It serves two purposes: the baseline that
`benchmarks/input_pipeline.py` times in a process pool, and the independent formulation that
the tests compare the tf.data pipeline with (any decision can be forced through `given`).
Needs OpenCV.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

_KERNELS = [None] + [cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
                     for size in range(1, 30)]


def _inverse_affine(center, angle, scale, shear, flip):
  angle = math.radians(angle)
  shear = math.radians(shear)
  scale_x = 1.0 / scale[0] * flip[0]
  scale_y = 1.0 / scale[1] * flip[1]
  d = math.cos(angle + shear) * math.cos(angle) + math.sin(angle + shear) * math.sin(angle)
  matrix = [math.cos(angle) * scale_x, math.sin(angle + shear) * scale_x, 0,
            -math.sin(angle) * scale_y, math.cos(angle + shear) * scale_y, 0]
  matrix = [m / d for m in matrix]
  matrix[2] += matrix[0] * -center[0] + matrix[1] * -center[1] + center[0]
  matrix[5] += matrix[3] * -center[0] + matrix[4] * -center[1] + center[1]
  return np.array(matrix).reshape(2, 3)


def compose_reference(fg: np.ndarray, alpha: np.ndarray, fg2: np.ndarray,
                      alpha2: np.ndarray, bg: np.ndarray, crop_size: int,
                      rng: np.random.Generator, given: dict[str, Any] | None = None
                      ) -> dict[str, np.ndarray]:
  """One example. fg/fg2/bg: (h, w, 3) uint8 RGB; alpha/alpha2: (h, w) uint8.

  Returns image, fg, bg (float32 [0, 1]), alpha (float32 [0, 1]), trimap (uint8), and the
  crop's top-left corner. `given` forces named decisions (see data_pipeline.composition).
  """
  given = given or {}

  def draw(name, sample):
    return given[name] if name in given else sample()

  alpha = alpha.astype(np.float32) / 255.0
  # Merge two foregrounds.
  if draw("merge", lambda: rng.random() < 0.5):
    h, w = alpha.shape
    fg2 = cv2.resize(fg2, (w, h), interpolation=cv2.INTER_NEAREST)
    alpha2 = cv2.resize(alpha2.astype(np.float32) / 255.0, (w, h),
                        interpolation=cv2.INTER_NEAREST)
    merged = 1 - (1 - alpha) * (1 - alpha2)
    if np.any(merged < 1):
      fg = ((fg.astype(np.float32) * alpha[:, :, None]
             + fg2.astype(np.float32) * (1 - alpha[:, :, None]) * alpha2[:, :, None])
            / (merged[:, :, None] + 1e-5)).astype(np.uint8)
      alpha = merged
  if draw("resize", lambda: rng.random() < 0.25):
    fg = cv2.resize(fg, (640, 640), interpolation=cv2.INTER_NEAREST)
    alpha = cv2.resize(alpha, (640, 640), interpolation=cv2.INTER_NEAREST)

  # RandomAffine.
  rows, cols = alpha.shape
  large = max(rows, cols) >= 1024
  angle = draw("angle", lambda: rng.uniform(-30, 30) if large else 0.0)
  scale = (draw("scale_x", lambda: rng.uniform(0.8, 1.25)),
           draw("scale_y", lambda: rng.uniform(0.8, 1.25)))
  shear = draw("shear", lambda: rng.uniform(-10, 10))
  flips = rng.random(2) < 0.5
  flip = (draw("flip_x", lambda: -1.0 if flips[0] else 1.0),
          draw("flip_y", lambda: -1.0 if flips[1] else 1.0))
  matrix = _inverse_affine((cols * 0.5 + 0.5, rows * 0.5 + 0.5), float(angle),
                           (float(scale[0]), float(scale[1])), float(shear),
                           (float(flip[0]), float(flip[1])))
  warp = cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP
  # Recent OpenCV (4.11+, 5) rounds nearest-neighbour warp coordinates of uint8 and float32
  # images in a new way; float64 images still take the fixed-point path of the OpenCV the
  # authors used, so warp in float64.
  fg = cv2.warpAffine(fg.astype(np.float64), matrix, (cols, rows), flags=warp).astype(np.uint8)
  alpha = cv2.warpAffine(alpha.astype(np.float64), matrix, (cols, rows),
                         flags=warp).astype(np.float32)
  # RandomHorizontalFlip.
  if draw("hflip", lambda: rng.random() < 0.5):
    fg = cv2.flip(fg, 1)
    alpha = cv2.flip(alpha, 1)

  # GenTrimap.
  fg_kernel = int(draw("fg_kernel", lambda: rng.integers(1, 30)))
  bg_kernel = int(draw("bg_kernel", lambda: rng.integers(1, 30)))
  fg_mask = cv2.erode((alpha + 1e-5).astype(np.int32).astype(np.uint8), _KERNELS[fg_kernel])
  bg_mask = cv2.erode((1 - alpha + 1e-5).astype(np.int32).astype(np.uint8),
                      _KERNELS[bg_kernel])
  trimap = np.full(alpha.shape, 128, np.uint8)
  trimap[fg_mask == 1] = 255
  trimap[bg_mask == 1] = 0

  # RandomCrop.
  h, w = trimap.shape
  hbg, wbg = bg.shape[:2]
  ratio = max(h / hbg, w / wbg)
  if ratio > 1:
    bg = cv2.resize(bg, (math.ceil(wbg * ratio), math.ceil(hbg * ratio)),
                    interpolation=cv2.INTER_CUBIC)
    hbg, wbg = bg.shape[:2]
  if h < crop_size + 1 or w < crop_size + 1:
    ratio = 1.1 * crop_size / h if h < w else 1.1 * crop_size / w
    while h < crop_size + 1 or w < crop_size + 1:
      size = (int(w * ratio), int(h * ratio))
      fg = cv2.resize(fg, size, interpolation=cv2.INTER_NEAREST)
      alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_NEAREST)
      trimap = cv2.resize(trimap, size, interpolation=cv2.INTER_NEAREST)
      bg = cv2.resize(bg, (int(wbg * ratio), int(hbg * ratio)), interpolation=cv2.INTER_CUBIC)
      h, w = trimap.shape
  margin = crop_size // 2
  unknown = np.argwhere(trimap[margin:h - margin, margin:w - margin] == 128)
  if len(unknown) < 10:
    top = int(draw("uniform_top", lambda: rng.integers(0, h - crop_size + 1)))
    left = int(draw("uniform_left", lambda: rng.integers(0, w - crop_size + 1)))
  else:
    top, left = (int(v) for v in unknown[int(draw("pick", lambda: rng.integers(len(unknown))))])
  if np.any(trimap == 128):
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    fg, alpha, bg, trimap = fg[window], alpha[window], bg[window], trimap[window]
  else:  # No unknown pixel at all: the whole image, resized.
    size = (crop_size, crop_size)
    fg = cv2.resize(fg, size, interpolation=cv2.INTER_NEAREST)
    alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_NEAREST)
    trimap = cv2.resize(trimap, size, interpolation=cv2.INTER_NEAREST)
    bg = cv2.resize(bg, size, interpolation=cv2.INTER_CUBIC)

  # RandomJitter.
  fg = fg.astype(np.float32)
  if not np.all(alpha == 0):
    hsv = cv2.cvtColor(fg / 255.0, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = np.remainder(hsv[:, :, 0] + draw("hue_degrees",
                                                    lambda: rng.integers(-40, 40)), 360)
    for channel, name in ((1, "saturation_draw"), (2, "value_draw")):
      values = hsv[:, :, channel]
      mean = values[alpha > 0].mean()
      shift = draw(name, rng.random) * (1.1 - mean) / 5 - (1.1 - mean) / 10
      values = np.abs(values + shift)
      values[values > 1] = 2 - values[values > 1]
      hsv[:, :, channel] = values
    fg = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255

  # Composite.
  alpha = np.clip(alpha, 0, 1)[:, :, None]
  fg = np.clip(fg, 0, 255)
  bg = np.clip(bg.astype(np.float32), 0, 255)
  image = fg * alpha + bg * (1 - alpha)
  return {"image": image / 255.0, "fg": fg / 255.0, "bg": bg / 255.0, "alpha": alpha,
          "trimap": trimap[:, :, None], "top_left": (top, left)}
