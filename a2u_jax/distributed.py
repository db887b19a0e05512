"""JAX's multi-controller runtime for training and evaluation: one process per host.

`initialize` must run before anything asks JAX for its devices: JAX refuses to start the
distributed runtime once the backends exist. With an explicit coordinator (the three
arguments together) every process is told where process 0 listens; with `auto=True` alone
JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes). CPU collectives go
over gloo, so several processes on one machine (or CPU hosts) can train together.

`barrier` and `allgather` are collective: every process must call them, in the same order.
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(*, auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the distributed runtime when asked to; returns whether it is running.

  Args:
    auto: let JAX detect the cluster (its `jax.distributed.initialize()` without
      arguments); also what `--config.distributed=True` asks for.
    coordinator_address, num_processes, process_id: an explicit cluster (all three or
      none), e.g. "10.0.0.1:1234", 2, 0 on the first host.
  """
  explicit = (coordinator_address, num_processes, process_id)
  given = [value is not None for value in explicit]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                     "give all three (or none, and --config.distributed=True for JAX's "
                     "cluster auto-detection)")
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id must be in [0, --num_processes={num_processes}), got "
                       f"{process_id}")
    if ":" not in coordinator_address:
      raise ValueError(f"--coordinator_address must be HOST:PORT, got "
                       f"{coordinator_address!r}")
  if not (auto or all(given)):
    return False
  if jax.distributed.is_initialized():
    return True
  # Only the CPU backend reads this; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return True


def is_lead() -> bool:
  """True on the process that writes logs, summaries and merged outputs (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather(values: np.ndarray) -> np.ndarray:
  """Every process's `values` (same shape on all), stacked: (process_count, *shape)."""
  values = np.asarray(values)
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils
  # Sent as 32-bit words: without jax_enable_x64 JAX would round 64-bit values to 32.
  words = np.ascontiguousarray(values).view(np.uint32) if values.itemsize == 8 else values
  gathered = np.asarray(multihost_utils.process_allgather(words))
  return gathered.view(values.dtype) if values.itemsize == 8 else gathered
