"""The online expert scheduler the simulator and the offloaded engine both drive.

Both make the same calls in the same order, so the transfers the engine performs are the
ones the simulator counts. Per generation step, with L MoE layers:

  prefetch(phase, 0, rank)           # gate on the embedding output, overlaps attention_0
  for l in range(L):
    demand(phase, l, experts, counts)  # layer l's router has run: load its misses
    prefetch(phase, l + 1, rank)       # the gate for l+1, from the same hidden (l + 1 < L)
    ...MoE_l...
    release(l)

Before the first step, `warm(...)` fills the caches. Every call returns the `Transfer`s to
perform, in issue order, each naming the device slot it writes: a cache slot of its layer or
a transient buffer slot (freed by `release`) when the layer's cache is full of pinned
experts or has no slots. `locate` says where each needed expert lives during the MoE.

Cache references (`zojax.infer.cache`): a prefetch of a non-resident expert is that expert's
reference for the layer call (the prediction says it is about to be used); a needed expert
already resident before the call is referenced at `demand`. Each expert is referenced at
most once per call. Prefetched experts are pinned until `demand`, which re-pins exactly the
needed ones, so a wrong prediction can be evicted by a miss of the same call.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from zojax.errors import ConfigError
from zojax.infer import cache as cache_lib
from zojax.infer import prefetch as prefetch_lib
from zojax.infer.trace import PHASES

PREDICTORS = ("none", "gate", "eap", "prev_token", "popularity", "oracle")
WARM = ("none", "popular")
KINDS = ("warm", "prefetch", "demand")
COUNTER_PHASES = ("setup",) + PHASES


class Transfer(NamedTuple):
  """One host-to-device copy of one expert of one layer."""

  layer: int
  expert: int
  fmt: str       # full | int4 | int2
  nbytes: int
  kind: str      # warm | prefetch | demand
  dest: str      # cache | transient
  slot: int      # slot index in that pool (transient: per layer call, from 0)


class Location(NamedTuple):
  dest: str
  slot: int
  fmt: str


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """An offloading policy: predictor, cache, quantisation and the slot plan.

  predictor: 'none' (no prefetch) or a `zojax.infer.predictors` name; the engine computes
    the gate itself and passes the ranking, the simulator reads it from the trace.
  cache: 'arc' | 'lru' | 'none' (every load transient).
  quant: 'off' | 'int4' | 'hybrid' | 'int2' (see `zojax.infer.prefetch.mode_format`).
  int2_rate: hybrid prefill's INT2 share of predictions, in [0, 1].
  prefetch_k: experts prefetched per decode layer call.
  slots: cache slots per MoE layer (`zojax.infer.planner`).
  warm: 'popular' fills the caches with the most used experts before the first step.
  """

  slots: tuple[int, ...]
  predictor: str = "gate"
  cache: str = "arc"
  quant: str = "hybrid"
  int2_rate: float = 0.0
  prefetch_k: int = 0
  warm: str = "popular"

  def __post_init__(self):
    for key, allowed in (("predictor", PREDICTORS), ("cache", cache_lib.KINDS),
                         ("warm", WARM)):
      if getattr(self, key) not in allowed:
        raise ConfigError(f"config key {key!r}={getattr(self, key)!r} must be one of {allowed}")
    prefetch_lib.check_quant(self.quant)
    object.__setattr__(self, "int2_rate", prefetch_lib.check_int2_rate(self.int2_rate))
    object.__setattr__(self, "prefetch_k", prefetch_lib.check_prefetch_k(self.prefetch_k))
    slots = tuple(int(s) for s in self.slots)
    if not slots or min(slots) < 0 or slots != tuple(self.slots):
      raise ConfigError(f"config key 'slots'={self.slots} must be non-negative integers, one "
                        "per MoE layer")
    object.__setattr__(self, "slots", slots)


class Counters:
  """Per phase ('setup' for warm-up, 'prefill', 'decode') and per layer, numpy int64."""

  FIELDS = ("calls", "unique_needed", "unique_hits", "assign_needed", "assign_hits",
            "predicted", "predicted_needed", "needed_when_predicted", "transient_loads")

  def __init__(self, num_layers: int):
    zeros = lambda: np.zeros(num_layers, np.int64)
    self.data = {p: {f: zeros() for f in self.FIELDS} for p in COUNTER_PHASES}
    self.bytes = {p: {(k, f): zeros() for k in KINDS for f in prefetch_lib.FORMATS}
                  for p in COUNTER_PHASES}
    self.transfers = {p: {(k, f): zeros() for k in KINDS for f in prefetch_lib.FORMATS}
                      for p in COUNTER_PHASES}

  def add_transfers(self, phase: str, transfers: Sequence[Transfer]) -> None:
    for t in transfers:
      self.bytes[phase][t.kind, t.fmt][t.layer] += t.nbytes
      self.transfers[phase][t.kind, t.fmt][t.layer] += 1
      if t.dest == "transient":
        self.data[phase]["transient_loads"][t.layer] += 1

  def total_bytes(self, phase: str | None = None, kind: str | None = None) -> int:
    phases = COUNTER_PHASES if phase is None else (phase,)
    return int(sum(v.sum() for p in phases for (k, _), v in self.bytes[p].items()
                   if kind is None or k == kind))

  def report(self) -> dict:
    """JSON-able per-layer rates (None where undefined) and totals, per phase."""
    def ratio(num, den):
      return [None if d == 0 else float(n / d) for n, d in zip(num, den)]

    def overall(num, den):
      return None if den.sum() == 0 else float(num.sum() / den.sum())

    out = {}
    for p in COUNTER_PHASES:
      d = self.data[p]
      out[p] = {
          "hit_rate_unique": ratio(d["unique_hits"], d["unique_needed"]),
          "hit_rate_assign": ratio(d["assign_hits"], d["assign_needed"]),
          "recall": ratio(d["predicted_needed"], d["needed_when_predicted"]),
          "precision": ratio(d["predicted_needed"], d["predicted"]),
          "overall": {
              "hit_rate_unique": overall(d["unique_hits"], d["unique_needed"]),
              "hit_rate_assign": overall(d["assign_hits"], d["assign_needed"]),
              "recall": overall(d["predicted_needed"], d["needed_when_predicted"]),
              "precision": overall(d["predicted_needed"], d["predicted"]),
              "bytes": self.total_bytes(p),
          },
          "counts": {f: d[f].tolist() for f in self.FIELDS},
          "bytes": {f"{k}/{f}": v.tolist() for (k, f), v in self.bytes[p].items() if v.any()},
          "transfers": {f"{k}/{f}": v.tolist() for (k, f), v in self.transfers[p].items()
                        if v.any()},
      }
    return out


class _CallState:
  """What one layer call has done between its prefetch and its release."""

  def __init__(self):
    self.stage = "prefetched"
    self.predicted: list[int] = []
    self.transient: dict[int, Location] = {}
    self.referenced: set[int] = set()   # experts whose cache reference this call has made


class Scheduler:
  """Online transfers and counters for one policy (see the module docstring for the order).

  Args:
    config: the `PolicyConfig`.
    expert_bytes: bytes of one expert per format, {'full': .., 'int4': .., 'int2': ..}; only
      the formats the policy moves are needed.
    num_experts, top_k: the MoE's E and K.
  """

  def __init__(self, config: PolicyConfig, expert_bytes: Mapping[str, int], *,
               num_experts: int, top_k: int):
    self.config, self.num_experts, self.top_k = config, num_experts, top_k
    if max(config.slots) > num_experts:
      raise ConfigError(f"config key 'slots' has a layer with {max(config.slots)} slots, more "
                        f"than num_experts={num_experts}")
    needed = {prefetch_lib.mode_format(config.quant)}
    if config.quant == "hybrid" and config.int2_rate > 0:
      needed.add("int2")
    missing = sorted(f for f in needed if f not in expert_bytes)
    if missing:
      raise ConfigError(f"expert_bytes lacks format {missing[0]!r} (quant={config.quant!r})")
    self.expert_bytes = {k: int(v) for k, v in expert_bytes.items()}
    self.num_layers = len(config.slots)
    self.caches = [cache_lib.make(config.cache, s if config.cache != "none" else 0)
                   for s in config.slots]
    self.formats: list[dict[int, str]] = [{} for _ in config.slots]  # resident expert -> fmt
    self.counters = Counters(self.num_layers)
    self._calls: dict[int, _CallState] = {}

  # -- helpers --------------------------------------------------------------------------

  def _layer(self, layer: int) -> int:
    if not 0 <= layer < self.num_layers:
      raise ConfigError(f"layer={layer} outside [0, {self.num_layers})")
    return layer

  def _load(self, layer: int, expert: int, fmt: str, kind: str, call: _CallState) -> Transfer:
    """Admit `expert` into the layer's cache (a reference) or, if bypassed, a transient slot."""
    access = self.caches[layer].access(expert)
    call.referenced.add(expert)
    if access.evicted is not None:
      del self.formats[layer][access.evicted]
    if access.slot is None:
      slot = len(call.transient)
      call.transient[expert] = Location("transient", slot, fmt)
      dest = "transient"
    else:
      slot, dest = access.slot, "cache"
      self.formats[layer][expert] = fmt
      self.caches[layer].pin(expert)
    return Transfer(layer, expert, fmt, self.expert_bytes[fmt], kind, dest, slot)

  def _has(self, layer: int, expert: int, call: _CallState) -> bool:
    return expert in self.caches[layer] or expert in call.transient

  # -- the protocol ---------------------------------------------------------------------

  def warm(self, experts_per_layer: Sequence[Sequence[int]]) -> list[Transfer]:
    """Fill each layer's empty slots with its list's first experts (most preferred first)."""
    if len(experts_per_layer) != self.num_layers:
      raise ConfigError(f"warm got {len(experts_per_layer)} layers, want {self.num_layers}")
    fmt = prefetch_lib.mode_format(self.config.quant)
    out = []
    for layer, experts in enumerate(experts_per_layer):
      for expert, slot in self.caches[layer].warm(experts):
        self.formats[layer][expert] = fmt
        out.append(Transfer(layer, expert, fmt, self.expert_bytes[fmt], "warm", "cache", slot))
      self.caches[layer].unpin_all()
    self.counters.add_transfers("setup", out)
    return out

  def prefetch(self, phase: str, layer: int, rank_TxM: np.ndarray) -> list[Transfer]:
    """Transfers for layer `layer`'s predicted experts, issued before its MoE runs.

    rank_TxM: per-token predicted ranking, best first (M = 0: no prediction). Prefill
    prefetches the union of top-K votes; decode the top `prefetch_k`.
    """
    self._check_phase(phase)
    if self._layer(layer) in self._calls:
      raise ConfigError(f"prefetch for layer {layer} called twice before its release")
    call = self._calls[layer] = _CallState()
    rank = np.asarray(rank_TxM)
    if rank.ndim != 2 or not np.issubdtype(rank.dtype, np.integer):
      raise ConfigError(f"prefetch for layer {layer}: the ranking must be [T, M] integers, got "
                        f"shape {rank.shape} dtype {rank.dtype}")
    if rank.size and not 0 <= rank.min() <= rank.max() < self.num_experts:
      raise ConfigError(f"prefetch for layer {layer}: expert ids outside [0, "
                        f"{self.num_experts})")
    if self.config.predictor == "none" or rank.shape[1] == 0:
      return []
    c = self.config
    if phase == "prefill":
      plan = prefetch_lib.prefill_plan(rank, self.top_k, self.num_experts, c.quant,
                                       c.int2_rate)
    else:
      plan = prefetch_lib.decode_plan(rank, self.top_k, self.num_experts, c.quant,
                                      c.prefetch_k)
    out = []
    for expert, fmt in plan:
      call.predicted.append(expert)
      if expert in self.caches[layer]:
        self.caches[layer].pin(expert)  # keep it from this call's later prefetches
      else:
        out.append(self._load(layer, expert, fmt, "prefetch", call))
    self.counters.add_transfers(phase, out)
    return out

  def demand(self, phase: str, layer: int, experts: Sequence[int],
             assignments: Sequence[int] | None = None) -> list[Transfer]:
    """Transfers for the needed experts that are not on device; records hits.

    experts: the unique experts layer `layer` needs in this call.
    assignments: token assignments per expert (same order), for the per-assignment hit rate.
    """
    self._check_phase(phase)
    call = self._calls.setdefault(self._layer(layer), _CallState())
    if call.stage != "prefetched":
      raise ConfigError(f"demand for layer {layer} called twice before its release")
    call.stage = "demanded"
    needed = [int(e) for e in experts]
    counts = [1] * len(needed) if assignments is None else [int(a) for a in assignments]
    if len(set(needed)) != len(needed) or len(counts) != len(needed):
      raise ConfigError(f"demand for layer {layer}: experts must be unique, one assignment "
                        "count each")
    if needed and not 0 <= min(needed) <= max(needed) < self.num_experts:
      raise ConfigError(f"demand for layer {layer}: expert ids outside [0, {self.num_experts})")
    cache = self.caches[layer]
    cache.unpin_all()
    for e in needed:
      cache.pin(e)
    d = self.counters.data[phase]
    out = []
    for e, n in sorted(zip(needed, counts)):
      if self._has(layer, e, call):
        d["unique_hits"][layer] += 1
        d["assign_hits"][layer] += n
        if e in cache and e not in call.referenced:
          cache.access(e)
          call.referenced.add(e)
      else:
        out.append(self._load(layer, e, prefetch_lib.mode_format(self.config.quant), "demand",
                              call))
    d["calls"][layer] += 1
    d["unique_needed"][layer] += len(needed)
    d["assign_needed"][layer] += sum(counts)
    if call.predicted:
      d["predicted"][layer] += len(call.predicted)
      d["predicted_needed"][layer] += len(set(call.predicted) & set(needed))
      d["needed_when_predicted"][layer] += len(needed)
    self.counters.add_transfers(phase, out)
    return out

  def locate(self, layer: int, expert: int) -> Location:
    """Where `expert` of `layer` is during the current call (after `demand`)."""
    call = self._calls.get(self._layer(layer))
    if call is not None and expert in call.transient:
      return call.transient[expert]
    if expert in self.caches[layer]:
      return Location("cache", self.caches[layer].slots[expert], self.formats[layer][expert])
    raise ConfigError(f"expert {expert} of layer {layer} is not on device")

  def release(self, layer: int) -> None:
    """End layer `layer`'s call: unpin its experts and free its transient slots."""
    self._calls.pop(self._layer(layer), None)
    self.caches[layer].unpin_all()

  def report(self) -> dict:
    return self.counters.report()

  @staticmethod
  def _check_phase(phase: str) -> None:
    if phase not in PHASES:
      raise ConfigError(f"phase={phase!r} must be one of {PHASES}")


def needed_experts(experts_TxK: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
  """(unique experts ascending, token assignments of each) of one layer call."""
  counts = np.bincount(np.asarray(experts_TxK).ravel(), minlength=num_experts)
  unique = np.flatnonzero(counts)
  return unique, counts[unique]


__all__ = ["COUNTER_PHASES", "Counters", "KINDS", "Location", "PREDICTORS", "PolicyConfig",
           "Scheduler", "Transfer", "WARM", "needed_experts"]
