"""Per-layer expert caches: ARC (Megiddo & Modha, FAST 2003) and LRU, with pinning.

A cache holds `capacity` device slots of one MoE layer. `access(e)` is a real reference:
a hit updates recency, a miss admits `e` into a slot (evicting an unpinned expert when full)
and returns the slot. Experts pinned for the current layer call are never evicted; when
every slot is pinned (or the capacity is 0) a miss is *bypassed*: the caller loads the
expert into a transient buffer and the cache state does not change.

ARC keeps two resident lists, T1 (seen once recently) and T2 (seen at least twice), two ghost
lists of evicted ids, B1 and B2, and a target size p for T1 that a ghost hit moves: a hit in
B1 says T1 was too small (p grows), in B2 that T2 was (p shrinks). One scan of new experts
then only churns T1 and the ghosts, leaving the frequently used experts in T2.
With pinning, eviction takes the least recent *unpinned* expert of the list ARC chooses, and
of the other list when all of that one are pinned.
"""

from __future__ import annotations

import collections
from typing import Iterable, NamedTuple

from zojax.errors import ConfigError

KINDS = ("arc", "lru", "none")


class Access(NamedTuple):
  """Outcome of one reference: hit, and the slot of `expert` (None: bypassed, transient)."""

  hit: bool
  slot: int | None
  evicted: int | None = None


class _Base:
  """Slots, pins and the bypass rule shared by ARC and LRU."""

  def __init__(self, capacity: int):
    if capacity < 0:
      raise ConfigError(f"cache capacity={capacity} must be >= 0")
    self.capacity = capacity
    self.slots: dict[int, int] = {}       # resident expert -> slot
    self._free = list(range(capacity))[::-1]  # pop() gives the lowest free slot
    self.pinned: set[int] = set()
    self.bypasses = 0

  def __contains__(self, expert: int) -> bool:
    return expert in self.slots

  def __len__(self) -> int:
    return len(self.slots)

  def pin(self, expert: int) -> None:
    if expert in self.slots:
      self.pinned.add(expert)

  def unpin_all(self) -> None:
    self.pinned.clear()

  def _room(self) -> bool:
    return len(self.slots) < self.capacity or any(e not in self.pinned for e in self.slots)

  def _place(self, expert: int, slot: int | None = None) -> int:
    slot = self._free.pop() if slot is None else slot
    self.slots[expert] = slot
    return slot

  def _drop(self, expert: int) -> int:
    self.pinned.discard(expert)
    return self.slots.pop(expert)

  def access(self, expert: int) -> Access:
    if expert in self.slots:
      self._hit(expert)
      return Access(True, self.slots[expert])
    if not self._room():
      self.bypasses += 1
      return Access(False, None)
    evicted = self._miss(expert)
    return Access(False, self.slots[expert], evicted)

  def warm(self, experts: Iterable[int]) -> list[tuple[int, int]]:
    """Fill empty slots with `experts`, most preferred first; returns [(expert, slot)].

    The first one ends most recently used, so it is evicted last.
    """
    chosen = [e for e in dict.fromkeys(int(e) for e in experts) if e not in self.slots]
    chosen = chosen[:self.capacity - len(self.slots)]
    for e in reversed(chosen):
      self.access(e)
    return [(e, self.slots[e]) for e in chosen]


class LRU(_Base):
  """Least-recently-used replacement with pinning."""

  def __init__(self, capacity: int):
    super().__init__(capacity)
    self.order: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

  def _hit(self, expert: int) -> None:
    self.order.move_to_end(expert)

  def _miss(self, expert: int) -> int | None:
    evicted = slot = None
    if len(self.slots) == self.capacity:
      evicted = next(e for e in self.order if e not in self.pinned)
      del self.order[evicted]
      slot = self._drop(evicted)
    self._place(expert, slot)
    self.order[expert] = None
    return evicted


class ARC(_Base):
  """Adaptive Replacement Cache with pinning; `p` is the adaptive target size of T1."""

  def __init__(self, capacity: int):
    super().__init__(capacity)
    od = collections.OrderedDict
    self.t1, self.t2, self.b1, self.b2 = od(), od(), od(), od()  # LRU first, MRU last
    self.p = 0.0

  def _hit(self, expert: int) -> None:
    (self.t1 if expert in self.t1 else self.t2).pop(expert)
    self.t2[expert] = None

  def _replace(self, in_b2: bool) -> int:
    """Evict the LRU unpinned expert of T1 (into B1) or of T2 (into B2), ARC's choice first."""
    t1_first = bool(self.t1) and (len(self.t1) > self.p or (in_b2 and len(self.t1) == self.p))
    pairs = [(self.t1, self.b1), (self.t2, self.b2)]
    for resident, ghost in pairs if t1_first else pairs[::-1]:
      victim = next((e for e in resident if e not in self.pinned), None)
      if victim is not None:
        del resident[victim]
        ghost[victim] = None
        return victim
    raise AssertionError("no unpinned expert; _room() should have bypassed")

  def _miss(self, expert: int) -> int | None:
    c, full = self.capacity, len(self.slots) == self.capacity
    evicted = None
    if expert in self.b1:    # ghost hit: T1 was too small
      self.p = min(c, self.p + max(len(self.b2) / len(self.b1), 1.0))
      del self.b1[expert]
      evicted = self._replace(False) if full else None
      target = self.t2
    elif expert in self.b2:  # ghost hit: T2 was too small
      self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
      del self.b2[expert]
      evicted = self._replace(True) if full else None
      target = self.t2
    else:
      target = self.t1
      if len(self.t1) + len(self.b1) == c:
        if len(self.t1) < c:
          self.b1.popitem(last=False)
          evicted = self._replace(False) if full else None
        else:                # T1 fills the cache: drop its LRU without a ghost
          evicted = next(e for e in self.t1 if e not in self.pinned)
          del self.t1[evicted]
      elif full:
        if len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) == 2 * c:
          self.b2.popitem(last=False)
        evicted = self._replace(False)
    slot = None if evicted is None else self._drop(evicted)
    self._place(expert, slot)
    target[expert] = None
    return evicted


def make(kind: str, capacity: int) -> _Base:
  """A cache of `kind` ('arc', 'lru', or 'none': capacity 0, every access bypassed)."""
  if kind == "arc":
    return ARC(capacity)
  if kind == "lru":
    return LRU(capacity)
  if kind == "none":
    return LRU(0)
  raise ConfigError(f"cache kind={kind!r} must be one of {KINDS}")


__all__ = ["ARC", "Access", "KINDS", "LRU", "make"]
