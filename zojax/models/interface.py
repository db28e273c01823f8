"""The model interface: what every zojax engine needs from a model, and nothing more.

A `Model` is a few pure functions over plain pytrees:

  params      = model.init(key)                          # trainable arrays
  model_state = model.init_state(key)                    # non-trainable arrays ({} if none)
  loss, metrics, aux = model.loss(params, model_state, batch)
  model_state = model.update_state(model_state, aux, step)   # after each step, if given

* ``metrics`` are sums (``loss_sum``, ``count``, ``correct``, ...) so they add across
  micro-batches, devices and eval batches; ``aux`` is whatever `update_state` needs (MoE
  token counts, fresh running statistics).
* **Model state** is never seen by an optimizer, weight decay, GaLore projection or ZO
  perturbation: engines pass it beside the params, checkpoint it with the train state, and
  replace it only through `update_state`.
* ``axes`` gives each parameter's logical axis names (a tree of tuples shaped like the
  params); the config's mesh rules map them to mesh axes.
* The optional **block view** (`block_view`) exposes the model as embed / stacked blocks /
  head (`zojax.models.protocol.BlockModel`). First-order training and dense ZO run any
  model; in-scan ZO perturbation and the streamed ZO2 engine need the block view. A model
  with both a block view and state takes as ``aux`` the head's metric sums, so a ZO engine
  can update the state from one of its perturbed forwards instead of an extra one.
* Optional reporting: `step_metrics` turns a training step's metric sums and the new state
  into logged values (per-layer router loads, ...); `eval_metrics` turns the metric sums
  totalled over an eval split into named results (MaxVio over the validation set, ...).

Models are built from a config by the registry (`zojax.models.registry`), so training code
never imports a specific model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from zojax.models import protocol

Params = Any
ModelState = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, ModelState, Batch], tuple[jax.Array, dict[str, jax.Array], Any]]


def _no_state(key: jax.Array) -> ModelState:
  del key
  return {}


@dataclasses.dataclass(frozen=True)
class Model:
  """A model as the engines see it (see the module docstring).

  Attributes:
    name: the registry name it was built under.
    init: ``key -> params``.
    axes: logical axis names per parameter (tuples of str or None), shaped like params.
    loss: ``(params, model_state, batch) -> (loss, metric sums, aux)``.
    init_state: ``key -> model_state``; the default has no state.
    update_state: ``(model_state, aux, step) -> model_state``, run after every training
      step; None when the model has no state to update.
    block_view: ``model_state -> BlockModel``, the embed / blocks / head view over the same
      params; None when the model has no stack of identical layers.
    pretrained: ``() -> params`` loading published weights; None when there are none.
    step_metrics: ``(metric sums, model_state) -> {name: array}`` logged after each training
      step (traced inside the step; arrays of any shape); None when there are none.
    eval_metrics: ``(metric sums totalled over an eval split) -> {name: float}`` beside loss
      and accuracy / perplexity (numpy, on the host); None when there are none.
    info: plain, JSON-able facts for results files (shapes, parameter count).
  """

  name: str
  init: Callable[[jax.Array], Params]
  axes: Params
  loss: LossFn
  init_state: Callable[[jax.Array], ModelState] = _no_state
  update_state: Callable[[ModelState, Any, jax.Array], ModelState] | None = None
  block_view: Callable[[ModelState], protocol.BlockModel] | None = None
  pretrained: Callable[[], Params] | None = None
  step_metrics: Callable[[dict, ModelState], dict] | None = None
  eval_metrics: Callable[[dict], dict] | None = None
  info: dict = dataclasses.field(default_factory=dict)

  def param_shapes(self, key: jax.Array | None = None) -> Params:
    """ShapeDtypeStructs of the params, nothing allocated."""
    return jax.eval_shape(self.init, jax.random.key(0) if key is None else key)

  def state_shapes(self, key: jax.Array | None = None) -> ModelState:
    """ShapeDtypeStructs of the model state, nothing allocated."""
    return jax.eval_shape(self.init_state, jax.random.key(0) if key is None else key)

  @property
  def has_state(self) -> bool:
    return bool(jax.tree.leaves(self.state_shapes()))


def from_block_model(name: str, blocks: protocol.BlockModel, *, init, axes, remat: bool = False,
                     **fields) -> Model:
  """A stateless `Model` whose loss is the block view's dense forward (embed, scan, head)."""

  def loss(params, model_state, batch):
    del model_state
    value, metrics = protocol.apply(blocks, params, batch, remat=remat)
    return value, metrics, {}

  return Model(name=name, init=init, axes=axes, loss=loss, block_view=lambda state: blocks,
               **fields)
