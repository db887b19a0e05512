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


def check_positive(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
