"""The training loop around the pure steps: data, devices, checkpoints, logging, validation.

`train_and_evaluate(config, workdir)` reads top to bottom: `_start` (the config checked by
config_checks.py, the data, the workdir, the state built or restored), `_train` (each step,
with its logs, image summaries, validation (validation.py) and checkpoints
(bookkeeping.py)), `_finish` (the final model).

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
import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from a2u_jax import distributed, models, parallel, predict
from a2u_jax.training import bookkeeping, config_checks
from a2u_jax.training import state as state_lib
from a2u_jax.training import steps, validation
from a2u_jax.training import workdir as workdir_lib

# Model checkpoints (checkpointing.load_model_checkpoint) in the workdir: the final model,
# and the one with the best validation SAD so far. checkpoints/ and best/ hold whole
# training states, for resuming.
MODEL_DIR = "model"
BEST_MODEL_DIR = "best_model"
log = logging.getLogger(__name__)
# What train.py and the tests reach through the loop (the private names are the ones these
# had when they were defined here). The loop calls `validate` by this name, so a test can
# replace it.
NonFiniteError, PendingMetrics = bookkeeping.NonFiniteError, bookkeeping.PendingMetrics
num_train_steps, validate = config_checks.num_train_steps, validation.validate
_Logger, _restore, _truncate_metrics = (bookkeeping.Logger, bookkeeping.restore,
                                        bookkeeping.truncate_metrics)
_validation_interval = config_checks.validation_interval
_validation_items = validation.validation_items


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       *, progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`; returns the last logged metrics.

  One run at a time per workdir (`workdir_lib.claim`: a second one is refused, naming the
  first), and never over another run's results without their checkpoints."""
  if not str(workdir).strip():
    raise ValueError("--workdir is empty; name the run's folder")
  workdir = pathlib.Path(workdir).absolute()  # orbax refuses relative paths
  try:
    run, device_state = _start(config, workdir)
    device_state, last = _train(run, device_state, progress)
    _finish(run, device_state)
    return last
  finally:
    workdir_lib.release(workdir)


