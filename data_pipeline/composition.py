"""The Deep Image Matting training protocol as TF graph ops, one example at a time.

Follows the authors' `DataGenerator` (docs/design.md §4) step by step:

1. with p=0.5 merge a second foreground (nearest-resized to the first):
   alpha = 1 - (1 - a1)(1 - a2), fg = (f1 a1 + f2 (1 - a1) a2) / (alpha + 1e-5), truncated to
   uint8; skipped when the merged alpha is 1 everywhere;
2. with p=0.25 nearest-resize foreground and alpha to 640 x 640;
3. random affine, nearest-neighbour, zero fill: independent x/y scales in [0.8, 1.25],
   shear in [-10, 10] degrees, a flip of each axis with p=0.5, rotation in [-30, 30] degrees
   only when the longer side is >= 1024 (the authors' inverse-matrix construction, centred at
   (W/2 + 0.5, H/2 + 0.5));
4. horizontal flip with p=0.5;
5. trimap: the definite-foreground (alpha >= 1 - 1e-5) and definite-background
   (alpha <= 1e-5) masks eroded with elliptic kernels of random sizes in 1..29;
6. crop: the background is bicubically enlarged to cover the foreground; images smaller than
   crop + 1 are enlarged (nearest; background bicubic) so the shorter side is 1.1 x crop;
   the crop's top-left corner is a random unknown pixel of the trimap's interior (margin
   crop // 2), i.e. the crop is centred on it; with fewer than 10 interior unknown pixels it
   is uniform; with no unknown pixel at all the whole image is resized to the crop size;
7. HSV jitter of the foreground crop (hue +-40 degrees, saturation and value shifted towards
   the middle of their range and reflected at 1), skipped when the crop's alpha is all 0;
8. composite = fg * alpha + bg * (1 - alpha).

All nearest-neighbour steps (merge resize, 640 resize, affine, flips, enlargement) are integer
index maps, so they are composed and applied once: the alpha at full resolution (it is
needed for the trimap), the foregrounds only at the crop's pixels. The background is
resampled once, at the crop only (the authors resize twice with OpenCV's bicubic, a = -0.75;
here one Keys bicubic pass, a = -0.5, with the same pixel-centre mapping). These are the only
deviations; every random choice has the authors' distribution.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from data_pipeline import morphology, protocol

from data_pipeline.protocol import MIN_UNKNOWN_FOR_CENTRED_CROP, RESIZE_TO, WARP_BITS

_CUBIC_MARGIN = 3


class Example(NamedTuple):
  image: tf.Tensor  # (crop, crop, 3) float32 in [0, 1]
  fg: tf.Tensor  # (crop, crop, 3) float32 in [0, 1]
  bg: tf.Tensor  # (crop, crop, 3) float32 in [0, 1]
  alpha: tf.Tensor  # (crop, crop, 1) float32 in [0, 1]
  trimap: tf.Tensor  # (crop, crop, 1) uint8 in {0, 128, 255}


def _nearest_index(out_size, in_size):
  """OpenCV INTER_NEAREST source index of each output index.

  OpenCV computes floor(i * (1 / (out / in))) in double precision, which is not always
  floor(i * in / out); this reproduces its arithmetic.
  """
  in_size = tf.cast(in_size, tf.int32)
  inverse_scale = 1.0 / (tf.cast(out_size, tf.float64) / tf.cast(in_size, tf.float64))
  index = tf.floor(tf.cast(tf.range(out_size), tf.float64) * inverse_scale)
  return tf.minimum(tf.cast(index, tf.int32), in_size - 1)


def unpack_decisions(floats: tf.Tensor, ints: tf.Tensor) -> dict[str, tf.Tensor]:
  """`protocol.as_vectors`' two vectors as named tensors (plus "linear": (2, 4) float64,
  the affine's linear part without and with rotation)."""
  count = len(protocol.FLOAT_FIELDS)
  decisions = dict(zip(protocol.FLOAT_FIELDS, tf.unstack(floats[:count])))
  decisions["linear"] = tf.reshape(floats[count:count + 8], [2, 4])
  decisions.update(zip(protocol.INT_FIELDS, tf.unstack(ints)))
  return decisions


