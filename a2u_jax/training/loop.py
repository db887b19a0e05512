"""The training loop around the pure steps: data, devices, checkpoints, logging, validation.

Everything a run writes goes to its workdir:
  checkpoints/   the last `keep_checkpoints` states (orbax; params, batch stats, optimiser,
                 step, and the data stream position)
  best/          the state with the lowest validation SAD
  model/         a model checkpoint (a2u_jax.checkpointing) of the final state, for
                 evaluation and prediction
  metrics.jsonl  one JSON object per logged step (step, loss, loss terms, learning rates,
                 grad norm, images/s; validation SAD/MSE on validation steps)
  tensorboard/   the same scalars, and composite / trimap / predicted / true alpha images
                 (when TensorFlow is installed: the `train` extra)
Rerunning the same command resumes from the last complete checkpoint: the data stream is a
deterministic function of (seed, batch index), so the resumed run sees the batches the
interrupted one would have seen, and logs the same losses.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from a2u_jax import checkpointing, distributed, inputs
from a2u_jax import metrics as matting_metrics, models, parallel, predict, sad_rules
from a2u_jax.training import state as state_lib
from a2u_jax.training import steps
from a2u_jax.training import workdir as workdir_lib
from data_pipeline.files import NETWORK_STRIDE

METRICS_FILE = "metrics.jsonl"
# Model checkpoints (checkpointing.load_model_checkpoint) in the workdir: the final model,
# and the one with the best validation SAD so far. checkpoints/ and best/ hold whole
# training states, for resuming.
MODEL_DIR = "model"
BEST_MODEL_DIR = "best_model"
# "tf": the tf.data compositing pipeline (every source; needs the `train` extra).
# "numpy": data_pipeline.SyntheticStream (synthetic data only; no TensorFlow).
# "jax": data_pipeline.jax_pipeline (the protocol composited on the accelerator; no
# TensorFlow; every source).
PIPELINES = ("tf", "numpy", "jax")
log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """The loss or the gradient stopped being finite."""


class PendingMetrics:
  """The metrics of the steps since the last read, left on the device.

  Reading them (`read`) waits for those steps, so the loop reads only where it needs the
  numbers: at log steps, and before anything that must not follow a non-finite step
  (a checkpoint, validation, image summaries, a stop).
  """

  def __init__(self):
    self._steps: list[tuple[int, dict[str, jax.Array]]] = []

  def __len__(self) -> int:
    return len(self._steps)

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Keeps step `step`'s metrics (device arrays, "finite" among them) unread."""
    self._steps.append((step, metrics))

  def read(self, last_checkpoint: int | None) -> dict[str, float]:
    """The latest step's metrics as floats ("finite" dropped); forgets the rest.

    Raises NonFiniteError naming the first pending step whose loss or gradient norm was not
    finite (that step left the state unchanged; `last_checkpoint` is the run's latest).
    """
    steps, self._steps = self._steps, []
    if not steps:
      raise ValueError("PendingMetrics.read: no step since the last read")
    for step, metrics in parallel.DataParallel.get(steps):
      if not metrics["finite"]:
        raise NonFiniteError(
            f"step {step}: the loss ({float(metrics['loss'])}) or the gradient norm "
            f"({float(metrics['grad_norm'])}) is not finite; that step did not update the "
            f"state, and no checkpoint was written after it (the last one is step "
            f"{last_checkpoint}). Lower config.learning_rate or check the data.")
    return {key: float(value) for key, value in metrics.items() if key != "finite"}


class Interrupted(Exception):
  """Training stopped on SIGINT (Ctrl-C) or SIGTERM before its last step.

  Attributes: signal_name ("SIGINT" or "SIGTERM"), step (the last step that ran and was
  logged), checkpoint_step (the checkpoint a rerun resumes from; None if there is none).
  """

  def __init__(self, signal_name: str, step: int, checkpoint_step: int | None):
    self.signal_name, self.step, self.checkpoint_step = signal_name, step, checkpoint_step
    saved = ("no checkpoint was written yet" if checkpoint_step is None else
             f"the checkpoint of step {checkpoint_step} is saved")
    super().__init__(f"stopped by {signal_name} after step {step}: {saved}; rerun the same "
                     f"command to resume")


