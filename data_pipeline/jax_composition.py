"""The Deep Image Matting protocol as jitted JAX: a batch of examples composited on the
accelerator.

The decisions come from `data_pipeline.protocol` (as for the tf.data executor,
`data_pipeline.composition`, which stays the reference). The work splits in two:

- `plan` (host, NumPy, per example): everything that depends only on image sizes and the
  decisions, as scalars and 1-D index vectors: the nearest-neighbour maps (merge resize,
  640 resize, enlargement, whole-image resize), the affine warp's fixed-point row and
  column terms (in double precision, as OpenCV computes them), the erosion kernels'
  columns, the background's scales. Cheap: O(H + W) per example.
- `compose_batch` (device, jitted; batched on accelerators, one example at a time on the
  CPU): every per-pixel step: the merge, the warp, the trimap erosion (on bits packed 32
  to a word, `_hits`), the crop centred on an unknown pixel, the bicubic background, the
  HSV jitter and the composite.

Images of different sizes are padded to a canvas whose sides come from `CANVAS_SIDES`
(`collate`), so a run compiles once per distinct (canvas, background canvas) pair: a bounded
set, whatever the dataset. Alphas are carried as integer codes into one table of float32
values (`_alpha_values`), computed once in NumPy with the reference's float32 operations, so
the alpha and the trimap (thresholds of those values) are bit-identical to the reference on
every backend.

The merged foreground is bit-identical too (`_merged_foreground` says what it takes).
What is not bit-identical, and why (the bounds the tests check):
- the background: one Keys cubic pass written here with the reference's sample positions;
  float rounding may move a value across a .5 before the reference's rounding to 8 bits,
  so it is within 1/255 (and the composite, which mixes it in, within 1/255 too);
- the foreground after the HSV jitter: its shift uses the mean saturation and value over
  the crop, a float32 sum whose order differs between TF and XLA (~1e-5 after the jitter).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import protocol
from data_pipeline.trimaps import ellipse_footprint

# Canvas sides (pixels) an image is padded up to; larger images round up to a multiple of
# the last step. Few sides: few compilations; close sides: little padding (at most a sixth
# of a side from 768 up, a quarter below).
CANVAS_SIDES = (256, 384, 512, 640, 768, 896, 1024, 1152, 1280, 1536, 1792, 2048, 2304,
                2560, 3072, 3584, 4096)
_CANVAS_STEP = 1024
_HALF_SPAN = protocol.MAX_KERNEL_SIZE // 2  # row and column offsets of any kernel: -14..14
_OFFSETS = 2 * _HALF_SPAN + 1
_WORD_BITS = 32  # pixels of a row packed into one word for the erosion
_MERGED = 256  # codes >= _MERGED are merged alphas: _MERGED + 256 * a1 + a2
_ALIGNMENT = 64  # bytes: host batches the CPU backend can use without a copy
_ROW_BAND = 128  # rows of the trimap grid warped at a time, one example at a time


def canvas_side(size: int) -> int:
  """The padded side for an image side of `size` pixels."""
  for side in CANVAS_SIDES:
    if size <= side:
      return side
  return -(-size // _CANVAS_STEP) * _CANVAS_STEP


@functools.lru_cache(maxsize=1)
def _alpha_values() -> np.ndarray:
  """The float32 value of each alpha code.

  Codes 0..255 are 8-bit alphas (a / 255); code 256 + 256 a1 + a2 is the merge of two,
  1 - (1 - a1)(1 - a2): the reference's float32 operations, one rounding each. The
  reference's thresholds of these values reduce to integer tests of the codes
  (`_definite`), checked here against the values themselves.
  """
  single = np.arange(256, dtype=np.float32) / np.float32(255)
  one = np.float32(1)
  merged = one - (one - single[:, None]) * (one - single[None, :])
  values = np.concatenate([single, merged.reshape(-1)])
  epsilon = np.float32(protocol.DEFINITE_EPSILON)
  definite_fg, definite_bg = _definite(np.arange(values.size))
  assert np.array_equal(np.floor(values + epsilon) >= 1, definite_fg)
  assert np.array_equal(np.floor(one - values + epsilon) >= 1, definite_bg)
  assert np.array_equal(values >= 1, definite_fg)
  return values


def _definite(codes):
  """(definite foreground, definite background) of alpha codes (NumPy or JAX integers).

  A merge is definite foreground (and exactly 1) where either alpha is 255, definite
  background where both are 0: the smallest non-zero product, (1/255)^2, is beyond the
  reference's 1e-5. An 8-bit alpha is definite at 255 and 0 only.
  """
  xp = np if isinstance(codes, np.ndarray) else jnp
  merged = codes >= _MERGED
  first, second = (codes - _MERGED) // 256, (codes - _MERGED) % 256
  return (xp.where(merged, (first == 255) | (second == 255), codes == 255),
          xp.where(merged, (first == 0) & (second == 0), codes == 0))


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
  """OpenCV INTER_NEAREST's source index of each output index (its double arithmetic)."""
  inverse_scale = 1.0 / (np.float64(out_size) / np.float64(in_size))
  index = np.floor(np.arange(out_size, dtype=np.float64) * inverse_scale)
  return np.minimum(index.astype(np.int32), in_size - 1)


