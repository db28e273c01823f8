"""experiments/bench_zo.py's measuring functions on the tiny config (seconds, CPU)."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

from zojax.models import llama
from zojax.train import memory

_PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_zo.py"


def _load_bench():
  spec = importlib.util.spec_from_file_location("bench_zo", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench_zo = _load_bench()


# One xdist worker runs the whole module (make test: --dist loadgroup), so its module
# fixture compiles once, not once per worker.
pytestmark = pytest.mark.xdist_group("bench_zo")


@pytest.fixture(scope="module")
def tiny():
  config = llama.CONFIGS["tiny"]
  params = llama.init(config, jax.random.key(0))
  batch = bench_zo.classification_batch(config, batch_size=4, seq_len=16)
  steps, compiled, seconds = bench_zo.compile_directions(config, params, batch, fused=False)
  return config, params, batch, steps, compiled, seconds


def test_classification_batch_is_scored_by_the_head(tiny):
  config, params, batch, _, _, _ = tiny
  assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == jnp.int32
  assert batch["candidates"].shape == (4, 2)
  assert bool(jnp.all(batch["last_index"] < 16)) and bool(jnp.all(batch["label"] < 2))
  loss, metrics = jax.jit(lambda p, b: llama.loss_fn(config, p, b))(params, batch)
  assert math.isfinite(float(loss)) and float(metrics["count"]) == 4


@pytest.mark.parametrize("direction", bench_zo.DIRECTIONS)
def test_memory_numbers_come_from_memory_analysis(tiny, direction):
  _, params, _, _, by_direction, seconds = tiny
  compiled = by_direction[direction]
  params_bytes = bench_zo.tree_bytes(params)
  assert params_bytes == sum(x.nbytes for x in jax.tree.leaves(params))
  report = bench_zo.memory_report(compiled, params_bytes)
  assert set(compiled) == {"forward", "zo_estimate", "zo_update", "adamw"}
  # The direction-free executables are compiled once and shared.
  assert compiled["forward"] is by_direction[bench_zo.DIRECTIONS[0]]["forward"]
  assert ("forward" in seconds[direction]) == (direction == bench_zo.DIRECTIONS[0])
  for name, c in compiled.items():
    a = c.memory_analysis()
    want = (a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
            - a.alias_size_in_bytes)
    assert report[f"{name}_peak_bytes"] == want == memory.step_memory(c)["peak_bytes"]
    assert report["memory_analysis"][name]["temp_bytes"] == a.temp_size_in_bytes
  # Every step reads the whole parameter tree as an argument.
  assert report["memory_analysis"]["forward"]["argument_bytes"] >= params_bytes
  assert report["forward_peak_bytes"] > params_bytes
  # AdamW holds params, two moments and the gradient at once.
  assert report["adamw_peak_bytes"] >= 3 * params_bytes
  # The update donates params and opt state: they are aliased, not counted twice.
  assert report["memory_analysis"]["zo_update"]["alias_bytes"] >= params_bytes
  assert report["zo_step_peak_bytes"] == max(report["zo_estimate_peak_bytes"],
                                             report["zo_update_peak_bytes"])
  assert report["zo_peak_over_forward_peak"] == pytest.approx(
      report["zo_estimate_peak_bytes"] / report["forward_peak_bytes"])
  for name in ("zo_peak_over_forward_peak", "zo_step_peak_over_forward_peak",
               "adamw_peak_over_zo_peak"):
    assert math.isfinite(report[name]) and report[name] > 0, name


def test_compile_steps_from_shapes_only(tiny):
  config, params, batch, steps, compiled, _ = tiny
  d = "rademacher"
  abstract, _ = bench_zo.compile_steps(
      steps[d], llama.param_shapes(config), jax.eval_shape(lambda: batch), adamw=False,
      fused=False)
  compiled = compiled[d]
  for name in abstract:
    assert (memory.step_memory(abstract[name])["peak_bytes"]
            == memory.step_memory(compiled[name])["peak_bytes"]), name


def test_time_ratio_is_finite_and_positive(tiny):
  _, params, batch, steps, compiled, _ = tiny
  t = bench_zo.time_zo_vs_forwards(compiled, steps, params, batch, jax.random.key(0), reps=3)
  assert len(t["reps"]) == 3
  assert math.isfinite(t["two_forwards_seconds"]) and t["two_forwards_seconds"] > 0
  for d in bench_zo.DIRECTIONS:
    values = [t["zo_step_over_two_forwards"][d], t["zo_estimate_over_two_forwards"][d],
              t[d]["zo_step_seconds"], t[d]["noise_pass_seconds"]]
    assert all(math.isfinite(v) and v > 0 for v in values), (d, values)
    for row in t["reps"]:
      assert row[f"{d}/zo_step_seconds"] == pytest.approx(
          row[f"{d}/zo_estimate_seconds"] + row[f"{d}/zo_update_seconds"])
      assert row[f"{d}/ratio"] == pytest.approx(
          row[f"{d}/zo_step_seconds"] / row["two_forwards_seconds"])
  # Each direction trained its own copy: the caller's parameters were not donated.
  assert all(not x.is_deleted() for x in jax.tree.leaves(params))