class _Geometry(NamedTuple):
  """Integer index maps from the trimap's pixel grid back to the first foreground."""
  height: tf.Tensor  # trimap grid size (after the optional 640 resize)
  width: tf.Tensor
  source_height: tf.Tensor
  source_width: tf.Tensor
  matrix: tuple  # inverse affine, trimap grid (after un-flipping) -> resized grid
  hflip: tf.Tensor  # bool
  resized: tf.Tensor  # bool: the 640 x 640 resize happened

  def source_pixel(self, rows, cols):
    """Flat source index (row * source_width + col) for trimap-grid coordinates.

    `rows` (n, 1) and `cols` (1, m) int32; positions the warp maps outside the image get
    the sentinel source_height * source_width (a zero pixel appended by the caller).
    """
    cols = tf.where(self.hflip, self.width - 1 - cols, cols)
    x = tf.cast(cols, tf.float64)
    y = tf.cast(rows, tf.float64)
    m0, m1, m2, m3, m4, m5 = self.matrix
    # OpenCV's nearest warp: fixed point with 10 fractional bits, the per-row and the
    # per-column terms rounded separately, plus one half, floored.
    scale = float(1 << WARP_BITS)

    def fixed_point(value, offset=0.0):
      return tf.cast(tf.math.rint(value * scale) + offset, tf.int32)

    src_x = tf.bitwise.right_shift(fixed_point(m1 * y + m2, scale / 2) + fixed_point(m0 * x),
                                   WARP_BITS)
    src_y = tf.bitwise.right_shift(fixed_point(m4 * y + m5, scale / 2) + fixed_point(m3 * x),
                                   WARP_BITS)
    # One unsigned comparison per axis also rejects negative coordinates.
    valid = ((tf.cast(src_x, tf.uint32) < tf.cast(self.width, tf.uint32))
             & (tf.cast(src_y, tf.uint32) < tf.cast(self.height, tf.uint32)))

    def through_resize():
      rows_to_source = _nearest_index(self.height, self.source_height)
      cols_to_source = _nearest_index(self.width, self.source_width)
      return (tf.gather(rows_to_source, tf.clip_by_value(src_y, 0, self.height - 1))
              * self.source_width
              + tf.gather(cols_to_source, tf.clip_by_value(src_x, 0, self.width - 1)))

    flat = tf.cond(self.resized, through_resize, lambda: src_y * self.source_width + src_x)
    return tf.where(valid, flat, self.source_height * self.source_width)


def _as_float(value):
  return tf.cast(value, tf.float32)


def _merge_alpha(alpha1, alpha2):
  return 1.0 - (1.0 - alpha1) * (1.0 - alpha2)


def _flat_alpha(alpha_u8):
  """(H, W, 1) uint8 -> (H * W + 1,) float32 in [0, 1], with a trailing 0 (the sentinel)."""
  flat = tf.reshape(alpha_u8, [-1])
  return tf.cast(tf.concat([flat, tf.zeros([1], tf.uint8)], 0), tf.float32) / 255.0


def _gather_rgb(image, flat_index):
  """image[flat_index] as float32 for flat indices; the sentinel (H * W) gives 0."""
  flat = tf.reshape(image, [-1, 3])
  count = tf.shape(flat)[0]
  pixels = tf.cast(tf.gather(flat, tf.minimum(flat_index, count - 1)), tf.float32)
  return tf.where((flat_index < count)[..., None], pixels, 0.0)


def _below(draw, count):
  """A raw uint32 draw (held in an int64) reduced to [0, count)."""
  return tf.cast(draw % tf.cast(count, tf.int64), tf.int32)


def _resample_rows_cols(image, rows, cols):
  """image[rows][:, cols] for 1-D index vectors."""
  return tf.gather(tf.gather(image, rows), cols, axis=1)


def _trimap(alpha, fg_size, bg_size, use_opencv):
  epsilon = protocol.DEFINITE_EPSILON
  fg_mask = tf.cast(tf.floor(alpha + epsilon) >= 1.0, tf.uint8)
  bg_mask = tf.cast(tf.floor(1.0 - alpha + epsilon) >= 1.0, tf.uint8)
  fg_mask = morphology.erode(fg_mask, fg_size, use_opencv=use_opencv)
  bg_mask = morphology.erode(bg_mask, bg_size, use_opencv=use_opencv)
  trimap = tf.fill(tf.shape(alpha), tf.constant(128, tf.uint8))
  trimap = tf.where(tf.equal(fg_mask, 1), tf.constant(255, tf.uint8), trimap)
  return tf.where(tf.equal(bg_mask, 1), tf.constant(0, tf.uint8), trimap)


