"""Load balancers for top-K routing, and the primal-dual quantities that explain them.

The reading (docs/moe_balance_theory.md has the longer version and what the checks found):

* **Primal.** A batch of n tokens with scores s[t, i] over E experts. Pick K experts per
  token (x[t, i] in {0, 1}, sum_i x[t, i] = K) to maximise sum s[t, i] x[t, i], with every
  expert taking at most C = nK/E assignments. The constraint matrix (token rows, expert
  rows, one 1 in each for every variable) is that of a bipartite graph, so it is totally
  unimodular: the LP relaxation already has an integral optimum (`zojax.moe.lp`).
* **Dual.** Price each expert's capacity with p_i. The Lagrangian
  L(x, p) = sum s x + sum_i p_i (C - load_i) is maximised over x, token by token, by the
  top-K of s_t - p: exactly loss-free routing with bias b = -p. Its value is the dual
  function D(p) = sum_t topKsum(s_t - p) + C sum_i p_i, a maximum of linear functions of p,
  hence convex and piecewise linear, with subgradient C - load_i (load under that routing).
  Weak duality: D(p) >= the LP optimum for every p; at the optimal prices they are equal.
* **Rules.** Descending D along its subgradient is b_i += eta (C - load_i); the mean load
  c_bar equals C, so with eta = u / c_bar this is the **proportional** rule
  b_i += u (c_bar - c_i) / c_bar, scale-free in the batch size. DeepSeek's **sign** rule
  b_i += u sign(c_bar - c_i) is its sign-normalised form. Convergence of the iterates and
  logarithmic regret need decaying steps (u / sqrt(t+1), u / (t+1)); with a constant u the
  prices keep jumping over the optimum and settle into a limit cycle.
* **Shift invariance.** Since sum_i load_i = nK = E C, adding one constant to every b_i
  changes neither the routing nor D; only b minus its mean means anything, so re-centre.

All functions are pure, work in float32 and, where a batch is summed, are plain sums over
the token axis: under `jax.jit` with the batch sharded over devices XLA inserts the
all-reduce, and values of micro-batches add.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from zojax.errors import ConfigError
from zojax.moe.routing import assignment, loads

RULES = ("none", "aux", "sign", "proportional", "decay_sqrt", "decay_linear")
_BIAS_RULES = ("sign", "proportional", "decay_sqrt", "decay_linear")


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
  """How the router bias (or the auxiliary loss) balances expert loads.

  rule: "none"; "aux" (Switch/GShard loss, weight alpha; the bias stays put); "sign"
    (b += u sign(mean - load), DeepSeek); "proportional" (b += u (mean - load) / mean, the
    dual subgradient step); "decay_sqrt" / "decay_linear" (the proportional step with
    u / sqrt(t + 1) or u / (t + 1) at update t).
  u: the step size (the initial one for the decaying rules). DeepSeek uses 1e-3 (sign).
  alpha: auxiliary-loss weight, used by rule "aux" only (see `aux_weight`).
  freeze_after: updates with step >= freeze_after leave the bias as it is (DeepSeek-V3 sets
    u = 0 for its last tokens); None never freezes.
  recenter: subtract the per-layer mean after each update (routing is shift invariant).
  """

  rule: str = "sign"
  u: float = 1e-3
  alpha: float = 1e-3
  freeze_after: int | None = None
  recenter: bool = True

  def validate(self, name: str = "balance") -> "BalanceConfig":
    """Raise a one-line `ConfigError` naming the bad field (as ``{name}.field``)."""
    if self.rule not in RULES:
      raise ConfigError(f"{name}.rule={self.rule!r} is not one of {RULES}")
    for field in ("u", "alpha"):
      value = getattr(self, field)
      if (isinstance(value, bool) or not isinstance(value, numbers.Real)
          or not math.isfinite(value) or value < 0):
        raise ConfigError(f"{name}.{field}={value!r} must be a finite number >= 0")
    if self.freeze_after is not None and not (
        isinstance(self.freeze_after, numbers.Integral) and self.freeze_after >= 0):
      raise ConfigError(f"{name}.freeze_after={self.freeze_after!r} must be None or an int >= 0")
    if not isinstance(self.recenter, bool):
      raise ConfigError(f"{name}.recenter={self.recenter!r} must be a bool")
    return self

  @property
  def moves_bias(self) -> bool:
    return self.rule in _BIAS_RULES

  @property
  def aux_weight(self) -> float:
    """The weight the model puts on `aux_loss`: alpha for rule "aux", else 0."""
    return self.alpha if self.rule == "aux" else 0.0


def step_size(step, cfg: BalanceConfig):
  """u, u / sqrt(step + 1) or u / (step + 1) for update `step` (0-based); float32."""
  t = jnp.asarray(step, jnp.float32)
  if cfg.rule == "decay_sqrt":
    return cfg.u / jnp.sqrt(t + 1.0)
  if cfg.rule == "decay_linear":
    return cfg.u / (t + 1.0)
  return jnp.float32(cfg.u)


def update_bias(bias_LxE: jax.Array, loads_LxE: jax.Array, step, cfg: BalanceConfig) -> jax.Array:
  """One balancing step on the selection bias, from the loads of the batch just routed.

  sign:          b += u sign(c_bar - c)            (c_bar = mean load over the E experts)
  proportional:  b += u (c_bar - c) / c_bar        (dual subgradient step, error / c_bar)
  decay_*:       the proportional step with u / sqrt(t + 1) or u / (t + 1)
  none, aux:     b unchanged

  Then b -= mean(b) if ``cfg.recenter``. An expert exactly at the mean is not moved by the
  sign rule (sign 0); a layer with no tokens (c_bar = 0) is not moved by the others. Steps
  with ``step >= cfg.freeze_after`` return the bias unchanged. The new bias routes the next
  batch, never the one whose loads made it. Skipping non-finite steps is the caller's job.

  Args:
    bias_LxE: current bias, [E] or [L, E] (any leading axes), kept in its dtype.
    loads_LxE: token-assignment counts of the same shape (`routing.loads`, global batch).
    step: the 0-based update index (int or traced int array).
    cfg: the `BalanceConfig`.

  Returns:
    The new bias, same shape and dtype.
  """
  cfg.validate()
  if bias_LxE.shape != loads_LxE.shape:
    raise ValueError(f"bias {bias_LxE.shape} and loads {loads_LxE.shape} must match")
  if not cfg.moves_bias:
    return bias_LxE
  b = bias_LxE.astype(jnp.float32)
  c = loads_LxE.astype(jnp.float32)
  mean = c.mean(-1, keepdims=True)
  if cfg.rule == "sign":
    direction = jnp.sign(mean - c)
  else:
    direction = jnp.where(mean > 0, (mean - c) / jnp.where(mean > 0, mean, 1.0), 0.0)
  new = b + step_size(step, cfg) * direction
  if cfg.recenter:
    new = new - new.mean(-1, keepdims=True)
  if cfg.freeze_after is not None:
    new = jnp.where(jnp.asarray(step) < cfg.freeze_after, new, b)
  return new.astype(bias_LxE.dtype)


def _weights(num_tokens, weights_T):
  if weights_T is None:
    return jnp.ones((num_tokens,), jnp.float32)
  return weights_T.astype(jnp.float32)


def aux_loss(probs_TxE: jax.Array, experts_TxK: jax.Array, k: int,
             weights_T: jax.Array | None = None) -> jax.Array:
  """Switch/GShard balance term ``E * sum_i f_i P_i`` (unscaled; multiply by alpha).

  f_i is the fraction of the batch's token-assignments routed to expert i (sum_i f_i = 1),
  P_i the mean router probability of expert i; both are plain sums over the (global) batch,
  padding (weight 0) excluded. Equals 1 under perfect balance with uniform probabilities.
  The gradient flows through P only (f comes from the discrete choice). Pass softmax
  probabilities, or sigmoid scores normalised per token. Under gradient accumulation each
  micro-batch's f is its own: a product of sums does not add across micro-batches.
  """
  T, E = probs_TxE.shape
  if experts_TxK.shape != (T, k):
    raise ValueError(f"experts {experts_TxK.shape} must be [T={T}, k={k}]")
  w_T = _weights(T, weights_T)
  n = jnp.maximum(w_T.sum(), jnp.finfo(jnp.float32).tiny)
  f_E = loads(experts_TxK, E, w_T) / (k * n)
  p_E = (probs_TxE.astype(jnp.float32) * w_T[:, None]).sum(0) / n
  return E * jnp.sum(f_E * p_E)


def dual_value(scores_TxE: jax.Array, bias_E: jax.Array, k: int,
               weights_T: jax.Array | None = None) -> jax.Array:
  """The dual function at prices p = -b, written as a sum over tokens.

  D = sum_t w_t [ topKsum(s_t + b) - (K/E) sum_i b_i ]; with n = sum_t w_t and C = nK/E this
  is sum_t topKsum(s_t - p) + C sum_i p_i. A per-token sum, so it adds over micro-batches
  and devices. Convex in b, unchanged by b + const, and >= the LP optimum (weak duality).
  """
  s_TxE = scores_TxE.astype(jnp.float32)
  b_E = bias_E.astype(jnp.float32)
  top_TxK, _ = jax.lax.top_k(s_TxE + b_E, k)
  per_token = top_TxK.sum(-1) - (k / s_TxE.shape[-1]) * b_E.sum()
  return jnp.sum(_weights(s_TxE.shape[0], weights_T) * per_token)


def primal_value(scores_TxE: jax.Array, experts_TxK: jax.Array,
                 weights_T: jax.Array | None = None) -> jax.Array:
  """Sum of the raw scores of the chosen experts: the primal objective of a routing."""
  chosen_TxK = jnp.take_along_axis(scores_TxE.astype(jnp.float32), experts_TxK, axis=-1)
  return jnp.sum(_weights(scores_TxE.shape[0], weights_T) * chosen_TxK.sum(-1))


def lagrangian_value(scores_TxE: jax.Array, experts_TxK: jax.Array, bias_E: jax.Array,
                     weights_T: jax.Array | None = None) -> jax.Array:
  """L(x, p = -b) = primal(x) + sum_i b_i (load_i(x) - C) for any routing x.

  Equals `dual_value` when x is the routing of b (x maximises L); smaller otherwise.
  """
  E = scores_TxE.shape[-1]
  w_T = _weights(scores_TxE.shape[0], weights_T)
  load_E = assignment(experts_TxK, E, w_T).sum(0)
  cap = w_T.sum() * experts_TxK.shape[-1] / E
  return primal_value(scores_TxE, experts_TxK, w_T) + jnp.sum(
      bias_E.astype(jnp.float32) * (load_E - cap))


def max_violation(loads_LxE: jax.Array) -> jax.Array:
  """MaxVio = (max load - mean load) / mean load over the last axis (0 if no tokens)."""
  c = loads_LxE.astype(jnp.float32)
  mean = c.mean(-1)
  return jnp.where(mean > 0, (c.max(-1) - mean) / jnp.where(mean > 0, mean, 1.0), 0.0)


def churn(experts_a_TxK: jax.Array, experts_b_TxK: jax.Array,
          weights_T: jax.Array | None = None) -> jax.Array:
  """Fraction of token-slot assignments whose expert is not in the token's other set.

  Order within a token's K slots does not matter: {1, 2} vs {2, 1} is no churn.
  """
  T, K = experts_a_TxK.shape
  moved_TxK = ~jnp.any(experts_a_TxK[:, :, None] == experts_b_TxK[:, None, :], axis=-1)
  w_T = _weights(T, weights_T)
  n = jnp.maximum(w_T.sum(), jnp.finfo(jnp.float32).tiny)
  return jnp.sum(w_T * moved_TxK.sum(-1)) / (K * n)


def dead_experts(loads_LxE: jax.Array, threshold: float = 0.0) -> jax.Array:
  """Number of experts with load <= threshold, over the last axis (int32)."""
  return jnp.sum(loads_LxE <= threshold, axis=-1).astype(jnp.int32)


__all__ = [
    "BalanceConfig", "RULES", "aux_loss", "churn", "dead_experts", "dual_value",
    "lagrangian_value", "max_violation", "primal_value", "step_size", "update_bias",
]
