"""experiments/fate_offload.py --quick end to end on moe-tiny (random weights): the engine
checks pass, the counts obey their bounds, the timeline's all-on-device row bounds every
policy, the stages resume from their caches, and the pooled counters equal one trace's."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

from zojax.infer import simulate
from zojax.infer.trace import Trace

_PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "fate_offload.py"


def _load():
  spec = importlib.util.spec_from_file_location("fate_offload", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


fate = _load()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("fate")
  out = root / "fate_quick.json"
  results = fate.main(["--quick", "--workdir", str(root / "work"), "--out", str(out)])
  return root, out, results["models"]["moe_tiny"]


def test_engine_checks_and_outputs(run, capsys):
  root, out, r = run
  checks = r["engine_checks"]
  assert checks["off"]["logits_bit_identical"] and checks["off"]["tokens_equal"]
  assert checks["off"]["bytes_equal"] and checks["hybrid"]["bytes_equal"]
  assert checks["off"]["engine_bytes"]["calls"] > checks["hybrid"]["engine_bytes"]["calls"] > 0
  # as_decode reads a prefill as decode steps: the greedy routing, replayed by a prefill.
  assert min(checks["greedy_decode_vs_prefill_routing_agreement"]) >= 0.99
  saved = json.loads(out.read_text())
  assert saved["commit"] and saved["date"] and "moe_tiny" in saved["models"]
  assert out.with_suffix(".png").stat().st_size > 0
  assert len(list((root / "work" / "moe_tiny").glob("*/text_trace_0.npz"))) == 1


@pytest.mark.parametrize("variant", ["text", "greedy"])
def test_counts_obey_their_bounds(run, variant):
  _, _, model = run
  r = model["decode_variants"][variant]
  for phase in ("prefill", "decode"):
    assert r["prediction"]["oracle"][phase]["token_accuracy"] == 1.0
    assert 0.0 <= r["prediction"]["gate"][phase]["token_accuracy"] <= 1.0
  # Control: a predictor that ignores the token is wrong somewhere.
  assert r["prediction"]["popularity"]["decode"]["token_accuracy"] < 1.0
  assert r["prediction"]["prev_token"]["prefill"]["token_accuracy"] is None
  for point in r["hit_rate_curve"]["lod"]:
    assert point["decode"]["hit_rate_unique"] == 0.0 and point["prefill"]["hit_rate_assign"] == 0
  for point in r["hit_rate_curve"]["all_on_device"]:
    assert point["decode"]["hit_rate_unique"] == 1.0
    assert point["decode"]["bytes_per_token"] == 0.0
  lod = r["hit_rate_curve"]["lod"][0]["decode"]
  assert lod["bytes_per_token"] == sum(lod["bytes_per_token_by_kind"].values()) > 0
  assert set(lod["bytes_per_token_by_kind"]) == {"demand/int4"}


def test_timeline_is_bounded_by_all_on_device(run):
  _, _, model = run
  r = model["decode_variants"]["text"]
  assert len(r["timeline"]) == 2 * 2 * 2   # profiles x links x fractions
  for row in r["timeline"]:
    p = row["policies"]
    for phase in ("prefill", "decode"):
      key = f"{phase}_tokens_per_s"
      assert all(v[key] <= p["all_on_device"][key] * (1 + 1e-9) for v in p.values())
      # FP16 originals: the same transfers as LoD, each larger, on one FIFO link.
      assert p["lod_fp16"][key] <= p["lod"][key]
      assert math.isclose(row["speedup"][f"{phase}_over_lod"],
                          p["fate"][key] / p["lod"][key])
    assert p["all_on_device"]["decode_stall_share"] == 0.0


def test_quality_rows(run):
  _, _, r = run
  q = r["quality"]
  assert q["fp32"]["greedy_match"] == 1.0 and q["fp32"]["prompt_top1_agreement"] == 1.0
  for mode in ("int4", "hybrid", "int2"):
    assert math.isfinite(q[mode]["perplexity"]) and q[mode]["engine_bytes_equal_simulator"]
  # Control: INT2 experts change the logits (else the comparison could not see anything).
  assert q["int2"]["perplexity"] != q["fp32"]["perplexity"]


def test_stages_resume_and_pooled_counters(run):
  root, _, r = run
  args = fate.parse(["--quick", "--workdir", str(root / "work")])
  subject = fate.load_tiny(args)
  (workdir,) = (root / "work" / "moe_tiny").glob("prompts*")
  rec = fate.record(subject, workdir, args.decode_steps)
  assert rec["cached"]
  trace = Trace.load(workdir / "eval_trace_0.npz")
  np.testing.assert_array_equal(rec["traces"]["greedy"][0].decode_experts,
                                trace.decode_experts)
  text = rec["traces"]["text"][0]
  assert text.num_steps == args.decode_steps and text.prompt_len == trace.prompt_len
  np.testing.assert_array_equal(text.prefill_experts, trace.prefill_experts)

  nbytes = r["model"]["expert_bytes"]
  policy = simulate.policy("fate", slots=(4, 2), num_experts=8, quant="hybrid",
                           int2_rate=0.25, prefetch_k=1)
  sim = simulate.simulate(trace, policy, nbytes, calibration=rec["calibration"])
  one, two = fate.pooled([sim]), fate.pooled([sim, sim])
  summary = sim.summary()
  for phase in ("prefill", "decode"):
    for key in ("hit_rate_unique", "hit_rate_assign", "recall", "precision"):
      assert one[phase][key] == summary[phase][key] == two[phase][key]
    assert one[phase]["bytes_per_token"] == summary[phase]["bytes_per_token"]
    assert two[phase]["tokens"] == 2 * one[phase]["tokens"]
  assert one["decode"]["token_accuracy"] == pytest.approx(summary["decode"]["token_accuracy"])
