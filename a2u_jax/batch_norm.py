"""Batch normalisation with PyTorch's statistics, the one implementation in the project: the
matting network's InPlaceABN (`models.blocks.ABN`) and IndexNet's index blocks
(`resamplers.IndexNetDown`) both build on it.

Flax's `nn.BatchNorm` updates the running variance with the biased batch variance; PyTorch's
`nn.BatchNorm2d`, `SyncBatchNorm`, InPlaceABN and IndexNet's SynchronizedBatchNorm use the
unbiased one, n / (n - 1) times larger, which is what their checkpoints hold.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


class BatchNorm(nn.Module):
  """PyTorch's batch norm over the last axis (BatchNorm2d in NHWC; SyncBatchNorm across
  `axis_name`).

  y = (x - mean) / sqrt(var + epsilon) * scale + bias, for x (..., C) of any float dtype;
  the statistics are computed in at least float32 (float64 where x is), y has `dtype` (x's
  by default).

  `train=True` normalises with the batch statistics over every axis but the last (the
  biased variance; averaged over `axis_name` when given, i.e. synchronised across devices)
  and updates the running statistics as PyTorch does: running = (1 - momentum) * running +
  momentum * batch, with the unbiased variance, n / (n - 1) times the biased one, n the
  values per channel over all devices. `train=False` normalises with the running statistics.

  Variables, named as Flax's nn.BatchNorm names them (checkpoints load either way): params
  `scale` (ones) and `bias` (zeros), batch_stats `mean` (zeros) and `var` (ones), float32 (C,).
  Subclasses change the scale (`effective_scale`) and add an activation (`activate`).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype | None = None

  def effective_scale(self, scale: jax.Array) -> jax.Array:
    return scale

  def activate(self, y: jax.Array) -> jax.Array:
    return y

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    # Statistics in at least float32 (bfloat16 inputs), float64 where the model is.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if train:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      mean = jnp.mean(x32, axes)
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    else:
      mean, var = running_mean.value, running_var.value
    y = (x32 - mean) * lax.rsqrt(var + self.epsilon) * self.effective_scale(scale) + bias
    return self.activate(y).astype(self.dtype or x.dtype)
