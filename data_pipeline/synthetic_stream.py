"""Synthetic training batches in NumPy: the smoke-training source where TensorFlow is not
installed (a core `pip install a2u-jax`, an accelerator machine without TF).

The batch contract and the stream's indexing are `data_pipeline.train_batches`': example k
of the global stream belongs to epoch k // L (L = foregrounds x backgrounds_per_foreground),
its foreground is a per-epoch permutation of the positions modulo the number of
foregrounds, and every random choice comes from a generator seeded by (seed, k). Global
batch b holds examples [b * B, (b + 1) * B) with B = batch_size * num_shards, and shard s
takes its contiguous batch_size slice, so a run is the same for any number of hosts with
the same global batch, and resuming at batch b skips nothing and repeats nothing.

The composition is the Deep Image Matting protocol's core, not all of it: horizontal flip,
the eroded-ellipse trimap, enlargement of images smaller than the crop, a crop centred on
an unknown pixel, the background resized (bicubic) to the foreground and the composite
fg * alpha + bg * (1 - alpha). The second-foreground merge, the random affine and the HSV
jitter of the tf.data pipeline are left out: this stream exercises training, it does not
reproduce the paper's augmentation.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipeline import synthetic, trimaps
from data_pipeline.files import check_positive, check_stream_arguments
from data_pipeline.protocol import (HFLIP_PROBABILITY, MAX_KERNEL_SIZE,
                                   MIN_UNKNOWN_FOR_CENTRED_CROP)



class SyntheticStream:
  """Seeded synthetic foregrounds and backgrounds (as `synthetic_source`), composed into
  training batches with NumPy.

  Args: those of `data_pipeline.synthetic_source`.
  """

  def __init__(self, num_foregrounds: int = 8, num_backgrounds: int = 16,
               min_size: int = 320, max_size: int = 640, seed: int = 0,
               backgrounds_per_foreground: int = 4):
    self.backgrounds_per_foreground = check_positive("backgrounds_per_foreground",
                                                     backgrounds_per_foreground)
    self.name = f"synthetic(seed={seed}, NumPy)"
    self.foregrounds, self.alphas, self.backgrounds = synthetic.synthetic_dataset(
        num_foregrounds, num_backgrounds, min_size, max_size, seed)

  @property
  def epoch_length(self) -> int:
    return len(self.foregrounds) * self.backgrounds_per_foreground

  def example(self, index: int, *, crop_size: int, seed: int) -> dict[str, np.ndarray]:
    """Global example `index` of the stream (a dict of unbatched arrays)."""
    epoch, position = divmod(index, self.epoch_length)
    order = _epoch_order(seed, epoch, self.epoch_length)
    foreground = int(order[position]) % len(self.foregrounds)
    rng = np.random.default_rng([seed, 0, index])
    fg, alpha = self.foregrounds[foreground], self.alphas[foreground]
    bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
    if rng.random() < HFLIP_PROBABILITY:
      fg, alpha = fg[:, ::-1], alpha[:, ::-1]
    height, width = alpha.shape
    if min(height, width) < crop_size + 1:
      ratio = 1.1 * crop_size / min(height, width)
      height, width = int(height * ratio), int(width * ratio)
      fg = _resize(fg, height, width, Image.Resampling.NEAREST)
      alpha = _resize(alpha, height, width, Image.Resampling.NEAREST)
    bg = _resize(bg, height, width, Image.Resampling.BICUBIC)
    trimap = trimaps.trimap_from_alpha(alpha, *(int(s) for s in rng.integers(
        1, MAX_KERNEL_SIZE + 1, 2)))
    top, left = _crop_corner(rng, trimap == trimaps.TRIMAP_UNKNOWN, crop_size)
    window = (slice(top, top + crop_size), slice(left, left + crop_size))
    fg = fg[window].astype(np.float32) / 255
    bg = bg[window].astype(np.float32) / 255
    alpha = alpha[window][..., None].astype(np.float32) / 255
    return {"image": fg * alpha + bg * (1 - alpha), "fg": fg, "bg": bg, "alpha": alpha,
            "trimap": np.ascontiguousarray(trimap[window][..., None])}

  def batches(self, *, batch_size: int, crop_size: int = 512, seed: int = 0,
              shard_index: int = 0, num_shards: int = 1, skip_batches: int = 0,
              num_threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of this shard's batches, with the contract of
    `data_pipeline.train_batches`: `image`, `fg`, `bg` float32 (B, crop, crop, 3) in
    [0, 1], `alpha` float32 (B, crop, crop, 1), `trimap` uint8 (B, crop, crop, 1) in
    {0, 128, 255}."""
    check_stream_arguments(batch_size, crop_size, shard_index, num_shards, skip_batches)
    make = functools.partial(self.example, crop_size=crop_size, seed=seed)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      batch_index = skip_batches
      while True:
        first = (batch_index * num_shards + shard_index) * batch_size
        examples = list(pool.map(make, range(first, first + batch_size)))
        yield {key: np.stack([e[key] for e in examples]) for key in examples[0]}
        batch_index += 1


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, length: int) -> np.ndarray:
  return np.random.default_rng([seed, 1, epoch]).permutation(length)


def _resize(image: np.ndarray, height: int, width: int, method) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height),
                                                                         method))


def _crop_corner(rng: np.random.Generator, unknown: np.ndarray, crop: int
                 ) -> tuple[int, int]:
  """The top-left corner of a crop centred on a random unknown pixel of the interior
  (margin crop // 2), or a uniform one when the interior has fewer than 10 such pixels."""
  height, width = unknown.shape
  margin = crop // 2
  candidates = np.argwhere(unknown[margin:height - margin, margin:width - margin])
  if len(candidates) >= MIN_UNKNOWN_FOR_CENTRED_CROP:
    top, left = candidates[rng.integers(len(candidates))]
    return int(top), int(left)
  return int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
