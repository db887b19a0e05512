"""The A2U matting network (the authors' "adobe.yaml": ResNet-34 style, stride 16, ASPP).

Input (N, H, W, 4): ImageNet-normalised RGB plus trimap/255; H, W multiples of 16.
Output (N, H, W, 1): raw alpha (clip to [0, 1] at inference).

    encoder                                   decoder
    stem conv7x7+ABN ........ 1   ---skip0(input)-----------------> stage1 (up0) -> head
    A2U down (down0) ........ 1/2 ---skip1---------------> stage2 (up1)
    A2U down (down1) ........ 1/4
    layer1: 3 blocks 64 ..... 1/4 ---skip2------> stage3 (up2)
    layer2_1 (down2) + 3 .... 1/8 ---skip3--> stage4 (up3)
    layer3_1 (down3) + 3 .... 1/16 -> ASPP -> stage4

Every decoder stage upsamples 2x with the kernels its encoder level produced (A2U), adds
the skip and applies two residual blocks. The resampler is an operator of
`a2u_jax.resamplers` (`make_resampler`): A2U by default, or any other in its place
(`resampler="carafe"`, `"indexnet"`, `"fade"`, ...; see `MattingNet`). With
`resampler="baseline"` the network has no learned resampling (see `baseline_matting`).
The authors' checkpoints name the A2U modules differently; `a2u_jax.convert` maps them.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from a2u_jax import resamplers
from a2u_jax.models.blocks import ASPP, ConvABN, ResidualBlock, ResidualStage, conv
from data_pipeline.files import NETWORK_STRIDE

Dtype = Any
RESAMPLERS = ("baseline",) + resamplers.RESAMPLERS


class MattingNet(nn.Module):
  """Encoder-decoder matting network; see the module docstring for the layout.

  Attributes:
    resampler: "a2u" (the paper's model), "baseline" (stride-2 / bilinear; "bilinear" is
      the same network) or another name of `a2u_jax.resamplers.RESAMPLERS`. Operators with
      their own downsampling (max_unpool, indexnet, pixel_shuffle) replace the four
      encoder downsamplings as A2U does and hand their context to the paired decoder
      stage; upsampling-only operators keep the baseline's encoder. FADE and SAPA are
      guided by the encoder feature at the output resolution (stem, 1/2, layer1, layer2).
    resampler_options: options of that operator (`resamplers.make_resampler`), a mapping
      (None: its defaults). For A2U: share, up_kernel_size, encode_kernel_size, rank,
      groups, norm_groups, implementation.
    axis_name: device axis for synchronised batch statistics under pmap/shard_map.
    dtype: computation dtype (None: float32); parameters are float32 in every case.
      bfloat16 is mixed precision: convolutions, dense layers, activations and the
      feature maps between layers in bfloat16 (each layer casts its float32 parameters),
      while the batch and group normalisation statistics, the A2U generator's pooling and
      per-sample encoding, the reassembly's sums (`a2u_jax.ops`) and the output
      accumulate or are returned in float32. float64 (with `jax_enable_x64`, and the
      variables cast to float64) computes everything in float64.
    dropout_rate: the ASPP's dropout while training (the authors': 0.5).
  """

  resampler: str = "a2u"
  resampler_options: Any = None
  axis_name: str | None = None
  dtype: Dtype | None = None
  dropout_rate: float = 0.5

  def family(self) -> resamplers.Resampler:
    """The `a2u_jax.resamplers` operator this network resamples with ("baseline" is
    "bilinear"), with `resampler_options` and the network's dtype and axis_name. Raises
    ValueError for bad options."""
    name = "bilinear" if self.resampler == "baseline" else self.resampler
    options = dict(self.resampler_options or {})
    accepted = resamplers.make_resampler(name).options
    for key in ("dtype", "axis_name"):
      if key in accepted:
        options[key] = getattr(self, key)
    return resamplers.make_resampler(name, **options)

  @staticmethod
  def _down(family: resamplers.Resampler, level: int, train: bool):
    """Returns f(x) -> (x downsampled 2x, context for the paired upsampling), or None
    where the baseline's strided downsampling stays (upsampling-only operators)."""
    if not family.paired:
      return None
    module = family.down(name=f"down{level}")
    return lambda x: module(x, train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.resampler not in RESAMPLERS:
      raise ValueError(f"MattingNet: `resampler` must be one of {RESAMPLERS}, got "
                       f"{self.resampler!r}.")
    if x.ndim != 4 or x.shape[-1] != 4:
      raise ValueError(f"MattingNet: input must be (N, H, W, 4) (RGB + trimap), got shape "
                       f"{x.shape}.")
    if x.shape[1] % NETWORK_STRIDE or x.shape[2] % NETWORK_STRIDE:
      raise ValueError(f"MattingNet: input height and width must be multiples of "
                       f"{NETWORK_STRIDE}, got "
                       f"{x.shape[1]} x {x.shape[2]} (pad with reflection and crop back).")
    batch = x.shape[0]
    if batch == 0:
      if train:
        raise ValueError("MattingNet: the batch axis (0) of the input is empty; a training "
                         "step needs at least one image.")
      # An empty batch gives an empty output: one zero image runs instead (the variables
      # are made and used as for any batch) and none of it is returned.
      x = jnp.zeros((1,) + x.shape[1:], x.dtype)
    family = self.family()
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    inputs = x.astype(self.dtype or jnp.float32)

    # Encoder.
    def subsample(x):
      return x[:, ::2, ::2], None

    stem = ConvABN(64, 7, name="stem", **kw)(inputs, train)
    half, up0 = (self._down(family, 0, train) or subsample)(stem)
    quarter, up1 = (self._down(family, 1, train) or subsample)(half)
    l1 = ResidualStage((64, 64, 64), name="layer1", **kw)(quarter, train)

    def strided_block(features, name, x, down):
      block = ResidualBlock(features, stride=2, name=name, **kw)
      if down is None:
        return block(x, train), None
      return block(x, train, resample=down)

    l2, up2 = strided_block(128, "layer2_1", l1, self._down(family, 2, train))
    l2 = ResidualStage((128,) * 3, name="layer2_2", **kw)(l2, train)
    l3, up3 = strided_block(256, "layer3_1", l2, self._down(family, 3, train))
    l3 = ResidualStage((256,) * 3, name="layer3_2", **kw)(l3, train)
    context = ASPP(256, dropout_rate=self.dropout_rate, name="aspp", **kw)(l3, train)

    # Decoder: upsample with the paired kernels, add the skip, two residual blocks.
    # (context from the encoder, skip source, guide at the output resolution, widths).
    stages = [(up3, l2, l2, 256, 128, "3"), (up2, l1, l1, 128, 64, "2"),
              (up1, half, half, 64, 64, "1"), (up0, inputs, stem, 64, 32, "0")]
    y = context
    for up_context, skip_source, guide, skip_width, width, level in stages:
      skip = ConvABN(skip_width, 3, name=f"skip{level}", **kw)(skip_source, train)
      y = family.up(name=f"up{level}")(y, up_context, guide) + skip
      y = ResidualStage((width, width), name=f"stage{int(level) + 1}", **kw)(y, train)

    y = ConvABN(1, 3, name="head", **kw)(y, train)
    y = conv(1, 3, dtype=self.dtype, name="head_out")(y)
    return y[:batch].astype(jnp.promote_types(self.dtype or jnp.float32, jnp.float32))


def a2u_matting(share: bool = True, **overrides) -> MattingNet:
  """The authors' A2U matting network (adobe.yaml); `share=False` gives "unshare".

  `overrides` are A2U options (up_kernel_size, encode_kernel_size, rank, groups,
  norm_groups, implementation) or `MattingNet` attributes (axis_name, dtype,
  dropout_rate). Call as ``module.apply(variables, x, train=False)``; with
  ``train=True`` pass ``mutable=["batch_stats"]`` and ``rngs={"dropout": key}``.
  """
  network_fields = set(resamplers.module_attributes(MattingNet)) - {"resampler",
                                                                     "resampler_options"}
  options = {"share": share, **{k: v for k, v in overrides.items() if k not in network_fields}}
  return MattingNet(resampler="a2u", resampler_options=flax.core.FrozenDict(options),
                    **{k: v for k, v in overrides.items() if k in network_fields})


def baseline_matting(**overrides) -> MattingNet:
  """The paper's baseline: the same encoder-decoder without the kernel generators.

  The authors ship no baseline code; the paper describes it as plain stride-2
  downsampling in the encoder and bilinear upsampling in the decoder. We therefore use:
  stride-2 subsampling (x[:, ::2, ::2]) for the two stem downsamplings, which is what a
  stride-2 layer does to the positions it keeps; stride 2 in the first 3x3 conv of
  layer2_1 and layer3_1, as in a standard ResNet-34; and 2x bilinear upsampling
  (half-pixel centres, PyTorch's align_corners=False) in every decoder stage. Every
  other layer, width and parameter is shared with `a2u_matting`, so the difference in
  parameter count is exactly the four kernel generators.
  """
  return MattingNet(resampler="baseline", **overrides)


def build_model(model_config: dict[str, Any]) -> MattingNet:
  """`MattingNet` from a model.json dict (keys: resampler and the other attributes), as
  checkpoints, conversion and training describe a model."""
  model_config = dict(model_config)
  fields = set(resamplers.module_attributes(MattingNet))
  unknown = sorted(set(model_config) - fields)
  if unknown:
    raise ValueError(f"model options {', '.join(unknown)} are not MattingNet's (expected some "
                     f"of {', '.join(sorted(fields))}); an operator's own options, such as "
                     f"A2U's share, go under resampler_options")
  if model_config.get("resampler_options") is not None:  # hashable, like every attribute
    model_config["resampler_options"] = flax.core.FrozenDict(model_config["resampler_options"])
  return MattingNet(**model_config)
