"""zojax.infer.schedule: the online scheduler on a hand-worked sequence of layer calls."""

import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer.schedule import Location, PolicyConfig, Scheduler, Transfer, needed_experts

BYTES = {"full": 100, "int4": 30, "int2": 20}


def _sched(**kw):
  config = dict(slots=(2, 1), predictor="gate", cache="lru", quant="hybrid", int2_rate=0.5,
                prefetch_k=1, warm="none")
  config.update(kw)
  return Scheduler(PolicyConfig(**config), BYTES, num_experts=4, top_k=2)


def T(layer, expert, fmt, kind, dest, slot):
  return Transfer(layer, expert, fmt, BYTES[fmt], kind, dest, slot)


def test_hand_worked_prefill_and_decode():
  s = _sched()
  # Prefill, 3 tokens. Layer 0 votes: 0 x3, 1 x2, 2 x1 -> order 0, 1, 2; INT2 for the
  # least-voted up to half the 6 votes: 2 (1), 1 (1 + 2 = 3). Two slots: 2 goes transient.
  got = s.prefetch("prefill", 0, np.array([[0, 1], [0, 2], [0, 1]]))
  assert got == [T(0, 0, "int4", "prefetch", "cache", 0), T(0, 1, "int2", "prefetch", "cache", 1),
                 T(0, 2, "int2", "prefetch", "transient", 0)]
  # Needs 0, 1, 3 (3, 2, 1 assignments): 0, 1 hit; 3 misses, both slots pinned -> transient.
  assert s.demand("prefill", 0, [0, 1, 3], [3, 2, 1]) == [
      T(0, 3, "int4", "demand", "transient", 1)]
  assert s.locate(0, 3) == Location("transient", 1, "int4")
  assert s.locate(0, 1) == Location("cache", 1, "int2")
  # Layer 1 (one slot) votes: 3 x3, 2 x2, 0 x1 -> 3 INT4 into the slot, 2 and 0 INT2 transient.
  assert s.prefetch("prefill", 1, np.array([[3, 2], [3, 0], [3, 2]])) == [
      T(1, 3, "int4", "prefetch", "cache", 0), T(1, 2, "int2", "prefetch", "transient", 0),
      T(1, 0, "int2", "prefetch", "transient", 1)]
  s.release(0)
  assert s.demand("prefill", 1, [1, 2, 3], [1, 2, 3]) == [
      T(1, 1, "int4", "demand", "transient", 2)]
  s.release(1)
  with pytest.raises(ConfigError, match="not on device"):
    s.locate(1, 1)   # the transient buffer is gone after release
  # Decode: predicted 1 is resident (no transfer); 2 misses and evicts 0, the LRU of the layer.
  assert s.prefetch("decode", 0, np.array([[1, 3, 0, 2]])) == []
  assert s.demand("decode", 0, [1, 2], [1, 1]) == [T(0, 2, "int4", "demand", "cache", 0)]
  s.release(0)

  r = s.report()
  pre, dec = r["prefill"], r["decode"]
  assert pre["hit_rate_unique"] == [2 / 3, 2 / 3]
  assert pre["hit_rate_assign"] == [5 / 6, 5 / 6]
  assert pre["recall"] == [2 / 3, 2 / 3] and pre["precision"] == [2 / 3, 2 / 3]
  assert pre["bytes"] == {"prefetch/int4": [30, 30], "prefetch/int2": [40, 40],
                          "demand/int4": [30, 30]}
  assert pre["counts"]["transient_loads"] == [2, 3]
  assert dec["hit_rate_unique"] == [0.5, None] and dec["recall"] == [0.5, None]
  assert dec["precision"] == [1.0, None] and dec["bytes"] == {"demand/int4": [30, 0]}
  assert s.counters.total_bytes() == 30 * 4 + 40 * 2 + 30 and r["setup"]["overall"]["bytes"] == 0


def test_wrong_prefetch_is_evictable_by_a_miss_of_the_same_call():
  s = _sched(slots=(1, 1), quant="off")
  assert s.prefetch("decode", 0, np.array([[2, 0]])) == [T(0, 2, "full", "prefetch", "cache",
                                                           0)]
  # 2 was wrong: demand re-pins only the needed experts, so 3 takes 2's slot.
  assert s.demand("decode", 0, [3]) == [T(0, 3, "full", "demand", "cache", 0)]
  assert s.report()["decode"]["precision"] == [0.0, None]


def test_arc_references_each_expert_once_per_call():
  """A prefetched expert's admission is its reference: its use in the same call does not
  count as a second one (it stays in T1)."""
  s = _sched(slots=(2, 2), cache="arc", quant="off", prefetch_k=2)
  s.prefetch("decode", 0, np.array([[1, 0]]))
  s.demand("decode", 0, [1])
  s.release(0)
  arc = s.caches[0]
  assert list(arc.t1) == [1, 0] and list(arc.t2) == []
  s.prefetch("decode", 0, np.array([[1, 3]]))  # 1 resident: pinned, not referenced yet
  s.demand("decode", 0, [1])
  assert list(arc.t2) == [1]


def test_warm_fills_caches_and_counts_setup_bytes():
  s = _sched(warm="popular", quant="int4")
  got = s.warm([[2, 0, 1], [3, 1]])
  assert got == [T(0, 2, "int4", "warm", "cache", 1), T(0, 0, "int4", "warm", "cache", 0),
                 T(1, 3, "int4", "warm", "cache", 0)]
  assert s.counters.total_bytes("setup") == 90
  assert s.demand("prefill", 0, [0, 2]) == []


def test_zero_slots_everything_transient_and_lod_moves_exactly_the_needed():
  s = _sched(slots=(0, 0), predictor="none", cache="none", quant="off")
  assert s.prefetch("decode", 0, np.array([[0, 1]])) == []   # predictor none: nothing
  assert s.demand("decode", 0, [0, 1]) == [T(0, 0, "full", "demand", "transient", 0),
                                           T(0, 1, "full", "demand", "transient", 1)]


def test_call_order_and_input_errors():
  s = _sched()
  s.prefetch("decode", 0, np.array([[0, 1]]))
  with pytest.raises(ConfigError, match="prefetch for layer 0 called twice"):
    s.prefetch("decode", 0, np.array([[0, 1]]))
  s.demand("decode", 0, [0])
  with pytest.raises(ConfigError, match="demand for layer 0 called twice"):
    s.demand("decode", 0, [0])
  with pytest.raises(ConfigError, match="unique"):
    s.demand("decode", 1, [0, 0])
  with pytest.raises(ConfigError, match="phase='train'"):
    s.prefetch("train", 1, np.array([[0]]))
  with pytest.raises(ConfigError, match="lacks format 'int2'"):
    Scheduler(PolicyConfig((1,), quant="hybrid", int2_rate=0.5), {"int4": 1}, num_experts=4,
              top_k=2)
  with pytest.raises(ConfigError, match="more than num_experts=4"):
    Scheduler(PolicyConfig((5,)), BYTES, num_experts=4, top_k=2)


def test_needed_experts():
  unique, counts = needed_experts(np.array([[3, 1], [1, 0]]), 4)
  assert unique.tolist() == [0, 1, 3] and counts.tolist() == [1, 2, 1]
