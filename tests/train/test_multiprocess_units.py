"""The pieces of multi-process runs that one process can check: start-up flags, cluster
detection, a process's rows of a batch, the sharding-free checkpoint checksums, the
watchdog's decisions (with a stand-in coordination client), the launcher's streaming and
blame, and the markov task. The runs themselves are in test_multiprocess.py."""

import argparse
import functools
import io
import os
import pathlib
import stat
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import launch, run
from zojax.data import batching, synthetic
from zojax.errors import ConfigError
from zojax.train import checkpoint, distributed

RUN = ["--config", "configs/markov_lm.py:tiny", "--workdir", "/tmp/unused"]


@pytest.mark.parametrize("flags, message", [
    (["--num_processes", "2"], "missing --coordinator_address (host:port of process 0): "
                               "--num_processes=2 needs one"),
    (["--num_processes", "2", "--coordinator_address", "10.0.0.1:1234"],
     "missing --process_id (0 .. 1)"),
    (["--num_processes", "2", "--coordinator_address", "10.0.0.1:1234", "--process_id", "2"],
     "--process_id=2 must be in 0 .. 1"),
    (["--num_processes", "0"], "--num_processes=0 must be >= 1"),
    (["--num_processes", "2", "--coordinator_address", "10.0.0.1", "--process_id", "0"],
     "is not host:port"),
    (["--process_id", "1"], "need --num_processes"),
])
def test_bad_start_flags_are_one_line_errors(flags, message, capsys):
  assert run.main(RUN + flags) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_slurm_is_detected_and_one_task_stays_single_process(monkeypatch):
  env = dict(SLURM_JOB_ID="77", SLURM_STEP_NODELIST="node1", SLURM_NTASKS="4",
             SLURM_PROCID="2", SLURM_LOCALID="0")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.detect_cluster() == ("Slurm", 4)
  monkeypatch.setenv("SLURM_NTASKS", "1")
  args = argparse.Namespace(coordinator_address=None, num_processes=None, process_id=None,
                                heartbeat_timeout=100, init_timeout=300)
  assert distributed.start(args) == distributed.Group()  # nothing joined, no port opened
  for k in env:
    monkeypatch.delenv(k)
  assert distributed.detect_cluster() is None


@pytest.mark.parametrize("broken", [None, types.ModuleType("jax._src.clusters")],
                         ids=["not importable", "api changed"])
def test_cluster_env_without_jax_detection_is_a_one_line_error(broken, monkeypatch, capsys):
  """A JAX whose private cluster detection is gone or changed: a 4-task SLURM step stops in
  one line instead of running as 4 single-process runs; no cluster, or a 1-task step, still
  runs single-process (the negative controls)."""
  for k in ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
            "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setitem(sys.modules, "jax._src.clusters", broken)
  assert distributed.detect_cluster() is None
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detect_cluster() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert run.main(RUN) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(
      "error: the environment names a SLURM step (SLURM_STEP_NODELIST, SLURM_NTASKS=4) of "
      "several processes, but JAX's cluster detection (jax._src.clusters) is unusable"), err
  assert "pass --coordinator_address, --num_processes and --process_id" in err
  monkeypatch.delenv("SLURM_STEP_NODELIST")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  with pytest.raises(ConfigError, match=r"Cloud TPU slice \(TPU_WORKER_HOSTNAMES lists 2"):
    distributed.detect_cluster()


def test_mesh_the_devices_cannot_form_names_the_key():
  with pytest.raises(ConfigError, match=r"config key 'mesh.axes'.*\(8 devices\)"):
    distributed.make_mesh((("data", 3), ("model", -1)))
  assert distributed.make_mesh((("data", -1), ("model", 1))).devices.size == 8


class _Sharding:
  """A stand-in sharding: this process holds rows 4:6 and 0:2 of 8 (two devices)."""

  def addressable_devices_indices_map(self, shape):
    assert shape == (8,)
    return {"d1": (slice(4, 6),), "d0": (slice(0, 2),)}


