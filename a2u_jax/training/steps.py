"""Pure train and eval steps, to be jitted (one device) or run data-parallel over
`parallel.DataParallel` (axis `parallel.AXIS`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from a2u_jax import inputs, losses
from a2u_jax.training.state import TrainState


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *,
               axis_name: str | None = None, learning_rates: dict[str, Any] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch (NHWC dict from data_pipeline.train_batches).

  Jit it for one device, or run it under `shard_map` with the batch split over the mesh
  axis `axis_name` and the state replicated: the loss is then averaged over the axis
  (`pmean`), so it is the whole batch's loss, and because the parameters are replicated
  (device-invariant) JAX sums their cotangents over the axis, which makes the gradient the
  whole batch's gradient. The model's batch statistics are synchronised by its own
  `axis_name`. A non-finite loss or gradient leaves the state unchanged and is reported
  through `metrics["finite"]`, so the caller can stop before anything poisoned reaches a
  checkpoint.
  """
  x = inputs.model_inputs(batch["image"], batch["trimap"])
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    prediction, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, parts = losses.matting_loss(prediction, batch["alpha"], batch["trimap"],
                                      batch["fg"], batch["bg"], batch["image"])
    if axis_name is not None:
      loss, parts = jax.lax.pmean((loss, parts), axis_name)
    return loss, (parts, updates["batch_stats"])

  (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  metrics = {"loss": loss, **parts}
  metrics["grad_norm"] = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
  # Statistics keep the state's dtype (float32) whatever the compute dtype, so the next
  # step sees the same types and reuses this compilation.
  batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats,
                             state.batch_stats)
  updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
  metrics["finite"] = finite
  for group, schedule in (learning_rates or {}).items():
    metrics[f"learning_rate/{group}"] = schedule(state.step)
  return new_state, metrics
