"""JAX's multi-controller runtime for training and evaluation: one process per host.

`initialize` must run before anything asks JAX for its devices: JAX refuses to start the
distributed runtime once the backends exist. With an explicit coordinator (the three
arguments together) every process is told where process 0 listens; with `auto=True` alone
JAX detects the cluster itself (SLURM, Open MPI, TPU pods, Kubernetes). CPU collectives go
over gloo, so several processes on one machine (or CPU hosts) can train together.

`barrier` and `allgather` are collective: every process must call them, in the same order.

A process that dies mid-run is named by the others in one line (`error: process 0 of 2:
process 1 stopped responding ...`), and they exit with status 1 at once: process 0 holds a
plain TCP connection to every other process (`_PeerWatch`), whose end it sees as soon as
the process is gone, and tells the others. JAX's own detection (its coordination service's
heartbeats, `heartbeat_timeout` seconds) stays behind it for hosts that vanish without
closing their connections; it aborts the process without saying which one was lost.
"""

from __future__ import annotations

import atexit
import errno
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

# Seconds an explicit cluster waits for its processes at start-up (--distributed_timeout).
DEFAULT_TIMEOUT = 300
# Seconds without a heartbeat before JAX's coordination service takes a process for dead
# and aborts the others (--heartbeat_timeout); JAX's default, 100 s, kept survivors of a
# lost host waiting a minute and a half.
DEFAULT_HEARTBEAT_TIMEOUT = 30
_WATCH_KEY = "a2u_jax/peer_watch_port"


def initialize(*, auto: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout: float = DEFAULT_TIMEOUT,
               heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT) -> bool:
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
    heartbeat_timeout: seconds of silence after which JAX takes a process for dead (one
      that dies outright is named by the others at once).
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
  if (auto or all(given)) and not heartbeat_timeout >= 1:
    raise ValueError(f"--heartbeat_timeout must be at least 1 second, got {heartbeat_timeout}")
  if not (auto or all(given)):
    return False
  if jax.distributed.is_initialized():
    return True
  # Only the CPU backend reads this; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    _initialize_explicit(coordinator_address, num_processes, process_id, timeout,
                         int(heartbeat_timeout))
  else:
    _initialize_detected(timeout, int(heartbeat_timeout))
  _PeerWatch.start(timeout)
  return True


def _initialize_detected(timeout: float, heartbeat_timeout: int) -> None:
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
    jax.distributed.initialize(initialization_timeout=int(timeout) + 60,
                               heartbeat_timeout_seconds=heartbeat_timeout)
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


def _initialize_explicit(address: str, count: int, index: int, timeout: float,
                         heartbeat_timeout: int) -> None:
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
                                 process_id=index, initialization_timeout=int(timeout) + 60,
                                 heartbeat_timeout_seconds=heartbeat_timeout)
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


class _PeerWatch:
  """Process 0's TCP connection to each other process, to name a process that dies.

  Each process sends its index when it connects, and "bye" when it exits normally
  (atexit). A connection that ends without it is a lost process: process 0 tells the
  others ("lost K"), waits briefly for them to report it, then reports it itself; the
  others report what process 0 tells them, or process 0 itself when its connection ends
  (JAX, losing its coordinator, aborts them too then, logging its own fatal lines).
  Reporting is one `error:` line on stderr, which then closes, and os._exit(1): JAX's own
  ending comes `heartbeat_timeout` seconds later, or at exit, as an abort that names no
  process."""

  _connections: dict[int, tuple[socket.socket, Any]] = {}  # peer: (socket, its lines)
  _leaving = False
  _reporting = threading.Lock()  # one line, however many connections end

  @classmethod
  def start(cls, timeout: float) -> None:
    """Connects the processes (collective; after the runtime has started)."""
    if jax.process_count() == 1:
      return
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    index, count = jax.process_index(), jax.process_count()
    if index == 0:
      server = (socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
                if socket.has_dualstack_ipv6() else socket.create_server(("", 0)))
      state.client.key_value_set(_WATCH_KEY, str(server.getsockname()[1]))
      server.settimeout(timeout)
      for _ in range(count - 1):
        connection, _ = server.accept()
        connection.settimeout(None)
        lines = connection.makefile()
        cls._connections[int(lines.readline())] = (connection, lines)
      server.close()
    else:
      port = int(state.client.blocking_key_value_get(_WATCH_KEY, int(timeout * 1000)))
      host = state.coordinator_address.rpartition(":")[0].strip("[]")
      connection = socket.create_connection((host, port), timeout=timeout)
      connection.settimeout(None)
      connection.sendall(f"{index}\n".encode())
      cls._connections[0] = (connection, connection.makefile())
    atexit.register(cls._leave)
    for peer, (_, lines) in cls._connections.items():
      threading.Thread(target=cls._watch, args=(peer, lines, index, count), daemon=True,
                       name=f"peer-watch-{peer}").start()

  @classmethod
  def _leave(cls) -> None:
    cls._leaving = True
    for connection, _ in cls._connections.values():
      try:
        connection.sendall(b"bye\n")
      except OSError:
        pass

  @classmethod
  def _watch(cls, peer: int, lines: Any, index: int, count: int) -> None:
    try:
      for line in lines:
        if line.strip() == "bye":
          return
        if line.startswith("lost "):  # from process 0
          cls._report(int(line.split()[1]), index, count)
    except OSError:
      pass
    if not cls._leaving:
      cls._report(peer, index, count)

  @classmethod
  def _report(cls, lost: int, index: int, count: int) -> None:
    if not cls._reporting.acquire(blocking=False):
      return
    if index == 0:
      for peer, (connection, _) in cls._connections.items():
        if peer != lost:
          try:
            connection.sendall(f"lost {lost}\n".encode())
          except OSError:
            pass
      time.sleep(1.0)  # the others name it before the coordinator (this process) goes
    role = " (the coordinator)" if lost == 0 else ""
    line = (f"error: process {index} of {count}: process {lost}{role} stopped responding (it "
            f"was killed, crashed or lost its connection; its own output may say why), so "
            f"every process stops; rerun all {count} processes with the same command to "
            f"resume from the last checkpoint\n")
    sys.stderr.flush()
    os.write(2, line.encode())
    # JAX's runtime, losing its coordinator, logs fatal lines of its own from another
    # thread, then aborts: they went after this line in one run of three processes, so
    # stderr closes here, leaving this line the last.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os._exit(1)


def wait_for_lost_process(error: BaseException, seconds: float = 5.0) -> None:
  """After `error` from the runtime (a collective whose peer is gone, say), gives the peer
  watch `seconds` to report a lost process, which ends this one: the error's own message
  would not say which process was lost. Returns at once for other errors, and with a
  single process."""
  if _PeerWatch._connections and (isinstance(error, jax.errors.JaxRuntimeError)
                                  or "Gloo" in str(error)):
    time.sleep(seconds)


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
