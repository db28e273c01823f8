"""Every engine runs any model through the one interface; model state stays out of optimizers."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from zojax import models
from zojax.errors import ConfigError
from zojax.train import engines, sharding
from zojax.train.engines import base

REPO = pathlib.Path(__file__).resolve().parents[2]


def _regression_model(with_state: bool = True) -> models.Model:
  """Linear regression with a running mean of the inputs as model state (no block view)."""

  def init(key):
    return {"dense": {"kernel": 0.1 * jax.random.normal(key, (4, 1)), "bias": jnp.zeros((1,))}}

  def loss(params, model_state, batch):
    del model_state
    pred = batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"]
    err = (pred[:, 0] - batch["y"]) ** 2
    sums = {"loss_sum": jnp.sum(err), "count": jnp.float32(err.shape[0])}
    return jnp.mean(err), sums, {"mean_x": jnp.mean(batch["x"], axis=0)}

  fields = {}
  if with_state:
    fields = dict(init_state=lambda key: {"mean_x": jnp.zeros((4,))},
                  update_state=lambda s, aux, step: {"mean_x": 0.5 * s["mean_x"]
                                                     + 0.5 * aux["mean_x"]})
  axes = {"dense": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}}
  return models.Model(name="regression", init=init, axes=axes, loss=loss, **fields)


def _config(optim="adamw", **zo):
  c = common.base_config()
  c.model.init = "random"
  c.optim.name, c.optim.learning_rate = optim, 1e-2
  c.mesh.axes = (("data", 2), ("model", 1))
  c.train.steps = 4
  for k, v in zo.items():
    c.zo[k] = v
  return c


def _batch(step, nan=False):
  x = np.random.default_rng(step).normal(size=(8, 4)).astype(np.float32) + 1.0
  y = x @ np.arange(1.0, 5.0, dtype=np.float32)
  return {"x": np.full_like(x, np.nan) if nan else x, "y": y}


@pytest.mark.parametrize("optim", ["adamw", "zo_sgd"])
def test_model_state_is_updated_after_steps_and_never_optimized(optim):
  config, model = _config(optim), _regression_model()
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  engine = engines.build(config, model, mesh)
  state = engine.init()
  # The optimizer sees params only: no optimizer-state leaf has the model state's shape.
  assert all(np.shape(x) != (4,) for x in jax.tree.leaves(state.opt_state))
  before = jax.device_get(state.params)
  state, out = engine.step(state, jax.device_put(_batch(0), engine.batch_sharding))
  want = 0.5 * np.mean(_batch(0)["x"], axis=0)
  np.testing.assert_allclose(engine.params(state)[1]["mean_x"], want, rtol=1e-6)
  assert not bool(out["skipped"])
  assert not np.array_equal(before["dense"]["kernel"], jax.device_get(state.params)["dense"]["kernel"])

  # A skipped (non-finite) step changes neither params nor model state, and is counted.
  kept = jax.device_get(state)
  state, out = engine.step(state, jax.device_put(_batch(1, nan=True), engine.batch_sharding))
  assert bool(out["skipped"]) and engine.nonfinite(state) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state), kept.model_state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), kept.params)


def test_params_shard_by_the_models_logical_axes():
  config, model = _config(), _regression_model()
  config.mesh.axes = (("data", 4), ("model", 2))
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  state = engines.build(config, model, mesh).init()
  assert state.params["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, None)
  # "mlp" -> "model" in the default rules, but a size-1 dim cannot split: replicated, not an error.
  config.mesh.rules = (("embed", "model"),)
  state = engines.build(config, model, mesh).init()
  assert state.params["dense"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("model", None)


def test_dense_zo_without_block_view_perturbs_the_whole_tree_and_replays(tmp_path):
  config, model = _config("zo_sgd", verify_replay=True), _regression_model(with_state=False)
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  engine = engines.build(config, model, mesh)
  state = engine.init()
  first = jax.device_get(state.params)
  engine.compile(state, jax.device_put(_batch(0), engine.batch_sharding))
  for step in range(3):
    state, _ = engine.step(state, jax.device_put(_batch(step), engine.batch_sharding))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), first, jax.device_get(state.params))
  assert all(jax.tree.leaves(moved)), moved     # every leaf, the bias included, was perturbed
  assert engine.results(state, tmp_path)["replay_bit_identical"] is True


def test_streamed_engine_refuses_a_model_without_block_view():
  config = _config("zo_sgd", engine="stream")
  config.mesh.axes = (("data", 1), ("model", 1))
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  with pytest.raises(ConfigError, match="^config key 'zo.engine'='stream' needs a model with a "
                                        "block view") as e:
    engines.build(config, _regression_model(with_state=False), mesh)
  assert "\n" not in str(e.value)


def test_pretrained_init_needs_published_weights():
  config = _config()
  config.model.init = "pretrained"
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  with pytest.raises(ConfigError, match="'model.init'='pretrained': model 'regression' has no"):
    engines.build(config, _regression_model(), mesh).init()


def test_registry_builds_by_name_and_names_bad_keys():
  c = common.base_config()
  c.model.name, c.model.init = "tiny", "random"
  model = models.build(c.model)
  assert model.name == "tiny" and model.block_view is not None and not model.has_state
  c.model.name = "tinyy"
  with pytest.raises(ConfigError, match="'model.name'='tinyy' is not one of"):
    models.build(c.model)
  c.model.name, c.model.attention = "tiny", "flash"
  with pytest.raises(ConfigError, match="'model.attention'='flash'"):
    models.build(c.model)


def test_train_package_imports_no_specific_model():
  # Negative control built in: the models package itself does import llama.
  def imported(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        yield from (f"{node.module}.{a.name}" for a in node.names)
      elif isinstance(node, ast.Import):
        yield from (a.name for a in node.names)

  specific = ("zojax.models.llama", "zojax.models.smollm2", "zojax.models.flax_adapter")
  offenders = [f"{p.relative_to(REPO)}: {name}" for p in (REPO / "zojax/train").rglob("*.py")
               for name in imported(p) if name.startswith(specific)]
  assert offenders == []
  assert any(name.startswith(specific) for name in imported(REPO / "zojax/models/__init__.py"))
