"""What every data module shares and none of them needs TensorFlow for: the image file
extensions, the data error, folder checks and the image reader (decoding as the authors'
`cv2.imread` does)."""

from __future__ import annotations

import io
import os
import pathlib
from typing import BinaryIO

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The matting network's output stride: its input height and width, training crops and the
# padded evaluation images are multiples of it. (Defined here, the lowest layer, so that
# data_pipeline and a2u_jax share it without data_pipeline importing a2u_jax.)
NETWORK_STRIDE = 16


class SourceError(ValueError):
  """A dataset that the pipeline cannot use as it is (the message says what and where)."""


# What a training alpha whose channels differ is told (after its path), by both executors:
# mixed to grey, it would train on a matte nobody drew.
COLOUR_ALPHA = ("is a colour image (its R, G and B differ), not an alpha matte; save the "
                "matte as a single-channel (greyscale) image")


# PIL's modes of 16-bit greyscale files (PNG, TIFF).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_GREY_MODES = ("L", "LA", "La", "1")
_JPEG_FORMATS = ("JPEG", "MPO")
# cv2.imread(path, cv2.IMREAD_GRAYSCALE), the authors' alpha reader, turns a colour file
# into grey inside the file's decoder, so the rule depends on the format. JPEG: libjpeg
# outputs the luma plane itself (see `_decode`). The others mix R, G, B in fixed point,
# (r * R + g * G + b * B + rounding) >> shift, with these (r, g, b, shift, rounding):
# libpng's rgb_to_gray with OpenCV's weights 0.299/0.587, truncated, for PNG; OpenCV's own
# BGR-to-grey for BMP and TIFF; cvtColor's for WebP. (Each matched OpenCV 5.0 on every
# 8-bit colour; tests/test_faithfulness.py checks a sample.)
_GREY_MIX = {
    "PNG": (9797, 19234, 3737, 15, 0),
    "BMP": (4899, 9617, 1868, 14, 1 << 13),
    "TIFF": (4899, 9617, 1868, 14, 1 << 13),
    "WEBP": (9798, 19235, 3735, 15, 1 << 14),
}
_EXIF_ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> (transpose, flip rows, flip columns), applied in that order: how
# cv2.imread turns a JPEG, PNG or WebP upright (the same as PIL's ImageOps.exif_transpose).
EXIF_TRANSFORMS = {
    1: (False, False, False), 2: (False, False, True), 3: (False, True, True),
    4: (False, True, False), 5: (True, False, False), 6: (True, False, True),
    7: (True, True, True), 8: (True, True, False),
}


def read_image(path: str | os.PathLike | bytes, kind: str, *, name: str | None = None,
               grey_only: bool = False) -> tuple[np.ndarray, bool]:
  """Reads an image file (a path, or its bytes with `name` to show in errors) as
  `cv2.imread` does: (array, whether an alpha channel was dropped).

  kind: "rgb" -> uint8 (H, W, 3), the values of cv2.imread(path) in RGB order; "grey"
  (trimaps, alpha mattes) -> uint8 (H, W), those of cv2.imread(path, cv2.IMREAD_GRAYSCALE),
  which is how the authors read every image (docs/design.md §4). In particular:
  - JPEGs are decoded by libjpeg with its accurate integer IDCT and smooth chroma
    upsampling (PIL's defaults, OpenCV's too); read as grey, a colour JPEG is its luma
    plane as libjpeg outputs it, not a mix of the decoded RGB;
  - colour files of other formats read as grey mix R, G, B with their decoder's weights
    (`_GREY_MIX`); CMYK JPEGs and formats outside it use PIL's conversion;
  - the EXIF orientation of a JPEG, PNG or WebP turns the image upright
    (`exif_orientation`, `orient`); TIFF orientation tags are ignored, as OpenCV does;
  - 16-bit greyscale files keep the high byte of each sample (v >> 8: 0 / 32896 / 65535
    are 0 / 128 / 255), as libpng's 8-bit reading in OpenCV and TensorFlow does;
  - an alpha channel is dropped (the caller says so: the colour values are used as stored).
  "alpha" (ground-truth mattes) reads as "grey", except that the matte of a file with an
  alpha channel (RGBA, LA, a palette with transparency) is that channel.
  32-bit integer and floating-point files are refused: their range is not defined.
  grey_only (training alphas, kind "grey"): a colour file whose channels differ is refused
  (`COLOUR_ALPHA`) instead of mixed; one whose channels are equal reads as that channel,
  which is what every mix above gives for it. Errors name the file.
  """
  if kind not in ("rgb", "grey", "alpha"):
    raise ValueError(f"kind must be 'rgb', 'grey' or 'alpha', got {kind!r}")
  encoded = isinstance(path, bytes)
  source, path = (io.BytesIO(path), name or "<encoded image>") if encoded else (path, path)
  try:
    with Image.open(source) as image:
      mode = image.mode
      if mode in ("I", "F"):
        raise SourceError(f"{path}: {'32-bit integer' if mode == 'I' else 'floating-point'} "
                          f"images are not supported (their value range is not defined); "
                          f"save it as an 8- or 16-bit image")
      dropped = mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info)
      if kind == "alpha" and dropped:
        values, dropped = np.asarray(image.convert("RGBA").getchannel("A")), False
      elif grey_only and kind == "grey" and mode not in _GREY_MODES + _SIXTEEN_BIT_MODES:
        rgb = np.asarray(image.convert("RGB"))
        if (rgb != rgb[..., :1]).any():
          raise SourceError(f"{path}: {COLOUR_ALPHA}")
        values = rgb[..., 0]
      else:
        values = _decode(image, "grey" if kind == "alpha" else kind)
    return orient(values, exif_orientation(source.getvalue() if encoded else path)), dropped
  except SourceError:
    raise
  except FileNotFoundError:
    raise SourceError(f"{path}: file not found") from None
  except Exception as error:  # Name the file whatever the decoder complains about.
    raise SourceError(f"{path}: cannot be read as an image ({error})") from None


