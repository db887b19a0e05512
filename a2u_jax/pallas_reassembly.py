"""Pallas kernels of the reassembly: forward, kernel cotangent and feature cotangent, up
and down (the formulas of `a2u_jax.ops`, docs/design.md §2.2).

Selected by ``implementation="pallas"`` in `ops.reassemble_up` / `ops.reassemble_down`.
Each kernel is chosen by the platform the program is lowered for (`lax.platform_dependent`),
not by the one it is traced on, so a program exported on a CPU for GPUs holds the GPU
kernels:
* CUDA and ROCm: Pallas' Triton backend, chosen by its compiler parameters (`TRITON`).
  tests/test_lowering.py lowers them for cuda and rocm on the CPU; they have not run on a
  GPU since these changes.
* TPU: refused with one line (`TPU_REFUSAL`), at trace time on a TPU host (ops.py) and when
  lowering for a TPU elsewhere. A Mosaic TPU kernel would need the overlapping windows as
  element-offset VMEM blocks (`pl.Element`) instead of the whole arrays these kernels
  index; not attempted. TPUs use the XLA formulas.
* Every other platform (the CPU): Pallas' interpret mode (the kernel body as a JAX program
  looped over the grid): exact, and what the CPU tests check against the XLA formulas, but
  far slower than XLA. Inside shard_map the XLA formulas stand in (see `by_platform`).

Why kernels: the XLA formulas read every input once per tap. Here one program owns a row
of BW output pixels (times a BC channel block), loads each tap's window of the padded input
once and keeps every tap's and phase's partial sums in registers, so the kernel cotangent
(a dot product over channels per pixel and tap) reads the features and the cotangent once.

Layout: groups are folded into the batch, (N, ., ., G, Cg) -> (N*G, ., ., Cg). Every
window that a tap reads is made a unit-stride window at a static column offset and a
dynamic row of a padded array: the up direction splits its fine rows and columns into
(coarse, phase) pairs by a free reshape, (B, 2h, 2w, .) -> (B, h, 2, w, 2, .); the down
direction does the same to its padded features. Triton loads need power-of-two sizes, so
the width is padded to a multiple of BW and the channels to a multiple of BC (both powers
of two; zero padding contributes nothing), and kernel taps are loaded one tap at a time.
All arithmetic is in the compute dtype that ops.py passes (float32, or float64).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

# Pallas' Triton backend, chosen explicitly: given no compiler parameters, Pallas in jax
# 0.10 lowers for GPUs with Mosaic GPU (`jax_pallas_use_mosaic_gpu`), whose copies must move
# a multiple of 128 bytes; these kernels read overlapping windows of whole arrays, which
# Triton's pointer loads express directly. Triton also serves ROCm. Triton's defaults:
# 4 warps, 3 pipelining stages (1 on ROCm).
TRITON = pltriton.CompilerParams()

# Widest row block and channel block of one program. 32 x 64 float32 values per loaded
# window keep a K=3 up program's 36 partial sums and its windows within a GPU thread
# block's registers.
MAX_BLOCK_WIDTH = 32
MAX_BLOCK_CHANNELS = 64


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _blocks(width: int, channels: int) -> tuple[int, int, int, int]:
  """(BW, padded width, BC, padded channels) for a row of `width` pixels."""
  bw = min(MAX_BLOCK_WIDTH, _next_pow2(width))
  bc = min(MAX_BLOCK_CHANNELS, _next_pow2(channels))
  return bw, -(-width // bw) * bw, bc, -(-channels // bc) * bc


TPU_REFUSAL = ("implementation='pallas' has GPU (Triton) kernels only, none for TPUs: use "
               "the default implementation ('slices') on a TPU")

# Refuses to lower for TPUs; the identity elsewhere. A program traced on one platform can
# be lowered for another (jax.export), so a trace-time check alone would let a TPU lowering
# reach Mosaic's own lowering errors.
_no_tpu_kernel_p = Primitive("a2u_pallas_no_tpu_kernel")
_no_tpu_kernel_p.def_impl(lambda x: x)
_no_tpu_kernel_p.def_abstract_eval(lambda x: x)
batching.primitive_batchers[_no_tpu_kernel_p] = (
    lambda args, dims: (_no_tpu_kernel_p.bind(*args), dims[0]))


def _refuse_tpu_lowering(ctx, x):
  raise ValueError(TPU_REFUSAL)


mlir.register_lowering(_no_tpu_kernel_p, _refuse_tpu_lowering, platform="tpu")
mlir.register_lowering(_no_tpu_kernel_p, lambda ctx, x: [x])


def _fold_groups(x: jax.Array) -> jax.Array:
  """(N, H, W, G, D) -> (N*G, H, W, D)."""
  n, h, w, g, d = x.shape
  return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(n * g, h, w, d)


def _unfold_groups(x: jax.Array, groups: int) -> jax.Array:
  """(N*G, H, W, D) -> (N, H, W, G, D)."""
  b, h, w, d = x.shape
  return jnp.transpose(x.reshape(b // groups, groups, h, w, d), (0, 2, 3, 1, 4))


def _pad(x: jax.Array, rows: tuple[int, int], cols: tuple[int, int],
         channels: int | None = None) -> jax.Array:
  last = (0, 0) if channels is None else (0, channels - x.shape[-1])
  return jnp.pad(x, ((0, 0), rows, cols, last))


def _whole(x: jax.Array) -> pl.BlockSpec:
  """The whole array to every program: its windows overlap, so a blocked spec cannot
  describe them; the kernel indexes it (a pointer on Triton)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _varying(*operands: jax.Array) -> frozenset:
  """The shard_map axes over which any operand varies (empty outside shard_map)."""
  mats = [jax.typeof(x).manual_axis_type for x in operands]
  return frozenset().union(*(mat.varying for mat in mats if mat is not None))


