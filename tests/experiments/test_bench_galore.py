"""experiments/bench_galore.py's measuring functions on the tiny LLaMA (CPU, seconds)."""

import os
import pathlib
import runpy
import types

_had_blas_env = "OPENBLAS_NUM_THREADS" in os.environ
# The script is not a package module: run its top level (imports, functions) without main.
bench = types.SimpleNamespace(**runpy.run_path(
    str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_galore.py"),
    run_name="bench_galore"))
if not _had_blas_env:  # the script's setdefault must not leak into later subprocesses
  os.environ.pop("OPENBLAS_NUM_THREADS", None)


def test_state_bytes_order_without_compiling():
  row = bench.memory_row("tiny", compile_step=False)
  pct = row["state_vs_adamw_pct"]
  assert pct["adamw"] == 100.0
  assert pct["galore8bit"] < pct["galore_adamw"] < pct["adamw"]
  assert pct["galore_adamw_randomized"] == pct["galore_adamw"]  # same state, other refresh
  assert pct["natural_galore"] > pct["galore_adamw"]  # the s = 20 Fisher history


def test_step_times_amortize_the_refresh_and_summarize():
  timing = bench.time_steps("tiny", reps=1, gap=200, names=("galore_adamw",))
  opts = timing["optimizers"]
  assert set(opts) == {"adamw", "galore_adamw"}
  g = opts["galore_adamw"]
  assert g["amortized_s"] == bench.amortized(g["ordinary_s"], g["refresh_s"], 200)
  assert min(g["ordinary_s"], g["refresh_s"]) > 0 and opts["adamw"]["ordinary_over_adamw"] == 1.0
  summary = bench.step_time_summary(timing, None)
  assert summary["galore_step_over_adamw"] == g["amortized_over_adamw"]
  assert "galore_step_over_optax_contrib_galore" not in summary  # not timed here


def test_amortized():
  assert bench.amortized(1.0, 201.0, 200) == 2.0


def test_missing_torch_interpreter_is_skipped_with_a_message(capsys):
  assert bench.time_torch("/nonexistent/python", "tiny", 1) is None
  assert "galore-torch not timed" in capsys.readouterr().out