def _kernel_columns(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Per column offset -14..14 of the elliptic kernel: how many rows its column reaches
  above and below the anchor's row (-1, -1 for columns the kernel does not have). The
  kernel's middle row spans it and it is convex, so each column is one run through the
  anchor's row."""
  element = ellipse_footprint(int(size))
  anchor = int(size) // 2
  up = np.full(_OFFSETS, -1, np.int32)
  down = np.full(_OFFSETS, -1, np.int32)
  for column in range(element.shape[1]):
    rows = np.flatnonzero(element[:, column])
    up[column - anchor + _HALF_SPAN] = anchor - rows[0]
    down[column - anchor + _HALF_SPAN] = rows[-1] - anchor
  return up, down


def _fixed_point(value: np.ndarray, offset: float = 0.0) -> np.ndarray:
  return (np.rint(value * float(1 << protocol.WARP_BITS)) + offset).astype(np.int32)


def _sizes(height0: int, width0: int, bg_height0: int, bg_width0: int,
           decisions: protocol.Decisions, crop_size: int) -> tuple[int, ...]:
  """(height, width) of the trimap grid, of the enlarged grid, and of the enlarged
  background: the background first covers the foreground (ceil), then images smaller
  than the crop are enlarged by one ratio (int), as the reference does."""
  height, width = ((protocol.RESIZE_TO,) * 2 if decisions.resize else (height0, width0))
  cover = max(height / np.float64(bg_height0), width / np.float64(bg_width0))

  def covering(size):
    return int(np.ceil(np.float64(size) * cover)) if cover > 1 else size

  small = height < crop_size + 1 or width < crop_size + 1
  crop = np.float64(crop_size)
  enlarge = 1.1 * crop / height if height < width else 1.1 * crop / width

  def enlarged(size):
    return int(np.float64(size) * enlarge) if small else size

  return (height, width, enlarged(height), enlarged(width),
          enlarged(covering(bg_height0)), enlarged(covering(bg_width0)))


def _pixel_bucket(count: int) -> int:
  """The padded length of a flat image of `count` pixels (a square canvas's area)."""
  return canvas_side(int(np.ceil(np.sqrt(count)))) ** 2


def canvases(fg_size: tuple[int, int], fg2_size: tuple[int, int] | None,
             bg_size: tuple[int, int], decisions: protocol.Decisions, crop_size: int
             ) -> tuple[tuple[int, int], int, tuple[int, int]]:
  """The padded shapes one example needs, from image sizes (h, w) alone (fg2_size: None
  unless the merge is drawn): (grid canvas, foreground pixels, background canvas). A batch
  takes the largest of each; one executor is compiled per distinct triple."""
  height, width, grid_height, grid_width, _, _ = _sizes(*fg_size, *bg_size, decisions,
                                                        crop_size)
  fg2_size = fg2_size if decisions.merge else (1, 1)
  return ((canvas_side(max(fg_size[0], height, grid_height)),
           canvas_side(max(fg_size[1], width, grid_width))),
          _pixel_bucket(max(fg_size[0] * fg_size[1], fg2_size[0] * fg2_size[1])),
          (canvas_side(bg_size[0]), canvas_side(bg_size[1])))


def plan(fg: np.ndarray, alpha: np.ndarray, fg2: np.ndarray, alpha2: np.ndarray,
         background: np.ndarray, decisions: protocol.Decisions, crop_size: int
         ) -> dict[str, Any]:
  """The host's part of one example: its images and its size-dependent index maps.

  Args:
    fg, fg2: (h, w, 3) uint8 RGB, the foreground and the second one (read only when
      `decisions.merge`; pass anything otherwise).
    alpha, alpha2: (h, w) uint8, their alphas.
    background: (h, w, 3) uint8 RGB.
    decisions: from `protocol.draw`.
    crop_size: side of the square crop.

  Returns:
    A dict of NumPy arrays of this example's own sizes; `collate` pads and stacks them.
  """
  height0, width0 = alpha.shape
  merge = bool(decisions.merge)
  if not merge:
    fg2 = np.zeros((1, 1, 3), np.uint8)
    alpha2 = np.zeros((1, 1), np.uint8)
  resize = bool(decisions.resize)
  bg_height0, bg_width0 = background.shape[:2]
  height, width, grid_height, grid_width, bg_height, bg_width = _sizes(
      height0, width0, bg_height0, bg_width0, decisions, crop_size)

  m0, m1, m3, m4 = protocol.inverse_affine_linear(decisions,
                                                  protocol.rotates(height, width))
  center_x = np.float64(width) * 0.5 + 0.5
  center_y = np.float64(height) * 0.5 + 0.5
  m2 = m0 * -center_x + m1 * -center_y + center_x
  m5 = m3 * -center_x + m4 * -center_y + center_y
  y = np.arange(height, dtype=np.float64)
  columns = np.arange(width)
  x = (width - 1 - columns if decisions.hflip else columns).astype(np.float64)
  half = float(1 << protocol.WARP_BITS) / 2

  enlarged_cols = _nearest_index(grid_width, width)
  margin = crop_size // 2
  fg_up, fg_down = _kernel_columns(decisions.fg_kernel)
  bg_up, bg_down = _kernel_columns(decisions.bg_kernel)
  f32 = np.float32
  return {
      "fg": fg, "alpha": alpha, "fg2": fg2, "alpha2": alpha2, "background": background,
      # Rows and columns of the trimap grid (after the optional 640 resize).
      "warp_row_x": _fixed_point(m1 * y + m2, half),
      "warp_row_y": _fixed_point(m4 * y + m5, half),
      "warp_col_x": _fixed_point(m0 * x),
      "warp_col_y": _fixed_point(m3 * x),
      "to_source_rows": (_nearest_index(height, height0) if resize
                         else np.arange(height, dtype=np.int32)),
      "to_source_cols": (_nearest_index(width, width0) if resize
                         else np.arange(width, dtype=np.int32)),
      # Rows and columns of the first foreground.
      "second_rows": _nearest_index(height0, alpha2.shape[0]),
      "second_cols": _nearest_index(width0, alpha2.shape[1]),
      # Rows and columns of the enlarged grid, and of the crop when nothing is unknown.
      "enlarged_rows": _nearest_index(grid_height, height),
      "enlarged_cols": enlarged_cols,
      # Per trimap column: its copies among the enlarged grid's interior columns.
      "candidate_columns": np.bincount(enlarged_cols[margin:grid_width - margin],
                                       minlength=width).astype(np.int32),
      "whole_rows": _nearest_index(crop_size, grid_height),
      "whole_cols": _nearest_index(crop_size, grid_width),
      "kernel_columns": np.stack([fg_up, fg_down, bg_up, bg_down]),
      "sizes": np.array([height0, width0, height, width, grid_height, grid_width,
                         bg_height0, bg_width0, *alpha2.shape], np.int32),
      "flags": np.array([merge, decisions.hue_degrees], np.int32),
      "draws": np.array([decisions.pick_draw, decisions.top_draw, decisions.left_draw],
                        np.uint32),
      # The reference's float32 scale factors (enlarged size / original size), for the
      # crop of the enlarged background and for its resize to the crop.
      "bg_scales": np.array([f32(bg_height) / f32(bg_height0), f32(bg_width) / f32(bg_width0),
                             f32(crop_size) / f32(bg_height0), f32(crop_size) / f32(bg_width0),
                             decisions.saturation_draw, decisions.value_draw], np.float32),
  }


_VECTOR_AXES = {"warp_row_x": 0, "warp_row_y": 0, "to_source_rows": 0, "second_rows": 0,
                "enlarged_rows": 0, "warp_col_x": 1, "warp_col_y": 1, "to_source_cols": 1,
                "second_cols": 1, "enlarged_cols": 1, "candidate_columns": 1}
_IMAGES = ("fg", "alpha", "fg2", "alpha2")


def _aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
  """np.zeros whose data starts on a 64-byte boundary: the CPU backend's `device_put`
  then uses the array in place instead of copying it (a batch's images are ~400 MB at
  1-2 MP, and fresh memory for the copy costs more than the copy)."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.zeros(size + _ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % _ALIGNMENT
  return raw[start:start + size].view(dtype).reshape(shape)


def collate(plans: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Pads a list of `plan`s and stacks them: a batch for `compose_batch`.

  The index vectors are padded to the grid canvas, which holds the largest foreground,
  trimap grid and enlarged grid of the batch (sides rounded up by `canvas_side`). The
  foregrounds and alphas travel flat, unpadded but for the tail up to a bucketed length
  (`_pixel_bucket`): the device indexes them by row * width + column, so a canvas of
  padding is neither copied on the host nor sent. The background (small) keeps its
  canvas.
  """
  def largest(axis):
    return canvas_side(int(max(p["sizes"][[axis, axis + 2, axis + 4]].max() for p in plans)))

  canvas = (largest(0), largest(1))
  pixels = _pixel_bucket(max(p[key].shape[0] * p[key].shape[1]
                             for p in plans for key in ("alpha", "alpha2")))
  bg_canvas = tuple(canvas_side(max(p["background"].shape[axis] for p in plans))
                    for axis in (0, 1))
  batch = {}
  for key in plans[0]:
    first = plans[0][key]
    if key in _IMAGES:
      stacked = _aligned_zeros((len(plans), pixels) + first.shape[2:], first.dtype)
      for i, p in enumerate(plans):
        # One copy, into a view of the row (reshaping a non-contiguous image would be two).
        image = p[key]
        stacked[i, :image.shape[0] * image.shape[1]].reshape(image.shape)[...] = image
      batch[key] = stacked
    elif key == "background":
      # One copy into the zeroed canvas (padding, then stacking, would be two).
      stacked = _aligned_zeros((len(plans),) + bg_canvas + first.shape[2:], first.dtype)
      for i, p in enumerate(plans):
        stacked[i, :p[key].shape[0], :p[key].shape[1]] = p[key]
      batch[key] = stacked
    elif key in _VECTOR_AXES:
      length = canvas[_VECTOR_AXES[key]]
      batch[key] = np.stack([np.pad(p[key], (0, length - p[key].shape[0])) for p in plans])
    else:
      batch[key] = np.stack([p[key] for p in plans])
  return batch


def _pack_columns(*masks: jax.Array) -> tuple[jax.Array, ...]:
  """(..., W) bool masks -> (..., W / 32) uint32 each: bit b of word j is column 32 j + b.

  One reduction packs them all, so what they are computed from is computed once (packed
  separately, XLA would fuse that computation into each packing)."""
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  bits = [(mask.reshape(mask.shape[:-1] + (mask.shape[-1] // _WORD_BITS, _WORD_BITS)
                        ).astype(jnp.uint32) << shifts) for mask in masks]
  zero = jnp.uint32(0)
  # Distinct bits: their sum is their OR.
  return jax.lax.reduce(tuple(bits), (zero,) * len(bits),
                        lambda a, b: tuple(x + y for x, y in zip(a, b)),
                        (bits[0].ndim - 1,))


def _unpack_columns(words: jax.Array) -> jax.Array:
  height, num_words = words.shape
  bits = (words[..., None] >> jnp.arange(_WORD_BITS, dtype=jnp.uint32)) & 1
  return bits.astype(bool).reshape(height, num_words * _WORD_BITS)


def _levels(bad: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
  """(above, below): above[t] is the OR of each word's row and the t rows above it
  (below[u]: below it), t, u = 0..14, each (H, W / 32 + 2): a zero word on each side,
  so that every column shift (`_read_right`) reads static slices."""
  height = bad.shape[0]
  padded = jnp.pad(bad, ((_HALF_SPAN, _HALF_SPAN), (1, 1)))
  above = [padded[_HALF_SPAN:_HALF_SPAN + height]]
  below = [above[0]]
  for reach in range(1, _HALF_SPAN + 1):
    above.append(above[-1] | padded[_HALF_SPAN - reach:_HALF_SPAN - reach + height])
    below.append(below[-1] | padded[_HALF_SPAN + reach:_HALF_SPAN + reach + height])
  return above, below


def _read_right(words: jax.Array, offset: int) -> jax.Array:
  """Packed rows with a zero word on each side (H, W / 32 + 2) read `offset` columns to
  the right, -14..14: out(x) = in(x + offset), (H, W / 32)."""
  if offset == 0:
    return words[:, 1:-1]
  if offset > 0:
    return (words[:, 1:-1] >> offset) | (words[:, 2:] << (_WORD_BITS - offset))
  return (words[:, 1:-1] << -offset) | (words[:, :-2] >> (_WORD_BITS + offset))


def _example_hits(bad: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """`_hits` of one example: (H, W / 32) uint32 words and its (29,) kernel columns,
  each column picking its levels by dynamic index."""
  above, below = (jnp.stack(levels) for levels in _levels(bad))
  hit = jnp.zeros_like(bad)
  for i in range(_OFFSETS):  # column offset i - _HALF_SPAN
    column = (jax.lax.dynamic_index_in_dim(above, jnp.maximum(up[i], 0), keepdims=False)
              | jax.lax.dynamic_index_in_dim(below, jnp.maximum(down[i], 0),
                                             keepdims=False))
    hit |= _read_right(jnp.where(up[i] >= 0, column, jnp.uint32(0)), i - _HALF_SPAN)
  return hit


def _static_hits(above: list[jax.Array], below: list[jax.Array], size: int) -> jax.Array:
  """`_example_hits` for a kernel size known when tracing, from its `_levels`: every
  level and shift fixed, so every read is a static slice and XLA emits one plain loop
  over the words (on CPU ~30x faster than the dynamically indexed levels)."""
  up, down = _kernel_columns(size)
  terms = [_read_right(above[up[i]] | below[down[i]], int(i) - _HALF_SPAN)
           for i in np.flatnonzero(up >= 0)]
  return functools.reduce(jnp.bitwise_or, terms)


def _hits(bad: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """Binary erosion, packed: which pixels have a bad pixel under their kernel.

  Args:
    bad: (N, H, W / 32) uint32, the pixels that erode (`_pack_columns`): non-definite
      pixels inside the image (outside it nothing erodes: OpenCV's border for erosion).
    up, down: (N, 29) int32, each example's kernel (`_kernel_columns`).

  Returns:
    (N, H, W / 32) uint32: set where the eroded mask is 0.

  The kernel is the union of its columns: the column at offset dx reaching t rows up and
  u rows down contributes (above_t | below_u) read dx columns to the right, where above_t
  is the OR of a pixel's row and the t rows above it. The levels are built once, an OR of
  whole words per level, so a column costs one shift per 32 pixels (the unpacked erosion,
  29 compares per pixel, took 4x longer on CPU). On CPU a loop over the examples
  (`lax.map`) switches to the kernel's size (`_static_hits`: 29 compiled variants, each a
  plain loop); accelerators take vmapped gathers of the levels by each example's
  columns, which keep the whole batch in one kernel (vmapped, a switch would run all 29).
  """
  return jax.lax.platform_dependent(bad, up, down, cpu=_looped_hits,
                                    default=_vectorised_hits)


def _looped_hits(bad: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  # An elliptic kernel of size k has k columns.
  sizes = jnp.sum(up >= 0, axis=1)
  variants = [functools.partial(_static_hits, size=k)
              for k in range(1, protocol.MAX_KERNEL_SIZE + 1)]
  return jax.lax.map(lambda example: jax.lax.switch(example[1] - 1, variants,
                                                    *_levels(example[0])), (bad, sizes))


def _vectorised_hits(bad: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  return jax.vmap(_example_hits)(bad, up, down)


def _keys_cubic(x: jax.Array) -> jax.Array:
  """Keys' cubic kernel with a = -0.5 (TF's "keyscubic")."""
  x = jnp.abs(x)
  return jnp.where(x < 1, ((1.5 * x - 2.5) * x) * x + 1,
                   jnp.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))


def _cubic_taps(out_size: int, offset, scale, in_size) -> tuple[jax.Array, jax.Array]:
  """(source index, weight), each (out_size, 4): output o samples the source at
  (o + offset + 0.5) / scale - 0.5; taps outside [0, in_size) are dropped and the weights
  renormalised, as TF's ScaleAndTranslate does."""
  centre = (jnp.arange(out_size, dtype=jnp.float32) + offset + 0.5) / scale - 0.5
  index = jnp.floor(centre).astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :]
  weight = _keys_cubic(centre[:, None] - index)
  weight = jnp.where((index >= 0) & (index < in_size), weight, 0.0)
  return jnp.clip(index, 0, None), weight / jnp.sum(weight, axis=1, keepdims=True)


def _rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """TF's RGBToHSV kernel, operation for operation."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  spread = value - jnp.minimum(jnp.minimum(r, g), b)
  saturation = jnp.where(value > 0, spread / value, 0.0)
  norm = (1.0 / spread) * jnp.float32(1.0 / 6.0)
  hue = jnp.where(r == value, norm * (g - b),
                  jnp.where(g == value, norm * (b - r) + jnp.float32(2.0 / 6.0),
                            norm * (r - g) + jnp.float32(4.0 / 6.0)))
  hue = jnp.where(spread > 0, hue, 0.0)
  hue = jnp.where(hue < 0, hue + 1, hue)
  return jnp.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """TF's HSVToRGB kernel, operation for operation."""
  hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  dh = hue * 6.0
  dr = jnp.clip(jnp.abs(dh - 3.0) - 1.0, 0.0, 1.0)
  dg = jnp.clip(-jnp.abs(dh - 2.0) + 2.0, 0.0, 1.0)
  db = jnp.clip(-jnp.abs(dh - 4.0) + 2.0, 0.0, 1.0)
  one_minus = -saturation + 1.0
  return jnp.stack([(one_minus + saturation * d) * value for d in (dr, dg, db)], axis=-1)


def _hsv_jitter(fg: jax.Array, alpha: jax.Array, hue_degrees, saturation_draw,
                value_draw) -> jax.Array:
  """The reference's jitter: fg (C, C, 3) float32 in [0, 255], alpha (C, C)."""
  hsv = _rgb_to_hsv(fg / 255.0)
  covered = (alpha > 0).astype(jnp.float32)[..., None]
  means = jnp.sum(hsv * covered, axis=(0, 1)) / jnp.sum(covered)
  draw = jnp.stack([jnp.float32(0), saturation_draw, value_draw])
  shift = draw * (1.1 - means) / 5.0 - (1.1 - means) / 10.0
  shift = shift.at[0].set(hue_degrees.astype(jnp.float32) / 360.0)
  shifted = hsv + shift
  wrapped = shifted - jnp.floor(shifted)
  reflected = jnp.abs(shifted)
  reflected = jnp.where(reflected > 1.0, 2.0 - reflected, reflected)
  is_hue = jnp.array([True, False, False])
  return _hsv_to_rgb(jnp.where(is_hue, wrapped, reflected)) * 255.0


def _merged_foreground(fg: jax.Array, f2: jax.Array, a1: jax.Array, a2: jax.Array,
                       merged_alpha: jax.Array) -> jax.Array:
  """Two foregrounds merged as the reference computes it, bit for bit:
  floor((fg a1 + f2 (1 - a1) a2) / (merged_alpha + 1e-5)), each operation rounded to
  float32 once.

  fg, f2: (..., C) float32 8-bit values; a1, a2, merged_alpha: (...) float32 in [0, 1].
  Returns (..., C) float32.

  Written so that no compiler may change it: XLA rewrites a division by a broadcast
  divisor into a multiplication by its reciprocal (two roundings), so each channel is
  divided by a divisor of its own shape; and XLA's CPU and GPU backends contract a product
  that feeds a sum into one fused multiply-add (one rounding where the reference rounds
  twice), so each product passes through max(., 0), the identity on these non-negative
  products, before the sum. Either rewrite moved a quotient near an integer to the next
  level (1/255 off on 42 of 6 million random merged values).
  """
  divisor = merged_alpha + 1e-5
  channels = []
  for channel in range(fg.shape[-1]):
    first = jnp.maximum(fg[..., channel] * a1, 0.0)
    second = jnp.maximum(f2[..., channel] * (1.0 - a1) * a2, 0.0)
    channels.append(jnp.floor((first + second) / divisor))
  return jnp.stack(channels, axis=-1)


def _merged_codes(merge, code1, code2):
  """The alpha codes of a pixel of the first and the second foreground after the merge."""
  return jnp.where(merge, _MERGED + 256 * code1 + code2, code1)


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
  """values[b, index[b, ...]] for values (B, N, ...) and an int32 index (B, ...): one
  gather from the flattened batch (vmapped indexing builds a (B, ..., 2) index array
  for each gather, which costs more than the gather on CPU)."""
  size, length = values.shape[:2]
  if size * length >= 2**31:
    return jax.vmap(lambda v, i: v[i])(values, index)
  offsets = (jnp.arange(size, dtype=jnp.int32) * length).reshape(
      (size,) + (1,) * (index.ndim - 1))
  return values.reshape((size * length,) + values.shape[2:])[index + offsets]


def _size(batch: dict[str, jax.Array], which: int) -> jax.Array:
  """(B, 1, 1) int32: entry `which` of the examples' `sizes`."""
  return batch["sizes"][:, which, None, None]


def _source_pixels(batch: dict[str, jax.Array], merge: jax.Array, grid_rows: jax.Array,
                   grid_cols: jax.Array | None) -> dict[str, jax.Array]:
  """What lies at positions of the trimap grid: OpenCV's fixed-point warp (resize, affine
  and flip) onto the source, and the alphas there.

  Args:
    batch: a `collate`d batch.
    merge: (B,) bool, whether each example merges its two foregrounds.
    grid_rows, grid_cols: (B, h, 1) and (B, 1, w) int32 positions; grid_cols None: every
      column of the canvas (the warp's column terms are then broadcast, not gathered).

  Returns:
    (B, h, w) arrays: `valid` (the warp lands on the source; elsewhere alpha 0, code 0),
    `first` and `second` (flat pixel indices into fg/alpha and fg2/alpha2), `code1` and
    `code2` (the two alphas' codes, 0 where not valid) and `code` (after the merge).
  """
  canvas_height, canvas_width = batch["warp_row_x"].shape[1], batch["warp_col_x"].shape[1]

  def at_columns(key):
    return batch[key][:, None, :] if grid_cols is None else _take(batch[key], grid_cols)

  shift = protocol.WARP_BITS
  src_x = (_take(batch["warp_row_x"], grid_rows) + at_columns("warp_col_x")) >> shift
  src_y = (_take(batch["warp_row_y"], grid_rows) + at_columns("warp_col_y")) >> shift
  valid = ((src_x >= 0) & (src_x < _size(batch, 3)) & (src_y >= 0)
           & (src_y < _size(batch, 2)))
  source_rows = _take(batch["to_source_rows"], jnp.clip(src_y, 0, canvas_height - 1))
  source_cols = _take(batch["to_source_cols"], jnp.clip(src_x, 0, canvas_width - 1))
  first = source_rows * _size(batch, 1) + source_cols
  second = (_take(batch["second_rows"], source_rows) * _size(batch, 9)
            + _take(batch["second_cols"], source_cols))
  code1 = jnp.where(valid, _take(batch["alpha"], first), 0).astype(jnp.int32)
  code2 = jnp.where(valid, _take(batch["alpha2"], second), 0).astype(jnp.int32)
  return {"valid": valid, "first": first, "second": second, "code1": code1,
          "code2": code2, "code": _merged_codes(merge[:, None, None], code1, code2)}


def _bands_down_to(batch: dict[str, jax.Array], which: int, row_band: int) -> jax.Array:
  """How many bands of row_band rows cover the batch's largest height `sizes[which]`."""
  return -(-jnp.max(batch["sizes"][:, which]) // row_band)


def _merges(batch: dict[str, jax.Array], row_band: int | None = None) -> jax.Array:
  """(B,) bool: the merge happens where drawn and some merged alpha of the source is
  below 1 (the second alpha resized to the first's size). row_band: as `_grid_codes`;
  the search in bands stops at the first band that has such a pixel."""
  drawn = batch["flags"][:, 0] > 0
  size = batch["alpha"].shape[0]
  canvas_height = batch["second_rows"].shape[1]
  cols = jnp.arange(batch["second_cols"].shape[1], dtype=jnp.int32)[None, None, :]

  def below_one_in(first_row, num_rows):
    rows = first_row + jnp.arange(num_rows, dtype=jnp.int32)[None, :, None]
    in_source = (rows < _size(batch, 0)) & (cols < _size(batch, 1))
    flat = rows * _size(batch, 1) + cols
    alpha1 = _take(batch["alpha"], jnp.broadcast_to(flat, (size,) + flat.shape[1:]))
    second_rows = jax.lax.dynamic_slice_in_dim(batch["second_rows"], first_row, num_rows,
                                               axis=1)
    alpha2 = _take(batch["alpha2"], second_rows[:, :, None] * _size(batch, 9)
                   + batch["second_cols"][:, None, :])
    below_one = ~_definite(_merged_codes(True, alpha1.astype(jnp.int32),
                                         alpha2.astype(jnp.int32)))[0]
    return jnp.any(in_source & below_one, axis=(1, 2))

  def search():
    if row_band is None:
      return below_one_in(0, canvas_height)
    num_bands = _bands_down_to(batch, 0, row_band)
    _, found = jax.lax.while_loop(
        lambda state: (state[0] < num_bands) & ~jnp.all(state[1]),
        lambda state: (state[0] + 1, state[1] | below_one_in(state[0] * row_band, row_band)),
        (jnp.int32(0), ~drawn))
    return found

  return drawn & jax.lax.cond(jnp.any(drawn), search, lambda: jnp.zeros_like(drawn))


def _grid_codes(batch: dict[str, jax.Array], row_band: int | None = None
                ) -> dict[str, jax.Array]:
  """Steps 1-4 of a batch: whether each example merges, and the pixels of its trimap
  grid that erode the definite foreground and background, (B, H, W / 32) packed
  (`_hits`' input).

  row_band: None warps and packs the whole canvas in one pass; a number of rows (a
  divisor of the canvas height) does it that many rows at a time, and only as far down
  as the batch's tallest trimap grid (below it nothing erodes): one example on a canvas
  sized for the batch's largest then costs what its own rows do.
  """
  merge = _merges(batch, row_band)
  canvas_height, canvas_width = batch["warp_row_x"].shape[1], batch["warp_col_x"].shape[1]
  cols = jnp.arange(canvas_width, dtype=jnp.int32)[None, None, :]
  size = batch["sizes"].shape[0]

  def packed(first_row, num_rows):  # 2-4. Resize, affine and flip, of num_rows rows.
    rows = jnp.broadcast_to(first_row + jnp.arange(num_rows, dtype=jnp.int32)[None, :, None],
                            (size, num_rows, 1))
    code = _source_pixels(batch, merge, rows, None)["code"]
    in_grid = (rows < _size(batch, 2)) & (cols < _size(batch, 3))
    definite_fg, definite_bg = _definite(code)
    return _pack_columns(in_grid & ~definite_fg, in_grid & ~definite_bg)

  if row_band is None:
    bad_fg, bad_bg = packed(0, canvas_height)
  else:
    def add_band(band, words):
      return tuple(jax.lax.dynamic_update_slice_in_dim(w, b, band * row_band, axis=1)
                   for w, b in zip(words, packed(band * row_band, row_band)))

    # The first band, padded with zeros, starts the canvas (zeros made apart from the
    # batch would not vary over the devices of a shard_map).
    first = tuple(jnp.pad(words, ((0, 0), (0, canvas_height - row_band), (0, 0)))
                  for words in packed(0, row_band))
    bad_fg, bad_bg = jax.lax.fori_loop(1, _bands_down_to(batch, 2, row_band), add_band,
                                       first)
  return {"merge": merge, "bad_fg": bad_fg, "bad_bg": bad_bg}


def _crop_position(ex: dict[str, jax.Array], hits_fg: jax.Array, hits_bg: jax.Array,
                   crop_size: int) -> dict[str, jax.Array]:
  """Step 5-6's decisions of one example, given its erosions (`_hits`): where the crop
  lies, and its (crop,) rows and columns of the trimap grid."""
  canvas_height, canvas_width = ex["warp_row_x"].shape[0], ex["warp_col_x"].shape[0]
  rows = jnp.arange(canvas_height, dtype=jnp.int32)
  cols = jnp.arange(canvas_width, dtype=jnp.int32)
  grid_height, grid_width = ex["sizes"][4], ex["sizes"][5]

  # 5. The trimap: unknown where both definite regions were eroded away.
  in_grid = (rows[:, None] < ex["sizes"][2]) & (cols[None, :] < ex["sizes"][3])
  unknown = _unpack_columns(hits_fg & hits_bg) & in_grid

  # 6. The crop: centred on a random interior unknown pixel of the enlarged grid, the
  # pick-th candidate in row-major order. The enlarged grid repeats rows and columns of
  # the trimap's (nearest neighbour), so a row's count of candidates weighs each trimap
  # column by its interior copies (`candidate_columns`), and only the chosen row is
  # enlarged to find the column.
  margin = crop_size // 2
  enlarged_rows, enlarged_cols = ex["enlarged_rows"], ex["enlarged_cols"]
  interior_rows = (rows >= margin) & (rows < grid_height - margin)
  per_trimap_row = jnp.sum(jnp.where(unknown, ex["candidate_columns"][None, :], 0), axis=1,
                           dtype=jnp.int32)
  per_row = jnp.where(interior_rows, per_trimap_row[enlarged_rows], 0)
  row_running = jnp.cumsum(per_row)
  num_candidates = row_running[-1]
  pick_draw, top_draw, left_draw = ex["draws"]
  pick = pick_draw % jnp.maximum(num_candidates, 1).astype(jnp.uint32)
  rank = pick.astype(jnp.int32) + 1
  chosen_row = jnp.minimum(jnp.searchsorted(row_running, rank), canvas_height - 1)
  rank_in_row = rank - (row_running[chosen_row] - per_row[chosen_row])
  in_chosen_row = (unknown[enlarged_rows[chosen_row], enlarged_cols]
                   & (cols >= margin) & (cols < grid_width - margin))
  chosen_col = jnp.searchsorted(jnp.cumsum(in_chosen_row, dtype=jnp.int32), rank_in_row)
  centred = num_candidates >= protocol.MIN_UNKNOWN_FOR_CENTRED_CROP
  top = jnp.where(centred, chosen_row - margin,
                  (top_draw % (grid_height - crop_size + 1).astype(jnp.uint32)
                   ).astype(jnp.int32))
  left = jnp.where(centred, chosen_col - margin,
                   (left_draw % (grid_width - crop_size + 1).astype(jnp.uint32)
                    ).astype(jnp.int32))
  has_unknown = jnp.any(unknown)
  steps = jnp.arange(crop_size, dtype=jnp.int32)
  return {"rows": enlarged_rows[jnp.where(has_unknown, top + steps, ex["whole_rows"])],
          "cols": enlarged_cols[jnp.where(has_unknown, left + steps, ex["whole_cols"])],
          "decisions": {"top": top, "left": left, "pick": pick, "centred": centred,
                        "has_unknown": has_unknown}}


def _crop_pixels(batch: dict[str, jax.Array], merge: jax.Array, hits_fg: jax.Array,
                 hits_bg: jax.Array, crop_rows: jax.Array, crop_cols: jax.Array,
                 value_table: jax.Array) -> dict[str, jax.Array]:
  """The crops' trimaps, alphas and (merged) foregrounds, read at their (B, crop) rows and
  columns of the trimap grid only."""
  crop_rows, crop_cols = crop_rows[:, :, None], crop_cols[:, None, :]

  def eroded_away(hits):  # the packed bits at the crop's pixels
    words = hits.reshape(hits.shape[0], -1)
    word = _take(words, crop_rows * hits.shape[2] + crop_cols // _WORD_BITS)
    return ((word >> (crop_cols % _WORD_BITS).astype(jnp.uint32)) & 1).astype(bool)

  trimap = jnp.where(eroded_away(hits_bg),
                     jnp.where(eroded_away(hits_fg), jnp.uint8(128), jnp.uint8(255)),
                     jnp.uint8(0))
  pixels = _source_pixels(batch, merge, crop_rows, crop_cols)
  valid = pixels["valid"][..., None]
  fg = jnp.where(valid, _take(batch["fg"], pixels["first"]), 0).astype(jnp.float32)
  f2 = jnp.where(valid, _take(batch["fg2"], pixels["second"]), 0).astype(jnp.float32)
  merged_alpha = value_table[_merged_codes(True, pixels["code1"], pixels["code2"])]
  fg = jnp.where(merge[:, None, None, None],
                 _merged_foreground(fg, f2, value_table[pixels["code1"]],
                                    value_table[pixels["code2"]], merged_alpha), fg)
  return {"fg": fg, "alpha": value_table[pixels["code"]], "trimap": trimap[..., None]}


def _background_one(ex: dict[str, jax.Array], decisions: dict[str, jax.Array],
                    value_table: jax.Array, crop_size: int, window: int | None,
                    backgrounds: jax.Array, index: jax.Array) -> jax.Array:
  """Step 7's background of one example: a crop of the enlarged background, or (where
  nothing is unknown) all of it resized to the crop; (crop, crop, 3) float32 in [0, 1].

  `backgrounds`: (N, H, W, 3), the example's at `index` (read where needed, not copied
  whole first). `window`: None, or a side that holds every tap of the crop (only where
  every example crops): the taps then read a window of the background instead of whole
  rows.
  """
  has_unknown, top, left = (decisions["has_unknown"], decisions["top"], decisions["left"])
  scales = ex["bg_scales"]
  scale_y = jnp.where(has_unknown, scales[0], scales[2])
  scale_x = jnp.where(has_unknown, scales[1], scales[3])
  offset_y = jnp.where(has_unknown, top, 0).astype(jnp.float32)
  offset_x = jnp.where(has_unknown, left, 0).astype(jnp.float32)
  tap_rows, row_weights = _cubic_taps(crop_size, offset_y, scale_y, ex["sizes"][6])
  tap_cols, col_weights = _cubic_taps(crop_size, offset_x, scale_x, ex["sizes"][7])
  if window is None:
    background = jax.lax.dynamic_index_in_dim(backgrounds, index, keepdims=False)
  else:
    # Taps increase with the output index; the slice's start is moved back where the
    # window would leave the canvas, and the taps are read relative to it.
    sides = tuple(min(window, side) for side in backgrounds.shape[1:3])
    start_row = jnp.minimum(tap_rows[0, 0], backgrounds.shape[1] - sides[0])
    start_col = jnp.minimum(tap_cols[0, 0], backgrounds.shape[2] - sides[1])
    background = jax.lax.dynamic_slice(backgrounds, (index, start_row, start_col, 0),
                                       (1,) + sides + backgrounds.shape[3:])[0]
    tap_rows, tap_cols = tap_rows - start_row, tap_cols - start_col
  # Each pass sums its four taps' terms in the taps' order, in one loop over its output
  # (a product with the gathered taps would first write them all, 4x the output).
  by_rows = sum(row_weights[:, t, None, None] * background[tap_rows[:, t]].astype(jnp.float32)
                for t in range(4))
  bg = sum(col_weights[None, :, t, None] * by_rows[:, tap_cols[:, t]] for t in range(4))
  # 8-bit values: divided by 255 through the table (XLA turns x / 255 into x * (1 / 255),
  # which is not always the reference's correctly rounded quotient).
  return value_table[jnp.clip(jnp.round(bg), 0.0, 255.0).astype(jnp.int32)]


def _finish_one(ex: dict[str, jax.Array], crop: dict[str, jax.Array], bg: jax.Array,
                value_table: jax.Array, every_jitters: bool) -> dict[str, jax.Array]:
  """Steps 7-8 of one example: the HSV jitter (not of a crop without foreground) and the
  composite. `every_jitters`: known to jitter (the unjittered values are not computed)."""
  fg, alpha_crop = crop["fg"], crop["alpha"]
  scales = ex["bg_scales"]
  jitter = jnp.any(alpha_crop != 0.0)
  jittered = jnp.clip(_hsv_jitter(fg, alpha_crop, ex["flags"][1], scales[4], scales[5]),
                      0.0, 255.0) / 255.0
  fg = jittered if every_jitters else jnp.where(jitter, jittered,
                                                value_table[fg.astype(jnp.int32)])
  alpha_crop = jnp.clip(alpha_crop, 0.0, 1.0)[..., None]
  return {"image": fg * alpha_crop + bg * (1.0 - alpha_crop), "fg": fg, "bg": bg,
          "alpha": alpha_crop, "trimap": crop["trimap"],
          "decisions": dict(crop["decisions"], jitter=jitter)}


def _compose_examples(batch, crop_size, per_example=None):
  """`compose_batch`'s computation, batch-wide or one example at a time (`lax.map`).

  per_example: None picks by platform: one at a time on the CPU, where the batch-wide
  form's temporaries (~720 MB for 16 examples on a 1536 canvas, ~70 MB for one) cost more
  in fresh memory than the work itself; batch-wide elsewhere.
  """
  together = functools.partial(_compose_together, crop_size=crop_size)

  def one_by_one(batch):
    backgrounds = batch["background"]
    examples = {k: v[:, None] for k, v in batch.items() if k != "background"}
    row_band = math.gcd(batch["warp_row_x"].shape[1], _ROW_BAND)
    composited = jax.lax.map(
        lambda example: together(example[0], row_band=row_band, backgrounds=backgrounds,
                                 first=example[1]),
        (examples, jnp.arange(backgrounds.shape[0], dtype=jnp.int32)))
    return jax.tree.map(lambda x: x[:, 0], composited)

  if per_example is None:
    return jax.lax.platform_dependent(batch, cpu=one_by_one, default=together)
  return one_by_one(batch) if per_example else together(batch)


def _compose_together(batch, crop_size, row_band=None, backgrounds=None, first=0):
  """The batch's examples, all at once; their backgrounds are `backgrounds[first:]`
  (default: the batch's own)."""
  # The table is a constant of the compiled executor, not an argument sent every batch.
  value_table = jnp.asarray(_alpha_values())
  if backgrounds is None:
    backgrounds = batch["background"]
  indices = first + jnp.arange(batch["sizes"].shape[0], dtype=jnp.int32)
  grid = _grid_codes(batch, row_band)
  columns = batch["kernel_columns"]
  # Both erosions in one loop over the examples. The barriers keep XLA from fusing the
  # packing into each of the erosion's 58 reads of its levels (it would repeat it).
  hits = jax.lax.optimization_barrier(_hits(
      jax.lax.optimization_barrier(jnp.concatenate([grid["bad_fg"], grid["bad_bg"]])),
      jnp.concatenate([columns[:, 0], columns[:, 2]]),
      jnp.concatenate([columns[:, 1], columns[:, 3]])))
  hits_fg, hits_bg = jnp.split(hits, 2)
  position = jax.vmap(lambda ex, fg, bg: _crop_position(ex, fg, bg, crop_size)
                      )(batch, hits_fg, hits_bg)
  crops = _crop_pixels(batch, grid["merge"], hits_fg, hits_bg, position["rows"],
                       position["cols"], value_table)
  crops["decisions"] = dict(position["decisions"], merge=grid["merge"])

  def composited_backgrounds(window):
    return jax.vmap(
        lambda ex, d, i: _background_one(ex, d, value_table, crop_size, window,
                                         backgrounds, i)
    )(batch, crops["decisions"], indices)

  # Where every example crops (nearly always), the taps of a crop of the enlarged
  # background (never shrunk) span at most crop + 5 rows and columns.
  bg = jax.lax.cond(jnp.all(crops["decisions"]["has_unknown"]),
                    lambda: composited_backgrounds(crop_size + 8),
                    lambda: composited_backgrounds(None))

  def finished(every_jitters):
    return jax.vmap(lambda ex, crop, b: _finish_one(ex, crop, b, value_table, every_jitters)
                    )(batch, crops, bg)

  # Nearly every crop has foreground, and jitters.
  return jax.lax.cond(jnp.all(jnp.any(crops["alpha"] != 0.0, axis=(1, 2))),
                      lambda: finished(True), lambda: finished(False))


_compose = jax.jit(_compose_examples, static_argnames=("crop_size", "per_example"))


@functools.lru_cache(maxsize=None)
def _split_compose(sharding: jax.sharding.NamedSharding, crop_size: int):
  return jax.jit(jax.shard_map(functools.partial(_compose_examples, crop_size=crop_size),
                               mesh=sharding.mesh, in_specs=sharding.spec,
                               out_specs=sharding.spec))


def compose_batch(batch: dict[str, Any], crop_size: int,
                  sharding: jax.sharding.NamedSharding | None = None) -> dict[str, Any]:
  """Composites a `collate`d batch where it lies (host arrays: on the default device).

  `sharding`: how the batch lies split along its first axis over several devices (as
  `JaxStream.batches` puts it); each device then composites its own examples. (Left to
  XLA's partitioner, the loop over the examples and the batch-wide background choice
  would gather every example onto every device.)

  Returns:
    `image`, `fg`, `bg` float32 (B, crop, crop, 3) in [0, 1]; `alpha` float32
    (B, crop, crop, 1); `trimap` uint8 (B, crop, crop, 1) in {0, 128, 255}; and
    `decisions`, the data-dependent ones (merge, crop corner, ...) per example.
  """
  if sharding is None or len(sharding.device_set) == 1:
    return _compose(batch, crop_size)
  return _split_compose(sharding, crop_size)(batch)