def _call(kernel, out_shape, grid, in_specs, out_spec, *operands, interpret: bool):
  # Inside shard_map (data-parallel training) Pallas must be told how its output varies
  # over the mesh axes: as the operands together, which are first made to vary alike.
  varying = _varying(*operands)
  if varying:
    operands = [x if not varying - _varying(x)
                else jax.lax.pcast(x, tuple(varying - _varying(x)), to="varying")
                for x in operands]
    out_shape = jax.ShapeDtypeStruct(
        out_shape.shape, out_shape.dtype,
        manual_axis_type=jax.sharding.ManualAxisType(varying=varying))
  return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                        out_specs=out_spec, interpret=interpret,
                        compiler_params=None if interpret else TRITON)(*operands)


def by_platform(formula: Callable, xla_formula: Callable) -> Callable:
  """`formula` (one of `FORMULAS`, a function of (x, y, K)) chosen by the platform that the
  program is lowered for, not the one it is traced on: Triton kernels for CUDA and ROCm,
  the refusal for TPUs, interpret mode elsewhere.

  Inside shard_map (operands that vary over mesh axes) no interpreter can stand in on
  the CPU in jax 0.10.2: the HLO interpreter's grid loop slices varying blocks at
  non-varying program ids (a vma error), and the TPU interpreter's ordered callbacks break
  the lowering of this choice for GPUs (the kept branch has no effect tokens). There
  `xla_formula`, the same computation by the XLA formulas, computes on non-GPU platforms.
  JAX lowers every branch of a `lax.platform_dependent` for each platform of a
  multi-platform lowering, so a program with these kernels lowers for one platform at a
  time.
  """
  def chosen(x: jax.Array, y: jax.Array, k: int) -> jax.Array:
    def on_gpu(x, y):
      return formula(x, y, k, interpret=False)

    if _varying(x, y):
      def elsewhere(x, y):
        return xla_formula(x, y, k)
    else:
      def elsewhere(x, y):
        return formula(x, y, k, interpret=True)

    return jax.lax.platform_dependent(
        x, y, cuda=on_gpu, rocm=on_gpu,
        tpu=lambda x, y: elsewhere(_no_tpu_kernel_p.bind(x), _no_tpu_kernel_p.bind(y)),
        default=elsewhere)
  return chosen


# ------------------------------------------------------------------------------ up


def _up_forward_kernel(fp_ref, m_ref, out_ref, *, k, bw, bc):
  b, y, xb, cb = (pl.program_id(i) for i in range(4))
  x0, c0 = xb * bw, cb * bc
  dtype = out_ref.dtype
  acc = [[jnp.zeros((bw, bc), dtype) for _ in range(2)] for _ in range(2)]
  for ky in range(k):
    for kx in range(k):
      window = fp_ref[b, y + ky, pl.ds(x0 + kx, bw), pl.ds(c0, bc)].astype(dtype)
      for i in range(2):
        for j in range(2):
          acc[i][j] += window * m_ref[i, :, j, ky * k + kx].astype(dtype)[:, None]
  for i in range(2):
    for j in range(2):
      out_ref[i, :, j, :] = acc[i][j]


