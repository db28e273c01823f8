"""ZO2 streaming: bit-exact with the dense engine, never stale, O(1) device memory in depth."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zojax import optim, zo
from zojax.models import llama
from zojax.train import memory
from zojax.zo import inspect, parallel, stream

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
CFG = llama.CONFIGS["tiny"]
STEPS, BAD_STEP, KEY = 20, 7, jax.random.key(5)


def _batch(t):
  rng = np.random.default_rng(t)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (8, 8)), jnp.int32)
  weights = np.ones((8, 8), np.float32)
  if t == BAD_STEP:
    weights[0, 0] = np.nan  # a non-finite loss: both engines must skip the step
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.asarray(weights)}


def _update():
  return optim.zo_sgd(1e-3, momentum=0.9, weight_decay=0.01)


# One xdist worker runs the whole module (make test: --dist loadgroup), so its module
# fixture compiles once, not once per worker.
pytestmark = pytest.mark.xdist_group("stream")


@pytest.fixture(scope="module")
def runs():
  """20 steps of the dense engine and of the streamed one (1 of the 2 blocks resident).

  60-80 s on 2 cores: compiling the streamed step (a resident scan and a streamed scan,
  each a forward plus the fused update) is most of it; shared by the whole module.
  """
  model, params0, update = llama.make(CFG), llama.init(CFG, jax.random.key(0)), _update()
  estimate = jax.jit(lambda p, b, t: zo.spsa(model, p, b, KEY, step=t, eps=1e-3))
  apply = zo.make_apply(update)
  params, opt_state = params0, update.init(params0)
  dense = {"loss": [], "coeffs": [], "params": []}
  for t in range(STEPS):
    loss, g = estimate(params, _batch(t), t)
    params, opt_state = apply(params, opt_state, g)
    dense["loss"].append(float(loss))
    dense["coeffs"].append(float(g.coeffs[0]))
    dense["params"].append(params)

  engine = stream.StreamEngine(model, update, eps=1e-3, resident_blocks=1)
  state = engine.init(params0, KEY)
  streamed = {"loss": [], "coeffs": []}
  for t in range(STEPS):
    state, out = engine.step(state, _batch(t))
    streamed["loss"].append(float(out["loss"]))
    streamed["coeffs"].append(float(out["zograd"].coeffs[0]))
    if t == 0:
      streamed["params_1"] = engine.params(state)
  return dense, opt_state, engine, state, streamed, params0


def _assert_bit_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), (jax.tree_util.keystr(path), np.abs(x - y).max())


def test_first_step_and_fused_update_bit_exact(runs):
  dense, _, _, _, streamed, _ = runs
  assert streamed["loss"][0] == dense["loss"][0]
  assert streamed["coeffs"][0] == dense["coeffs"][0]
  # The fused update (in the scan, from the perturbation stream) and the embed/head update
  # reproduce the dense transform bit for bit.
  _assert_bit_equal(dense["params"][0], streamed["params_1"])


def test_twenty_steps_match_dense_within_tolerance(runs):
  # Not bit-exact after step 1, and why: XLA compiles the same float expression differently
  # depending on the program around it (multiply-add contraction into FMA, fusion, reduction
  # order), and the streamed step's scan body (transfers, fused update, forward) is a
  # different program from the dense step. Losses then differ by ~1 ulp, which the finite
  # difference (L+ - L-) / 2eps turns into ~1e-4 relative in c, and the runs drift apart
  # slowly. Measured over these 20 steps: see the bounds below (~10x margin).
  dense, dense_opt, engine, state, streamed, params0 = runs
  assert np.isnan(streamed["loss"][BAD_STEP]) and np.isnan(dense["loss"][BAD_STEP])
  assert int(state.skipped) == 1
  good = [t for t in range(STEPS) if t != BAD_STEP]
  np.testing.assert_allclose([streamed["loss"][t] for t in good],
                             [dense["loss"][t] for t in good], rtol=2e-4)
  np.testing.assert_allclose([streamed["coeffs"][t] for t in good],
                             [dense["coeffs"][t] for t in good], rtol=0.05, atol=0.05)
  final, got = dense["params"][-1], engine.params(state)
  for (path, d), s, p0 in zip(jax.tree_util.tree_flatten_with_path(final)[0],
                              jax.tree.leaves(got), jax.tree.leaves(params0)):
    moved = np.linalg.norm(np.asarray(d) - np.asarray(p0))
    assert moved > 0, jax.tree_util.keystr(path)
    assert np.linalg.norm(np.asarray(d) - s) <= 0.05 * moved, jax.tree_util.keystr(path)
  # The momentum buffers (host-resident for streamed blocks) agree as closely. Both engines
  # hold the same optimizer's state, chain (materialize, decay, trace, lr), per layer here.
  dense_trace = np.asarray(dense_opt.inner_state[2].trace["blocks"]["wq"])
  flushed = engine.flush(jax.tree.map(jnp.copy, state))
  trace = np.concatenate([jax.device_get(flushed.resident_opt.inner_state[2].trace["wq"]),
                          jax.device_get(flushed.blocks_opt.inner_state[2].trace["wq"])])
  # The bad step was skipped by the optimizer's own counter in every layer, once.
  assert np.asarray(jax.device_get(flushed.blocks_opt.skipped)).tolist() == [1]
  np.testing.assert_allclose(trace, dense_trace, atol=0.05 * np.abs(dense_trace).max())


def test_flush_makes_weights_current_and_is_idempotent(runs):
  *_, engine, state, _, _ = runs
  assert bool(state.has_pending)
  # Before flush the host blocks are one update behind; params() and flush() apply it.
  stale = np.asarray(jax.device_get(state.blocks["wq"]))
  current = engine.params(state)["blocks"]["wq"][1:]
  assert not np.array_equal(stale, current)
  flushed = engine.flush(jax.tree.map(jnp.copy, state))
  assert not bool(flushed.has_pending)
  np.testing.assert_array_equal(jax.device_get(flushed.blocks["wq"]), current)
  _assert_bit_equal(engine.params(flushed), engine.params(state))
  twice = engine.flush(jax.tree.map(jnp.copy, flushed))
  _assert_bit_equal(jax.device_get(twice.blocks), jax.device_get(flushed.blocks))


def test_placement(runs):
  *_, engine, state, _, _ = runs
  for leaf in jax.tree.leaves((state.blocks, state.blocks_opt)):
    assert leaf.sharding.memory_kind == "pinned_host"
  for leaf in jax.tree.leaves((state.outer, state.resident, state.resident_opt)):
    assert leaf.sharding.memory_kind == "device"
  assert state.blocks["wq"].shape[0] == CFG.num_layers - 1
  assert state.resident["wq"].shape[0] == 1


@functools.cache  # traced by three tests; the state and batch are abstract, so sharing is safe
def _lowering(num_layers):
  cfg = dataclasses.replace(CFG, num_layers=num_layers)
  engine = stream.StreamEngine(llama.make(cfg), _update(), eps=1e-3)
  params = llama.param_shapes(cfg)
  state = engine.abstract_state(params, KEY)
  batch = jax.eval_shape(lambda: _batch(0))
  return cfg, engine, params, state, batch


@functools.cache  # the depth test's L=2 step is the executable the compile test inspects
def _compiled(num_layers):
  _, engine, _, state, batch = _lowering(num_layers)
  return engine.compile(state, batch)


def test_device_bytes_constant_in_depth():
  out = {}
  for num_layers in (2, 8):
    cfg, engine, params, state, batch = _lowering(num_layers)
    out[num_layers] = inspect.device_bytes(_compiled(num_layers))
  block = engine.block_bytes(params)
  small, big = out[2], out[8]
  assert abs(big["device_bytes"] - small["device_bytes"]) <= 0.05 * small["device_bytes"], out
  # Host memory holds the streamed blocks (params + momentum, and the optimizer's int32 skip
  # counter, in and out): it grows by 6 blocks x 4 copies + 6 x 2 counters from L=2 to L=8.
  assert big["host_bytes"] - small["host_bytes"] == 6 * block * 4 + 6 * 2 * 4, out
  # The dense step's formula (`memory.peak`): the donated device state (every device
  # argument but the batch) comes back as outputs in the same buffers, counted once.
  batch_bytes = sum(inspect.nbytes(a.shape, a.dtype) for a in jax.tree.leaves(batch))
  for got in out.values():
    assert got["device_alias_bytes"] == got["device_argument_bytes"] - batch_bytes > 0, got
    assert got["host_alias_bytes"] == 0, got
    assert got["device_bytes"] == memory.peak(got["device_argument_bytes"],
                                              got["device_output_bytes"], got["temp_bytes"],
                                              got["device_alias_bytes"]), got


def test_no_device_value_larger_than_a_block():
  cfg, engine, params, state, batch = _lowering(8)
  block = engine.block_bytes(params)
  outer = max(np.prod(a.shape) * 4 for k, v in params.items() if k != "blocks"
              for a in jax.tree.leaves(v))
  bound = max(block, 2 * outer)  # a block, or an embed/head leaf for both branches
  jaxpr = engine.jaxpr(state, batch)
  biggest = max(inspect.device_values(jaxpr))
  assert biggest[0] <= bound, biggest
  # The check can fail: the dense engine keeps all 8 stacked blocks on device.
  dense = jax.make_jaxpr(lambda p, b: zo.spsa(llama.make(cfg), p, b, KEY, eps=1e-3))(
      params, batch)
  worst = max(inspect.device_values(dense))
  assert worst[0] > bound and "[8," in worst[1], worst  # a stacked [L, ...] leaf


def test_prefetch_does_not_wait_for_the_block_compute():
  _, engine, _, state, batch = _lowering(2)
  assert inspect.transfer_overlaps(engine.jaxpr(state, batch))
  # A control: a copy that needs the previous iteration's result cannot overlap it.
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  dev = host.with_memory_kind("device")
  xs = jax.device_put(jnp.ones((4, 3)), host)

  def serial(xs):
    def body(c, i):
      x = jax.device_put(jax.lax.dynamic_index_in_dim(xs, i, 0, False) , dev)
      return c * x + jax.device_put(jax.device_put(c, host), dev), None
    return jax.lax.scan(body, jnp.ones(3), jnp.arange(4))[0]
  assert not inspect.transfer_overlaps(jax.make_jaxpr(serial)(xs))


@pytest.mark.parametrize("kwargs, branch_group, update", [
    # a scale-0 branch per sample; Adam's moments per layer
    (dict(one_sided=True, microbatches=2, num_samples=2), 2,
     optim.zo_adam(1e-3, weight_decay=0.01)),
    # n + 1 units of one branch; the sign direction, formed in float32 per layer; z = ±1
    # (Rademacher: the streamed forward, fused update and embed/head update draw packed signs)
    (dict(one_sided=True, num_samples=2, direction="rademacher"), 1,
     optim.zo_sign(1e-3, weight_decay=0.01)),
], ids=["adam-microbatches", "sign-branch_group1-rademacher"])
def test_one_sided_and_microbatches_first_step_bit_exact(kwargs, branch_group, update):
  """Up to ~75 s on 2 cores (adam + micro-batches): one streamed-step compile per case."""
  model, params0 = llama.make(CFG), llama.init(CFG, jax.random.key(0))
  batch = _batch(0)
  loss, g = jax.jit(lambda p, b: zo.spsa(model, p, b, KEY, step=0, eps=1e-3, **kwargs))(
      params0, batch)
  want, _ = zo.make_apply(update)(params0, update.init(params0), g)
  engine = stream.StreamEngine(model, update, eps=1e-3, branch_group=branch_group,
                               layout=parallel.make_layout(1, 1, slice_blocks=False), **kwargs)
  state, out = engine.step(engine.init(params0, KEY), batch)
  # L(θ) comes from a scale-0 branch (θ + 0·z is θ exactly) run beside the +ε ones, and
  # micro-batch losses combine by the dense rule (loss_sum/count): bit-equal to `spsa`.
  assert float(out["loss"]) == float(loss)
  np.testing.assert_array_equal(np.asarray(out["zograd"].coeffs), np.asarray(g.coeffs))
  assert len(set(np.asarray(g.coeffs).tolist())) == 2  # two samples, two directions
  assert out["zograd"].direction == g.direction == kwargs.get("direction", "gaussian")
  _assert_bit_equal(want, engine.params(state))


def test_step_is_pure_over_a_frozen_config():
  _, engine, _, state, batch = _lowering(2)
  config = engine.config
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.eps = 1.0
  assert hash(config) == hash(dataclasses.replace(config))  # a static jit argument
  # A user jits the pure step themselves, the config static.
  new_state, out = jax.jit(stream.step, static_argnums=0).eval_shape(config, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert out["zograd"].coeffs.shape == (1,)
  # Integer settings take numpy integers too (as `zo.spsa`'s do).
  settings = dict(num_samples=np.int64(2), microbatches=np.int32(2), resident_blocks=np.int64(0))
  assert stream.StreamEngine(config.model, _update(), **settings).config.num_samples == 2


def test_compile_returns_the_executable_and_step_keeps_the_jitted_function():
  """One streamed-step compilation of its own (the half batch the jitted step must accept);
  the AOT executable is the depth test's L=2 one (no resident block: the cheaper program)."""
  cfg, engine, _, _, _ = _lowering(2)
  compiled = _compiled(2)  # engine.compile for the [8, 8] batch
  state = engine.init(llama.init(cfg, jax.random.key(0)), KEY)
  half = jax.tree.map(lambda x: x[:4], _batch(1))
  # The executable is locked to the shapes it was compiled for ...
  with pytest.raises(TypeError, match=r"compiled with int32\[8,8\] and called with "
                                      r"int32\[4,8\]"):
    compiled(*stream._split(jax.tree.map(jnp.copy, state)), half)
  # ... and the engine never switches to it: its step takes any batch size.
  _, out = engine.step(jax.tree.map(jnp.copy, state), half)
  assert np.isfinite(float(out["loss"]))


