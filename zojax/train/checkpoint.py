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


def manager(directory: pathlib.Path, *, every: int, keep: int) -> ocp.CheckpointManager:
  """Saves every `every` steps (and whenever `save(force=True)`), keeping the newest `keep`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=every, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, *,
         force: bool = False) -> bool:
  saved = mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
  mngr.wait_until_finished()
  return saved


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
