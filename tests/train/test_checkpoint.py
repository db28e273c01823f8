"""Resume survives a damaged checkpoint: it falls back to the newest one that restores."""

import logging
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
