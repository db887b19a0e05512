"""Data parallelism, one way for training, validation, prediction and evaluation.

A `DataParallel` is a 1-D device mesh (axis "batch") over some devices: the local ones, or
every device of a multi-host run. Batches are split along their leading axis over it, and
states and variables are replicated. Steps with explicit collectives (the gradient mean,
synchronised batch-norm statistics) run under `shard_map` (`DataParallel.step`); inference
is a `jit` whose output stays split (`predict.Predictor`).

Why a mesh rather than `jax.pmap`: the host batch is fed as it is (no
[devices, per_device] reshape), the same code covers one device, all local devices and
every device of a multi-host run, and `shard_map` is what JAX now implements `pmap` on.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"
REPLICATED = PartitionSpec()
SPLIT = PartitionSpec(AXIS)


class DataParallel:
  """A mesh over `devices` (default: every device of every process) with axis `AXIS`.

  Attributes:
    devices: the mesh's devices, in mesh order.
    local_devices: how many of them belong to this process; each process feeds batches
      whose leading size is a multiple of it.
    replicated, split: the `NamedSharding`s of a replicated tree and of a batch.
  """

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    devices = np.array(list(jax.devices() if devices is None else devices))
    self.mesh = Mesh(devices, (AXIS,))
    self.devices: tuple[jax.Device, ...] = tuple(devices.flat)
    self.local_devices = sum(d.process_index == jax.process_index() for d in self.devices)
    self.replicated = NamedSharding(self.mesh, REPLICATED)
    self.split = NamedSharding(self.mesh, SPLIT)

  def put(self, tree: Any) -> Any:
    """A host tree (a state, variables, keys) replicated over the mesh. Arrays already
    replicated over this mesh are used as they are."""
    return jax.device_put(tree, self.replicated)

  def shard(self, batch: dict[str, np.ndarray | jax.Array]) -> dict[str, jax.Array]:
    """This process's rows of a global batch, split over the mesh along the leading axis
    (with one process: the whole batch). Arrays already split over the mesh pass as they
    are."""
    return {key: value if self._is_split(value)
            else jax.make_array_from_process_local_data(self.split, value)
            for key, value in batch.items()}

  def _is_split(self, value) -> bool:
    return isinstance(value, jax.Array) and value.sharding == self.split

  def composited(self, stream) -> Iterator[dict[str, jax.Array]]:
    """The batches of a `data_pipeline.jax_pipeline.JaxStream` (this process's rows),
    composited on this process's devices and split over the whole mesh.

    Each process composites its own rows on its own devices (their padded canvases may
    differ between processes); the composited crops, of one shape everywhere, then form
    the global batch without leaving the devices.
    """
    process = jax.process_index()
    positions = [i for i, d in enumerate(self.devices) if d.process_index == process]
    if positions != list(range(positions[0], positions[0] + len(positions))):
      raise ValueError("composited: this process's devices are not contiguous in the mesh")
    local = NamedSharding(Mesh(np.array([self.devices[i] for i in positions]), (AXIS,)),
                          SPLIT)
    count = jax.process_count()
    for batch in stream.batches(local):
      if count == 1:
        yield self.shard(batch)
        continue
      yield {key: jax.make_array_from_single_device_arrays(
          (value.shape[0] * count,) + value.shape[1:], self.split,
          [shard.data for shard in sorted(value.addressable_shards,
                                          key=lambda shard: shard.index[0].start or 0)])
             for key, value in batch.items()}

  def local_batch(self, batch: dict[str, np.ndarray | jax.Array]
                  ) -> dict[str, np.ndarray]:
    """This process's rows of a batch on the host (split arrays are fetched)."""
    return {key: self.local_rows(value) if isinstance(value, jax.Array) else value
            for key, value in batch.items()}

  @staticmethod
  def get(tree: Any) -> Any:
    """A replicated tree (a state, metrics) on the host."""
    return jax.device_get(tree)

  @staticmethod
  def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a split array, in the order `shard` took them."""
    shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])

  def step(self, fn: Callable, in_specs: tuple, out_specs: Any,
           donate_argnums: tuple[int, ...] = ()) -> Callable:
    """`fn` jitted under `shard_map` over the mesh; specs are `REPLICATED` or `SPLIT`
    (a batch argument is split, a state replicated); inside, collectives use `AXIS`."""
    return jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs),
                   donate_argnums=donate_argnums)
