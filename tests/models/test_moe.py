"""The MoE decoder (zojax.models.moe): dispatch forms agree, the bias moves from the loads of the
batch just routed, global counts (with a shard-local negative control), expert parallelism,
non-finite steps, bad config values."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import models, moe as moe_lib
from zojax.optim import skip
from zojax.errors import ConfigError
from zojax.models import moe, protocol
from zojax.train.engines import base, first_order

B, T = 4, 16


def _config(**fields):
  return moe.CONFIGS["moe-tiny"].__class__(
      **{**{f: getattr(moe.CONFIGS["moe-tiny"], f) for f in ("base", "num_experts", "top_k",
                                                                "expert_dim")}, **fields})


def _batch(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (batch, T + 1)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


@pytest.fixture(scope="module")
def tiny():
  config = _config(balance=moe_lib.BalanceConfig(rule="sign", u=1e-2))
  model = moe.model(config, name="moe-tiny")
  params = model.init(jax.random.key(0))
  state = model.init_state(jax.random.key(0))
  # A non-zero bias, so the selection differs from the plain top-k.
  state = {"bias": 0.05 * jax.random.normal(jax.random.key(1), state["bias"].shape),
           "prev_bias": state["prev_bias"]}
  return config, model, params, state


def test_dispatch_forms_agree_at_model_level(tiny):
  config, _, params, state = tiny
  batch = _batch()
  out = {}
  for method, cf in (("dropless", 1.0), ("dense", 1.0), ("capacity", 8.0)):
    m = moe.model(_config(dispatch=method, capacity_factor=cf, balance=config.balance),
                  name="moe-tiny")
    loss, metrics, _ = jax.jit(m.loss)(params, state, batch)
    out[method] = (float(loss), np.asarray(metrics["moe_loads"]), float(metrics["moe_dropped"].sum()))
  np.testing.assert_allclose(out["dense"][0], out["dropless"][0], rtol=1e-5)
  np.testing.assert_allclose(out["capacity"][0], out["dropless"][0], rtol=1e-5)
  np.testing.assert_array_equal(out["capacity"][1], out["dropless"][1])
  assert out["capacity"][2] == 0
  # Negative control: a capacity below the largest load drops tokens and changes the loss.
  m = moe.model(_config(dispatch="capacity", capacity_factor=0.25, balance=config.balance),
                name="moe-tiny")
  loss, metrics, _ = jax.jit(m.loss)(params, state, batch)
  assert float(metrics["moe_dropped"].sum()) > 0
  assert abs(float(loss) - out["dropless"][0]) > 1e-6


def test_loads_count_valid_tokens_per_layer(tiny):
  config, model, params, state = tiny
  batch = _batch()
  _, metrics, aux = jax.jit(model.loss)(params, state, batch)
  loads = np.asarray(metrics["moe_loads"])
  assert loads.shape == (config.base.num_layers, config.num_experts)
  np.testing.assert_array_equal(loads.sum(-1), B * T * config.top_k)
  # Padding tokens (weights 0) do not count.
  weights = np.ones((B, T), np.float32)
  weights[:, T // 2:] = 0
  _, masked, _ = jax.jit(model.loss)(params, state, {**batch, "weights": jnp.asarray(weights)})
  np.testing.assert_array_equal(np.asarray(masked["moe_loads"]).sum(-1),
                                B * T // 2 * config.top_k)
  assert aux is metrics or set(aux) == set(metrics)


def test_bias_update_uses_the_batch_just_routed(tiny):
  """The step routes with the old bias; the new bias is the rule applied to that batch's loads."""
  config, model, params, state = tiny
  batch = _batch(1)
  _, metrics, _ = jax.jit(model.loss)(params, state, batch)
  expected = moe_lib.update_bias(state["bias"], metrics["moe_loads"], 0, config.balance)
  tx = skip.skip_nonfinite(optax.sgd(0.0))
  train_state = base.TrainState(step=jnp.int32(0), params=params, model_state=state,
                                opt_state=tx.init(params), rng=jax.random.key(0))
  new, out = jax.jit(first_order.make_step(model, tx))(train_state, batch)
  np.testing.assert_array_equal(np.asarray(new.model_state["bias"]), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(new.model_state["prev_bias"]),
                                np.asarray(state["bias"]))
  assert not np.array_equal(np.asarray(expected), np.asarray(state["bias"]))
  # The logged per-layer numbers come from the same loads.
  np.testing.assert_array_equal(np.asarray(out["moe/loads"]), np.asarray(metrics["moe_loads"]))
  assert out["moe/max_vio_batch"].shape == (config.base.num_layers,)


def test_nonfinite_step_leaves_bias_untouched(tiny):
  config, model, params, state = tiny
  bad = jax.tree.map(lambda x: x, params)
  bad["embed"]["tokens"] = bad["embed"]["tokens"].at[0].set(jnp.nan)
  batch = _batch(2)
  batch["tokens"] = batch["tokens"].at[0, 0].set(0)
  tx = skip.skip_nonfinite(optax.sgd(1e-2))
  train_state = base.TrainState(step=jnp.int32(0), params=bad, model_state=state,
                                opt_state=tx.init(bad), rng=jax.random.key(0))
  new, out = jax.jit(first_order.make_step(model, tx))(train_state, batch)
  assert bool(out["skipped"])
  np.testing.assert_array_equal(np.asarray(new.model_state["bias"]), np.asarray(state["bias"]))


