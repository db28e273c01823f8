"""The shallow-favoring budget planner: how many expert slots each MoE layer gets on device.

Fate's observation: the cross-layer gate predicts the first layers worst (the hidden state
changes most there), so those layers are kept fully resident and the slots left over are
spread evenly over the deeper layers, where prefetching covers most misses. When the budget
cannot hold the resident layers in full, slots go to layers in order, shallowest first.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from zojax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
  """Slots per MoE layer and the bytes behind them."""

  slots: tuple[int, ...]
  budget_bytes: int
  non_expert_bytes: int
  expert_bytes: int      # bytes of one cache slot

  @property
  def cache_bytes(self) -> int:
    return sum(self.slots) * self.expert_bytes

  @property
  def unused_bytes(self) -> int:
    return self.budget_bytes - self.non_expert_bytes - self.cache_bytes

  def cache_fraction(self, num_experts: int) -> float:
    """Cached share of all experts, sum(slots) / (L·E)."""
    return sum(self.slots) / (len(self.slots) * num_experts) if self.slots else 0.0


def _check(name: str, value: int, low: int) -> int:
  if isinstance(value, bool) or int(value) != value or value < low:
    raise ConfigError(f"config key {name!r}={value} must be an integer >= {low}")
  return int(value)


def split_slots(total_slots: int, num_layers: int, num_experts: int,
                resident_layers: int) -> tuple[int, ...]:
  """Shallow-favoring split of `total_slots`: the first `resident_layers` get E each, the rest
  is spread evenly over the deeper layers (the remainder to the shallower of them)."""
  L, E = num_layers, num_experts
  total = min(_check("total_slots", total_slots, 0), L * E)
  r = min(_check("resident_layers", resident_layers, 0), L)
  slots = np.zeros(L, np.int64)
  full, part = divmod(min(total, r * E), E)
  slots[:full] = E
  if full < L:
    slots[full] += part
  rest = total - r * E
  if rest > 0:
    base, extra = divmod(rest, L - r)
    slots[r:] = base
    slots[r:r + extra] += 1
  return tuple(int(s) for s in slots)


def plan(budget_bytes: int, non_expert_bytes: int, expert_bytes: int, num_layers: int,
         num_experts: int, resident_layers: int) -> Plan:
  """Slots per layer for a device budget; all layers get E when everything fits.

  Args:
    budget_bytes: device memory for this model's weights.
    non_expert_bytes: weights that always stay on device (attention, norms, embeddings,
      routers, shared experts).
    expert_bytes: bytes of one cache slot (one expert in the largest format moved).
    num_layers, num_experts: L MoE layers of E experts.
    resident_layers: the first MoE layers to keep fully resident.

  Returns:
    A `Plan`; a budget below the non-expert weights is a one-line `ConfigError`.
  """
  budget = _check("budget_bytes", budget_bytes, 0)
  fixed = _check("non_expert_bytes", non_expert_bytes, 0)
  size = _check("expert_bytes", expert_bytes, 1)
  L, E = _check("num_layers", num_layers, 1), _check("num_experts", num_experts, 1)
  if budget < fixed:
    raise ConfigError(f"config key 'budget_bytes'={budget} is {fixed - budget} bytes short of "
                      f"the non-expert weights ({fixed} bytes)")
  slots = split_slots((budget - fixed) // size, L, E, resident_layers)
  return Plan(slots, budget, fixed, size)


def all_on_device(num_layers: int, num_experts: int) -> tuple[int, ...]:
  return (num_experts,) * num_layers


def zero_cache(num_layers: int) -> tuple[int, ...]:
  return (0,) * num_layers


__all__ = ["Plan", "all_on_device", "plan", "split_slots", "zero_cache"]
