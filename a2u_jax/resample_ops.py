"""Functional 2x resampling ops of the resampler family (NHWC, jit/vmap/grad-safe).

The kernel-based operators (CARAFE, FADE, SAPA, A2U) reassemble with
`a2u_jax.ops.reassemble_up`; this module holds what they and the simpler operators need
besides: nearest/bilinear 2x, space-to-depth, max pooling with indices and unpooling,
IndexNet's index-guided pooling, SAPA's local query-key similarity and DySample's
point sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from a2u_jax.ops import pixel_shuffle


def nearest_up(x: jax.Array) -> jax.Array:
  """(N, h, w, C) -> (N, 2h, 2w, C), every pixel repeated 2 x 2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def bilinear_up(x: jax.Array) -> jax.Array:
  """(N, h, w, C) -> (N, 2h, 2w, C), bilinear with half-pixel centres and clamped borders
  (PyTorch's `interpolate(..., mode="bilinear", align_corners=False)`)."""
  n, h, w, c = x.shape
  return jax.image.resize(x, (n, 2 * h, 2 * w, c), "linear").astype(x.dtype)


def space_to_depth(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H/2, W/2, 4C), the inverse of `ops.pixel_shuffle(., 2)`:
  channel c*4 + i*2 + j holds pixel (2y+i, 2x+j) of channel c (PyTorch's pixel_unshuffle)."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, 4 * c)


def _windows(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H/2, W/2, C, 4): the 2 x 2 windows, position i*2 + j last."""
  return space_to_depth(x).reshape(x.shape[0], x.shape[1] // 2, x.shape[2] // 2, -1, 4)


def max_pool_with_indices(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2 x 2 max pooling, stride 2, and where each maximum was.

  Returns (pooled (N, H/2, W/2, C), indices int32 (N, H/2, W/2, C)) with index i*2 + j for
  window position (i, j); ties go to the first position in row-major order, as PyTorch's
  `max_pool2d(return_indices=True)`. The gradient flows to the chosen position only.
  """
  windows = _windows(x)
  indices = jnp.argmax(windows, axis=-1).astype(jnp.int32)
  pooled = jnp.take_along_axis(windows, indices[..., None], axis=-1)[..., 0]
  return pooled, indices


def max_unpool(x: jax.Array, indices: jax.Array) -> jax.Array:
  """Places each value at its 2 x 2 window position `indices` (from
  `max_pool_with_indices`), zeros elsewhere: (N, h, w, C) -> (N, 2h, 2w, C)."""
  positions = jnp.arange(4, dtype=indices.dtype)
  spread = jnp.where(indices[..., None] == positions, x[..., None], jnp.zeros((), x.dtype))
  return pixel_shuffle(spread.reshape(x.shape[:3] + (-1,)), 2)


def index_pool(x: jax.Array, encoder_index: jax.Array) -> jax.Array:
  """IndexNet's index-guided pooling: 4 * avg_pool_2x2(encoder_index * x), i.e. the sum of
  each 2 x 2 window weighted by the index map (N, H, W, 1 or C)."""
  return jnp.sum(_windows(encoder_index * x), axis=-1)


def local_similarity(query: jax.Array, key: jax.Array, kernel_size: int) -> jax.Array:
  """SAPA's similarity of each high-resolution query with the K x K low-resolution keys
  around it, in `ops.reassemble_up`'s tap layout.

    out[n, Y, X, ky*K + kx] = <query[n, Y, X], key[n, Y//2 + ky - r, X//2 + kx - r]>,
    r = (K-1)//2; keys outside the map count as zero vectors, so their logit is 0 (not -inf:
    they still take part in the softmax, as in SAPA's CUDA kernel).

  query (N, 2h, 2w, E), key (N, h, w, E) -> (N, 2h, 2w, K*K).
  """
  n, h2, w2, e = query.shape
  h, w = key.shape[1:3]
  r = (kernel_size - 1) // 2
  padded = jnp.pad(key, ((0, 0), (r, r), (r, r), (0, 0)))
  # (N, h, 2, w, 2, E): the four queries that share a low-resolution centre.
  quads = query.reshape(n, h, 2, w, 2, e)
  taps = []
  for ky in range(kernel_size):
    for kx in range(kernel_size):
      window = padded[:, ky:ky + h, kx:kx + w]
      taps.append(jnp.einsum("nyixje,nyxe->nyixj", quads, window))
  return jnp.stack(taps, axis=-1).reshape(n, h2, w2, kernel_size * kernel_size)


def dysample_positions(offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sampling positions (in input pixel-index units) of DySample from its offsets.

  offsets (N, 2h, 2w, 2, G): x and y offsets per output pixel and group, in input pixels,
  relative to the centre of the input pixel the output pixel lies in. Returns (ix, iy),
  each (N, 2h, 2w, G): output (Y, X) samples at (X//2 + offset_x, Y//2 + offset_y).
  """
  n, h2, w2 = offsets.shape[:3]
  base_x = (jnp.arange(w2) // 2).astype(offsets.dtype)[None, None, :, None]
  base_y = (jnp.arange(h2) // 2).astype(offsets.dtype)[None, :, None, None]
  return base_x + offsets[..., 0, :], base_y + offsets[..., 1, :]


def bilinear_weights(ix: jax.Array, iy: jax.Array, h: int, w: int) -> jax.Array:
  """The four bilinear weights `bilinear_sample_border` gives each sample, (..., G * 4)
  (top-left, top-right, bottom-left, bottom-right per group), for positions ix, iy
  (..., G) on an h x w map. A sample on a pixel centre has weights (1, 0, 0, 0); one
  half-way between four centres has 1/4 each."""
  ix, iy = jnp.clip(ix, 0, w - 1), jnp.clip(iy, 0, h - 1)
  wx, wy = ix - jnp.floor(ix), iy - jnp.floor(iy)
  weights = jnp.stack([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy], axis=-1)
  return weights.reshape(weights.shape[:-2] + (-1,))


def bilinear_sample_border(x: jax.Array, ix: jax.Array, iy: jax.Array) -> jax.Array:
  """Bilinear sampling with border padding, per channel group (DySample's
  `grid_sample(..., mode="bilinear", padding_mode="border", align_corners=False)`).

  x (N, h, w, C); ix, iy (N, H, W, G) positions in pixel-index units (pixel i's centre at
  i), clamped to the image. Group g reads channels g*C/G ... (g+1)*C/G - 1.
  Returns (N, H, W, C).
  """
  n, h, w, c = x.shape
  groups = ix.shape[-1]
  out_h, out_w = ix.shape[1:3]
  ix = jnp.clip(ix, 0, w - 1)
  iy = jnp.clip(iy, 0, h - 1)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  wx, wy = ix - x0, iy - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, w - 1), jnp.minimum(y0 + 1, h - 1)
  flat = x.reshape(n, h * w, groups, c // groups)

  def read(yy, xx):
    index = (yy * w + xx).reshape(n, out_h * out_w, groups, 1)
    return jnp.take_along_axis(flat, index, axis=1)

  wx = wx.reshape(n, out_h * out_w, groups, 1).astype(x.dtype)
  wy = wy.reshape(n, out_h * out_w, groups, 1).astype(x.dtype)
  top = read(y0, x0) * (1 - wx) + read(y0, x1) * wx
  bottom = read(y1, x0) * (1 - wx) + read(y1, x1) * wx
  return (top * (1 - wy) + bottom * wy).reshape(n, out_h, out_w, c)
