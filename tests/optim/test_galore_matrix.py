"""The shared optimizer matrix for the GaLore family and 8-bit Adam: jitted, under
optax.inject_hyperparams exactly as a user writes it, bf16 params with fp32 states, state
sharding kept on an 8-device mesh, orbax round-trip, optax.MultiSteps accumulation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import optim
from zojax.train import sharding

from _optimizer_checks import assert_inject_hyperparams_idiom, assert_orbax_round_trip, run_jitted

LR, WD = 0.05, 0.01
# min_8bit_size is lowered so the small test leaves are quantized. The mask is a callable:
# as a plain argument, inject_hyperparams would take it for a schedule.
SETTINGS = optim.GaLoreSettings(rank=2, update_proj_gap=2, mask=optim.decay_mask,
                                block_size=8, min_8bit_size=16, history=3)
GALORE = dict(learning_rate=LR, weight_decay=WD, settings=SETTINGS)
ADAM = ("learning_rate", "b1", "b2", "eps", "weight_decay")

# name -> (factory, kwargs, the numeric hyperparameters inject_hyperparams traces).
# (The randomized projector and the moment policies are covered in test_galore.py.)
OPTIMIZERS = {
    "galore_adamw": (optim.galore_adamw, GALORE, ADAM + ("scale",)),
    "galore8bit": (optim.galore8bit, GALORE, ADAM + ("scale",)),
    "natural_galore": (optim.natural_galore, GALORE, ADAM + ("scale", "damping")),
    "adam8bit": (optim.adam8bit, dict(learning_rate=LR, weight_decay=WD, settings=optim.
                                      Adam8bitSettings(block_size=8, min_8bit_size=16,
                                                       mask=optim.decay_mask)), ADAM),
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
def _tx(name):
  factory, kwargs, _ = OPTIMIZERS[name]
  return factory(**kwargs)


@functools.cache
def _apply(name):
  tx = _tx(name)

  @jax.jit
  def apply(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return apply


# Natural GaLore's Woodbury solve (damping 1e-3) amplifies float32 round-off.
TOL = {"natural_galore": dict(rtol=1e-4, atol=1e-4)}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inject_hyperparams_as_optax_users_write_it(name):
  factory, kwargs, hyperparams = OPTIMIZERS[name]
  kwargs = dict(kwargs, learning_rate=optax.linear_schedule(LR, LR / 4, 2))
  assert_inject_hyperparams_idiom(factory, kwargs, _params(), [_grads(0), _grads(1)],
                                  hyperparams, **TOL.get(name, dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_injected_numbers_are_live_and_the_mask_is_kept(name):
  """The injected learning rate is read from the state (zero: nothing moves), and with zero
  gradients only weight decay moves the params: the masked-out norms stay."""
  factory, kwargs, _ = OPTIMIZERS[name]
  tx = optax.inject_hyperparams(factory)(**kwargs)
  params = _params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  decayed, state, _ = run_jitted(tx, params, [zeros])
  chex.assert_trees_all_close(decayed["blocks"]["attn_norm"], params["blocks"]["attn_norm"])
  chex.assert_trees_all_close(decayed["head"]["final_norm"], params["head"]["final_norm"])
  chex.assert_trees_all_close(decayed["blocks"]["wq"], (1 - LR * WD) * params["blocks"]["wq"],
                              rtol=1e-6)
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  updates, _ = jax.jit(tx.update)(_grads(7), state, decayed)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_params_keep_their_dtype_with_fp32_state(name):
  params = _params(jnp.bfloat16)
  state = jax.jit(_tx(name).init)(params)
  new_params, new_state = _apply(name)(params, state, _grads(0, jnp.bfloat16))
  chex.assert_trees_all_equal_dtypes(new_params, params)
  dtypes = {x.dtype for x in jax.tree.leaves(new_state)}
  assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32), jnp.dtype(jnp.uint8)}, dtypes
  chex.assert_trees_all_equal_dtypes(new_state, state)
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
  if name in ("adam8bit", "galore8bit"):
    # Blocks of the row-major flattened moment cross the shards of a small leaf, so XLA
    # cannot keep the codes split by itself; the train loop pins them with out_shardings.
    # (galore8bit: on CPU the refresh is a sequential lax.map, whose projector output XLA
    # then leaves replicated next to the 8-bit codes.)
    apply = jax.jit(_apply(name), out_shardings=(params_sh, state_sh))
  else:
    apply = _apply(name)
  new_params, new_state = apply(params, state, grads)
  for p_old, p_new in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
    assert p_new.sharding.is_equivalent_to(p_old.sharding, p_old.ndim)
  for want, got in zip(jax.tree.leaves(state_sh), jax.tree.leaves(new_state)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.shape, got.sharding, want)
  # wq [2, 8, 16] is split on n = 16; what keeps n keeps the split: std's [2, r, 16] moments
  # and Q projectors, 8-bit Adam's param-shaped codes.
  split = [s for s in jax.tree.leaves(state_sh) if s.spec == P(None, None, "model")]
  assert len(split) >= 2, state_sh


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_orbax_round_trip(name, tmp_path):
  factory, kwargs, _ = OPTIMIZERS[name]
  _, state, _ = run_jitted(optax.inject_hyperparams(factory)(**kwargs), _params(), [_grads(0)])
  assert_orbax_round_trip(state, tmp_path)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_multisteps_accumulation(name):
  """optax.MultiSteps(every_k=2) over g0, g1 moves like one step on their mean."""
  tx = _tx(name)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  params = _params()
  state = jax.jit(multi.init)(params)
  update = jax.jit(multi.update)
  u0, state = update(_grads(0), state, params)
  chex.assert_trees_all_equal(u0, jax.tree.map(jnp.zeros_like, u0))
  u1, state = update(_grads(1), state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
  ref, _ = jax.jit(tx.update)(mean, jax.jit(tx.init)(params), params)
  chex.assert_trees_all_close(u1, ref, **TOL.get(name, dict(rtol=1e-5, atol=1e-6)))
