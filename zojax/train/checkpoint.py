"""Orbax checkpointing of the whole training state, for exact resume.

A checkpoint holds the train state pytree (params, optimizer state, step, PRNG key data,
skip counters) plus a small JSON record (the config it was written with, and a crc32 of each
array). The data iterator's position is the step itself: batches are a pure function of
(seed, step).
"""

from __future__ import annotations

import gc
import logging
import pathlib
import shutil
import sys
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from zojax.errors import ConfigError

log = logging.getLogger(__name__)

# Key of the per-array checksums in the JSON record; `restore_latest` takes it out again.
_CHECKSUMS = "array_crc32"


class CheckpointError(ConfigError):
  """The run directory has checkpoints, but none of them restores."""


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
  meta = {**meta, _CHECKSUMS: _checksums(state)}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  return True


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any):
  """Returns (step, state, meta) of the newest checkpoint that restores, or None if there is none.

  A checkpoint that fails to read, or whose arrays differ from the checksums saved with
  them, is skipped and an older one is tried. Once one restores, each damaged newer one is
  moved to `<directory>_damaged/` with a one-line warning, so that the resumed run writes
  those steps again (and no later resume trips over them).

  Args:
    mngr: from `manager`.
    abstract_state: a pytree of `jax.ShapeDtypeStruct`s with shardings: arrays come back
      already placed on the mesh.

  Returns:
    (step, state, meta), or None if the directory has no checkpoint.

  Raises:
    CheckpointError: there are checkpoints but none restores (nothing is moved then: the
      cause may be an `abstract_state` that fits none of them).
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    restored = _attempt(mngr, step, abstract_state)
    if isinstance(restored, str):
      damaged.append((step, restored))
      continue
    state, meta = restored
    for bad, why in damaged:
      moved_to = _set_aside(mngr, bad)
      log.warning("checkpoint at step %d is damaged (%s); moved to %s, resuming from step %d",
                  bad, why, moved_to, step)
    return step, state, meta
  if damaged:
    step, why = damaged[0]
    raise CheckpointError(f"no checkpoint in {mngr.directory} restores (newest, step {step}: "
                          f"{why})")
  return None


def abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def _attempt(mngr: ocp.CheckpointManager, step: int, abstract_state: Any):
  """(state, meta) of `step`, or a line saying why it does not restore."""
  global _attempting
  _quiet_restore_debris()
  _attempting = True
  try:
    return _restore(mngr, step, abstract_state)
  except Exception as e:  # noqa: BLE001  (tensorstore, JSON, a missing file: all unreadable)
    return _one_line(e)
  finally:
    gc.collect()  # the abandoned reads' coroutines, while their errors are still dropped
    _attempting = False


_attempting = False  # whether `_attempt` is running


def _quiet_restore_debris() -> None:
  """Keeps the debris of a failed orbax restore off stderr (a hook installed once).

  When one array read fails, orbax abandons the others and closes its event loop. Python
  then prints each abandoned read's error as a page-long "Exception ignored" traceback when
  its coroutine is collected (inside `_attempt`), and each read still in flight in
  tensorstore prints "RuntimeError: Event loop is closed" when it finishes, at any later
  time. The one line `_attempt` returns says what matters, so these go to the debug log;
  any other unraisable exception reaches the hook that was there before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "zojax_restore_debris", False):
    return

  def hook(u):
    late_read = (u.object is None and isinstance(u.exc_value, RuntimeError)
                 and str(u.exc_value) == "Event loop is closed")
    if _attempting or late_read:
      log.debug("ignored after a failed checkpoint read: %r", u.exc_value)
    else:
      previous(u)

  hook.zojax_restore_debris = True
  sys.unraisablehook = hook


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any):
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  state, meta = restored["state"], dict(restored["meta"])
  expected = meta.pop(_CHECKSUMS, None)  # None: written before checksums were
  if expected is not None:
    actual = _checksums(state)
    wrong = [path for path in expected if actual.get(path) != expected[path]]
    if wrong or actual.keys() != expected.keys():
      raise ValueError(f"{len(wrong)} arrays differ from their checksums "
                       f"(first: {wrong[0] if wrong else 'the tree structure'})")
  return state, meta


def _checksums(state: Any) -> dict[str, int]:
  """crc32 of each array's bytes, by tree path.

  The array files carry no checksum of their own: a flipped byte inside a chunk restores
  silently as a wrong value, which only this comparison catches.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    data = np.ascontiguousarray(jax.device_get(leaf)).reshape(-1).view(np.uint8)
    out[jax.tree_util.keystr(path)] = zlib.crc32(data)
  return out


def _one_line(e: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause (orbax wraps tensorstore's precise error in a
  page-long one that names only the array slice)."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Moves a damaged checkpoint out of the manager's directory (kept for inspection)."""
  directory = pathlib.Path(mngr.directory)
  target = directory.with_name(directory.name + "_damaged") / str(step)
  n = 0
  while target.exists():  # damaged at this step before: keep both
    n += 1
    target = target.with_name(f"{step}.{n}")
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.move(directory / str(step), target)
  mngr.reload()
  return target
