"""The expert store: disk -> host -> device round trips, byte counts, in-place slots, and
one-line refusals of missing, incomplete and corrupt stores."""

import gc
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tensorstore as ts

from zojax.errors import ConfigError
from zojax.infer import store as st

L, E = 2, 4


def _formats():
  rng = np.random.default_rng(0)
  f32 = lambda *s: rng.standard_normal((L, E, *s)).astype(np.float32)
  u8 = lambda *s: rng.integers(0, 256, (L, E, *s), dtype=np.uint8)
  quant = lambda cols, groups: {"packed": u8(16, cols), "scale": f32(16, groups),
                                "zero": f32(16, groups)}
  return {
      "full": {"gate": f32(16, 12), "up": f32(16, 12),
               "down": f32(12, 16).astype(np.float16)},
      "int4": {"gate": quant(6, 1), "up": quant(6, 1), "down": quant(8, 1)},
      "int2": {"gate": quant(3, 1), "up": quant(3, 1), "down": quant(4, 1)},
  }


FORMATS = _formats()


def _expert(fmt, layer, expert):
  return jax.tree.map(lambda a: a[layer, expert], FORMATS[fmt])


def _nbytes(fmt, layer, expert):
  """Independent of the store: bytes of the expert's slices of the original arrays."""
  return sum(a[layer, expert].nbytes for a in jax.tree.leaves(FORMATS[fmt]))


def _same_bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _tree_same_bits(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(map(_same_bits, jax.tree.leaves(a), jax.tree.leaves(b))))


def _write(path):
  st.write_store(path, FORMATS, meta={"model": "tiny"})
  return path


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("experts") / "store")


def _one_line_error(match, fn, *args, **kw):
  with pytest.raises(st.StoreError, match=match) as info:
    fn(*args, **kw)
  assert "\n" not in str(info.value)
  return str(info.value)


def _chunk(root, fmt, leaf, layer, expert):
  ndim = len(np.shape(FORMATS[fmt][leaf]))
  return pathlib.Path(root) / st.ARRAYS / fmt / leaf / ".".join(
      map(str, [layer, expert] + [0] * (ndim - 2)))


def test_round_trip_every_format_pinned_host(path):
  with st.open_store(path) as store:
    assert store.meta == {"model": "tiny"} and store.formats == ("full", "int2", "int4")
    assert store.host_memory_kind == "pinned_host"
    pool = store.pool(slots=2, formats=store.formats)
    for fmt in store.formats:
      host = store.host(1, 3, fmt)
      assert {x.sharding.memory_kind for x in jax.tree.leaves(host)} == {"pinned_host"}
      assert _tree_same_bits(store.read(1, 3, fmt), _expert(fmt, 1, 3))
      taken = store.take(1, 3, fmt)
      assert {x.sharding.memory_kind for x in jax.tree.leaves(taken)} == {"device"}
      assert _tree_same_bits(taken, _expert(fmt, 1, 3))
      pool.load(1, 3, fmt, slot=1)
      slots = pool.slots(1, fmt)
      assert {x.sharding.memory_kind for x in jax.tree.leaves(slots)} == {"device"}
      assert _tree_same_bits(jax.tree.map(lambda a: a[1], slots), _expert(fmt, 1, 3))
      assert not _tree_same_bits(jax.tree.map(lambda a: a[1], slots), _expert(fmt, 1, 2))
      assert pool.contents(1, fmt).tolist() == [-1, 3]
      assert pool.contents(0, fmt).tolist() == [-1, -1]


