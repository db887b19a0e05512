"""The resamplers (2x resampling operators) behind one interface: `make_resampler`.

Every operator is a pair of Flax modules for 2x resampling of NHWC maps:

* ``down(x, train=False) -> (y, context)``: (N, H, W, C) -> (N, H/2, W/2, C), plus what
  the paired upsampling needs (max-pooling indices, IndexNet's decoder index map, A2U's up
  kernels). Operators that only upsample have no down module (`Resampler.down` is None):
  the host network keeps its own downsampling (a strided convolution).
* ``up(x, context=None, guide=None) -> y``: (N, h, w, C) -> (N, 2h, 2w, C). `guide` is the
  encoder feature at the output resolution, (N, 2h, 2w, C_guide); FADE and SAPA need it
  (`Resampler.needs_guide`), the others ignore it.

Names (`RESAMPLERS`) and their options:

  nearest        nearest-neighbour 2x (no parameters).
  bilinear       bilinear 2x, half-pixel centres (no parameters).
  deconv         transposed convolution, kernel 4, stride 2 (`kernel_size`).
  pixel_shuffle  down: space-to-depth + 1x1 conv 4C -> C; up: conv C -> 4C (`kernel_size`,
                 default 3) + depth-to-space (Shi et al., CVPR 2016).
  max_unpool     down: 2x2 max pooling with indices; up: unpooling to those positions
                 (SegNet, Badrinarayanan et al., TPAMI 2017).
  carafe         content-aware reassembly (Wang et al., ICCV 2019): 1x1 compressor to
                 `compressed_channels` (64), `encoder_kernel_size` (3) content encoder,
                 softmax kernels of `up_kernel_size` (5), `groups` (1).
  indexnet       learned index maps (Lu et al., ICCV 2019): `index` "holistic" (one map for
                 all channels), "depthwise_o2o" or "depthwise_m2o" (a map per channel),
                 `nonlinear` (conv-BN-ReLU6-conv index block), `context` (4x4 index conv).
  a2u            affinity-aware kernels (Dai et al., CVPR 2021): `share`, `rank`, `groups`,
                 `up_kernel_size` (3), `encode_kernel_size` (6), `norm_groups` (32),
                 `implementation` of the reassembly; the modules are `layers.A2UDownsample`
                 and `layers.A2UUpsample`.
  fade           encoder + decoder kernels with a gate (Lu et al., ECCV 2022):
                 `up_kernel_size` (5), `embedding_dim` (64), `lite` (FADE-Lite's depthwise
                 content encoder). Needs the guide.
  sapa           similarity-aware point affiliation (Lu et al., NeurIPS 2022):
                 `up_kernel_size` (5), `embedding_dim` (64). Needs the guide.
  dysample       learned sampling offsets (Liu et al., ICCV 2023): `groups` (4), `style`
                 "lp" or "pl", `dynamic_scope`.

Adding an operator: write its up module (and a down module if it hands context), then one
`_register(...)` line below; the tests in tests/test_resamplers.py iterate over
`RESAMPLERS`, so it is covered by the shape, gradient and determinism checks at once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from a2u_jax import layers, ops
from a2u_jax.batch_norm import BatchNorm
from a2u_jax import resample_ops as rops

Dtype = Any


class NearestUp(nn.Module):
  """Nearest-neighbour 2x upsampling, (N, h, w, C) -> (N, 2h, 2w, C); no parameters."""

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    return rops.nearest_up(x)


class BilinearUp(nn.Module):
  """Bilinear 2x upsampling with half-pixel centres (PyTorch align_corners=False),
  (N, h, w, C) -> (N, 2h, 2w, C); no parameters."""

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    return rops.bilinear_up(x)


class DeconvUp(nn.Module):
  """Transposed convolution C -> C, stride 2 (Zeiler & Fergus, 2014; the "Conv/2-Deconv"
  row of IndexNet's comparison), (N, h, w, C) -> (N, 2h, 2w, C).

  The exact-2x PyTorch layer for every kernel size k: ConvTranspose2d(C, C, k, stride=2,
  padding=(k - 1) // 2, output_padding=k % 2). Parameters: a kernel_size^2 x C x C kernel
  (Flax does not flip it: PyTorch's weight (C_in, C_out, k, k) is this kernel flipped in
  both spatial axes) and a bias.
  """

  kernel_size: int = 4
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    k = self.kernel_size
    # PyTorch's padding and output_padding, as padding of the stride-dilated input: k - 1 - p
    # before, k - 1 - p + k % 2 after. (Flax's "SAME" agrees for even k; for odd k it puts
    # the longer side first, shifting the output by one pixel.)
    before = k - 1 - (k - 1) // 2
    padding = (before, before + k % 2)
    return nn.ConvTranspose(x.shape[-1], (k, k), strides=(2, 2), padding=(padding, padding),
                            dtype=self.dtype, name="deconv")(x)


class SpaceToDepthDown(nn.Module):
  """Space-to-depth (4C channels) and a 1x1 conv back to C, (N, H, W, C) ->
  (N, H/2, W/2, C); context None."""

  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name="proj")(
        rops.space_to_depth(x)), None


class PixelShuffleUp(nn.Module):
  """Sub-pixel convolution (Shi et al., CVPR 2016): a conv C -> 4C, then depth-to-space,
  (N, h, w, C) -> (N, 2h, 2w, C)."""

  kernel_size: int = 3
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    y = nn.Conv(4 * x.shape[-1], (self.kernel_size,) * 2, dtype=self.dtype, name="expand")(x)
    return ops.pixel_shuffle(y, 2)


class MaxPoolDown(nn.Module):
  """2x2 max pooling (SegNet, Badrinarayanan et al., TPAMI 2017), (N, H, W, C) ->
  (N, H/2, W/2, C); the context is where each maximum was (int32 index i*2 + j)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return rops.max_pool_with_indices(x)


class MaxUnpoolUp(nn.Module):
  """Max-unpooling: each value of (N, h, w, C) goes back to its pooling window's recorded
  position in (N, 2h, 2w, C), zeros elsewhere; no parameters."""

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    if context is None:
      raise ValueError("max_unpool: the up module needs the indices from its MaxPoolDown")
    return rops.max_unpool(x, context)


def _softmax_taps(logits: jax.Array, groups: int) -> jax.Array:
  shape = logits.shape
  return jax.nn.softmax(logits.reshape(shape[:-1] + (groups, -1)), axis=-1).reshape(shape)


class CARAFEUp(nn.Module):
  """CARAFE (Wang et al., "Content-Aware ReAssembly of FEatures", ICCV 2019).

  A 1x1 compressor (C -> compressed_channels) and a content encoder conv predict
  4 * groups * up_kernel_size^2 logits per low-resolution pixel; pixel-shuffled to the
  output resolution and softmax-normalised per group, they reassemble x with
  `ops.reassemble_up` (channel c uses kernel group c // (C / groups)).
  (N, h, w, C) -> (N, 2h, 2w, C).
  """

  up_kernel_size: int = 5
  encoder_kernel_size: int = 3
  compressed_channels: int = 64
  groups: int = 1
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    k = self.up_kernel_size
    compressed = nn.Conv(self.compressed_channels, (1, 1), dtype=self.dtype,
                         name="compressor")(x)
    logits = nn.Conv(4 * self.groups * k * k, (self.encoder_kernel_size,) * 2,
                     kernel_init=nn.initializers.normal(1e-3), dtype=self.dtype,
                     name="content_encoder")(compressed)
    kernels = _softmax_taps(ops.pixel_shuffle(logits, 2), self.groups)
    layers.sow_largest_tap(self, kernels, k * k)
    return ops.reassemble_up(x, kernels.astype(x.dtype), kernel_size=k, groups=self.groups)


class IndexNetDown(nn.Module):
  """IndexNet's index block and index-guided pooling (Lu et al., "Indices Matter", ICCV
  2019), (N, H, W, C) -> (N, H/2, W/2, C) and the decoder index map (N, H, W, 1 or C).

  Index logits (N, H/2, W/2, 4) for "holistic" or (N, H/2, W/2, C, 4) for the depthwise
  variants ("o2o": one depthwise conv per window position; "m2o": one full conv per
  position); sigmoid gives the decoder index map, a softmax over the 4 positions of that
  the encoder index map; both are pixel-shuffled to (N, H, W, 1 or C). Returns
  (4 * avg_pool(encoder_index * x), decoder_index).
  """

  index: str = "depthwise_m2o"
  nonlinear: bool = True
  context: bool = True
  axis_name: str | None = None
  dtype: Dtype | None = None

  def _conv(self, features: int, groups: int, name: str):
    size, pad = (4, 1) if self.context else (2, 0)
    return nn.Conv(features, (size, size), strides=(2, 2), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, dtype=self.dtype, name=name)

  def _branch(self, x, features: int, groups: int, train: bool, name: str):
    y = self._conv(features, groups, f"{name}_conv")(x)
    if self.nonlinear:
      # PyTorch's BatchNorm2d, as IndexNet's (unbiased running variance, unlike nn.BatchNorm).
      y = BatchNorm(axis_name=self.axis_name, dtype=self.dtype, name=f"{name}_bn")(y, train)
      y = jnp.clip(y, 0.0, 6.0)  # ReLU6
      y = nn.Conv(y.shape[-1] if self.index != "holistic" else 4, (1, 1),
                  feature_group_count=groups if self.index == "depthwise_o2o" else 1,
                  use_bias=False, dtype=self.dtype, name=f"{name}_mix")(y)
    return y

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    if self.index == "holistic":
      logits = self._branch(x, 2 * c if self.nonlinear else 4, 1, train, "index")[..., None, :]
    elif self.index in ("depthwise_o2o", "depthwise_m2o"):
      groups = c if self.index == "depthwise_o2o" else 1
      logits = jnp.stack([self._branch(x, c, groups, train, f"index{t}") for t in range(4)],
                         axis=-1)
    else:
      raise ValueError(f"indexnet: `index` must be 'holistic', 'depthwise_o2o' or "
                       f"'depthwise_m2o', got {self.index!r}")
    decoder = jax.nn.sigmoid(logits)
    encoder = jax.nn.softmax(decoder, axis=-1)
    layers.sow_largest_tap(self, encoder, 4)

    def shuffle(index):  # (N, h, w, C', 4) -> (N, 2h, 2w, C')
      return ops.pixel_shuffle(index.reshape(index.shape[:3] + (-1,)), 2)

    return rops.index_pool(x, shuffle(encoder).astype(x.dtype)), shuffle(decoder)


class IndexNetUp(nn.Module):
  """IndexNet's index-guided upsampling: decoder_index * nearest_up(x),
  (N, h, w, C) -> (N, 2h, 2w, C); no parameters."""

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    if context is None:
      raise ValueError("indexnet: the up module needs the index map from its IndexNetDown")
    return context.astype(x.dtype) * rops.nearest_up(x)


class FADEUp(nn.Module):
  """FADE (Lu et al., "Fusing the Assets of Decoder and Encoder", ECCV 2022; `lite`:
  FADE-Lite), (N, h, w, C) + guide (N, 2h, 2w, C') -> (N, 2h, 2w, C).

  Kernels from both the encoder guide (high resolution) and the decoder map (low
  resolution, the same content encoder applied then nearest-upsampled), and a gate from
  the decoder map that mixes the guide with the reassembled decoder map:
  out = gate * guide + (1 - gate) * CARAFE(x). A guide whose width differs from x is
  first aligned by a 1x1 conv (FADE's optional aligner)."""

  up_kernel_size: int = 5
  embedding_dim: int = 64
  lite: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    if guide is None:
      raise ValueError("fade: needs `guide`, the encoder feature at the output resolution")
    k = self.up_kernel_size
    uniform = nn.initializers.xavier_uniform()
    conv = lambda features, size, name, **kw: nn.Conv(  # noqa: E731
        features, (size, size), kernel_init=uniform, dtype=self.dtype, name=name, **kw)
    gate = jax.nn.sigmoid(rops.nearest_up(conv(1, 1, "gate")(x)))
    width = k * k if self.lite else self.embedding_dim
    encoded_guide = conv(width, 1, "compress_guide")(guide)
    encoded_x = conv(width, 1, "compress_x", use_bias=False)(x)
    content = conv(k * k, 3, "content_encoder",
                   feature_group_count=k * k if self.lite else 1)
    kernels = jax.nn.softmax(content(encoded_guide) + rops.nearest_up(content(encoded_x)),
                             axis=-1)
    if guide.shape[-1] != x.shape[-1]:
      guide = conv(x.shape[-1], 1, "align")(guide)
    layers.sow_largest_tap(self, kernels, k * k)
    up = ops.reassemble_up(x, kernels.astype(x.dtype), kernel_size=k)
    return gate * guide.astype(x.dtype) + (1 - gate) * up


class SAPAUp(nn.Module):
  """SAPA (Lu et al., "Similarity-Aware Point Affiliation", NeurIPS 2022), (N, h, w, C) +
  guide (N, 2h, 2w, C') -> (N, 2h, 2w, C).

  Queries from the (layer-normalised) encoder guide, keys from the decoder map;
  each output pixel's kernel is the softmax of its similarity with the K x K keys around
  its low-resolution position (out-of-range keys: logit 0), reassembling the decoder map
  itself (the values are not normalised)."""

  up_kernel_size: int = 5
  embedding_dim: int = 64
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    if guide is None:
      raise ValueError("sapa: needs `guide`, the encoder feature at the output resolution")
    init = nn.initializers.truncated_normal(0.02)
    query = nn.Dense(self.embedding_dim, kernel_init=init, dtype=self.dtype, name="query")(
        nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm_guide")(guide))
    key = nn.Dense(self.embedding_dim, kernel_init=init, dtype=self.dtype, name="key")(
        nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm_x")(x))
    kernels = jax.nn.softmax(rops.local_similarity(query, key, self.up_kernel_size), axis=-1)
    layers.sow_largest_tap(self, kernels, self.up_kernel_size**2)
    return ops.reassemble_up(x, kernels.astype(x.dtype), kernel_size=self.up_kernel_size)


class DySampleUp(nn.Module):
  """DySample (Liu et al., "Learning to Upsample by Learning to Sample", ICCV 2023):
  bilinear point sampling at learned offsets from the bilinear positions,
  (N, h, w, C) -> (N, 2h, 2w, C).

  A 1x1 conv predicts 2 x groups offsets per output pixel ("lp": on the low-resolution map
  then pixel-shuffled; "pl": on the pixel-shuffled map), scaled by 0.25 (or by
  0.5 * sigmoid(scope) with `dynamic_scope`) and added to the initial positions
  (+-0.25 input pixels: bilinear upsampling). The conv starts at N(0, 0.001), so a fresh
  DySample is almost exactly bilinear upsampling. Borders are clamped.
  """

  groups: int = 4
  style: str = "lp"
  dynamic_scope: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, context=None, guide=None):
    n, h, w, c = x.shape
    g = self.groups
    if c % g:
      raise ValueError(f"dysample: channels ({c}) must be divisible by groups ({g})")
    if self.style == "lp":
      source, out_channels = x, 2 * g * 4
    elif self.style == "pl":
      if c % (4 * g):
        raise ValueError(f"dysample style 'pl': channels ({c}) must be divisible by 4 x "
                         f"groups ({4 * g})")
      source, out_channels = ops.pixel_shuffle(x, 2), 2 * g
    else:
      raise ValueError(f"dysample: `style` must be 'lp' or 'pl', got {self.style!r}")
    offset = nn.Conv(out_channels, (1, 1), kernel_init=nn.initializers.normal(1e-3),
                     dtype=self.dtype, name="offset")(source)
    if self.dynamic_scope:
      scope = nn.Conv(out_channels, (1, 1), use_bias=False, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, name="scope")(source)
      offset = offset * jax.nn.sigmoid(scope) * 0.5
    else:
      offset = offset * 0.25
    if self.style == "lp":
      offset = ops.pixel_shuffle(offset, 2)  # (N, 2h, 2w, 2G), channel xy*G + g
    offset = offset.reshape(n, 2 * h, 2 * w, 2, g)
    # Initial positions: output sub-pixel (a, b) sits at (+-0.25, +-0.25) input pixels.
    sub = jnp.array([-0.25, 0.25], offset.dtype)
    initial_x = jnp.tile(sub, w)[None, None, :, None]
    initial_y = jnp.tile(sub, h)[None, :, None, None]
    offset = offset + jnp.stack([jnp.broadcast_to(initial_x, (1, 2 * h, 2 * w, 1)),
                                 jnp.broadcast_to(initial_y, (1, 2 * h, 2 * w, 1))], axis=3)
    ix, iy = rops.dysample_positions(offset)
    if self.is_mutable_collection("intermediates"):  # the weights exist only for the readout
      layers.sow_largest_tap(self, rops.bilinear_weights(ix, iy, h, w), 4)
    return rops.bilinear_sample_border(x, ix, iy)


@dataclasses.dataclass(frozen=True)
class Resampler:
  """A named pair of modules; `down()` / `up()` build fresh modules (pass `name=`)."""

  name: str
  make_up: Callable[..., nn.Module]
  make_down: Callable[..., nn.Module] | None = None
  needs_guide: bool = False
  options: dict[str, Any] = dataclasses.field(default_factory=dict)  # every option's value

  @property
  def paired(self) -> bool:
    """Whether the operator has its own downsampling that hands context to `up`."""
    return self.make_down is not None

  def down(self, **kwargs) -> nn.Module | None:
    return None if self.make_down is None else self.make_down(**kwargs)

  def up(self, **kwargs) -> nn.Module:
    return self.make_up(**kwargs)


_FACTORIES: dict[str, Callable[..., Resampler]] = {}


def _register(name: str, factory: Callable[..., Resampler]) -> None:
  _FACTORIES[name] = factory


def _options(name: str, options: dict, allowed: dict[str, Any]) -> dict:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; expected some of "
                     f"{', '.join(sorted(allowed)) or '(none)'}")
  return {**allowed, **options}


# Kernel sizes that must be odd: the kernel is centred on its pixel.
_ODD_OPTIONS = ("up_kernel_size", "encoder_kernel_size")


def _check_ranges(name: str, chosen: dict, defaults: dict) -> None:
  """Every integer option is a positive int (odd where centred), every flag a bool, so a
  bad value fails when the operator is made, not inside its first call."""
  for option, default in defaults.items():
    value = chosen[option]
    if isinstance(default, bool):
      if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: `{option}` must be True or False, got {value!r}")
    elif isinstance(default, int):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: `{option}` must be a positive integer, got {value!r}")
      if option in _ODD_OPTIONS and value % 2 == 0:
        raise ValueError(f"{name}: `{option}` must be odd (a kernel centred on its pixel), "
                         f"got {value}")


def module_attributes(cls: type[nn.Module]) -> dict[str, Any]:
  """A Flax module class's own attributes (not Flax's `parent` and `name`) and defaults."""
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name") and f.init}


def _simple(name: str, up_cls, down_cls=None, needs_guide: bool = False,
            choices: dict[str, tuple] | None = None):
  up_fields = module_attributes(up_cls)
  down_fields = {} if down_cls is None else module_attributes(down_cls)

  def factory(**options) -> Resampler:
    chosen = _options(name, options, {**up_fields, **down_fields})
    for option, allowed in (choices or {}).items():
      if chosen[option] not in allowed:
        raise ValueError(f"{name}: `{option}` must be one of {', '.join(map(repr, allowed))}, "
                         f"got {chosen[option]!r}")
    _check_ranges(name, chosen, {**up_fields, **down_fields})
    up_kw = {k: chosen[k] for k in up_fields}
    down_kw = {k: chosen[k] for k in down_fields}
    return Resampler(
        name, make_up=lambda **kw: up_cls(**up_kw, **kw),
        make_down=None if down_cls is None else (lambda **kw: down_cls(**down_kw, **kw)),
        needs_guide=needs_guide, options=chosen)

  return factory


_register("nearest", _simple("nearest", NearestUp))
_register("bilinear", _simple("bilinear", BilinearUp))
_register("deconv", _simple("deconv", DeconvUp))
_register("pixel_shuffle", _simple("pixel_shuffle", PixelShuffleUp, SpaceToDepthDown))
_register("max_unpool", _simple("max_unpool", MaxUnpoolUp, MaxPoolDown))
_register("carafe", _simple("carafe", CARAFEUp))
_register("indexnet", _simple("indexnet", IndexNetUp, IndexNetDown, choices={
    "index": ("holistic", "depthwise_o2o", "depthwise_m2o")}))
_register("a2u", _simple("a2u", layers.A2UUpsample, layers.A2UDownsample, choices={
    "implementation": (None,) + tuple(ops.IMPLEMENTATIONS)}))
_register("fade", _simple("fade", FADEUp, needs_guide=True))
_register("sapa", _simple("sapa", SAPAUp, needs_guide=True))
_register("dysample", _simple("dysample", DySampleUp, choices={"style": ("lp", "pl")}))

RESAMPLERS: tuple[str, ...] = tuple(_FACTORIES)


def make_resampler(name: str, **options) -> Resampler:
  """The operator `name` (see the module docstring for names and options)."""
  if name not in _FACTORIES:
    raise ValueError(f"unknown resampler {name!r}; expected one of {', '.join(RESAMPLERS)}")
  return _FACTORIES[name](**options)


def parameter_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
