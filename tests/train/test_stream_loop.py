"""loop.train with zo.engine='stream': seed log, flushed checkpoints, exact resume, replay, memory."""

import json
import pathlib

import jax
import jax.experimental.compilation_cache.compilation_cache as compilation_cache
import numpy as np
import orbax.checkpoint as ocp
import pytest

from zojax import models, zo
from zojax.models import llama
from zojax.train import config as config_lib, engines, loop, optimizer, sharding
from zojax.train.engines import streamed_zo

CONFIG = "configs/sentiment_zo.py:tiny,stream"
N = 2


def _config(*overrides, spec=CONFIG):
  c = config_lib.load(spec)
  config_lib.override(c, [f"train.steps={2 * N}", f"train.checkpoint_every={N}",
                          "train.progress=False", *overrides])
  config_lib.validate(c)
  return c


def _checkpoint(workdir, step):
  return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                            / "state")


def _flushed_params(ck):
  blocks = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]),
                        ck["resident"], ck["blocks"])
  return {**jax.tree.map(np.asarray, ck["outer"]), "blocks": blocks}


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent XLA cache for one test: the halted and resumed runs compile exactly the
  programs the straight run compiled (the stream step is ~45 s of CPU), so they read them."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.mark.assets
@pytest.mark.slow
def test_stream_run_resumes_bit_identical_from_flushed_checkpoints(tmp_path, compile_cache):
  """~95 s on 2 cores: three loop runs; the first compiles the streamed step (~40 s of CPU),
  the others read it from the test's persistent XLA cache."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  got = loop.train(_config(), straight)
  loop.train(_config(f"train.halt_at_step={N}"), resumed)
  assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [str(N)]
  loop.train(_config(), resumed)

  # Bit-identical: every leaf of the state (blocks, optimizer state, step, key, counters).
  a, b = _checkpoint(straight, 2 * N), _checkpoint(resumed, 2 * N)
  assert int(a["step"]) == 2 * N and len(jax.tree.leaves(a)) > 10
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert (straight / "zo_log.json").read_text() == (resumed / "zo_log.json").read_text()
  steps = lambda d: [r["step"] for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                            .splitlines()) if "train/loss" in r]
  assert steps(resumed) == steps(straight) == list(range(1, 2 * N + 1))

  # Checkpoints are never stale: the one at N holds the weights after N updates, i.e. the
  # dense replay of the log's first N entries (a checkpoint one update behind fails this).
  config = _config()
  model = models.build(config.model)
  initial = jax.device_get(model.init(jax.random.key(config.seed)))
  log = zo.ZOLog.load(straight / "zo_log.json")
  log.steps, log.coeffs, log.finite = log.steps[:N], log.coeffs[:N], log.finite[:N]
  tx = optimizer.build(config.optim, config.train.steps)
  want, _ = zo.replay(initial, log, tx)
  ck = _checkpoint(resumed, N)
  assert not bool(ck["has_pending"])
  for (path, w), g, p0 in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(want))[0],
                              jax.tree.leaves(_flushed_params(ck)), jax.tree.leaves(initial)):
    moved = np.abs(np.asarray(w) - p0).max()
    assert moved > 0, jax.tree_util.keystr(path)
    assert np.abs(np.asarray(w) - g).max() <= streamed_zo.REPLAY_RTOL * moved, \
        jax.tree_util.keystr(path)

  # The whole run replays with the dense update; memory is the streamed step's.
  assert got["replay_within_tolerance"] is True, got
  mem = got["step_memory"]
  # Host memory holds the streamed block (1 of 2 resident) and its optimizer state (ZO-SGD:
  # the schedule's step count), read and written back.
  nbytes = lambda tree: sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(tree))
  abstract = engines.build(config, model, sharding.make_mesh(
      [tuple(a) for a in config.mesh.axes])).abstract_state()
  cfg = llama.CONFIGS["tiny"]
  block = nbytes(llama.param_shapes(cfg)["blocks"]) // cfg.num_layers
  assert nbytes(abstract.blocks) == block
  assert mem["host_bytes"] == 2 * nbytes((abstract.blocks, abstract.blocks_opt)), mem
  assert 0 < mem["device_bytes"] == mem["peak_bytes"]


@pytest.mark.parametrize("override, key", [
    ("zo.engine=streamed", "zo.engine"),
    ("zo.memory_kind=device", "zo.memory_kind"),
    ("zo.resident_blocks=-1", "zo.resident_blocks"),
])
def test_bad_stream_settings_name_the_key(override, key):
  with pytest.raises(config_lib.ConfigError, match=f"^config key '{key}'"):
    _config(override)


def test_first_order_optimizer_with_stream_engine_is_refused():
  with pytest.raises(config_lib.ConfigError, match="'zo.engine'='stream': needs optim.name zo_"):
    _config("optim.name=adamw")


def test_stream_engine_gets_the_very_optimizer_the_dense_engine_gets():
  # One ZO optimizer spec: optimizer.build gives a streamable ZOOptimizer for every ZO name.
  from zojax.optim.zo import ZOOptimizer
  for name in ("zo_sgd", "zo_adam", "zo_sign"):
    config = _config(f"optim.name={name}")
    assert isinstance(optimizer.build(config.optim, config.train.steps), ZOOptimizer), name
  assert not isinstance(optimizer.build(_config("zo.engine=dense", "optim.name=adamw").optim, 4),
                        ZOOptimizer)


def test_stream_microbatches_must_fit_the_data_axis():
  config = _config("zo.microbatches=1", "mesh.axes=(('data', 2), ('model', 1))")
  model = models.build(config.model)
  with pytest.raises(config_lib.ConfigError, match="^config keys zo.* / mesh.axes do not fit"):
    engines.build(config, model, sharding.make_mesh([tuple(a) for a in config.mesh.axes]))
