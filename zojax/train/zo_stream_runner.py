"""`loop.train` with ``zo.engine='stream'``: the ZO2 engine (`zojax.zo.stream`) from a config.

`StreamRun` builds the `StreamEngine` a config describes and gives the loop what differs
from the dense ZO path; the loop keeps everything else (data, seed log, metrics, eval,
checkpoint schedule, halting):

  * **optimizer**: optim.name zo_sgd / zo_adam / zo_sign -> `layerwise_sgd / _adam / _sign`
    with the same learning-rate schedule, momentum and weight decay as
    `zojax.train.optimizer.build` gives the dense engine (first-order optimizers are refused
    by `config.validate`).
  * **layout**: one ("pert", "data") mesh over the config mesh's devices; its data axis
    becomes the layout's (DDP streaming, sliced blocks), its model axis must be 1.
  * **never stale**: the blocks lag one update behind (the pending estimate is fused into the
    next step). Evaluation reads `StreamEngine.params` (flushed, state kept); checkpoints are
    written from a flushed state (`settle`) and the run continues from that same state, so a
    resumed run retraces the straight one bit for bit. Flushing applies the update in its own
    small program rather than fused into the next step, which may round differently, so a
    run's trajectory depends (by float rounding only) on where it was checkpointed.
  * **memory**: `zojax.zo.stream.device_bytes` of the compiled step (device and host bytes
    apart) instead of the dense step's `memory_analysis`.
  * **replay** (``zo.verify_replay``): the seed log replayed with the dense update
    (`zo.replay`, `LayerwiseZO.dense`) against the streamed weights. The coefficients are
    the log's, so only the update's rounding can differ: agreement within
    `REPLAY_RTOL` x the distance the weights moved (measured: bit-identical on the tiny
    config; tests/train/test_stream_loop.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax import zo
from zojax.models import llama
from zojax.train import config as config_lib, optimizer
from zojax.zo import parallel, stream

# Replayed and streamed weights may differ by the update's rounding (different compiled
# programs); relative to the distance the weights moved. Far above 1 ulp per step, far
# below a missed or doubled update (which is ~1x).
REPLAY_RTOL = 1e-4


def layerwise(optim_cfg, total_steps: int) -> stream.LayerwiseZO:
  """The layer-wise form of the ZO optimizer `optim_cfg` names (`optimizer.build`'s twin)."""
  lr = optimizer.schedule(optim_cfg, total_steps)
  if optim_cfg.name == "zo_sgd":
    return stream.layerwise_sgd(lr, momentum=optim_cfg.momentum or None,
                                weight_decay=optim_cfg.weight_decay)
  if optim_cfg.name == "zo_adam":
    return stream.layerwise_adam(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay)
  if optim_cfg.name == "zo_sign":
    return stream.layerwise_sign(lr, weight_decay=optim_cfg.weight_decay)
  raise config_lib.ConfigError(
      f"config key 'zo.engine'='stream' needs optim.name zo_sgd, zo_adam or zo_sign, got "
      f"{optim_cfg.name!r}")


class StreamRun:
  """The streamed engine for one `loop.train` run (see the module docstring)."""

  def __init__(self, config, model_cfg: llama.LlamaConfig, mesh):
    z = config.zo
    if mesh.shape.get("model", 1) != 1:
      raise config_lib.ConfigError(
          f"config key 'mesh.axes'={tuple(map(tuple, config.mesh.axes))} has a model axis of "
          f"{mesh.shape['model']}: zo.engine='stream' spreads work over data only")
    if z.resident_blocks > model_cfg.num_layers:
      raise config_lib.ConfigError(
          f"config key 'zo.resident_blocks'={z.resident_blocks} is more than the model's "
          f"{model_cfg.num_layers} blocks")
    self.config, self.model_cfg = config, model_cfg
    self.update = layerwise(config.optim, config.train.steps)
    layout = parallel.make_layout(1, mesh.shape.get("data", 1), devices=mesh.devices.flat)
    self.engine = stream.StreamEngine(
        llama.make(model_cfg), self.update, eps=z.eps, num_samples=z.num_samples,
        one_sided=z.one_sided, resident_blocks=z.resident_blocks, memory_kind=z.memory_kind,
        layout=layout)
    self.key = jax.random.key(config.seed)
    self.params_sharding = NamedSharding(mesh, P())  # where evaluation reads weights

  @property
  def batch_sharding(self):
    return self.engine.batch_sharding()

  def abstract_state(self) -> stream.StreamState:
    """Shapes and shardings (memory kinds included) of the state, for restoring."""
    like = self.engine.abstract_state(llama.param_shapes(self.model_cfg), self.key)
    shardings = self.engine.state_shardings(like)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        like, shardings)

  def init(self, params) -> stream.StreamState:
    return self.engine.init(params, self.key)

  def compile(self, state, example_batch) -> dict[str, Any]:
    """Compiles the step (run from then on); its memory, device and host bytes apart."""
    out = stream.device_bytes(self.engine.compile(state, example_batch))
    out["peak_bytes"] = out["device_bytes"]  # the device-memory bound the dense peak compares to
    return out

  def step(self, state, batch):
    return self.engine.step(state, batch)

  def settle(self, state) -> stream.StreamState:
    """The state with its pending update applied (donates `state`): what a checkpoint holds."""
    return self.engine.flush(state)

  def params(self, state):
    """Current (flushed) weights on the loop's mesh, for evaluation; `state` is kept."""
    return jax.device_put(self.engine.params(state), self.params_sharding)

  @staticmethod
  def nonfinite(state) -> jax.Array:
    return state.skipped

  def verify_replay(self, initial_params, zo_log: zo.ZOLog, state) -> dict[str, Any]:
    """Replays the seed log with the dense update and compares with the streamed weights."""
    replayed, _ = zo.replay(initial_params, zo_log, self.update.dense)
    got, moved = self.engine.params(state), 0.0
    diff = 0.0
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
