"""Sparse mixture-of-experts: routing, dispatch, load balancing read as a primal-dual method.

* `routing`: float32 scores, top-K selection with a selection-only bias, global load counts.
* `dispatch`: SwiGLU experts, dropless (`ragged_dot`) / capacity / dense reference, and
  expert parallelism with `all_to_all` under `shard_map`.
* `balance`: auxiliary loss and loss-free bias rules (sign, proportional, decaying steps),
  and the primal-dual metrics (dual, primal, MaxVio, churn, dead experts).
* `lp`: the assignment LP solved exactly with SciPy (tests and experiments only).
* `theory`: synthetic problems and balancer trajectories for the theory checks.

`lp` and `theory` (numpy/SciPy, for tests and experiments) are not imported here, so a model
importing this package does not load `scipy.optimize`: ``from zojax.moe import lp``.

docs/moe_balance_theory.md explains the reading and what the checks found.
"""

from zojax.moe.balance import (RULES, BalanceConfig, aux_loss, churn, dead_experts, dual_value,
                               lagrangian_value, max_violation, primal_value, step_size,
                               update_bias)
from zojax.moe.dispatch import METHODS, expert_capacity, moe_ffn, moe_ffn_expert_parallel
from zojax.moe.routing import SCORE_KINDS, Routing, assignment, loads, route, scores

__all__ = [
    "BalanceConfig", "METHODS", "RULES", "Routing", "SCORE_KINDS", "assignment", "aux_loss",
    "churn", "dead_experts", "dual_value", "expert_capacity", "lagrangian_value", "loads",
    "max_violation", "moe_ffn", "moe_ffn_expert_parallel", "primal_value", "route", "scores",
    "step_size", "update_bias",
]