def test_microbatches_must_divide_the_batch():
  _, engine, _, state, _ = _lowering(2)
  model = engine.config.model
  engine = stream.StreamEngine(model, _update(), microbatches=3)
  with pytest.raises(ValueError, match=r"^microbatches=3 must divide the batch size 8"):
    engine.jaxpr(state, jax.eval_shape(lambda: _batch(0)))
  with pytest.raises(ValueError, match="microbatches=0 must be an integer >= 1"):
    stream.StreamEngine(model, _update(), microbatches=0)


@pytest.mark.gpu
@on_gpu
def test_gpu_memory_analysis_host_apart_from_device():
  # On a GPU, XLA's own memory_analysis tells pinned-host bytes from device bytes (on CPU
  # it cannot, hence `device_bytes`): device constant in depth, host growing with it, and
  # the device peak `device_bytes` computes from the shardings (to 1%: XLA may pad).
  def analysed(num_layers):
    _, engine, params, state, batch = _lowering(num_layers)
    compiled = engine.lower(state, batch).compile()
    a = compiled.memory_analysis()
    device = (a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
              - a.alias_size_in_bytes)
    host = a.host_argument_size_in_bytes + a.host_output_size_in_bytes
    mine = inspect.device_bytes(compiled)["device_bytes"]
    assert abs(mine - device) <= 0.01 * device, (mine, device)
    return device, host, engine.block_bytes(params)
  (dev2, host2, block), (dev8, host8, _) = analysed(2), analysed(8)
  assert abs(dev8 - dev2) <= 0.05 * dev2, (dev2, dev8)
  # 6 more streamed blocks, params and momentum, read and written back.
  assert host8 - host2 >= 6 * block * 4, (host2, host8)


