"""Builds the optax optimizer a config names: first-order (optax) or zeroth-order (zojax.optim)."""

from __future__ import annotations

import optax

from zojax.optim.adam8bit_transform import Adam8bitSettings, adam8bit
from zojax.optim.galore_transform import GaLoreSettings, galore8bit, galore_adamw
from zojax.optim.natural_galore_transform import natural_galore
from zojax.optim import zo as zo_optim
from zojax.optim.masks import decay_mask
from zojax.optim.skip import skip_nonfinite

SCHEDULES = ("constant", "linear", "cosine")
GALORE = ("galore_adamw", "galore8bit", "natural_galore")  # read settings from optim.galore
FIRST_ORDER = ("adamw", "sgd", "adam8bit") + GALORE
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
  elif cfg.name == "adam8bit":
    tx = adam8bit(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  settings=Adam8bitSettings(mask=decay_mask))
  elif cfg.name in GALORE:
    tx = _galore(cfg, lr)
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
  # A non-finite loss or gradient leaves params and state as they were, and is counted.
  return skip_nonfinite(tx)


def _galore(cfg, lr) -> optax.GradientTransformation:
  """GaLore family from `cfg.galore` (see configs/common.galore_settings). Projected leaves
  train at learning_rate * galore.scale (the official convention)."""
  g = cfg.galore
  settings = GaLoreSettings(rank=g.rank, update_proj_gap=g.update_proj_gap,
                            proj_type=g.proj_type, projector=g.projector,
                            power_iters=g.power_iters, stagger=g.stagger,
                            moment_policy=g.moment_policy, history=g.history, mask=decay_mask)
  common = dict(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                scale=g.scale, settings=settings)
  if cfg.name == "natural_galore":
    return natural_galore(lr, damping=g.damping, **common)
  factory = galore_adamw if cfg.name == "galore_adamw" else galore8bit
  return factory(lr, **common)
