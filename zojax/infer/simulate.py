"""Replay a routing trace through the `Scheduler` for a named policy; count what moves.

The calls are the ones the offloaded engine makes (`zojax.infer.schedule`), in the same
order, so the simulator's byte count is the engine's. Predictions come from the trace
(`zojax.infer.predictors`); the per-layer-call transfers feed the timeline
(`zojax.infer.timeline`).

Policies (`policy`):
  fate           cross-layer gate + shallow-favoring ARC (warm: most popular) + `quant`
  lod            load on demand: no prediction, no cache, every needed expert moved each call
  lod_lru        load on demand into an LRU cache of the same slots (cold start)
  eap, prev_token, popularity, oracle
                 Fate's cache and quantisation with the gate swapped for that predictor, so the
                 comparison isolates prediction quality
  all_on_device  every expert resident (slots E, loaded at warm-up); nothing moves after
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from zojax.errors import ConfigError
from zojax.infer import predictors as predictors_lib
from zojax.infer.schedule import PolicyConfig, Scheduler, Transfer, needed_experts
from zojax.infer.trace import PHASES, Trace

POLICIES = ("fate", "lod", "lod_lru", "eap", "prev_token", "popularity", "oracle",
            "all_on_device")


def policy(name: str, *, slots, num_experts: int, quant: str = "hybrid",
           int2_rate: float = 0.0, prefetch_k: int = 0) -> PolicyConfig:
  """The `PolicyConfig` of a named policy (see the module docstring) for a slot plan."""
  slots = tuple(slots)
  common = dict(quant=quant, int2_rate=int2_rate, prefetch_k=prefetch_k)
  if name in ("fate", "eap", "prev_token", "popularity", "oracle"):
    return PolicyConfig(slots, predictor="gate" if name == "fate" else name, cache="arc",
                        warm="popular", **common)
  if name == "lod":
    return PolicyConfig(slots, predictor="none", cache="none", warm="none", **common)
  if name == "lod_lru":
    return PolicyConfig(slots, predictor="none", cache="lru", warm="none", **common)
  if name == "all_on_device":
    return PolicyConfig((num_experts,) * len(slots), predictor="none", cache="lru",
                        warm="popular", **common)
  raise ConfigError(f"policy={name!r} must be one of {POLICIES}")


class CallRecord(NamedTuple):
  """One layer call's transfers: `prefetch` issued during the layer below, `demand` at the
  layer's router; `needed` are the experts its MoE uses."""

  phase: str
  step: int
  layer: int
  tokens: int
  prefetch: tuple[Transfer, ...]
  demand: tuple[Transfer, ...]
  needed: tuple[int, ...]


@dataclasses.dataclass
class SimResult:
  config: PolicyConfig
  report: dict                     # Scheduler counters (schedule.Counters.report)
  calls: list[CallRecord]
  warm: list[Transfer]
  token_accuracy: dict             # phase -> [L] |predicted top-K ∩ used| / (T·K), or None
  tokens: dict                     # phase -> tokens processed

  def bytes(self, phase: str, kind: str | None = None) -> int:
    records = self.warm if phase == "setup" else [
        t for c in self.calls if c.phase == phase for t in c.prefetch + c.demand]
    return sum(t.nbytes for t in records if kind is None or t.kind == kind)

  def summary(self) -> dict:
    """Overall rates and bytes per phase, JSON-able."""
    out = {}
    for phase in PHASES:
      acc = [a for a in (self.token_accuracy[phase] or []) if a is not None]
      out[phase] = dict(self.report[phase]["overall"])
      out[phase].update(
          token_accuracy=float(np.mean(acc)) if acc else None,
          prefetch_bytes=self.bytes(phase, "prefetch"),
          demand_bytes=self.bytes(phase, "demand"),
          bytes_per_token=self.bytes(phase) / max(self.tokens[phase], 1))
    out["setup"] = {"warm_bytes": self.bytes("setup")}
    return out


def warm_lists(trace_or_counts, slots) -> list[list[int]]:
  """Per layer, the most used experts first (from a calibration trace or [L, E] counts)."""
  counts = (trace_or_counts.expert_counts() if isinstance(trace_or_counts, Trace)
            else np.asarray(trace_or_counts))
  order = predictors_lib.rank_from_scores(counts)
  return [row[:s].tolist() for row, s in zip(order, slots)]


def simulate(trace: Trace, config: PolicyConfig, expert_bytes, *,
             calibration: Trace | None = None) -> SimResult:
  """Replay `trace` (prefill, then every decode step) through a `Scheduler`.

  Args:
    trace: the routing trace to replay.
    config: the policy (`policy(...)` for the named ones).
    expert_bytes: bytes of one expert per format, {'full', 'int4', 'int2'}.
    calibration: a separate trace to fit EAP / popularity and the warm start on.

  Returns:
    A `SimResult` with the counters, the per-layer-call transfers and token accuracy.
  """
  L, E, K = trace.num_layers, trace.num_experts, trace.top_k
  if len(config.slots) != L:
    raise ConfigError(f"config key 'slots' has {len(config.slots)} layers, the trace {L}")
  predictor = (None if config.predictor == "none"
               else predictors_lib.make(config.predictor, calibration))
  sched = Scheduler(config, expert_bytes, num_experts=E, top_k=K)
  warm = []
  if config.warm == "popular" and config.cache != "none" and any(config.slots):
    if calibration is None:
      raise ConfigError("warm='popular' needs a calibration trace")
    warm = sched.warm(warm_lists(calibration, config.slots))
  overlap = {p: np.zeros(L, np.int64) for p in PHASES}
  predicted = {p: np.zeros(L, np.int64) for p in PHASES}
  tokens = {p: 0 for p in PHASES}
  records = []
  empty = lambda c: np.zeros((c.experts.shape[0], 0), np.int32)
  for phase, step in trace.steps():
    calls = list(trace.calls(phase, step))
    ranks = [predictor.rank(c) if predictor else empty(c) for c in calls]
    tokens[phase] += calls[0].experts.shape[0] if calls else 0
    issued = {0: sched.prefetch(phase, 0, ranks[0])}
    for layer, call in enumerate(calls):
      unique, counts = needed_experts(call.experts, E)
      demanded = sched.demand(phase, layer, unique, counts)
      if layer + 1 < L:
        issued[layer + 1] = sched.prefetch(phase, layer + 1, ranks[layer + 1])
      sched.release(layer)
      records.append(CallRecord(phase, step, layer, call.experts.shape[0],
                                tuple(issued.pop(layer)), tuple(demanded),
                                tuple(int(e) for e in unique)))
      if ranks[layer].shape[1]:
        overlap[phase][layer] += predictors_lib.token_overlap(ranks[layer], call.experts)
        predicted[phase][layer] += call.experts.size
  accuracy = {p: None if not predictor else
              [None if d == 0 else float(n / d) for n, d in zip(overlap[p], predicted[p])]
              for p in PHASES}
  return SimResult(config, sched.report(), records, warm, accuracy, tokens)


__all__ = ["CallRecord", "POLICIES", "SimResult", "policy", "simulate", "warm_lists"]