def test_bad_input():
  model = llama.make(CFG)
  with pytest.raises(ValueError, match="memory_kind='device' is not a host memory kind"):
    stream.StreamEngine(model, _update(), memory_kind="device")
  engine = stream.StreamEngine(model, _update(), resident_blocks=3)
  with pytest.raises(ValueError, match="resident_blocks=3 is more than the model's 2 blocks"):
    engine.abstract_state(llama.param_shapes(CFG), KEY)
  with pytest.raises(ValueError, match=r"^resident_blocks=-1 must be an integer >= 0$"):
    stream.StreamEngine(model, _update(), resident_blocks=-1)
  with pytest.raises(ValueError, match=r"^branch_group=3 must be 1 or 2$"):
    stream.StreamEngine(model, _update(), branch_group=3)
  with pytest.raises(ValueError, match=r"^direction='normal' must be one of"):
    stream.StreamEngine(model, _update(), direction="normal")


@pytest.mark.parametrize("update", [
    optax.inject_hyperparams(optim.zo_sgd)(learning_rate=1e-3),
    optax.chain(optim.zo_sgd(1e-3)),
    optim.zo_sgd(1e-3, weight_decay=0.1, mask={"embed": True, "blocks": False, "head": True}),
], ids=["inject_hyperparams", "chain", "tree-mask"])
def test_optimizers_that_cannot_be_streamed_are_refused_in_one_line(update):
  # Each runs on the dense engine; none may be applied a layer at a time unchecked.
  with pytest.raises(ValueError, match=r"^update must be a zojax.optim.zo.ZOOptimizer as built "
                     r".*inject_hyperparams") as err:
    stream.StreamEngine(llama.make(CFG), update)
  assert "\n" not in str(err.value)
