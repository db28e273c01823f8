"""Config loading (`path.py:arg`), `key=value` overrides, and validation with one-line errors.

Configs are Python files whose `get_config(arg)` returns an `ml_collections.ConfigDict`.
The dict is locked before overrides apply, so a misspelt key fails instead of being
silently added, and ConfigDict's own type checking rejects e.g. a string for an int.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import ml_collections

from zojax.errors import ConfigError  # re-exported: callers catch config.ConfigError


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `configs/x.py` or `configs/x.py:arg`."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"--config: no such file {path!r}")
  # Config files import their siblings as `configs.common`: put the folder's parent on the path.
  root = str(file.absolute().parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(f"zojax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: {path} defines no get_config(arg)")
  try:
    config = module.get_config(arg or None)
  except ValueError as e:  # a bad `:arg` (configs/common.parse_arg names the field)
    raise ConfigError(f"--config {spec}: {str(e).splitlines()[0]}") from None
  config.lock()
  return config


def parse_value(text: str):
  """Python literal if it parses as one (3, 1e-4, True, None, (1, 2)), else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override(config: ml_collections.ConfigDict, assignments: list[str]) -> None:
  """Applies `a.b=value` overrides in place; unknown keys and wrong types raise ConfigError."""
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} (in {key!r})")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"unknown config key {key!r}")
    value = parse_value(text)
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config key {key!r}: cannot set {value!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]})") from None


def _require(ok: bool, key: str, value, why: str) -> None:
  if not ok:
    raise ConfigError(f"config key {key!r}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values the code would otherwise trip over deep inside a jitted step."""
  t, o = config.train, config.optim
  _require(t.steps > 0, "train.steps", t.steps, "must be positive")
  _require(t.batch_size > 0, "train.batch_size", t.batch_size, "must be positive")
  _require(t.eval_batch_size > 0, "train.eval_batch_size", t.eval_batch_size, "must be positive")
  _require(t.checkpoint_every > 0, "train.checkpoint_every", t.checkpoint_every,
           "must be positive")
  _require(t.keep_checkpoints > 0, "train.keep_checkpoints", t.keep_checkpoints,
           "must be positive")
  _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = only at end)")
  _require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
  _require(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", t.max_nonfinite_steps,
           "must be >= 0")
  _require(t.halt_at_step is None or 0 < t.halt_at_step <= t.steps, "train.halt_at_step",
           t.halt_at_step, f"must be None or in 1..train.steps={t.steps}")
  _require(o.learning_rate >= 0, "optim.learning_rate", o.learning_rate, "must be >= 0")
  _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
  if o.name.startswith("zo_"):
    z = config.zo
    _require(z.eps > 0, "zo.eps", z.eps, "must be > 0")
    _require(z.num_samples >= 1, "zo.num_samples", z.num_samples, "must be >= 1")
    _require(isinstance(z.microbatches, int) and z.microbatches >= 1, "zo.microbatches",
             z.microbatches, "must be an integer >= 1")
    _require(t.batch_size % z.microbatches == 0, "zo.microbatches", z.microbatches,
             f"must divide train.batch_size={t.batch_size}")
    _require(z.branch_group in (1, 2), "zo.branch_group", z.branch_group, "must be 1 or 2")
    from zojax.zo.perturb import DIRECTIONS  # noqa: PLC0415 (imports jax: ZO configs only)
    _require(z.direction in DIRECTIONS, "zo.direction", z.direction, f"must be one of {DIRECTIONS}")
    _require(not o.grad_clip, "optim.grad_clip", o.grad_clip,
             "gradient clipping does not apply to zeroth-order optimizers; set it to 0")
  _validate_zo_engine(config)
  if o.name in ("galore_adamw", "galore8bit", "natural_galore"):
    _validate_galore(o)
  # Model-specific keys (dtype, attention, sizes) are checked by the model's registry factory.
  _require(config.model.get("init", "random") in ("pretrained", "random"), "model.init",
           config.model.get("init"), "must be 'pretrained' or 'random'")


def _validate_zo_engine(config) -> None:
  z = config.zo
  _require(z.engine in ("dense", "stream"), "zo.engine", z.engine, "must be 'dense' or 'stream'")
  if z.engine != "stream":
    return
  # The streamed engine has only a layer-wise form of the ZO optimizers.
  _require(config.optim.name in ("zo_sgd", "zo_adam", "zo_sign"), "zo.engine", z.engine,
           f"needs optim.name zo_sgd, zo_adam or zo_sign, got {config.optim.name!r}")
  _require(isinstance(z.resident_blocks, int) and z.resident_blocks >= 0, "zo.resident_blocks",
           z.resident_blocks, "must be an integer >= 0")
  _require(z.memory_kind in ("pinned_host", "unpinned_host"), "zo.memory_kind", z.memory_kind,
           "must be 'pinned_host' or 'unpinned_host'")


def _validate_galore(o) -> None:
  # Imported here: loading and checking a config needs no jax otherwise.
  from zojax.optim.galore_transform import (  # noqa: PLC0415
      MOMENT_POLICIES, PROJ_TYPES, PROJECTOR_METHODS)
  _require("galore" in o, "optim.galore", None,
           f"optim.name={o.name!r} needs an optim.galore block (configs/common.galore_settings)")
  g = o.galore
  _require(g.rank > 0, "optim.galore.rank", g.rank, "must be positive")
  _require(g.update_proj_gap > 0, "optim.galore.update_proj_gap", g.update_proj_gap,
           "must be positive")
  _require(g.proj_type in PROJ_TYPES, "optim.galore.proj_type", g.proj_type,
           f"must be one of {PROJ_TYPES}")
  _require(g.projector in PROJECTOR_METHODS, "optim.galore.projector", g.projector,
           f"must be one of {PROJECTOR_METHODS}")
  _require(g.moment_policy in MOMENT_POLICIES, "optim.galore.moment_policy",
           g.moment_policy, f"must be one of {MOMENT_POLICIES}")
  _require(not (o.name == "galore8bit" and g.moment_policy == "reproject"),
           "optim.galore.moment_policy", g.moment_policy,
           "8-bit moments cannot be reprojected; use 'keep' or 'reset'")
  _require(g.power_iters >= 0, "optim.galore.power_iters", g.power_iters, "must be >= 0")
  _require(g.history >= 1, "optim.galore.history", g.history, "must be >= 1")
  _require(g.damping > 0, "optim.galore.damping", g.damping, "must be > 0")
