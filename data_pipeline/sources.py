"""The tf.data executor's readers: a source's images (a `data_pipeline.catalog.Catalog`,
checked when it was declared) readable by index inside a tf.data graph.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from data_pipeline import catalog
from data_pipeline.files import (COLOUR_ALPHA, EXIF_TRANSFORMS, SourceError, check_positive,
                                 exif_orientation)


class Source:
  """Foreground/alpha pairs and backgrounds, addressable by index in a TF graph.

  Attributes:
    name: what the source is (shown in logs).
    num_foregrounds, num_backgrounds: list lengths.
    backgrounds_per_foreground: composites per foreground in one epoch (the Deep Image
      Matting protocol uses 100 for Composition-1k training).
  """

  name: str
  num_foregrounds: int
  num_backgrounds: int
  backgrounds_per_foreground: int

  def _describe(self, name: str, num_foregrounds: int, num_backgrounds: int,
                backgrounds_per_foreground: int) -> None:
    self.name = name
    self.num_foregrounds = num_foregrounds
    self.num_backgrounds = num_backgrounds
    self.backgrounds_per_foreground = check_positive("backgrounds_per_foreground",
                                                     backgrounds_per_foreground)

  @property
  def epoch_length(self) -> int:
    """Examples per epoch: each foreground, backgrounds_per_foreground times."""
    return self.num_foregrounds * self.backgrounds_per_foreground

  def load_foreground(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(fg (h, w, 3) uint8 RGB, alpha (h, w, 1) uint8) for a scalar int tensor index."""
    raise NotImplementedError

  def load_background(self, index: tf.Tensor) -> tf.Tensor:
    """(h, w, 3) uint8 RGB for a scalar int tensor index."""
    raise NotImplementedError

  def find_unreadable(self) -> list[str]:
    """Fully decodes every file; returns 'path: reason' for each one that fails."""
    return []

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.name!r}: {self.num_foregrounds} foregrounds, "
            f"{self.num_backgrounds} backgrounds, epoch of {self.epoch_length})")


class ArraySource(Source):
  """Images held in memory (the synthetic source; also handy for tests), checked here."""

  def __init__(self, name: str, foregrounds: Sequence[np.ndarray],
               alphas: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray],
               backgrounds_per_foreground: int = 1):
    if not foregrounds or not backgrounds:
      raise SourceError(f"{name}: needs at least one foreground and one background, got "
                        f"{len(foregrounds)} and {len(backgrounds)}")
    if len(foregrounds) != len(alphas):
      raise SourceError(f"{name}: {len(foregrounds)} foregrounds but {len(alphas)} alphas")
    for i, (fg, alpha) in enumerate(zip(foregrounds, alphas)):
      if fg.dtype != np.uint8 or fg.ndim != 3 or fg.shape[2] != 3:
        raise SourceError(f"{name}: foreground {i} must be (H, W, 3) uint8, got "
                          f"{fg.shape} {fg.dtype}")
      if alpha.dtype != np.uint8 or alpha.shape != fg.shape[:2]:
        raise SourceError(f"{name}: alpha {i} must be {fg.shape[:2]} uint8 like its "
                          f"foreground, got {alpha.shape} {alpha.dtype}")
    for i, bg in enumerate(backgrounds):
      if bg.dtype != np.uint8 or bg.ndim != 3 or bg.shape[2] != 3:
        raise SourceError(f"{name}: background {i} must be (H, W, 3) uint8, got "
                          f"{bg.shape} {bg.dtype}")
    self._describe(name, len(foregrounds), len(backgrounds), backgrounds_per_foreground)
    self._foregrounds = _PackedImages(list(foregrounds))
    self._alphas = _PackedImages([alpha[..., None] for alpha in alphas])
    self._backgrounds = _PackedImages(list(backgrounds))

  def load_foreground(self, index):
    return self._foregrounds.get(index), self._alphas.get(index)

  def load_background(self, index):
    return self._backgrounds.get(index)


class _PackedImages:
  """Differently sized uint8 images as graph constants, picked by index.

  One constant per image behind a `switch_case`: the selected tensor is shared, not copied
  (slicing one packed buffer costs a copy per read).
  """

  def __init__(self, images: list[np.ndarray]):
    self._images = [tf.constant(image) for image in images]

  def get(self, index):
    branches = [lambda image=image: image for image in self._images]
    return tf.switch_case(tf.cast(index, tf.int32), branches)


