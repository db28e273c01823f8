"""Small synthetic routing traces for the policy tests (numpy only)."""

import numpy as np

from zojax.infer.trace import Trace


def ranking(scores):
  """Experts by descending score, ties to the lower id (the router's order)."""
  return np.argsort(-scores, axis=-1, kind="stable").astype(np.int32)


def synthetic(seed=0, *, L=3, E=6, K=2, B=2, T=4, S=3, gate_noise=0.3, skew=1.5):
  """A valid trace: per-layer skewed random router scores; the gate sees them plus noise."""
  rng = np.random.default_rng(seed)
  popular_LxE = skew * rng.standard_normal((L, E))

  def phase(lead, layer_axis):
    shape = [1] * len(lead) + [E]
    shape[layer_axis] = L
    true = rng.standard_normal(lead + (E,)) + popular_LxE.reshape(shape)
    gate = true + gate_noise * rng.standard_normal(true.shape)
    true_rank = ranking(true)
    return true_rank[..., :K], ranking(gate), true_rank

  pe, pg, pt = phase((L, B * T), 0)
  de, dg, dt = phase((S, L, B), 1)
  return Trace(num_experts=E, top_k=K, batch_size=B, prefill_experts=pe, prefill_gate_rank=pg,
               prefill_true_rank=pt, decode_experts=de, decode_gate_rank=dg,
               decode_true_rank=dt, meta={"source": "synthetic", "seed": seed})


def full_rank(experts, E):
  """Rankings that start with `experts` [..., K] and continue with the other ids ascending."""
  experts = np.asarray(experts, np.int32)
  ids = np.broadcast_to(np.arange(E), experts.shape[:-1] + (E,))
  used = (ids[..., :, None] == experts[..., None, :]).any(-1)
  rest = np.sort(np.where(used, E, ids), axis=-1)[..., :E - experts.shape[-1]]
  return np.concatenate([experts, rest], -1).astype(np.int32)


def from_experts(prefill_experts, decode_experts, E, B=1, gate=None):
  """A trace whose router rankings start with the given experts; the gate is exact unless
  `gate` = (prefill_gate_experts, decode_gate_experts) gives other leading experts."""
  pt, dt = full_rank(prefill_experts, E), full_rank(decode_experts, E)
  pg, dg = (pt, dt) if gate is None else (full_rank(gate[0], E), full_rank(gate[1], E))
  return Trace(num_experts=E, top_k=np.asarray(prefill_experts).shape[-1], batch_size=B,
               prefill_experts=prefill_experts, prefill_gate_rank=pg, prefill_true_rank=pt,
               decode_experts=decode_experts, decode_gate_rank=dg, decode_true_rank=dt)
