"""zojax.infer.simulate, predictors and timeline on small traces and a hand-timed example."""

import _traces
import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer import predictors, simulate, timeline
from zojax.infer.schedule import Transfer
from zojax.infer.simulate import CallRecord

BYTES = {"full": 1000, "int4": 300, "int2": 170}


@pytest.fixture(scope="module")
def trace():
  return _traces.synthetic(0, L=3, E=6, K=2, B=2, T=4, S=5)


@pytest.fixture(scope="module")
def calib():
  return _traces.synthetic(1, L=3, E=6, K=2, B=2, T=4, S=5)


def _run(trace, calib, name, slots=(6, 2, 2), **kw):
  config = simulate.policy(name, slots=slots, num_experts=trace.num_experts, **kw)
  return simulate.simulate(trace, config, BYTES, calibration=calib)


def test_lod_moves_exactly_the_needed_bytes(trace, calib):
  for quant, fmt in (("off", "full"), ("hybrid", "int4")):
    res = _run(trace, calib, "lod", quant=quant, int2_rate=0.5)
    for phase in ("prefill", "decode"):
      steps = range(trace.num_steps) if phase == "decode" else [0]
      needed = sum(len(np.unique(c.experts)) for step in steps for c in trace.calls(phase, step))
      assert res.bytes(phase) == res.bytes(phase, "demand") == needed * BYTES[fmt]
      assert res.summary()[phase]["hit_rate_unique"] == 0.0
    assert res.warm == [] and all(t.dest == "transient" for c in res.calls for t in c.demand)


def test_all_on_device_moves_nothing_after_warm_up(trace, calib):
  res = _run(trace, calib, "all_on_device", quant="off")
  assert res.bytes("prefill") == res.bytes("decode") == 0
  assert res.bytes("setup") == 3 * 6 * BYTES["full"]
  assert res.summary()["decode"]["hit_rate_assign"] == 1.0


def test_oracle_and_perfect_gate_hit_everything(trace, calib):
  oracle = _run(trace, calib, "oracle", prefetch_k=2 * 2)   # B·K: every decode token covered
  for phase in ("prefill", "decode"):
    s = oracle.summary()[phase]
    assert s["hit_rate_unique"] == 1.0 and s["recall"] == 1.0 and s["token_accuracy"] == 1.0
    assert s["demand_bytes"] == 0
  # A gate equal to the router is the oracle; a noisy one (this trace's) is worse.
  exact = _traces.from_experts(trace.prefill_experts, trace.decode_experts, 6, B=2)
  fate_exact = _run(exact, calib, "fate", prefetch_k=4)
  assert fate_exact.summary()["decode"]["hit_rate_unique"] == 1.0
  noisy = _run(trace, calib, "fate", prefetch_k=4).summary()["decode"]
  assert noisy["token_accuracy"] < 1.0


def test_eap_learns_a_deterministic_path_popularity_does_not():
  # Every token: expert e at layer l, e + 1 (mod 4) at layer l + 1 (plus a fixed second one).
  rng = np.random.default_rng(0)

  def paths(lead):
    first = rng.integers(0, 4, lead)
    layers = [(first + l) % 4 for l in range(3)]
    experts = np.stack([np.stack([e, np.full_like(e, 4 + l % 2)], -1) for l, e in
                        enumerate(layers)])
    return experts

  pre = paths((8,))                                   # [L, N, 2]
  dec = paths((6, 1)).transpose(1, 0, 2, 3)           # [S, L, B, 2]
  t = _traces.from_experts(pre, dec, 6, B=1)
  eap, pop = predictors.make("eap", t), predictors.make("popularity", t)
  calls = [c for step in range(6) for c in t.calls("decode", step) if c.layer > 0]
  acc = lambda p: sum(predictors.token_overlap(p.rank(c), c.experts) for c in calls) / (
      2 * len(calls))
  assert acc(eap) == 1.0 and acc(pop) < 0.8


def test_prev_token_predicts_repeats_and_nothing_in_prefill():
  pre = np.tile(np.array([[[0, 1]]]), (2, 3, 1))       # L = 2, N = 3 tokens, B = 1
  dec = np.tile(np.array([[[[0, 1]]]]), (4, 2, 1, 1))  # same experts every decode step
  t = _traces.from_experts(pre, dec, 4)
  p = predictors.make("prev_token")
  assert p.rank(next(t.calls("prefill"))).shape == (3, 0)
  res = simulate.simulate(t, simulate.policy("prev_token", slots=(0, 0), num_experts=4,
                                             quant="off", prefetch_k=2), BYTES, calibration=t)
  assert res.token_accuracy["decode"] == [1.0, 1.0] and res.token_accuracy["prefill"] == [
      None, None]
  assert res.summary()["decode"]["hit_rate_unique"] == 1.0   # prefetched into transient
  assert res.bytes("decode", "prefetch") == 4 * 2 * 2 * BYTES["full"]


