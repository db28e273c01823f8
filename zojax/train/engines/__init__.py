"""Engines: how a step is computed. `build` picks one from the config; `loop.train` drives it.

  * `FirstOrderEngine`: backprop + any optax optimizer; any model.
  * `DenseZOEngine`: SPSA from forward passes (MeZO) + a ZO optimizer; any model (in-scan
    perturbation when the model has a block view, the whole tree otherwise).
  * `StreamedZOEngine` (``zo.engine='stream'``): ZO2 / DistZO2, blocks streamed from host
    memory; needs the block view.

All implement `base.Engine`.
"""

from __future__ import annotations

from zojax.models import Model
from zojax.train import optimizer
from zojax.train.engines.base import Engine, TrainState
from zojax.train.engines.dense_zo import DenseZOEngine
from zojax.train.engines.first_order import FirstOrderEngine
from zojax.train.engines.streamed_zo import StreamedZOEngine


def build(config, model: Model, mesh) -> Engine:
  """The engine the config asks for (optim.name, zo.engine), for `model` on `mesh`."""
  tx = optimizer.build(config.optim, config.train.steps)
  if not optimizer.is_zeroth_order(config.optim):
    return FirstOrderEngine(config, model, tx, mesh)
  if config.zo.engine == "stream":
    return StreamedZOEngine(config, model, tx, mesh)
  return DenseZOEngine(config, model, tx, mesh)


__all__ = ["DenseZOEngine", "Engine", "FirstOrderEngine", "StreamedZOEngine", "TrainState",
           "build"]