def test_host_cap_forces_disk_reads_counted(path):
  b4 = _nbytes("int4", 0, 0)
  with st.open_store(path, host_formats=("int4",), host_bytes=5 * b4 + b4 // 2) as store:
    # First fit, layer by layer: layer 0's four experts and layer 1's expert 0.
    assert [[store.is_resident(l, e, "int4") for e in range(E)] for l in range(L)] == \
        [[True] * 4, [True, False, False, False]]
    assert not store.is_resident(0, 0, "full")
    s = store.stats()
    assert s["disk_to_host_bytes"]["int4"] == [4 * b4, b4]
    assert s["disk_to_host_experts"]["int4"] == [4, 1]
    assert s["host_resident_bytes"] == 5 * b4
    store.reset_stats()
    moves = [(0, 1, "int4"), (1, 2, "int4"), (1, 2, "full"), (1, 0, "int4"), (1, 2, "int4")]
    for layer, expert, fmt in moves:
      store.take(layer, expert, fmt)
    s = store.stats()
    # Disk reads: only the non-resident ones (no LRU: (1, 2, int4) is read twice).
    assert s["disk_to_host_bytes"]["int4"] == [0, 2 * _nbytes("int4", 1, 2)]
    assert s["disk_to_host_bytes"]["full"] == [0, _nbytes("full", 1, 2)]
    assert s["disk_to_host_experts"]["int4"] == [0, 2]
    assert s["host_to_device_bytes"]["int4"] == [b4, 3 * b4]
    assert s["total_bytes"]["host_to_device"] == sum(_nbytes(f, l, e) for l, e, f in moves)
    assert s["total_bytes"]["disk_to_host"] == \
        2 * _nbytes("int4", 1, 2) + _nbytes("full", 1, 2)


def test_lru_keeps_disk_reads(path):
  bf = _nbytes("full", 0, 0)
  with st.open_store(path, host_formats=(), lru_bytes=bf) as store:
    for expert in (2, 2, 3, 2):  # 3 evicts 2 (room for one)
      store.take(1, expert, "full")
    s = store.stats()
    assert s["disk_to_host_experts"]["full"] == [0, 3] and s["lru_hits"] == 1
    assert s["lru_bytes"] == bf and s["host_resident_bytes"] == 0
    assert s["host_to_device_experts"]["full"] == [0, 4]


def test_replicated_sharding_counts_every_copy(path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with st.open_store(path, host_formats=("int2",), sharding=sharding) as store:
    assert store.stats()["host_to_device_bytes"]["int2"] == [0, 0]
    taken = store.take(1, 0, "int2")
    assert all(len(x.addressable_shards) == 2 for x in jax.tree.leaves(taken))
    assert _tree_same_bits(taken, _expert("int2", 1, 0))
    assert store.stats()["host_to_device_bytes"]["int2"] == [0, 2 * _nbytes("int2", 1, 0)]


def test_pool_update_in_place_other_slots_untouched(path):
  with st.open_store(path, host_formats=("full",)) as store:
    pool = store.pool(slots=[3, 1], formats=("full",))
    pool.load(0, 1, "full", slot=0)
    pool.load(0, 2, "full", slot=2)
    before = pool.slots(0, "full")
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(before)]
    pool.load(0, 3, "full", slot=1)
    after = pool.slots(0, "full")
    assert all(x.is_deleted() for x in jax.tree.leaves(before))  # donated
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(after)] == pointers
    for slot, expert in enumerate([1, 3, 2]):
      assert _tree_same_bits(jax.tree.map(lambda a: a[slot], after), _expert("full", 0, expert))
    assert pool.contents(0, "full").tolist() == [1, 3, 2]
    assert pool.contents(1, "full").tolist() == [-1]
    # The compiled update aliases the whole pool to its output.
    compiled = st._set_slot.lower(after, store.host(0, 1, "full"), np.int32(0),
                                  store.device_sharding).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == \
        sum(x.nbytes for x in jax.tree.leaves(after))
    assert pool.nbytes == 4 * _nbytes("full", 0, 0)
    with pytest.raises(ConfigError, match="slot=3"):
      pool.load(0, 1, "full", slot=3)
    with pytest.raises(ConfigError, match="fmt='int4'"):
      pool.load(0, 1, "int4", slot=0)


