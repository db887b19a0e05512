"""Flax linen modules of A2U: the kernel generator and drop-in down/upsampling layers.

Layout is NHWC throughout. See docs/design.md §2.1 for the generator's definition; the
reassembly itself lives in `a2u_jax.ops`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from a2u_jax import ops

Dtype = Any


def adaptive_avg_pool_matrix(size: int, bins: int) -> np.ndarray:
  """(bins, size) averaging matrix of PyTorch's adaptive average pooling along one axis.

  Bin i covers floor(i*size/bins) .. ceil((i+1)*size/bins) - 1; bins overlap when
  `size` is not a multiple of `bins`.
  """
  matrix = np.zeros((bins, size), np.float64)
  for i in range(bins):
    start, stop = (i * size) // bins, -((-(i + 1) * size) // bins)
    matrix[i, start:stop] = 1.0 / (stop - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """(N, H, W, C) -> (N, bins, bins, C), PyTorch `AdaptiveAvgPool2d(bins)` semantics."""
  rows = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], bins), x.dtype)
  cols = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], bins), x.dtype)
  # Rows first: the large contraction is then one plain matrix product.
  pooled_rows = jnp.einsum("ih,nhwc->niwc", rows, x, precision=lax.Precision.HIGHEST)
  return jnp.einsum("jw,niwc->nijc", cols, pooled_rows, precision=lax.Precision.HIGHEST)


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """(N, h, w, C*f*f) -> (N, f*h, f*w, C) in PyTorch's channel order.

  Input channel ``c*f*f + i*f + j`` goes to output channel c at (f*y + i, f*x + j).
  """
  n, h, w, cff = x.shape
  c = cff // (factor * factor)
  x = x.reshape(n, h, w, c, factor, factor)
  return jnp.transpose(x, (0, 1, 4, 2, 5, 3)).reshape(n, h * factor, w * factor, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def per_sample_depthwise(x: jax.Array, kernels: jax.Array, stride: int,
                         padding: int) -> jax.Array:
  """Depthwise cross-correlation with a different kernel bank per sample.

  x (N, H, W, C); kernels (N, k, k, C, M), or (N, k, k, 1, M) for banks shared by all
  channels -> (N, H', W', C, M): output (c, m) is channel c correlated (PyTorch conv2d
  semantics, zero padding) with kernels[n, :, :, c, m] (kernels[n, :, :, 0, m] if shared).

  The forward is one fused sum of k*k strided slices (XLA:CPU runs grouped convolutions
  with per-sample kernels several times slower); training keeps no per-tap residuals.
  """
  _, hh, ww, _ = x.shape
  k = kernels.shape[1]
  out_h = (hh + 2 * padding - k) // stride + 1
  out_w = (ww + 2 * padding - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  total = None
  for ky in range(k):
    for kx in range(k):
      window = xp[:, ky:ky + stride * (out_h - 1) + 1:stride,
                  kx:kx + stride * (out_w - 1) + 1:stride]
      term = window[..., None] * kernels[:, None, None, ky, kx]
      total = term if total is None else total + term
  return total


def _per_sample_depthwise_fwd(x, kernels, stride, padding):
  return per_sample_depthwise(x, kernels, stride, padding), (x, kernels)


def _per_sample_depthwise_bwd(stride, padding, residuals, cotangent):
  """Hand-written VJP (XLA:CPU's grouped-convolution VJPs cost ~20x the forward here).

  d x: the padded input split into its stride x stride phases; tap (ky, kx) sends its
  cotangent to phase (ky % s, kx % s) shifted by (ky // s, kx // s), so each phase is one
  fused sum of unit-stride windows of the cotangent, and the phases interleave back.
  d kernels: per output pixel, a dot product over channels (shared banks) or a product
  summed over pixels (per-channel banks) of each tap's window with the cotangent, one
  batched matrix product per tap row (`ops.tap_row_products`).
  """
  x, kernels = residuals
  n, hh, ww, c = x.shape
  k, s = kernels.shape[1], stride
  _, out_h, out_w, _, m = cotangent.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows, u, v = ops.phase_split(xp, s)

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

  row_starts = [(ky % s) * u + ky // s for ky in range(k)]
  col_starts = [(kx % s) * v + kx // s for kx in range(k)]
  if kernels.shape[3] == 1:
    # Shared banks: per pixel, contract channels; then sum the pixels (small).
    dk = jnp.stack([jnp.sum(ops.tap_row_products(
        rows, cotangent[..., j], "nyxtc,nyxc->nyxt", row_starts, col_starts,
        (out_h, out_w)), axis=(1, 2)) for j in range(m)], axis=-1)   # (N, k, k, M)
    dk = dk[:, :, :, None]
  else:
    dk = ops.tap_row_products(rows, cotangent, "nyxtc,nyxcm->ncmt", row_starts,
                              col_starts, (out_h, out_w))              # (N, C, M, k, k)
    dk = jnp.transpose(dk, (0, 3, 4, 1, 2))
  return dx, dk.astype(kernels.dtype)


per_sample_depthwise.defvjp(_per_sample_depthwise_fwd, _per_sample_depthwise_bwd)


def sow_largest_tap(module: nn.Module, kernels: jax.Array, taps: int) -> None:
  """Records how far a normalised kernel is from uniform, for readouts such as
  benchmarks/reconstruction.py's kernel-sharpness columns.

  kernels: (..., G * taps), each group's `taps` weights summing to 1. Sows
  {"mean": mean over pixels and groups of the largest weight, "uniform": 1 / taps} as
  "largest_tap" in the "intermediates" collection, only when that collection is mutable
  (`apply(..., mutable=["intermediates"])`), so ordinary calls compute nothing extra. The
  mean is 1 / taps for box filters and 1 for one-hot kernels.
  """
  if not module.is_mutable_collection("intermediates"):
    return
  weights = kernels.astype(jnp.float32).reshape(kernels.shape[:-1] + (-1, taps))
  module.sow("intermediates", "largest_tap",
             {"mean": jnp.mean(jnp.max(weights, axis=-1)), "uniform": jnp.float32(1 / taps)})


class A2UKernelGenerator(nn.Module):
  """A2U's kernel generator: paired 2x downsampling and upsampling kernels from one map.

  A low-rank bilinear ("affinity") model of the input: two dynamic k x k encoding kernel
  banks U and V (from k x k adaptive average pooling + 1x1 conv) are depthwise-applied with
  stride 2, group-normalised, multiplied and summed over channels; per-sample point-wise
  mixing (from global average pooling) turns that second-order map into kernel logits.

  Attributes:
    up_kernel_size: s, size of the upsampling kernels (odd). Down kernels are 2s x 2s.
    encode_kernel_size: k, size of the dynamic encoding kernels.
    rank: d, rank of the bilinear model.
    groups: G, kernel groups (channels of the resampled map are split into G groups).
    share: the encoding kernels are shared by all channels (True) or per channel.
    norm_groups: GroupNorm groups of the encoded maps (32 in the paper; C must divide).
    dtype: computation dtype (None: inferred from the input); parameters stay float32.

  Call:
    x: (N, H, W, C) float array, H and W even.

  Returns:
    (down_kernels, up_kernels):
      down_kernels (N, H/2, W/2, G*(2s)**2), softmax-normalised per group over its taps;
      up_kernels (N, H, W, G*s**2), softmax(sigmoid(.)) per group over its taps (sigmoid
      only when s == 1). Channel layout: group-major, then tap row, then tap column, as
      `a2u_jax.ops.reassemble_down` / `reassemble_up` consume it.
  """

  up_kernel_size: int = 3
  encode_kernel_size: int = 6
  rank: int = 1
  groups: int = 1
  share: bool = True
  norm_groups: int = 32
  dtype: Dtype | None = None

  def _check(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(f"A2UKernelGenerator: `x` must be NHWC (rank 4), got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"A2UKernelGenerator: `x` must be floating, got {x.dtype}.")
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"A2UKernelGenerator: `x` height and width must be even, got "
                       f"{x.shape[1]} x {x.shape[2]}.")
    if x.shape[3] % self.norm_groups:
      raise ValueError(f"A2UKernelGenerator: the channel count of `x` ({x.shape[3]}) must be "
                       f"divisible by norm_groups={self.norm_groups}.")
    if self.up_kernel_size < 1 or self.up_kernel_size % 2 != 1:
      raise ValueError(f"A2UKernelGenerator: `up_kernel_size` must be odd and positive, got "
                       f"{self.up_kernel_size}.")
    for name in ("encode_kernel_size", "rank", "groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"A2UKernelGenerator: `{name}` must be >= 1, got "
                         f"{getattr(self, name)}.")

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    self._check(x)
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    n, h, w, c = x.shape
    s, k, d, g = self.up_kernel_size, self.encode_kernel_size, self.rank, self.groups
    taps_down = (2 * s)**2

    # Dynamic encoding kernels: channel j*C + c (unshare) / j (share) is rank j's kernel.
    pooled = adaptive_avg_pool(x, k)
    banks = d if self.share else d * c
    encoded = []
    for name in ("u", "v"):
      bank = nn.Dense(banks, dtype=dtype, name=f"encode_{name}")(pooled)   # (N, k, k, banks)
      bank = bank.reshape(n, k, k, d, -1).transpose(0, 1, 2, 4, 3)         # (.., C or 1, d)
      out = per_sample_depthwise(x, bank, 2, (k - 1) // 2)              # (N,h,w,C,d)
      # Each rank slice is normalised on its own, as the paper's implementation does.
      out = out.transpose(0, 4, 1, 2, 3).reshape(n * d, h // 2, w // 2, c)
      out = nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-5, dtype=dtype,
                         use_fast_variance=False, name=f"norm_{name}")(out)
      encoded.append(nn.leaky_relu(out, 0.01).reshape(n, d, h // 2, w // 2, c))
    affinity = jnp.einsum("njyxc,njyxc->nyxj", *encoded) / math.sqrt(c)     # (N,h/2,w/2,d)

    # Per-sample point-wise mixing d -> taps: output channel o uses weights o*d .. o*d+d-1.
    context = jnp.mean(x, axis=(1, 2))
    mix_up = nn.Dense(taps_down * g * d, dtype=dtype, name="mix_up")(context)
    mix_down = nn.Dense(taps_down * g * d, dtype=dtype, name="mix_down")(context)
    up = jnp.einsum("nyxj,noj->nyxo", affinity, mix_up.reshape(n, -1, d))
    down = jnp.einsum("nyxj,noj->nyxo", affinity, mix_down.reshape(n, -1, d))

    up = pixel_shuffle(up, 2).reshape(n, h, w, g, s * s)
    up = jax.nn.sigmoid(up)
    if s > 1:
      up = jax.nn.softmax(up, axis=-1)
    down = jax.nn.softmax(down.reshape(n, h // 2, w // 2, g, taps_down), axis=-1)
    return (down.reshape(n, h // 2, w // 2, g * taps_down),
            up.reshape(n, h, w, g * s * s))


class A2UDownsample(nn.Module):
  """2x downsampling with A2U kernels; also returns the paired upsampling kernels.

  Attributes: as `A2UKernelGenerator`, plus `implementation` of the reassembly.

  Call:
    x: (N, H, W, C) float array, H and W even, C divisible by `norm_groups` and `groups`.

  Returns:
    (y, up_kernels): y (N, H/2, W/2, C) in x's dtype; up_kernels (N, H, W, groups*s**2),
    to be handed to the `A2UUpsample` that brings a (N, H/2, W/2, C') map back to H x W.
  """

  up_kernel_size: int = 3
  encode_kernel_size: int = 6
  rank: int = 1
  groups: int = 1
  share: bool = True
  norm_groups: int = 32
  dtype: Dtype | None = None
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    down_kernels, up_kernels = A2UKernelGenerator(
        up_kernel_size=self.up_kernel_size, encode_kernel_size=self.encode_kernel_size,
        rank=self.rank, groups=self.groups, share=self.share, norm_groups=self.norm_groups,
        dtype=self.dtype, name="generator")(x)
    sow_largest_tap(self, down_kernels, (2 * self.up_kernel_size)**2)
    y = ops.reassemble_down(x, down_kernels.astype(x.dtype),
                            kernel_size=2 * self.up_kernel_size, groups=self.groups,
                            implementation=self.implementation)
    return y, up_kernels


class A2UUpsample(nn.Module):
  """2x upsampling with the kernels an `A2UDownsample` produced (no parameters).

  Attributes:
    up_kernel_size: s, as given to the paired `A2UDownsample`.
    groups: kernel groups, as given to the paired `A2UDownsample`.
    implementation: reassembly implementation (None: the default).

  Call:
    x: (N, h, w, C) float array, C divisible by `groups`.
    up_kernels: (N, 2h, 2w, groups*s**2) from the paired `A2UDownsample`.

  Returns:
    (N, 2h, 2w, C) array in x's dtype.
  """

  up_kernel_size: int = 3
  groups: int = 1
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, up_kernels: jax.Array) -> jax.Array:
    sow_largest_tap(self, up_kernels, self.up_kernel_size**2)
    return ops.reassemble_up(x, up_kernels.astype(x.dtype), kernel_size=self.up_kernel_size,
                             groups=self.groups, implementation=self.implementation)
