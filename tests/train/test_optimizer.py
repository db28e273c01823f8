"""optimizer.build's onecycle schedule, b1 cycling and clipping against a numpy AdamW; the
GaLore family under the same options; bad onecycle keys as one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from zojax.errors import ConfigError
from zojax.train import optimizer

T = 20


def _onecycle_config(name="adamw", **overrides):
  c = common.base_config().optim
  c.name, c.schedule, c.learning_rate = name, "onecycle", 2e-4
  c.div_factor, c.final_div_factor, c.pct_start = 1.0, 10.0, 0.3
  c.b1, c.b1_min, c.weight_decay, c.grad_clip = 0.95, 0.85, 0.02, 1.0
  for k, v in overrides.items():
    c[k] = v
  return c


def _cosine(start, end, frac):
  return end + (start - end) * (1 + np.cos(np.pi * frac)) / 2


def test_onecycle_learning_rate_and_b1():
  """iDisc's settings: div 1 (flat first phase), final div 10, b1 0.95 -> 0.85 -> 0.95."""
  lr = optimizer.schedule(_onecycle_config(), T)
  b1 = optimizer.b1_cycle(0.95, 0.85, T, 0.3)
  peak = int(0.3 * T)
  steps = np.arange(T + 1)
  frac = np.clip((steps - peak) / (T - peak), 0, 1)
  want_lr = np.where(steps <= peak, 2e-4, _cosine(2e-4, 2e-5, frac))
  want_b1 = np.where(steps <= peak, _cosine(0.95, 0.85, np.minimum(steps / peak, 1)),
                     _cosine(0.85, 0.95, frac))
  np.testing.assert_allclose(jax.vmap(lr)(steps), want_lr, rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(b1)(steps), want_b1, rtol=1e-6)
  # With div 25 the first phase rises from lr/25 along a half cosine.
  rising = optimizer.schedule(_onecycle_config(div_factor=25.0), T)
  np.testing.assert_allclose(rising(0), 2e-4 / 25, rtol=1e-5)
  np.testing.assert_allclose(rising(peak // 2), _cosine(2e-4 / 25, 2e-4, (peak // 2) / peak),
                             rtol=1e-5)


def _numpy_adamw(p, grads, lrs, b1s, b2=0.999, eps=1e-8, wd=0.02, clip=1.0):
  """AdamW with per-step lr and b1 (PyTorch's bias correction 1 - b1_t ** t), after global
  norm clipping."""
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, (g, lr, b1) in enumerate(zip(grads, lrs, b1s), start=1):
    g = g * min(1.0, clip / np.linalg.norm(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1 ** t) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p)
  return p


def test_adamw_with_onecycle_b1_cycle_and_clipping_matches_numpy():
  cfg = _onecycle_config()
  tx = optimizer.build(cfg, T)
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (0.1, 5.0, 0.3, 2.0, 1.0)]
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}

  @jax.jit
  def run(params):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  got, state = run(params)
  lrs = [float(optimizer.schedule(cfg, T)(t)) for t in range(len(grads))]
  b1s = [float(optimizer.b1_cycle(0.95, 0.85, T, 0.3)(t)) for t in range(len(grads))]
  want = _numpy_adamw(np.asarray(params["w"], np.float64), grads, lrs, b1s)
  np.testing.assert_allclose(got["w"], want, rtol=2e-5, atol=1e-7)
  # Negative control: a fixed b1 gives a different trajectory.
  fixed = _numpy_adamw(np.asarray(params["w"], np.float64), grads, lrs, [0.95] * len(grads))
  assert np.abs(fixed - want).max() > 1e-6
  hyper = optax.tree_utils.tree_get(state, "hyperparams")
  np.testing.assert_allclose(hyper["b1"], b1s[-1], rtol=1e-6)


@pytest.mark.parametrize("name", ["galore_adamw", "adam8bit"])
def test_other_adam_family_members_take_the_b1_cycle(name):
  cfg = _onecycle_config(name)
  cfg.galore = common.galore_settings()
  cfg.galore.rank, cfg.galore.update_proj_gap = 2, 5
  tx = optimizer.build(cfg, T)
  params = {"mlp": {"kernel": jnp.ones((8, 6))}, "bias": jnp.zeros(6)}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)

  @jax.jit
  def two_steps(params):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  new, state = two_steps(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
  assert np.abs(np.asarray(new["mlp"]["kernel"]) - 1.0).max() > 0
  b1 = optax.tree_utils.tree_get(state, "hyperparams")["b1"]
  np.testing.assert_allclose(b1, optimizer.b1_cycle(0.95, 0.85, T, 0.3)(1), rtol=1e-6)


def test_without_b1_min_the_optimizer_is_the_plain_one():
  """b1_min = 0 keeps today's transform (no inject_hyperparams state)."""
  cfg = _onecycle_config(b1_min=0.0)
  state = optimizer.build(cfg, T).init({"w": jnp.ones((2, 2))})
  assert optax.tree_utils.tree_get(state, "hyperparams") is None
  assert optax.tree_utils.tree_get(state, "ScaleByAdamState") is not None


@pytest.mark.parametrize("overrides,match", [
    (dict(name="sgd"), r"'optim.b1_min'=0.85 cycles b1 .* optim.name='sgd'"),
    (dict(schedule="cosine"), r"'optim.b1_min'=0.85 .* optim.schedule='cosine'"),
    (dict(warmup_steps=5), r"'optim.warmup_steps'=5 must be 0 with optim.schedule='onecycle'"),
    (dict(pct_start=1.5), r"'optim.pct_start'=1.5 must be in \(0, 1\)"),
    (dict(final_div_factor=0.5), r"'optim.final_div_factor'=0.5 must be >= 1"),
    (dict(b1_min=0.99), r"'optim.b1_min'=0.99 must be in \(0, optim.b1=0.95\)"),
])
def test_bad_onecycle_settings_are_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match) as info:
    optimizer.build(_onecycle_config(**overrides), T)
  assert "\n" not in str(info.value)
