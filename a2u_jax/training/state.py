"""Train state, the authors' optimiser (per-group Adam learning rates, step decay) and model
construction from a config."""

from __future__ import annotations

import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from a2u_jax import convert, models

# Top-level parameter names that the ImageNet ResNet-34 initialises (the authors' lr / 100
# group); everything else (kernel generators, ASPP, skips, decoder, head) is new.
ENCODER_PREFIXES = ("stem", "layer")
log = logging.getLogger(__name__)


class TrainState(train_state.TrainState):
  """Flax TrainState plus the batch-norm statistics."""
  batch_stats: Any = None


# config.dtype -> the network's compute dtype. Parameters, Adam's moments, the batch
# statistics and the loss stay float32 in every case: "bfloat16" is mixed precision (the
# layers compute in bfloat16, the reductions accumulate in float32; `models.MattingNet`),
# and its gradients reach the float32 parameters through their casts, in float32.
# float64 (with jax_enable_x64) computes the step exactly enough to compare layouts.
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def model_from_config(config: ml_collections.ConfigDict, axis_name: str | None = None
                      ) -> models.MattingNet:
  """The matting network of `config.model` (compute dtype from `config.dtype`)."""
  dtype = COMPUTE_DTYPES[config.dtype]
  return models.build_model(
      {**model_options(config), "axis_name": axis_name, "dtype": dtype})


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model.json options of a model checkpoint made from this config: the resampler,
  its options and the dropout rate."""
  model = config.model.to_dict()
  options = {"resampler": model["resampler"]}
  if model.get("resampler_options"):
    options["resampler_options"] = dict(model["resampler_options"])
  if "dropout_rate" in model:
    options["dropout_rate"] = model["dropout_rate"]
  return options


def parameter_group(path: tuple[str, ...]) -> str:
  return "encoder" if path[0].startswith(ENCODER_PREFIXES) else "new"


def learning_rate_schedules(config: ml_collections.ConfigDict) -> dict[str, optax.Schedule]:
  """Per-group schedules: lr x 0.1 after each epoch in `config.decay_epochs`."""
  steps_per_epoch = config.steps_per_epoch
  boundaries = {int(epoch * steps_per_epoch): config.decay_factor
                for epoch in config.decay_epochs}
  return {
      "new": optax.piecewise_constant_schedule(config.learning_rate, boundaries),
      "encoder": optax.piecewise_constant_schedule(
          config.learning_rate / config.encoder_lr_divisor, boundaries),
  }


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (PyTorch defaults: b1 0.9, b2 0.999, eps 1e-8) with the two learning-rate groups."""
  schedules = learning_rate_schedules(config)

  def labels(params):
    return flax.traverse_util.path_aware_map(lambda path, _: parameter_group(path), params)

  return optax.multi_transform(
      {group: optax.adam(schedule) for group, schedule in schedules.items()}, labels)


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       model: models.MattingNet) -> TrainState:
  """Initialised state (Xavier init as the authors'), optionally with ImageNet weights."""
  crop = config.crop_size
  # Jitted: eager initialisation of this network takes ~4x longer than compiling it.
  variables = jax.jit(model.init)(rng, jnp.zeros((1, crop, crop, 4), jnp.float32))
  path = config.init.torchvision_resnet34
  if path:
    try:
      state_dict = convert.load_torch_checkpoint(path)
    except Exception as error:
      raise ValueError(f"config.init.torchvision_resnet34: cannot read {path}: {error}"
                       ) from error
    variables = convert.from_torchvision_resnet34(state_dict, variables)
    log.info("encoder initialised from %s", path)
  else:
    log.warning("config.init.torchvision_resnet34 is not set: the encoder starts from "
                    "random weights (the paper starts from ImageNet weights)")
  variables = jax.tree.map(jnp.asarray, variables)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           tx=make_optimizer(config))


def count_parameters(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
