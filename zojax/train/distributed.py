"""One run, many processes: joining JAX's multi-controller runtime, process-local batches,
output from process 0, and failures that stop every process.

A run on N hosts (or N accelerators) is N copies of ``python -m zojax.run``, joined by
`jax.distributed.initialize`. `start` joins them: on a cluster JAX recognises (SLURM,
Open MPI, Cloud TPU) with no flags, else with ``--coordinator_address``,
``--num_processes``, ``--process_id``; with neither it stays single-process.

Every process runs the same program on its own devices. What differs per process:

  * **data**: `process_rows` are the rows of a global batch whose shards live on this
    process's devices; the process reads only those (`batching.batches(rows=...)`) and
    `put_batch` joins them into one global array (`jax.make_array_from_process_local_data`).
    The global batch is a function of (seed, step) alone, so the trajectory does not depend
    on the number of processes.
  * **output**: `is_primary` (process 0) writes logs, metrics, plots, results.
  * **failure**: a process that fails calls `fail`: it prints one line naming itself and
    posts it to the coordination service's key-value store. A watchdog thread in every
    process waits on that key and on the service's list of live processes, so the others
    stop within a second of a reported error, or within ``--heartbeat_timeout`` of a
    process dying silently (killed, out of memory), each with a one-line message naming
    the process, instead of hanging in a collective. JAX's recoverable mode keeps the
    runtime from aborting the survivors on its own (with a page of C++ log), so the
    watchdog decides; `finish` then replaces the shutdown barrier that mode drops.
    Except when process 0 dies: the coordination service goes with it, and JAX's client
    aborts every other process within a fraction of a second (SIGABRT, with that page),
    often before the watchdog has printed "lost the coordinator". jaxlib gives Python no
    hook there (its client's ``missed_heartbeat_callback`` fails to call a Python function:
    std::bad_cast, jax 0.10); `zojax.launch` shows the page as the watchdog's line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from zojax.errors import ConfigError

log = logging.getLogger(__name__)

# Exit status of a process that stopped because another one failed: the launcher blames
# the process that failed, not the ones it took down.
STOPPED = 3

_ERROR_KEY = "zojax/error"
_ACK_KEY = "zojax/ack/"
_POLL_MS = 1000          # watchdog: longest wait on the error key between liveness checks
_ACK_WAIT_S = 10.0       # a failed process waits this long for the others to read its error
_LEAVE_WAIT_S = 5.0      # a stopping process 0 waits this long for the others to disconnect
_FINISH_TIMEOUT_MS = 3_600_000   # processes may finish an hour apart (process 0 writes more)
_FIRST_TIMEOUT_MS = 3_600_000    # `primary_first`: process 0 may be downloading assets


@dataclasses.dataclass(frozen=True)
class Group:
  """Where this process stands: its id, the process count, and how the group was formed."""

  process_id: int = 0
  num_processes: int = 1
  how: str = "single process"        # "flags", a detected cluster's name, or single process
  coordinator: str | None = None


_group = Group()
_watchdog: _Watchdog | None = None


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The start-up flags of `start` (on `python -m zojax.run`)."""
  g = parser.add_argument_group(
      "many processes", "one run as N processes (hosts): SLURM, Open MPI and Cloud TPU are "
      "detected without flags; elsewhere give all three of the first flags to every process")
  g.add_argument("--coordinator_address", help="host:port of process 0, the same for all")
  g.add_argument("--num_processes", type=int, help="processes in the run (1: single process)")
  g.add_argument("--process_id", type=int, help="this process, 0 .. num_processes-1")
  g.add_argument("--heartbeat_timeout", type=int, default=100,
                 help="seconds of silence after which a process counts as dead and the "
                      "others stop (default: JAX's 100)")
  g.add_argument("--init_timeout", type=int, default=300,
                 help="seconds to wait for every process to join (default: JAX's 300)")


def check_flags(args: argparse.Namespace) -> tuple[str | None, int | None, int | None]:
  """(coordinator, num_processes, process_id) from the flags; ConfigError for a bad one."""
  n, pid = args.num_processes, args.process_id
  address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if n is None:
    if pid is not None or args.coordinator_address:
      raise ConfigError("--process_id / --coordinator_address need --num_processes")
    return None, None, None
  if n < 1:
    raise ConfigError(f"--num_processes={n} must be >= 1")
  if n > 1 and not address:
    raise ConfigError(f"missing --coordinator_address (host:port of process 0): "
                      f"--num_processes={n} needs one")
  if n > 1 and pid is None:
    raise ConfigError(f"missing --process_id (0 .. {n - 1}): --num_processes={n} needs one")
  if pid is not None and not 0 <= pid < n:
    raise ConfigError(f"--process_id={pid} must be in 0 .. {n - 1} (--num_processes={n})")
  if address:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"--coordinator_address={address!r} is not host:port")
  for flag in ("heartbeat_timeout", "init_timeout"):
    if getattr(args, flag) < 1:
      raise ConfigError(f"--{flag}={getattr(args, flag)} must be >= 1 second")
  return address, n, pid or 0


