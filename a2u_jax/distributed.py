"""JAX's multi-controller runtime for training and evaluation: one process per host.

`initialize` must run before anything asks JAX for its devices: JAX refuses to start the
distributed runtime once the backends exist. With an explicit coordinator (the three
arguments together) every process is told where process 0 listens; with `auto=True` alone
JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes). CPU collectives go
over gloo, so several processes on one machine (or CPU hosts) can train together.

`barrier` and `allgather` are collective: every process must call them, in the same order.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

# Seconds an explicit cluster waits for its processes at start-up (--distributed_timeout).
DEFAULT_TIMEOUT = 300


def initialize(*, auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> bool:
  """Starts the distributed runtime when asked to; returns whether it is running.

  With an explicit cluster it says on stderr what it waits for (the address, how many
  processes); if they are not all there within `timeout` seconds, the process prints one
  `error:` line naming the address or the missing processes and exits with status 1 (JAX
  itself would abort minutes later with "another task died"). Processes started with
  different --num_processes are refused, on every one of them, with a ValueError.

  Args:
    auto: let JAX detect the cluster (its `jax.distributed.initialize()` without
      arguments); also what `--config.distributed=True` asks for.
    coordinator_address, num_processes, process_id: an explicit cluster (all three or
      none), e.g. "10.0.0.1:1234", 2, 0 on the first host.
    timeout: seconds to wait for the other processes (explicit clusters).
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
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"--coordinator_address must be HOST:PORT with PORT a number in "
                       f"1..65535, got {coordinator_address!r}")
    if not timeout > 0:
      raise ValueError(f"--distributed_timeout must be > 0 seconds, got {timeout}")
  if not (auto or all(given)):
    return False
  if jax.distributed.is_initialized():
    return True
  # Only the CPU backend reads this; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    _initialize_explicit(coordinator_address, num_processes, process_id, timeout)
  else:
    _initialize_detected(timeout)
  return True


def _initialize_detected(timeout: float) -> None:
  """JAX's cluster auto-detection, with the same start-up timeout as an explicit cluster."""
  done = threading.Event()

  def give_up():
    if not done.wait(timeout):
      print(f"error: JAX's cluster detection (--config.distributed / --distributed): not "
            f"every process of the detected cluster joined within {timeout:g} s "
            f"(--distributed_timeout); check that all of them started", file=sys.stderr,
            flush=True)
      os._exit(1)

  threading.Thread(target=give_up, daemon=True, name="distributed-timeout").start()
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout) + 60)
  except ValueError as error:
    raise ValueError(f"--config.distributed / --distributed: JAX found no cluster to join "
                     f"({str(error).strip()}); it detects SLURM, Open MPI, TPU pods and "
                     f"Kubernetes. On one machine leave it off; otherwise give "
                     f"--coordinator_address, --num_processes and --process_id") from None
  except RuntimeError as error:  # JaxRuntimeError
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"--config.distributed / --distributed: the distributed runtime of the "
                     f"detected cluster did not start ({first})") from None
  finally:
    done.set()


def _initialize_explicit(address: str, count: int, index: int, timeout: float) -> None:
  role = ("serving the coordinator" if index == 0 else "connecting to the coordinator")
  print(f"process {index} of {count}: {role} at {address}; waiting up to {timeout:g} s for "
        f"all {count} processes (--distributed_timeout)", file=sys.stderr, flush=True)
  done = threading.Event()

  def give_up():
    if done.wait(timeout):
      return
    if index == 0:
      others = ("process 1" if count == 2 else f"some of processes 1..{count - 1}")
      reason = (f"{others} did not join at {address}: start every process with the same "
                f"--coordinator_address and --num_processes {count}, and check that they "
                f"can reach this host's port")
    elif _reachable(address):
      reason = (f"the coordinator at {address} answered, but not all {count} processes "
                f"joined: start every process, all with --num_processes {count}")
    else:
      reason = (f"cannot reach the coordinator at {address} (process 0 serves it): check "
                f"the address, that process 0 is running, and that its port is open")
    print(f"error: process {index} of {count}: waited {timeout:g} s; {reason}",
          file=sys.stderr, flush=True)
    os._exit(1)  # JAX's connect cannot be interrupted; it would abort much later

  if index == 0:
    _check_port_free(address, count)
  threading.Thread(target=give_up, daemon=True, name="distributed-timeout").start()
  started = time.monotonic()
  try:
    # JAX's own deadline comes after ours, so ours is what the user sees.
    try:
      jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                 process_id=index, initialization_timeout=int(timeout) + 60)
    except RuntimeError as error:  # JaxRuntimeError: e.g. the port is taken
      first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      hint = (": is the port in use by another program or run?" if index == 0 and
              "RPC server" in first else "")
      raise ValueError(f"process {index} of {count}: the distributed runtime at {address} did "
                       f"not start ({first}){hint}") from None
    _check_same_count(count, index, max(1.0, timeout - (time.monotonic() - started)))
  finally:
    done.set()


def _check_same_count(count: int, index: int, timeout: float) -> None:
  """Every process's --num_processes, compared on every process."""
  from jax._src import distributed as jax_distributed

  client = jax_distributed.global_state.client
  actual = jax.process_count()
  client.key_value_set(f"a2u_jax/num_processes/{index}", str(count))
  given = {i: client.blocking_key_value_get(f"a2u_jax/num_processes/{i}", int(timeout * 1000))
           for i in range(actual)}
  if any(value != str(actual) for value in given.values()):
    listed = ", ".join(f"process {i}: {value}" for i, value in given.items())
    raise ValueError(f"--num_processes differs between the processes ({listed}); the "
                     f"coordinator runs {actual}: give every process the same --num_processes")


def _check_port_free(address: str, count: int) -> None:
  """Process 0 serves the coordinator on every interface at the address's port; JAX
  crashes (or raises from C++) when the port is taken, so that is said first."""
  port = int(address.rpartition(":")[2])
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: a previous run's connections in TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
      return
    except OSError as error:
      if error.errno == errno.EADDRINUSE:
        raise ValueError(f"process 0 of {count}: cannot serve the coordinator at {address}: "
                         f"port {port} is in use by another program or run; choose another "
                         f"port for --coordinator_address") from None
      # no IPv6 (or IPv4) on this host: try the other family


def _reachable(address: str) -> bool:
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    return True
  except OSError:
    return False


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
