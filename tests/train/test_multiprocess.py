"""One run as 2 processes x 4 CPU devices through the CLI: the same losses and weights as
1 process x 8 devices, exact resume after kills, and failures that stop every process.

Each test launches real processes (`python -m zojax.launch`, or `python -m zojax.run` per
process), so each combines as many checks as its runs allow. The reference for the engines
that all-reduce (first-order, dense ZO) is 1 process through the launcher: it uses the same
CPU collectives (gloo) as 2, while a plain single-process CPU run uses XLA's in-process
all-reduce, whose float sums round differently (the README says so). The streamed engine
moves only exact all-gathers, so its reference is the plain single-process run. MoE expert
parallelism runs as 2 processes x 1 device, its experts split between them.
"""

import base64
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from zojax import launch

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/markov_lm.py:tiny,opt={}"   # 6 steps, checkpoints at 3 and 6
HEARTBEAT = 10   # seconds: how long a silent death takes to be noticed in these runs
STOPPED = 3      # zojax.train.distributed.STOPPED


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A compilation cache shared by the runs of a test (a resume compiles nothing new)."""
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache, devices=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _run_args(workdir, opt, *overrides):
  """`opt` names an optimizer of CONFIG, or is a whole ``--config`` value (has a '/')."""
  config = opt if "/" in opt else CONFIG.format(opt)
  return ["--config", config, "--workdir", str(workdir),
          "--heartbeat_timeout", str(HEARTBEAT), *overrides]


def _launch_cmd(processes, devices, workdir, opt, *overrides):
  return [sys.executable, "-m", "zojax.launch", "--processes", str(processes),
          "--devices_per_process", str(devices), "--", *_run_args(workdir, opt, *overrides)]


def _launch(cache, processes, devices, workdir, opt, *overrides, ok=True):
  proc = subprocess.run(_launch_cmd(processes, devices, workdir, opt, *overrides), cwd=REPO,
                        env=_env(cache), capture_output=True, text=True, timeout=600)
  if ok:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


def _plain(cache, workdir, opt, *overrides, devices=8):
  """1 process, 8 devices (default), no coordinator: XLA's in-process collectives."""
  cmd = [sys.executable, "-m", "zojax.run", *_run_args(workdir, opt, *overrides)]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(cache, devices=devices), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _direct(cache, workdir, opt, port, args_per_process):
  """2 processes started by hand (no launcher), 4 devices each."""
  env = _env(cache)
  env["JAX_NUM_CPU_DEVICES"] = "4"
  return [subprocess.Popen(
      [sys.executable, "-m", "zojax.run", *_run_args(workdir, opt, *extra),
       "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
       "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i, extra in enumerate(args_per_process)]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(path, procs, timeout=300):
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


def _state(workdir, step):
  """A checkpoint's arrays as numpy, whatever mesh wrote them."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _losses(workdir):
  rows = map(json.loads, (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines())
  return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _assert_same_run(ref, other, steps=(6,), checkpoints=(3, 6)):
  """Bit-identical weights, optimizer state and step at `steps`, and the same losses (one
  per step up to the last of the run's `checkpoints`)."""
  for step in steps:
    a, b = jax.tree.leaves(_state(ref, step)), jax.tree.leaves(_state(other, step))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
      assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), step
  assert _losses(other) == _losses(ref)
  assert [step for step, _ in _losses(ref)] == list(range(1, checkpoints[-1] + 1))
  # Not vacuous: training moved the weights between the checkpoints.
  moved = [not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(_state(ref, checkpoints[0])), jax.tree.leaves(_state(ref, checkpoints[1])))]
  assert sum(moved) > len(moved) // 2, moved


def _one_error_line(stderr, pattern):
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and re.search(pattern, lines[0]), stderr[-3000:]


@pytest.mark.slow
def test_adamw_two_processes_killed_and_resumed_match_one(cache, tmp_path):
  """adamw: 1 x 8 straight; 2 x 4 killed (every process, SIGKILL) after its step-3
  checkpoint, then resumed as 2 x 4: the same losses and final weights, bit for bit; only
  process 0 writes the run's files (~35 s on 2 cores)."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  _launch(cache, 1, 8, ref, "adamw")
  launcher = subprocess.Popen(_launch_cmd(2, 4, run, "adamw"), cwd=REPO, env=_env(cache),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
  try:
    _wait_for(run / "checkpoints" / "3", [launcher])
    assert launcher.poll() is None
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and both processes, mid-run
  finally:
    launcher.wait()
  assert not (run / "checkpoints" / "6").exists() and not (run / "results.json").exists()
  resumed = _launch(cache, 2, 4, run, "adamw")
  _assert_same_run(ref, run)
  out = resumed.stdout.splitlines()
  assert len(out) == 1 and out[0].startswith("[0] {"), out  # the summary, from process 0
  assert not [line for line in resumed.stderr.splitlines() if line.startswith("[1]")]
  assert json.loads((run / "results.json").read_text())["processes"] == 2
  assert (run / "curves.png").exists()


@pytest.mark.slow
def test_galore_two_processes_match_one(cache, tmp_path):
  """galore_adamw (a projector refresh every 4 steps): 2 x 4 == 1 x 8, checkpoints at
  steps 3 and 6 and every loss (~30 s on 2 cores)."""
  _launch(cache, 1, 8, tmp_path / "ref", "galore_adamw")
  _launch(cache, 2, 4, tmp_path / "run", "galore_adamw")
  _assert_same_run(tmp_path / "ref", tmp_path / "run", steps=(3, 6))


@pytest.mark.slow
def test_dense_zo_process_killed_others_stop_resume_on_one_process(cache, tmp_path):
  """dense zo_sgd, 2 processes started by hand: process 1 SIGKILLed after the step-3
  checkpoint; process 0 stops on its own within the heartbeat timeout, with one line naming
  process 1; the run then resumes on 1 process x 8 devices (another process count) and ends
  bit-identical to a straight 1 x 8 run (~40 s on 2 cores)."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  _launch(cache, 1, 8, ref, "zo_sgd")
  procs = _direct(cache, run, "zo_sgd", _free_port(), [(), ()])
  try:
    _wait_for(run / "checkpoints" / "3", procs)
    procs[1].kill()
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=HEARTBEAT + 60)
    took = time.monotonic() - killed_at
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  assert procs[0].returncode == STOPPED, err[-3000:]
  assert took < HEARTBEAT + 30, took
  _one_error_line(err, r"^error: process 0 of 2 stops: process 1 of 2 stopped responding")
  assert not (run / "checkpoints" / "6").exists()
  _launch(cache, 1, 8, run, "zo_sgd")
  _assert_same_run(ref, run, steps=(3, 6))


def test_coordinator_killed_the_other_stops_at_once_naming_it(cache, tmp_path, monkeypatch,
                                                               capfd):
  """Process 0 (it hosts the coordination service) SIGKILLed mid-run, through the launcher,
  2 x 1 devices: process 1 ends within seconds, non-zero, with one error line saying it lost
  process 0 (JAX's client aborts it at once, racing the watchdog's line; the launcher shows
  JAX's page of C++ log as that line), and the launcher names process 0 (~16 s)."""
  run = tmp_path / "run"
  monkeypatch.chdir(REPO)
  for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    monkeypatch.setenv(key, _env(cache)[key])
  seen = {}

  def kill_coordinator(procs):
    def watch():
      metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
      while not (metrics.exists() and "train/loss" in metrics.read_text()):  # training
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
          return
        time.sleep(0.02)
      procs[0].kill()
      killed = time.monotonic()
      with contextlib.suppress(subprocess.TimeoutExpired):
        procs[1].wait(timeout=60)
        seen.update(status=procs[1].returncode, after=time.monotonic() - killed)
    watcher.append(threading.Thread(target=watch, daemon=True))
    watcher[0].start()

  watcher = []
  code = launch.launch(_run_args(run, "adamw"), 2, 1, on_start=kill_coordinator)
  watcher[0].join(timeout=60)
  err = capfd.readouterr().err
  assert code == 128 + signal.SIGKILL, err[-3000:]
  assert seen and seen["status"] != 0 and seen["after"] < 4, (seen, err[-3000:])
  _one_error_line("\n".join(line.removeprefix("[1] ") for line in err.splitlines()
                            if line.startswith("[1] ")),
                  r"^error: process 1 of 2 stops: lost the coordinator \(process 0 at "
                  r"127\.0\.0\.1:\d+\): it was killed, crashed or is unreachable$")
  assert "Terminating process" not in err and "stack trace" not in err, err[-3000:]
  assert err.splitlines()[-1] == "zojax.launch: process 0 of 2 was killed by SIGKILL; the run stopped"


@pytest.mark.slow
def test_streamed_zo_two_processes_match_plain_one_process(cache, tmp_path):
  """streamed zo_sgd (DistZO2 layout, blocks sliced over 8 devices in host memory): 2 x 4
  through the launcher == a plain single-process 1 x 8 run, which shares no collective
  implementation with it (the streamed step moves only exact all-gathers) (~30 s)."""
  _plain(cache, tmp_path / "ref", "zo_sgd,stream")
  _launch(cache, 2, 4, tmp_path / "run", "zo_sgd,stream")
  _assert_same_run(tmp_path / "ref", tmp_path / "run", steps=(3, 6))


@pytest.mark.slow
def test_moe_expert_parallel_across_two_processes_matches_one(cache, tmp_path):
  """MoE with its 8 experts sharded over an "expert" mesh axis that spans 2 processes x 1
  device (tokens exchanged by all_to_all between the processes): the same losses and
  weights, bit for bit, as a plain 1 process x 2 devices run. A plain run can be the
  reference here: a 2-way all-reduce adds two values, which rounds alike in either order.
  (configs/moe_lm.py:tiny, the cached corpus; 4 steps, checkpoints at 2 and 4.)"""
  config = "configs/moe_lm.py:tiny,ep=2"
  _plain(cache, tmp_path / "ref", config, "train.eval_at_start=False", devices=2)
  _launch(cache, 2, 1, tmp_path / "run", config, "train.eval_at_start=False",
          "train.progress=False")
  _assert_same_run(tmp_path / "ref", tmp_path / "run", steps=(2, 4), checkpoints=(2, 4))
  # Really split between the processes: 2 processes of 1 device each, experts over 2.
  assert _expert_axes(tmp_path / "run") == _expert_axes(tmp_path / "ref") == {("expert", 2)}
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["processes"] == 2 and results["devices"].startswith("2 x "), results


def test_resume_on_half_the_devices_restores_onto_the_new_mesh(cache, tmp_path):
  """A run checkpointed on 1 process x 8 devices resumes on 1 x 4 (data axis 8 -> 4, the
  global batch of 16 unchanged): it restores step 3 onto the 4-device shardings and
  continues; its losses match the uninterrupted 8-device run's to float32 rounding, not
  bit for bit (the batch mean and gradient all-reduce add in another order on 4 devices),
  and so do its step-6 weights (~30 s on a loaded 2-core machine: two short runs)."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  _plain(cache, ref, "adamw")  # 6 steps, checkpoints at 3 and 6
  shutil.copytree(ref, run)    # ... as if it had stopped after step 3
  shutil.rmtree(run / "checkpoints" / "6")
  (run / "results.json").unlink()
  _plain(cache, run, "adamw", devices=4)
  assert _mesh_shapes(ref, 6) == {(("data", 8), ("model", 1))}
  assert _mesh_shapes(run, 6) == {(("data", 4), ("model", 1))}
  ref_losses, losses = dict(_losses(ref)), dict(_losses(run))
  assert sorted(losses) == sorted(ref_losses) == list(range(1, 7))
  assert [losses[s] for s in (1, 2, 3)] == [ref_losses[s] for s in (1, 2, 3)]  # kept rows
  for step in (4, 5, 6):  # computed on 4 devices
    assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=0), step
  # Not vacuous: a step moves the loss far more than the tolerance.
  assert abs(ref_losses[4] - ref_losses[3]) > 1e3 * 1e-5 * ref_losses[4]
  # Weights and Adam moments within 1e-7 of each other (measured); 3 steps move them more.
  a, b = jax.tree.leaves(_state(ref, 6)), jax.tree.leaves(_state(run, 6))
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
  moved = [not np.allclose(x, y, rtol=1e-4, atol=1e-6)
           for x, y in zip(jax.tree.leaves(_state(ref, 3)), a)]
  assert sum(moved) > len(moved) // 2, moved


def _mesh_shapes(workdir, step):
  """{((axis, size), ...)} of the meshes a checkpoint's arrays were saved on."""
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state" / "_sharding"
  return {tuple(zip(s["axis_names"], s["shape"])) for s in
          map(json.loads, json.loads(path.read_text()).values()) if "axis_names" in s}


def _expert_axes(workdir):
  """{(mesh axis, its size)} the expert weights are split over, from the shardings the
  step-4 checkpoint recorded."""
  path = pathlib.Path(workdir) / "checkpoints" / "4" / "state" / "_sharding"
  out = set()
  for name, text in json.loads(path.read_text()).items():
    if b".expert_" in base64.b64decode(name):
      s = json.loads(text)
      out |= {(a, s["shape"][s["axis_names"].index(a)]) for a in s["partition_spec"] if a}
  return out


def test_bad_config_in_one_process_stops_the_group(cache, tmp_path):
  """train.steps=-1 given to process 1 only: it reports the key, process 0 stops naming it,
  both within seconds (no training starts)."""
  procs = _direct(cache, tmp_path / "run", "adamw", _free_port(), [(), ("train.steps=-1",)])
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (_, err) in enumerate(outs):  # shown in full if the test fails (an assert truncates)
    print(f"--- process {i} stderr ---\n{err}")
  assert [p.returncode for p in procs] == [STOPPED, 2]
  _one_error_line(outs[1][1], r"^error: process 1 of 2: config key 'train.steps'=-1")
  _one_error_line(outs[0][1], r"^error: process 0 of 2 stops: process 1 of 2 failed: "
                              r"config key 'train.steps'=-1")


def test_mesh_the_processes_cannot_form_is_one_line_and_launcher_names_it(cache, tmp_path):
  """mesh.axes needing 3 x -1 devices of 2 x 4: every process says so in one line before any
  collective; the launcher exits with that status, naming the process."""
  proc = _launch(cache, 2, 4, tmp_path / "run", "adamw", "mesh.axes=(('data', 3), ('model', -1))",
                 ok=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  own = [line for line in proc.stderr.splitlines()
         if re.match(r"^\[[01]\] error: process [01] of 2: ", line)]
  assert own and all("config key 'mesh.axes'" in line and "2 processes x 4 devices" in line
                     for line in own), proc.stderr[-3000:]
  assert re.search(r"^zojax\.launch: process [01] of 2 exited with status 2",
                   proc.stderr.splitlines()[-1]), proc.stderr[-2000:]
