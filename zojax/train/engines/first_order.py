"""First-order training: gradients by backprop through `Model.loss`, any optax optimizer.

Runs any model. A non-finite loss or gradient skips the step inside the optimizer
(`zojax.optim.skip_nonfinite`, which `zojax.train.optimizer.build` wraps around every
first-order optimizer): params and optimizer state stay as they were, the skip counter
counts it, and the model state is not updated either.
"""

from __future__ import annotations

import jax
import optax

from zojax.models import Model
from zojax.train import memory
from zojax.train.engines import base


def make_step(model: Model, tx: optax.GradientTransformation):
  """The pure step ``(TrainState, batch) -> (TrainState, outputs)``; jit it yourself."""

  def step(state: base.TrainState, batch):
    def loss_fn(params):
      loss, metrics, aux = model.loss(params, state.model_state, batch)
      return loss, (metrics, aux)

    (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    skipped = base.skipped_steps(opt_state) > base.skipped_steps(state.opt_state)
    new_state = base.TrainState(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        model_state=base.step_model_state(model, state.model_state, aux, state.step, ~skipped),
        opt_state=opt_state, rng=state.rng)
    out = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": skipped,
           **base.accuracy(metrics),
           **base.model_step_metrics(model, metrics, new_state.model_state)}
    return new_state, out

  return step


class FirstOrderEngine(base.TrainStateEngine):
  """`base.Engine` for backprop training (see the module docstring)."""

  def __init__(self, config, model: Model, tx: optax.GradientTransformation, mesh):
    self.model, self.tx = model, tx
    self.placed = base.PlacedState(config, model, tx, mesh)
    self.batch_sharding = base.sharding.batch_sharding(mesh)
    sh = self.placed.shardings
    self._step = jax.jit(make_step(model, tx), in_shardings=(sh, self.batch_sharding),
                         out_shardings=(sh, None), donate_argnums=0)
    self._compiled = None

  def compile(self, state, batch) -> dict:
    self._compiled = self._step.lower(state, batch).compile()
    return memory.step_memory(self._compiled)

  def step(self, state, batch):
    return (self._compiled or self._step)(state, batch)
