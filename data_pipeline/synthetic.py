"""Synthetic matting data made in-process: no download, seeded, fast.

Each foreground is a textured object whose alpha has the structures that make matting hard:
a soft-edged body, thin semi-transparent hair strands leaving it, a translucent veil, and a
net of holes. Backgrounds are colourful gradients with blobs, stripes and noise. Sizes vary
per image within the requested range, so the pipeline's size-dependent rules are exercised.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.files import check_positive


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int) -> np.ndarray:
  """Bilinearly upsampled random grid: smooth values in [0, 1], shape (H, W, C)."""
  grid = rng.random((cells + 1, cells + 1, channels))
  ys = np.linspace(0, cells, height)
  xs = np.linspace(0, cells, width)
  y0 = np.minimum(ys.astype(int), cells - 1)
  x0 = np.minimum(xs.astype(int), cells - 1)
  fy = (ys - y0)[:, None, None]
  fx = (xs - x0)[None, :, None]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A colourful texture, float (H, W, 3) in [0, 1]."""
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  colour = 0.6 * _smooth_noise(rng, height, width, int(rng.integers(2, 6)), 3)
  for _ in range(3):
    angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(0.02, 0.25)
    wave = np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6))
    colour += 0.15 * wave[..., None] * rng.uniform(-1, 1, 3)
  colour += 0.05 * rng.standard_normal((height, width, 3))
  return np.clip(colour + rng.uniform(0.0, 0.4, 3), 0, 1)


def _hair(rng: np.random.Generator, alpha: np.ndarray, center: tuple[float, float],
          radius: float) -> None:
  """Draws thin semi-transparent strands leaving the body outwards (in place)."""
  height, width = alpha.shape
  for _ in range(int(rng.integers(20, 60))):
    angle = rng.uniform(0, 2 * np.pi)
    y = center[0] + 0.85 * radius * np.sin(angle)
    x = center[1] + 0.85 * radius * np.cos(angle)
    steps = int(rng.uniform(0.3, 0.9) * radius)
    curl = rng.normal(0, 0.03, steps).cumsum()
    heading = angle + curl
    ys = y + np.sin(heading).cumsum()
    xs = x + np.cos(heading).cumsum()
    opacity = rng.uniform(0.3, 1.0) * np.linspace(1.0, 0.2, steps)
    inside = (ys >= 0) & (ys < height - 1) & (xs >= 0) & (xs < width - 1)
    rows = ys[inside].astype(int)
    cols = xs[inside].astype(int)
    np.maximum.at(alpha, (rows, cols), opacity[inside])
    # Anti-aliased neighbour so strands are fractional, not single hard pixels.
    np.maximum.at(alpha, (rows, cols + 1), 0.5 * opacity[inside])


def synthetic_foreground(rng: np.random.Generator, height: int, width: int
                         ) -> tuple[np.ndarray, np.ndarray]:
  """A textured foreground and its alpha: (H, W, 3) uint8 RGB and (H, W) uint8."""
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  center = (height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6))
  radius = min(height, width) * rng.uniform(0.22, 0.32)
  # Body: a wobbly superellipse with a soft edge of random width.
  theta = np.arctan2(yy - center[0], xx - center[1])
  wobble = 1 + 0.12 * np.sin(rng.integers(2, 6) * theta + rng.uniform(0, 6))
  distance = np.hypot((yy - center[0]) / rng.uniform(0.8, 1.2), xx - center[1]) / wobble
  softness = rng.uniform(1.0, 6.0)
  alpha = np.clip((radius - distance) / softness + 0.5, 0, 1)
  # A net of holes in part of the body.
  net = 0.5 + 0.5 * np.sin(xx * rng.uniform(0.2, 0.5)) * np.sin(yy * rng.uniform(0.2, 0.5))
  net_region = distance < radius * rng.uniform(0.3, 0.6)
  alpha = np.where(net_region & (xx > center[1]), alpha * np.clip(net * 1.5, 0, 1), alpha)
  # A translucent veil beside the body.
  veil_center = (center[0] + radius * rng.uniform(-0.8, 0.8), center[1] - radius * 0.9)
  veil = np.hypot(yy - veil_center[0], xx - veil_center[1]) < radius * rng.uniform(0.3, 0.6)
  alpha = np.maximum(alpha, veil * rng.uniform(0.25, 0.6))
  _hair(rng, alpha, center, radius)
  fg = _texture(rng, height, width)
  return (np.round(fg * 255).astype(np.uint8),
          np.round(np.clip(alpha, 0, 1) * 255).astype(np.uint8))


def synthetic_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A background image, (H, W, 3) uint8 RGB."""
  yy, xx = np.mgrid[:height, :width].astype(np.float32)
  start, end = rng.random(3), rng.random(3)
  ramp = (xx / width)[..., None]
  image = start * (1 - ramp) + end * ramp
  image = 0.6 * image + 0.4 * _smooth_noise(rng, height, width, int(rng.integers(3, 9)), 3)
  for _ in range(int(rng.integers(3, 8))):
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    blob = np.hypot(yy - cy, xx - cx) < rng.uniform(0.05, 0.25) * min(height, width)
    image = np.where(blob[..., None], rng.random(3), image)
  stripes = (np.sin(yy * rng.uniform(0.05, 0.3)) > 0.7)[..., None]
  image = np.where(stripes, image * 0.7, image)
  image += 0.04 * rng.standard_normal((height, width, 3))
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def synthetic_dataset(num_foregrounds: int, num_backgrounds: int, min_size: int,
                      max_size: int, seed: int
                      ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
  """Foregrounds, alphas and backgrounds with sides drawn from [min_size, max_size]."""
  check_positive("num_foregrounds", num_foregrounds)
  check_positive("num_backgrounds", num_backgrounds)
  check_positive("min_size", min_size)
  if max_size < min_size:
    raise ValueError(f"max_size ({max_size}) must be >= min_size ({min_size})")
  rng = np.random.default_rng(seed)

  def size():
    return (int(s) for s in rng.integers(min_size, max_size + 1, 2))

  foregrounds, alphas = [], []
  for _ in range(num_foregrounds):
    fg, alpha = synthetic_foreground(rng, *size())
    foregrounds.append(fg)
    alphas.append(alpha)
  backgrounds = [synthetic_background(rng, *size()) for _ in range(num_backgrounds)]
  return foregrounds, alphas, backgrounds
