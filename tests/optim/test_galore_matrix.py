"""The shared optimizer matrix for the GaLore family and 8-bit Adam: under jit, wrapped in
inject_hyperparams, bf16 params with fp32 states, state sharding kept on an 8-device mesh,
orbax round-trip, optax.MultiSteps accumulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import optim
from zojax.train import sharding

from _optimizer_checks import assert_orbax_round_trip

LR, WD = 0.05, 0.01
GALORE = dict(learning_rate=LR, weight_decay=WD, rank=2, update_proj_gap=2)

# name -> (factory, kwargs); min_8bit_size is lowered so the small test leaves are quantized.
OPTIMIZERS = {
    "galore_adamw": (optim.galore_adamw, GALORE),
    # (The randomized projector and the moment policies are covered in test_galore.py.)
    "galore8bit": (optim.galore8bit, dict(GALORE, min_8bit_size=16, block_size=8)),
    "natural_galore": (optim.natural_galore, dict(GALORE, history=3)),
    "adam8bit": (optim.adam8bit, dict(learning_rate=LR, weight_decay=WD, min_8bit_size=16,
                                      block_size=8)),
}


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
  return {"embed": {"tokens": n(16, 8)},
          "blocks": {"wq": n(2, 8, 16), "attn_norm": n(2, 8)},
          "head": {"final_norm": n(8)}}


def _grads(step, dtype=jnp.float32):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), dtype), _params())


@functools.cache
def _tx(name, inject=False):
  factory, kwargs = OPTIMIZERS[name]
  if inject:
    factory = optax.inject_hyperparams(factory, static_args=optim.static_args(factory))
  return factory(**kwargs)


@functools.cache
def _apply(name, inject=False):
  tx = _tx(name, inject)

  @jax.jit
  def apply(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return apply


# Natural GaLore's Woodbury solve (damping 1e-3) amplifies float32 round-off.
TOL = {"natural_galore": dict(rtol=1e-4, atol=1e-4)}


def _run(name, params, steps=3, inject=False, dtype=jnp.float32):
  state = _tx(name, inject).init(params)
  for t in range(steps):
    params, state = _apply(name, inject)(params, state, _grads(t, dtype))
  return params, state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inject_hyperparams(name):
  p_plain, _ = _run(name, _params())
  p_inj, s_inj = _run(name, _params(), inject=True)
  for a, b in zip(jax.tree.leaves(p_inj), jax.tree.leaves(p_plain)):
    np.testing.assert_allclose(a, b, **TOL.get(name, dict(rtol=1e-4, atol=1e-5)))
  assert not np.allclose(p_inj["blocks"]["wq"], _params()["blocks"]["wq"])
  # The learning rate lives in the state: set to zero, nothing moves.
  s_inj.hyperparams["learning_rate"] = jnp.zeros_like(s_inj.hyperparams["learning_rate"])
  p_zero, _ = _apply(name, inject=True)(p_inj, s_inj, _grads(7))
  for a, b in zip(jax.tree.leaves(p_zero), jax.tree.leaves(p_inj)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_params_keep_their_dtype_with_fp32_state(name):
  params = _params(jnp.bfloat16)
  state = _tx(name).init(params)
  new_params, new_state = _apply(name)(params, state, _grads(0, jnp.bfloat16))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new_params))
  dtypes = {x.dtype for x in jax.tree.leaves(new_state)}
  assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32), jnp.dtype(jnp.uint8)}, dtypes
  assert [x.dtype for x in jax.tree.leaves(new_state)] == [x.dtype for x in jax.tree.leaves(state)]
  assert not np.array_equal(np.asarray(new_params["blocks"]["wq"], np.float32),
                            np.asarray(params["blocks"]["wq"], np.float32))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_sharding_is_kept_on_an_8_device_mesh(name):
  """State placed as the train loop places it keeps its shardings through a jitted update
  given none; low-rank state is split along the param axis it keeps."""
  tx = _tx(name)
  mesh = sharding.make_mesh([("data", 1), ("model", 8)])
  spec = lambda a: P(*([None] * (a.ndim - 1)), "model") if a.shape[-1] % 8 == 0 else P()
  params_sh = jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), _params())
  params = jax.device_put(_params(), params_sh)
  shapes = jax.eval_shape(tx.init, params)
  state_sh = sharding.optimizer_state_shardings(tx, shapes, params_sh, mesh,
                                                param_shapes=jax.eval_shape(lambda: _params()))
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  grads = jax.device_put(_grads(0), params_sh)
  if name == "adam8bit":
    # Blocks of the row-major flattened moment cross the shards of a small leaf, so XLA
    # cannot keep the codes split by itself; the train loop pins them with out_shardings.
    apply = jax.jit(_apply(name), out_shardings=(params_sh, state_sh))
  else:
    apply = _apply(name)
  new_params, new_state = apply(params, state, grads)
  for p_old, p_new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    assert p_new.sharding.is_equivalent_to(p_old.sharding, p_old.ndim)
  for want, got in zip(jax.tree.leaves(state_sh), jax.tree.leaves(new_state)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.shape, got.sharding, want)
  # wq [2, 8, 16] is split on n = 16; what keeps n keeps the split: std's [2, r, 16] moments,
  # 8-bit Adam's param-shaped codes.
  split = [s for s in jax.tree.leaves(state_sh) if s.spec == P(None, None, "model")]
  assert len(split) >= 2, state_sh


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_orbax_round_trip(name, tmp_path):
  _, state = _run(name, _params(), steps=1, inject=True)
  assert_orbax_round_trip(state, tmp_path)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multisteps_accumulation(name):
  """optax.MultiSteps(every_k=2) over g0, g1 moves like one step on their mean."""
  tx = _tx(name)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  params = _params()
  state = multi.init(params)
  update = jax.jit(multi.update)
  u0, state = update(_grads(0), state, params)
  assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u0))
  u1, state = update(_grads(1), state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
  ref, _ = jax.jit(tx.update)(mean, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, **TOL.get(name, dict(rtol=1e-5, atol=1e-6)))
