"""Builds the optax optimizer a config names: first-order (optax) or zeroth-order (zojax.optim)."""

from __future__ import annotations

import optax

from zojax.errors import ConfigError
from zojax.optim.adam8bit_transform import Adam8bitSettings, adam8bit
from zojax.optim.galore_transform import GaLoreSettings, galore8bit, galore_adamw
from zojax.optim.natural_galore_transform import natural_galore
from zojax.optim import zo as zo_optim
from zojax.optim.masks import decay_mask
from zojax.optim.skip import skip_nonfinite

SCHEDULES = ("constant", "linear", "cosine", "onecycle")
# optim.* keys of the onecycle schedule and their defaults (PyTorch OneCycleLR's).
ONECYCLE_DEFAULTS = {"pct_start": 0.3, "div_factor": 25.0, "final_div_factor": 1e4, "b1_min": 0.0}
GALORE = ("galore_adamw", "galore8bit", "natural_galore")  # read settings from optim.galore
FIRST_ORDER = ("adamw", "sgd", "adam8bit") + GALORE
ZEROTH_ORDER = ("zo_sgd", "zo_adam", "zo_sign")
OPTIMIZERS = FIRST_ORDER + ZEROTH_ORDER
HAS_B1 = ("adamw", "adam8bit") + GALORE  # optimizers whose b1 onecycle may cycle


def is_zeroth_order(cfg) -> bool:
  """Whether optimizer config `cfg` consumes ZO estimates (zojax.zo.ZOGrad) instead of gradients."""
  return cfg.name in ZEROTH_ORDER


def _onecycle_settings(cfg) -> dict:
  """The onecycle keys of `cfg` (defaults where a config lacks them), checked."""
  out = {k: cfg.get(k, v) for k, v in ONECYCLE_DEFAULTS.items()}
  if not 0 < out["pct_start"] < 1:
    raise ConfigError(f"config key 'optim.pct_start'={out['pct_start']!r} must be in (0, 1)")
  for key in ("div_factor", "final_div_factor"):
    if not out[key] >= 1:
      raise ConfigError(f"config key 'optim.{key}'={out[key]!r} must be >= 1")
  if out["b1_min"] and not 0 < out["b1_min"] < cfg.b1:
    raise ConfigError(f"config key 'optim.b1_min'={out['b1_min']!r} must be in "
                      f"(0, optim.b1={cfg.b1}) (0: b1 not cycled)")
  return out


def onecycle(peak: float, total_steps: int, pct_start: float, div_factor: float,
             final_div_factor: float) -> optax.Schedule:
  """Smith's one cycle with cosine annealing (PyTorch OneCycleLR, anneal_strategy='cos').

  peak/div_factor -> peak over the first pct_start of the steps, then -> peak/div_factor/
  final_div_factor at the end; `optax.cosine_onecycle_schedule`. It reaches the peak at
  step int(pct_start·T) and the end at T, where PyTorch's are one step earlier
  (pct_start·T − 1 and T − 1).
  """
  return optax.cosine_onecycle_schedule(max(total_steps, 1), peak, pct_start=pct_start,
                                        div_factor=div_factor,
                                        final_div_factor=final_div_factor)


def b1_cycle(b1: float, b1_min: float, total_steps: int, pct_start: float) -> optax.Schedule:
  """Adam's b1 mirroring onecycle's learning rate: b1 -> b1_min at the peak -> b1 (cosine),
  PyTorch OneCycleLR's cycle_momentum (max_momentum = b1, base_momentum = b1_min)."""
  total = max(total_steps, 1)
  peak = max(int(pct_start * total), 1)
  return optax.piecewise_interpolate_schedule(
      "cosine", b1, {peak: b1_min / b1, total: b1 / b1_min})


def schedule(cfg, total_steps: int) -> optax.Schedule:
  """Warmup then constant / linear decay / cosine decay to 0, or `onecycle` (no warmup:
  its rise is the warmup)."""
  if cfg.schedule == "onecycle":
    if cfg.warmup_steps:
      raise ConfigError(f"config key 'optim.warmup_steps'={cfg.warmup_steps} must be 0 with "
                        "optim.schedule='onecycle' (its first phase is the warmup)")
    o = _onecycle_settings(cfg)
    return onecycle(cfg.learning_rate, total_steps, o["pct_start"], o["div_factor"],
                    o["final_div_factor"])
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


def _b1(cfg, total_steps: int):
  """cfg.b1, or its onecycle schedule when optim.b1_min is set."""
  b1_min = cfg.get("b1_min", 0.0)
  if not b1_min:
    return cfg.b1
  if cfg.schedule != "onecycle" or cfg.name not in HAS_B1:
    raise ConfigError(f"config key 'optim.b1_min'={b1_min!r} cycles b1 under "
                      f"optim.schedule='onecycle' for {HAS_B1}; got optim.schedule="
                      f"{cfg.schedule!r}, optim.name={cfg.name!r} (set it to 0)")
  o = _onecycle_settings(cfg)
  return b1_cycle(cfg.b1, b1_min, total_steps, o["pct_start"])


def _with_b1(factory, b1, **kwargs) -> optax.GradientTransformation:
  """factory(b1=b1, **kwargs); a scheduled b1 goes through `optax.inject_hyperparams`
  (the learning rate too, so one count drives both). A callable mask stays static."""
  if not callable(b1):
    return factory(b1=b1, **kwargs)
  static = ("mask",) if callable(kwargs.get("mask")) else ()
  return optax.inject_hyperparams(factory, static_args=static)(b1=b1, **kwargs)


def build(cfg, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  b1 = _b1(cfg, total_steps)
  if cfg.name == "adamw":
    tx = _with_b1(optax.adamw, b1, learning_rate=lr, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                     optax.sgd(lr, momentum=cfg.momentum or None))
  elif cfg.name == "adam8bit":
    tx = _with_b1(adam8bit, b1, learning_rate=lr, b2=cfg.b2, eps=cfg.eps,
                  weight_decay=cfg.weight_decay, settings=Adam8bitSettings(mask=decay_mask))
  elif cfg.name in GALORE:
    tx = _galore(cfg, lr, b1)
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


def _galore(cfg, lr, b1) -> optax.GradientTransformation:
  """GaLore family from `cfg.galore` (see configs/common.galore_settings). Projected leaves
  train at learning_rate * galore.scale (the official convention)."""
  g = cfg.galore
  settings = GaLoreSettings(rank=g.rank, update_proj_gap=g.update_proj_gap,
                            proj_type=g.proj_type, projector=g.projector,
                            power_iters=g.power_iters, stagger=g.stagger,
                            moment_policy=g.moment_policy, history=g.history, mask=decay_mask)
  common = dict(learning_rate=lr, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                scale=g.scale, settings=settings)
  if cfg.name == "natural_galore":
    return _with_b1(natural_galore, b1, damping=g.damping, **common)
  factory = galore_adamw if cfg.name == "galore_adamw" else galore8bit
  return _with_b1(factory, b1, **common)
