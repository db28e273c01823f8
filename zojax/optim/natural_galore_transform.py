"""Natural GaLore: GaLore with the inverse empirical Fisher applied in the low-rank space.

Das, 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning". Per projected matrix, the last s low-rank gradients (vectorized, the columns of
G in R^{d x s}, d = r * n) form the empirical Fisher F = lambda I + G G^T. Its inverse is
applied through the Woodbury identity, which only factors an s x s matrix:

  F^{-1} g = g / lambda - G z / lambda^2,   (I + G^T G / lambda) z = G^T g   (Cholesky)

The current gradient enters the history first. The history is cleared when the leaf's
subspace is refreshed (old coordinates mean nothing in the new subspace). The preconditioned
gradient then goes to the inner optimizer (Adam by default), as in the paper.

Memory: the history is s * r * n fp32 entries per projected matrix, i.e. s / 2 times the
Adam moments it sits beside (10x at the default s = 20); `experiments/bench_galore.py`
counts it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import optax

from zojax.optim.galore_transform import (GaLoreSettings, _check_settings, galore_chain,
                                          scale_by_adam_torch, scale_by_galore)


class WoodburyFisherState(NamedTuple):
  """State of `scale_by_woodbury_fisher`.

  Attributes:
    count: int32 [], gradients seen (picks the ring-buffer slot).
    history: per projected leaf, fp32 [s, *batch, a, b] (the last s low-rank gradients;
      zero slots are empty and contribute nothing); None for full-rank leaves.
  """
  count: jax.Array
  history: Any


def woodbury_fisher_solve(g, history, damping):
  """(damping I + G G^T)^{-1} g for one matrix; `history` [s, a, b] holds G's columns."""
  s = history.shape[0]
  gs = history.reshape(s, -1)
  gf = g.reshape(-1)
  k = jnp.eye(s, dtype=jnp.float32) + gs @ gs.T / damping
  z = jsl.cho_solve(jsl.cho_factor(k, lower=True), gs @ gf)
  return (gf / damping - gs.T @ z / damping ** 2).reshape(g.shape)


def scale_by_woodbury_fisher(damping: float = 1e-3, *,
                             settings: GaLoreSettings = GaLoreSettings()
                             ) -> optax.GradientTransformationExtraArgs:
  """Inverse empirical Fisher over a ring buffer of the last s low-rank gradients (per matrix).

    u = (damping I + G G^T)^{-1} g,    G = [g_{t-s+1}, ..., g_t]

  Meant as GaLore's `low_rank_transform`: leaves are low-rank gradients [*batch, a, b] or
  None; the `refreshed` extra argument (bool scalar per leaf) clears a leaf's history.

  Args:
    damping: lambda; a number or a traced scalar.
    settings: its `history` is s (the rest is GaLore's).

  Returns:
    A `GradientTransformationExtraArgs` with state `WoodburyFisherState`.
  """
  history = _check_settings("scale_by_woodbury_fisher", settings).history

  def init_fn(params):
    hist = jax.tree.map(lambda x: jnp.zeros((history, *x.shape), jnp.float32), params)
    return WoodburyFisherState(count=jnp.zeros([], jnp.int32), history=hist)

  def update_fn(updates, state, params=None, *, refreshed=None, **extra_args):
    del params, extra_args
    slot = state.count % history
    if refreshed is None:
      refreshed = jax.tree.map(lambda _: jnp.zeros([], bool), updates)

    def one(g, hist, clear):
      hist = jnp.where(clear, jnp.zeros_like(hist), hist)
      hist = jax.lax.dynamic_update_index_in_dim(hist, g.astype(jnp.float32), slot, 0)
      fn = lambda gg, hh: woodbury_fisher_solve(gg, hh, damping)
      for _ in range(g.ndim - 2):  # per matrix of a stacked leaf
        fn = jax.vmap(fn, in_axes=(0, 1))
      return fn(g.astype(jnp.float32), hist).astype(g.dtype), hist

    out = jax.tree.map(one, updates, state.history, refreshed)
    treedef = jax.tree.structure(updates)
    pairs = treedef.flatten_up_to(out)
    new_updates = treedef.unflatten([p[0] for p in pairs])
    new_hist = treedef.unflatten([p[1] for p in pairs])
    return new_updates, WoodburyFisherState(count=state.count + 1, history=new_hist)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    scale: float = 0.25,
    damping: float = 1e-3,
    settings: GaLoreSettings = GaLoreSettings(),
) -> optax.GradientTransformationExtraArgs:
  """Natural GaLore-AdamW: GaLore-AdamW whose low-rank gradients are Fisher-preconditioned first.

    W_t = W_{t-1} - lr * (scale * P_t Adam(F_t^{-1} P_t^T G_t) + weight_decay * W_{t-1})

  Same learning-rate convention as `galore_adamw` (projected leaves at lr * scale). The
  Fisher history (`settings.history` gradients) is cleared at a refresh; the moments follow
  `settings.moment_policy` ("keep", the official policy, by default).

  Args:
    learning_rate, b1, b2, eps, weight_decay, scale: as `zojax.optim.galore_adamw`.
    damping: lambda of the empirical Fisher; a number or a traced scalar.
    settings: as `zojax.optim.galore_adamw`; its `history` is s.

  Returns:
    A `GradientTransformationExtraArgs`.

  Example:
    >>> tx = natural_galore(1e-2, damping=1e-3, settings=GaLoreSettings(rank=128, history=20))
  """
  direction = scale_by_galore(
      scale_by_adam_torch(b1=b1, b2=b2, eps=eps), scale=scale, settings=settings,
      low_rank_transform=scale_by_woodbury_fisher(damping, settings=settings))
  return galore_chain(direction, learning_rate, weight_decay, settings.mask)