class _StopRequests:
  """Turns the first SIGINT/SIGTERM into a request that the loop honours between steps
  (after the step's logs and checkpoints), so a stopped run loses nothing; a second
  Ctrl-C interrupts at once. Handlers are installed only in the main thread."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def _request(self, number, frame):
    del frame
    self.signal_name = signal.Signals(number).name
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log.warning("%s: stopping after the current step (Ctrl-C again stops at once, "
                "without saving it)", self.signal_name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for number in (signal.SIGINT, signal.SIGTERM):
        self._previous[number] = signal.signal(number, self._request)
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)


def num_train_steps(config: ml_collections.ConfigDict) -> int:
  if config.num_train_steps >= 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * config.steps_per_epoch)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on values that would fail (or mislead) later."""
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
  if config.data.pipeline not in PIPELINES:
    raise ValueError(f"config.data.pipeline must be one of {', '.join(PIPELINES)}, got "
                     f"{config.data.pipeline!r}")
  if config.data.pipeline == "numpy" and config.data.source != "synthetic":
    raise ValueError(f"config.data.pipeline='numpy' has only the synthetic source, got "
                     f"config.data.source={config.data.source!r}: real data goes through "
                     f"the JAX pipeline (--config.data.pipeline=jax) or the tf.data one "
                     f"(--config.data.pipeline=tf, with pip install 'a2u-jax[train]')")
  accepted = _source_options(config)
  foreign = [key for key in config.data.options if accepted is not None and key not in accepted]
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
  import inspect

  _validation_interval(config)
  validation = config.validation
  size = validation.batch_size
  if not _is_int(size) or size <= 0:
    raise ValueError(f"config.validation.batch_size must be a positive integer, got {size!r}")
  if validation.sad_rule not in sad_rules.SAD_RULES:
    raise ValueError(f"config.validation.sad_rule must be one of "
                     f"{', '.join(sad_rules.SAD_RULES)}, got {validation.sad_rule!r}")
  readers = _validation_readers()
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


def _validation_readers() -> dict[str, Callable]:
  """config.validation.source's readers (the `options` are their keyword arguments)."""
  import data_pipeline

  return {"synthetic": data_pipeline.synthetic_items,
          "alphamatting": data_pipeline.alphamatting_items,
          "folder": data_pipeline.folder_items,
          "tfds": data_pipeline.tfds_items}


def _validation_items(config: ml_collections.ConfigDict):
  """The validation set named by config.validation (its rule checked too, before training).

  "composition1k" reads config.validation.data_dir: a folder with image/ and trimap/ (and
  alpha/) subfolders, or else the TFDS data_dir of the prepared builder."""
  import data_pipeline

  validation = config.validation
  if validation.sad_rule not in sad_rules.SAD_RULES:
    raise ValueError(f"config.validation.sad_rule must be one of "
                     f"{', '.join(sad_rules.SAD_RULES)}, got {validation.sad_rule!r}")
  readers = _validation_readers()
  if validation.source == "composition1k":
    if not validation.data_dir:
      raise ValueError("config.validation.source='composition1k' needs "
                       "config.validation.data_dir: the TFDS data_dir where "
                       "data_pipeline.tfds_builders.prepare('composition1k', ...) wrote the "
                       "test set, or a folder with image/, trimap/ and alpha/")
    root = pathlib.Path(validation.data_dir).expanduser()
    if (root / "image").is_dir() and (root / "trimap").is_dir():
      items = data_pipeline.folder_items(root)
    else:
      items = data_pipeline.tfds_items("composition1k", str(root))
  elif validation.source not in readers:
    raise ValueError(f"config.validation.source must be one of composition1k, "
                     f"{', '.join(readers)}, got {validation.source!r}")
  else:
    items = readers[validation.source](**validation.options)
  if not len(items):
    raise ValueError(f"config.validation: source {validation.source!r} gave no images; "
                     f"validation needs at least one")
  return items


def _validation_interval(config: ml_collections.ConfigDict) -> int:
  """Steps between validations: config.eval_every, or steps_per_epoch (every epoch, as the
  authors validate) where it is -1; 0 turns validation off."""
  every = config.eval_every
  if not isinstance(every, int) or isinstance(every, bool) or every < -1:
    raise ValueError(f"config.eval_every must be >= 0 (0: no validation), or -1 for every "
                     f"epoch (config.steps_per_epoch), got {every!r}")
  return config.steps_per_epoch if every == -1 else every


