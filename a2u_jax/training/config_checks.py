"""The configs' contract: what a training config (configs/*.py, overridden by
--config.x=y) may hold, checked before a run writes or trains anything.

`validate_config` fails fast, in one line naming the field and what it expected, on values
that would fail (or mislead) later: a run must not train for hours and then fail in its
first validation or checkpoint. `num_train_steps` and `validation_interval` read the two
fields whose -1 stands for "derived from the epochs".
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from a2u_jax import models, sad_rules
from a2u_jax.training import state as state_lib
from data_pipeline.files import NETWORK_STRIDE

# The two executors of the training protocol, both for every source (data_pipeline):
# "tf": the tf.data pipeline, the reference (needs the `train` extra); "jax":
# data_pipeline.jax_pipeline, composited on the accelerator (no TensorFlow).
PIPELINES = ("tf", "jax")
# Pipelines that went, and what replaced them.
_REMOVED_PIPELINES = {"numpy": "use 'jax' (same synthetic source, no TensorFlow)"}


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  """config.num_train_steps, or num_epochs * steps_per_epoch where it is -1."""
  if config.num_train_steps >= 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * config.steps_per_epoch)


def validation_interval(config: ml_collections.ConfigDict) -> int:
  """Steps between validations: config.eval_every, or steps_per_epoch (every epoch, as the
  authors validate) where it is -1; 0 turns validation off."""
  every = config.eval_every
  if not isinstance(every, int) or isinstance(every, bool) or every < -1:
    raise ValueError(f"config.eval_every must be >= 0 (0: no validation), or -1 for every "
                     f"epoch (config.steps_per_epoch), got {every!r}")
  return config.steps_per_epoch if every == -1 else every


def validate_config(config: ml_collections.ConfigDict,
                    source_options: Callable[[ml_collections.ConfigDict], list[str]]
                    ) -> None:
  """Fails fast, naming the field, on values that would fail (or mislead) later.

  `source_options(config)`: the option names config.data.source takes (the same with
  either pipeline); the training loop, which builds the sources, gives it."""
  def positive(name):
    value = config[name]
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")

  for name in ("batch_size", "crop_size", "steps_per_epoch", "log_every",
               "checkpoint_every", "keep_checkpoints"):
    positive(name)
  total = config.num_train_steps
  if not isinstance(total, int) or isinstance(total, bool) or total < -1:
    raise ValueError(f"config.num_train_steps must be >= 0, or -1 for num_epochs * "
                     f"steps_per_epoch, got {total!r}")
  if config.crop_size % NETWORK_STRIDE:
    raise ValueError(f"config.crop_size must be a multiple of {NETWORK_STRIDE}, got "
                     f"{config.crop_size}")
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{devices} devices")
  if config.dtype not in state_lib.COMPUTE_DTYPES:
    raise ValueError(f"config.dtype must be one of {', '.join(state_lib.COMPUTE_DTYPES)}, "
                     f"got {config.dtype!r}")
  if config.dtype == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1")
  if config.model.resampler not in models.RESAMPLERS:
    raise ValueError(f"config.model.resampler must be one of {', '.join(models.RESAMPLERS)}, "
                     f"got {config.model.resampler!r}")
  try:
    state_lib.model_from_config(config).family()
  except ValueError as error:
    hint = ""
    if "unknown option" in str(error):  # e.g. --config.model.resampler changed alone
      hint = (f" (the options must be {config.model.resampler!r}'s: configs/resampler.py:"
              f"{config.model.resampler} lists them with their defaults)")
    raise ValueError(f"config.model.resampler_options: {error}{hint}") from None
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
  if config.data.pipeline in _REMOVED_PIPELINES:
    raise ValueError(f"config.data.pipeline={config.data.pipeline!r} was removed: "
                     f"{_REMOVED_PIPELINES[config.data.pipeline]}")
  if config.data.pipeline not in PIPELINES:
    raise ValueError(f"config.data.pipeline must be one of {', '.join(PIPELINES)}, got "
                     f"{config.data.pipeline!r}")
  accepted = source_options(config)
  foreign = [key for key in config.data.options if key not in accepted]
  if foreign:
    raise ValueError(
        f"config.data.options: data source {config.data.source!r} does not take "
        f"{', '.join(foreign)} (it takes {', '.join(accepted)}); these are another "
        f"source's options: start from a config made for this source (for synthetic data "
        f"configs/smoke.py, or configs/resampler.py:NAME,synthetic for an operator)")
  for key, value in config.data.options.items():
    if value is None:
      raise ValueError(f"config.data.options.{key} must be set for data source "
                       f"{config.data.source!r} (e.g. --config.data.options.{key}=PATH)")
  path = config.init.torchvision_resnet34
  if path and not os.access(path, os.R_OK):
    raise ValueError(f"config.init.torchvision_resnet34: cannot read {path}")
  _validate_ranges(config)
  _validate_validation(config)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _validate_ranges(config: ml_collections.ConfigDict) -> None:
  """The numeric fields' ranges, each named (the counts are checked above)."""
  def number(name, value, ok, rule):
    if not _is_number(value) or not ok(value):
      raise ValueError(f"config.{name} must be {rule}, got {value!r}")

  number("seed", config.seed, lambda v: _is_int(v) and 0 <= v < 2**32,
         "an integer in [0, 2**32)")
  number("model.dropout_rate", config.model.dropout_rate, lambda v: 0 <= v < 1,
         "in [0, 1) (the fraction of activations dropped)")
  number("encoder_lr_divisor", config.encoder_lr_divisor, lambda v: v > 0, "> 0")
  number("decay_factor", config.decay_factor, lambda v: 0 < v <= 1, "in (0, 1]")
  number("num_epochs", config.num_epochs, lambda v: v >= 0, ">= 0")
  number("image_summary_every", config.image_summary_every, lambda v: _is_int(v) and v >= 0,
         "an integer >= 0 (0: no image summaries)")
  decay = config.decay_epochs
  if not isinstance(decay, (tuple, list)) or not all(_is_number(v) and v >= 0 for v in decay):
    raise ValueError(f"config.decay_epochs must be a list of epochs >= 0, got {decay!r}")


