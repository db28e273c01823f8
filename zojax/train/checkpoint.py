"""Orbax checkpointing of the whole training state, for exact resume.

A checkpoint holds the train state pytree (params, optimizer state, step, PRNG key data,
skip counters) plus a small JSON record (the config it was written with, and a checksum of
each array). The data iterator's position is the step itself: batches are a pure function of
(seed, step).

Multi-process runs (`zojax.train.distributed`) save and restore the same way: orbax has each
process write the shards it owns and process 0 the metadata and the JSON record, and
restores onto whatever shardings `abstract_state` asks for, so a run may resume on another
process count where its mesh allows. Every process takes the same decisions (which
checkpoint restores, which is damaged) from values they all share.
"""

from __future__ import annotations

import gc
import logging
import math
import pathlib
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from zojax.errors import ConfigError

log = logging.getLogger(__name__)

# Orbax splits the writing of each replicated array among its replicas, slicing it with a
# jitted function compiled per array shape and sharding: ~100 compiles per save of a small
# model, costing more than the writes. Only arrays whose slices reach 1 MiB are split.
_absl = logging.getLogger("absl")
_level = _absl.level
_absl.setLevel(logging.ERROR)  # orbax warns that it replaces its default handler: intended
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=2**20),
    override=True)
_absl.setLevel(_level)

# Key of the per-array checksums in the JSON record; `restore_latest` takes it out again.
_CHECKSUMS = "array_hash32"
_OLD_CHECKSUMS = "array_crc32"  # whole-array crc32s of older checkpoints: not checked


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
      state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)), force=True)
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
  """(state, meta) of `step`, or a line saying why it does not restore.

  Each process reads its shards on its own (orbax's handlers, without the manager's
  barriers, so that one process failing cannot leave the others waiting), then one
  collective (`_agree`) gives every process every process's outcome and the checksums,
  and all decide alike.
  """
  global _attempting
  _quiet_restore_debris()
  _attempting = True
  state = meta = why = None
  try:
    state, meta = _read(mngr, step, abstract_state)
    local = _local_hashes(state)
  except Exception as e:  # noqa: BLE001  (tensorstore, JSON, a missing file: all unreadable)
    why, local = _one_line(e), np.zeros(len(jax.tree.leaves(abstract_state)), np.uint32)
  finally:
    gc.collect()  # the abandoned reads' coroutines, while their errors are still dropped
    _attempting = False
  failed, totals = _agree(why is not None, local)
  if failed:
    return why or f"process {failed[0]} could not read it"
  try:
    _verify(meta, totals, state)
  except ValueError as e:
    return _one_line(e)
  return state, meta


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


def _read(mngr: ocp.CheckpointManager, step: int, abstract_state: Any):
  """(state, meta) as stored at `step`, this process's shards only; nothing checked."""
  step_dir = pathlib.Path(mngr.directory) / str(step)
  handler = ocp.StandardCheckpointHandler()
  try:
    state = handler.restore(step_dir / "state",
                            args=ocp.args.StandardRestore(_drop_empty(abstract_state)))
  finally:
    handler.close()
  state = _put_back_empty(state, abstract_state)
  meta = ocp.JsonCheckpointHandler().restore(step_dir / "meta", args=ocp.args.JsonRestore())
  return state, dict(meta)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any):
  """(state, meta) of `step`; raises if it does not read or fails its checksums."""
  state, meta = _read(mngr, step, abstract_state)
  _verify(meta, _agree(False, _local_hashes(state))[1], state)
  return state, meta


def _verify(meta: dict, actual: np.ndarray, state: Any) -> None:
  """Takes the checksums out of `meta`; ValueError if `actual` (`_agree`'s) differs."""
  meta.pop(_OLD_CHECKSUMS, None)
  expected = meta.pop(_CHECKSUMS, None)  # None: written before checksums were
  if expected is None:
    return
  paths = _paths(state)
  wrong = [p for p, a in zip(paths, actual) if expected.get(p) != int(a)]
  if wrong or set(paths) != expected.keys():
    raise ValueError(f"{len(wrong)} arrays differ from their checksums "
                     f"(first: {wrong[0] if wrong else 'the tree structure'})")


def _is_empty(x) -> bool:
  return hasattr(x, "shape") and math.prod(x.shape) == 0