def detect_cluster() -> tuple[str, int] | None:
  """(name, process count) of the cluster JAX would bootstrap from on its own, or None.

  JAX's detection is private (`jax._src.clusters`). Should a JAX upgrade move it, a run
  whose environment names a multi-process cluster stops with a ConfigError rather than
  running as that many separate single-process runs (`_cluster_from_env`).
  """
  try:
    clusters = importlib.import_module("jax._src.clusters")
    found = None
    for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
      if not env.opt_in_only_method and env.is_env_present():
        found = env.__name__.removesuffix("Cluster"), int(env.get_process_count())
        break
  except (ImportError, AttributeError) as e:
    named = _cluster_from_env()
    if named is None:
      return None
    raise ConfigError(
        f"the environment names a {named} of several processes, but JAX's cluster "
        f"detection (jax._src.clusters) is unusable in jax {jax.__version__} "
        f"({type(e).__name__}: {_first_line(e)}): pass --coordinator_address, "
        f"--num_processes and --process_id to each process (or --num_processes=1 to run "
        f"each alone)") from None
  return found


# Variables by which JAX's detection recognises a cluster (with its own, stricter tests),
# and the one giving the process count: (cluster, marker, count variable, or None where
# the marker is a comma list of hosts). A Cloud TPU VM that JAX finds only through the GCE
# metadata server is not among them.
_CLUSTER_VARS = (("Open MPI run", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
                 ("SLURM step", "SLURM_STEP_NODELIST", "SLURM_NTASKS"),
                 ("Cloud TPU slice", "TPU_PROCESS_ADDRESSES", None),
                 ("Cloud TPU slice", "TPU_WORKER_HOSTNAMES", None))


def _cluster_from_env() -> str | None:
  """'<cluster> (<variables>)' when the environment names a cluster of more than one
  process (or does not say how many), else None."""
  for name, marker, count_var in _CLUSTER_VARS:
    if marker not in os.environ:
      continue
    if count_var is None:
      count = str(len([h for h in os.environ[marker].split(",") if h.strip()]))
      shown = f"{marker} lists {count} hosts"
    else:
      count = os.environ.get(count_var, "?")
      shown = f"{count_var}={count}" if marker == count_var else f"{marker}, {count_var}={count}"
    if count != "1":
      return f"{name} ({shown})"
  return None


def start(args: argparse.Namespace) -> Group:
  """Joins the run's processes (or stays single-process); call before any JAX computation.

  An explicit coordinator joins even with ``--num_processes=1``: one process then uses the
  same collectives (gloo on CPU) as many, so its results are bit-comparable with theirs.
  """
  global _group, _watchdog
  address, n, pid = check_flags(args)
  how = "flags"
  if n is None:
    found = detect_cluster()
    if found is None or found[1] <= 1:
      return _group
    how, n = found
  elif n == 1 and not address:
    return _group
  jax.config.update("jax_enable_recoverability", True)  # the watchdog decides who stops
  kwargs = dict(initialization_timeout=args.init_timeout,
                heartbeat_timeout_seconds=args.heartbeat_timeout)
  try:
    if how == "flags":
      jax.distributed.initialize(address, n, pid, **kwargs)
    else:
      jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001  (a runtime error from the C++ client: one line)
    raise ConfigError(f"could not join the run's {n} processes ({how}, coordinator "
                      f"{address or 'auto'}): {_first_line(e)}") from None
  state = jax._src.distributed.global_state  # noqa: SLF001  (set by initialize)
  _group = Group(state.process_id, state.num_processes, how, state.coordinator_address)
  _watchdog = _Watchdog(_client(), _group, args.heartbeat_timeout)
  _watchdog.start()
  return _group


def is_primary() -> bool:
  """Whether this process writes the run's output (process 0)."""
  return jax.process_index() == 0


def label() -> str:
  """'process i of N: ' in a multi-process run, else ''."""
  g = _group
  return f"process {g.process_id} of {g.num_processes}: " if g.num_processes > 1 else ""


def fail(message: str, code: int) -> int:
  """Reports this process's error in one line and stops the group; returns `code` (single
  process) or exits the process with it (many: after the others have read the error)."""
  if _watchdog is None:
    _say(f"error: {label()}{message}")
    return code
  if not _ending.acquire(blocking=False):
    threading.Event().wait()  # the watchdog is ending this process already, saying why
  try:
    _say(f"error: {label()}{message}")
    _watchdog.report(f"process {_group.process_id} of {_group.num_processes} failed: "
                     f"{message}")
    _exit(code)
  finally:
    _ending.release()  # reached only where `_exit` returns (stubbed out in tests)


def fail_unexpected(e: BaseException) -> int:
  """`fail` for an exception nobody expected: its traceback here, its last line to all."""
  if _watchdog is None:
    raise e
  if _group.process_id != 0 and _watchdog.coordinator_gone():
    # Process 0 died: collectives with it fail at once (gloo: "Connection reset by peer",
    # a ValueError), before the watchdog hears of it. Name the cause, not the symptom.
    _watchdog.lost_coordinator()
  if isinstance(e, jax.errors.JaxRuntimeError):
    # A collective that lost a peer fails first (gloo: "Connection reset by peer"), not
    # naming it: give the watchdog time to see which process died (it then exits here).
    _watchdog.join(timeout=_watchdog.heartbeat_timeout + 3 * _POLL_MS / 1000)
  traceback.print_exception(e)
  return fail(f"{type(e).__name__}: {_first_line(e)}", 1)


def finish() -> None:
  """Ends a multi-process run cleanly: waits for every process, then leaves the runtime."""
  global _watchdog
  if _watchdog is None:
    return
  client = _client()
  client.wait_at_barrier("zojax/finished", _FINISH_TIMEOUT_MS)
  _watchdog.stop()
  # Joined, not left to die: a daemon thread inside the client's C++ call at interpreter
  # exit is unwound by force and aborts the process ("FATAL: exception not rethrown").
  _watchdog.join(timeout=2 * _POLL_MS / 1000 + 5)
  _watchdog = None
  if is_primary():  # the coordination service lives here: leave it up until all have gone
    deadline = time.monotonic() + 30
    while len(client.get_live_nodes(list(range(_group.num_processes)))) > 1:
      if time.monotonic() > deadline:
        break
      time.sleep(0.05)
  jax.distributed.shutdown()


@contextlib.contextmanager
def primary_first(name: str):
  """Runs the block on process 0 before the others (e.g. so that one process fetches an
  asset into a shared cache while the others wait, then read it)."""
  if _watchdog is None:
    yield
    return
  barrier = f"zojax/first/{name}"
  if is_primary():
    yield
    _client().wait_at_barrier(barrier, _FIRST_TIMEOUT_MS)
  else:
    _client().wait_at_barrier(barrier, _FIRST_TIMEOUT_MS)
    yield


class Discard:
  """Stands in for an output object (e.g. `metrics.MetricsLog`) on processes other than 0:
  every method call does nothing."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


# ---------------------------------------------------------------------------------------
# Data and values across processes


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
  """Rows of a [batch_size, ...] global batch held by this process's devices under
  `sharding`, in the order `jax.make_array_from_process_local_data` expects them."""
  spans = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                  for i in sharding.addressable_devices_indices_map((batch_size,)).values()})
  return np.concatenate([np.arange(a, b) for a, b in spans])


def put_batch(local: Any, sharding: jax.sharding.Sharding, batch_size: int) -> Any:
  """This process's rows (`process_rows`) of a batch tree, as global arrays of `batch_size`
  rows."""
  shapes = jax.tree.map(lambda x: (batch_size, *np.shape(x)[1:]), local)
  return jax.make_array_from_process_local_data(sharding, local, shapes)


def fetch(tree: Any) -> Any:
  """Numpy copies of a tree of global arrays, whole, on every process (a collective for
  arrays whose shards are spread over processes; `jax.device_get` refuses those)."""
  def one(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def make_mesh(axes) -> jax.sharding.Mesh:
  """`sharding.make_mesh` with a one-line ConfigError naming ``mesh.axes`` and the process
  and device counts when they cannot form it. Checked before any collective runs."""
  from zojax.train import sharding  # noqa: PLC0415  (keeps this module free of the train stack)
  axes = [tuple(a) for a in axes]
  counts = (f"{jax.process_count()} processes x {jax.local_device_count()} devices"
            if jax.process_count() > 1 else f"{jax.device_count()} devices")
  try:
    mesh = sharding.make_mesh(axes)
  except ValueError as e:
    raise ConfigError(f"config key 'mesh.axes': {e} ({counts})") from None
  if jax.process_count() > 1 and mesh.devices.size != jax.device_count():
    raise ConfigError(
        f"config key 'mesh.axes'={axes} uses {mesh.devices.size} of the {jax.device_count()} "
        f"devices ({counts}): a multi-process run's mesh must use them all (one axis -1)")
  return mesh


# ---------------------------------------------------------------------------------------
# The watchdog


class _Watchdog(threading.Thread):
  """Stops this process when another one fails or dies (see the module docstring)."""

  def __init__(self, client, grp: Group, heartbeat_timeout: int):
    super().__init__(name="zojax-watchdog", daemon=True)
    self.client, self.group, self.heartbeat_timeout = client, grp, heartbeat_timeout
    self.stopping = threading.Event()

  def run(self):
    everyone = list(range(self.group.num_processes))
    while not self.stopping.is_set():
      try:
        message = self.client.blocking_key_value_get(_ERROR_KEY, _POLL_MS)
      except Exception as e:  # noqa: BLE001
        if self.stopping.is_set():
          return
        if "DEADLINE_EXCEEDED" not in str(e):
          self.lost_coordinator()
        try:
          live = self.client.get_live_nodes(everyone)
        except Exception:  # noqa: BLE001
          if self.stopping.is_set():
            return
          self.lost_coordinator()
        dead = sorted(set(everyone) - set(live))
        if dead and not self.stopping.is_set():
          self._stop_here(f"process {dead[0]} of {self.group.num_processes} stopped responding "
                          f"for {self.heartbeat_timeout} s (killed, crashed or unreachable)")
        continue
      if self.stopping.is_set():
        return
      with contextlib.suppress(Exception):
        self.client.key_value_set(f"{_ACK_KEY}{self.group.process_id}", "1")
      self._stop_here(message)

  def _stop_here(self, why: str, *, disconnect: bool = True) -> NoReturn:
    if not _ending.acquire(blocking=False):
      threading.Event().wait()  # another thread is ending this process already
    try:
      _say(f"error: process {self.group.process_id} of {self.group.num_processes} stops: "
           f"{why}")
      _exit(STOPPED, disconnect=disconnect)
    finally:
      _ending.release()  # reached only where `_exit` returns (stubbed out in tests)

  def coordinator_gone(self) -> bool:
    """Whether the coordination service (in process 0) no longer answers."""
    try:
      self.client.get_live_nodes([0])
    except Exception:  # noqa: BLE001
      return True
    return False

  def lost_coordinator(self) -> NoReturn:
    """Stops this process: process 0 is gone, and with it the service to disconnect from."""
    self._stop_here(f"lost the coordinator (process 0 at {self.group.coordinator}): it was "
                    f"killed, crashed or is unreachable", disconnect=False)

  def report(self, message: str) -> None:
    """Posts this process's error and waits (bounded) until the others have read it."""
    self.stopping.set()  # our own error: this thread must not report it back to us
    try:
      self.client.key_value_set(_ERROR_KEY, message)
    except Exception:  # noqa: BLE001  (another process posted first: the group stops anyway)
      return
    deadline = time.monotonic() + _ACK_WAIT_S
    for other in range(self.group.num_processes):
      if other == self.group.process_id:
        continue
      left_ms = int(1000 * (deadline - time.monotonic()))
      if left_ms <= 0:
        return
      with contextlib.suppress(Exception):  # a dead process never acknowledges
        self.client.blocking_key_value_get(f"{_ACK_KEY}{other}", left_ms)

  def stop(self) -> None:
    self.stopping.set()


# Taken by the first of `fail` and the watchdog's stop to end this process: the other then
# waits for the exit rather than printing a second line.
_ending = threading.Lock()


def _say(line: str) -> None:
  """Writes a line to stderr in one write: C++ threads log there too, and a line that
  `print` writes in two pieces (text, then newline) can be split by theirs."""
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def _client():
  """The coordination-service client `jax.distributed.initialize` made (no public accessor)."""
  return jax._src.distributed.global_state.client  # noqa: SLF001


def _exit(code: int, *, disconnect: bool = True) -> NoReturn:
  """Leaves at once: JAX's exit hooks would wait on processes that are gone.

  Process 0 leaves last. It hosts the coordination service, and a process still connected
  when the service goes away is aborted by its client's own thread (SIGABRT and a page of
  C++ log instead of its exit status). So the others disconnect first, and process 0 waits
  (bounded: a killed process never disconnects) until they have. A process that lost the
  coordinator has nothing to disconnect from (``disconnect=False``): it leaves at once.
  """
  if _group.num_processes > 1:
    if _group.process_id == 0:
      deadline = time.monotonic() + _LEAVE_WAIT_S
      while _others_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    elif disconnect:  # bounded too: with the coordinator gone, the call may never return
      leaving = threading.Thread(target=_disconnect, daemon=True)
      leaving.start()
      leaving.join(_LEAVE_WAIT_S)
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _others_connected() -> bool:
  """Whether a process besides 0 is still connected to the coordination service. A failed
  query counts as yes (keep waiting, bounded by the caller): ending the wait on it could take
  the service away from a process in the middle of disconnecting."""
  try:
    return len(_client().get_live_nodes(list(range(_group.num_processes)))) > 1
  except Exception:  # noqa: BLE001
    return True


def _disconnect() -> None:
  with contextlib.suppress(Exception):
    _client().shutdown()


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