def test_process_rows_follow_the_shards_in_order():
  np.testing.assert_array_equal(distributed.process_rows(_Sharding(), 8), [0, 1, 4, 5])
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  whole = NamedSharding(mesh, P("data"))
  np.testing.assert_array_equal(distributed.process_rows(whole, 16), np.arange(16))
  batch = {"x": np.arange(32, dtype=np.int32).reshape(16, 2)}
  placed = distributed.put_batch(batch, whole, 16)
  assert placed["x"].sharding == whole
  np.testing.assert_array_equal(np.asarray(placed["x"]), batch["x"])


def test_batches_read_only_the_rows_asked_for():
  enc = {"x": np.arange(37, dtype=np.int32), "y": np.arange(74, dtype=np.int32).reshape(37, 2)}
  rows = np.array([0, 1, 4, 5])
  whole = batching.batches(enc, 8, seed=3, step=9)
  part = batching.sampler(enc, 8, seed=3)(9, rows=rows)
  for k in enc:
    np.testing.assert_array_equal(part[k], whole[k][rows])
  evals = list(batching.eval_batches(enc, 8))
  parts = list(batching.eval_batches(enc, 8, rows=rows))
  assert len(parts) == len(evals) == 5
  for a, b in zip(evals, parts):
    for k in ("x", "y", "weight"):
      np.testing.assert_array_equal(b[k], a[k][rows])


def test_checksums_ignore_the_sharding_and_catch_one_changed_element():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = jax.random.normal(jax.random.key(0), (8, 4))
  extra = {"h": jnp.arange(10, dtype=jnp.bfloat16), "i": jnp.arange(7, dtype=jnp.int8),
           "k": jax.random.key_data(jax.random.key(1)), "d": np.linspace(0, 1, 5)}  # f64 host
  placements = [P(), P("data"), P(None, "model"), P("data", "model"), P("model", "data")]
  sums = [checkpoint._checksums({"w": jax.device_put(w, NamedSharding(mesh, spec)), **extra})
          for spec in placements]
  sums.append(checkpoint._checksums({"w": np.asarray(w), **extra}))
  assert all(s == sums[0] for s in sums), sums
  changed = np.asarray(w).copy()
  changed[5, 3] = np.nextafter(changed[5, 3], np.inf)  # one ulp of one element
  assert checkpoint._checksums({"w": changed, **extra})["['w']"] != sums[0]["['w']"]
  swapped = np.asarray(w).copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checkpoint._checksums({"w": swapped, **extra})["['w']"] != sums[0]["['w']"]


class _Client:
  """A coordination-service client stand-in for the watchdog."""

  def __init__(self, error=None, live=(0, 1), lost=False):
    self.error, self.live, self.lost, self.kv = error, live, lost, {}

  def blocking_key_value_get(self, key, timeout_ms):
    if self.lost:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    if key == distributed._ERROR_KEY and self.error:
      return self.error
    raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")

  def get_live_nodes(self, ids):
    if self.lost:
      raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
    return {i: 1 for i in self.live}

  def key_value_set(self, key, value):
    self.kv[key] = value


@pytest.mark.parametrize("client, why", [
    (_Client(error="process 1 of 2 failed: boom"), "process 1 of 2 failed: boom"),
    (_Client(live=(0,)),
     "process 1 of 2 stopped responding for 10 s (killed, crashed or unreachable)"),
    (_Client(lost=True),
     "lost the coordinator (process 0 at 10.0.0.1:99): it was killed, crashed or is unreachable"),
])
def test_watchdog_stops_this_process_naming_the_cause(client, why, monkeypatch, capsys):
  exits = []

  def fake_exit(code, disconnect=True):
    exits.append((code, disconnect))
    raise SystemExit

  monkeypatch.setattr(distributed, "_exit", fake_exit)
  dog = distributed._Watchdog(client, distributed.Group(0, 2, "flags", "10.0.0.1:99"), 10)
  with pytest.raises(SystemExit):
    dog.run()
  # Process 0 gone: nothing to disconnect from (the call would hang), leave at once.
  assert exits == [(distributed.STOPPED, "coordinator" not in why)]
  assert capsys.readouterr().err == f"error: process 0 of 2 stops: {why}\n"
  assert (f"{distributed._ACK_KEY}0" in client.kv) == ("boom" in why)  # read: acknowledged