def _pinned_live():
  gc.collect()
  return sum(x.sharding.memory_kind == "pinned_host" for x in jax.live_arrays())


def test_corrupt_chunk_names_the_expert_and_leaves_nothing(tmp_path):
  root = _write(tmp_path / "store")
  chunk = _chunk(root, "full", "gate", 1, 2)
  data = bytearray(chunk.read_bytes())
  data[5] ^= 0xFF
  chunk.write_bytes(bytes(data))

  with st.open_store(root, host_formats=()) as store:  # nothing read yet: opens
    assert _tree_same_bits(store.take(1, 1, "full"), _expert("full", 1, 1))
    pool = store.pool(slots=2, formats=("full",))
    pool.load(1, 1, "full", slot=0)
    before = pool.slots(1, "full")
    _one_line_error(r"checksum mismatch for format 'full', layer 1, expert 2", store.take,
                    1, 2, "full")
    _one_line_error("layer 1, expert 2", pool.load, 1, 2, "full", 1)
    assert pool.slots(1, "full") is before and not any(
        x.is_deleted() for x in jax.tree.leaves(before))
    assert pool.contents(1, "full").tolist() == [1, -1]

  live = _pinned_live()
  with pytest.raises(st.StoreError, match=r"format 'full', layer 1, expert 2") as info:
    st.open_store(root)
  # Layer 0's experts, loaded first, were freed, even while the traceback (which holds the
  # half-built store) is alive.
  assert info.value is not None and _pinned_live() == live

  chunk.unlink()  # a missing chunk reads as zeros: the checksum still catches it
  with st.open_store(root, host_formats=()) as store:
    _one_line_error("checksum mismatch", store.read, 1, 2, "full")


def test_incomplete_missing_and_mismatched_stores(tmp_path):
  _one_line_error("does not exist", st.open_store, tmp_path / "nowhere")

  root = _write(tmp_path / "store")
  (root / st.MARKER).unlink()
  _one_line_error("incomplete: no COMPLETE marker", st.open_store, root)

  root = _write(tmp_path / "edited")
  manifest = json.loads((root / st.MANIFEST).read_text())
  manifest["meta"]["model"] = "other"
  (root / st.MANIFEST).write_text(json.dumps(manifest))
  _one_line_error("does not match its COMPLETE marker", st.open_store, root)

  root = _write(tmp_path / "missing")
  shutil.rmtree(root / st.ARRAYS / "int4" / "up" / "zero")
  _one_line_error("array int4/up/zero is missing", st.open_store, root)

  root = _write(tmp_path / "reshaped")
  ts.open({**st._array_spec(root, "int2", "down/packed"), "dtype": "uint8",
           "metadata": {"shape": [L, E, 16, 5], "chunks": [1, 1, 16, 5]}},
          create=True, delete_existing=True).result()
  _one_line_error(r"array int2/down/packed is \[2, 4, 16, 5\] uint8, the manifest says "
                  r"\[2, 4, 16, 4\] uint8", st.open_store, root)


def test_bad_input_is_refused(tmp_path, path):
  bad = {"full": {"w": np.zeros((L, E, 3))}, "int4": {"w": np.zeros((L, E + 1, 3))}}
  with pytest.raises(ConfigError, match="disagree on the leading"):
    st.write_store(tmp_path / "x", bad)
  with pytest.raises(ConfigError, match="already exists"):
    st.write_store(path, FORMATS)
  with pytest.raises(ConfigError, match="JSON"):
    st.write_store(tmp_path / "y", FORMATS, meta={"x": object()})
  with pytest.raises(ConfigError, match="host_bytes=-1"):
    st.open_store(path, host_bytes=-1)
  with pytest.raises(ConfigError, match="host_formats"):
    st.open_store(path, host_formats=("int8",))
  with st.open_store(path, host_formats=()) as store:
    with pytest.raises(ConfigError, match="expert=4"):
      store.take(0, 4, "full")