def _source_options(config: ml_collections.ConfigDict) -> list[str] | None:
  """The option names config.data.source takes, or None where that needs TensorFlow and
  it is missing (building the source then says how to install it)."""
  import inspect

  import data_pipeline

  if config.data.pipeline == "numpy":
    function = data_pipeline.SyntheticStream
  elif config.data.pipeline == "jax":
    from data_pipeline import jax_pipeline
    if config.data.source not in jax_pipeline.SOURCES:
      raise ValueError(f"config.data.source must be one of {', '.join(jax_pipeline.SOURCES)} "
                       f"with config.data.pipeline='jax', got {config.data.source!r}")
    return jax_pipeline.source_options(config.data.source)
  else:
    if config.data.source not in data_pipeline.SOURCES:
      raise ValueError(f"config.data.source must be one of {', '.join(data_pipeline.SOURCES)}, "
                       f"got {config.data.source!r}")
    try:
      from data_pipeline import sources
    except ImportError:
      return None
    function = getattr(sources, f"{config.data.source}_source")
  return [name for name in inspect.signature(function).parameters if name != "self"]


def _training_source(config: ml_collections.ConfigDict):
  """The training data named by config.data (a tf.data Source or a SyntheticStream)."""
  import data_pipeline

  if config.data.pipeline == "numpy":
    return data_pipeline.SyntheticStream(**config.data.options)
  if config.data.pipeline == "jax":
    from data_pipeline import jax_pipeline
    return jax_pipeline.host_source(config.data.source, **config.data.options)
  try:
    data_pipeline.require_tensorflow(f"config.data.source={config.data.source!r} through "
                                     f"config.data.pipeline='tf'")
  except ImportError as error:
    hint = (" (or, for synthetic data, --config.data.pipeline=numpy)"
            if config.data.source == "synthetic" else "")
    raise ImportError(f"{error}{hint}") from None
  return data_pipeline.build_source(config.data.source, **config.data.options)


def _training_batches(source, runtime: parallel.DataParallel, **options):
  """Host batches (NumPy), or with the JAX pipeline batches already on the mesh."""
  import data_pipeline

  if isinstance(source, data_pipeline.SyntheticStream):
    return source.batches(**options)
  from data_pipeline import jax_pipeline
  if isinstance(source, jax_pipeline.HostSource):
    return runtime.composited(jax_pipeline.JaxStream(source, **options))
  return data_pipeline.train_batches(source, **options)


def make_train_step(config: ml_collections.ConfigDict, runtime: parallel.DataParallel
                    ) -> Callable:
  """`steps.train_step(state, batch, rng)` data-parallel over `runtime`: the batch split,
  the state and the key replicated, the state donated. The state's `apply_fn` must be a
  model built with `axis_name=parallel.AXIS` (`state_lib.model_from_config(config,
  axis_name=parallel.AXIS)`), so batch-norm statistics are synchronised across devices."""
  step = functools.partial(steps.train_step, axis_name=parallel.AXIS,
                           learning_rates=state_lib.learning_rate_schedules(config))
  return runtime.step(step, in_specs=(parallel.REPLICATED, parallel.SPLIT, parallel.REPLICATED),
                      out_specs=(parallel.REPLICATED, parallel.REPLICATED), donate_argnums=(0,))


def _checkpoint_managers(workdir: pathlib.Path, config: ml_collections.ConfigDict):
  """The last checkpoints and the best one. Collective: every process saves and restores.

  Both may save the same step at once; their own barrier names keep orbax's multi-host
  commit barriers (named by step) apart."""
  def processes(name):
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)

  latest = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           multiprocessing_options=processes("latest")))
  best = ocp.CheckpointManager(
      workdir / "best",
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: m["sad"], best_mode="min", create=True,
          multiprocessing_options=processes("best")))
  return latest, best


def _save(manager: ocp.CheckpointManager, state: state_lib.TrainState, config,
          metrics: dict[str, float] | None = None) -> None:
  step = int(state.step)
  position = {"step": step, "seed": int(config.seed), "batch_size": int(config.batch_size)}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position)),
      metrics=metrics)


