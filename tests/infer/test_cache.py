"""zojax.infer.cache: ARC on hand-worked sequences, scan resistance, pinning, capacity 0."""

import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer import cache


def _state(arc):
  return (list(arc.t1), list(arc.t2), list(arc.b1), list(arc.b2), arc.p)


def test_arc_hand_worked_sequence_with_both_ghost_hits():
  arc = cache.ARC(2)
  # (request, hit, slot, evicted, T1, T2, B1, B2, p) worked by hand from the 2003 paper.
  steps = [
      (1, False, 0, None, [1], [], [], [], 0.0),
      (2, False, 1, None, [1, 2], [], [], [], 0.0),
      # |T1| + |B1| = c and |T1| = c: T1's LRU leaves without a ghost.
      (3, False, 0, 1, [2, 3], [], [], [], 0.0),
      (2, True, 1, None, [3], [2], [], [], 0.0),
      # New page, |T1| = 1 > p = 0: T1's LRU (3) becomes a B1 ghost.
      (4, False, 0, 3, [4], [2], [3], [], 0.0),
      # B1 ghost hit: p += max(|B2|/|B1|, 1) = 1; |T1| = 1 is not > p, so T2's LRU goes.
      (3, False, 1, 2, [4], [3], [], [2], 1.0),
      # B2 ghost hit: p -= max(|B1|/|B2|, 1) -> 0; |T1| = 1 > 0, so T1's LRU goes to B1.
      (2, False, 0, 4, [], [3, 2], [4], [], 0.0),
  ]
  for request, hit, slot, evicted, t1, t2, b1, b2, p in steps:
    got = arc.access(request)
    assert (got.hit, got.slot, got.evicted) == (hit, slot, evicted), request
    assert _state(arc) == (t1, t2, b1, b2, p), request
  assert arc.slots == {3: 1, 2: 0}


def test_arc_p_grows_by_ghost_ratio():
  """A B1 hit with |B2| = 2, |B1| = 1 moves p by 2, not 1 (the adaptation's ratio)."""
  arc = cache.ARC(3)
  arc.t1.update(dict.fromkeys([7])), arc.t2.update(dict.fromkeys([8, 9]))
  arc.b1.update(dict.fromkeys([1])), arc.b2.update(dict.fromkeys([2, 3]))
  arc.slots = {7: 0, 8: 1, 9: 2}
  arc._free = []
  got = arc.access(1)
  assert arc.p == 2.0 and not got.hit
  assert got.evicted == 8 and list(arc.b2) == [2, 3, 8]  # |T1| = 1 <= p: T2's LRU goes


def _hits_on_working_set(c):
  """Working set {0, 1} used twice, then a scan of new experts, 0 and 1 after every 3."""
  seq = [0, 1, 0, 1]
  for start in range(10, 40, 3):
    seq += [start, start + 1, start + 2, 0, 1]
  hits = {}
  for name in ("arc", "lru"):
    cache_ = cache.make(name, c)
    got = [(e, cache_.access(e).hit) for e in seq]
    hits[name] = sum(hit for e, hit in got[4:] if e in (0, 1))
  return hits, sum(e in (0, 1) for e in seq[4:])


def test_arc_resists_a_scan_that_thrashes_lru():
  hits, refs = _hits_on_working_set(3)
  assert hits["lru"] == 0          # three new experts push the working set out every time
  assert hits["arc"] == refs       # T2 keeps it; the scan churns T1 and B1 only
  # Control: with room for scan and working set, LRU hits too.
  hits, refs = _hits_on_working_set(5)
  assert hits["lru"] == refs


@pytest.mark.parametrize("kind", ["arc", "lru"])
def test_pinned_experts_are_never_evicted_and_full_pins_bypass(kind):
  c = cache.make(kind, 2)
  c.access(1), c.access(2)
  c.pin(1)
  got = c.access(3)                # ARC and LRU would both pick 1; it is pinned
  assert got.evicted == 2 and got.slot == 1 and 1 in c
  c.pin(3)
  before = dict(c.slots)
  got = c.access(4)
  assert got == cache.Access(False, None, None) and c.slots == before and c.bypasses == 1
  c.unpin_all()
  assert c.access(4).slot is not None


@pytest.mark.parametrize("kind", ["arc", "lru"])
def test_random_pins_keep_invariants(kind):
  rng = np.random.default_rng(0)
  c = cache.make(kind, 4)
  for _ in range(400):
    if rng.random() < 0.2:
      c.unpin_all()
    pinned = set(c.pinned)
    e = int(rng.integers(12))
    got = c.access(e)
    if rng.random() < 0.5:
      c.pin(e)
    assert got.evicted not in pinned
    assert pinned <= set(c.slots)
    assert sorted(c.slots.values()) == sorted(set(c.slots.values()))
    assert all(0 <= s < 4 for s in c.slots.values()) and len(c) <= 4
    if kind == "arc":
      assert len(c.t1) + len(c.b1) <= 4 and len(c.t1) + len(c.t2) + len(c.b1) + len(c.b2) <= 8
      assert set(c.t1) | set(c.t2) == set(c.slots) and 0 <= c.p <= 4


@pytest.mark.parametrize("kind", ["arc", "lru", "none"])
def test_capacity_zero_misses_everything(kind):
  c = cache.make(kind, 0)
  got = [c.access(e) for e in (0, 0, 1, 0)]
  assert all(not g.hit and g.slot is None for g in got) and len(c) == 0
  assert c.bypasses == 4 and c.warm([0, 1]) == []


def test_warm_start_most_preferred_survives_longest():
  arc = cache.ARC(2)
  assert arc.warm([5, 6, 7]) == [(5, 1), (6, 0)]
  assert arc.access(5).hit
  assert arc.access(8).evicted == 6


def test_bad_kind_and_capacity():
  with pytest.raises(ConfigError, match="cache kind='fifo'"):
    cache.make("fifo", 2)
  with pytest.raises(ConfigError, match="capacity=-1"):
    cache.make("arc", -1)
