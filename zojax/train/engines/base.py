"""The engine protocol, and the train state and placement the first-order and dense-ZO
engines share.

An engine turns (config, model, mesh) into a training step. `zojax.train.loop.train`
drives any engine through these methods and nothing else:

  abstract = engine.abstract_state()       # shapes + shardings, for restoring a checkpoint
  state = engine.init()                    # or the restored state
  memory = engine.compile(state, batch)    # compiles the step for these shapes; its bytes
  state, out = engine.step(state, batch)   # out: device scalars (loss, skipped, ...)
  state = engine.finalize(state)           # settle pending work: before saving and at the end
  params, model_state = engine.params(state)   # current weights, placed for evaluation
  engine.nonfinite(state)                  # steps skipped for a non-finite loss/update
  engine.meta() / engine.load_meta(meta)   # JSON-able run record kept with each checkpoint
  engine.results(state, workdir)           # end-of-run extras for results.json

State is built the big_vision way: shapes by `jax.eval_shape`, shardings from the model's
logical axes and the config's mesh rules, a jitted init with `out_shardings`, a step with
donated state.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax.errors import ConfigError
from zojax.models import Model
from zojax.optim.skip import SkipNonfiniteState
from zojax.train import checkpoint, sharding


class Engine(Protocol):
  """What `loop.train` needs from an engine (see the module docstring)."""

  batch_sharding: jax.sharding.Sharding

  def abstract_state(self) -> Any: ...
  def init(self) -> Any: ...
  def compile(self, state, batch) -> dict: ...
  def step(self, state, batch) -> tuple[Any, dict]: ...
  def finalize(self, state) -> Any: ...
  def params(self, state) -> tuple[Any, Any]: ...
  def nonfinite(self, state) -> int: ...
  def meta(self) -> dict: ...
  def load_meta(self, meta: dict) -> None: ...
  def results(self, state, workdir) -> dict: ...


class TrainState(NamedTuple):
  """The state of a first-order or dense-ZO run: all of it is in every checkpoint."""

  step: jax.Array         # int32 []: steps taken; also the data-iterator position
  params: Any
  model_state: Any        # non-trainable arrays (`Model.init_state`); {} when none
  opt_state: Any          # counts skipped (non-finite) steps: `zojax.optim.skip_nonfinite`
  rng: jax.Array          # uint32 key data (raw, so orbax stores it as a plain array)


def initial_params(config, model: Model, shardings):
  """The run's starting weights, placed: published weights or a jitted random init."""
  if config.model.get("init", "random") == "pretrained":
    if model.pretrained is None:
      raise ConfigError(f"config key 'model.init'='pretrained': model {model.name!r} has no "
                        "published weights; use model.init='random'")
    return jax.device_put(model.pretrained(), shardings)
  return jax.jit(model.init, out_shardings=shardings)(jax.random.key(config.seed))


def skipped_steps(opt_state) -> jax.Array:
  """The skip counter of the outermost `zojax.optim.skip_nonfinite` (what engines build)."""
  if not isinstance(opt_state, SkipNonfiniteState):
    raise ValueError(f"optimizer state is a {type(opt_state).__name__}, not a "
                     "SkipNonfiniteState: wrap the optimizer in zojax.optim.skip_nonfinite")
  return opt_state.skipped


def model_step_metrics(model: Model, metrics, model_state) -> dict:
  """The model's own per-step log values (`Model.step_metrics`), {} when it has none."""
  return model.step_metrics(metrics, model_state) if model.step_metrics else {}


def step_model_state(model: Model, model_state, aux, step, ok):
  """`model.update_state` after a step, unless the step was skipped (`ok` False)."""
  if model.update_state is None:
    return model_state
  new = model.update_state(model_state, aux, step)
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o).astype(o.dtype), new, model_state)


class PlacedState:
  """TrainState shapes and shardings for a model and optimizer on a mesh, and its init."""

  def __init__(self, config, model: Model, tx: optax.GradientTransformation, mesh):
    self.config, self.model, self.tx, self.mesh = config, model, tx, mesh
    self.replicated = NamedSharding(mesh, P())
    self.shapes = jax.eval_shape(self._init, model.param_shapes(), model.state_shapes(),
                                 jax.random.key(config.seed))
    rules = [tuple(r) for r in config.mesh.rules]
    params_sh = sharding.param_shardings(self.shapes.params, model.axes, rules, mesh)
    self.shardings = TrainState(
        step=self.replicated, params=params_sh,
        model_state=jax.tree.map(lambda _: self.replicated, self.shapes.model_state),
        opt_state=sharding.optimizer_state_shardings(tx, self.shapes.opt_state, params_sh, mesh,
                                                     param_shapes=self.shapes.params),
        rng=self.replicated)

  def _init(self, params, model_state, key) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=self.tx.init(params), rng=jax.random.key_data(key))

  def abstract(self) -> TrainState:
    return checkpoint.abstract(self.shapes, self.shardings)

  def initial_params(self):
    return initial_params(self.config, self.model, self.shardings.params)

  def init(self) -> TrainState:
    """The initial TrainState, placed (params are arguments: never constants in the HLO)."""
    key = jax.random.key(self.config.seed)
    model_state = jax.jit(self.model.init_state, out_shardings=self.shardings.model_state)(key)
    return jax.jit(self._init, out_shardings=self.shardings, donate_argnums=(0, 1))(
        self.initial_params(), model_state, key)


def accuracy(metrics: dict) -> dict:
  """Per-step accuracy from metric sums, when the model reports `correct`."""
  if "correct" not in metrics:
    return {}
  return {"accuracy": metrics["correct"] / jnp.maximum(metrics["count"], 1.0)}



class TrainStateEngine:
  """What the first-order and dense-ZO engines share: a placed `TrainState`, no pending work.

  Subclasses set ``placed`` (a `PlacedState`) and ``batch_sharding`` and define `compile`
  and `step`; `meta` / `load_meta` / `results` default to "nothing to record".
  """

  placed: PlacedState

  def abstract_state(self) -> TrainState:
    return self.placed.abstract()

  def init(self) -> TrainState:
    return self.placed.init()

  def finalize(self, state: TrainState) -> TrainState:
    return state

  def params(self, state: TrainState):
    return state.params, state.model_state

  def nonfinite(self, state: TrainState) -> int:
    return int(skipped_steps(state.opt_state))

  def meta(self) -> dict:
    return {}

  def load_meta(self, meta: dict) -> None:
    del meta

  def results(self, state, workdir) -> dict:
    del state, workdir
    return {}
