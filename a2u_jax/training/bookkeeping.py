"""A run's bookkeeping in its workdir: the training-state checkpoints (orbax) and the model
checkpoints, metrics.jsonl and TensorBoard, and the metrics the steps leave on the device
until the loop reads them. Checkpoint saves and restores are collective: every process of a
multi-host run calls them.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from a2u_jax import checkpointing, parallel
from a2u_jax.training import state as state_lib

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger(__name__)


def checkpoint_managers(workdir: pathlib.Path, config: ml_collections.ConfigDict):
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


def save(manager: ocp.CheckpointManager, state: state_lib.TrainState,
         config: ml_collections.ConfigDict, metrics: dict[str, float] | None = None) -> None:
  """Saves `state` (host arrays) as its step, with the data stream's position (seed and
  batch size, checked on restore); `metrics` are what a best_fn manager chooses by."""
  step = int(state.step)
  position = {"step": step, "seed": int(config.seed), "batch_size": int(config.batch_size)}
  # Waited for: a failed write stops the run at this step, in one line (StorageError).
  checkpointing.save_training_checkpoint(manager, step, ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position)), metrics)


def restore(manager: ocp.CheckpointManager, state: state_lib.TrainState,
            config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding
            ) -> tuple[state_lib.TrainState, int]:
  """The latest checkpoint's state, placed with `sharding` on every process (a
  multi-host restore must not land on another host's device), and its step."""
  step = manager.latest_step()
  if step is None:
    return state, 0
  check_complete(manager, step)
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


def check_complete(manager: ocp.CheckpointManager, step: int) -> None:
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


def save_model(directory: pathlib.Path, state: state_lib.TrainState,
               config: ml_collections.ConfigDict) -> None:
  """A model checkpoint (checkpointing.load_model_checkpoint) of `state` in `directory`."""
  checkpointing.save_model_checkpoint(
      directory, {"params": state.params, "batch_stats": state.batch_stats},
      state_lib.model_options(config), force=True, then=checkpointing.RESUME)


def truncate_metrics(path: pathlib.Path, step: int) -> None:
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


class Logger:
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
    with checkpointing.storage_faults_named(self.path, f"step {step}'s metrics",
                                            checkpointing.RESUME):
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