def _restore(manager: ocp.CheckpointManager, state: state_lib.TrainState, config,
             sharding: jax.sharding.Sharding) -> tuple[state_lib.TrainState, int]:
  """The latest checkpoint's state, placed with `sharding` on every process (a
  multi-host restore must not land on another host's device), and its step."""
  step = manager.latest_step()
  if step is None:
    return state, 0
  _check_complete(manager, step)
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), jax.numpy.asarray(leaf).dtype,
                                        sharding=sharding), state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  except ValueError as error:
    if "do not match" not in str(error):
      raise
    first = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
    raise ValueError(
        f"{manager.directory}: the checkpoint at step {step} is the training state of "
        f"another network ({first} ...): a different config.model, or a run of a2u-jax "
        f"before model format 2 (A2U's modules were gen0..gen3). Resume it with the config "
        f"and version that wrote it, or use another --workdir") from None
  position = restored["data"]
  if position["seed"] != config.seed or position["batch_size"] != config.batch_size:
    raise ValueError(f"the checkpoint at step {step} was trained with seed "
                     f"{position['seed']} and batch size {position['batch_size']}; this run "
                     f"asks for {config.seed} and {config.batch_size}: use another --workdir")
  return restored["state"], step


def _check_complete(manager: ocp.CheckpointManager, step: int) -> None:
  """Raises ValueError naming checkpoint `step` when its folder lacks what a save writes
  (a copy or a disk that was interrupted), with the step to fall back to."""
  folder = pathlib.Path(manager.directory) / str(step)
  missing = [name for name in ("_CHECKPOINT_METADATA", "state", "data")
             if not (folder / name).exists()]
  if not missing:
    return
  earlier = [s for s in manager.all_steps() if s < step]
  fallback = (f"remove it to resume from step {max(earlier)}, the one before it" if earlier
              else "remove it to start from step 0")
  raise ValueError(f"{folder}: an incomplete checkpoint (no {', '.join(missing)}; an "
                   f"interrupted copy?): {fallback}")


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops records logged after `step` (by a run that was killed before checkpointing),
  and lines a killed run left torn (not a JSON record with a step)."""
  if not path.exists():
    return
  kept = []
  for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
    try:
      record = json.loads(line)
      logged = int(record["step"])
    except (ValueError, KeyError, TypeError):
      if line.strip():
        log.warning("%s: line %d is not a whole record (a run killed while writing it?); "
                    "dropped", path, number)
      continue
    if logged <= step:
      kept.append(line)
  path.write_text("".join(line + "\n" for line in kept))


class _Logger:
  """metrics.jsonl, and TensorBoard when TensorFlow is installed (on process 0)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self.enabled = enabled
    self.path = workdir / METRICS_FILE
    self.writer = None
    if not enabled:
      return
    try:
      from a2u_jax.quiet_tensorflow import import_tensorflow
      tf = import_tensorflow()
    except ImportError:
      log.info("TensorBoard summaries skipped: TensorFlow is not installed (pip install "
               "'a2u-jax[train]'); metrics go to %s", self.path)
      return
    self.tf = tf
    self.writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    if self.writer is None:
      return
    with self.writer.as_default(step=step):
      for key, value in values.items():
        self.tf.summary.scalar(key, value)

  def images(self, step: int, batch: dict[str, np.ndarray], prediction: np.ndarray) -> None:
    if self.writer is None:
      return
    count = min(4, prediction.shape[0])
    with self.writer.as_default(step=step):
      self.tf.summary.image("composite", batch["image"][:count], max_outputs=count)
      self.tf.summary.image("trimap", batch["trimap"][:count], max_outputs=count)
      self.tf.summary.image("alpha/predicted", np.clip(prediction[:count], 0, 1),
                            max_outputs=count)
      self.tf.summary.image("alpha/true", batch["alpha"][:count], max_outputs=count)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()