def test_policy_errors(trace):
  with pytest.raises(ConfigError, match="policy='magic'"):
    simulate.policy("magic", slots=(1, 1, 1), num_experts=6)
  with pytest.raises(ConfigError, match="needs a calibration"):
    simulate.simulate(trace, simulate.policy("eap", slots=(1, 1, 1), num_experts=6), BYTES)
  with pytest.raises(ConfigError, match="'slots' has 2 layers"):
    simulate.simulate(trace, simulate.policy("lod", slots=(1, 1), num_experts=6), BYTES)


# ---- timeline


def _t(layer, expert, nbytes, kind):
  return Transfer(layer, expert, "full", nbytes, kind, "cache", 0)


def test_timeline_two_layers_by_hand():
  """10 B/s link, attention 1 s and MoE 2 s per layer (hand-worked in the comments)."""
  calls = [
      # Prefill: e0 prefetched at t=0 (arrives 1); attention_0 ends at 1: demand e1 1->3, then
      # layer 1's prefetches e2 3->4 and e3 4->7. MoE_0 waits for e1: stall 2, runs 3->5.
      # Attention_1 5->6; MoE_1 needs only e2 (arrived 4): runs 6->8. Prefill = 8 s.
      CallRecord("prefill", 0, 0, 4, (_t(0, 0, 10, "prefetch"),), (_t(0, 1, 20, "demand"),),
                 (0, 1)),
      CallRecord("prefill", 0, 1, 4, (_t(1, 2, 10, "prefetch"), _t(1, 3, 30, "prefetch")), (),
                 (2,)),
      # Decode from t=8: e0 prefetched 8->9 (link free since 7); attention_0 8->9, MoE_0
      # 9->11, attention_1 11->12, demand e1 12->13: stall 1, MoE_1 13->15. Decode = 7 s.
      CallRecord("decode", 0, 0, 1, (_t(0, 0, 10, "prefetch"),), (), (0,)),
      CallRecord("decode", 0, 1, 1, (), (_t(1, 1, 10, "demand"),), (1,)),
  ]
  times = timeline.ComputeTimes(np.array([1.0, 1.0]), np.array([2.0, 2.0]),
                                np.array([1.0, 1.0]), np.array([2.0, 2.0]))
  r = timeline.replay(calls, times, 10.0, warm=[_t(0, 5, 50, "warm")])
  assert (r.prefill_s, r.prefill_stall_s, r.decode_s, r.decode_stall_s) == (8.0, 2.0, 7.0, 1.0)
  assert r.prefill_tokens_per_s == 0.5 and r.decode_tokens_per_s == 1 / 7
  assert r.link_busy_s == 9.0 and r.warm_s == 5.0
  # Control: an infinitely fast link leaves compute alone (6 s, 6 s).
  fast = timeline.replay(calls, times, 1e30)
  assert (fast.prefill_s, fast.decode_s, fast.prefill_stall_s) == (6.0, 6.0, 0.0)


def test_timeline_hit_on_a_copy_still_in_flight_waits():
  """Step 0 prefetches e7 (100 s on the link) without needing it; step 1 hits on it."""
  calls = [CallRecord("decode", 0, 0, 1, (_t(0, 7, 1000, "prefetch"),), (), ()),
           CallRecord("decode", 1, 0, 1, (), (), (7,))]
  times = timeline.ComputeTimes(np.ones(1), np.ones(1), np.ones(1), np.ones(1))
  r = timeline.replay(calls, times, 10.0)
  assert (r.decode_s, r.decode_stall_s) == (101.0, 97.0)   # step 1: attn 2->3, waits to 100


def test_timeline_orders_policies(trace, calib):
  L = trace.num_layers
  times = timeline.ComputeTimes(np.full(L, 1e-5), np.full(L, 2e-5), np.full(L, 1e-6),
                                np.full(L, 2e-6))
  # 1 GB/s: a 1000-byte expert takes 1 µs, a decode layer computes 3 µs.
  run = lambda name, **kw: timeline.replay(_run(trace, calib, name, **kw).calls, times, 1e9)
  everything = run("all_on_device", quant="off")
  lod = run("lod", quant="off")
  oracle = run("oracle", quant="off", prefetch_k=4)
  assert everything.decode_stall_s == 0 and everything.decode_s == pytest.approx(5 * 3 * 3e-6)
  assert lod.decode_s > oracle.decode_s >= everything.decode_s
  assert lod.decode_stall_s > oracle.decode_stall_s
  assert lod.decode_s == pytest.approx(everything.decode_s + lod.decode_stall_s)
  assert lod.prefill_s > everything.prefill_s


def test_roofline_times_shapes_and_regime():
  shape = timeline.DecoderShape(dim=2048, num_heads=16, num_kv_heads=16, head_dim=128,
                                expert_dim=1408, num_experts=60, top_k=4)
  t = timeline.roofline_times(timeline.GTX_1080_TI, shape, num_layers=24, batch=1,
                              prompt_len=512, decode_steps=3)
  assert t.prefill_attn.shape == (24,) and t.decode_attn.shape == (3, 24)
  # Decode is memory bound: the 4 experts' fp16 weights over 484 GB/s.
  assert t.decode_moe[0] == pytest.approx((4 * 3 * 2048 * 1408 + 2048 * 60) * 2 / 484e9)
  assert t.decode_attn[2, 0] > t.decode_attn[0, 0]    # the context grows
