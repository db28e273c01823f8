"""The training step: non-finite skip, sharded state on an 8-device mesh, optimizer pieces."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import common
from zojax import models
from zojax.models import llama
from zojax.optim import masks
from zojax.train import loop, optimizer, sharding
from zojax.train.engines import base, first_order


def _setup(mesh_axes=(("data", 4), ("model", 2))):
  config = common.base_config()
  config.model.name, config.model.init = "tiny", "random"
  config.mesh.axes = mesh_axes
  model = models.build(config.model)
  tx = optimizer.build(config.optim, total_steps=10)
  mesh = sharding.make_mesh(config.mesh.axes)
  placed = base.PlacedState(config, model, tx, mesh)
  state = placed.init()
  tokens = jax.random.randint(jax.random.key(0), (8, 6), 0, llama.CONFIGS["tiny"].vocab_size)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1)}
  return model, tx, mesh, state, placed.shardings, batch


def test_state_is_sharded_by_logical_rules():
  model, tx, mesh, state, state_sh, _ = _setup()
  assert state.params["blocks"]["w_up"].sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
  assert state.params["blocks"]["attn_norm"].sharding.spec == jax.sharding.PartitionSpec(None, None)
  # Adam moments follow their parameters.
  adam = optax.tree_utils.tree_get(state.opt_state, "ScaleByAdamState")
  assert isinstance(adam, optax.ScaleByAdamState)
  assert adam.mu["blocks"]["w_up"].sharding == state.params["blocks"]["w_up"].sharding
  assert adam.nu["embed"]["tokens"].sharding == state.params["embed"]["tokens"].sharding
  assert len(state.params["blocks"]["w_up"].sharding.device_set) == 8


def test_step_updates_and_nonfinite_skips():
  model, tx, mesh, state, state_sh, batch = _setup()
  step = jax.jit(first_order.make_step(model, tx))
  before = jax.device_get(state)
  state, out = step(state, batch)
  assert not bool(out["skipped"]) and int(state.step) == 1
  assert not np.allclose(before.params["blocks"]["wq"], state.params["blocks"]["wq"])

  good = jax.device_get(state)
  bad_batch = dict(batch)
  poisoned = jax.tree.map(lambda x: x, state)
  poisoned.params["head"]["final_norm"] = jnp.full_like(poisoned.params["head"]["final_norm"], jnp.nan)
  new, out = step(poisoned, bad_batch)
  assert bool(out["skipped"]) and int(base.skipped_steps(new.opt_state)) == 1 and int(new.step) == 2
  # Everything but the poisoned leaf is exactly as before the step.
  np.testing.assert_array_equal(new.params["blocks"]["wq"], good.params["blocks"]["wq"])
  # The optimizer's own state is untouched; only the skip counter (checked above) moved.
  for a, b in zip(jax.tree.leaves(new.opt_state.inner_state),
                  jax.tree.leaves(good.opt_state.inner_state)):
    np.testing.assert_array_equal(a, b)


def test_sharded_step_matches_single_device():
  model, tx, mesh, state8, state_sh, batch = _setup()
  _, _, _, state1, _, _ = _setup(mesh_axes=(("data", 1), ("model", 1)))
  # Same initial values, different placement: jax.device_get sees the same numbers.
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  step = jax.jit(first_order.make_step(model, tx))
  s8, _ = step(state8, jax.device_put(batch, sharding.batch_sharding(mesh)))
  s1, _ = step(state1, batch)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_skips_norms():
  params = llama.init(llama.CONFIGS["tiny"], jax.random.key(0))
  mask = masks.decay_mask(params)
  assert mask["blocks"]["wq"] and mask["embed"]["tokens"]
  assert not mask["blocks"]["attn_norm"] and not mask["head"]["final_norm"]


def test_schedule_shapes():
  cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, warmup_steps=2, schedule="linear"))
  lr = optimizer.schedule(cfg, total_steps=6)
  np.testing.assert_allclose([lr(i) for i in range(7)], [0, 0.5, 1, 0.75, 0.5, 0.25, 0], atol=1e-6)


def test_evaluate_weights_padding_and_reports_perplexity():
  from zojax.data import tasks
  model, tx, mesh, state, state_sh, batch = _setup(mesh_axes=(("data", 1), ("model", 1)))
  cfg = llama.CONFIGS["tiny"]
  rows = np.asarray(jax.random.randint(jax.random.key(5), (5, 7), 0, cfg.vocab_size))
  data = {"tokens": rows[:, :-1], "targets": rows[:, 1:]}
  task = tasks.Task("lm", cfg.vocab_size, None, {"val": data}, {})
  eval_step = loop.make_eval_step(model)
  # Batch size 4 over 5 rows: the second batch is 1 real row + 3 padding rows.
  got = loop.evaluate(eval_step, state.params, state.model_state, task, 4,
                      sharding.batch_sharding(mesh))
  want, _ = llama.loss_fn(cfg, state.params, data)
  np.testing.assert_allclose(got["val/loss"], float(want), rtol=1e-5)
  np.testing.assert_allclose(got["val/perplexity"], np.exp(float(want)), rtol=1e-5)
