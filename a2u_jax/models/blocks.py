"""Building blocks of the matting network (NHWC), each written once and composed."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from a2u_jax.batch_norm import BatchNorm

Dtype = Any

LEAKY_SLOPE = 0.01
# The authors initialise every conv weight Xavier-normal with gain calculate_gain(
# "leaky_relu", 0.01) and every bias with 0 (docs/design.md §4).
XAVIER_LEAKY = nn.initializers.variance_scaling(2.0 / (1.0 + LEAKY_SLOPE**2), "fan_avg",
                                                "normal")


def conv(features: int, kernel_size: int, *, stride: int = 1, dilation: int = 1,
         groups: int = 1, use_bias: bool = False, dtype: Dtype | None = None,
         name: str | None = None) -> nn.Conv:
  """PyTorch-style conv: symmetric padding dilation*(k//2), Xavier-leaky init."""
  pad = dilation * (kernel_size // 2)
  return nn.Conv(features, (kernel_size, kernel_size), strides=stride,
                 padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 kernel_init=XAVIER_LEAKY, name=name)


class ABN(BatchNorm):
  """The authors' InPlaceABN: batch norm with a |gamma| + eps scale, then LeakyReLU(0.01).

  y = (x - mean) / sqrt(var + eps) * (|scale| + eps) + bias, followed by LeakyReLU(0.01)
  unless `activation` is False. Checkpoints store the raw (possibly negative) scale.
  Statistics, running statistics (PyTorch's update, with the unbiased batch variance),
  synchronisation over `axis_name` and variables are `a2u_jax.batch_norm.BatchNorm`'s.
  """

  activation: bool = True

  def effective_scale(self, scale: jax.Array) -> jax.Array:
    return jnp.abs(scale) + self.epsilon

  def activate(self, y: jax.Array) -> jax.Array:
    return nn.leaky_relu(y, LEAKY_SLOPE) if self.activation else y


class ConvABN(nn.Module):
  """conv (no bias) followed by ABN."""

  features: int
  kernel_size: int = 3
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  activation: bool = True
  axis_name: str | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv(self.features, self.kernel_size, stride=self.stride, dilation=self.dilation,
             groups=self.groups, dtype=self.dtype, name="conv")(x)
    return ABN(activation=self.activation, axis_name=self.axis_name, dtype=self.dtype,
               name="bn")(x, train)


class ResidualBlock(nn.Module):
  """conv3x3+ABN, [resample], conv3x3+ABN(no act), shortcut, add, LeakyReLU.

  The shortcut is the identity, or a 1x1 conv + ABN(no act) when the width changes or
  `stride` is 2. `resample`, when given, is called between the two convs with the first
  conv's output and returns (resampled, extra); the block then returns (out, extra): this
  is how the A2U encoder stages downsample inside the block (stride is then 2 for the
  shortcut only). Without it, `stride` applies to the first conv.
  """

  features: int
  stride: int = 1
  axis_name: str | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, resample=None):
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    first_stride = 1 if resample is not None else self.stride
    y = ConvABN(self.features, 3, stride=first_stride, name="conv1", **kw)(x, train)
    extra = None
    if resample is not None:
      y, extra = resample(y)
    y = ConvABN(self.features, 3, activation=False, name="conv2", **kw)(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = ConvABN(self.features, 1, stride=self.stride, activation=False, name="proj",
                  **kw)(x, train)
    out = nn.leaky_relu(y + x, LEAKY_SLOPE)
    return out if resample is None else (out, extra)


class ResidualStage(nn.Module):
  """A sequence of `ResidualBlock`s with the given widths (block i: widths[i])."""

  widths: Sequence[int]
  axis_name: str | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = ResidualBlock(width, axis_name=self.axis_name, dtype=self.dtype,
                        name=f"block{i + 1}")(x, train)
    return x


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with depthwise-separable dilated branches.

  Branches: 1x1 conv+ABN; for each dilation, depthwise 3x3 dilated conv+ABN then 1x1
  conv+ABN; image pooling (global mean, 1x1 conv+ABN, broadcast). Concatenated, projected
  by 1x1 conv+ABN, then dropout 0.5 while training (rng name "dropout").
  """

  features: int = 256
  dilations: Sequence[int] = (6, 12, 18)
  dropout_rate: float = 0.5
  axis_name: str | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(axis_name=self.axis_name, dtype=self.dtype)
    channels = x.shape[-1]
    branches = [ConvABN(self.features, 1, name="branch1", **kw)(x, train)]
    for i, dilation in enumerate(self.dilations):
      y = ConvABN(channels, 3, dilation=dilation, groups=channels, name=f"branch{i + 2}_dw",
                  **kw)(x, train)
      branches.append(ConvABN(self.features, 1, name=f"branch{i + 2}_pw", **kw)(y, train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = ConvABN(self.features, 1, name="image_pool", **kw)(pooled, train)
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (self.features,)))
    y = ConvABN(self.features, 1, name="project", **kw)(jnp.concatenate(branches, -1), train)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)
