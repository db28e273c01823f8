"""Dense zeroth-order training (MeZO): an SPSA estimate from forward passes, then the update.

Runs any model. With a block view the perturbation is formed one layer at a time inside the
block scan (`zojax.zo.spsa` on the `BlockModel`); without one, the whole parameter tree is
perturbed (`spsa`'s generic path over ``Model.loss``).

The step is two compiled programs, the estimate and the update (`zojax.zo.make_apply`), so
that `zojax.zo.replay` can rerun the very same compiled update and rebuild the weights bit
for bit from the seed log, which is kept with every checkpoint.

Model state: ZO has no training forward at θ. A stateful model with a block view (MoE router
loads) updates its state from the head's metric sums of the first perturbed forward, at
θ + εz_0 (`spsa(with_metrics=True)`): no extra forward. One without a block view (a Flax
model with BatchNorm) gets one extra unperturbed forward for its aux: three forwards a step.
"""

from __future__ import annotations

import jax
import numpy as np

from zojax import zo
from zojax.errors import ConfigError
from zojax.models import Model
from zojax.train import distributed, memory
from zojax.train.engines import base


def aux_from_branch(model: Model) -> bool:
  """Whether the estimate also returns the + branch's metrics as the model's aux."""
  return model.block_view is not None and model.update_state is not None


def estimate_fn(model: Model, zo_cfg):
  """The pure SPSA estimate ``(params, model_state, batch, rng, step) -> (loss, ZOGrad)``.

  For `aux_from_branch` models it returns (loss, ZOGrad, metric sums at θ + εz_0).
  """
  with_metrics = aux_from_branch(model)

  def estimate(params, model_state, batch, rng, step):
    if model.block_view is not None:
      fn = model.block_view(model_state)
    else:
      fn = lambda p, b: model.loss(p, model_state, b)[0]
    return zo.spsa(fn, params, batch, rng, step=step, eps=zo_cfg.eps,
                   num_samples=zo_cfg.num_samples, one_sided=zo_cfg.one_sided,
                   microbatches=zo_cfg.microbatches, with_metrics=with_metrics,
                   direction=zo_cfg.direction)

  return estimate


class SeedLogged:
  """A ZO engine's seed log: kept with every checkpoint, written next to the results."""

  log: zo.ZOLog

  def meta(self) -> dict:
    return {"zo_log": self.log.to_json()}

  def load_meta(self, meta: dict) -> None:
    log = zo.ZOLog.from_json(meta["zo_log"])
    if log.direction != self.log.direction:  # one run, one distribution of z
      raise ConfigError(f"config key 'zo.direction'={self.log.direction!r} differs from the "
                        f"checkpoint's seed log ({log.direction!r}); resume with that direction")
    self.log = log

  def save_log(self, workdir) -> dict:
    if not distributed.is_primary():  # many processes: process 0 writes the run's files
      return {}
    path = workdir / "zo_log.json"
    self.log.save(path)
    return {"zo_log_bytes": path.stat().st_size}


class DenseZOEngine(SeedLogged, base.TrainStateEngine):
  """`base.Engine` for dense ZO (see the module docstring). Keeps the run's `ZOLog`."""

  def __init__(self, config, model: Model, tx, mesh):
    self.config, self.model, self.tx = config, model, tx
    self.placed = base.PlacedState(config, model, tx, mesh)
    self.batch_sharding = base.sharding.batch_sharding(mesh)
    self.log = zo.ZOLog.start(jax.random.key(config.seed), config.zo.direction)
    sh = self.placed.shardings
    rep = self.placed.replicated
    self._estimate = jax.jit(estimate_fn(model, config.zo),
                             in_shardings=(sh.params, sh.model_state, self.batch_sharding, rep,
                                           rep))
    self._apply = zo.make_apply(tx, donate=True)
    self._model_state = self._step_metrics = None
    if aux_from_branch(model):
      def from_branch(model_state, aux, step, ok):
        new = base.step_model_state(model, model_state, aux, step, ok)
        return new, base.model_step_metrics(model, aux, new)
      self._model_state = jax.jit(from_branch, donate_argnums=0)
    elif model.update_state is not None:
      def extra_forward(params, model_state, batch, step, ok):
        aux = model.loss(params, model_state, batch)[2]
        return base.step_model_state(model, model_state, aux, step, ok), {}
      self._model_state = jax.jit(extra_forward, donate_argnums=1)

  def compile(self, state, batch) -> dict:
    """Compiles the estimate; memory of the estimate and the update (run one after another)."""
    args = (state.params, state.model_state, batch, state.rng, state.step)
    self._estimate = self._estimate.lower(*args).compile()
    zograd = self._estimate.out_info[1]
    update = memory.step_memory(self._apply.lower(state.params, state.opt_state, zograd).compile())
    out = memory.step_memory(self._estimate)
    out["estimate_peak_bytes"] = out.get("peak_bytes")
    out["update_peak_bytes"] = update.get("peak_bytes")
    if None not in (out["estimate_peak_bytes"], out["update_peak_bytes"]):
      out["peak_bytes"] = max(out["estimate_peak_bytes"], out["update_peak_bytes"])
    return out

  def step(self, state: base.TrainState, batch):
    loss, zograd, *aux = self._estimate(state.params, state.model_state, batch, state.rng,
                                        state.step)
    model_state, extra = state.model_state, {}
    if aux:
      model_state, extra = self._model_state(model_state, aux[0], state.step, zograd.finite)
    elif self._model_state is not None:
      model_state, extra = self._model_state(state.params, model_state, batch, state.step,
                                             zograd.finite)
    params, opt_state = self._apply(state.params, state.opt_state, zograd)
    self.log.append(zograd)
    state = base.TrainState(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, rng=state.rng)
    return state, {**zo_outputs(loss, zograd), **extra}

  def results(self, state, workdir) -> dict:
    out = self.save_log(workdir)
    if self.config.zo.verify_replay:
      replayed, _ = zo.replay(self.placed.initial_params(), self.log, self.tx, apply=self._apply)
      out["replay_bit_identical"] = all(
          bool(np.array_equal(a, b)) for a, b in
          zip(jax.tree.leaves(distributed.fetch(replayed)),
              jax.tree.leaves(distributed.fetch(state.params))))
    return out


def zo_outputs(loss, zograd: zo.ZOGrad) -> dict:
  """A ZO step's outputs, named as the first-order step's."""
  return {"loss": loss, "skipped": ~zograd.finite, "projected_grad": zograd.coeffs.mean()}
