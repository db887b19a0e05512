"""The JAX executor: training batches composited on the accelerator, without TensorFlow.

The host reads, decodes and plans (grain: threads, deterministic order, a prefetch buffer);
the device composites (`data_pipeline.jax_composition`). The stream is the tf.data
executor's (`data_pipeline.protocol`: example k's decisions from (seed, k), a process's
examples by `global_index`), so its whole state is the number of batches it has given:
resuming at batch b (`skip_batches`, the training step) repeats and skips nothing.

  source = host_source("folder", root="/data/matting")   # data_pipeline.catalog's sources
  stream = JaxStream(source, batch_size=16, crop_size=512, seed=0)
  for batch in stream.batches():   # dicts of jax.Array on the default device(s)
    ...
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from data_pipeline import catalog, jax_composition, protocol
from data_pipeline.files import (SourceError, check_positive, check_stream_arguments,
                                 read_image, upright_size)


class HostSource:
  """Foreground/alpha pairs and backgrounds by index, as NumPy arrays on the host.

  Images are held in memory (`arrays`) or read from files (`paths`), the last
  `cache_images` decoded files kept: the protocol reuses each foreground
  backgrounds_per_foreground times per epoch, and decoding dominates the host's work.

  Attributes:
    name, num_foregrounds, num_backgrounds, backgrounds_per_foreground, epoch_length: as
      `data_pipeline.sources.Source`.
  """

  def __init__(self, name: str, foregrounds: Sequence, alphas: Sequence,
               backgrounds: Sequence, backgrounds_per_foreground: int = 1,
               cache_images: int = 256):
    self.name = name
    self.num_foregrounds = len(foregrounds)
    self.num_backgrounds = len(backgrounds)
    self.backgrounds_per_foreground = check_positive("backgrounds_per_foreground",
                                                     backgrounds_per_foreground)
    self.epoch_length = self.num_foregrounds * self.backgrounds_per_foreground
    # Arrays row-major once here: every batch copies them, and a transposed view (as
    # NumPy arithmetic can return) copies over 20x slower.
    self._foregrounds, self._alphas, self._backgrounds = (
        [np.ascontiguousarray(item) if isinstance(item, np.ndarray) else item
         for item in items] for items in (foregrounds, alphas, backgrounds))
    self._read = functools.lru_cache(maxsize=cache_images)(self._decode)

  @staticmethod
  def _decode(path: str, kind: str) -> np.ndarray:
    # Alphas ("grey") in colour are refused: mixed, they would train on a matte nobody drew.
    return read_image(path, kind, grey_only=kind == "grey")[0]

  def _image(self, item, kind: str) -> np.ndarray:
    return item if isinstance(item, np.ndarray) else self._read(item, kind)

  def foreground(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(fg (h, w, 3) uint8 RGB, alpha (h, w) uint8)."""
    fg = self._image(self._foregrounds[index], "rgb")
    alpha = self._image(self._alphas[index], "grey")
    if fg.shape[:2] != alpha.shape:
      raise SourceError(f"{self.name}: foreground {self._foregrounds[index]} is "
                        f"{fg.shape[1]}x{fg.shape[0]} but its alpha is "
                        f"{alpha.shape[1]}x{alpha.shape[0]}")
    return fg, alpha

  def background(self, index: int) -> np.ndarray:
    """(h, w, 3) uint8 RGB."""
    return self._image(self._backgrounds[index], "rgb")

  def foreground_size(self, index: int) -> tuple[int, int]:
    """(h, w) of a foreground, from its file's header where it has one."""
    return self._size(self._foregrounds[index])

  def background_size(self, index: int) -> tuple[int, int]:
    return self._size(self._backgrounds[index])

  _header_size = staticmethod(functools.lru_cache(maxsize=None)(upright_size))

  def _size(self, item) -> tuple[int, int]:
    return item.shape[:2] if isinstance(item, np.ndarray) else self._header_size(item)

  def __repr__(self) -> str:
    return (f"HostSource({self.name!r}: {self.num_foregrounds} foregrounds, "
            f"{self.num_backgrounds} backgrounds, epoch of {self.epoch_length})")


