"""Builds the optax optimizer a config names: first-order (optax) or zeroth-order (zojax.optim)."""

from __future__ import annotations

import optax

from zojax.optim import zo as zo_optim
from zojax.optim.masks import decay_mask

SCHEDULES = ("constant", "linear", "cosine")
FIRST_ORDER = ("adamw", "sgd")
ZEROTH_ORDER = ("zo_sgd", "zo_adam", "zo_sign")
OPTIMIZERS = FIRST_ORDER + ZEROTH_ORDER


def is_zeroth_order(cfg) -> bool:
  """Whether optimizer config `cfg` consumes ZO estimates (zojax.zo.ZOGrad) instead of gradients."""
  return cfg.name in ZEROTH_ORDER


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


def build(cfg, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
  elif cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.sgd(lr, momentum=cfg.momentum or None))
  elif cfg.name == "zo_sgd":
    return zo_optim.zo_sgd(lr, momentum=cfg.momentum or None, weight_decay=cfg.weight_decay)
  elif cfg.name == "zo_adam":
    return zo_optim.zo_adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "zo_sign":
    return zo_optim.zo_sign(lr, weight_decay=cfg.weight_decay)
  else:
    raise ValueError(f"optim.name={cfg.name!r} is not one of {OPTIMIZERS}")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx
