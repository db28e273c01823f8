"""The cross-layer gate (Fate): layer l+1's own router applied to layer l's router input.

Consecutive layers' normalised post-attention hidden states are close, so running layer
l+1's router on layer l's (available before layer l's MoE runs) predicts layer l+1's experts
early enough to overlap their transfer with MoE_l and attention_{l+1}. No training and no
extra parameters: the prediction uses the MoE's own selection, `zojax.moe.route` (scores in
float32, top-K of scores + the loss-free selection bias, ties towards the lower id).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zojax import moe as moe_lib
from zojax.models import llama
from zojax.models import moe as moe_model


def gate_scores(router_DxE: jax.Array, h_TxD: jax.Array, score: str = "sigmoid") -> jax.Array:
  """[T, E] float32 scores of `router_DxE` on hidden states `h_TxD` (the router's own math)."""
  return moe_lib.scores(h_TxD.astype(jnp.float32) @ router_DxE.astype(jnp.float32), score)


def predict(router_DxE: jax.Array, bias_E: jax.Array | None, h_TxD: jax.Array, *, top_k: int,
            score: str = "sigmoid", normalize: bool = False) -> moe_lib.Routing:
  """Top-K predicted experts (and gates) of the next layer from this layer's hidden states.

  Args:
    router_DxE: layer l+1's router weights.
    bias_E: layer l+1's selection bias (model state), or None.
    h_TxD: layer l's post-attention, normalised hidden states (layer l's router input).
    top_k: experts per token.
    score: the MoE's score kind, 'sigmoid' or 'softmax'.
    normalize: renormalise the gates as the MoE does (selection is unaffected).

  Returns:
    `Routing(experts [T, K] int32, gates [T, K] float32)`, exactly what layer l+1's router
    would pick if its input were `h_TxD`.
  """
  return moe_lib.route(gate_scores(router_DxE, h_TxD, score), bias_E, top_k,
                       normalize=normalize)


def rank(router_DxE: jax.Array, bias_E: jax.Array | None, h_TxD: jax.Array, *,
         score: str = "sigmoid") -> jax.Array:
  """[T, E] int32: every expert in `predict`'s order (its first K are `predict`'s experts)."""
  return predict(router_DxE, bias_E, h_TxD, top_k=router_DxE.shape[-1], score=score).experts


def model_ranks(config: moe_model.MoEConfig, params, model_state, batch) -> dict:
  """Gate and router rankings of every layer of the MoE decoder on one batch (no KV cache).

  Row l of 'gate_rank' is layer l's router (and bias) on layer l-1's router input; row 0 uses
  the embedding output, normalised with layer 0's MLP norm. This is the layout of a
  prefill trace (`zojax.infer.trace`).

  Returns:
    {'gate_rank': [L, B·T, E], 'true_rank': [L, B·T, E], 'experts': [L, B·T, K]}, int32.
  """
  c = config
  blocks = moe_model.make(c, model_state)
  carry = blocks.embed(params, batch)
  D = carry["x"].shape[-1]
  norm = lambda x, w: llama.rms_norm(x, w, c.base.norm_eps).reshape(-1, D)
  h0 = norm(carry["x"], params["blocks"]["mlp_norm"][0])

  def body(state, xs):
    carry, h_prev = state
    p, bias_E = xs
    gate = rank(p["router"], bias_E, h_prev, score=c.score)
    h = norm(llama.attention_sublayer(c.base, p, carry["x"]), p["mlp_norm"])
    true = rank(p["router"], bias_E, h, score=c.score)
    return (blocks.block(p, carry), h), (gate, true)

  _, (gate, true) = jax.lax.scan(body, (carry, h0), (params["blocks"], model_state["bias"]))
  return {"gate_rank": gate, "true_rank": true, "experts": true[..., :c.top_k]}


__all__ = ["gate_scores", "model_ranks", "predict", "rank"]