class _TfdsHostSource(HostSource):
  """Foregrounds from a prepared TFDS set's records (decoded on the host as files are)."""

  def __init__(self, declared: catalog.Catalog, cache_images: int = 256):
    self._records = declared.records
    super().__init__(*declared[:5], cache_images=cache_images)
    self._decode_record = functools.lru_cache(maxsize=cache_images)(self._decode_pair)

  def _decode_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    record = self._records[index]
    name = f"{self.name} record {index}"
    return (read_image(record["foreground"], "rgb", name=f"{name} foreground")[0],
            read_image(record["alpha"], "grey", name=f"{name} alpha", grey_only=True)[0])

  def foreground(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    return self._decode_record(int(index))

  def foreground_size(self, index: int) -> tuple[int, int]:
    return self.foreground(index)[1].shape  # records have no separate header


def host_source(name: str, **options) -> HostSource:
  """The host readers of source `name` (`data_pipeline.catalog.SOURCES`) with that
  declaration's options, checked there."""
  declared = catalog.declaration(name)(**options)
  if declared.records is not None:
    return _TfdsHostSource(declared)
  return HostSource(*declared[:5])


class JaxStream:
  """Infinite, deterministic, shardable training batches composited on the device.

  Args:
    source: a `HostSource`.
    batch_size: examples per batch on this process.
    crop_size: side of the square crops (a multiple of 16).
    seed: the same seed gives the same batches (and the tf.data pipeline's examples).
    shard_index, num_shards: this process's share of the global batch.
    skip_batches: start after this many batches (resuming a run).
    num_threads: host threads reading and planning examples (default: the CPU count).
  """

  def __init__(self, source: HostSource, *, batch_size: int, crop_size: int = 512,
               seed: int = 0, shard_index: int = 0, num_shards: int = 1,
               skip_batches: int = 0, num_threads: int | None = None):
    check_stream_arguments(batch_size, crop_size, shard_index, num_shards, skip_batches)
    self.source = source
    self.batch_size, self.crop_size, self.seed = batch_size, crop_size, seed
    self.shard_index, self.num_shards = shard_index, num_shards
    self.skip_batches = skip_batches
    self.num_threads = num_threads or os.cpu_count() or 1

  def global_index(self, host_counter: int) -> int:
    """The global example index of this process's host_counter-th example."""
    return protocol.global_index(host_counter, self.batch_size, self.shard_index,
                                 self.num_shards)

  def decisions(self, index: int) -> protocol.Decisions:
    return protocol.draw(self.seed, index, num_foregrounds=self.source.num_foregrounds,
                         num_backgrounds=self.source.num_backgrounds,
                         epoch_length=self.source.epoch_length)

  def plan(self, host_counter: int) -> dict[str, Any]:
    """The host's part of one example (`jax_composition.plan`)."""
    decisions = self.decisions(self.global_index(host_counter))
    fg, alpha = self.source.foreground(int(decisions.foreground_index))
    # The second foreground is read only when the merge is drawn, as the authors do.
    fg2, alpha2 = (self.source.foreground(int(decisions.second_index)) if decisions.merge
                   else (None, None))
    return jax_composition.plan(fg, alpha, fg2, alpha2,
                                self.source.background(int(decisions.background_index)),
                                decisions, self.crop_size)

  def canvases(self, batch_index: int) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """The padded shapes of this process's batch `batch_index` (counted from the stream's
    start), from image headers (`jax_composition.canvases`): which compiled executor it
    uses."""
    shapes = []
    for counter in range(batch_index * self.batch_size, (batch_index + 1) * self.batch_size):
      d = self.decisions(self.global_index(counter))
      second = (self.source.foreground_size(int(d.second_index)) if d.merge else None)
      shapes.append(jax_composition.canvases(
          self.source.foreground_size(int(d.foreground_index)), second,
          self.source.background_size(int(d.background_index)), d, self.crop_size))
    canvas, pixels, bg_canvas = zip(*shapes)

    def largest(sizes):
      return tuple(int(side) for side in np.max(sizes, axis=0))

    return largest(canvas), max(pixels), largest(bg_canvas)

  def host_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Collated host batches (`jax_composition.collate`), read by grain's threads."""
    import grain

    # The prefetch buffer holds whole batches (~400 MB each at 1-2 MP): two keep the
    # device fed without running ahead of it.
    dataset = (grain.MapDataset.range(self.skip_batches * self.batch_size, protocol.STREAM_END)
               .map(self.plan)
               .batch(self.batch_size, drop_remainder=True, batch_fn=jax_composition.collate)
               .to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=2)))
    return iter(dataset)

  def batches(self, sharding: jax.sharding.Sharding | None = None
              ) -> Iterator[dict[str, jax.Array]]:
    """Composited batches: `image`, `fg`, `bg` float32 (B, crop, crop, 3), `alpha` float32
    (B, crop, crop, 1), `trimap` uint8 (B, crop, crop, 1), on the devices of `sharding`
    (split along the batch; default: the default device). The host works on the next
    batch while the device composites this one."""
    for host_batch in self.host_batches():
      # Put explicitly, also without a sharding: handing NumPy arrays to the jitted
      # executor copies them more slowly (on CPU it doubled the time of a batch).
      host_batch = jax.device_put(host_batch, sharding)
      composited = jax_composition.compose_batch(
          host_batch, self.crop_size,
          sharding if isinstance(sharding, jax.sharding.NamedSharding) else None)
      composited.pop("decisions")
      yield composited
