"""Synthetic routing problems and balancer trajectories for the primal-dual checks.

Shared by tests/moe/test_moe_theory.py and experiments/alflb_theory.py (docs/moe_balance_theory.md).
A trajectory routes with the current bias, records what the batch saw, then updates the bias
from that batch's loads: the order a model uses (the new bias applies from the next batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zojax.moe import balance, routing


def synthetic_scores(key, num_tokens: int, num_experts: int, *, skew: float = 1.0,
                     kind: str = "sigmoid") -> jax.Array:
  """Router scores from N(0, 1) logits plus a per-expert offset in [-skew, skew].

  The offsets make some experts popular, so unbalanced top-K routing is far from balanced.
  """
  offsets_E = skew * jnp.linspace(-1.0, 1.0, num_experts)
  logits = jax.random.normal(key, (num_tokens, num_experts)) + offsets_E
  return routing.scores(logits, kind)


def planted_scores(seed: int, num_tokens: int, num_experts: int, k: int, *,
                   margin: float = 0.05, spread: float = 0.3):
  """Scores whose LP optimum is known by construction.

  Token t's planted set is {(t + j) mod E : j < K} (every expert gets exactly C = nK/E), and
  s = p* + m with m in [margin, 1] on the planted set, in [-1, -margin] off it, for centred
  prices p* in [-spread, spread]. At p* the top-K of s - p* is the planted set with margin
  >= 2 * margin and every load is C, so the planted assignment is the unique LP optimum.

  Returns:
    ``(scores [T, E] f32, planted [T, E] 0/1, optimum, prices p* [E])`` (numpy).
  """
  if num_tokens % num_experts:
    raise ValueError(f"{num_tokens=} must be a multiple of {num_experts=}")
  rng = np.random.default_rng(seed)
  planted = np.zeros((num_tokens, num_experts))
  for j in range(k):
    planted[np.arange(num_tokens), (np.arange(num_tokens) + j) % num_experts] = 1.0
  prices = rng.uniform(-spread, spread, num_experts)
  prices -= prices.mean()
  m = np.where(planted > 0, rng.uniform(margin, 1.0, planted.shape),
               rng.uniform(-1.0, -margin, planted.shape))
  s = (prices + m).astype(np.float32)
  return s, planted, float((s.astype(np.float64) * planted).sum()), prices


def boundary_margin(scores_TxE, bias_E, k: int) -> jax.Array:
  """Per token: K-th minus (K+1)-th largest of s + b; near 0 means tied at the boundary."""
  top, _ = jax.lax.top_k(jnp.asarray(scores_TxE, jnp.float32) + bias_E, k + 1)
  return top[:, k - 1] - top[:, k]


def dual64(scores_TxE, bias_SxE, k: int) -> np.ndarray:
  """`balance.dual_value` in float64 numpy for each row of bias [S, E] (or one [E]).

  Float32 sums of thousands of tokens blur differences of 1e-4; monotonicity checks need
  the exact value.
  """
  s = np.asarray(scores_TxE, np.float64)
  b = np.atleast_2d(np.asarray(bias_SxE, np.float64))
  n, num_experts = s.shape
  out = np.empty(b.shape[0])
  for row, b_E in enumerate(b):
    top = np.partition(s + b_E, num_experts - k, axis=1)[:, num_experts - k:]
    out[row] = top.sum() - n * k / num_experts * b_E.sum()
  return out if np.ndim(bias_SxE) > 1 else out[0]


def _record(s_TxE, b_E, k, w_T):
  r = routing.route(s_TxE, b_E, k)
  load_E = routing.loads(r.experts, s_TxE.shape[-1], w_T)
  return r, load_E, {
      "bias": b_E, "loads": load_E, "dual": balance.dual_value(s_TxE, b_E, k, w_T),
      "primal": balance.primal_value(s_TxE, r.experts, w_T),
      "maxvio": balance.max_violation(load_E)}


@functools.partial(jax.jit, static_argnames=("k", "cfg", "steps", "keep_experts"))
def trajectory(scores_TxE, k: int, cfg: balance.BalanceConfig, steps: int, *,
               bias_E=None, weights_T=None, keep_experts: bool = False) -> dict:
  """The same batch routed `steps` times, the bias updated after each (full-batch dual descent).

  Returns per-step arrays (before that step's update): bias [S, E], loads [S, E], dual [S],
  primal [S], maxvio [S], and experts [S, T, K] if `keep_experts`.
  """
  s_TxE = jnp.asarray(scores_TxE, jnp.float32)
  b0 = jnp.zeros(s_TxE.shape[-1], jnp.float32) if bias_E is None else bias_E

  def step(b_E, t):
    r, load_E, out = _record(s_TxE, b_E, k, weights_T)
    if keep_experts:
      out["experts"] = r.experts
    return balance.update_bias(b_E, load_E, t, cfg), out

  _, out = jax.lax.scan(step, b0, jnp.arange(steps))
  return out


@functools.partial(jax.jit, static_argnames=("k", "cfg"))
def online_trajectory(batches_SxTxE, k: int, cfg: balance.BalanceConfig, *, bias_E=None) -> dict:
  """A fresh batch each step: route batch t with b_t, record, update b from its loads.

  Returns the same per-step arrays as `trajectory`; ``dual[t]`` is batch t's dual at b_t, the
  online loss f_t(b_t) whose regret `experiments/alflb_theory.py` measures.
  """
  b0 = jnp.zeros(batches_SxTxE.shape[-1], jnp.float32) if bias_E is None else bias_E

  def step(b_E, inputs):
    s_TxE, t = inputs
    _, load_E, out = _record(s_TxE, b_E, k, None)
    return balance.update_bias(b_E, load_E, t, cfg), out

  _, out = jax.lax.scan(step, b0, (batches_SxTxE, jnp.arange(batches_SxTxE.shape[0])))
  return out


def transfers(experts_a_TxK, experts_b_TxK, num_experts: int):
  """Which experts each token left and joined between routings a and b: two [T, E] bools."""
  def chosen(experts):
    experts = np.asarray(experts)
    x = np.zeros((experts.shape[0], num_experts), bool)
    x[np.arange(experts.shape[0])[:, None], experts] = True
    return x
  xa, xb = chosen(experts_a_TxK), chosen(experts_b_TxK)
  return xa & ~xb, xb & ~xa


__all__ = ["boundary_margin", "dual64", "online_trajectory", "planted_scores",
           "synthetic_scores", "trajectory", "transfers"]
