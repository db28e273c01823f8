"""Routing, load counts, bias rules, aux loss and the primal-dual metrics on hand-made inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zojax import moe
from zojax.errors import ConfigError
from zojax.moe import balance, theory


def test_scores_are_float32_whatever_the_logits():
  logits = jnp.array([[0.0, 1.0, -1.0]], jnp.bfloat16)
  for kind in moe.SCORE_KINDS:
    assert moe.scores(logits, kind).dtype == jnp.float32
  np.testing.assert_allclose(moe.scores(logits, "softmax").sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(moe.scores(logits, "sigmoid"), jax.nn.sigmoid(
      logits.astype(jnp.float32)))


def test_route_selects_on_biased_scores_and_gates_on_raw_ones():
  s = jnp.array([[0.9, 0.8, 0.1, 0.2]])
  b = jnp.array([-1.0, 0.0, 1.0, 0.0])
  r = moe.route(s, b, 2)
  np.testing.assert_array_equal(r.experts, [[2, 1]])  # 1.1, 0.8 beat 0.2, -0.1
  np.testing.assert_allclose(r.gates, [[0.1, 0.8]])   # unbiased
  assert r.experts.dtype == jnp.int32 and r.gates.dtype == jnp.float32
  np.testing.assert_allclose(moe.route(s, b, 2, normalize=True).gates, [[1 / 9, 8 / 9]],
                             rtol=1e-6)
  # The bias gets no gradient through the gates (it is model state).
  g = jax.grad(lambda b: moe.route(s, b, 2).gates.sum())(b)
  np.testing.assert_array_equal(g, 0.0)


def test_ties_break_towards_the_lower_index():
  s = jnp.array([[0.5, 0.7, 0.7, 0.5, 0.7]])
  np.testing.assert_array_equal(moe.route(s, None, 2).experts, [[1, 2]])
  np.testing.assert_array_equal(moe.route(s, None, 4).experts, [[1, 2, 4, 0]])


@pytest.fixture(scope="module")
def batch():
  return (theory.synthetic_scores(jax.random.key(0), 64, 8),
          0.05 * jax.random.normal(jax.random.key(1), (8,)))


@jax.jit
def _routes_and_duals(s, biases):
  return jax.vmap(lambda b: (moe.route(s, b, 2).experts, moe.dual_value(s, b, 2)))(biases)


def test_shift_invariance_routing_and_dual(batch):
  s, b = batch
  # Shifts by powers of two keep s + b exact in float32, so even ties cannot move.
  # The last row is the negative control: a non-constant change of b does move tokens.
  experts, duals = _routes_and_duals(s, jnp.stack([b, b + 0.25, b - 2.0,
                                                   b + jnp.linspace(0, 0.5, 8)]))
  for i in (1, 2):
    np.testing.assert_array_equal(experts[i], experts[0])
    np.testing.assert_allclose(duals[i], duals[0], rtol=1e-6)
  assert not np.array_equal(experts[3], experts[0])


def test_loads_count_assignments_and_skip_padding():
  experts = jnp.array([[0, 1], [1, 2], [1, 0]])
  np.testing.assert_array_equal(moe.loads(experts, 4), [2, 3, 1, 0])
  np.testing.assert_array_equal(moe.loads(experts, 4, jnp.array([1.0, 1.0, 0.0])), [1, 2, 1, 0])


def test_loads_are_global_under_a_sharded_jit():
  """Counting over a batch sharded on 8 devices: one all-reduce, the one-device counts."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  experts = jax.random.randint(jax.random.key(0), (64, 2), 0, 8)
  weights = (jnp.arange(64) % 5 != 0).astype(jnp.float32)
  sharded = jax.device_put((experts, weights), NamedSharding(mesh, P("data")))
  count = jax.jit(lambda e, w: moe.loads(e, 8, w), out_shardings=NamedSharding(mesh, P()))
  np.testing.assert_array_equal(count(*sharded), moe.loads(experts, 8, weights))
  from zojax.zo.parallel import collective_traffic
  ops = [c["op"] for c in collective_traffic(count.lower(*sharded).compile().as_text())]
  assert ops == ["all-reduce"], ops
  # Negative control: counting inside each shard (no psum) is not the global count.
  local = jax.jit(jax.shard_map(lambda e, w: moe.loads(e, 8, w)[None], mesh=mesh,
                                in_specs=P("data"), out_specs=P("data")))(*sharded)
  assert not np.array_equal(local[0], moe.loads(experts, 8, weights))
  np.testing.assert_array_equal(local.sum(0), moe.loads(experts, 8, weights))


LOADS = jnp.array([[10.0, 6.0, 8.0, 8.0], [0.0, 0.0, 0.0, 0.0]])  # mean 8; an empty layer


@pytest.mark.parametrize("rule, step, want", [
    ("sign", 0, [-1.0, 1.0, 0.0, 0.0]),
    ("proportional", 0, [-0.25, 0.25, 0.0, 0.0]),       # (8 - c) / 8
    ("decay_sqrt", 3, [-0.125, 0.125, 0.0, 0.0]),       # / sqrt(4)
    ("decay_linear", 3, [-0.0625, 0.0625, 0.0, 0.0]),   # / 4
    ("none", 0, [0.0] * 4),
    ("aux", 0, [0.0] * 4),
])
def test_update_rules_on_hand_made_loads(rule, step, want):
  cfg = moe.BalanceConfig(rule=rule, u=0.5, recenter=False)
  bias = jnp.array([[0.1, 0.0, 0.0, -0.1], [0.3, 0.0, 0.0, 0.0]])
  new = jax.jit(moe.update_bias, static_argnames="cfg")(bias, LOADS, step, cfg=cfg)
  np.testing.assert_allclose(new[0], bias[0] + 0.5 * np.array(want), atol=1e-7)
  np.testing.assert_array_equal(new[1], bias[1])  # no tokens: no move, no NaN


