"""Builds the optax optimizer a config names (first-order baselines; ZO lives in zojax.optim)."""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Warmup then constant / linear decay / cosine decay to 0."""
  warmup = min(cfg.warmup_steps, total_steps)
  rest = max(total_steps - warmup, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, rest)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, rest)
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of {SCHEDULES}")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay],
                              [warmup])


def decay_mask(params):
  """Weight decay on weight matrices only: not on norms (nor biases), as MeZO and HF do.

  Decided by name, since stacked norm scales [L, D] are 2-D like matrices.
  """
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return "norm" not in name and "bias" not in name
  return jax.tree_util.tree_map_with_path(keep, params)


def build(cfg, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
  elif cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.sgd(lr, momentum=cfg.momentum or None))
  else:
    raise ValueError(f"optim.name={cfg.name!r} is not one of {OPTIMIZERS}")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx
