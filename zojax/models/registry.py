"""Model registry: `model.name` in a config -> a factory that builds the `Model`.

  @registry.register("my-net")
  def my_net(cfg, task) -> Model: ...

  model = registry.build(config.model, task)

A factory receives the config's ``model`` block and the built task (for sizes such as the
tokenizer's vocabulary) and raises `zojax.errors.ConfigError` naming any bad key. Modules
register on import; `zojax.models` imports every built-in one.
"""

from __future__ import annotations

from typing import Any, Callable

from zojax.errors import ConfigError
from zojax.models.interface import Model

Factory = Callable[[Any, Any], Model]
_FACTORIES: dict[str, Factory] = {}


def register(*names: str) -> Callable[[Factory], Factory]:
  """Decorator registering `factory` under each of `names` (a name may be taken once)."""

  def wrap(factory: Factory) -> Factory:
    for name in names:
      if name in _FACTORIES and _FACTORIES[name] is not factory:
        raise ValueError(f"model name {name!r} is already registered")
      _FACTORIES[name] = factory
    return factory

  return wrap


def names() -> list[str]:
  return sorted(_FACTORIES)


def build(cfg, task=None) -> Model:
  """The model `cfg.name` names, built from the config's model block (and the task)."""
  factory = _FACTORIES.get(cfg.name)
  if factory is None:
    raise ConfigError(f"config key 'model.name'={cfg.name!r} is not one of {names()}")
  model = factory(cfg, task)
  if not isinstance(model, Model):
    raise TypeError(f"model factory for {cfg.name!r} returned {type(model).__name__}, "
                    "not a zojax.models.Model")
  return model