def _hsv_jitter(fg, alpha, draws):
  """fg (H, W, 3) float in [0, 255]; alpha (H, W) float. Returns jittered fg in [0, 255].

  The three channels are transformed together (per-channel shifts broadcast, the hue
  channel picked by a mask): splitting and re-stacking channels costs more than the maths.
  """
  hsv = tf.image.rgb_to_hsv(fg / 255.0)
  covered = tf.cast(alpha > 0, tf.float32)[..., None]
  # Mean saturation and value where alpha > 0 (the hue entry is unused).
  means = tf.reduce_sum(hsv * covered, axis=(0, 1)) / tf.reduce_sum(covered)
  draw = tf.cast(tf.stack([0.0, draws["saturation_draw"], draws["value_draw"]]), tf.float32)
  shift = draw * (1.1 - means) / 5.0 - (1.1 - means) / 10.0
  shift = tf.tensor_scatter_nd_update(
      shift, [[0]], [tf.cast(draws["hue_degrees"], tf.float32) / 360.0])
  shifted = hsv + shift
  # Hue wraps around (mod 1); saturation and value are reflected at 0 and 1.
  wrapped = shifted - tf.floor(shifted)
  reflected = tf.abs(shifted)
  reflected = tf.where(reflected > 1.0, 2.0 - reflected, reflected)
  is_hue = tf.constant([True, False, False])
  return tf.image.hsv_to_rgb(tf.where(is_hue, wrapped, reflected)) * 255.0


def _source_window(offset, scale, out_size, in_size):
  """First source index and length covering the cubic taps of out indices [0, out_size)."""
  first = tf.math.floor((offset + 0.5) / scale - 0.5) - _CUBIC_MARGIN
  last = tf.math.ceil((offset + _as_float(out_size) - 0.5) / scale - 0.5) + _CUBIC_MARGIN
  first = tf.clip_by_value(tf.cast(first, tf.int32), 0, in_size - 1)
  last = tf.clip_by_value(tf.cast(last, tf.int32), first, in_size - 1)
  return first, last - first + 1


def _resample_background(background, out_size, scale_y, scale_x, offset_y, offset_x):
  """Bicubic resampling of (H, W, 3) uint8: out index o <- source (o + off + .5)/s - .5.

  Only the source window that the output's taps reach is converted and resampled.
  """
  top, rows = _source_window(offset_y, scale_y, out_size, tf.shape(background)[0])
  left, cols = _source_window(offset_x, scale_x, out_size, tf.shape(background)[1])
  window = tf.slice(background, tf.stack([top, left, 0]), tf.stack([rows, cols, 3]))
  resampled = tf.raw_ops.ScaleAndTranslate(
      images=tf.cast(window, tf.float32)[None],
      size=tf.stack([out_size, out_size]),
      scale=tf.stack([scale_y, scale_x]),
      translation=tf.stack([_as_float(top) * scale_y - offset_y,
                            _as_float(left) * scale_x - offset_x]),
      kernel_type="keyscubic", antialias=False)[0]
  # OpenCV resizes uint8 images to uint8.
  return tf.clip_by_value(tf.round(resampled), 0.0, 255.0)


