"""Expert parallelism on 8 fake CPU devices: equal to one device, all-to-all in the HLO, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _experts

from zojax import moe
from zojax.errors import ConfigError
from zojax.zo.parallel import collective_traffic

T, D, F, E, K = 64, 16, 24, 8, 2


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


@pytest.fixture(scope="module")
def problem():
  x, logits, w = _experts.problem(1, T, D, F, E)
  return x, moe.route(moe.scores(logits), None, K), w


def _ep_loss(mesh, cf):
  def loss(x, gates, w, experts):
    y, stats = moe.moe_ffn_expert_parallel(x, moe.Routing(experts, gates), *w, mesh=mesh,
                                           capacity_factor=cf)
    return jnp.sum(y ** 2), (y, stats["dropped"])
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _one_device_loss(x, gates, w, experts):
  y, _ = moe.moe_ffn(x, moe.Routing(experts, gates), *w)
  return jnp.sum(y ** 2), y


def test_expert_parallel_equals_one_device_and_shows_its_all_to_all(problem):
  x, r, w = problem
  mesh = _mesh((8,), ("expert",))
  # capacity_factor = E / K: a shard's tokens can never overflow an expert.
  step = _ep_loss(mesh, E / K)
  (_, (y, dropped)), grads = step(x, r.gates, w, r.experts)
  (_, y1), grads1 = jax.jit(jax.value_and_grad(_one_device_loss, argnums=(0, 1, 2),
                                               has_aux=True))(x, r.gates, w, r.experts)
  assert float(dropped) == 0.0
  np.testing.assert_allclose(y, y1, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Forward: two all-to-alls (there and back), backward: two more; each moves the [E, C, D]
  # capacity buffer of one device: C = ceil(4 * 8 * 2 / 8) = 8 slots.
  traffic = collective_traffic(step.lower(x, r.gates, w, r.experts).compile().as_text())
  a2a = [c["bytes"] for c in traffic if c["op"] == "all-to-all"]
  assert a2a == [E * 8 * D * 4] * 4, traffic


def test_expert_parallel_with_drops_is_per_shard_capacity(problem):
  """On a (data=2, expert=4) mesh with overflowing shards: capacity dispatch shard by shard."""
  x, r, w = problem
  mesh = _mesh((2, 4), ("data", "expert"))
  y, stats = jax.jit(lambda x, r, w: moe.moe_ffn_expert_parallel(x, r, *w, mesh=mesh))(x, r, w)
  dropped = stats["dropped"]
  per_shard = jax.jit(jax.vmap(lambda x, e, g: moe.moe_ffn(
      x, moe.Routing(e, g), *w, method="capacity", capacity_factor=1.0)))
  y_shards, shard_stats = per_shard(*(a.reshape(8, T // 8, -1) for a in (x, r.experts, r.gates)))
  np.testing.assert_allclose(y, y_shards.reshape(T, D), rtol=1e-5, atol=1e-5)
  assert float(dropped) == float(shard_stats["dropped"].sum()) > 0
  # Negative control: with drops it is not the one-device dropless layer.
  y1 = jax.jit(_one_device_loss)(x, r.gates, w, r.experts)[1]
  assert not np.allclose(y, y1, atol=1e-3)


def test_bad_expert_parallel_input(problem):
  x, r, w = problem
  mesh = _mesh((2, 4), ("data", "expert"))
  w6 = tuple(a[:6] for a in w)
  r6 = moe.Routing(jnp.minimum(r.experts, 5), r.gates)
  with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by the 'expert' mesh "
                                        r"axis size 4"):
    moe.moe_ffn_expert_parallel(x, r6, *w6, mesh=mesh)
  with pytest.raises(ConfigError, match=r"expert_axis='model' must be a mesh axis"):
    moe.moe_ffn_expert_parallel(x, r, *w, mesh=mesh, expert_axis="model")
  with pytest.raises(ConfigError, match=r"capacity_factor=0 must be > 0"):
    moe.moe_ffn_expert_parallel(x, r, *w, mesh=mesh, capacity_factor=0)
  with pytest.raises(ConfigError, match=r"tokens T=60 are not divisible"):
    moe.moe_ffn_expert_parallel(x[:60], moe.Routing(r.experts[:60], r.gates[:60]), *w,
                                mesh=mesh)
