"""iDisc pieces against hand-computed values and references: metrics, SIlog, the two attention
softmax axes, IDR permutation, depth-space fusion, align-corners resizing, variants, errors.

The network itself trains in test_idisc_train.py; everything here runs on small arrays or
small submodules (a few compiles of a few ops each).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zojax.depth import metrics, resize
from zojax.errors import ConfigError
from zojax.models import idisc

GT = np.array([[[1.0, 2.0, 4.0]]], np.float32)     # [B=1, H=1, W=3]
PRED = np.array([[[1.1, 1.8, 5.0]]], np.float32)
SMALL = idisc.IDiscSettings(widths=(8, 8, 16, 16), pixel_dim=16, idr_dim=8, num_idrs=6,
                            isd_layers=1, groups=4, attention="xla")


def _finished(pred, gt, valid=None):
  valid = jnp.ones(gt.shape, bool) if valid is None else valid
  return metrics.finish(jax.jit(metrics.metric_sums)(pred, gt, valid))


def test_metrics_on_hand_computed_values():
  m = _finished(PRED, GT)
  assert m["d1"] == pytest.approx(2 / 3)           # the ratio 1.25 itself does not count
  assert m["d2"] == m["d3"] == 1.0
  np.testing.assert_allclose(m["abs_rel"], 0.15, rtol=1e-6)
  np.testing.assert_allclose(m["rmse"], 0.591609, rtol=1e-6)
  np.testing.assert_allclose(m["log10"], 0.0613534, rtol=1e-6)
  np.testing.assert_allclose(m["silog"], 16.5592, rtol=1e-5)
  np.testing.assert_allclose(m["sq_rel"], (0.01 / 1 + 0.04 / 2 + 1 / 4) / 3, rtol=1e-6)
  g = np.log(PRED / GT).ravel()
  np.testing.assert_allclose(m["rmse_log"], np.sqrt(np.mean(g ** 2) + 1e-6), rtol=1e-6)


def test_metrics_pool_pixels_but_average_rmse_and_silog_per_image():
  """Two images of 1 and 3 valid pixels: pooled metrics weight pixels, per-image ones images."""
  gt = np.array([[[2.0, 0.0, 0.0]], [[1.0, 2.0, 4.0]]], np.float32)
  pred = np.array([[[3.0, 7.0, 7.0]], [[1.1, 1.8, 5.0]]], np.float32)
  valid = metrics.valid_mask(jnp.asarray(gt))
  m = _finished(pred, gt, valid)
  np.testing.assert_allclose(m["abs_rel"], (0.5 + 0.45) / 4, rtol=1e-6)   # 4 valid pixels
  np.testing.assert_allclose(m["rmse"], (np.sqrt(1 + 1e-6) + 0.591609) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["silog"], 16.5592, rtol=1e-5)  # 1 pixel has no variance: left out
  assert np.isfinite(list(m.values())).all()


def test_silog_loss_values():
  loss = jax.jit(metrics.silog_loss)
  valid = jnp.ones(GT.shape, bool)
  np.testing.assert_allclose(loss(PRED, GT, valid)[0], 1.678649, rtol=1e-5)
  np.testing.assert_allclose(loss(2 * GT, GT, valid)[0], 2.684566, rtol=1e-5)


def test_silog_masked_pixels_have_no_effect_and_gradients_stay_finite():
  """Masked pixels (gt = 0 and garbage predictions) change neither value nor gradient of the
  valid ones, and get exactly zero gradient."""
  gt = np.array([[[1.0, 0.0, 2.0, 0.0, 4.0]]], np.float32)
  pred = np.array([[[1.1, 0.0, 1.8, 1e6, 5.0]]], np.float32)
  valid = metrics.valid_mask(jnp.asarray(gt))

  @jax.jit
  def value_and_grad(pred, gt, valid):
    return jax.value_and_grad(lambda p: metrics.silog_loss(p, gt, valid)[0])(pred)

  value, grad = value_and_grad(pred, gt, valid)
  ref_value, ref_grad = value_and_grad(PRED, GT, jnp.ones(GT.shape, bool))
  np.testing.assert_allclose(value, 1.678649, rtol=1e-5)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[0, 0, [1, 3]], 0.0)
  np.testing.assert_allclose(grad[0, 0, [0, 2, 4]], ref_grad[0, 0], rtol=1e-5)
  # Negative control: without the mask the same inputs give a different loss.
  assert abs(float(metrics.silog_loss(pred, gt + 1.0, jnp.ones(gt.shape, bool))[0])
             - float(value)) > 0.1


def test_afp_softmax_runs_over_idrs_then_renormalises_over_pixels():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 5, 8))    # [B, N IDRs, D]
  k = jax.random.normal(kk, (2, 40, 8))   # [B, P pixels, D]
  v = jax.random.normal(kv, (2, 40, 8))
  scores = np.einsum("bnd,bpd->bnp", q, k) / np.sqrt(8)
  before = np.exp(scores - scores.max(1, keepdims=True))
  before /= before.sum(1, keepdims=True)
  np.testing.assert_allclose(before.sum(axis=1), 1.0, rtol=1e-6)   # over IDRs, per pixel
  w, out = jax.jit(lambda q, k, v: (idisc.afp_weights(q, k), idisc.afp_attention(q, k, v)))(
      q, k, v)
  w = np.asarray(w)
  np.testing.assert_allclose(w.sum(axis=2), 1.0, rtol=1e-6)        # over pixels, per IDR
  want = (before + 1e-6) / (before + 1e-6).sum(2, keepdims=True)
  np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
  # Not the ordinary attention (softmax over pixels): that is the point of the method.
  over_pixels = np.asarray(jax.nn.softmax(scores, axis=2))
  assert np.abs(w - over_pixels).max() > 1e-2
  # The einsum against a per-IDR float64 loop.
  loop = np.stack([[want[b, n] @ np.asarray(v[b], np.float64) for n in range(5)]
                   for b in range(2)])
  np.testing.assert_allclose(out, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "blockwise", "pallas"])
def test_isd_attention_is_an_ordinary_softmax_over_idrs(impl):
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (2, 70, 64))   # many pixels (queries)
  k = jax.random.normal(kk, (2, 6, 64))    # few IDRs (keys)
  v = jax.random.normal(kv, (2, 6, 64))
  w = np.asarray(idisc.isd_weights(q, k))
  np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-6)
  out = jax.jit(idisc.isd_attention, static_argnums=3)(q, k, v, impl)
  np.testing.assert_allclose(out, np.einsum("bpn,bnd->bpd", w, v), rtol=2e-5, atol=2e-5)


def test_permuting_idr_priors_permutes_afp_outputs_and_leaves_depth_unchanged():
  perm = np.array([3, 0, 5, 1, 4, 2])

  @jax.jit
  def run(pixels):
    idrs = idisc.IDRs(SMALL, afp=True, rngs=nnx.Rngs(0))
    head = idisc.ISDHead(SMALL, rngs=nnx.Rngs(1))
    graph, priors, rest = nnx.split(idrs, nnx.PathContains("priors"), ...)
    both = jax.tree.map(lambda p: jnp.stack([p, p[perm]]), priors)

    def forward(priors):  # one program for both orders of the priors
      idr = nnx.merge(graph, priors, rest)(pixels)
      return idr, head(pixels, idr)

    return jax.vmap(forward)(both)

  pixels = jax.random.normal(jax.random.key(2), (2, 24, SMALL.pixel_dim))
  (idr, idr_p), (depth, depth_p) = run(pixels)
  np.testing.assert_allclose(idr_p, idr[:, perm], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(depth_p, depth, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(idr_p) - np.asarray(idr)).max() > 1e-2  # the IDRs did move


def test_fusion_averages_in_depth_space():
  a, b = 0.3, 1.7
  logs = [jnp.full((2, 2, 3), a), jnp.full((2, 4, 6), b)]
  out = jax.jit(idisc.fuse_depths, static_argnums=(1, 2))(logs, 16, 24)
  assert out.shape == (2, 16, 24)
  np.testing.assert_allclose(out, (np.exp(a) + np.exp(b)) / 2, rtol=1e-6)
  assert abs((np.exp(a) + np.exp(b)) / 2 - np.exp((a + b) / 2)) > 0.1  # not log-space


def test_resize_align_corners_2x2_to_3x3_is_exact():
  x = jnp.array([[1.0, 2.0], [3.0, 5.0]]).reshape(1, 2, 2, 1)
  want = np.array([[1.0, 1.5, 2.0], [2.0, 2.75, 3.5], [3.0, 4.0, 5.0]])
  got = np.asarray(resize.resize_align_corners(x, 3, 3))[0, :, :, 0]
  np.testing.assert_array_equal(got, want)
  # jax.image.resize samples at pixel centres; for 2 -> 3 that happens to agree (edge weights
  # renormalise), for 2 -> 4 it does not, which is why it is not used.
  x4 = np.asarray(resize.resize_align_corners(x, 4, 4))[0, :, 0, 0]
  np.testing.assert_allclose(x4, [1.0, 5 / 3, 7 / 3, 3.0], rtol=1e-6)
  half_pixel = np.asarray(jax.image.resize(x, (1, 4, 4, 1), "bilinear"))[0, :, 0, 0]
  np.testing.assert_allclose(half_pixel, [1.0, 1.5, 2.5, 3.0], rtol=1e-6)
  np.testing.assert_allclose(resize.interpolation_matrix(5, 3).sum(1), 1.0, rtol=1e-6)


def test_sine_position_embedding_is_detr_like():
  pe = idisc.sine_position_embedding(4, 6, 16)
  assert pe.shape == (4, 6, 16)
  np.testing.assert_array_equal(pe[:, 0, :8], pe[:, 5, :8])   # row half ignores the column
  np.testing.assert_array_equal(pe[0, :, 8:], pe[3, :, 8:])
  np.testing.assert_allclose(pe[-1, 0, 0], np.sin(2 * np.pi * 4 / (4 + 1e-6)), atol=1e-6)
  np.testing.assert_allclose(pe[..., 0:8:2] ** 2 + pe[..., 1:8:2] ** 2, 1.0, rtol=1e-6)


def _param_tree(settings):
  """({"a/b/kernel", ...}, parameter count), from shapes only."""
  module = nnx.eval_shape(lambda: idisc.IDisc(settings, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return ({"/".join(map(str, p)) for p, _ in flat},
          sum(int(np.prod(v.get_value().shape)) for _, v in flat))


def test_variants_parameter_trees():
  full, n_full = _param_tree(SMALL)
  assert any(p.startswith("idrs/0/attention/") for p in full)
  assert any(p.startswith("isd/2/attention/0/") for p in full)
  base = idisc.settings_from({**dataclasses.asdict(SMALL), "variant": "baseline"})
  tree, n_base = _param_tree(base)
  assert not any(p.startswith(("idrs", "isd")) or "attention" in p for p in tree)
  assert any(p.startswith("heads/0/mlp/") for p in tree)
  assert abs(n_base - n_full) / n_full < 0.10
  no_afp, _ = _param_tree(dataclasses.replace(SMALL, variant="no_afp", num_idrs=8))
  assert {p for p in no_afp if p.startswith("idrs")} == {f"idrs/{i}/priors" for i in range(3)}
  assert any(p.startswith("isd/0/attention/0/") for p in no_afp)


@pytest.mark.parametrize("overrides,match", [
    ({"num_idrs": 0}, r"'model.num_idrs'=0 must be a positive int"),
    ({"num_idrs": -3}, r"'model.num_idrs'=-3"),
    ({"variant": "afp_only"}, r"'model.variant'='afp_only' is not one of"),
    ({"pixel_dim": 18}, r"'model.pixel_dim'=18 must be a multiple of 4"),
    ({"attention": "flash"}, r"'model.attention'='flash'"),
])
def test_bad_settings_are_one_line_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match) as info:
    idisc.settings_from({**dataclasses.asdict(SMALL), **overrides})
  assert "\n" not in str(info.value)


def test_image_size_must_be_a_multiple_of_32():
  forward = lambda H, W: nnx.eval_shape(
      lambda: idisc.IDisc(SMALL, rngs=nnx.Rngs(0))(jnp.zeros((1, H, W, 3))))
  with pytest.raises(ConfigError, match=r"batch 'image' is 48x64: height and width must be "
                                        r"multiples of 32") as info:
    forward(48, 64)
  assert "\n" not in str(info.value)
  assert forward(64, 32).shape == (1, 64, 32)
