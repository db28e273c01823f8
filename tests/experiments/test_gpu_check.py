"""experiments/gpu_check.py in its CPU smoke mode (tiny shapes), so that the script cannot
rot before a GPU is lent: every measurement runs and lands in the results and the claims."""

import json
import pathlib
import runpy
import types

import pytest

# The script is not a package module: run its top level (imports, functions) without main.
gpu_check = types.SimpleNamespace(**runpy.run_path(
    str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "gpu_check.py"),
    run_name="gpu_check"))


def _run(tmp_path, *args):
  out = tmp_path / "results.json"
  returned = gpu_check.main(["--smoke", "--out", str(out), *args])
  written = json.loads(out.read_text())
  assert written["claims"] == returned["claims"]
  return written["measurements"], {row["claim"]: row for row in written["claims"]}


def test_kernels_tests_and_orchestration(tmp_path):
  """The GPU machine's path: the gpu-marked tests through pytest (all skip on CPU) and a
  measurement in its own subprocess; attention in-process; a spent budget skips."""
  m, claims = _run(tmp_path, "--only", "tests,projection")
  assert m["projection"]["status"] == "ok" and m["projection"]["device"]["platform"] == "cpu"
  for row in m["projection"]["rows"]:
    assert row["project_max_rel_diff"] < 1e-4 and row["project_back_add_max_rel_diff"] < 1e-4
    assert row["project_speedup_vs_jnp"] > 0
  tests = m["tests"]
  assert "tests/kernels/test_attention.py" in tests["files"]
  assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == 0
  assert claims["gpu-marked tests pass"]["met"] is None  # all skipped: shown neither way

  m, claims = _run(tmp_path, "--inline", "--only", "attention")
  for row in m["attention"]["rows"]:
    # The interpreted Pallas kernel and XLA ran and agree; cuDNN has no CPU path, which is
    # recorded, not fatal, and its speedup claim stays unmeasured.
    assert row["zojax_pallas_seconds"] > 0 and row["xla_seconds"] > 0 and "cudnn_error" in row
    assert max(row["pallas_max_rel_diff_vs_xla"].values()) < 0.05, row
  unmeasured = [row for c, row in claims.items() if c.endswith("vs cuDNN")]
  assert len(unmeasured) == 2 and all(row["met"] is None for row in unmeasured)

  m, _ = _run(tmp_path, "--budget_s", "1", "--only", "stream")
  assert m["stream"]["status"] == "skipped"

  m, _ = _run(tmp_path, "--inline", "--only", "fate")
  fate = m["fate"]
  assert fate["status"] == "ok", fate
  assert all(r["bytes_per_s"] > 0 for r in fate["pinned_to_device"].values())
  assert fate["pinned_to_device"]["expert_int4"]["bytes"] < fate["pinned_to_device"][
      "expert_full"]["bytes"]
  for phase in ("prefill", "decode"):
    row = fate["layer_seconds"][phase]
    assert row["attention_router_s"] > 0 and row["expert_full_s"] > 0 and row["expert_int4_s"] > 0


@pytest.mark.slow
def test_zo_step_and_stream(tmp_path):
  """~40 s of CPU on 2 cores: the ZO estimate, update and forward, and two streamed-step
  programs (all blocks resident, all streamed), compiled at tiny shapes."""
  m, claims = _run(tmp_path, "--inline", "--only", "zo_step,stream")
  assert m["zo_step"]["status"] == m["stream"]["status"] == "ok"
  assert m["zo_step"]["models"]["tiny"]["zo_step_over_two_forwards"]["rademacher"] > 0
  stream = m["stream"]
  assert stream["streamed"]["host_bytes"] > stream["resident"]["host_bytes"]
  assert stream["streamed"]["device_bytes"] < stream["resident"]["device_bytes"]
  assert stream["streamed"]["loss"] == pytest.approx(stream["resident"]["loss"], rel=1e-4)
  assert "ZO step / two forwards, tiny, rademacher" in claims
  assert any(c.startswith("streamed / resident step") for c in claims)
