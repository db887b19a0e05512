"""Reassembly ("gather") primitives of A2U: functional, NHWC, jit/vmap/pmap-safe.

Both ops compute, for every output pixel, a weighted sum of a K x K neighbourhood of the
input with a per-pixel kernel (docs/design.md §2.2):

* ``reassemble_up``  (odd K, 2x upsampling)::

    out[n, Y, X, c] = sum_{ky, kx} f[n, Y//2 + ky - (K-1)//2, X//2 + kx - (K-1)//2, c]
                                   * m[n, Y, X, g(c)*K*K + ky*K + kx]

* ``reassemble_down`` (even K, 2x downsampling)::

    out[n, y, x, c] = sum_{ky, kx} f[n, 2y + ky - (K-2)//2, 2x + kx - (K-2)//2, c]
                                   * m[n, y, x, g(c)*K*K + ky*K + kx]

Out-of-range taps contribute zero; ``g(c) = c // (C / groups)``; kernels are used as given
(they need not sum to one).

Three implementations compute the same thing:

* ``"slices"``: one shifted (strided, for down) slice of the zero-padded input per tap,
  multiplied by the kernel channel and summed. XLA fuses the K*K terms into a single loop,
  so nothing K*K times larger than the output exists. The default on every backend: it is
  the fastest on CPU (``benchmarks/reassembly.py``); GPU and TPU are not measured yet.
* ``"gather"``: the same formulas with every window read by ``jax.lax.gather`` at
  precomputed source coordinates (the kernel cotangent's unit-stride windows are slices
  under both).
* ``"pallas"``: Pallas kernels of the same three computations (`a2u_jax.pallas_reassembly`):
  Triton when lowered for a GPU (lowered on the CPU in tests/test_lowering.py; not yet run
  on one), refused for TPUs, Pallas' interpret mode elsewhere: exact but slow (it is how
  the CPU tests check the kernels).

Each op is bilinear in (features, kernels). Its VJP is a custom rule that keeps only the
two inputs as residuals (plain autodiff would keep every tap). The feature cotangent is a
transposed reassembly (a fused sum of shifted windows of the cotangent times the kernels);
the kernel cotangent contracts the cotangent with shifted feature windows over channels,
as matrix products of tiles of output columns (see `tile_products`), on the CPU in bands
of output rows (see `_in_row_bands`).

Inputs may be float16, bfloat16, float32 or float64; low-precision inputs are accumulated
in float32 and the result is cast back to the inputs' common dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from a2u_jax import pallas_reassembly

# Named scopes (`jax.named_scope`) of the A2U computations, so that profiles attribute
# their XLA operations (benchmarks/profile_step.py): the names appear in every HLO op's
# metadata, in the forward and in the gradient.
POOLING_SCOPE = "a2u_generator_pooling"
ENCODING_SCOPE = "a2u_per_sample_encoding"
REASSEMBLY_FORWARD_SCOPE = "a2u_reassembly_forward"
KERNEL_COTANGENT_SCOPE = "a2u_kernel_cotangent"
FEATURE_COTANGENT_SCOPE = "a2u_feature_cotangent"

Implementation = Literal["slices", "gather", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("slices", "gather", "pallas")
DEFAULT_IMPLEMENTATION: str = "slices"


# --------------------------------------------------------------------------- validation


def _check_floating(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must have a floating dtype (float16, bfloat16, float32 or "
                     f"float64), got {x.dtype}.")


def _check_common(op: str, features: jax.Array, kernels: jax.Array, kernel_size: int,
                  groups: int, implementation: str) -> None:
  for name, x in (("features", features), ("kernels", kernels)):
    if x.ndim != 4:
      raise ValueError(f"{op}: `{name}` must be a rank-4 NHWC array, got shape {x.shape}.")
    _check_floating(f"{op}: {name}", x)
  if not isinstance(kernel_size, (int, np.integer)) or kernel_size < 1:
    raise ValueError(f"{op}: `kernel_size` must be a positive int, got {kernel_size!r}.")
  if not isinstance(groups, (int, np.integer)) or groups < 1:
    raise ValueError(f"{op}: `groups` must be a positive int, got {groups!r}.")
  if 0 in features.shape[1:]:
    raise ValueError(f"{op}: `features` must have a non-zero height, width and channel "
                     f"count, got shape {features.shape}.")
  if features.shape[-1] % groups:
    raise ValueError(f"{op}: the channel count of `features` ({features.shape[-1]}) must be "
                     f"divisible by `groups` ({groups}).")
  expected = kernel_size * kernel_size * groups
  if kernels.shape[-1] != expected:
    raise ValueError(f"{op}: `kernels` must have kernel_size**2 * groups = "
                     f"{kernel_size}**2 * {groups} = {expected} channels, got "
                     f"{kernels.shape[-1]} (shape {kernels.shape}).")
  if kernels.shape[0] != features.shape[0]:
    raise ValueError(f"{op}: `kernels` batch size {kernels.shape[0]} != `features` batch "
                     f"size {features.shape[0]}.")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: `implementation` must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}.")
  if implementation == "pallas" and jax.default_backend() == "tpu":
    raise ValueError(f"{op}: {pallas_reassembly.TPU_REFUSAL}.")


def _compute_dtype(features: jax.Array, kernels: jax.Array) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(features, kernels), jnp.float32)


# ---------------------------------------------------------------------- window readers
#
# All formulas below are written against one primitive, ``read(x, start, step, size,
# axis)``: the (size[0], size[1]) window of x's axes (axis, axis + 1) that begins at
# `start` and advances by `step` pixels. The two implementations differ only in how that
# window is read.

Reader = Callable[..., jax.Array]


def _read_slice(x: jax.Array, start: tuple[int, int], step: int, size: tuple[int, int],
                axis: int = 1) -> jax.Array:
  starts, limits, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
  for i in range(2):
    starts[axis + i] = start[i]
    limits[axis + i] = start[i] + step * (size[i] - 1) + 1
    strides[axis + i] = step
  return lax.slice(x, starts, limits, strides)


def _read_gather(x: jax.Array, start: tuple[int, int], step: int, size: tuple[int, int],
                 axis: int = 1) -> jax.Array:
  rows = start[0] + step * np.arange(size[0])
  cols = start[1] + step * np.arange(size[1])
  grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).astype(np.int32)
  # The index grid's two dims land at (axis, axis + 1); every other dim is kept whole.
  offset_dims = tuple(range(axis)) + tuple(range(axis + 2, x.ndim))
  slice_sizes = tuple(1 if d in (axis, axis + 1) else x.shape[d] for d in range(x.ndim))
  dnums = lax.GatherDimensionNumbers(offset_dims=offset_dims,
                                     collapsed_slice_dims=(axis, axis + 1),
                                     start_index_map=(axis, axis + 1))
  return lax.gather(x, jnp.asarray(grid), dnums, slice_sizes=slice_sizes,
                    indices_are_sorted=True, unique_indices=True,
                    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


_READERS: dict[str, Reader] = {"slices": _read_slice, "gather": _read_gather}


def _pad_hw(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 3))


def _sum(terms) -> jax.Array:
  total = None
  for term in terms:
    total = term if total is None else total + term
  return total


def _taps(k: int):
  return [(ky, kx, ky * k + kx) for ky in range(k) for kx in range(k)]


# ------------------------------------------------------------------------- formulas
#
# Grouped views throughout: features/outputs/cotangents (N, ., ., G, C/G), kernels
# (N, ., ., G, K*K) with tap t = ky*K + kx.  The output and the feature cotangent are
# sums over taps of windows of zero-padded inputs, which XLA fuses into one loop each: no
# intermediate is larger than the op's own inputs and outputs.
#
# The kernel cotangent is, per output pixel and tap, a dot product over channels of a
# shifted feature window with the cotangent. XLA:CPU reduces over the minor (channel) axis
# one element at a time, and runs per-pixel batched products (taps x channels by channels)
# at well under 1 GFLOP/s, so `tile_products` computes it as matrix products of output
# tiles: every window position that a tile's taps read, by the tile's cotangents, of
# which the products of a pixel with its own taps' positions are kept. That computes
# (tile + K - 1) / K times the useful products per tiled axis, at matrix-product speed;
# the products are fusion boundaries, so the cotangent is computed once however many taps
# read it (XLA:CPU otherwise fuses its producer into every tap's reduction).

# Output columns per tile. Up tiles are one row (its four output phases already share the
# windows: 32 cotangents per product); down tiles are DOWN_ROW_TILE rows, for as many
# cotangents per product (one-row tiles were 1.3x slower, two-row 1.1x, on 2 CPU cores at
# 512x512 -> 256x256, 64 channels).
TILE = 8
DOWN_ROW_TILE = 4


def phase_split(x: jax.Array, stride: int) -> tuple[jax.Array, int, int]:
  """(N, H, W, ...) -> ((N, s*U, s*V, ...), U, V) with U = ceil(H/s), V = ceil(W/s).

  Row s*u + a of x (zero-padded at the end to s*U rows) moves to row a*U + u, columns
  likewise, so a stride-s window starting at row r is the unit-stride window starting at
  row (r % s)*U + r // s.
  """
  n, h, w = x.shape[:3]
  u, v = -(-h // stride), -(-w // stride)
  rest = x.shape[3:]
  x = jnp.pad(x, ((0, 0), (0, stride * u - h), (0, stride * v - w)) + ((0, 0),) * len(rest))
  x = x.reshape((n, u, stride, v, stride) + rest)
  x = jnp.transpose(x, (0, 2, 1, 4, 3) + tuple(range(5, 5 + len(rest))))
  return x.reshape((n, stride * u, stride * v) + rest), u, v


def tap_row_products(rows: jax.Array, ct: jax.Array, spec: str, row_starts: list[int],
                     col_starts: list[int], size: tuple[int, int]) -> jax.Array:
  """einsum(spec, stacked windows of one tap row, ct) for every tap row: (..., ky, kx).

  Tap (ky, kx) reads the unit-stride `size` window of `rows` (N, R, C', ...) at
  (row_starts[ky], col_starts[kx]); the row's windows are stacked on a new axis before
  the last of `rows` (N, h, w, ..., kx, C), and spec must put kx last in its output.
  """
  def row(_, start):
    band = lax.dynamic_slice_in_dim(rows, start, size[0], axis=1)
    windows = jnp.stack([_read_slice(band, (0, c), 1, size) for c in col_starts], axis=-2)
    return None, jnp.einsum(spec, windows, ct, precision=lax.Precision.HIGHEST)

  _, grads = lax.scan(row, None, jnp.asarray(row_starts, jnp.int32))
  return jnp.moveaxis(grads, 0, -2)


def _runs(starts: list[int]) -> list[tuple[int, int]]:
  """Sorted distinct `starts` as runs of consecutive values: [(first, length)]."""
  runs: list[tuple[int, int]] = []
  for value in sorted(set(starts)):
    if runs and sum(runs[-1]) == value:
      runs[-1] = (runs[-1][0], runs[-1][1] + 1)
    else:
      runs.append((value, 1))
  return runs


def _tile_windows(x: jax.Array, first: int, length: int, tile: int, tiles: int,
                  axis: int) -> jax.Array:
  """Splits `axis` into (tiles, tile + length - 1): tile q's positions q*tile + first + v,
  built from tile-wide reshapes of shifted slices (no gather)."""
  span, parts = tile + length - 1, []
  for v in range(0, span, tile):
    part = lax.slice_in_dim(x, first + v, first + v + tiles * tile, axis=axis)
    part = part.reshape(part.shape[:axis] + (tiles, tile) + part.shape[axis + 1:])
    parts.append(lax.slice_in_dim(part, 0, min(tile, span - v), axis=axis + 1))
  return jnp.concatenate(parts, axis=axis + 1)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, max(0, size - x.shape[axis]))
  return jnp.pad(x, pads)


def tile_products(rows: jax.Array, ct: jax.Array, row_starts: list[int],
                  col_starts: list[int], row_tile: int = 1) -> jax.Array:
  """out[n, y, i, x, j, g, ky, kx] = sum_c rows[n, row_starts[ky] + y, col_starts[kx] + x,
  g, c] * ct[n, y, i, x, j, g, c].

  rows (N, R, C', G, Cg) holds every tap's (h, w) unit-stride window; ct (N, h, P, w, Q,
  G, Cg) with P x Q output phases that read the same windows -> (N, h, P, w, Q, G, K, K).
  Output tiles are `row_tile` rows by TILE columns; one matrix product per tile and run
  of consecutive row starts.
  """
  n, h, p, w, q, g, c = ct.shape
  col_runs = _runs(col_starts)
  col_offsets = [first + v for first, length in col_runs for v in range(TILE + length - 1)]
  row_tiles, col_tiles = -(-h // row_tile), -(-w // TILE)
  # Whole tiles, and room for the last shifted slice of `_tile_windows`.
  rows = _pad_to(rows, 1, (row_tiles + 1) * row_tile + max(row_starts))
  rows = _pad_to(rows, 2, (col_tiles + 1) * TILE + max(col_starts))
  ct = _pad_to(_pad_to(ct, 1, row_tiles * row_tile), 3, col_tiles * TILE)
  ct = ct.reshape(n, row_tiles, row_tile, p, col_tiles, TILE, q, g, c)
  columns = jnp.concatenate([_tile_windows(rows, first, length, TILE, col_tiles, 2)
                             for first, length in col_runs], axis=3)
  parts, order = [], []
  for first, length in _runs(row_starts):
    # (N, row tiles, row_tile + length - 1, col tiles, U, G, Cg)
    windows = _tile_windows(columns, first, length, row_tile, row_tiles, 1)
    # Batch, window and cotangent axes in the matrix product's own order: any other
    # order costs a transposed copy of the products.
    prod = jnp.einsum("nYuqvgc,nYriqxjgc->nYqguvrixj", windows, ct,
                      precision=lax.Precision.HIGHEST)
    taps = [ky for ky in range(len(row_starts)) if first <= row_starts[ky] < first + length]
    shape = (windows.shape[2], len(col_offsets), row_tile, p, TILE, q)
    # The product of output pixel (r, i, x, j) with the window of its tap (ky, kx).
    pick = np.array([[[[[[np.ravel_multi_index(
        (row_starts[ky] - first + r, col_offsets.index(s + x), r, i, x, j), shape)
        for s in col_starts] for ky in taps] for j in range(q)] for i in range(p)]
        for x in range(TILE)] for r in range(row_tile)])
    prod = prod.reshape(prod.shape[:4] + (-1,))
    parts.append(jnp.take(prod, jnp.asarray(pick.reshape(-1), jnp.int32), axis=-1)
                 .reshape(prod.shape[:4] + pick.shape))
    order += taps
  out = jnp.concatenate(parts, axis=-2)       # (N, Y, q, G, r, x, i, j, taps, K)
  out = jnp.take(out, jnp.asarray(np.argsort(order), jnp.int32), axis=-2)
  out = jnp.transpose(out, (0, 1, 4, 6, 2, 5, 7, 3, 8, 9))
  out = out.reshape(n, row_tiles * row_tile, p, col_tiles * TILE, q, g, len(row_starts),
                    len(col_starts))
  return out[:, :h, :, :w]


def _row_band(x: jax.Array, first, size: int) -> jax.Array:
  """Rows first .. first + size - 1 of x (N, H, ...), zero where outside 0 .. H - 1."""
  index = first + jnp.arange(size)
  inside = (index >= 0) & (index < x.shape[1])
  band = jnp.take(x, jnp.clip(index, 0, x.shape[1] - 1), axis=1)
  return jnp.where(inside.reshape((1, size) + (1,) * (x.ndim - 2)), band, 0)


# Where `_in_row_bands` works in bands, and the cotangent bytes per band (2 MiB bands
# were 1.8x slower than 1 MiB on 2 CPU cores at 512x512 -> 256x256; smaller ones about
# equal). On accelerators the loop's launches would cost more than the temporaries.
BANDED_PLATFORMS: tuple[str, ...] = ("cpu",)
BAND_BYTES = 1 << 20


def _in_row_bands(band_grad: Callable, f: jax.Array, ct: jax.Array, *, stride: int,
                  offset: int, reach: int) -> jax.Array:
  """band_grad(f rows, ct rows) over bands of output rows: (N, h, ...) like ct.

  ct (N, h, ...) by output rows; output row y reads rows stride*y + offset .. stride*y +
  offset + reach - 1 of f (N, H, W, ...), zero outside f; band_grad gets them with -offset
  zero columns on either side (f padded as its rows are). On the CPU the rows go in bands
  of about BAND_BYTES of cotangent, one example and band at a time (`lax.map`): the
  products' temporaries then stay in cache, and whole-array temporaries cost more there
  than the products themselves (4x at 512x512 -> 256x256). On other platforms
  (BANDED_PLATFORMS) it is one call on all rows.
  """
  n, h = ct.shape[:2]

  def padded_rows(x, first, size):
    columns = [(0, 0)] * x.ndim
    columns[2] = (-offset, -offset)
    return jnp.pad(_row_band(x, first, size), columns)

  def whole():
    return band_grad(padded_rows(f, offset, stride * (h - 1) + reach), ct)

  def banded():
    row_bytes = np.prod(ct.shape[2:]) * ct.dtype.itemsize
    bands = -(-h // max(1, min(h, BAND_BYTES // row_bytes)))
    band = -(-h // bands)

    def one(index):
      example, first = index // bands, (index % bands) * band
      f_rows = padded_rows(lax.dynamic_index_in_dim(f, example), stride * first + offset,
                           stride * (band - 1) + reach)
      ct_rows = _row_band(lax.dynamic_index_in_dim(ct, example), first, band)
      return band_grad(f_rows, ct_rows)[0]

    out = lax.map(one, jnp.arange(n * bands))
    return out.reshape((n, bands * band) + out.shape[2:])[:, :h]

  return lax.platform_dependent(**{platform: banded for platform in BANDED_PLATFORMS},
                                default=whole)


def _up_forward(read: Reader, f: jax.Array, m: jax.Array, k: int) -> jax.Array:
  """f (N, h, w, G, Cg), m (N, 2h, 2w, G, T) -> out (N, 2h, 2w, G, Cg)."""
  n, h, w, g, cg = f.shape
  fp = _pad_hw(f, (k - 1) // 2)
  # Output row Y = 2y + i reads source row y + ky - r for both phases i: split Y into
  # (y, i) so a tap is one coarse window broadcast over the 2 x 2 phases.
  m7 = m.reshape(n, h, 2, w, 2, g, k * k)
  out = _sum(read(fp, (ky, kx), 1, (h, w))[:, :, None, :, None] * m7[..., t, None]
             for ky, kx, t in _taps(k))
  return out.reshape(n, 2 * h, 2 * w, g, cg)


def _up_kernel_grad(read: Reader, f: jax.Array, ct: jax.Array, k: int) -> jax.Array:
  """d out / d m contracted with ct (N, 2h, 2w, G, Cg) -> (N, 2h, 2w, G, T)."""
  del read  # Unit-stride windows are slices under both implementations.
  n, h, w, g, cg = f.shape

  # Both output phases (i, j) of a coarse pixel read the same windows.
  def band_grad(f_rows, ct_rows):
    return tile_products(f_rows, ct_rows, list(range(k)), list(range(k)))

  grad = _in_row_bands(band_grad, f, ct.reshape(n, h, 2, w, 2, g, cg), stride=1,
                       offset=-((k - 1) // 2), reach=k)
  return grad.reshape(n, 2 * h, 2 * w, g, k * k)


def _up_feature_grad(read: Reader, m: jax.Array, ct: jax.Array, k: int) -> jax.Array:
  """d out / d f contracted with ct (N, 2h, 2w, G, Cg) -> (N, h, w, G, Cg)."""
  r = (k - 1) // 2
  h, w = ct.shape[1] // 2, ct.shape[2] // 2
  # Source pixel y' receives from output rows Y = 2(y' - ky + r) + i; on inputs padded
  # by 2r rows that is row 2y' + 4r - 2ky + i: a stride-2 window.
  ctp, mp = _pad_hw(ct, 2 * r), _pad_hw(m, 2 * r)
  terms = []
  for ky, kx, t in _taps(k):
    for i in range(2):
      for j in range(2):
        start = (4 * r - 2 * ky + i, 4 * r - 2 * kx + j)
        terms.append(read(ctp, start, 2, (h, w)) * read(mp, start, 2, (h, w))[..., t, None])
  return _sum(terms)


def _down_forward(read: Reader, f: jax.Array, m: jax.Array, k: int) -> jax.Array:
  """f (N, H, W, G, Cg), m (N, H/2, W/2, G, T) -> out (N, H/2, W/2, G, Cg)."""
  fp = _pad_hw(f, (k - 2) // 2)
  size = m.shape[1:3]
  return _sum(read(fp, (ky, kx), 2, size) * m[..., t, None] for ky, kx, t in _taps(k))


def _down_kernel_grad(read: Reader, f: jax.Array, ct: jax.Array, k: int) -> jax.Array:
  """ct (N, H/2, W/2, G, Cg) -> (N, H/2, W/2, G, T)."""
  del read
  n, h, w, g, cg = ct.shape

  # Tap (ky, kx) reads the stride-2 window at (ky, kx) of the padded features: the
  # unit-stride window at (ky // 2, kx // 2) of their phase (ky % 2, kx % 2).
  def band_grad(f_rows, ct_rows):
    rows, hp, wp = phase_split(f_rows, 2)
    return tile_products(rows, ct_rows[:, :, None, :, None],
                         [(ky % 2) * hp + ky // 2 for ky in range(k)],
                         [(kx % 2) * wp + kx // 2 for kx in range(k)], DOWN_ROW_TILE)

  grad = _in_row_bands(band_grad, f, ct, stride=2, offset=-((k - 2) // 2), reach=k)
  return grad.reshape(n, h, w, g, k * k)


def _down_feature_grad(read: Reader, m: jax.Array, ct: jax.Array, k: int) -> jax.Array:
  """ct (N, h, w, G, Cg) -> (N, 2h, 2w, G, Cg)."""
  r = (k - 2) // 2
  n, h, w, g, cg = ct.shape
  ctp, mp = _pad_hw(ct, r), _pad_hw(m, r)
  # Input row Y = 2u + a is read by tap ky from output row y = u + (a + r - ky) / 2 when
  # that is an integer: each phase (a, b) of the input is a sum of unit-stride windows.
  phases = []
  for a in range(2):
    row = []
    for b in range(2):
      row.append(_sum(
          read(ctp, (r + (a + r - ky) // 2, r + (b + r - kx) // 2), 1, (h, w))
          * read(mp, (r + (a + r - ky) // 2, r + (b + r - kx) // 2), 1, (h, w))[..., t, None]
          for ky, kx, t in _taps(k) if (a + r - ky) % 2 == 0 and (b + r - kx) % 2 == 0))
    phases.append(jnp.stack(row, axis=3))              # (N, h, w, 2, G, Cg)
  return jnp.stack(phases, axis=2).reshape(n, 2 * h, 2 * w, g, cg)


_FORMULAS = {
    "up": (_up_forward, _up_kernel_grad, _up_feature_grad),
    "down": (_down_forward, _down_kernel_grad, _down_feature_grad),
}


def _formulas(direction: str, implementation: str) -> tuple[Callable, ...]:
  """(forward, kernel cotangent, feature cotangent), each a function of (x, y, K)."""
  if implementation == "pallas":
    xla_formulas = (functools.partial(fn, _READERS["slices"]) for fn in _FORMULAS[direction])
    return tuple(pallas_reassembly.by_platform(kernel, xla) for kernel, xla in
                 zip(pallas_reassembly.FORMULAS[direction], xla_formulas))
  read = _READERS[implementation]
  return tuple(functools.partial(fn, read) for fn in _FORMULAS[direction])


# ------------------------------------------------------------ op with the custom VJP


def _grouped(x: jax.Array, groups: int, dtype) -> jax.Array:
  return x.astype(dtype).reshape(x.shape[:3] + (groups, x.shape[3] // groups))


def _ungrouped(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[:3] + (-1,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _reassemble(direction: str, implementation: str, kernel_size: int, groups: int,
                features: jax.Array, kernels: jax.Array) -> jax.Array:
  forward, _, _ = _formulas(direction, implementation)
  dtype = _compute_dtype(features, kernels)
  with jax.named_scope(REASSEMBLY_FORWARD_SCOPE):
    out = forward(_grouped(features, groups, dtype), _grouped(kernels, groups, dtype),
                  kernel_size)
    return _ungrouped(out).astype(jnp.result_type(features, kernels))


def _reassemble_fwd(direction, implementation, kernel_size, groups, features, kernels):
  out = _reassemble(direction, implementation, kernel_size, groups, features, kernels)
  return out, (features, kernels)


def _reassemble_bwd(direction, implementation, kernel_size, groups, residuals, cotangent):
  features, kernels = residuals
  _, kernel_grad, feature_grad = _formulas(direction, implementation)
  dtype = _compute_dtype(features, kernels)
  f, m = _grouped(features, groups, dtype), _grouped(kernels, groups, dtype)
  ct = _grouped(cotangent, groups, dtype)
  with jax.named_scope(FEATURE_COTANGENT_SCOPE):
    d_features = _ungrouped(feature_grad(m, ct, kernel_size)).astype(features.dtype)
  with jax.named_scope(KERNEL_COTANGENT_SCOPE):
    d_kernels = _ungrouped(kernel_grad(f, ct, kernel_size)).astype(kernels.dtype)
  return d_features, d_kernels


_reassemble.defvjp(_reassemble_fwd, _reassemble_bwd)


# Jitted so that a call outside jit compiles one program per shape instead of dispatching
# each of the K*K slices and products as a program of its own (tests/test_ops.py's eager
# variants spent most of their time compiling those); inside a jitted caller it is a call
# that XLA inlines.
_reassemble_jitted = jax.jit(_reassemble, static_argnums=(0, 1, 2, 3))


def _run(direction: str, features: jax.Array, kernels: jax.Array, kernel_size: int,
         groups: int, implementation: str) -> jax.Array:
  return _reassemble_jitted(direction, implementation, int(kernel_size), int(groups),
                            features, kernels)


# ------------------------------------------------------------------------ public API


def reassemble_up(features: jax.Array, kernels: jax.Array, *, kernel_size: int,
                  groups: int = 1, implementation: Implementation | None = None) -> jax.Array:
  """Upsamples `features` 2x by reassembling K x K neighbourhoods with per-pixel kernels.

  Args:
    features: (N, h, w, C) floating array.
    kernels: (N, 2h, 2w, kernel_size**2 * groups) array of the same batch size; channel
      ``g*K*K + ky*K + kx`` weights tap (ky, kx) for channel group g. Not assumed to be
      normalised.
    kernel_size: odd K >= 1; taps reach (K-1)//2 source pixels in every direction.
    groups: number of channel groups G (C must be divisible by G); channel c uses kernel
      group c // (C / G).
    implementation: "slices", "gather" or "pallas" (None: `DEFAULT_IMPLEMENTATION`).

  Returns:
    (N, 2h, 2w, C) array of dtype ``result_type(features, kernels)``.

  Raises:
    ValueError: at trace time, for any shape, dtype or argument mismatch.
  """
  implementation = implementation or DEFAULT_IMPLEMENTATION
  _check_common("reassemble_up", features, kernels, kernel_size, groups, implementation)
  if kernel_size % 2 != 1:
    raise ValueError(f"reassemble_up: `kernel_size` must be odd, got {kernel_size}.")
  n, h, w, _ = features.shape
  if kernels.shape[1:3] != (2 * h, 2 * w):
    raise ValueError(f"reassemble_up: `kernels` must be spatially 2x `features`: expected "
                     f"(N, {2 * h}, {2 * w}, ...), got {kernels.shape}.")
  return _run("up", features, kernels, kernel_size, groups, implementation)


def reassemble_down(features: jax.Array, kernels: jax.Array, *, kernel_size: int,
                    groups: int = 1, implementation: Implementation | None = None) -> jax.Array:
  """Downsamples `features` 2x by reassembling K x K windows with per-pixel kernels.

  Output pixel (y, x) covers input rows 2y - (K-2)//2 ... 2y + K//2 (same for columns).

  Args:
    features: (N, H, W, C) floating array, H and W even.
    kernels: (N, H/2, W/2, kernel_size**2 * groups) array; channel ``g*K*K + ky*K + kx``
      weights tap (ky, kx) for channel group g. Not assumed to be normalised.
    kernel_size: even K >= 2.
    groups: number of channel groups G (C must be divisible by G).
    implementation: "slices", "gather" or "pallas" (None: `DEFAULT_IMPLEMENTATION`).

  Returns:
    (N, H/2, W/2, C) array of dtype ``result_type(features, kernels)``.

  Raises:
    ValueError: at trace time, for any shape, dtype or argument mismatch.
  """
  implementation = implementation or DEFAULT_IMPLEMENTATION
  _check_common("reassemble_down", features, kernels, kernel_size, groups, implementation)
  if kernel_size % 2 != 0:
    raise ValueError(f"reassemble_down: `kernel_size` must be even, got {kernel_size}.")
  n, hh, ww, _ = features.shape
  if hh % 2 or ww % 2:
    raise ValueError(f"reassemble_down: `features` height and width must be even, got "
                     f"{hh} x {ww}.")
  if kernels.shape[1:3] != (hh // 2, ww // 2):
    raise ValueError(f"reassemble_down: `kernels` must be spatially half of `features`: "
                     f"expected (N, {hh // 2}, {ww // 2}, ...), got {kernels.shape}.")
  return _run("down", features, kernels, kernel_size, groups, implementation)


# --- The kernel generator's other functional pieces (used by a2u_jax.layers) ---------

def adaptive_avg_pool_matrix(size, bins: int, dtype=jnp.float32) -> jax.Array:
  """(bins, size) averaging matrix of PyTorch's adaptive average pooling along one axis.

  Bin i covers floor(i*size/bins) .. ceil((i+1)*size/bins) - 1, each weighted by the
  reciprocal of its length (computed in float32, float64 under `jax_enable_x64`, then
  cast to `dtype`); bins overlap when `size` is not a multiple of `bins`. Built from
  traced integers, so `size` may be a symbolic dimension (`jax.export`).
  """
  i = jnp.arange(bins)[:, None]
  start, stop = (i * size) // bins, -((-(i + 1) * size) // bins)
  position = lax.broadcasted_iota(jnp.int32, (bins, size), 1)
  inside = (position >= start) & (position < stop)
  return jnp.where(inside, 1.0 / (stop - start), 0.0).astype(dtype)


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """(N, H, W, C) -> (N, bins, bins, C), PyTorch `AdaptiveAvgPool2d(bins)` semantics.

  H and W may be symbolic dimensions. Half-precision inputs are averaged in float32 (the
  weights too) and the result cast back: like normalisation statistics, a mean over
  thousands of pixels loses its precision in bfloat16."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  with jax.named_scope(POOLING_SCOPE):
    rows = adaptive_avg_pool_matrix(x.shape[1], bins, dtype)
    cols = adaptive_avg_pool_matrix(x.shape[2], bins, dtype)
    # Rows first: the large contraction is then one plain matrix product.
    pooled_rows = jnp.einsum("ih,nhwc->niwc", rows, x.astype(dtype),
                             precision=lax.Precision.HIGHEST)
    pooled = jnp.einsum("jw,niwc->nijc", cols, pooled_rows, precision=lax.Precision.HIGHEST)
    return pooled.astype(x.dtype)


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """(N, h, w, C*f*f) -> (N, f*h, f*w, C) in PyTorch's channel order.

  Input channel ``c*f*f + i*f + j`` goes to output channel c at (f*y + i, f*x + j).
  """
  n, h, w, cff = x.shape
  c = cff // (factor * factor)
  x = x.reshape(n, h, w, c, factor, factor)
  return jnp.transpose(x, (0, 1, 4, 2, 5, 3)).reshape(n, h * factor, w * factor, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _per_sample_depthwise(x: jax.Array, kernels: jax.Array, stride: int,
                          padding: int) -> jax.Array:
  # The forward of `per_sample_depthwise` (documented there).
  _, hh, ww, _ = x.shape
  k = kernels.shape[1]
  out_h = (hh + 2 * padding - k) // stride + 1
  out_w = (ww + 2 * padding - k) // stride + 1
  dtype = _compute_dtype(x, kernels)
  with jax.named_scope(ENCODING_SCOPE):
    xp = jnp.pad(x.astype(dtype), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kernels_c = kernels.astype(dtype)
    total = None
    for ky in range(k):
      for kx in range(k):
        window = xp[:, ky:ky + stride * (out_h - 1) + 1:stride,
                    kx:kx + stride * (out_w - 1) + 1:stride]
        term = window[..., None] * kernels_c[:, None, None, ky, kx]
        total = term if total is None else total + term
    return total.astype(jnp.result_type(x, kernels))


def _per_sample_depthwise_fwd(x, kernels, stride, padding):
  return _per_sample_depthwise(x, kernels, stride, padding), (x, kernels)


def _per_sample_depthwise_bwd(stride, padding, residuals, cotangent):
  """Hand-written VJP (XLA:CPU's grouped-convolution VJPs cost ~20x the forward here).

  d x: the padded input split into its stride x stride phases; tap (ky, kx) sends its
  cotangent to phase (ky % s, kx % s) shifted by (ky // s, kx // s), so each phase is one
  fused sum of unit-stride windows of the cotangent, and the phases interleave back.
  d kernels: shared banks, per output pixel a dot product over channels of each tap's
  window with the cotangent (the reassembly's `tile_products`), summed over pixels;
  per-channel banks, a product summed over pixels, one batched matrix product per tap row
  (`tap_row_products`).
  """
  x, kernels = residuals
  with jax.named_scope(ENCODING_SCOPE):
    dtype = _compute_dtype(x, kernels)
    dx, dk = _per_sample_depthwise_grads(x.astype(dtype), kernels.astype(dtype),
                                         cotangent.astype(dtype), stride, padding)
    return dx.astype(x.dtype), dk.astype(kernels.dtype)


def _per_sample_depthwise_grads(x, kernels, cotangent, stride, padding):
  n, hh, ww, c = x.shape
  k, s = kernels.shape[1], stride
  _, out_h, out_w, _, m = cotangent.shape
  # The padded input's phases are u x v (`phase_split`).
  u, v = -(-(hh + 2 * padding) // s), -(-(ww + 2 * padding) // s)

  q = (k - 1) // s
  ctp = jnp.pad(cotangent, ((0, 0), (q, u - out_h), (q, v - out_w), (0, 0), (0, 0)))
  phases = []
  for a in range(s):
    row = []
    for b in range(s):
      total = jnp.zeros((n, u, v, c), x.dtype)
      for ky in range(a, k, s):
        for kx in range(b, k, s):
          window = ctp[:, q - ky // s:q - ky // s + u, q - kx // s:q - kx // s + v]
          total = total + jnp.sum(window * kernels[:, None, None, ky, kx], axis=-1)
      row.append(total)
    phases.append(jnp.stack(row, axis=3))                      # (N, U, V, s, C)
  dxp = jnp.stack(phases, axis=2).reshape(n, s * u, s * v, c)  # row u*s + a
  dx = dxp[:, padding:padding + hh, padding:padding + ww]

  if kernels.shape[3] == 1:
    # Shared banks: per pixel, contract channels (the reassembly's tile products, in row
    # bands on the CPU); then sum the pixels (small).
    def band_grad(x_rows, ct_rows):
      band_phases, band_u, band_v = phase_split(x_rows, s)
      return jnp.stack([tile_products(
          band_phases[:, :, :, None], ct_rows[:, :, None, :, None, None, :, j],
          [(ky % s) * band_u + ky // s for ky in range(k)],
          [(kx % s) * band_v + kx // s for kx in range(k)], DOWN_ROW_TILE)
          for j in range(m)], axis=-1)

    per_pixel = _in_row_bands(band_grad, x, cotangent, stride=s, offset=-padding, reach=k)
    dk = jnp.sum(per_pixel, axis=(1, 2, 3, 4, 5))[:, :, :, None]        # (N, k, k, 1, M)
  else:
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dk = tap_row_products(phase_split(xp, s)[0], cotangent, "nyxtc,nyxcm->ncmt",
                          [(ky % s) * u + ky // s for ky in range(k)],
                          [(kx % s) * v + kx // s for kx in range(k)],
                          (out_h, out_w))                              # (N, C, M, k, k)
    dk = jnp.transpose(dk, (0, 3, 4, 1, 2))
  return dx, dk


_per_sample_depthwise.defvjp(_per_sample_depthwise_fwd, _per_sample_depthwise_bwd)
# Jitted for the reason `_reassemble_jitted` gives.
_per_sample_depthwise_jitted = jax.jit(_per_sample_depthwise, static_argnums=(2, 3))


def per_sample_depthwise(x: jax.Array, kernels: jax.Array, stride: int,
                         padding: int) -> jax.Array:
  """Depthwise cross-correlation with a different kernel bank per sample.

  x (N, H, W, C); kernels (N, k, k, C, M), or (N, k, k, 1, M) for banks shared by all
  channels -> (N, H', W', C, M): output (c, m) is channel c correlated (PyTorch conv2d
  semantics, zero padding) with kernels[n, :, :, c, m] (kernels[n, :, :, 0, m] if shared).

  The forward is one fused sum of k*k strided slices (XLA:CPU runs grouped convolutions
  with per-sample kernels several times slower); training keeps no per-tap residuals.
  Half-precision inputs accumulate in float32; the result has their common dtype.
  """
  return _per_sample_depthwise_jitted(x, kernels, int(stride), int(padding))