class FileSource(Source):
  """Foregrounds, alphas and backgrounds read from image files (PNG, JPEG, BMP, ...),
  as the catalog checked them."""

  def __init__(self, name: str, foregrounds: Sequence[str], alphas: Sequence[str],
               backgrounds: Sequence[str], backgrounds_per_foreground: int = 1):
    self._describe(name, len(foregrounds), len(backgrounds), backgrounds_per_foreground)
    self.foreground_paths = [str(p) for p in foregrounds]
    self.alpha_paths = [str(p) for p in alphas]
    self.background_paths = [str(p) for p in backgrounds]
    self._fg = tf.constant(self.foreground_paths)
    self._alpha = tf.constant(self.alpha_paths)
    self._bg = tf.constant(self.background_paths)

  @staticmethod
  def _decode_bytes(contents, channels):
    """Encoded bytes -> uint8 (H, W, channels; 0: the file's own), the pixels cv2.imread
    (the authors' reader)
    gives: JPEGs through libjpeg's accurate integer IDCT (decode_image's default, the fast
    one, moves most pixels of a photo by a few levels, and alphas in and out of 0 and 255),
    then turned upright by the EXIF orientation (`data_pipeline.files.read_image`)."""
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=channels, expand_animations=False))
    # A header read in Python (EXIF parsing has no TF op); the pixels stay in the graph.
    orientation = tf.numpy_function(FileSource._orientation, [contents], tf.int32,
                                    stateful=False)
    return tf.ensure_shape(FileSource._orient(image, orientation),
                           [None, None, channels or None])

  @staticmethod
  def _decode_alpha(contents, label):
    """An alpha's encoded bytes -> uint8 (H, W, 1). A colour file (its channels differ)
    fails an assertion whose message is `label` (the file) and `COLOUR_ALPHA`, which
    `data_pipeline.training` raises as one line; a grey one saved as RGB reads as its
    channel (what decoding it as grey gives)."""
    image = FileSource._decode_bytes(contents, 0)
    colour = tf.logical_and(tf.shape(image)[-1] >= 3,
                            tf.reduce_any(image[..., 1:3] != image[..., :1]))
    message = tf.strings.join([label, f": {COLOUR_ALPHA}"])
    with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(colour), [message])]):
      return tf.ensure_shape(tf.identity(image[..., :1]), [None, None, 1])

  @staticmethod
  def _orientation(contents) -> np.int32:
    # numpy_function passes a string as bytes inside a tf.data graph, as a 0-d array eagerly.
    return np.int32(exif_orientation(contents if isinstance(contents, bytes)
                                     else contents.item()))

  @staticmethod
  def _orient(image, orientation):
    """(H, W, C) image turned upright for an EXIF orientation (int32 scalar, 1-8), as
    `data_pipeline.files.orient` does."""
    def transform(transpose, flip_rows, flip_columns):
      def apply():
        out = tf.transpose(image, [1, 0, 2]) if transpose else image
        axes = [axis for axis, flip in ((0, flip_rows), (1, flip_columns)) if flip]
        return tf.reverse(out, axes) if axes else out
      return apply

    return tf.switch_case(orientation - 1, [transform(*EXIF_TRANSFORMS[value])
                                            for value in sorted(EXIF_TRANSFORMS)])

  @staticmethod
  def _decode(path, channels):
    return FileSource._decode_bytes(tf.io.read_file(path), channels)

  def load_foreground(self, index):
    alpha = tf.gather(self._alpha, index)
    return (self._decode(tf.gather(self._fg, index), 3),
            self._decode_alpha(tf.io.read_file(alpha), alpha))

  def load_background(self, index):
    return self._decode(tf.gather(self._bg, index), 3)

  def find_unreadable(self) -> list[str]:
    return catalog.find_unreadable(
        self.foreground_paths + self.alpha_paths + self.background_paths)


class TfdsSource(Source):
  """Training foregrounds from a prepared TFDS set's records (the catalog's `tfds`),
  backgrounds from files."""

  def __init__(self, declared: catalog.Catalog):
    self._records = declared.records
    self.background_paths = list(declared.backgrounds)
    self._describe(declared.name, len(self._records), len(self.background_paths),
                   declared.backgrounds_per_foreground)
    self._bg = tf.constant(self.background_paths)

  def _encoded(self, index):
    record = self._records[int(index)]
    return record["foreground"], record["alpha"]

  def load_foreground(self, index):
    # Only the record lookup is Python; decoding stays in the graph.
    foreground, alpha = tf.numpy_function(self._encoded, [index], [tf.string, tf.string],
                                          stateful=False)
    label = tf.strings.join([f"{self.name} record ", tf.strings.as_string(index), " alpha"])
    return (FileSource._decode_bytes(foreground, 3), FileSource._decode_alpha(alpha, label))

  def load_background(self, index):
    return FileSource._decode(tf.gather(self._bg, index), 3)

  def find_unreadable(self) -> list[str]:
    return catalog.find_unreadable(self.background_paths)


def from_catalog(declared: catalog.Catalog) -> Source:
  """The graph readers of a declared source."""
  if declared.records is not None:
    return TfdsSource(declared)
  kind = ArraySource if isinstance(declared.foregrounds[0], np.ndarray) else FileSource
  return kind(*declared[:5])
