"""Streamed zeroth-order training (ZO2 / DistZO2): `zojax.zo.stream.StreamEngine` from a config.

Block weights and their optimizer state rest in host memory (``zo.memory_kind``; the first
``zo.resident_blocks`` stay on device) and visit the device one block at a time inside the
step. Needs the model's block view; a model without one is refused in one line. Model state
(MoE router biases) stays on device and is updated inside the step from the first perturbed
forward's metric sums, as in the dense engine.

  * **optimizer**: the same ZO optimizer the dense engine uses (`zojax.optim.zo_sgd` /
    `zo_adam` / `zo_sign` from `zojax.train.optimizer.build`), applied one layer at a time.
  * **layout**: one ("pert", "data") mesh over the config mesh's devices; its data axis
    becomes the layout's (DDP streaming, sliced blocks); the model axis must be 1.
  * **never stale**: the blocks lag one update behind (the pending estimate is fused into
    the next step). `params` (evaluation) reads flushed weights with the state kept;
    `finalize` (before each checkpoint) flushes the state itself and the run continues
    from it, so a resumed run retraces the straight one bit for bit. A flush applies the
    update in its own small program rather than fused into the next step, which may round
    differently, so the trajectory depends (by float rounding only) on where it was saved.
  * **memory**: device and host bytes of the compiled step apart.
  * **replay** (``zo.verify_replay``): the seed log replayed with the dense update against
    the streamed weights; the coefficients are the log's, so only the update's rounding can
    differ: agreement within `REPLAY_RTOL` x the distance the weights moved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import zo
from zojax.errors import ConfigError
from zojax.models import Model
from zojax.train import checkpoint
from zojax.train.engines import base, dense_zo
from zojax.zo import parallel, stream

# Replayed and streamed weights may differ by the update's rounding (different compiled
# programs); relative to the distance the weights moved. Far above 1 ulp per step, far
# below a missed or doubled update (which is ~1x).
REPLAY_RTOL = 1e-4


def check_model(model: Model) -> None:
  """One-line refusal of a model the streamed engine cannot run."""
  if model.block_view is None:
    raise ConfigError(f"config key 'zo.engine'='stream' needs a model with a block view "
                      f"(embed / stacked blocks / head); model {model.name!r} has none: use "
                      "zo.engine='dense'")


class StreamedZOEngine(dense_zo.SeedLogged):
  """`base.Engine` for ZO2 streaming (see the module docstring)."""

  def __init__(self, config, model: Model, tx, mesh):
    check_model(model)
    z = config.zo
    if mesh.shape.get("model", 1) != 1:
      raise ConfigError(
          f"config key 'mesh.axes'={tuple(map(tuple, config.mesh.axes))} has a model axis of "
          f"{mesh.shape['model']}: zo.engine='stream' spreads work over data only")
    num_layers = jax.tree.leaves(model.param_shapes()["blocks"])[0].shape[0]
    if z.resident_blocks > num_layers:
      raise ConfigError(f"config key 'zo.resident_blocks'={z.resident_blocks} is more than the "
                        f"model's {num_layers} blocks")
    self.config, self.model, self.tx = config, model, tx
    # The unit decomposition (micro-batches, branch grouping) comes from the config, never
    # from the mesh, so the same config takes the same trajectory on any mesh.
    layout = parallel.make_layout(1, mesh.shape.get("data", 1), devices=mesh.devices.flat)
    stateful = {}
    if model.has_state:
      stateful = dict(block_view=model.block_view, update_state=model.update_state)
    try:
      self.engine = stream.StreamEngine(
          model.block_view(model.init_state(jax.random.key(0))), tx, **stateful, eps=z.eps,
          num_samples=z.num_samples, one_sided=z.one_sided, microbatches=z.microbatches,
          branch_group=z.branch_group, resident_blocks=z.resident_blocks,
          memory_kind=z.memory_kind, layout=layout, direction=z.direction)
    except ValueError as e:
      raise ConfigError(f"config keys zo.* / mesh.axes do not fit the streamed engine: {e}") from None
    self.key = jax.random.key(config.seed)
    self.params_sharding = NamedSharding(mesh, P())  # where evaluation reads weights
    self.batch_sharding = self.engine.batch_sharding()
    self.log = zo.ZOLog.start(self.key, z.direction)

  def abstract_state(self) -> stream.StreamState:
    like = self.engine.abstract_state(self.model.param_shapes(), self.key,
                                      self._model_state_shapes())
    return checkpoint.abstract(like, self.engine.state_shardings(like))

  def _model_state_shapes(self):
    return self.model.state_shapes(jax.random.key(self.config.seed)) if self.model.has_state \
        else None

  def _initial_params(self):
    return base.initial_params(self.config, self.model, self.params_sharding)

  def init(self) -> stream.StreamState:
    model_state = (self.model.init_state(jax.random.key(self.config.seed))
                   if self.model.has_state else None)
    return self.engine.init(self._initial_params(), self.key, model_state)

  def compile(self, state, batch) -> dict:
    with jax.set_mesh(self.engine.mesh):  # its own ("pert", "data") mesh, not the loop's
      out = zo.device_bytes(self.engine.compile(state, batch))
    out["peak_bytes"] = out["device_bytes"]  # the device-memory bound the dense peak compares to
    return out

  def step(self, state, batch):
    with jax.set_mesh(self.engine.mesh):  # as in `compile`, so that it compiles once
      state, out = self.engine.step(state, batch)
    self.log.append(out["zograd"])
    extra = base.model_step_metrics(self.model, out["aux"], state.model_state) \
        if "aux" in out else {}
    return state, {**dense_zo.zo_outputs(out["loss"], out["zograd"]), **extra}

  def finalize(self, state):
    return self.engine.flush(state)

  def params(self, state):
    with jax.set_mesh(self.engine.mesh):  # the loop evaluates under its own mesh
      params = jax.device_put(self.engine.params(state), self.params_sharding)
      model_state = jax.device_put(jax.device_get(state.model_state), self.params_sharding)
    return params, model_state

  def nonfinite(self, state) -> int:
    return int(state.skipped)

  def results(self, state, workdir) -> dict:
    out = self.save_log(workdir)
    if self.config.zo.verify_replay:
      out.update(self.verify_replay(self._initial_params(), state))
    return out

  def verify_replay(self, initial_params, state) -> dict:
    """Replays the seed log with the dense update and compares with the streamed weights."""
    replayed, _ = zo.replay(initial_params, self.log, self.tx)
    with jax.set_mesh(self.engine.mesh):  # as `params`: outside it, flush compiles again
      got = self.engine.params(state)
    diff = moved = 0.0
    for r, g, p0 in zip(jax.tree.leaves(replayed), jax.tree.leaves(got),
                        jax.tree.leaves(initial_params)):
      r, g, p0 = (np.asarray(x, np.float64) for x in (r, g, p0))
      diff = max(diff, float(np.max(np.abs(r - g))))
      moved = max(moved, float(np.max(np.abs(g - p0))))
    same = all(bool(jnp.array_equal(a, b)) for a, b in
               zip(jax.tree.leaves(replayed), jax.tree.leaves(got)))
    return {"replay_bit_identical": same, "replay_max_abs_diff": diff,
            "replay_max_abs_moved": moved, "replay_rtol": REPLAY_RTOL,
            "replay_within_tolerance": diff <= REPLAY_RTOL * moved}
