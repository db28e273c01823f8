"""Top-K routing with a selection-only bias (auxiliary-loss-free balancing), and load counts.

The bias `b` shifts which experts a token picks, never how much each pick weighs: selection
is top-K of ``s + b``, the gates are the raw scores ``s`` of the chosen experts. In the
primal-dual reading (`zojax.moe.balance`, docs/moe_balance_theory.md) ``b = -p`` for the
expert prices ``p``, and this routing is the Lagrangian's maximiser.

Everything here is computed in float32 whatever the model's compute dtype: routing decides
discrete choices, and bf16 score ties would make them depend on rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zojax.errors import ConfigError

SCORE_KINDS = ("sigmoid", "softmax")


class Routing(NamedTuple):
  """K experts per token and their gate weights.

  experts: [T, K] int32, slot k holds the k-th best expert by ``s + b`` (ties: lower index).
  gates: [T, K] float32, the unbiased scores of those experts (renormalised if asked).
  """

  experts: jax.Array
  gates: jax.Array


def scores(logits_TxE: jax.Array, kind: str = "sigmoid") -> jax.Array:
  """Router scores in float32: ``sigmoid(logits)`` (DeepSeek-V3) or ``softmax`` over experts."""
  logits = logits_TxE.astype(jnp.float32)
  if kind == "sigmoid":
    return jax.nn.sigmoid(logits)
  if kind == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  raise ConfigError(f"router score kind={kind!r} is not one of {SCORE_KINDS}")


def _check_k(k: int, num_experts: int) -> None:
  if not 1 <= k <= num_experts:
    raise ConfigError(f"top-k k={k} must be in [1, num_experts={num_experts}]")


def route(scores_TxE: jax.Array, bias_E: jax.Array | None, k: int, *,
          normalize: bool = False) -> Routing:
  """Top-K experts of ``scores + bias``; gates are the unbiased scores of the chosen ones.

  Ties break towards the lower expert index (`jax.lax.top_k` is documented to keep the
  lower-index element first among equals), so routing is a deterministic function of the
  values. The bias receives no gradient (it is model state, moved by `balance.update_bias`).

  Args:
    scores_TxE: router scores (see `scores`); cast to float32.
    bias_E: per-expert selection bias [E], or None for plain top-K.
    k: experts per token.
    normalize: divide the K gates by their sum (DeepSeek-V3 does this for sigmoid scores).

  Returns:
    `Routing(experts [T, K] int32, gates [T, K] float32)`.
  """
  s_TxE = scores_TxE.astype(jnp.float32)
  _check_k(k, s_TxE.shape[-1])
  biased = s_TxE if bias_E is None else s_TxE + jax.lax.stop_gradient(
      bias_E.astype(jnp.float32))
  _, experts_TxK = jax.lax.top_k(biased, k)
  gates_TxK = jnp.take_along_axis(s_TxE, experts_TxK, axis=-1)
  if normalize:
    # Scores are positive for both kinds; the floor only guards underflowed sigmoids.
    gates_TxK = gates_TxK / jnp.maximum(gates_TxK.sum(-1, keepdims=True),
                                        jnp.finfo(jnp.float32).tiny)
  return Routing(experts_TxK.astype(jnp.int32), gates_TxK)


def assignment(experts_TxK: jax.Array, num_experts: int,
               weights_T: jax.Array | None = None) -> jax.Array:
  """x[t, i] = weight_t if token t picked expert i, else 0: [T, E] float32 (0/1 unweighted)."""
  x_TxE = jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32).sum(-2)
  return x_TxE if weights_T is None else x_TxE * weights_T.astype(jnp.float32)[:, None]


def loads(experts_TxK: jax.Array, num_experts: int,
          weights_T: jax.Array | None = None) -> jax.Array:
  """Token-assignment count per expert, [E] float32; tokens with weight 0 (padding) excluded.

  A plain sum over the token axis on purpose: under `jax.jit` with the batch sharded over
  devices, XLA partitions it into local sums plus an all-reduce, so the count is the global
  batch's, as the balancers need (MaxText counts shard-locally). Counts of several
  micro-batches add. Exact in float32 up to 2**24 assignments per call.
  """
  return assignment(experts_TxK, num_experts, weights_T).sum(0)


__all__ = ["Routing", "SCORE_KINDS", "assignment", "loads", "route", "scores"]
