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

from a2u_jax import distributed, inputs
from a2u_jax import metrics as matting_metrics, parallel, predict, sad_rules
from a2u_jax.training import bookkeeping, config_checks
from a2u_jax.training import state as state_lib
from a2u_jax.training import steps
from a2u_jax.training import workdir as workdir_lib

# Model checkpoints (checkpointing.load_model_checkpoint) in the workdir: the final model,
# and the one with the best validation SAD so far. checkpoints/ and best/ hold whole
# training states, for resuming.
MODEL_DIR = "model"
BEST_MODEL_DIR = "best_model"
log = logging.getLogger(__name__)
# train.py and the tests reach these through the loop (the private ones by the names they
# had when they were defined here).
NonFiniteError, PendingMetrics = bookkeeping.NonFiniteError, bookkeeping.PendingMetrics
num_train_steps = config_checks.num_train_steps
_Logger, _restore = bookkeeping.Logger, bookkeeping.restore
_truncate_metrics, _validation_interval = (bookkeeping.truncate_metrics,
                                           config_checks.validation_interval)


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


def _validation_items(config: ml_collections.ConfigDict):
  """The validation set named by config.validation (its rule checked too, before training).

  "composition1k" reads config.validation.data_dir: a folder with image/ and trimap/ (and
  alpha/) subfolders, or else the TFDS data_dir of the prepared builder."""
  import data_pipeline

  validation = config.validation
  if validation.sad_rule not in sad_rules.SAD_RULES:
    raise ValueError(f"config.validation.sad_rule must be one of "
                     f"{', '.join(sad_rules.SAD_RULES)}, got {validation.sad_rule!r}")
  readers = config_checks.validation_readers()
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


def validate_config(config: ml_collections.ConfigDict) -> None:
  """config_checks.validate_config, with the options of the data sources this loop builds."""
  config_checks.validate_config(config, _source_options)


def _source_options(config: ml_collections.ConfigDict) -> list[str]:
  """The option names config.data.source takes (one declaration, both pipelines)."""
  from data_pipeline import catalog

  if config.data.source not in catalog.SOURCES:
    raise ValueError(f"config.data.source must be one of {', '.join(catalog.SOURCES)}, "
                     f"got {config.data.source!r}")
  return catalog.options(config.data.source)


def _training_source(config: ml_collections.ConfigDict):
  """The training data named by config.data (a tf.data Source or a JAX HostSource)."""
  import data_pipeline

  if config.data.pipeline == "jax":
    from data_pipeline import jax_pipeline
    return jax_pipeline.host_source(config.data.source, **config.data.options)
  try:
    data_pipeline.require_tensorflow(f"config.data.source={config.data.source!r} through "
                                     f"config.data.pipeline='tf'")
  except ImportError as error:
    raise ImportError(f"{error} (or --config.data.pipeline=jax, which needs no "
                      f"TensorFlow)") from None
  return data_pipeline.build_source(config.data.source, **config.data.options)


def _training_batches(source, runtime: parallel.DataParallel, **options):
  """Host batches (NumPy), or with the JAX pipeline batches already on the mesh."""
  import data_pipeline
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
  latest, best = bookkeeping.checkpoint_managers(workdir, config)
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
            bookkeeping.save(latest, runtime.get(device_state), config)
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
            bookkeeping.save(latest, runtime.get(device_state), config)
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
          bookkeeping.save(latest, host_state, config)
        if validating and not np.isfinite(values["sad"]):
          log.warning("step %d: the validation SAD is %s; best/ and best_model/ are not "
                      "chosen by it", step, values["sad"])
        elif validating:
          # best/ keeps the lowest validation SAD (by config.validation.sad_rule); on a tie
          # the later step wins, as the authors' `<=`. Unlike them, the first validation
          # counts too (their model_best.pth is first written after the second epoch).
          bookkeeping.save(best, host_state, config, metrics=values)
          if lead and best.best_step() == step:  # a model checkpoint, for predict/evaluate
            bookkeeping.save_model(workdir / BEST_MODEL_DIR, host_state, config)
        spent["checkpoints"] += time.perf_counter() - started
        if stopping:
          # Another process's signal stops this one too (at the same step).
          stop.signal_name = stop.signal_name or "SIGTERM"
          if step != latest.latest_step():
            bookkeeping.save(latest, runtime.get(device_state), config)
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
    bookkeeping.save_model(workdir / MODEL_DIR, runtime.get(device_state), config)
  distributed.barrier("final model written")
  if lead and spent:
    log.info("time: %s", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items()))
  return last


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
