"""Orbax checkpointing of the whole training state, for exact resume.

A checkpoint holds the train state pytree (params, optimizer state, step, PRNG key data,
skip counters) plus a small JSON record (the config it was written with). The data
iterator's position is the step itself: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(directory: pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
  """A manager keeping the newest `keep` checkpoints; `save` decides when to write."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def due(mngr: ocp.CheckpointManager, step: int, *, every: int = 1, force: bool = False) -> bool:
  """Whether `save` would write at `step`: a multiple of `every`, or forced, and not written.

  (Orbax's own interval logic also saves the first step it sees; ours is exact.)
  """
  return (force or step % every == 0) and mngr.latest_step() != step


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, *,
         every: int = 1, force: bool = False) -> bool:
  """Writes a checkpoint when `due`; returns whether it wrote."""
  if not due(mngr, step, every=every, force=force):
    return False
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  return True


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any):
  """Returns (step, state, meta) of the newest checkpoint, or None if there is none.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings: arrays come back
  already placed on the mesh.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return step, restored["state"], restored["meta"]


def abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)