def _validate_validation(config: ml_collections.ConfigDict) -> None:
  """Every config.validation field, at start-up (a run must not train for hours and then
  fail in its first validation)."""
  validation_interval(config)
  validation = config.validation
  size = validation.batch_size
  if not _is_int(size) or size <= 0:
    raise ValueError(f"config.validation.batch_size must be a positive integer, got {size!r}")
  if validation.sad_rule not in sad_rules.SAD_RULES:
    raise ValueError(f"config.validation.sad_rule must be one of "
                     f"{', '.join(sad_rules.SAD_RULES)}, got {validation.sad_rule!r}")
  readers = validation_readers()
  if validation.source == "composition1k":
    return  # reads config.validation.data_dir (checked where it is read)
  if validation.source not in readers:
    raise ValueError(f"config.validation.source must be one of composition1k, "
                     f"{', '.join(readers)}, got {validation.source!r}")
  parameters = inspect.signature(readers[validation.source]).parameters
  foreign = [key for key in validation.options if key not in parameters]
  if foreign:
    raise ValueError(f"config.validation.options: validation source {validation.source!r} "
                     f"does not take {', '.join(foreign)} (it takes "
                     f"{', '.join(parameters)})")
  missing = [name for name, parameter in parameters.items()
             if parameter.default is inspect.Parameter.empty and name not in validation.options]
  if missing:
    raise ValueError(f"config.validation.options: validation source {validation.source!r} "
                     f"needs {', '.join(missing)} (--config.validation.options.{missing[0]}=...)")
  if validation.source == "synthetic":
    options = {name: parameter.default for name, parameter in parameters.items()}
    options.update(validation.options)
    for name in ("count", "min_size"):
      if not _is_int(options[name]) or options[name] < 1:
        raise ValueError(f"config.validation.options.{name} must be a positive integer, "
                         f"got {options[name]!r}")
    if not _is_int(options["max_size"]) or options["max_size"] < options["min_size"]:
      raise ValueError(f"config.validation.options.max_size must be an integer >= min_size "
                       f"({options['min_size']}), got {options['max_size']!r}")


def validation_readers() -> dict[str, Callable]:
  """config.validation.source's readers (the `options` are their keyword arguments)."""
  import data_pipeline

  return {"synthetic": data_pipeline.synthetic_items,
          "alphamatting": data_pipeline.alphamatting_items,
          "folder": data_pipeline.folder_items,
          "tfds": data_pipeline.tfds_items}
