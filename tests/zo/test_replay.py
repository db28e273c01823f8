"""A real 20-step ZO run on the tiny LLaMA is reproduced bit for bit from its log alone."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zojax import optim, zo
from zojax.models import llama

CFG = llama.CONFIGS["tiny"]
STEPS, BAD_STEP = 20, 7


def _batch(t):
  rng = np.random.default_rng(t)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (4, 8)), jnp.int32)
  weights = np.ones((4, 8), np.float32)
  if t == BAD_STEP:
    weights[0, 0] = np.nan  # a non-finite loss: the step must be skipped, and logged
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.asarray(weights)}


def _tx():
  schedule = optax.linear_schedule(1e-3, 1e-4, STEPS)
  return optax.inject_hyperparams(optim.zo_sgd)(learning_rate=schedule, momentum=0.9,
                                                weight_decay=0.01)


def _run(tmp_path):
  key = jax.random.key(123)
  params0 = llama.init(CFG, jax.random.key(0))
  tx = _tx()
  model = llama.make(CFG)
  estimate = jax.jit(lambda p, b, t: zo.spsa(model, p, b, key, step=t, eps=1e-3, num_samples=2))
  apply = zo.make_apply(tx)
  params, opt_state = params0, tx.init(params0)
  log = zo.ZOLog.start(key)
  for t in range(STEPS):
    _, g = estimate(params, _batch(t), t)
    params, opt_state = apply(params, opt_state, g)
    log.append(g)
  log.save(tmp_path / "log.json")
  return params0, params, opt_state, log, apply, tmp_path / "log.json"


# One xdist worker runs the whole module (make test: --dist loadgroup), so its module
# fixture compiles once, not once per worker.
pytestmark = pytest.mark.xdist_group("replay")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("replay"))


def _assert_bit_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def test_replay_is_bit_exact(run):
  params0, params, opt_state, log, _, log_path = run
  assert log.finite.count(False) == 1 and not log.finite[BAD_STEP]
  skip_state = opt_state.inner_state
  assert int(skip_state.skipped) == 1
  # The run moved.
  assert not np.allclose(params["blocks"]["wq"], params0["blocks"]["wq"])
  loaded = zo.ZOLog.load(log_path)
  assert loaded.to_json() == log.to_json()  # (NaN != NaN, so compare the records)
  # Replay with a freshly built update function: same jaxpr, same compilation.
  replayed, replayed_state = zo.replay(params0, loaded, _tx())
  _assert_bit_equal(replayed, params)
  _assert_bit_equal(replayed_state, opt_state)


def test_replay_detects_a_one_ulp_change(run):
  params0, params, _, log, apply, _ = run
  tampered = zo.ZOLog.from_json(log.to_json())
  c = np.float32(tampered.coeffs[3][0])
  tampered.coeffs[3][0] = float(np.nextafter(c, np.float32(np.inf)))
  replayed, _ = zo.replay(params0, tampered, _tx(), apply=apply)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(replayed), jax.tree.leaves(params)))


def test_log_is_small_strict_json(run):
  log = run[3]
  text = log.to_json()
  assert len(text) < 4096
  record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
  assert record["steps"] == list(range(STEPS)) and record["impl"] == "threefry4x32"
  assert record["coeffs"][BAD_STEP][0] in ("nan", "inf", "-inf")
  with pytest.raises(ValueError, match="is not this log's key"):
    zo.ZOLog.start(jax.random.key(5)).append(log.zograd(0))


def test_rademacher_run_replays_bit_exact_and_logs_its_direction(run, tmp_path):
  """A short Rademacher run: the log records the direction and the replay regenerates the
  same signs (a Gaussian replay of the same log would not)."""
  params0 = run[0]
  key, tx, model = jax.random.key(7), _tx(), llama.make(CFG)
  estimate = jax.jit(lambda p, b, t: zo.spsa(model, p, b, key, step=t, eps=1e-3,
                                             direction="rademacher"))
  apply = zo.make_apply(tx)
  params, opt_state = params0, tx.init(params0)
  log = zo.ZOLog.start(key, direction="rademacher")
  for t in range(3):
    _, g = estimate(params, _batch(t), t)
    params, opt_state = apply(params, opt_state, g)
    log.append(g)
  log.save(tmp_path / "log.json")
  loaded = zo.ZOLog.load(tmp_path / "log.json")
  assert json.loads(loaded.to_json())["direction"] == "rademacher"
  replayed, _ = zo.replay(params0, loaded, tx, apply=apply)
  _assert_bit_equal(replayed, params)
  # A control: the same log read as Gaussian rebuilds other weights.
  as_gaussian = zo.ZOLog.from_json(loaded.to_json().replace('"rademacher"', '"gaussian"'))
  other, _ = zo.replay(params0, as_gaussian, tx, apply=apply)
  assert not np.array_equal(np.asarray(other["blocks"]["wq"]), np.asarray(params["blocks"]["wq"]))
  with pytest.raises(ValueError, match=r"^zograd.direction='rademacher' is not this log's "
                     r"direction 'gaussian'$"):
    zo.ZOLog.start(key).append(loaded.zograd(0))


def test_logs_without_a_direction_are_gaussian(run):
  record = json.loads(run[3].to_json())
  del record["direction"]  # a log written before directions existed
  assert zo.ZOLog.from_json(json.dumps(record)).direction == "gaussian"
  record["direction"] = "uniform"
  with pytest.raises(ValueError, match=r"^direction='uniform' must be one of"):
    zo.ZOLog.from_json(json.dumps(record))


def test_resuming_with_another_direction_is_refused():
  """A run keeps one distribution of z: a checkpoint's seed log names it, and an engine
  configured for the other refuses to continue it (one line naming the key)."""
  from zojax.errors import ConfigError
  from zojax.train.engines.dense_zo import SeedLogged
  engine = SeedLogged()
  engine.log = zo.ZOLog.start(jax.random.key(0), "rademacher")
  with pytest.raises(ConfigError, match=r"^config key 'zo.direction'='rademacher' differs from "
                     r"the checkpoint's seed log \('gaussian'\)"):
    engine.load_meta({"zo_log": zo.ZOLog.start(jax.random.key(0)).to_json()})
  engine.load_meta({"zo_log": zo.ZOLog.start(jax.random.key(0), "rademacher").to_json()})
