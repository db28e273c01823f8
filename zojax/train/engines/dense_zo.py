"""Dense zeroth-order training (MeZO): an SPSA estimate from forward passes, then the update.

Runs any model. With a block view the perturbation is formed one layer at a time inside the
block scan (`zojax.zo.spsa` on the `BlockModel`); without one, the whole parameter tree is
perturbed (`spsa`'s generic path over ``Model.loss``).

The step is two compiled programs, the estimate and the update (`zojax.zo.make_apply`), so
that `zojax.zo.replay` can rerun the very same compiled update and rebuild the weights bit
for bit from the seed log, which is kept with every checkpoint.

Model state: ZO has no training forward at θ, so for a model whose state is updated after
each step (`Model.update_state`) the engine runs one extra unperturbed forward to get its
aux: three forwards a step instead of two, for stateful models only.
"""

from __future__ import annotations

import jax
import numpy as np

from zojax import zo
from zojax.errors import ConfigError
from zojax.models import Model
from zojax.train import distributed, memory
from zojax.train.engines import base


def estimate_fn(model: Model, zo_cfg):
  """The pure SPSA estimate ``(params, model_state, batch, rng, step) -> (loss, ZOGrad)``."""

  def estimate(params, model_state, batch, rng, step):
    if model.block_view is not None:
      fn = model.block_view(model_state)
    else:
      fn = lambda p, b: model.loss(p, model_state, b)[0]
    return zo.spsa(fn, params, batch, rng, step=step, eps=zo_cfg.eps,
                   num_samples=zo_cfg.num_samples, one_sided=zo_cfg.one_sided,
                   microbatches=zo_cfg.microbatches, direction=zo_cfg.direction)

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
    self._model_state = None
    if model.update_state is not None:
      def new_model_state(params, model_state, batch, step, ok):
        aux = model.loss(params, model_state, batch)[2]
        return base.step_model_state(model, model_state, aux, step, ok)
      self._model_state = jax.jit(new_model_state, donate_argnums=1)

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
    loss, zograd = self._estimate(state.params, state.model_state, batch, state.rng, state.step)
    model_state = state.model_state
    if self._model_state is not None:
      model_state = self._model_state(state.params, model_state, batch, state.step,
                                      zograd.finite)
    params, opt_state = self._apply(state.params, state.opt_state, zograd)
    self.log.append(zograd)
    state = base.TrainState(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, rng=state.rng)
    return state, zo_outputs(loss, zograd)

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
