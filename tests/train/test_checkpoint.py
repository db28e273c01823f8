"""Resume survives a damaged checkpoint: it falls back to the newest one that restores."""

import logging
import math
import pathlib
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from zojax.train import checkpoint
from zojax.errors import ConfigError


def _state(step):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  # Random floats do not compress, so a byte in the middle of the file is array data.
  w = jax.random.normal(jax.random.key(step), (256, 64))
  return {"w": jax.device_put(w, rows), "b": jnp.arange(16, dtype=jnp.int32) + step,
          "step": jnp.int32(step)}


def _abstract():
  state = _state(0)
  return checkpoint.abstract(jax.eval_shape(lambda: state),
                             jax.tree.map(lambda x: x.sharding, state))


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """Checkpoints at steps 2 and 4, written once; each test damages its own copy."""
  root = tmp_path_factory.mktemp("pristine") / "checkpoints"
  mngr = checkpoint.manager(root, keep=3)
  for step in (2, 4):
    assert checkpoint.save(mngr, step, _state(step), {"step": step})
  mngr.close()
  return root


@pytest.fixture
def run_dir(pristine, tmp_path):
  root = tmp_path / "checkpoints"
  shutil.copytree(pristine, root)
  return root


def _data_file(step_dir):
  """The largest array-data file of a checkpoint (w's chunk)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _flip(path, offsets):
  data = bytearray(path.read_bytes())
  for i in offsets:
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_intact_checkpoints_restore_the_newest(run_dir):
  step, state, meta = checkpoint.restore_latest(checkpoint.manager(run_dir, keep=3), _abstract())
  assert step == 4 and _equal(state, _state(4)) and meta == {"step": 4}
  assert state["w"].sharding == _state(0)["w"].sharding


def test_no_checkpoint_is_none(tmp_path):
  assert checkpoint.restore_latest(checkpoint.manager(tmp_path / "c", keep=3), _abstract()) is None


def test_flipped_array_bytes_restore_silently_without_the_checksums(run_dir):
  # Why the checksums exist: the array files have none, and orbax hands back wrong values.
  f = _data_file(run_dir / "4")
  _flip(f, [f.stat().st_size // 2])
  raw = ocp.StandardCheckpointer().restore(run_dir / "4" / "state")
  assert not _equal(raw, _state(4)) and np.array_equal(raw["b"], _state(4)["b"])


# Orbax's abandoned reads would print page-long "Exception ignored" tracebacks: none may escape.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["flip_middle", "flip_header", "truncate", "delete"])
def test_damaged_latest_falls_back_to_the_previous(run_dir, damage, caplog):
  f = _data_file(run_dir / "4")
  size = f.stat().st_size
  if damage == "flip_middle":     # silent in orbax: only the checksums catch it
    _flip(f, range(size // 2, size // 2 + 8))
  elif damage == "flip_header":   # tensorstore's own read fails
    _flip(f, range(4))
  elif damage == "truncate":
    f.write_bytes(f.read_bytes()[:size // 2])
  else:
    f.unlink()
  mngr = checkpoint.manager(run_dir, keep=3)   # a fresh manager, as in a resumed process
  with pytest.raises(Exception):  # the damage is real: step 4 on its own does not restore
    checkpoint._restore(mngr, 4, _abstract())

  with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
    step, state, meta = checkpoint.restore_latest(mngr, _abstract())
  assert step == 2 and _equal(state, _state(2)) and meta == {"step": 2}
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "step 4" in warnings[0] and "\n" not in warnings[0], warnings
  # Step 4 is set aside, so the resumed run writes it again and a later resume finds it good.
  assert (run_dir.parent / "checkpoints_damaged" / "4").is_dir()
  assert mngr.all_steps() == [2] and checkpoint.due(mngr, 4, every=2)
  assert checkpoint.save(mngr, 4, _state(4), {"step": 4})
  again = checkpoint.restore_latest(checkpoint.manager(run_dir, keep=3), _abstract())
  assert again[0] == 4 and _equal(again[1], _state(4))


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_none_restores_is_a_one_line_error_and_moves_nothing(run_dir):
  for step in ("2", "4"):
    f = _data_file(run_dir / step)
    _flip(f, range(f.stat().st_size // 2, f.stat().st_size // 2 + 8))
  mngr = checkpoint.manager(run_dir, keep=3)
  with pytest.raises(ConfigError) as e:
    checkpoint.restore_latest(mngr, _abstract())
  assert "step 4" in str(e.value) and "\n" not in str(e.value)
  assert mngr.all_steps() == [2, 4] and not (run_dir.parent / "checkpoints_damaged").exists()


def test_late_reads_of_a_failed_restore_stay_off_stderr(monkeypatch):
  # Reads still in flight when orbax gives up finish later and hit its closed event loop;
  # Python would print each as "Exception ignored ... Event loop is closed", at any time.
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_restore_debris()
  hook = sys.unraisablehook
  checkpoint._quiet_restore_debris()
  assert sys.unraisablehook is hook  # installed once, not stacked per restore
  late = types.SimpleNamespace(object=None, exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(object=None, exc_value=RuntimeError("something else"))
  sys.unraisablehook(late)
  sys.unraisablehook(other)
  assert seen == [other]


# The checksum's definition is the numpy `_block_hash` (checkpoints were written with it);
# the jitted device hash must agree with it bit for bit.
_DTYPES = [np.bool_, np.int8, np.uint8, jnp.bfloat16, np.float16, np.float32, np.int32,
           np.uint32]
# (index of a 3 x 5 block, global shape): inside a small array, and at the far end of one
# with 2**33 elements, where the flat positions (and 2 * position for 8-byte elements)
# wrap mod 2**32.
_BLOCKS = [((slice(2, 5), slice(4, 9)), (7, 11)),
           ((slice(2**20 - 3, 2**20), slice(2**13 - 5, 2**13)), (2**20, 2**13))]


def _random_bits(dtype, shape, seed):
  """Any bit pattern (NaN payloads included), as `dtype`."""
  size = math.prod(shape) * np.dtype(dtype).itemsize
  bytes_ = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
  if np.dtype(dtype) == np.bool_:
    return (bytes_ % 2 == 1).reshape(shape)
  return bytes_.view(dtype).reshape(shape)


def _jit_hash(block, index, shape):
  return int(checkpoint._jit_block_hash(jnp.asarray(block),
                                        *checkpoint._starts_strides(index, shape)))


def _check_dtype(dtype):
  for seed, (index, shape) in enumerate(_BLOCKS):
    block = _random_bits(dtype, (3, 5), seed)
    want = checkpoint._block_hash(block, index, shape)
    assert _jit_hash(block, index, shape) == want, (np.dtype(dtype), shape)
    changed = block.copy()  # negative controls: one element's lowest bit, or another place
    changed.view(f"u{block.itemsize}")[1, 2] ^= 1
    assert _jit_hash(changed, index, shape) != want, (np.dtype(dtype), shape)
    assert _jit_hash(block, (slice(0, 3), slice(0, 5)), shape) != want
  scalar = _random_bits(dtype, (), 7)  # 0-d: position 0
  assert _jit_hash(scalar, (), ()) == checkpoint._block_hash(scalar, (), ())


def test_jitted_hash_equals_the_numpy_definition_for_every_dtype():
  # Pinned values of the definition: changing it would fail every older checkpoint.
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert checkpoint._block_hash(x, (), (3, 4)) == 494507435
  assert checkpoint._block_hash(x[1:], (slice(1, 3),), (3, 4)) == 1086394778
  for dtype in _DTYPES:
    _check_dtype(dtype)
  with jax.enable_x64(True):  # 8-byte elements: two words each, low word first
    for dtype in (np.float64, np.int64):
      _check_dtype(dtype)


def test_local_hashes_on_device_equal_the_definition_for_any_sharding(monkeypatch):
  monkeypatch.setattr(checkpoint, "_JIT_HASH_MIN_BYTES", 0)  # tiny arrays take the jit path
  calls = []
  jitted = checkpoint._jit_block_hash
  monkeypatch.setattr(checkpoint, "_jit_block_hash", lambda *a: calls.append(1) or jitted(*a))
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  put = lambda x, *spec, **kw: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec), **kw))
  w = _random_bits(np.float32, (8, 16), 0)
  keys = jax.random.split(jax.random.key(0), 8)
  host = {"h": w[:3], "d": np.linspace(0, 1, 5), "k": np.asarray(jax.random.key_data(keys)),
          "b": w[0].astype(jnp.bfloat16)}
  want = [checkpoint._block_hash(np.asarray(x), (), np.shape(x))
          for x in jax.tree.leaves(host)]
  for spec in [(), ("data",), (None, "model"), ("data", "model")]:
    calls.clear()
    state = {"h": put(w[:3], None, *spec[1:]), "d": host["d"],  # float64 stays on the host
             "k": put(keys, "data"), "b": put(host["b"], *spec[1:]) if spec else host["b"]}
    got = checkpoint._local_hashes({**state, "w": put(w, *spec)})
    assert list(got[:4]) == want and got[4] == checkpoint._block_hash(w, (), w.shape), spec
    assert calls, spec  # the device path ran
  changed = w.copy()
  changed[5, 3] = np.nextafter(changed[5, 3], np.inf)  # one ulp of one element
  assert checkpoint._local_hashes({"w": put(changed, "data", "model")})[0] != got[4]
  in_host_memory = put(w, "data", memory_kind="pinned_host")  # hashed from host memory
  assert checkpoint._local_hashes({"w": in_host_memory})[0] == got[4]
