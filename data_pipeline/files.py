"""What every data module shares and none of them needs TensorFlow for: the image file
extensions, the data error, folder checks and the image reader."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The matting network's output stride: its input height and width, training crops and the
# padded evaluation images are multiples of it. (Defined here, the lowest layer, so that
# data_pipeline and a2u_jax share it without data_pipeline importing a2u_jax.)
NETWORK_STRIDE = 16


class SourceError(ValueError):
  """A dataset that the pipeline cannot use as it is (the message says what and where)."""


# PIL's modes of 16-bit greyscale files (PNG, TIFF).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def read_image(path: str | os.PathLike, kind: str) -> tuple[np.ndarray, bool]:
  """Reads an image file as 8-bit values: (array, whether an alpha channel was dropped).

  kind: "rgb" -> uint8 (H, W, 3); "grey" (trimaps, alpha mattes) -> uint8 (H, W).
  16-bit greyscale files are read at their depth and scaled to 8 bits (v * 255 / 65535,
  rounded), so a 16-bit trimap's 0 / 32896 / 65535 are 0 / 128 / 255 and a 16-bit photo
  keeps its tones (PIL's own conversion clips 16-bit values at 255). An alpha channel is
  dropped (the caller says so: the RGB values are used as stored). 32-bit integer and
  floating-point files are refused: their range is not defined. Errors name the file.
  """
  try:
    with Image.open(path) as image:
      mode = image.mode
      if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.uint32)
        values = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return (np.repeat(values[..., None], 3, axis=-1) if kind == "rgb" else values), False
      if mode in ("I", "F"):
        raise SourceError(f"{path}: {'32-bit integer' if mode == 'I' else 'floating-point'} "
                          f"images are not supported (their value range is not defined); "
                          f"save it as an 8- or 16-bit image")
      dropped = mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info)
      return np.asarray(image.convert("RGB" if kind == "rgb" else "L")), dropped
  except SourceError:
    raise
  except FileNotFoundError:
    raise SourceError(f"{path}: file not found") from None
  except Exception as error:  # Name the file whatever the decoder complains about.
    raise SourceError(f"{path}: cannot be read as an image ({error})") from None


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
  if crop_size % NETWORK_STRIDE:
    raise ValueError(f"crop_size must be a multiple of {NETWORK_STRIDE} (the network's "
                     f"stride), got {crop_size}")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
  if skip_batches < 0:
    raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")


def check_positive(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)
