"""from_flax: an nnx.Module as a zojax Model (params / model state / axes, modes, purity), the
registered nnx-cnn on the synthetic oriented-bars task, and both trained through the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from zojax import models
from zojax.data import batching, synthetic, tasks
from zojax.errors import ConfigError
from zojax.models import nnx_examples
from zojax.train import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "configs/flax_classifier.py:tiny"


class Counter(nnx.Variable):
  """A custom non-param variable: model state like BatchStat."""


class Toy(nnx.Module):
  """Every kind of variable the adapter sorts: tagged and untagged Params, BatchStats, a
  custom Variable, RNG state (Dropout), and a list of submodules."""

  def __init__(self, rngs: nnx.Rngs):
    self.mlp = nnx.Linear(3, 8, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=rngs)
    self.plain = nnx.Param(jnp.ones((8, 2)))           # no metadata: axes (None, None)
    self.batch_norm = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.calls = Counter(jnp.zeros((), jnp.int32))
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs) for _ in range(2)])

  def __call__(self, x_BxD):
    self.calls[...] += 1
    h = self.batch_norm(self.mlp(x_BxD)) @ self.plain
    for layer in self.layers:
      h = layer(h)
    return h


def toy_loss(module, batch):
  err_B = jnp.sum((module(batch["x"]) - 1.0) ** 2, axis=-1)
  w_B = batch.get("weight", jnp.ones_like(err_B))
  loss_sum, count = jnp.sum(w_B * err_B), jnp.sum(w_B)
  return loss_sum / count, {"loss_sum": loss_sum, "count": count}


def toy_batch(n=6, seed=0):
  return {"x": jax.random.normal(jax.random.key(seed), (n, 3)) * 2.0 + 1.0}


def direct_toy(key):
  """The module itself; logical axis names need eager sharding off outside a mesh."""
  with nnx.use_eager_sharding(False):
    return Toy(nnx.Rngs(key))


@pytest.fixture(scope="module")
def toy():
  return models.from_flax(Toy, toy_loss, name="toy")


def _paths(tree):
  return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def test_params_state_and_axes_are_split_by_variable_type(toy):
  params, state = toy.init(jax.random.key(0)), toy.init_state(jax.random.key(0))
  assert _paths(params) == sorted([
      "['batch_norm']['bias']", "['batch_norm']['scale']", "['layers']['0']['bias']",
      "['layers']['0']['kernel']", "['layers']['1']['bias']", "['layers']['1']['kernel']",
      "['mlp']['bias']", "['mlp']['kernel']", "['plain']"])
  # BatchStats and the custom variable are model state; RNG state is in neither tree.
  assert _paths(state) == ["['batch_norm']['mean']", "['batch_norm']['var']", "['calls']"]
  assert not any("rng" in p or "drop" in p for p in _paths(params) + _paths(state))
  assert toy.axes["mlp"]["kernel"] == ("embed", "mlp")
  assert toy.axes["plain"] == (None, None)            # no metadata: all-None, not dropped
  assert toy.axes["layers"]["0"]["kernel"] == (None, None)
  assert jax.tree.structure(toy.axes, is_leaf=lambda x: isinstance(x, tuple)) == \
      jax.tree.structure(params)
  assert toy.update_state is not None and toy.has_state
  assert toy.info["model_state"] == ["batch_norm/mean", "batch_norm/var", "calls"]
  assert toy.info["num_params"] == sum(x.size for x in jax.tree.leaves(params))


def test_init_draws_from_the_key(toy):
  a, b = toy.init(jax.random.key(0)), toy.init(jax.random.key(1))
  direct = nnx.state(direct_toy(jax.random.key(0)), nnx.Param)
  np.testing.assert_array_equal(a["mlp"]["kernel"], direct["mlp"]["kernel"].get_value())
  assert not np.array_equal(a["mlp"]["kernel"], b["mlp"]["kernel"])


def test_stateless_module_has_no_update_state():
  model = models.from_flax(lambda rngs: nnx.Linear(3, 2, rngs=rngs), toy_loss)
  assert model.init_state(jax.random.key(0)) == {} and model.update_state is None
  assert model.axes == {"bias": (None,), "kernel": (None, None)}


def test_bad_axis_metadata_names_the_param():
  class Bad(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jnp.ones((2, 3)), out_sharding=("embed",), eager_sharding=False)
  with pytest.raises(ValueError, match="Param w of rank 2"):
    models.from_flax(Bad, toy_loss)


def test_loss_matches_the_module_called_directly(toy):
  key, batch = jax.random.key(3), toy_batch()
  params, state = toy.init(key), toy.init_state(key)
  value, metrics, aux = toy.loss(params, state, batch)

  module = direct_toy(key)
  module.train()
  want, want_metrics = toy_loss(module, batch)
  np.testing.assert_array_equal(value, want)
  np.testing.assert_array_equal(metrics["loss_sum"], want_metrics["loss_sum"])
  # aux is the state the module's own call left behind.
  np.testing.assert_array_equal(aux["batch_norm"]["mean"], module.batch_norm.mean.get_value())
  np.testing.assert_array_equal(aux["calls"], module.calls.get_value())


def test_update_state_installs_a_training_forwards_statistics(toy):
  params, state = toy.init(jax.random.key(0)), toy.init_state(jax.random.key(0))
  _, _, aux = toy.loss(params, state, toy_batch())
  new = toy.update_state(state, aux, 0)
  assert not np.allclose(new["batch_norm"]["mean"], state["batch_norm"]["mean"])
  assert int(new["calls"]) == int(state["calls"]) + 1
  # The stats feed the next forward: eval mode normalizes with them.
  eval_batch = {**toy_batch(seed=1), "weight": np.ones(6, np.float32)}
  assert toy.loss(params, state, eval_batch)[0] != toy.loss(params, new, eval_batch)[0]
  with pytest.raises(ValueError, match="structure"):
    toy.update_state(state, {"batch_norm": aux["batch_norm"]}, 0)


def test_eval_batches_run_in_eval_mode_and_honour_weight(toy):
  params, state = toy.init(jax.random.key(0)), toy.init_state(jax.random.key(0))
  batch = toy_batch()
  weight = np.array([1, 1, 1, 1, 0, 0], np.float32)
  garbage = {"x": batch["x"].at[4:].set(1e3)}        # different padding rows
  a = toy.loss(params, state, {**batch, "weight": weight})
  b = toy.loss(params, state, {**garbage, "weight": weight})
  np.testing.assert_array_equal(a[0], b[0])          # padding cannot reach real rows
  assert jax.tree.all(jax.tree.map(np.array_equal, a[2], state))  # eval leaves state alone
  # Negative control: in training mode (no weight) BatchNorm mixes rows, so they would.
  assert toy.loss(params, state, batch)[0] != toy.loss(params, state, garbage)[0]


def test_optimizer_sees_params_only(toy):
  params, state = toy.init(jax.random.key(0)), toy.init_state(jax.random.key(0))
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, state, opt_state, batch):
    (loss, (_, aux)), grads = jax.value_and_grad(
        lambda p: (lambda v, m, a: (v, (m, a)))(*toy.loss(p, state, batch)), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), toy.update_state(state, aux, 0), opt_state, loss

  for t in range(3):
    params, state, opt_state, _ = step(params, state, opt_state, toy_batch(seed=t))
  opt_paths = _paths(opt_state)
  assert any("['mlp']['kernel']" in p for p in opt_paths)   # moments per param ...
  assert not any("mean" in p or "var']" in p or "calls" in p for p in opt_paths)  # ... only
  assert int(state["calls"]) == 3


def test_jit_matches_eager_and_rng_is_fixed(toy):
  params, state = toy.init(jax.random.key(0)), toy.init_state(jax.random.key(0))
  batch = toy_batch()
  eager = toy.loss(params, state, batch)
  jitted = jax.jit(toy.loss)(params, state, batch)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  # A pure function: the same call twice is the same value (no hidden RNG advance).
  np.testing.assert_array_equal(jax.jit(toy.loss)(params, state, batch)[0], jitted[0])
  assert jax.jit(toy.init)(jax.random.key(0))["mlp"]["kernel"].shape == (3, 8)


def test_dropout_draws_a_fixed_mask_from_rng_seed():
  class Drop(nnx.Module):
    def __init__(self, rngs):
      self.mlp = nnx.Linear(3, 64, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.drop(self.mlp(x))

  model = models.from_flax(Drop, toy_loss)
  params, batch = model.init(jax.random.key(0)), toy_batch()
  assert model.init_state(jax.random.key(0)) == {}   # RNG state is not model state
  train = jax.jit(model.loss)(params, {}, batch)[0]
  np.testing.assert_array_equal(train, jax.jit(model.loss)(params, {}, batch)[0])
  np.testing.assert_allclose(train, model.loss(params, {}, batch)[0], rtol=1e-6)
  # Not vacuous: dropout is active in training mode (eval mode differs), and the mask
  # depends on rng_seed.
  eval_batch = {**batch, "weight": np.ones(6, np.float32)}
  assert train != model.loss(params, {}, eval_batch)[0]
  assert train != models.from_flax(Drop, toy_loss, rng_seed=1).loss(params, {}, batch)[0]


# ---------------------------------------------------------------------------------------
# The synthetic task and the registered network


def test_oriented_bars_is_a_pure_function_of_seed_and_stream():
  a = synthetic.oriented_bars(64, seed=0, stream=0)
  np.testing.assert_array_equal(a["image"], synthetic.oriented_bars(64, seed=0, stream=0)["image"])
  assert not np.array_equal(a["image"], synthetic.oriented_bars(64, seed=0, stream=1)["image"])
  assert a["image"].shape == (64, 8, 8, 1) and a["image"].dtype == np.float32
  assert np.bincount(a["label"]).tolist() == [16] * 4
  clean = synthetic.oriented_bars(8, noise=0.0, bar_length=3, seed=1)
  for image, label in zip(clean["image"][..., 0], clean["label"]):
    ys, xs = np.nonzero(image)
    assert len(ys) == 3 and tuple(np.sign([np.ptp(ys), np.ptp(xs)])) in {
        0: [(0, 1)], 1: [(1, 0)], 2: [(1, 1)], 3: [(1, 1)]}[int(label)]
    if label >= 2:   # diagonal vs anti-diagonal: x rises or falls with y
      assert np.sign(np.corrcoef(ys, xs)[0, 1]) == (1 if label == 2 else -1)
  with pytest.raises(ValueError, match="bar_length"):
    synthetic.oriented_bars(4, bar_length=4)


@pytest.fixture(scope="module")
def tiny_config():
  return config_lib.load(TINY)


def test_task_batches_are_a_function_of_the_step(tiny_config):
  task = tasks.build(tiny_config.task, batch_size=16, seed=0)
  assert task.vocab_size == 0 and task.info["num_classes"] == 4
  assert set(task.eval_sets) == {"validation", "test"}
  np.testing.assert_array_equal(task.train_batch(5)["image"], task.train_batch(5)["image"])
  assert not np.array_equal(task.train_batch(5)["image"], task.train_batch(6)["image"])
  assert task.train_batch(0)["image"].shape == (16, 8, 8, 1)


def test_registered_cnn_trains_and_galore_projects_the_mlp(tiny_config):
  from zojax.optim import GaLoreDimensionNumbers, path_dimension_numbers  # noqa: PLC0415
  task = tasks.build(tiny_config.task, batch_size=32, seed=0)
  model = models.build(tiny_config.model, task)
  params, state = model.init(jax.random.key(0)), model.init_state(jax.random.key(0))
  assert set(state) == {"batch_norm"} and "batch_norm" in params
  plan = jax.tree_util.tree_flatten_with_path(
      path_dimension_numbers()(params),
      is_leaf=lambda x: x is None or isinstance(x, GaLoreDimensionNumbers))[0]
  assert sorted(jax.tree_util.keystr(p) for p, dims in plan if dims is not None) == [
      "['mlp']['down']['kernel']", "['mlp']['up']['kernel']"]

  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, state, opt_state, batch):
    grad_fn = jax.value_and_grad(lambda p: model.loss(p, state, batch)[::2], has_aux=True)
    (loss, aux), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model.update_state(state, aux, 0), opt_state, loss

  losses = []
  for t in range(30):
    params, state, opt_state, loss = step(params, state, opt_state, task.train_batch(t))
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
  sums = [model.loss(params, state, b)[1] for b in batching.eval_batches(task.eval_sets["test"], 48)]
  assert sum(float(s["count"]) for s in sums) == 64   # padding rows weigh 0


def test_factory_errors_name_the_key(tiny_config):
  task = tasks.build(tiny_config.task, batch_size=16, seed=0)
  cfg = tiny_config.model.copy_and_resolve_references()
  cfg.channels = 0
  with pytest.raises(ConfigError, match="'model.channels'=0"):
    models.build(cfg, task)
  with pytest.raises(ConfigError, match="classification task"):
    models.build(tiny_config.model, task._replace(info={}))
  assert nnx_examples.SmallCNN.__name__ in models.build(tiny_config.model, task).info["module"]


# ---------------------------------------------------------------------------------------
# End to end through the CLI: each optimizer, halted and resumed == straight


N = 4   # steps before the halt; 2N in all


def _run(workdir, opt, *overrides):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "zojax.run", "--config", f"{TINY},opt={opt}", "--workdir",
         str(workdir), f"train.steps={2 * N}", f"train.checkpoint_every={N}",
         "train.progress=False", *overrides]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                            / "state")


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["adamw", "zo_sgd"])
def test_cli_trains_and_resumes_bit_identically(tmp_path, opt):
  """Three CLI processes; zo_sgd takes ~115 s on 2 cores because each process compiles the
  whole-tree SPSA estimate (~30 s: a threefry draw per leaf), which only a process can test.
  One first-order optimizer is enough here: the engine and checkpoint are the same for all
  of them, and tests/train/test_resume.py resumes every GaLore variant through the CLI."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  summary = _run(straight, opt)
  _run(resumed, opt, f"train.halt_at_step={N}")
  _run(resumed, opt)

  a, b = _state(straight, 2 * N), _state(resumed, 2 * N)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Not vacuous: params and the BatchNorm statistics both moved between the checkpoints.
  halfway = _state(resumed, N)
  for tree, path in (("params", ("conv1", "kernel")), ("model_state", ("batch_norm", "mean"))):
    before, after = halfway[tree], b[tree]
    for key in path:
      before, after = before[key], after[key]
    assert not np.array_equal(np.asarray(before), np.asarray(after)), (tree, path)
  results = json.loads((straight / "results.json").read_text())
  assert results["model"]["module"] == "SmallCNN" and results["task"]["name"] == "oriented_bars"
  assert 0.0 <= summary["final_eval"]["test/accuracy"] <= 1.0