@pytest.mark.parametrize("lost, line", [
    (True, "error: process 1 of 2 stops: lost the coordinator (process 0 at 10.0.0.1:99): it "
           "was killed, crashed or is unreachable\n"),
    (False, "error: process 1 of 2: ValueError: UNKNOWN: Gloo AllGather failed\n"),
])
def test_a_collective_failing_because_process_0_died_names_process_0(lost, line, monkeypatch,
                                                                    capsys):
  """gloo fails the step at once when process 0 dies, before the watchdog hears of it: the
  process says it lost the coordinator (no traceback), not its own error; with process 0
  alive (the control) the error is its own."""
  grp = distributed.Group(1, 2, "flags", "10.0.0.1:99")
  exits = []

  def fake_exit(code, disconnect=True):
    exits.append(code)
    raise SystemExit

  monkeypatch.setattr(distributed, "_exit", fake_exit)
  monkeypatch.setattr(distributed, "_group", grp)
  monkeypatch.setattr(distributed, "_watchdog", distributed._Watchdog(_Client(lost=lost), grp, 10))
  client = distributed._watchdog.client
  with pytest.raises(SystemExit):
    distributed.fail_unexpected(ValueError("UNKNOWN: Gloo AllGather failed\nmore"))
  assert exits == [distributed.STOPPED if lost else 1]
  err = capsys.readouterr().err
  assert err == line if lost else err.startswith("ValueError: UNKNOWN") and err.endswith(line)
  assert ("zojax/error" in client.kv) != lost  # its own error is posted to the others


def test_a_stopped_watchdog_is_quiet():
  dog = distributed._Watchdog(_Client(live=(0,)), distributed.Group(0, 2), 10)
  dog.stop()
  dog.run()  # returns at once: no exit, nothing printed