def test_global_counts_on_8_devices_and_local_count_negative_control(tiny):
  """The sharded step's bias update equals one device's; the HLO all-reduces the loads.

  Negative control: counting loads shard-locally (what MaxText does) and updating from one
  shard's counts gives a different bias.
  """
  config, model, params, state = tiny
  batch = _batch(3, batch=8)
  tx = skip.skip_nonfinite(optax.sgd(0.0))
  ts = base.TrainState(step=jnp.int32(0), params=params, model_state=state,
                       opt_state=tx.init(params), rng=jax.random.key(0))
  step = first_order.make_step(model, tx)
  one, _ = jax.jit(step)(ts, batch)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  compiled = jax.jit(step).lower(ts, sharded).compile()
  many, _ = compiled(ts, sharded)
  np.testing.assert_allclose(np.asarray(many.model_state["bias"]),
                             np.asarray(one.model_state["bias"]), atol=1e-7)
  assert "all-reduce" in compiled.as_text()

  local_loads = lambda b: model.loss(params, state, b)[1]["moe_loads"][None]
  local = jax.jit(jax.shard_map(local_loads, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                check_vma=False))(sharded)
  shard0 = np.asarray(local)[0]
  wrong = moe_lib.update_bias(state["bias"], jnp.asarray(shard0), 0, config.balance)
  assert not np.allclose(np.asarray(wrong), np.asarray(one.model_state["bias"]), atol=1e-7)


def test_expert_parallel_equals_one_device(tiny):
  config, _, params, state = tiny
  batch = _batch(4, batch=8)
  dense = moe.model(_config(balance=config.balance), name="moe-tiny")
  ep = moe.model(_config(balance=config.balance, expert_parallel=True, capacity_factor=4.0),
                 name="moe-tiny")
  want, want_m, _ = jax.jit(dense.loss)(params, state, batch)
  mesh = jax.make_mesh((2, 4), ("data", "expert"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    lowered = jax.jit(ep.loss).lower(params, state, batch)
    compiled = lowered.compile()
    got, got_m, _ = compiled(params, state, batch)
  np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(got_m["moe_loads"]), np.asarray(want_m["moe_loads"]))
  assert "all-to-all" in compiled.as_text()


@pytest.mark.parametrize("field,value,match", [
    ("top_k", 9, "model.top_k"),
    ("capacity_factor", 0.0, "model.capacity_factor"),
    ("balance.u", -1e-3, "u"),
    ("balance.rule", "magic", "rule"),
])
def test_bad_config_values_name_the_field(field, value, match):
  cfg = ml_collections.ConfigDict({"name": "moe-tiny", "init": "random",
                                   "balance": {"rule": "sign", "u": 1e-3}})
  if field.startswith("balance."):
    cfg.balance[field.split(".")[1]] = value
  else:
    cfg[field] = value
  with pytest.raises(ConfigError, match=match) as err:
    models.build(cfg, None)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("opt", ["galore_adamw", "zo_sgd"])
def test_trains_through_the_loop_with_other_optimizers(opt, tmp_path):
  """The MoE composes: GaLore projects the stacked [L, E, D, F] experts per (layer, expert);
  under dense ZO the bias moves from the loads of the θ + εz_0 forward (no extra forward)."""
  from zojax.train import config as config_lib, loop
  config = config_lib.load(f"configs/moe_lm.py:tiny,opt={opt},rule=sign,u=0.01")
  config.train.progress = False
  config.train.eval_at_start = False
  results = loop.train(config, tmp_path)
  assert results["nonfinite_steps"] == 0
  records = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "train/moe/bias" in r]
  assert len(records) == config.train.steps
  first, last = np.asarray(records[0]["train/moe/bias"]), np.asarray(records[-1]["train/moe/bias"])
  assert np.abs(first).max() > 0 and not np.array_equal(first, last)
  assert np.isfinite(results["final_eval"]["validation/max_vio_global"])


@pytest.mark.slow
def test_streamed_engine_carries_the_bias_like_the_dense_engine(tiny):
  """ZO2 streaming with model state: the first step's loss and new bias equal the dense
  estimate's (same z, same + branch loads); the bias lives in the stream state."""
  from zojax import optim, zo
  from zojax.zo import stream
  config, model, params, state = tiny
  batch = _batch(5)
  loss, zograd, aux = jax.jit(lambda p, s, b: zo.spsa(
      model.block_view(s), p, b, jax.random.key(7), step=0, eps=1e-3,
      with_metrics=True))(params, state, batch)
  want_bias = moe_lib.update_bias(state["bias"], aux["moe_loads"], 0, config.balance)
  engine = stream.StreamEngine(model.block_view(state), optim.zo_sgd(1e-4), eps=1e-3,
                               block_view=model.block_view, update_state=model.update_state)
  s0 = engine.init(params, jax.random.key(7), state)
  s1, out = engine.step(s0, batch)
  np.testing.assert_array_equal(np.asarray(out["loss"]), np.asarray(loss))
  np.testing.assert_array_equal(np.asarray(out["zograd"].coeffs), np.asarray(zograd.coeffs))
  np.testing.assert_array_equal(np.asarray(s1.model_state["bias"]), np.asarray(want_bias))
  assert not np.array_equal(np.asarray(want_bias), np.asarray(state["bias"]))
