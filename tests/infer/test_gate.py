"""zojax.infer.gate: the cross-layer gate is the MoE's own selection on another hidden state."""

import jax
import jax.numpy as jnp
import numpy as np

from zojax import moe
from zojax.infer import gate
from zojax.models import moe as moe_model


def test_gate_is_route_with_bias_and_its_ranking():
  kr, kh = jax.random.split(jax.random.key(0))
  router = jax.random.normal(kr, (8, 6))
  h = jax.random.normal(kh, (5, 8)).astype(jnp.bfloat16)   # scores still in float32
  bias = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 5.0])          # forces expert 5 into every top-2
  got = gate.predict(router, bias, h, top_k=2, score="softmax")
  want = moe.route(moe.scores(h.astype(jnp.float32) @ router, "softmax"), bias, 2)
  np.testing.assert_array_equal(got.experts, want.experts)
  np.testing.assert_array_equal(got.gates, want.gates)
  assert (np.asarray(got.experts) == 5).any(-1).all()
  unbiased = gate.predict(router, None, h, top_k=2, score="softmax")
  assert not (np.asarray(unbiased.experts) == 5).any(-1).all()   # the bias did the work
  ranks = np.asarray(gate.rank(router, bias, h, score="softmax"))
  np.testing.assert_array_equal(ranks[:, :2], got.experts)
  assert (np.sort(ranks, -1) == np.arange(6)).all()
  biased = np.asarray(gate.gate_scores(router, h, "softmax")) + np.asarray(bias)
  assert (np.diff(np.take_along_axis(biased, ranks, -1), axis=-1) <= 0).all()


def _ranks_and_scores(config, params, state, batch):
  """One compile: model_ranks and layer_scores with one router and bias row shared by every
  layer (so layer l+1's gate must be exactly layer l's router)."""
  L = config.base.num_layers
  params = dict(params, blocks=dict(params["blocks"],
                                    router=jnp.repeat(params["blocks"]["router"][:1], L, 0)))
  state = dict(state, bias=jnp.repeat(state["bias"][:1], L, 0))
  return (gate.model_ranks(config, params, state, batch),
          moe_model.layer_scores(config, params, state, batch), state["bias"])


def test_model_ranks_match_the_model_routing():
  config = moe_model.CONFIGS["moe-tiny"]
  # Random weights of init's shapes, drawn in numpy: init's own compile costs seconds.
  rng = np.random.default_rng(1)
  shapes = jax.eval_shape(lambda k: moe_model.init(config, k), jax.random.key(1))
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path) else
                       0.1 * rng.standard_normal(s.shape).astype(s.dtype)), shapes)
  bias = 0.01 * jax.random.normal(jax.random.key(3), (config.base.num_layers, 8))
  state = {"bias": bias, "prev_bias": bias}
  batch = {"tokens": jax.random.randint(jax.random.key(4), (2, 8), 0, 256)}
  out, scores, bias = jax.jit(_ranks_and_scores, static_argnums=0)(config, params, state,
                                                                   batch)
  for layer in range(config.base.num_layers):
    want = moe.route(scores[layer], bias[layer], config.top_k).experts
    np.testing.assert_array_equal(out["experts"][layer], want)
  np.testing.assert_array_equal(out["gate_rank"][1:], out["true_rank"][:-1])
  assert not np.array_equal(out["gate_rank"][0], out["true_rank"][0])  # embedding input
