"""Flax linen modules of A2U: the kernel generator and drop-in down/upsampling layers.

Layout is NHWC throughout. See docs/design.md §2.1 for the generator's definition. The
functional pieces (the reassembly, adaptive pooling, pixel shuffle and the per-sample
depthwise encoding with its hand-written VJP) live in `a2u_jax.ops`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from a2u_jax import ops

Dtype = Any


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


def check_options(module: nn.Module) -> None:
  """Checks the A2U options `module` has, where it is made (`__post_init__`): counts are
  positive integers, `up_kernel_size` is odd, `share` a bool, `implementation` one of
  `ops.IMPLEMENTATIONS` or None. Raises ValueError naming the module and the option."""
  kind = type(module).__name__
  for name in ("up_kernel_size", "encode_kernel_size", "rank", "groups", "norm_groups"):
    if not hasattr(module, name):
      continue
    value = getattr(module, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{kind}: `{name}` must be a positive integer, got {value!r}.")
  if hasattr(module, "up_kernel_size") and module.up_kernel_size % 2 != 1:
    raise ValueError(f"{kind}: `up_kernel_size` must be odd and positive, got "
                     f"{module.up_kernel_size}.")
  if hasattr(module, "share") and not isinstance(module.share, bool):
    raise ValueError(f"{kind}: `share` must be True or False, got {module.share!r}.")
  implementation = getattr(module, "implementation", None)
  if implementation is not None and implementation not in ops.IMPLEMENTATIONS:
    raise ValueError(f"{kind}: `implementation` must be one of {ops.IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}.")


def _nonempty(x: jax.Array) -> jax.Array:
  """`x`, or one zero example in its place when its batch axis is empty: the layers run on
  it (making or using their variables as for any batch) and return none of it."""
  return x if x.shape[0] else jnp.zeros((1,) + x.shape[1:], x.dtype)


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

  def __post_init__(self):
    check_options(self)
    super().__post_init__()

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
    batch = x.shape[0]
    dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
    x = _nonempty(x).astype(dtype)
    n, h, w, c = x.shape
    s, k, d, g = self.up_kernel_size, self.encode_kernel_size, self.rank, self.groups
    taps_down = (2 * s)**2

    # Dynamic encoding kernels: channel j*C + c (unshare) / j (share) is rank j's kernel.
    pooled = ops.adaptive_avg_pool(x, k)
    banks = d if self.share else d * c
    encoded = []
    for name in ("u", "v"):
      bank = nn.Dense(banks, dtype=dtype, name=f"encode_{name}")(pooled)   # (N, k, k, banks)
      bank = bank.reshape(n, k, k, d, -1).transpose(0, 1, 2, 4, 3)         # (.., C or 1, d)
      out = ops.per_sample_depthwise(x, bank, 2, (k - 1) // 2)              # (N,h,w,C,d)
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

    up = ops.pixel_shuffle(up, 2).reshape(n, h, w, g, s * s)
    up = jax.nn.sigmoid(up)
    if s > 1:
      up = jax.nn.softmax(up, axis=-1)
    down = jax.nn.softmax(down.reshape(n, h // 2, w // 2, g, taps_down), axis=-1)
    return (down.reshape(n, h // 2, w // 2, g * taps_down)[:batch],
            up.reshape(n, h, w, g * s * s)[:batch])


class A2UDownsample(nn.Module):
  """2x downsampling with A2U kernels; also returns the paired upsampling kernels.

  It is the down module of `a2u_jax.resamplers.make_resampler("a2u")`, whose options are
  these attributes.

  Attributes: as `A2UKernelGenerator`, plus `implementation` of the reassembly.

  Call:
    x: (N, H, W, C) float array, H and W even, C divisible by `norm_groups` and `groups`.
    train: accepted for the resampler family's `down(x, train)` call; A2U has no batch
      statistics or dropout, so it computes the same either way.

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

  def __post_init__(self):
    check_options(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    del train  # see the docstring
    batch = x.shape[0]
    x = _nonempty(x)
    down_kernels, up_kernels = A2UKernelGenerator(
        up_kernel_size=self.up_kernel_size, encode_kernel_size=self.encode_kernel_size,
        rank=self.rank, groups=self.groups, share=self.share, norm_groups=self.norm_groups,
        dtype=self.dtype, name="generator")(x)
    sow_largest_tap(self, down_kernels, (2 * self.up_kernel_size)**2)
    y = ops.reassemble_down(x, down_kernels.astype(x.dtype),
                            kernel_size=2 * self.up_kernel_size, groups=self.groups,
                            implementation=self.implementation)
    return y[:batch], up_kernels[:batch]


class A2UUpsample(nn.Module):
  """2x upsampling with the kernels an `A2UDownsample` produced (no parameters); the up
  module of `a2u_jax.resamplers.make_resampler("a2u")`.

  Attributes:
    up_kernel_size: s, as given to the paired `A2UDownsample`.
    groups: kernel groups, as given to the paired `A2UDownsample`.
    implementation: reassembly implementation (None: the default).

  Call:
    x: (N, h, w, C) float array, C divisible by `groups`.
    up_kernels: (N, 2h, 2w, groups*s**2) from the paired `A2UDownsample`.
    guide: accepted for the resampler family's `up(x, context, guide)` call; unused.

  Returns:
    (N, 2h, 2w, C) array in x's dtype.
  """

  up_kernel_size: int = 3
  groups: int = 1
  implementation: str | None = None

  def __post_init__(self):
    check_options(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, up_kernels: jax.Array | None = None,
               guide: jax.Array | None = None) -> jax.Array:
    del guide  # see the docstring
    if up_kernels is None:
      raise ValueError("A2UUpsample needs the up kernels that its paired A2UDownsample "
                       "returned (`up_kernels`)")
    batch = x.shape[0]
    if not batch:
      x, up_kernels = _nonempty(x), _nonempty(up_kernels)
    sow_largest_tap(self, up_kernels, self.up_kernel_size**2)
    return ops.reassemble_up(x, up_kernels.astype(x.dtype), kernel_size=self.up_kernel_size,
                             groups=self.groups,
                             implementation=self.implementation)[:batch]