def _drop_empty(tree: Any) -> Any:
  """Zero-size arrays as None: orbax refuses to write them (a streamed run without resident
  blocks has [0, ...] stacks); `_put_back_empty` makes them again on restore."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([None if _is_empty(x) else x for x in leaves])


def _put_back_empty(restored: Any, abstract_state: Any) -> Any:
  leaves, treedef = jax.tree.flatten(abstract_state)
  stored = iter(jax.tree.leaves(restored))
  return treedef.unflatten([
      jax.device_put(np.zeros(a.shape, a.dtype), a.sharding) if _is_empty(a) else next(stored)
      for a in leaves])


def _checksums(state: Any) -> dict[str, int]:
  """A 32-bit checksum of each array's values, by tree path (a collective when the state
  is spread over processes: every process gets every value).

  The array files carry no checksum of their own: a flipped byte inside a chunk restores
  silently as a wrong value, which only this comparison catches. The checksum is
  ``sum_i mix(bits_i, i) mod 2**32`` over the elements i of the whole (global) array:
  `mix` is a bijection of the bits for each i, so changing any one element always changes
  it, and a sum can be formed shard by shard, each process adding the shards it owns, so
  it is the same for any sharding, mesh or process count.
  """
  return dict(zip(_paths(state), map(int, _agree(False, _local_hashes(state))[1])))


def _paths(state: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _local_hashes(state: Any) -> np.ndarray:
  """uint32 [leaves]: each array's checksum sum over the shards this process owns (the
  replica-0 copy of each shard; process 0 for host values).

  Large shards are hashed where they are, one jitted pass each on the shard's own device
  (no collective: `_attempt` reaches `_agree` even when another process failed to read);
  all are dispatched before the host waits for any.
  """
  parts = []
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array):
      shape = tuple(leaf.shape)
      parts.append([_shard_hash(s.data, s.index, shape) for s in leaf.addressable_shards
                    if s.replica_id == 0])
    else:
      leaf = np.asarray(leaf)
      parts.append([_host_hash(leaf, (), leaf.shape)] if jax.process_index() == 0 else [])
  return np.asarray([sum(map(int, p)) % 2**32 for p in jax.device_get(parts)], np.uint32)


# Blocks smaller than this are hashed in numpy: the jitted hash compiles once per block
# shape, dtype and device (tens of ms), which small arrays never pay back.
_JIT_HASH_MIN_BYTES = 2**20


def _shard_hash(data: jax.Array, index: tuple, shape: tuple):
  """`_block_hash` of one shard: a uint32 scalar on its device, or an int."""
  in_device_memory = getattr(data.sharding, "memory_kind", None) in (None, "device")
  if not in_device_memory or data.nbytes < _JIT_HASH_MIN_BYTES or not _jit_hashes(data.dtype):
    return _host_hash(np.asarray(data), index, shape)
  return _jit_block_hash(data, *_starts_strides(index, shape))


def _host_hash(data: np.ndarray, index: tuple, shape: tuple):
  """`_block_hash` of a host block: jitted on a CPU device where there is one."""
  if data.nbytes >= _JIT_HASH_MIN_BYTES and _jit_hashes(data.dtype):
    try:
      cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
      pass
    else:
      return _jit_block_hash(jax.device_put(data, cpu), *_starts_strides(index, shape))
  return _block_hash(data, index, shape)


def _jit_hashes(dtype) -> bool:
  """Whether `_jit_block_hash` takes `dtype` unchanged: whole bytes, no complex parts, and
  a type JAX keeps as it is (float64 host values become float32 without x64)."""
  dtype = np.dtype(dtype)
  return (dtype.itemsize in (1, 2, 4, 8) and jax.dtypes.itemsize_bits(dtype) == 8 * dtype.itemsize
          and not np.issubdtype(dtype, np.complexfloating)
          and jax.dtypes.canonicalize_dtype(dtype) == dtype)


def _starts_strides(index: tuple, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
  """uint32 [ndim] each: where the block starts in each dimension, and each dimension's
  stride in the flat array; mod 2**32, the ring the positions are used in."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  starts = [sl.indices(dim)[0] for sl, dim in zip(index, shape)]
  if any(sl.indices(dim)[2] != 1 for sl, dim in zip(index, shape)):
    raise ValueError(f"a shard index with a step: {index}")
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  as_u32 = lambda xs: np.asarray([x % 2**32 for x in xs], np.uint32).reshape(len(shape))
  return as_u32(starts), as_u32(strides)


