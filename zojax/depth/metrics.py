"""SIlog loss and depth metrics, as sums that add over eval batches and devices.

Loss (Eigen et al. 2014, as iDisc trains it):

  SIlog = 10 · sqrt(Var(g) + 0.15 · mean(g)² + 1e-6),   g = log(p + 1e-6) − log(gt + 1e-6),

over valid pixels (gt > `MIN_DEPTH`), Var with ddof = 1. During training it pools every valid
pixel of the batch, as the official code does (it masks the whole batch at once).

Metrics, and how they are averaged over an eval set. The official evaluation
(SysCV/idisc, utils/metrics.py) pools pixels within each eval batch for δk, AbsRel, SqRel
and log10, then averages batches weighted by their image count; it computes RMSE, RMSElog
and SIlog per image and averages images. Here:

  * pooled over every valid pixel of the split: δ1..3 (max(gt/p, p/gt) < 1.25^k, strictly),
    AbsRel |p−gt|/gt, SqRel (p−gt)²/gt, log10 |log10 p − log10 gt|. This equals the official
    number when each eval batch holds the same number of valid pixels (e.g. one image per
    batch, or a fixed crop with no invalid depth); otherwise the official value depends on
    the eval batch size and ours is its limit for one batch;
  * per image, then averaged over images: RMSE sqrt(mean (p−gt)² + 1e-6), RMSElog
    sqrt(mean (log p − log gt)² + 1e-6) (the official +1e-6 kept), and the SIlog metric
    100 · sqrt(Var_ddof1(log p − log gt)). Images with no valid pixel (SIlog: fewer than
    two) are left out of these averages, as the official code leaves them out.

`metric_sums` returns ``<name>_sum`` with a ``<name>_count`` beside it (valid pixels or
images), the convention `zojax.train.loop.evaluate` divides.

Logs are taken only where a pixel is valid (`safe_log`), so a masked gt of 0 gives finite
values and finite gradients.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

MIN_DEPTH = 0.01        # valid means gt > MIN_DEPTH (iDisc's NYU setting)
LOSS_SCALE = 10.0       # the official loss weight
VARIANCE_FOCUS = 0.15   # weight of mean(g)² (λ in the paper)
EPS = 1e-6
POOLED = ("d1", "d2", "d3", "abs_rel", "sq_rel", "log10")
PER_IMAGE = ("rmse", "rmse_log", "silog")


def valid_mask(gt_BxHxW, *masks):
  """gt > MIN_DEPTH, and-ed with any further masks (eval crop, padding weight)."""
  valid = gt_BxHxW > MIN_DEPTH
  for m in masks:
    valid = valid & (m > 0)
  return valid


def safe_log(x, valid):
  """log(x) where valid, 0 elsewhere; the masked branch never sees log(0)."""
  return jnp.where(valid, jnp.log(jnp.where(valid, x, 1.0)), 0.0)


def _log_error(pred, gt, valid):
  """g = log(p + eps) − log(gt + eps) on valid pixels, 0 elsewhere (the loss's g)."""
  return jnp.where(valid, safe_log(pred + EPS, valid) - safe_log(gt + EPS, valid), 0.0)


def _silog(g, valid, axes):
  n = jnp.sum(valid, axis=axes, dtype=jnp.float32)
  mean = jnp.sum(g, axis=axes) / jnp.maximum(n, 1.0)
  centred = jnp.where(valid, g - jnp.expand_dims(mean, axes), 0.0)
  var = jnp.sum(centred ** 2, axis=axes) / jnp.maximum(n - 1.0, 1.0)
  return LOSS_SCALE * jnp.sqrt(var + VARIANCE_FOCUS * mean ** 2 + EPS), n


def silog_loss(pred_BxHxW, gt_BxHxW, valid_BxHxW):
  """(SIlog over every valid pixel of the batch, number of valid pixels).

  With no valid pixel the value is 10·sqrt(1e-6) with zero gradient; the caller decides
  what such a batch means (`zojax.models.idisc.depth_loss` skips the step).
  """
  axes = tuple(range(pred_BxHxW.ndim))
  return _silog(_log_error(pred_BxHxW, gt_BxHxW, valid_BxHxW), valid_BxHxW, axes)


def silog_loss_per_image(pred_BxHxW, gt_BxHxW, valid_BxHxW):
  """([B] SIlog of each image, [B] valid pixels of each image)."""
  return _silog(_log_error(pred_BxHxW, gt_BxHxW, valid_BxHxW), valid_BxHxW, (1, 2))


def metric_sums(pred_BxHxW, gt_BxHxW, valid_BxHxW) -> dict:
  """Metric sums and their counts (see the module docstring for pooling).

  Returns ``{name}_sum`` and ``{name}_count`` for name in `POOLED` (count: valid pixels)
  and `PER_IMAGE` (count: images with enough valid pixels). Padding rows must already be
  masked out of `valid_BxHxW`.
  """
  valid = valid_BxHxW
  f32 = lambda x: x.astype(jnp.float32)
  p, gt = f32(pred_BxHxW), f32(gt_BxHxW)
  safe_p, safe_gt = jnp.where(valid, p, 1.0), jnp.where(valid, gt, 1.0)
  log_p, log_gt = safe_log(p, valid), safe_log(gt, valid)
  ratio = jnp.maximum(safe_gt / safe_p, safe_p / safe_gt)
  pixel = {f"d{k}": f32(ratio < 1.25 ** k) for k in (1, 2, 3)}
  pixel["abs_rel"] = jnp.abs(safe_p - safe_gt) / safe_gt
  pixel["sq_rel"] = (safe_p - safe_gt) ** 2 / safe_gt
  pixel["log10"] = jnp.abs(log_p - log_gt) / np.log(10.0)
  pixels = jnp.sum(valid, dtype=jnp.float32)
  out = {}
  for name, value in pixel.items():
    out[f"{name}_sum"] = jnp.sum(jnp.where(valid, value, 0.0))
    out[f"{name}_count"] = pixels

  n_B = jnp.sum(valid, axis=(1, 2), dtype=jnp.float32)
  mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0), axis=(1, 2)) / jnp.maximum(n_B, 1.0)
  g = log_p - log_gt
  g_mean = mean(g)
  var = (jnp.sum(jnp.where(valid, (g - g_mean[:, None, None]) ** 2, 0.0), axis=(1, 2))
         / jnp.maximum(n_B - 1.0, 1.0))
  has1, has2 = f32(n_B >= 1), f32(n_B >= 2)
  per_image = {"rmse": (jnp.sqrt(mean((safe_p - safe_gt) ** 2) + EPS), has1),
               "rmse_log": (jnp.sqrt(mean(g ** 2) + EPS), has1),
               "silog": (100.0 * jnp.sqrt(var), has2)}
  for name, (value_B, counted_B) in per_image.items():
    out[f"{name}_sum"] = jnp.sum(counted_B * value_B)
    out[f"{name}_count"] = jnp.sum(counted_B)
  return out


def finish(sums: dict) -> dict:
  """Metric sums -> averages (name -> sum / count); a zero count gives NaN."""
  return {k[:-4]: float(v) / float(sums[k[:-4] + "_count"]) if float(sums[k[:-4] + "_count"])
          else float("nan") for k, v in sums.items() if k.endswith("_sum")
          and k[:-4] + "_count" in sums}


def median_scale(pred_HxW: np.ndarray, gt_HxW: np.ndarray, valid_HxW: np.ndarray) -> np.ndarray:
  """pred · median(gt)/median(pred) over valid pixels: the zero-shot scale alignment."""
  valid = np.asarray(valid_HxW, bool)
  if not valid.any():
    raise ValueError("median_scale: no valid pixel")
  return pred_HxW * (np.median(gt_HxW[valid]) / np.median(pred_HxW[valid]))