def test_recentre_and_freeze():
  cfg = moe.BalanceConfig(rule="sign", u=0.5, freeze_after=3)
  bias = jnp.array([0.4, 0.0, 0.0, 0.0])
  new = moe.update_bias(bias, LOADS[0], 0, cfg)
  np.testing.assert_allclose(new, [-0.2, 0.4, -0.1, -0.1], atol=1e-7)  # [-0.1, .5, 0, 0] - .1
  step = jax.jit(moe.update_bias, static_argnames="cfg")
  np.testing.assert_array_equal(step(bias, LOADS[0], jnp.int32(2), cfg=cfg), new)
  np.testing.assert_array_equal(step(bias, LOADS[0], jnp.int32(3), cfg=cfg), bias)  # frozen
  assert moe.update_bias(bias.astype(jnp.bfloat16), LOADS[0], 0, cfg).dtype == jnp.bfloat16


def test_aux_loss_switch_form():
  aux = jax.jit(moe.aux_loss, static_argnums=2)
  # Perfect balance with uniform probabilities gives 1.
  experts = jnp.array([[0, 1], [2, 3], [0, 2], [1, 3]])
  assert float(aux(jnp.full((4, 4), 0.25), experts, 2)) == pytest.approx(1.0)
  # By hand: f = loads / (K n), P = mean probs, E * sum f P.
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (4, 4)))
  experts = jnp.array([[0, 1], [0, 1], [0, 2], [0, 3]])
  f = np.array([4, 2, 1, 1]) / 8
  assert float(aux(probs, experts, 2)) == pytest.approx(
      4 * np.sum(f * np.asarray(probs).mean(0)), 1e-6)
  # Padding: a zero-weight token counts neither in f nor in P.
  w = jnp.array([1.0, 1.0, 1.0, 0.0])
  assert float(aux(probs, experts, 2, w)) == pytest.approx(
      float(aux(probs[:3], experts[:3], 2)), 1e-6)
  # Gradient through P only: d/dprobs = E * f / n for every token.
  g = jax.jit(jax.grad(moe.aux_loss), static_argnums=2)(probs, experts, 2)
  np.testing.assert_allclose(g, np.broadcast_to(4 * f / 4, (4, 4)), rtol=1e-6)


def test_dual_is_the_lagrangian_at_its_maximiser(batch):
  s, b = batch

  @jax.jit
  def values(s, b):
    w = (jnp.arange(64) < 32).astype(jnp.float32)
    return dict(
        dual=moe.dual_value(s, b, 2),
        lagrangian=moe.lagrangian_value(s, moe.route(s, b, 2).experts, b),
        # Any other routing scores less under the same prices (here: the unbiased one).
        other=moe.lagrangian_value(s, moe.route(s, None, 2).experts, b),
        # Per-token sum: halves add, and zero-weight tokens drop out.
        halves=moe.dual_value(s[:32], b, 2) + moe.dual_value(s[32:], b, 2),
        weighted=moe.dual_value(s, b, 2, w), first=moe.dual_value(s[:32], b, 2))

  v = {key: float(x) for key, x in values(s, b).items()}
  assert v["dual"] == pytest.approx(theory.dual64(s, b, 2), rel=1e-6)
  assert v["lagrangian"] == pytest.approx(v["dual"], rel=1e-6)
  assert v["other"] < v["dual"]
  assert v["halves"] == pytest.approx(v["dual"], rel=1e-6)
  assert v["weighted"] == pytest.approx(v["first"], rel=1e-6)


def test_metrics_on_hand_made_values():
  np.testing.assert_allclose(moe.max_violation(jnp.array([[10.0, 6.0, 8.0, 8.0],
                                                          [0.0, 0.0, 0.0, 0.0]])), [0.25, 0.0])
  a = jnp.array([[0, 1], [2, 3], [1, 2]])
  b = jnp.array([[1, 0], [2, 0], [3, 0]])  # same set, one of two moved, both moved
  assert float(moe.churn(a, b)) == pytest.approx(3 / 6)
  assert float(moe.churn(a, a)) == 0.0
  np.testing.assert_array_equal(moe.dead_experts(jnp.array([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])),
                                [2, 0])
  s = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
  assert float(moe.primal_value(s, jnp.array([[2], [0]]))) == pytest.approx(0.7)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="signum"), r"balance\.rule='signum' is not one of"),
    (dict(u=-1e-3), r"balance\.u=-0\.001 must be"),
    (dict(u=float("nan")), r"balance\.u=nan must be"),
    (dict(alpha=-1.0), r"balance\.alpha=-1\.0 must be"),
    (dict(freeze_after=-2), r"balance\.freeze_after=-2 must be"),
])
def test_bad_balance_config(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    moe.BalanceConfig(**kwargs).validate()
  with pytest.raises(ConfigError, match=match):  # update_bias checks too
    moe.update_bias(jnp.zeros(4), jnp.ones(4), 0, moe.BalanceConfig(**kwargs))


def test_bad_routing_input():
  with pytest.raises(ConfigError, match=r"top-k k=5 must be in \[1, num_experts=4\]"):
    moe.route(jnp.zeros((2, 4)), None, 5)
  with pytest.raises(ConfigError, match=r"router score kind='relu'"):
    moe.scores(jnp.zeros((2, 4)), "relu")
  assert balance.BalanceConfig(rule="aux", alpha=0.01).aux_weight == 0.01
  assert balance.BalanceConfig(rule="sign", alpha=0.01).aux_weight == 0.0