@jax.jit
def _jit_block_hash(data: jax.Array, starts: jax.Array, strides: jax.Array) -> jax.Array:
  """`_block_hash` as one fused pass (uint32 scalar) over a block that starts at `starts`.

  The positions are formed in uint32, wrapping as the reference's int64 ones do when cast;
  the starts and strides are arguments, so blocks of one shape share a compile.
  """
  shape, itemsize = data.shape, data.dtype.itemsize
  if data.dtype == jnp.bool_:
    words = data.astype(jnp.uint32)
  elif itemsize < 4:
    words = jax.lax.bitcast_convert_type(data, jnp.dtype(f"uint{8 * itemsize}"))
    words = words.astype(jnp.uint32)
  else:  # 8-byte elements: [..., 2], the low word first as in memory
    words = jax.lax.bitcast_convert_type(data, jnp.uint32)
  pos = jnp.zeros((), jnp.uint32)
  for d in range(len(shape)):
    pos = pos + (jax.lax.broadcasted_iota(jnp.uint32, shape, d) + starts[d]) * strides[d]
  if itemsize == 8:
    pos = pos[..., None] * jnp.uint32(2) + jax.lax.broadcasted_iota(
        jnp.uint32, shape + (2,), len(shape))
  return jnp.sum(_mix(words, pos), dtype=jnp.uint32)  # wraps mod 2**32, in any order


def _block_hash(data: np.ndarray, index: tuple, shape: tuple) -> int:
  """Sum of mix(bits, global flat position) over one block of an array of `shape`: the
  definition of the checksum (`_jit_block_hash` must agree bit for bit; small and host
  blocks use this)."""
  data = np.ascontiguousarray(data)
  if data.size == 0:
    return 0
  # The global flat position of each element of the block.
  ranges = [np.arange(*sl.indices(dim)) for sl, dim in
            zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)]
  pos = np.ravel_multi_index(np.ix_(*ranges), shape) if shape else np.zeros((), np.int64)
  itemsize = data.dtype.itemsize
  if itemsize in (1, 2):
    words = data.view(f"u{itemsize}").astype(np.uint32)
  else:  # 4- and 8-byte elements: one 32-bit word each, or two
    words = data.view(np.uint32).reshape(*data.shape, itemsize // 4)
    pos = pos[..., None] * (itemsize // 4) + np.arange(itemsize // 4)
  return int(_mix(words, pos.astype(np.uint32)).sum(dtype=np.uint64)) % 2**32


def _mix(words, pos):
  """uint32 words (numpy or jax) mixed with their uint32 positions: murmur3's finalizer, a
  bijection of 32-bit words that mixes every bit into every bit. Shared by both hashes."""
  x = words ^ (pos * np.uint32(0x9E3779B9))
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> np.uint32(13))
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> np.uint32(16))


def _agree(failed: bool, local: np.ndarray) -> tuple[list[int], np.ndarray]:
  """(processes that failed, checksums summed over processes): the same on every process.
  One collective in a multi-process run."""
  if jax.process_count() == 1:
    return ([0] if failed else []), local
  mine = np.concatenate([[np.uint32(failed)], local]).astype(np.uint32)
  every = np.asarray(multihost_utils.process_allgather(mine)).astype(np.uint64)
  totals = (every[:, 1:].sum(axis=0) % 2**32).astype(np.uint32)
  return [int(p) for p in np.flatnonzero(every[:, 0])], totals


def _one_line(e: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause (orbax wraps tensorstore's precise error in a
  page-long one that names only the array slice)."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}: {lines[0] if lines else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
  """Moves a damaged checkpoint out of the manager's directory (kept for inspection);
  process 0 moves it, the others wait for that."""
  directory = pathlib.Path(mngr.directory)
  target = directory.with_name(directory.name + "_damaged") / str(step)
  n = 0
  while target.exists():  # damaged at this step before: keep both
    n += 1
    target = target.with_name(f"{step}.{n}")
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(directory / str(step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"zojax checkpoint {step} set aside")
  mngr.reload()
  return target