def test_launcher_prefixes_lines_keeps_redraws_and_drops_gloo_noise():
  src = io.BufferedReader(io.BytesIO(
      b"step 1\r step 2\r[Gloo] Rank 3 is connected to 7 peer ranks. Expected 7\n"
      b"1 peer ranks. Expected number of connected peer ranks is : 1\nlast"))  # a torn one
  out = io.BytesIO()
  launch._pump(src, out, b"[1] ", threading.Lock())
  assert out.getvalue() == b"[1] step 1\r[1]  step 2\r[1] last\n"
  env = launch.child_env(4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_x=1"})
  assert env["XLA_FLAGS"] == "--xla_x=1" and env["JAX_NUM_CPU_DEVICES"] == "4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"


_JAX_PAGE = (  # what JAX's client printed as it aborted process 1 of 2 (process 0 killed)
    b"W1129 19:08:05.498952    2073 preemption_sync_manager.cc:147] Failed to retrieve "
    b"preemption notice from coordination service\n"
    b"Additional GRPC error information from remote target coordination_service while "
    b"calling /xla.coordination.CoordinationService/GetKeyValue:\n"
    b":UNKNOWN:Error received from peer  {grpc_status:14, grpc_message:\"Socket closed\"}\n"
    b"E1129 19:08:05.500590    2073 coordination_service_agent.cc:289] Polled an error from "
    b"coordination service (this can be an error from this or another task).\n"
    b"F1129 19:08:05.500641    2073 client.h:80] Terminating process because the JAX "
    b"distributed service detected fatal errors. This most likely indicates that another "
    b"task died. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service.\n"
    b"*** Check failure stack trace: ***\n"
    b"    @     0x7f69bbe40634  absl::log_internal::LogMessage::SendToLog()\n")


@pytest.mark.parametrize("first, shown", [
    (b"", b"[1] error: process 1 of 2 stops: lost the coordinator (process 0 at h:1): it was "
          b"killed, crashed or is unreachable\n"),
    (b"error: process 1 of 2 stops: lost the coordinator (watchdog)\n",   # no second line
     b"[1] error: process 1 of 2 stops: lost the coordinator (watchdog)\n"),
])
def test_launcher_shows_jax_fatal_page_as_the_watchdog_line(first, shown):
  fatal = functools.partial(launch._jax_fatal_line, process=1, processes=2, address="h:1")
  out = io.BytesIO()
  launch._pump(io.BufferedReader(io.BytesIO(b"step 3\n" + first + _JAX_PAGE)), out, b"[1] ",
               threading.Lock(), fatal)
  assert out.getvalue() == b"[1] step 3\n" + shown
  other = next(line for line in _JAX_PAGE.splitlines() if line.startswith(b"F"))
  other = other.replace(b"UNAVAILABLE: Failed", b"INTERNAL: Failed")
  assert launch._jax_fatal_line(other, 1, 2, "h:1") == (
      b"error: process 1 of 2 stops: JAX's runtime aborted it (INTERNAL)\n")
  plain = io.BytesIO()  # stdout, or a launcher without `fatal`: the page passes unchanged
  launch._pump(io.BufferedReader(io.BytesIO(_JAX_PAGE)), plain, b"", threading.Lock())
  assert plain.getvalue() == _JAX_PAGE


def _fake_python(tmp_path, body):
  """An executable standing in for `python -m zojax.run`: $PID is the --process_id."""
  path = tmp_path / "python"
  path.write_text("#!/bin/sh\nPID=$(echo \"$@\" | sed 's/.*--process_id \\([0-9]*\\).*/\\1/')\n"
                  + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_launcher_blames_the_failed_process_not_those_it_stopped(tmp_path, capsys):
  # Process 0 stops first (status 3, as the watchdog does); process 1 is the one that failed.
  fake = _fake_python(tmp_path, 'if [ "$PID" = 0 ]; then echo "stopping"; exit 3; fi\n'
                                "sleep 0.3; echo 'error: boom' >&2; exit 2\n")
  assert launch.launch([], 2, 1, python=fake, grace=10) == 2
  err = capsys.readouterr().err
  assert "[1] error: boom\n" in err
  assert err.endswith("zojax.launch: process 1 of 2 exited with status 2; the run stopped\n")


def test_launcher_ends_the_group_when_a_process_is_killed(tmp_path, capsys):
  fake = _fake_python(tmp_path, 'if [ "$PID" = 1 ]; then kill -9 $$; fi\nexec sleep 600\n')
  assert launch.launch([], 2, 1, python=fake, grace=600) == 137  # not 600 s: at once
  assert capsys.readouterr().err.endswith(
      "zojax.launch: process 1 of 2 was killed by SIGKILL; the run stopped\n")


def test_markov_tokens_follow_a_fixed_sparse_chain():
  a = synthetic.markov_tokens(200, seq_len=12, vocab=16, successors=3, seed=5, stream=0)
  np.testing.assert_array_equal(
      a, synthetic.markov_tokens(200, seq_len=12, vocab=16, successors=3, seed=5, stream=0))
  b = synthetic.markov_tokens(200, seq_len=12, vocab=16, successors=3, seed=5, stream=1)
  assert a.shape == (200, 13) and a.dtype == np.int32 and not np.array_equal(a, b)
  pairs = np.concatenate([np.stack([x[:, :-1].ravel(), x[:, 1:].ravel()], 1) for x in (a, b)])
  followers = [len(set(pairs[pairs[:, 0] == t, 1])) for t in range(16)]
  assert max(followers) <= 3 and sum(followers) > 16  # the same chain in both streams
  assert a.min() >= 0 and a.max() < 16
  with pytest.raises(ValueError, match="successors=0"):
    synthetic.markov_tokens(4, seq_len=2, vocab=4, successors=0)