def up_forward(f: jax.Array, m: jax.Array, k: int, interpret: bool = False) -> jax.Array:
  """f (N, h, w, G, Cg), m (N, 2h, 2w, G, K*K) -> out (N, 2h, 2w, G, Cg), f's dtype."""
  n, h, w, g, cg = f.shape
  r = (k - 1) // 2
  bw, wp, bc, cp = _blocks(w, cg)
  fp = _pad(_fold_groups(f), (r, r), (r, wp - w + r), cp)
  mv = _pad(_fold_groups(m), (0, 0), (0, 2 * (wp - w))).reshape(n * g, h, 2, wp, 2, k * k)
  out = _call(functools.partial(_up_forward_kernel, k=k, bw=bw, bc=bc),
              jax.ShapeDtypeStruct((n * g, h, 2, wp, 2, cp), f.dtype),
              (n * g, h, wp // bw, cp // bc),
              [_whole(fp), pl.BlockSpec((None, None, 2, bw, 2, k * k),
                                        lambda b, y, xb, cb: (b, y, 0, xb, 0, 0))],
              pl.BlockSpec((None, None, 2, bw, 2, bc),
                           lambda b, y, xb, cb: (b, y, 0, xb, 0, cb)),
              fp, mv, interpret=interpret)
  out = out.reshape(n * g, 2 * h, 2 * wp, cp)[:, :, :2 * w, :cg]
  return _unfold_groups(out, g)


def _up_kernel_grad_kernel(fp_ref, ct_ref, dm_ref, *, k, bw, bc, cp):
  b, y, xb = (pl.program_id(i) for i in range(3))
  x0 = xb * bw
  dtype = dm_ref.dtype
  acc = {}
  for c0 in range(0, cp, bc):
    ct = [[ct_ref[i, :, j, pl.ds(c0, bc)].astype(dtype) for j in range(2)]
          for i in range(2)]
    for ky in range(k):
      for kx in range(k):
        window = fp_ref[b, y + ky, pl.ds(x0 + kx, bw), pl.ds(c0, bc)].astype(dtype)
        for i in range(2):
          for j in range(2):
            part = jnp.sum(window * ct[i][j], axis=1)
            key = (ky * k + kx, i, j)
            acc[key] = part if c0 == 0 else acc[key] + part
  for (t, i, j), value in acc.items():
    dm_ref[i, :, j, t] = value


def up_kernel_grad(f: jax.Array, ct: jax.Array, k: int,
                   interpret: bool = False) -> jax.Array:
  """f (N, h, w, G, Cg), ct (N, 2h, 2w, G, Cg) -> d kernels (N, 2h, 2w, G, K*K)."""
  n, h, w, g, cg = f.shape
  r = (k - 1) // 2
  bw, wp, bc, cp = _blocks(w, cg)
  fp = _pad(_fold_groups(f), (r, r), (r, wp - w + r), cp)
  ctv = _pad(_fold_groups(ct), (0, 0), (0, 2 * (wp - w)), cp)
  ctv = ctv.reshape(n * g, h, 2, wp, 2, cp)
  dm = _call(functools.partial(_up_kernel_grad_kernel, k=k, bw=bw, bc=bc, cp=cp),
             jax.ShapeDtypeStruct((n * g, h, 2, wp, 2, k * k), f.dtype),
             (n * g, h, wp // bw),
             [_whole(fp), pl.BlockSpec((None, None, 2, bw, 2, cp),
                                       lambda b, y, xb: (b, y, 0, xb, 0, 0))],
             pl.BlockSpec((None, None, 2, bw, 2, k * k),
                          lambda b, y, xb: (b, y, 0, xb, 0, 0)),
             fp, ctv, interpret=interpret)
  dm = dm.reshape(n * g, 2 * h, 2 * wp, k * k)[:, :, :2 * w]
  return _unfold_groups(dm, g)


def _up_feature_grad_kernel(ctp_ref, mp_ref, df_ref, *, k, bw, bc):
  b, y, xb, cb = (pl.program_id(i) for i in range(4))
  x0, c0 = xb * bw, cb * bc
  r = (k - 1) // 2
  dtype = df_ref.dtype
  acc = jnp.zeros((bw, bc), dtype)
  # Source pixel y receives from coarse output row y - ky + r, which is row
  # y - ky + 2r of the cotangent padded by r coarse rows.
  for ky in range(k):
    for kx in range(k):
      row, col = y - ky + 2 * r, x0 - kx + 2 * r
      for i in range(2):
        for j in range(2):
          ct = ctp_ref[b, row, i, pl.ds(col, bw), j, pl.ds(c0, bc)].astype(dtype)
          tap = mp_ref[b, row, i, pl.ds(col, bw), j, ky * k + kx].astype(dtype)
          acc += ct * tap[:, None]
  df_ref[...] = acc


def up_feature_grad(m: jax.Array, ct: jax.Array, k: int,
                    interpret: bool = False) -> jax.Array:
  """m (N, 2h, 2w, G, K*K), ct (N, 2h, 2w, G, Cg) -> d features (N, h, w, G, Cg)."""
  n, hh, ww, g, cg = ct.shape
  h, w, r = hh // 2, ww // 2, (k - 1) // 2
  bw, wp, bc, cp = _blocks(w, cg)
  rows, cols = (2 * r, 2 * r), (2 * r, 2 * (wp - w) + 2 * r)
  shape = (n * g, h + 2 * r, 2, wp + 2 * r, 2)
  ctp = _pad(_fold_groups(ct), rows, cols, cp).reshape(shape + (cp,))
  mp = _pad(_fold_groups(m), rows, cols).reshape(shape + (k * k,))
  df = _call(functools.partial(_up_feature_grad_kernel, k=k, bw=bw, bc=bc),
             jax.ShapeDtypeStruct((n * g, h, wp, cp), ct.dtype),
             (n * g, h, wp // bw, cp // bc),
             [_whole(ctp), _whole(mp)],
             pl.BlockSpec((None, None, bw, bc), lambda b, y, xb, cb: (b, y, xb, cb)),
             ctp, mp, interpret=interpret)
  return _unfold_groups(df[:, :, :w, :cg], g)


# ---------------------------------------------------------------------------- down


def _down_padded(f: jax.Array, k: int, wp: int, cp: int) -> jax.Array:
  """(N, H, W, G, Cg) -> (N*G, h + K/2 - 1, 2, wp + K/2 - 1, 2, cp): padded by (K-2)/2
  before and enough after for wp output columns, its rows and columns split into
  (pair, phase), so input row 2y + ky is [y + ky // 2, ky % 2]."""
  n, hh, ww, g, _ = f.shape
  r, half = (k - 2) // 2, k // 2 - 1
  fp = _pad(_fold_groups(f), (r, r), (r, 2 * (wp + half) - ww - r), cp)
  return fp.reshape(n * g, hh // 2 + half, 2, wp + half, 2, cp)


def _down_forward_kernel(fp_ref, m_ref, out_ref, *, k, bw, bc):
  b, y, xb, cb = (pl.program_id(i) for i in range(4))
  x0, c0 = xb * bw, cb * bc
  dtype = out_ref.dtype
  acc = jnp.zeros((bw, bc), dtype)
  for ky in range(k):
    for kx in range(k):
      window = fp_ref[b, y + ky // 2, ky % 2, pl.ds(x0 + kx // 2, bw), kx % 2,
                      pl.ds(c0, bc)].astype(dtype)
      acc += window * m_ref[:, ky * k + kx].astype(dtype)[:, None]
  out_ref[...] = acc


def down_forward(f: jax.Array, m: jax.Array, k: int, interpret: bool = False) -> jax.Array:
  """f (N, H, W, G, Cg), m (N, H/2, W/2, G, K*K) -> out (N, H/2, W/2, G, Cg)."""
  n, _, _, g, cg = f.shape
  h, w = m.shape[1:3]
  bw, wp, bc, cp = _blocks(w, cg)
  fp = _down_padded(f, k, wp, cp)
  mp = _pad(_fold_groups(m), (0, 0), (0, wp - w))
  out = _call(functools.partial(_down_forward_kernel, k=k, bw=bw, bc=bc),
              jax.ShapeDtypeStruct((n * g, h, wp, cp), f.dtype),
              (n * g, h, wp // bw, cp // bc),
              [_whole(fp), pl.BlockSpec((None, None, bw, k * k),
                                        lambda b, y, xb, cb: (b, y, xb, 0))],
              pl.BlockSpec((None, None, bw, bc), lambda b, y, xb, cb: (b, y, xb, cb)),
              fp, mp, interpret=interpret)
  return _unfold_groups(out[:, :, :w, :cg], g)


def _down_kernel_grad_kernel(fp_ref, ct_ref, dm_ref, *, k, bw, bc, cp):
  b, y, xb = (pl.program_id(i) for i in range(3))
  x0 = xb * bw
  dtype = dm_ref.dtype
  acc = {}
  for c0 in range(0, cp, bc):
    ct = ct_ref[:, pl.ds(c0, bc)].astype(dtype)
    for ky in range(k):
      for kx in range(k):
        window = fp_ref[b, y + ky // 2, ky % 2, pl.ds(x0 + kx // 2, bw), kx % 2,
                        pl.ds(c0, bc)].astype(dtype)
        part = jnp.sum(window * ct, axis=1)
        t = ky * k + kx
        acc[t] = part if c0 == 0 else acc[t] + part
  for t, value in acc.items():
    dm_ref[:, t] = value


def down_kernel_grad(f: jax.Array, ct: jax.Array, k: int,
                     interpret: bool = False) -> jax.Array:
  """f (N, H, W, G, Cg), ct (N, H/2, W/2, G, Cg) -> d kernels (N, H/2, W/2, G, K*K)."""
  n, h, w, g, cg = ct.shape
  bw, wp, bc, cp = _blocks(w, cg)
  fp = _down_padded(f, k, wp, cp)
  ctp = _pad(_fold_groups(ct), (0, 0), (0, wp - w), cp)
  dm = _call(functools.partial(_down_kernel_grad_kernel, k=k, bw=bw, bc=bc, cp=cp),
             jax.ShapeDtypeStruct((n * g, h, wp, k * k), f.dtype),
             (n * g, h, wp // bw),
             [_whole(fp),
              pl.BlockSpec((None, None, bw, cp), lambda b, y, xb: (b, y, xb, 0))],
             pl.BlockSpec((None, None, bw, k * k), lambda b, y, xb: (b, y, xb, 0)),
             fp, ctp, interpret=interpret)
  return _unfold_groups(dm[:, :, :w], g)


def _down_offsets(k: int, phase: int) -> list[tuple[int, int]]:
  """(tap index, output offset) of the taps that read input phase `phase`: input row
  2u + phase is tap ky of output row u + (phase + r - ky) / 2 when that is whole."""
  r = (k - 2) // 2
  return [(ky, (phase + r - ky) // 2) for ky in range(k) if (phase + r - ky) % 2 == 0]


def _down_feature_grad_kernel(ctp_ref, mp_ref, df_ref, *, k, bw, bc, pad):
  b, y, xb, cb = (pl.program_id(i) for i in range(4))
  x0, c0 = xb * bw, cb * bc
  dtype = df_ref.dtype
  for a in range(2):
    for p in range(2):
      acc = jnp.zeros((bw, bc), dtype)
      for ky, oy in _down_offsets(k, a):
        for kx, ox in _down_offsets(k, p):
          row, col = y + oy + pad, x0 + ox + pad
          ct = ctp_ref[b, row, pl.ds(col, bw), pl.ds(c0, bc)].astype(dtype)
          tap = mp_ref[b, row, pl.ds(col, bw), ky * k + kx].astype(dtype)
          acc += ct * tap[:, None]
      df_ref[a, :, p, :] = acc


def down_feature_grad(m: jax.Array, ct: jax.Array, k: int,
                      interpret: bool = False) -> jax.Array:
  """m (N, h, w, G, K*K), ct (N, h, w, G, Cg) -> d features (N, 2h, 2w, G, Cg)."""
  n, h, w, g, cg = ct.shape
  bw, wp, bc, cp = _blocks(w, cg)
  pad = max(abs(o) for phase in range(2) for _, o in _down_offsets(k, phase))
  rows, cols = (pad, pad), (pad, wp - w + pad)
  ctp = _pad(_fold_groups(ct), rows, cols, cp)
  mp = _pad(_fold_groups(m), rows, cols)
  df = _call(functools.partial(_down_feature_grad_kernel, k=k, bw=bw, bc=bc, pad=pad),
             jax.ShapeDtypeStruct((n * g, h, 2, wp, 2, cp), ct.dtype),
             (n * g, h, wp // bw, cp // bc),
             [_whole(ctp), _whole(mp)],
             pl.BlockSpec((None, None, 2, bw, 2, bc),
                          lambda b, y, xb, cb: (b, y, 0, xb, 0, cb)),
             ctp, mp, interpret=interpret)
  df = df.reshape(n * g, 2 * h, 2 * wp, cp)[:, :, :2 * w, :cg]
  return _unfold_groups(df, g)


FORMULAS = {
    "up": (up_forward, up_kernel_grad, up_feature_grad),
    "down": (down_forward, down_kernel_grad, down_feature_grad),
}