@dataclasses.dataclass
class _Run:
  """What every step of one run uses, made once by `_start`."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  lead: bool  # process 0: it writes metrics, model checkpoints and the logs
  runtime: parallel.DataParallel
  train_step: Callable  # make_train_step's: (device state, batch, rng) -> (state, metrics)
  eval_model: models.MattingNet  # without the device axis: validation and summaries
  batches: Iterator[dict[str, Any]]  # from the batch of step start_step + 1 on
  rng: jax.Array  # the dropout key, on the devices
  start_step: int  # the checkpoint resumed from (0: a new run)
  total_steps: int
  eval_every: int  # 0: no validation
  items: Sequence[Any]  # the validation set (data_pipeline evaluation items)
  latest: ocp.CheckpointManager  # checkpoints/
  best: ocp.CheckpointManager  # best/
  logger: bookkeeping.Logger
  # Where the run's time goes, logged at the end: the first step (which compiles the
  # training step), the other steps, validation (its first call compiles the
  # prediction) and checkpoints.
  spent: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def predictor(self, device_state: state_lib.TrainState) -> predict.Predictor:
    return predict.Predictor(self.eval_model, {"params": device_state.params,
                                               "batch_stats": device_state.batch_stats},
                             self.runtime.devices)


def _start(config: ml_collections.ConfigDict, workdir: pathlib.Path
           ) -> tuple[_Run, state_lib.TrainState]:
  """Checks the config and the data (before anything is written), claims `workdir`, and
  builds the state or restores it from the last checkpoint: the run, and the state on
  the devices."""
  # Before anything asks JAX for devices (validate_config does); train.py has already
  # started it when given an explicit coordinator.
  distributed.initialize(auto=config.distributed)
  validate_config(config)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  # Building the source validates the data (folders, pairs, sizes) before anything slow.
  source = _training_source(config)
  eval_every = config_checks.validation_interval(config)
  items = validation.validation_items(config) if eval_every else []
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir {workdir}: exists and is not a folder")
  workdir.mkdir(parents=True, exist_ok=True)
  lead = distributed.is_lead()
  # Before anything is written there; writes config.json once the run is accepted.
  workdir_lib.claim(workdir, lead=lead, config=config)
  runtime = parallel.DataParallel()
  total_steps = config_checks.num_train_steps(config)
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state = state_lib.create_train_state(
      config, init_rng, state_lib.model_from_config(config, axis_name=parallel.AXIS))
  latest, best = bookkeeping.checkpoint_managers(workdir, config)
  state, start_step = bookkeeping.restore(latest, state, config, runtime.replicated)
  logger = bookkeeping.Logger(workdir, lead)
  if lead:
    bookkeeping.truncate_metrics(logger.path, start_step)
    log.info("%s: %d parameters; %s from step %d to %d", workdir,
             state_lib.count_parameters(state.params),
             "resuming" if start_step else "starting", start_step, total_steps)
  batches = _training_batches(
      source, runtime, batch_size=config.batch_size // jax.process_count(),
      crop_size=config.crop_size, seed=config.seed, shard_index=jax.process_index(),
      num_shards=jax.process_count(), skip_batches=start_step)
  device_state = runtime.put(state)
  run = _Run(config, workdir, lead, runtime, make_train_step(config, runtime),
             state_lib.model_from_config(config), batches, runtime.put(dropout_rng),
             start_step, total_steps, eval_every, items, latest, best, logger)
  return run, device_state


def _train(run: _Run, device_state: state_lib.TrainState, progress: bool
           ) -> tuple[state_lib.TrainState, dict[str, Any]]:
  """Steps from run.start_step to run.total_steps, each logging, summarising, validating
  and checkpointing on its schedule: the last state and the last logged metrics. Raises
  Interrupted where a signal stopped the run first (after that step's checkpoint)."""
  config, step, last = run.config, run.start_step, {}
  bar = _progress_bar(step, run.total_steps, progress and run.lead)
  if run.lead and step < run.total_steps:
    log.info("compiling the training step (the first step waits for it)")
  stop, pending = _StopRequests(), bookkeeping.PendingMetrics()
  read_at, read_step = time.perf_counter(), step  # images/s over the steps between reads
  try:
    with stop:
      while step < run.total_steps:
        started = time.perf_counter()
        batch = next(run.batches)
        device_state, step_metrics = run.train_step(device_state, run.runtime.shard(batch),
                                                    run.rng)
        step += 1
        pending.add(step, step_metrics)
        first, final = step == run.start_step + 1, step == run.total_steps
        validating = run.eval_every > 0 and (step % run.eval_every == 0 or final)
        checkpointing_now = step % config.checkpoint_every == 0 or final
        summarising = bool(config.image_summary_every) and (
            step % config.image_summary_every == 0)
        logging_now = step % config.log_every == 0 or final
        stopping = not final and _any_process(stop.signal_name is not None)
        if first or logging_now or validating or checkpointing_now or summarising or stopping:
          last = pending.read(run.latest.latest_step())
          now = time.perf_counter()
          last["images_per_second"] = config.batch_size * (step - read_step) / (now - read_at)
          read_at, read_step = now, step
          bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_second']:.1f}")
        run.spent["first step (compiles)" if first else "other steps"] += (
            time.perf_counter() - started)
        if first and run.lead:
          log.info("first step done in %.1f s (including the compile)",
                   time.perf_counter() - started)
        bar.update(1)
        if logging_now:
          run.logger.scalars(step, last)
        if summarising:
          _image_summaries(run, device_state, step, batch)
        # Everything a step logs is written before its checkpoint is: a run killed after
        # the checkpoint resumes past this step and would not log it again.
        values = None
        if validating:
          values = _validate_step(run, device_state, step)
          last.update({f"validation/{k}": v for k, v in values.items()})
        started = time.perf_counter()
        if checkpointing_now or validating:
          _checkpoint(run, device_state, step, values)
        run.spent["checkpoints"] += time.perf_counter() - started
        if stopping:
          # Another process's signal stops this one too (at the same step).
          stop.signal_name = stop.signal_name or "SIGTERM"
          if step != run.latest.latest_step():
            bookkeeping.save(run.latest, run.runtime.get(device_state), config)
          break
  except KeyboardInterrupt:
    # A second Ctrl-C (or one outside the handlers' reach): the step under way is
    # dropped; the last checkpoint stays, and a rerun logs every later step once.
    run.latest.wait_until_finished()
    raise Interrupted("SIGINT", step, run.latest.latest_step()) from None
  finally:
    bar.close()
    run.latest.wait_until_finished()
    run.best.wait_until_finished()
    run.logger.flush()
  if step < run.total_steps:
    raise Interrupted(stop.signal_name, step, run.latest.latest_step())
  return device_state, last


@contextlib.contextmanager
def _saved_if_it_fails(run: _Run, device_state: state_lib.TrainState) -> Iterator[None]:
  """A summary or a validation that fails must not cost the step's training: the step's
  state is saved to checkpoints/ before the error goes on."""
  try:
    yield
  except Exception:
    bookkeeping.save(run.latest, run.runtime.get(device_state), run.config)
    raise


def _image_summaries(run: _Run, device_state: state_lib.TrainState, step: int,
                     batch: dict[str, Any]) -> None:
  """The step's batch (this process's part) and the step's predicted alpha, to TensorBoard."""
  batch = run.runtime.local_batch(batch)
  with _saved_if_it_fails(run, device_state):
    run.logger.images(step, batch, run.predictor(device_state)(batch["image"], batch["trimap"]))


def _validate_step(run: _Run, device_state: state_lib.TrainState, step: int
                   ) -> dict[str, float]:
  """The step's validation SAD and MSE (`validate`), logged as validation/sad, .../mse."""
  started = time.perf_counter()
  with _saved_if_it_fails(run, device_state):
    values = validate(run.predictor(device_state), run.items,
                      run.config.validation.batch_size, run.config.validation.sad_rule)
  run.spent["validation"] += time.perf_counter() - started
  run.logger.scalars(step, {f"validation/{k}": v for k, v in values.items()})
  return values


def _checkpoint(run: _Run, device_state: state_lib.TrainState, step: int,
                values: dict[str, float] | None) -> None:
  """Saves the step to checkpoints/, and where `values` (its validation; None without one)
  has the lowest SAD so far, to best/ and best_model/ too."""
  host_state = run.runtime.get(device_state)  # once for every save of this step
  # Validation steps checkpoint too: best/ and best_model/ never hold a step that a resume
  # would not start after.
  bookkeeping.save(run.latest, host_state, run.config)
  if values is None:
    return
  if not np.isfinite(values["sad"]):
    log.warning("step %d: the validation SAD is %s; best/ and best_model/ are not chosen "
                "by it", step, values["sad"])
    return
  # best/ keeps the lowest validation SAD (by config.validation.sad_rule); on a tie the
  # later step wins, as the authors' `<=`. Unlike them, the first validation counts too
  # (their model_best.pth is first written after the second epoch).
  bookkeeping.save(run.best, host_state, run.config, metrics=values)
  if run.lead and run.best.best_step() == step:  # a model checkpoint, for predict/evaluate
    bookkeeping.save_model(run.workdir / BEST_MODEL_DIR, host_state, run.config)


def _finish(run: _Run, device_state: state_lib.TrainState) -> None:
  """The final model checkpoint (model/), once every process has finished training."""
  if run.lead:
    bookkeeping.save_model(run.workdir / MODEL_DIR, run.runtime.get(device_state), run.config)
  distributed.barrier("final model written")
  if run.lead and run.spent:
    log.info("time: %s", ", ".join(f"{name} {seconds:.1f} s"
                                   for name, seconds in run.spent.items()))


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
