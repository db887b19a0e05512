"""What every data module shares and none of them needs TensorFlow for: the image file
extensions, the data error, and folder checks."""

from __future__ import annotations

import os
import pathlib

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
  """A dataset that the pipeline cannot use as it is (the message says what and where)."""


def require_dir(path: str | os.PathLike, what: str) -> pathlib.Path:
  """`path` as a Path; FileNotFoundError naming `what` unless it is a folder."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{what}: folder {path} does not exist")
  return path


def check_stream_arguments(batch_size: int, crop_size: int, shard_index: int,
                           num_shards: int, skip_batches: int) -> None:
  """The arguments every training-batch stream takes, checked the same way."""
  for name, value in (("batch_size", batch_size), ("crop_size", crop_size),
                      ("num_shards", num_shards)):
    check_positive(name, value)
  if crop_size % 16:
    raise ValueError(f"crop_size must be a multiple of 16 (the network's stride), got "
                     f"{crop_size}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
  if skip_batches < 0:
    raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")


def check_positive(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