def compose(load_foreground: Callable, load_background: Callable, floats: tf.Tensor,
            ints: tf.Tensor, *, crop_size: int, use_opencv: bool | None = None
            ) -> tuple[Example, dict[str, tf.Tensor]]:
  """One training example by the Deep Image Matting protocol.

  Args:
    load_foreground: index -> (fg (h, w, 3) uint8, alpha (h, w, 1) uint8), TF graph ops.
    load_background: index -> (h, w, 3) uint8.
    floats, ints: the example's random decisions, `protocol.as_vectors` of
      `protocol.draw` (float64 and int64 vectors).
    crop_size: side of the square crop.
    use_opencv: trimap erosion through OpenCV (None: when installed).

  Returns:
    The example, and every decision it took, drawn or derived (for tests and debugging).
  """
  drawn = unpack_decisions(floats, ints)
  crop = tf.constant(crop_size, tf.int32)

  fg1, alpha1_u8 = load_foreground(drawn["foreground_index"])
  height0, width0 = tf.shape(alpha1_u8)[0], tf.shape(alpha1_u8)[1]
  # Alphas are handled flat (row-major) with a trailing sentinel 0, the value of pixels
  # that the warp brings in from outside the image.
  alpha1 = _flat_alpha(alpha1_u8)

  # 1. Merge with a second foreground, nearest-resized to the first one's size (read only
  # when the merge is drawn, as the authors do).
  def merged():
    fg2, alpha2 = load_foreground(drawn["second_index"])
    rows2 = _nearest_index(height0, tf.shape(alpha2)[0])
    cols2 = _nearest_index(width0, tf.shape(alpha2)[1])
    alpha2 = _flat_alpha(_resample_rows_cols(alpha2, rows2, cols2))
    alpha = _merge_alpha(alpha1, alpha2)
    overlap = tf.reduce_any(alpha[:-1] < 1.0)
    return tf.where(overlap, alpha, alpha1), overlap, alpha2, fg2, rows2, cols2

  def not_merged():
    empty = tf.zeros([0], tf.int32)
    return alpha1, tf.constant(False), alpha1, fg1, empty, empty

  source_alpha, merge, alpha2, fg2, rows2, cols2 = tf.cond(
      tf.cast(drawn["merge"], tf.bool), merged, not_merged)

  # 2. Optional resize to 640 x 640 (an index map onto the source).
  resize = tf.cast(drawn["resize"], tf.bool)
  height = tf.where(resize, RESIZE_TO, height0)
  width = tf.where(resize, RESIZE_TO, width0)

  # 3. Random affine (the rotation applies to large images only) and 4. horizontal flip.
  large = tf.maximum(height, width) >= protocol.ROTATION_MIN_SIDE
  angle = tf.where(large, drawn["angle"], 0.0)
  m0, m1, m3, m4 = tf.unstack(drawn["linear"][tf.cast(large, tf.int32)])
  # The translation in double precision, as the authors' Python code computes it.
  center_x = tf.cast(width, tf.float64) * 0.5 + 0.5
  center_y = tf.cast(height, tf.float64) * 0.5 + 0.5
  matrix = (m0, m1, m0 * -center_x + m1 * -center_y + center_x,
            m3, m4, m3 * -center_x + m4 * -center_y + center_y)
  geometry = _Geometry(height=height, width=width, source_height=height0,
                       source_width=width0, matrix=matrix,
                       hflip=tf.cast(drawn["hflip"], tf.bool), resized=resize)
  source_pixel = geometry.source_pixel(tf.range(height)[:, None], tf.range(width)[None, :])
  alpha = tf.gather(source_alpha, source_pixel)

  # 5. Trimap on the full (transformed) alpha.
  trimap = _trimap(alpha, drawn["fg_kernel"], drawn["bg_kernel"], use_opencv)
  unknown = tf.equal(trimap, 128)

  # 6. Crop. Background first enlarged to cover the foreground (ceil), then, for images
  # smaller than the crop, everything enlarged by the same ratio (int).
  background = load_background(drawn["background_index"])
  bg_height0 = tf.shape(background)[0]
  bg_width0 = tf.shape(background)[1]
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  cover = tf.maximum(height_f / tf.cast(bg_height0, tf.float64),
                     width_f / tf.cast(bg_width0, tf.float64))

  def covering(size):
    return tf.where(cover > 1, tf.cast(tf.math.ceil(tf.cast(size, tf.float64) * cover),
                                       tf.int32), size)

  bg_height, bg_width = covering(bg_height0), covering(bg_width0)
  small = (height < crop + 1) | (width < crop + 1)
  crop_f = tf.cast(crop, tf.float64)
  enlarge = tf.where(height < width, 1.1 * crop_f / height_f, 1.1 * crop_f / width_f)

  def enlarged(size):
    return tf.where(small, tf.cast(tf.cast(size, tf.float64) * enlarge, tf.int32), size)

  grid_height, grid_width = enlarged(height), enlarged(width)
  bg_height, bg_width = enlarged(bg_height), enlarged(bg_width)
  # Enlarged grid -> trimap grid (the identity when not small).
  enlarged_rows = _nearest_index(grid_height, height)
  enlarged_cols = _nearest_index(grid_width, width)

  margin = crop_size // 2
  interior = tf.cond(
      small,
      lambda: _resample_rows_cols(unknown, enlarged_rows[margin:grid_height - margin],
                                  enlarged_cols[margin:grid_width - margin]),
      lambda: unknown[margin:height - margin, margin:width - margin])
  candidates = tf.cast(tf.where(interior), tf.int32)
  num_candidates = tf.shape(candidates)[0]
  # The raw 32-bit draws reduced modulo their ranges (protocol.Decisions).
  uniform_top = _below(drawn["top_draw"], grid_height - crop + 1)
  uniform_left = _below(drawn["left_draw"], grid_width - crop + 1)
  centred = num_candidates >= MIN_UNKNOWN_FOR_CENTRED_CROP
  pick = _below(drawn["pick_draw"], tf.maximum(num_candidates, 1))
  # A sentinel row keeps the (unused) pick valid when there are no candidates.
  chosen = tf.concat([candidates, tf.zeros([1, 2], tf.int32)], 0)[pick]
  top = tf.where(centred, chosen[0], uniform_top)
  left = tf.where(centred, chosen[1], uniform_left)
  has_unknown = tf.reduce_any(unknown)

  # Crop rows/cols in the enlarged grid; with no unknown pixel, a nearest resize instead.
  crop_rows = tf.where(has_unknown, top + tf.range(crop), _nearest_index(crop, grid_height))
  crop_cols = tf.where(has_unknown, left + tf.range(crop), _nearest_index(crop, grid_width))
  grid_rows = tf.gather(enlarged_rows, crop_rows)
  grid_cols = tf.gather(enlarged_cols, crop_cols)
  alpha_crop = _resample_rows_cols(alpha, grid_rows, grid_cols)
  trimap_crop = _resample_rows_cols(trimap, grid_rows, grid_cols)

  # The foreground, merged and transformed at the crop's pixels only.
  crop_source = geometry.source_pixel(grid_rows[:, None], grid_cols[None, :])
  fg = _gather_rgb(fg1, crop_source)

  def merge_at_crop():
    a1 = tf.gather(alpha1, crop_source)[..., None]
    a2 = tf.gather(alpha2, crop_source)[..., None]
    # The second foreground's own pixel: its nearest-resize map, row and column.
    inside = crop_source < height0 * width0
    source_row = tf.minimum(crop_source // width0, height0 - 1)
    second = tf.where(inside, tf.gather(rows2, source_row) * tf.shape(fg2)[1]
                      + tf.gather(cols2, crop_source % width0), tf.size(fg2) // 3)
    f2 = _gather_rgb(fg2, second)
    return tf.floor((fg * a1 + f2 * (1.0 - a1) * a2) / (_merge_alpha(a1, a2) + 1e-5))

  fg = tf.cond(merge, merge_at_crop, lambda: fg)

  # The background at the crop: offset crop in the enlarged background, or a resize of it.
  bg = _resample_background(
      background, crop,
      tf.where(has_unknown, _as_float(bg_height), _as_float(crop)) / _as_float(bg_height0),
      tf.where(has_unknown, _as_float(bg_width), _as_float(crop)) / _as_float(bg_width0),
      tf.where(has_unknown, _as_float(top), 0.0),
      tf.where(has_unknown, _as_float(left), 0.0))

  # 7. HSV jitter of the foreground crop, 8. composite.
  skip_jitter = tf.reduce_all(tf.equal(alpha_crop, 0.0))
  fg = tf.cond(skip_jitter, lambda: fg, lambda: _hsv_jitter(fg, alpha_crop, drawn))
  fg = tf.clip_by_value(fg, 0.0, 255.0) / 255.0
  bg = bg / 255.0
  alpha_crop = tf.clip_by_value(alpha_crop, 0.0, 1.0)[..., None]
  image = fg * alpha_crop + bg * (1.0 - alpha_crop)
  shape = (crop_size, crop_size)
  decisions = {
      **drawn, "merge": merge, "resize": resize, "angle": angle, "hflip": geometry.hflip,
      "centred": centred, "pick": pick, "uniform_top": uniform_top,
      "uniform_left": uniform_left, "top": top, "left": left, "has_unknown": has_unknown,
      "jitter": tf.logical_not(skip_jitter)}
  del decisions["linear"]
  example = Example(
      image=tf.ensure_shape(image, shape + (3,)),
      fg=tf.ensure_shape(fg, shape + (3,)),
      bg=tf.ensure_shape(bg, shape + (3,)),
      alpha=tf.ensure_shape(alpha_crop, shape + (1,)),
      trimap=tf.ensure_shape(trimap_crop[..., None], shape + (1,)))
  return example, decisions
