"""The registered `idisc` model trained as the loop trains it: the tiny config overfits one
batch with the onecycle/clipped AdamW; a batch without a valid pixel is a skipped step, not a
NaN one; masked gt = 0 pixels keep gradients finite; eval metrics come out of the loop's
`evaluate` with padding rows and the eval crop masked.

One compiled train step and one compiled eval step serve every test (module fixture).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax import models
from zojax.data import tasks
from zojax.depth import metrics as depth_metrics
from zojax.models import idisc
from zojax.train import config as config_lib
from zojax.train import loop, optimizer
from zojax.train.engines import base, first_order

H, W, B = 32, 64, 2
STEPS = 40
# LLVM at -O0: the same optimized HLO, half the compile time of these one-off programs.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _batch(seed=0):
  """Random images with smooth depth fields (1-6 m), a few invalid (0) pixels."""
  rng = np.random.default_rng(seed)
  image = rng.random((B, H, W, 3), np.float32)
  y, x = np.mgrid[0:H, 0:W] / np.array([H, W])[:, None, None]
  depth = np.stack([1.5 + 3 * y + np.sin(3 * x), 5.0 - 2.5 * x * y]).astype(np.float32)
  depth[:, :3, :5] = 0.0   # invalid
  return {"image": image, "depth": depth}


@pytest.fixture(scope="module")
def setup():
  c = config_lib.load("configs/depth_idisc.py:tiny,idrs=8")
  # One ISD layer and a higher peak lr: fewer leaves to compile, a quicker overfit.
  config_lib.override(c, ["optim.learning_rate=3e-3", "model.isd_layers=1"])
  model = models.build(c.model)
  tx = optimizer.build(c.optim, STEPS)
  # An rbg key: the same init, half the compile time of threefry's per-leaf bit generators.
  params = jax.jit(model.init, compiler_options=FAST_COMPILE)(jax.random.key(0, impl="rbg"))
  state = base.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                          opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(first_order.make_step(model, tx), compiler_options=FAST_COMPILE)
  return model, step, state, c.model


def test_tiny_config_overfits_one_batch(setup):
  _, step, state, _ = setup
  batch = _batch()
  losses = []
  for i in range(STEPS):
    state, out = step(state, batch)
    if i == 0 or i % 8 == 7 or i == STEPS - 1:  # block often (8 fake CPU devices)
      losses.append(float(out["loss"]))
  assert not bool(out["skipped"]) and np.isfinite(float(out["grad_norm"]))
  assert losses[-1] < 0.1 * losses[0], losses  # measured: 7.7 -> 0.07


def test_batch_without_valid_pixel_is_a_logged_skip(setup, caplog):
  _, step, state, _ = setup
  empty = {**_batch(), "depth": np.zeros((B, H, W), np.float32)}
  with caplog.at_level(logging.WARNING, logger="zojax.models.idisc"):
    new, out = step(state, empty)
    jax.effects_barrier()
  assert bool(out["skipped"]) and np.isnan(float(out["loss"]))
  assert int(base.skipped_steps(new.opt_state)) == int(base.skipped_steps(state.opt_state)) + 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert "batch 'depth' has no valid pixel" in caplog.text
  # Control: the same step on a batch with valid pixels is taken, with finite gradients
  # although its masked pixels have gt = 0.
  _, ok = step(state, _batch())
  assert not bool(ok["skipped"]) and np.isfinite(float(ok["grad_norm"]))


def test_eval_metrics_through_the_loop_mask_padding_and_crop(setup):
  model, _, state, model_cfg = setup
  data = _batch(seed=1)
  data = {k: np.concatenate([v, v[:1]]) for k, v in data.items()}   # 3 examples
  data["depth"][2] *= 1.5
  mask = np.zeros((3, H, W), np.float32)
  mask[:, 4:-4, 8:-8] = 1.0
  data["eval_mask"] = mask
  task = tasks.Task("toy_depth", 0, None, {"test": data}, {})
  predict = idisc.predictor(idisc.settings_from(model_cfg))
  # One program gives the loop's eval sums and the predictions (its forward is shared).
  sums_and_depth = jax.jit(lambda p, b: (model.loss(p, {}, b)[1], predict(p, b["image"])),
                           compiler_options=FAST_COMPILE)
  eval_step = lambda params, model_state, batch: sums_and_depth(params, batch)[0]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  got = loop.evaluate(eval_step, state.params, {}, task, B, one_device, model.eval_metrics)

  # Reference: predictions of the 3 real rows, metrics in float64 numpy.
  batches = list(tasks.eval_batches(data, B))
  pred = np.concatenate([sums_and_depth(state.params, b)[1] for b in batches])[:3]
  pred = pred.astype(np.float64)
  gt = data["depth"].astype(np.float64)
  valid = (gt > 0.01) & (mask > 0)
  p, g = pred[valid], gt[valid]
  ratio = np.maximum(p / g, g / p)
  np.testing.assert_allclose(got["test/d1"], np.mean(ratio < 1.25), rtol=1e-5)
  np.testing.assert_allclose(got["test/abs_rel"], np.mean(np.abs(p - g) / g), rtol=1e-4)
  rmse = [np.sqrt(np.mean((pred[i][valid[i]] - gt[i][valid[i]]) ** 2) + 1e-6) for i in range(3)]
  np.testing.assert_allclose(got["test/rmse"], np.mean(rmse), rtol=1e-4)
  silog = [100 * np.std(np.log(pred[i][valid[i]] / gt[i][valid[i]]), ddof=1) for i in range(3)]
  np.testing.assert_allclose(got["test/silog"], np.mean(silog), rtol=1e-4)
  assert set(got) >= {f"test/{k}" for k in depth_metrics.POOLED + depth_metrics.PER_IMAGE}
  # Controls: counting the padding row (a copy of row 2) or ignoring the crop would show.
  padded = np.concatenate([pred, pred[2:]]), np.concatenate([gt, gt[2:]])
  keep = np.concatenate([valid, valid[2:]])
  assert abs(np.mean(np.abs(padded[0] - padded[1])[keep] / padded[1][keep])
             - got["test/abs_rel"]) > 1e-4
  uncropped = gt > 0.01
  assert abs(np.mean(np.abs(pred - gt)[uncropped] / gt[uncropped]) - got["test/abs_rel"]) > 1e-4
  assert got["test/loss"] > 0