def validate(predictor: predict.Predictor, items, batch_size: int, sad_rule: str
             ) -> dict[str, float]:
  """Mean SAD and MSE (the papers' units) over evaluation items with ground truth.

  The SAD follows `sad_rule` (a name in `sad_rules.SAD_RULES`: "authors", their training's
  validation SAD of the float alpha, or "matlab", the published SAD of the saved 8-bit
  alpha); it is what chooses best_model/. The MSE is the published one (8-bit alpha).

  Every process of a multi-host run takes its slice of each global batch
  (`eval_batches`' shards), predicts it with `predictor` (over every process's devices,
  called by all together) and scores its images; the scores are gathered, so every
  process returns the same means (or raises the same error).
  """
  import data_pipeline

  sad = sad_rules.SAD_RULES[sad_rule]
  local = predictor.runtime.local_devices
  batch_size = -(-batch_size // local) * local
  scores = []  # per batch slot: (sad, mse, 1 a real image | 0 a filler | -1 no alpha)
  unscored = []
  for batch in data_pipeline.eval_batches(items, batch_size=batch_size,
                                          shard_index=jax.process_index(),
                                          num_shards=jax.process_count()):
    alphas = predictor(batch["image"], batch["trimap"])
    rows = []
    for i in np.flatnonzero(batch["valid"]):
      if not batch["has_alpha"][i]:
        unscored.append(batch["name"][i])
        rows.append((0.0, 0.0, -1.0))
        continue
      h, w = int(batch["height"][i]), int(batch["width"][i])
      alpha, gt, trimap = (alphas[i, :h, :w, 0], batch["alpha"][i, :h, :w, 0],
                           batch["trimap"][i, :h, :w, 0])
      rows.append((sad(alpha, gt, trimap),
                   matting_metrics.mse(inputs.quantize_alpha(alpha), gt, trimap), 1.0))
    scores += rows + [(0.0, 0.0, 0.0)] * (batch_size - len(rows))
  gathered = distributed.allgather(np.array(scores, np.float64).reshape(-1, 3))
  sad_values, mse, kind = gathered.reshape(-1, 3).T
  if (kind == -1).any():  # raised by every process, after the collective
    example = f", e.g. {unscored[0]}" if unscored else ""
    raise ValueError(f"{int((kind == -1).sum())} validation image(s) have no ground-truth "
                     f"alpha{example}; validation scores every image")
  real = kind == 1.0
  return {"sad": float(np.mean(sad_values[real])), "mse": float(np.nanmean(mse[real]))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       *, progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`; returns the last logged metrics.

  One run at a time per workdir (`workdir_lib.claim`: a second one is refused, naming the
  first), and never over another run's results without their checkpoints."""
  if not str(workdir).strip():
    raise ValueError("--workdir is empty; name the run's folder")
  try:
    return _train_and_evaluate(config, workdir, progress=progress)
  finally:
    workdir_lib.release(pathlib.Path(workdir).absolute())


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                        *, progress: bool) -> dict[str, Any]:
  # Before anything asks JAX for devices (validate_config does); train.py has already
  # started it when given an explicit coordinator.
  distributed.initialize(auto=config.distributed)
  validate_config(config)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # Building the source validates the data (folders, pairs, sizes) before anything slow.
  source = _training_source(config)
  eval_every = _validation_interval(config)
  items = _validation_items(config) if eval_every else []
  workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative paths
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir}: exists and is not a folder")
  workdir.mkdir(parents=True, exist_ok=True)
  lead = distributed.is_lead()
  workdir_lib.claim(workdir, lead=lead)  # before anything is written there
  if lead:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  runtime = parallel.DataParallel()
  model = state_lib.model_from_config(config, axis_name=parallel.AXIS)
  eval_model = state_lib.model_from_config(config)
  train_step = make_train_step(config, runtime)
  total_steps = num_train_steps(config)
  host_batch = config.batch_size // jax.process_count()

  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  state = state_lib.create_train_state(config, init_rng, model)
  latest, best = _checkpoint_managers(workdir, config)
  state, start_step = _restore(latest, state, config, runtime.replicated)
  logger = _Logger(workdir, lead)
  if lead:
    _truncate_metrics(logger.path, start_step)
    log.info("%s: %d parameters; %s from step %d to %d", workdir,
                 state_lib.count_parameters(state.params),
                 "resuming" if start_step else "starting", start_step, total_steps)

  batches = _training_batches(
      source, runtime, batch_size=host_batch, crop_size=config.crop_size, seed=config.seed,
      shard_index=jax.process_index(), num_shards=jax.process_count(),
      skip_batches=start_step)

  device_state = runtime.put(state)
  device_rng = runtime.put(dropout_rng)

  def predictor(device_state):
    return predict.Predictor(eval_model, {"params": device_state.params,
                                          "batch_stats": device_state.batch_stats},
                             runtime.devices)

  last: dict[str, Any] = {}
  bar = _progress_bar(start_step, total_steps, progress and lead)
  step = start_step
  # Where the run's time goes, logged at the end: the first step (which compiles the
  # training step), the other steps, validation (its first call compiles the
  # prediction) and checkpoints.
  spent = collections.Counter()
  if lead and step < total_steps:
    log.info("compiling the training step (the first step waits for it)")
  stop = _StopRequests()
  pending = PendingMetrics()
  read_at, read_step = time.perf_counter(), step  # images/s over the steps between reads
  try:
    with stop:
      while step < total_steps:
        started = time.perf_counter()
        batch = next(batches)
        device_state, step_metrics = train_step(device_state, runtime.shard(batch),
                                                device_rng)
        step += 1
        pending.add(step, step_metrics)
        first = step == start_step + 1
        validating = eval_every > 0 and (step % eval_every == 0 or step == total_steps)
        checkpointing_now = step % config.checkpoint_every == 0 or step == total_steps
        summarising = bool(config.image_summary_every) and (
            step % config.image_summary_every == 0)
        logging_now = step % config.log_every == 0 or step == total_steps
        stopping = step < total_steps and _any_process(stop.signal_name is not None)
        if first or logging_now or validating or checkpointing_now or summarising or stopping:
          last = pending.read(latest.latest_step())
          now = time.perf_counter()
          last["images_per_second"] = config.batch_size * (step - read_step) / (now - read_at)
          read_at, read_step = now, step
          bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_second']:.1f}")
        spent["first step (compiles)" if first else "other steps"] += (
            time.perf_counter() - started)
        if first and lead:
          log.info("first step done in %.1f s (including the compile)",
                   time.perf_counter() - started)
        bar.update(1)
        if logging_now:
          logger.scalars(step, last)
        if summarising:
          batch = runtime.local_batch(batch)
          try:
            logger.images(step, batch,
                          predictor(device_state)(batch["image"], batch["trimap"]))
          except Exception:
            # Image summaries must not cost the step's training either: save it first.
            _save(latest, runtime.get(device_state), config)
            raise
        # Everything a step logs is written before its checkpoint is: a run killed after
        # the checkpoint resumes past this step and would not log it again.
        if validating:
          started = time.perf_counter()
          try:
            values = validate(predictor(device_state), items, config.validation.batch_size,
                              config.validation.sad_rule)
          except Exception:
            # A validation that fails must not cost the step's training: save it first.
            _save(latest, runtime.get(device_state), config)
            raise
          spent["validation"] += time.perf_counter() - started
          logger.scalars(step, {f"validation/{k}": v for k, v in values.items()})
          last.update({f"validation/{k}": v for k, v in values.items()})
        started = time.perf_counter()
        if checkpointing_now or validating:
          host_state = runtime.get(device_state)  # once for every save of this step
        if checkpointing_now or validating:
          # Validation steps checkpoint too: best/ and best_model/ never hold a step that
          # a resume would not start after.
          _save(latest, host_state, config)
        if validating and not np.isfinite(values["sad"]):
          log.warning("step %d: the validation SAD is %s; best/ and best_model/ are not "
                      "chosen by it", step, values["sad"])
        elif validating:
          # best/ keeps the lowest validation SAD (by config.validation.sad_rule); on a tie
          # the later step wins, as the authors' `<=`. Unlike them, the first validation
          # counts too (their model_best.pth is first written after the second epoch).
          _save(best, host_state, config, metrics=values)
          if lead and best.best_step() == step:  # a model checkpoint, for predict/evaluate
            _save_model(workdir / BEST_MODEL_DIR, host_state, config)
        spent["checkpoints"] += time.perf_counter() - started
        if stopping:
          # Another process's signal stops this one too (at the same step).
          stop.signal_name = stop.signal_name or "SIGTERM"
          if step != latest.latest_step():
            _save(latest, runtime.get(device_state), config)
          break
  except KeyboardInterrupt:
    # A second Ctrl-C (or one outside the handlers' reach): the step under way is
    # dropped; the last checkpoint stays, and a rerun logs every later step once.
    latest.wait_until_finished()
    raise Interrupted("SIGINT", step, latest.latest_step()) from None
  finally:
    bar.close()
    latest.wait_until_finished()
    best.wait_until_finished()
    logger.flush()
  if step < total_steps:
    raise Interrupted(stop.signal_name, step, latest.latest_step())
  if lead:
    _save_model(workdir / MODEL_DIR, runtime.get(device_state), config)
  distributed.barrier("final model written")
  if lead and spent:
    log.info("time: %s", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items()))
  return last


def _save_model(directory: pathlib.Path, state: state_lib.TrainState, config) -> None:
  checkpointing.save_model_checkpoint(
      directory, {"params": state.params, "batch_stats": state.batch_stats},
      state_lib.model_options(config), force=True)


def _any_process(flag: bool) -> bool:
  """Whether `flag` is set in any process: processes stop at the same step even when a
  signal reaches them between different steps (a collective; free with one process)."""
  if jax.process_count() == 1:
    return flag
  return bool(distributed.allgather(np.array([flag], np.int32)).any())


def _progress_bar(start: int, total: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step",
              dynamic_ncols=True)
