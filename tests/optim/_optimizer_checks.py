"""Checks shared by the optimizer test matrices (ZO and GaLore families)."""

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp


def assert_orbax_round_trip(state, path):
  """Saves `state` with orbax and restores it: same structure, dtypes and values."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "state", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(path / "state",
                             jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  chex.assert_trees_all_equal_structs(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  chex.assert_trees_all_equal(restored, state)


def run_jitted(tx, params, grads):
  """`tx` as optax's tests run it: a jitted init, then one jitted update per gradient tree.

  Returns:
    (params, state, states): after the last update, and the state after each update.
  """
  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state, states = jax.jit(tx.init)(params), []
  for g in grads:
    params, state = step(params, state, g)
    states.append(state)
  return params, state, states


def assert_inject_hyperparams_idiom(factory, kwargs, params, grads, hyperparams, **tol):
  """`optax.inject_hyperparams(factory)(**kwargs)` exactly as a user writes it (no static_args).

  Init and two jitted updates. The state logs exactly the numeric `hyperparams` (structural
  settings must not be traced), the learning rate as `kwargs["learning_rate"]` schedules it
  step by step, and the params move as under `factory(**kwargs)`.
  """
  injected = optax.inject_hyperparams(factory)(**kwargs)
  p_inj, state, states = run_jitted(injected, params, grads[:2])
  assert set(state.hyperparams) == set(hyperparams), sorted(state.hyperparams)
  chex.assert_tree_all_finite(p_inj)
  schedule = kwargs["learning_rate"]
  for t, s in enumerate(states):  # the rate each update used
    chex.assert_trees_all_close(s.hyperparams["learning_rate"], schedule(t), rtol=1e-6)
  p_plain, _, _ = run_jitted(factory(**kwargs), params, grads[:2])
  chex.assert_trees_all_close(p_inj, p_plain, **tol)
  # A run that leaves the params where they were would pass the comparison vacuously.
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), p_inj, params)
  assert any(jax.tree.leaves(moved)), "no parameter moved"
