"""Bilinear resizing with align_corners=True (corner pixels map to corner pixels).

iDisc upsamples its per-resolution depth maps this way (PyTorch's
``F.interpolate(..., mode="bilinear", align_corners=True)``). `jax.image.resize` samples
at pixel centres (half-pixel offsets), which gives different values, so it is not a
substitute: output pixel i of n reads input position i·(m−1)/(n−1) of m.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] float32 weights of 1-D linear interpolation with aligned corners.

  Row i holds the two weights of input positions floor(x) and floor(x)+1 at
  x = i·(n_in−1)/(n_out−1) (x = 0 when n_out = 1); each row sums to 1.
  """
  if n_out < 1 or n_in < 1:
    raise ValueError(f"interpolation_matrix: sizes must be positive, got {n_out=}, {n_in=}")
  x = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
  lo = np.clip(np.floor(x).astype(np.int64), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = x - lo
  out = np.zeros((n_out, n_in), np.float64)
  np.add.at(out, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(out, (np.arange(n_out), hi), frac)
  return out.astype(np.float32)


def resize_align_corners(x_BxHxWxC, height: int, width: int):
  """Bilinear resize of [B, H, W, C] to [B, height, width, C] with aligned corners.

  Separable: rows then columns, each a small dense matmul with `interpolation_matrix`
  (exact, differentiable, and no gathers). Returns x's dtype.
  """
  _, h, w, _ = x_BxHxWxC.shape
  if (h, w) == (height, width):
    return x_BxHxWxC
  rows = jnp.asarray(interpolation_matrix(height, h), x_BxHxWxC.dtype)
  cols = jnp.asarray(interpolation_matrix(width, w), x_BxHxWxC.dtype)
  return jnp.einsum("yh,bhwc,xw->byxc", rows, x_BxHxWxC, cols)
