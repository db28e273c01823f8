"""Resume is bit-identical: 2N straight steps == N steps, a process restart, then N more."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
N = 3


def _run(workdir, *overrides, config="configs/sentiment_adamw.py:tiny"):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "zojax.run", "--config", config,
         "--workdir", str(workdir), f"train.steps={2 * N}", f"train.checkpoint_every={N}",
         "train.progress=False", "train.log_every=1", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "state")


def _killed_at(straight, workdir, step):
  """`workdir` as a run killed right after its checkpoint at `step` left it: the straight
  run's files with every later checkpoint gone (metrics past `step` are dropped on resume)."""
  shutil.copytree(straight, workdir)
  for ck in (workdir / "checkpoints").iterdir():
    if ck.name.isdigit() and int(ck.name) > step:
      shutil.rmtree(ck)
  for name in ("results.json", "zo_log.json"):
    (workdir / name).unlink(missing_ok=True)


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("config", [
    "configs/sentiment_adamw.py:tiny",
    "configs/sentiment_zo.py:tiny",
    "configs/sentiment_galore.py:tiny",
    "configs/sentiment_galore.py:tiny,opt=galore8bit",
    "configs/sentiment_galore.py:tiny,opt=natural_galore",
])
def test_resume_after_restart_is_bit_identical(tmp_path, config):
  """Two CLI processes per optimizer (35-80 s on 2 cores, ZO the slowest: a real restart
  is the only honest test of exact resume, and each process compiles its step anew)."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _run(straight, config=config)
  _killed_at(straight, resumed, N)
  assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [str(N)]
  # A new process: restores params, optimizer state (GaLore projectors, 8-bit codes, the
  # Fisher history), step, key (and the ZO seed log) from N.
  _run(resumed, config=config)

  a, b = _state(straight, 2 * N), _state(resumed, 2 * N)
  assert int(a["step"]) == int(b["step"]) == 2 * N
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Training moved the weights after the restart, so the equality above is not vacuous.
  initial = _state(resumed, N)
  assert not np.array_equal(np.asarray(initial["params"]["blocks"]["wq"]),
                            np.asarray(b["params"]["blocks"]["wq"]))

  # The resumed run's log has each step exactly once, as the straight run's does.
  steps = lambda d: [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                     if "train/loss" in r]
  assert steps(resumed) == steps(straight) == list(range(1, 2 * N + 1))
  for d in (straight, resumed):
    assert (d / "results.json").exists() and (d / "curves.png").stat().st_size > 1000
  if "zo" in config:
    # The seed log survives the restart, and replaying it rebuilds the weights bit for bit.
    assert (straight / "zo_log.json").read_text() == (resumed / "zo_log.json").read_text()
    for d in (straight, resumed):
      assert json.loads((d / "results.json").read_text())["replay_bit_identical"] is True


@pytest.mark.assets
def test_resume_refuses_a_different_config(tmp_path):
  _run(tmp_path, f"train.halt_at_step={N}")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "zojax.run", "--config", "configs/sentiment_adamw.py:tiny",
       "--workdir", str(tmp_path), f"train.steps={2 * N}", f"train.checkpoint_every={N}",
       "optim.learning_rate=0.5", "train.progress=False"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert "optim.learning_rate" in proc.stderr.strip().splitlines()[-1]
