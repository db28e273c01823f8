"""zojax.infer.planner and zojax.infer.prefetch on hand-made numbers."""

import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer import planner, prefetch
from zojax.infer.schedule import PolicyConfig

# ---- planner: L = 4 layers of E = 4 experts, 100 B of non-expert weights, 10 B per slot.


@pytest.mark.parametrize("budget, resident, slots", [
    (190, 1, (4, 2, 2, 1)),   # 9 slots: layer 0 whole, 5 over 3 deeper layers, extra shallow
    (160, 2, (4, 2, 0, 0)),   # 6 slots < 2 resident layers: filled in order
    (280, 2, (4, 4, 4, 4)),   # 18 slots >= 16: all on device, nothing over E
    (109, 1, (0, 0, 0, 0)),   # 9 B: not one slot
    (100, 0, (0, 0, 0, 0)),
    (170, 0, (2, 2, 2, 1)),   # no resident layers: spread evenly, remainder to the shallow
])
def test_plan_splits(budget, resident, slots):
  plan = planner.plan(budget, 100, 10, 4, 4, resident)
  assert plan.slots == slots
  assert plan.cache_bytes == 10 * sum(slots) and 0 <= plan.unused_bytes
  assert max(plan.slots) <= 4


def test_plan_shortfall_is_one_line_in_bytes():
  with pytest.raises(ConfigError) as e:
    planner.plan(90, 100, 10, 4, 4, 1)
  assert str(e.value) == ("config key 'budget_bytes'=90 is 10 bytes short of the non-expert "
                          "weights (100 bytes)")
  with pytest.raises(ConfigError, match="'resident_layers'=-1"):
    planner.plan(200, 100, 10, 4, 4, -1)


def test_plan_fraction_and_helpers():
  assert planner.plan(190, 100, 10, 4, 4, 1).cache_fraction(4) == 9 / 16
  assert planner.all_on_device(3, 8) == (8, 8, 8) and planner.zero_cache(2) == (0, 0)


# ---- prefetch: 4 tokens, top-2 predictions over E = 5 experts; votes [3, 0, 2, 2, 1].
RANK = np.array([[0, 2, 1], [0, 3, 4], [2, 4, 1], [3, 0, 1]])
COUNTS = np.array([3, 0, 2, 2, 1])


def test_prefill_order_is_union_most_voted_first():
  assert prefetch.votes(RANK, 2, 5).tolist() == COUNTS.tolist()
  assert prefetch.prefill_order(RANK, 2, 5).tolist() == [0, 2, 3, 4]  # 2, 3 tie: lower id
  assert prefetch.prefill_order(RANK[:, :0], 2, 5).tolist() == []


@pytest.mark.parametrize("rate, int2", [
    (0.0, []), (0.1, []), (0.125, [4]),  # 1 of 8 votes, exactly the share
    (0.4, [3, 4]),                       # 3 of 8 <= 3.2; adding expert 2 would make 5
    (0.6, [3, 4]), (0.625, [2, 3, 4]),   # tail order 4, 3, 2, 0: cumulative 1, 3, 5, 8
    (0.99, [2, 3, 4]), (1.0, [0, 2, 3, 4])])
def test_int2_takes_least_predicted_up_to_share(rate, int2):
  order = prefetch.prefill_order(RANK, 2, 5)
  mask = prefetch.int2_mask(order, COUNTS, rate)
  assert sorted(order[mask].tolist()) == int2
  plan = prefetch.prefill_plan(RANK, 2, 5, "hybrid", rate)
  assert [e for e, _ in plan] == [0, 2, 3, 4]
  assert sorted(e for e, f in plan if f == "int2") == int2
  assert {f for e, f in plan if e not in int2} <= {"int4"}


def test_formats_per_mode():
  assert prefetch.prefill_plan(RANK, 2, 5, "off", 1.0) == [(0, "full"), (2, "full"),
                                                           (3, "full"), (4, "full")]
  assert {f for _, f in prefetch.prefill_plan(RANK, 2, 5, "int2", 0.0)} == {"int2"}
  assert [prefetch.mode_format(q) for q in prefetch.QUANT_MODES] == ["full", "int4", "int4",
                                                                     "int2"]


def test_decode_order():
  one = np.array([[3, 1, 4, 0, 2]])
  assert prefetch.decode_order(one, 2, 5).tolist() == [3, 1, 4, 0, 2]
  # Top-2 votes: 0 (3), 2 (2), 3 (2), 4 (1); summed positions (3 columns, unranked = 3):
  # 0: 0+0+3+1 = 4, 2: 1+3+0+3 = 7, 3: 3+1+3+0 = 7, 4: 3+2+1+3 = 9, 1: 2+3+2+2 = 9.
  assert prefetch.decode_order(RANK, 2, 5).tolist() == [0, 2, 3, 4, 1]
  assert prefetch.decode_plan(one, 2, 5, "hybrid", 3) == [(3, "int4"), (1, "int4"),
                                                           (4, "int4")]
  assert prefetch.decode_plan(one[:, :2], 2, 5, "off", 4) == [(3, "full"), (1, "full")]
  assert prefetch.decode_plan(one, 2, 5, "off", 0) == []


def test_prefetch_k_formula():
  # One INT4 expert of 4 MB on 12 GB/s takes 1/3 ms.
  assert prefetch.prefetch_k_for(1e-3, 4_000_000, 12e9) == 3
  assert prefetch.prefetch_k_for(0.99e-3, 4_000_000, 12e9) == 2
  assert prefetch.prefetch_k_for(0.0, 4_000_000, 12e9) == 0
  assert prefetch.prefetch_k_for(1e-3, 4_000_000, 25e9) == 6


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_int2_rate_outside_unit_interval_is_rejected(bad):
  with pytest.raises(ConfigError, match="'int2_rate'"):
    prefetch.check_int2_rate(bad)
  with pytest.raises(ConfigError, match="'int2_rate'"):
    PolicyConfig((1,), int2_rate=bad)


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_negative_prefetch_k_is_rejected(bad):
  with pytest.raises(ConfigError, match="'prefetch_k'"):
    PolicyConfig((1,), prefetch_k=bad)


def test_policy_config_rejects_bad_keys():
  for key, value in (("predictor", "magic"), ("cache", "fifo"), ("quant", "int3"),
                     ("warm", "all")):
    with pytest.raises(ConfigError, match=f"'{key}'"):
      PolicyConfig((1,), **{key: value})
  with pytest.raises(ConfigError, match="'slots'"):
    PolicyConfig((1, -1))