def _decode(image: Image.Image, kind: str) -> np.ndarray:
  """The pixels of an opened (not yet loaded) image as cv2.imread gives them, before
  orientation: uint8 (H, W, 3) RGB or (H, W) grey."""
  if image.mode in _SIXTEEN_BIT_MODES:
    grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1) if kind == "rgb" else grey
  if kind == "rgb":
    return np.asarray(image.convert("RGB"))
  if image.format in _JPEG_FORMATS and image.mode == "RGB":
    image.draft("L", image.size)  # libjpeg's grey output (JCS_GRAYSCALE), as OpenCV asks
  if image.mode in _GREY_MODES:
    return np.asarray(image.convert("L"))
  if image.format not in _GREY_MIX:
    return np.asarray(image.convert("L"))
  r, g, b, shift, rounding = _GREY_MIX[image.format]
  rgb = np.asarray(image.convert("RGB")).astype(np.uint32)
  mixed = (r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2] + rounding) >> shift
  return mixed.astype(np.uint8)


def exif_orientation(source: str | os.PathLike | bytes) -> int:
  """The EXIF orientation (1-8) of an image file (a path or its bytes) as cv2.imread reads
  it: from a JPEG's or WebP's EXIF block, or a PNG's eXIf chunk wherever it lies (PIL sees
  one after the pixel data only once it decodes them); 1 without one. TIFF files give 1
  (OpenCV ignores their orientation tag). Reads headers only."""
  stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
  with stream, Image.open(stream) as image:
    if image.format == "PNG":
      raw = _png_chunk(stream, b"eXIf")
    else:
      raw = image.info.get("exif") if image.format in _JPEG_FORMATS + ("WEBP",) else None
  if not raw:
    return 1
  try:
    exif = Image.Exif()
    exif.load(raw)
    value = exif.get(_EXIF_ORIENTATION, 1)
  except Exception:  # An unreadable EXIF block leaves the image as stored, as in OpenCV.
    return 1
  return value if value in EXIF_TRANSFORMS else 1


def _png_chunk(stream: BinaryIO, kind: bytes) -> bytes | None:
  """The data of a PNG's first chunk of type `kind`, walking the chunk headers (seeks,
  no decompression); None if there is none."""
  stream.seek(8)  # past the signature
  while True:
    header = stream.read(8)
    if len(header) < 8 or header[4:] == b"IEND":
      return None
    length = int.from_bytes(header[:4], "big")
    if header[4:] == kind:
      return stream.read(length)
    stream.seek(length + 4, io.SEEK_CUR)  # the data and its CRC


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
  """`array` (H, W, ...) turned upright for an EXIF orientation (1-8, `EXIF_TRANSFORMS`)."""
  transpose, flip_rows, flip_columns = EXIF_TRANSFORMS[orientation]
  if transpose:
    array = np.swapaxes(array, 0, 1)
  if flip_rows:
    array = array[::-1]
  if flip_columns:
    array = array[:, ::-1]
  return np.ascontiguousarray(array)


def upright_size(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of an image as `read_image` returns it, from the file's headers."""
  with Image.open(path) as image:
    width, height = image.size
  return (width, height) if EXIF_TRANSFORMS[exif_orientation(path)][0] else (height, width)


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
