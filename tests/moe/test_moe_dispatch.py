"""Dropless, capacity and dense dispatch agree (values, gradients); capacity drops as documented."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _experts

from zojax import moe
from zojax.errors import ConfigError

T, D, F, E, K = 48, 16, 24, 8, 2


@pytest.fixture(scope="module")
def problem():
  return _experts.problem(0, T, D, F, E, logit_scale=1.5)


@functools.partial(jax.jit, static_argnames=("method", "cf"))
def _value_and_grads(x, logits, w, method, cf=1.0):
  """y, dropped and d(sum y^2)/d(x, logits, weights) through routing with normalised gates."""
  def f(x, logits, w):
    r = moe.route(moe.scores(logits, "sigmoid"), None, K, normalize=True)
    y, stats = moe.moe_ffn(x, r, *w, method=method, capacity_factor=cf)
    return jnp.sum(y.astype(jnp.float32) ** 2), (y, stats["dropped"])
  (_, (y, dropped)), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x, logits, w)
  return y, dropped, grads


def _max_load(logits):
  r = moe.route(moe.scores(logits, "sigmoid"), None, K)
  return int(moe.loads(r.experts, E).max())


def test_three_methods_agree_values_and_grads(problem):
  x, logits, w = problem
  c_max = _max_load(logits)
  # The smallest capacity factor whose capacity reaches the largest load: nothing dropped.
  cf = c_max * E / (T * K)
  assert moe.expert_capacity(T, K, E, cf) == c_max
  ref_y, _, ref_g = _value_and_grads(x, logits, w, "dense")
  for method in ("dropless", "capacity"):
    y, dropped, g = _value_and_grads(x, logits, w, method, cf)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(ref_g[1]).sum()) > 0  # gradients reach the router through the gates


def test_capacity_below_the_max_load_drops_the_latest_tokens(problem):
  x, logits, w = problem
  c_max = _max_load(logits)
  cf = (c_max - 1) * E / (T * K)  # one slot short for the busiest expert
  y_drop, dropped, _ = _value_and_grads(x, logits, w, "capacity", cf)
  y_full, _, _ = _value_and_grads(x, logits, w, "dropless")
  r = moe.route(moe.scores(logits, "sigmoid"), None, K, normalize=True)
  load = np.asarray(moe.loads(r.experts, E))
  assert float(dropped) == np.maximum(load - (c_max - 1), 0).sum() > 0
  differs = np.any(np.abs(np.asarray(y_drop) - np.asarray(y_full)) > 1e-5, axis=1)
  assert differs.any()  # the negative control: dropping changes the output
  # Which tokens lost an expert: per overfull expert, its last (load - C) tokens by position.
  experts = np.asarray(r.experts)
  want = np.zeros(T, bool)
  for e in np.nonzero(load > c_max - 1)[0]:
    tokens = np.nonzero((experts == e).any(1))[0]
    want[tokens[c_max - 1:]] = True
  np.testing.assert_array_equal(differs, want)


def test_dtype_follows_x_and_token_order_does_not_matter(problem):
  x, logits, w = problem
  r = moe.route(moe.scores(logits), None, K)
  ffn = jax.jit(moe.moe_ffn, static_argnames=("method", "capacity_factor"))
  y16, _ = ffn(x.astype(jnp.bfloat16), r, *w)
  y32, _ = ffn(x, r, *w)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=0.05, atol=0.05)
  perm = np.random.default_rng(0).permutation(T)
  y_perm, _ = ffn(x[perm], moe.Routing(r.experts[perm], r.gates[perm]), *w)
  np.testing.assert_allclose(y_perm, y32[perm], rtol=1e-6, atol=1e-6)


def test_bad_dispatch_input(problem):
  x, logits, w = problem
  r = moe.route(moe.scores(logits), None, K)
  with pytest.raises(ConfigError, match=r"moe dispatch method='sparse' is not one of"):
    moe.moe_ffn(x, r, *w, method="sparse")
  for cf in (0.0, -1.0):
    with pytest.raises(ConfigError, match=rf"capacity_factor={cf} must be > 0"):
      moe.moe_ffn(x, r, *w, method="capacity", capacity_factor=cf)
  with pytest.raises(ConfigError, match=r"top-k k=9 must be in \[1, num_experts=8\]"):
    moe.moe_ffn(x, moe.Routing(jnp.zeros((T, 9), jnp.int32), jnp.zeros((T, 9))), *w)
  with pytest.raises(ValueError, match=r"moe shapes"):
    moe.moe_ffn(x[:, :8], r, *w)
