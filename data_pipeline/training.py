"""The tf.data executor's stream: infinite, deterministic, shardable training batches.

Example k of the global stream, its foreground and every random decision derive from
(seed, k), and a process's examples from its shard (`data_pipeline.protocol`: `draw`,
`global_index`); `data_pipeline.composition` composites them in the graph.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import tensorflow as tf

from data_pipeline import composition, protocol
from data_pipeline.files import COLOUR_ALPHA, SourceError, check_stream_arguments
from data_pipeline.sources import Source


def decision_vectors(source: Source, seed: int, index: tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """The decisions of global example `index` (`protocol.draw_vectors`) as two tensors."""
  floats, ints = tf.numpy_function(
      protocol.draw_vectors,
      [seed, index, source.num_foregrounds, source.num_backgrounds, source.epoch_length],
      [tf.float64, tf.int64], stateful=False)
  return (tf.ensure_shape(floats, [len(protocol.FLOAT_FIELDS) + 8]),
          tf.ensure_shape(ints, [len(protocol.INT_FIELDS)]))


def example_dataset(source: Source, indices: tf.data.Dataset, *, crop_size: int, seed: int,
                    use_opencv: bool | None = None) -> tf.data.Dataset:
  """Maps a dataset of global example indices (int64) to examples (dicts of tensors)."""
  def make(index):
    floats, ints = decision_vectors(source, seed, index)
    example, _ = composition.compose(source.load_foreground, source.load_background,
                                     floats, ints, crop_size=crop_size,
                                     use_opencv=use_opencv)
    return example._asdict()

  return indices.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_dataset(source: Source, *, batch_size: int, crop_size: int = 512, seed: int = 0,
                  shard_index: int = 0, num_shards: int = 1, skip_batches: int = 0,
                  use_opencv: bool | None = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `train_batches` (batched dicts of tensors)."""
  check_stream_arguments(batch_size, crop_size, shard_index, num_shards, skip_batches)
  indices = tf.data.Dataset.range(skip_batches * batch_size, protocol.STREAM_END).map(
      lambda counter: protocol.global_index(counter, batch_size, shard_index, num_shards))
  examples = example_dataset(source, indices, crop_size=crop_size, seed=seed,
                             use_opencv=use_opencv)
  return examples.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_batches(source: Source, *, batch_size: int, crop_size: int = 512, seed: int = 0,
                  shard_index: int = 0, num_shards: int = 1, skip_batches: int = 0,
                  use_opencv: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of training batches (NHWC NumPy dicts), epoch after epoch.

  Each batch: `image` composite, `fg`, `bg` float32 (B, crop, crop, 3) RGB in [0, 1];
  `alpha` float32 (B, crop, crop, 1) in [0, 1]; `trimap` uint8 (B, crop, crop, 1) in
  {0, 128, 255}.

  Args:
    source: from `build_source`.
    batch_size: examples per batch on this host.
    crop_size: side of the square crops (a multiple of 16).
    seed: the same seed gives the same batches.
    shard_index, num_shards: this host's share of the global batch (multi-host training).
    skip_batches: start after this many batches (resuming a run).
    use_opencv: trimap erosion through OpenCV (None: when installed; both are exact).
  """
  dataset = train_dataset(source, batch_size=batch_size, crop_size=crop_size, seed=seed,
                          shard_index=shard_index, num_shards=num_shards,
                          skip_batches=skip_batches, use_opencv=use_opencv)
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      yield next(iterator)
    except tf.errors.OpError as error:
      raise _explain(source, error) from error


def _explain(source: Source, error: tf.errors.OpError) -> Exception:
  """Names the file behind a decoding failure (TF's own message does not)."""
  colour = re.search(rf"assertion failed: \[(.*: {re.escape(COLOUR_ALPHA)})\]", error.message)
  if colour:  # `sources.FileSource._decode_alpha`'s check, in one line
    return SourceError(colour.group(1))
  unreadable = source.find_unreadable()
  if unreadable:
    listing = "\n  ".join(unreadable[:10])
    return ValueError(f"{source.name}: {len(unreadable)} file(s) cannot be decoded:\n  "
                      f"{listing}")
  return RuntimeError(f"{source.name}: the input pipeline failed: {error.message}")


def split_for_devices(batch: dict[str, np.ndarray], num_devices: int
                      ) -> dict[str, np.ndarray]:
  """Reshapes a host batch (B, ...) to (num_devices, B // num_devices, ...) for pmap."""
  out = {}
  for key, value in batch.items():
    if value.shape[0] % num_devices:
      raise ValueError(f"batch '{key}' has {value.shape[0]} examples, not divisible by "
                       f"{num_devices} devices")
    out[key] = value.reshape((num_devices, value.shape[0] // num_devices) + value.shape[1:])
  return out
