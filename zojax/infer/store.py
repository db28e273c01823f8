"""Fate's expert store: experts on disk (tensorstore zarr), in host memory and in device slots.

An expert is addressed by ``(layer, expert)`` and kept in one or more *formats* ("full",
"int4", "int2", ...). A format is a nested dict of arrays with leading axes ``[L, E, ...]``;
the store never looks inside one, so the quantiser's packed words, scales and zeros are just
more leaves. Three tiers:

* **Disk** (`write_store`, `open_store`): each leaf is a zarr array chunked one expert per
  chunk, so one expert reads alone. Raw zarr chunks carry no checksum (a flipped byte reads
  back as a wrong value, a missing chunk as zeros), so the manifest keeps a CRC-32 per
  (format, layer, expert) and every disk read is checked against it. The completion marker is
  written last and holds the manifest's SHA-256, so a half-written or edited store is refused.
* **Host**: the experts that fit under ``host_bytes`` (first fit, in ``host_formats`` order,
  layer by layer) rest as jax arrays in ``pinned_host`` memory (``unpinned_host`` where the
  backend has no pinned memory), which the device can copy from asynchronously. The rest stay
  on disk and are read on demand, optionally kept in a small host LRU (``lru_bytes``).
* **Device**: `ExpertPool`, fixed slots ``[S, ...]`` per (layer, format). `ExpertPool.load`
  moves one expert from host into a slot with a jitted ``device_put`` + dynamic_update_slice
  whose pool argument is donated, so the pool is updated in place, never copied.
  `ExpertStore.take` gives one expert's device arrays without a pool.

Every transfer is counted by transition (disk -> host, host -> device), format and layer, in
bytes taken from the arrays moved (``nbytes`` of the expert's leaves; a device sharding
replicated over n devices moves them n times). Disk bytes are the decoded array bytes (the
store writes uncompressed chunks, so they equal the bytes read from the files).

Example::

  write_store(path, {"full": {"gate": g_LxExDxF, ...}, "int4": {...}}, meta={"model": "x"})
  store = open_store(path, host_formats=("int4", "int2"), host_bytes=2**30)
  pool = store.pool(slots=4, formats=("int4",))
  pool.load(layer=3, expert=7, fmt="int4", slot=0)
  w = pool.slots(3, "int4")             # {"gate": [4, ...], ...} on device
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import pathlib
import re
import shutil
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from zojax.errors import ConfigError

MANIFEST = "manifest.json"
MARKER = "COMPLETE"
ARRAYS = "arrays"
VERSION = 1
DISK_TO_HOST, HOST_TO_DEVICE = "disk_to_host", "host_to_device"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class StoreError(ConfigError):
  """The expert store on disk is missing, incomplete or corrupt; the message says which part."""


# ---------------------------------------------------------------------------------------
# Trees: nested dicts <-> {"a/b": leaf}


def _flatten(tree, where: str, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, Mapping) or not tree:
    raise ConfigError(f"{where}{'/' + prefix if prefix else ''} must be a non-empty dict of "
                      f"arrays, got {type(tree).__name__}")
  flat = {}
  for key, value in tree.items():
    if not isinstance(key, str) or not _NAME.match(key):
      raise ConfigError(f"{where}: key {key!r} must be a non-empty string of letters, digits, "
                        "'_' or '-'")
    name = f"{prefix}/{key}" if prefix else key
    flat.update(_flatten(value, where, name) if isinstance(value, Mapping) else {name: value})
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    *parents, last = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return tree


def _crc(leaves: Iterable[np.ndarray]) -> int:
  """CRC-32 of one expert: its leaves' C-order bytes, chained in sorted leaf-name order."""
  crc = 0
  for leaf in leaves:
    crc = zlib.crc32(np.ascontiguousarray(leaf).tobytes(), crc)
  return crc


def _one_line(e: BaseException, limit: int = 240) -> str:
  """The first line of an error, without tensorstore's spec dump."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  text = text.split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _array_spec(root: pathlib.Path, fmt: str, name: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file",
                                        "path": str(root / ARRAYS / fmt / name)}}


# ---------------------------------------------------------------------------------------
# Disk tier: writing


def write_store(path, formats: Mapping[str, Any], meta: Mapping | None = None, *,
                overwrite: bool = False) -> dict:
  """Writes experts in every format to a zarr store at `path`; the marker goes last.

  Args:
    path: a directory (created; must not exist unless `overwrite`).
    formats: ``{format name: nested dict of arrays [L, E, ...]}``; L and E agree everywhere.
    meta: JSON-serialisable facts kept in the manifest (model name, group sizes, ...).
    overwrite: replace a store already at `path` (its marker is removed first, so a crash
      half-way leaves a store that `open_store` refuses).

  Returns:
    The manifest written.
  """
  root = pathlib.Path(path)
  if not isinstance(formats, Mapping) or not formats:
    raise ConfigError("formats must be a non-empty dict {format name: tree of arrays}")
  leaves = {}
  for fmt, tree in formats.items():
    if not isinstance(fmt, str) or not _NAME.match(fmt):
      raise ConfigError(f"format name {fmt!r} must be a non-empty string of letters, digits, "
                        "'_' or '-'")
    leaves[fmt] = {n: np.asarray(a) for n, a in sorted(_flatten(tree, f"formats[{fmt!r}]")
                                                       .items())}
  for fmt, fl in leaves.items():
    for name, a in fl.items():
      if a.ndim < 2 or 0 in a.shape[:2]:
        raise ConfigError(f"formats: every leaf needs leading axes [L, E] with L, E >= 1; "
                          f"{fmt}/{name} is {list(a.shape)}")
  lead = {(fmt, n): a.shape[:2] for fmt, fl in leaves.items() for n, a in fl.items()}
  if len(set(lead.values())) != 1:
    raise ConfigError(f"formats: leaves disagree on the leading [L, E] axes: "
                      f"{sorted({f'{f}/{n}: {s}' for (f, n), s in lead.items()})[:3]}")
  num_layers, num_experts = next(iter(lead.values()))
  try:
    meta_json = json.loads(json.dumps(dict(meta or {})))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"meta must be JSON-serialisable: {_one_line(e)}") from None

  if root.exists():
    if not overwrite:
      raise ConfigError(f"expert store path {root} already exists (pass overwrite=True)")
    (root / MARKER).unlink(missing_ok=True)
    shutil.rmtree(root)
  root.mkdir(parents=True)

  writes = []
  for fmt, fl in leaves.items():
    for name, a in fl.items():
      spec = {**_array_spec(root, fmt, name), "dtype": a.dtype.name,
              "metadata": {"shape": list(a.shape), "chunks": [1, 1, *a.shape[2:]],
                           "compressor": None}}
      arr = ts.open(spec, create=True, open=False).result()
      writes.append(arr.write(a))
  for w in writes:
    w.result()

  manifest = {
      "version": VERSION, "num_layers": int(num_layers), "num_experts": int(num_experts),
      "formats": {fmt: {"leaves": {n: {"shape": list(a.shape), "dtype": a.dtype.name}
                                   for n, a in fl.items()},
                        "expert_bytes": sum(a[0, 0].nbytes for a in fl.values())}
                  for fmt, fl in leaves.items()},
      "checksum": "crc32 of one expert's leaves (C-order bytes, sorted leaf names), chained",
      "checksums": {fmt: [[_crc(a[l, e] for a in fl.values()) for e in range(num_experts)]
                          for l in range(num_layers)] for fmt, fl in leaves.items()},
      "meta": meta_json,
  }
  text = json.dumps(manifest, indent=1, sort_keys=True).encode()
  (root / MANIFEST).write_bytes(text)
  (root / MARKER).write_text(json.dumps({"manifest_sha256": hashlib.sha256(text).hexdigest()}))
  return manifest


# ---------------------------------------------------------------------------------------
# Disk tier: opening


def _read_manifest(root: pathlib.Path) -> dict:
  if not root.is_dir():
    raise StoreError(f"expert store {root} does not exist")
  if not (root / MARKER).is_file():
    raise StoreError(f"expert store {root} is incomplete: no {MARKER} marker (its write did "
                     "not finish)")
  try:
    text = (root / MANIFEST).read_bytes()
    expected = json.loads((root / MARKER).read_text())["manifest_sha256"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise StoreError(f"expert store {root}: unreadable {MANIFEST} or {MARKER}: "
                     f"{_one_line(e)}") from None
  if hashlib.sha256(text).hexdigest() != expected:
    raise StoreError(f"expert store {root}: {MANIFEST} does not match its {MARKER} marker "
                     "(changed after the store was written)")
  manifest = json.loads(text)
  if manifest.get("version") != VERSION:
    raise StoreError(f"expert store {root}: version {manifest.get('version')!r}, this reader "
                     f"knows {VERSION}")
  return manifest


def _open_arrays(root: pathlib.Path, manifest: dict) -> dict[str, dict[str, ts.TensorStore]]:
  arrays = {}
  for fmt, info in manifest["formats"].items():
    arrays[fmt] = {}
    for name, leaf in sorted(info["leaves"].items()):
      try:
        arr = ts.open(_array_spec(root, fmt, name), open=True, read=True).result()
      except ValueError as e:
        what = "is missing" if "NOT_FOUND" in str(e) else f"does not open ({_one_line(e)})"
        raise StoreError(f"expert store {root}: array {fmt}/{name} {what}") from None
      if list(arr.shape) != leaf["shape"] or arr.dtype.name != leaf["dtype"]:
        raise StoreError(f"expert store {root}: array {fmt}/{name} is {list(arr.shape)} "
                         f"{arr.dtype.name}, the manifest says {leaf['shape']} {leaf['dtype']}")
      arrays[fmt][name] = arr
  return arrays


def _host_kind(sharding: jax.sharding.Sharding) -> str:
  device = next(iter(sharding.device_set))
  kinds = {m.kind for m in device.addressable_memories()}
  for kind in ("pinned_host", "unpinned_host"):
    if kind in kinds:
      return kind
  raise ConfigError(f"sharding: the {device.platform} backend has no host memory kind "
                    f"(it has {sorted(kinds)})")


def open_store(path, *, host_formats: Sequence[str] | None = None,
               host_bytes: int | None = None, lru_bytes: int = 0,
               sharding: jax.sharding.Sharding | None = None) -> ExpertStore:
  """Opens a store written by `write_store` and loads what fits into host memory.

  Either the whole store opens, or a one-line `StoreError` is raised and nothing stays in
  host memory (host arrays loaded before a corrupt expert was met are deleted).

  Args:
    path: the store's directory.
    host_formats: formats kept resident in host memory, in priority order; None: all, in the
      store's (sorted) order; () keeps everything on disk.
    host_bytes: cap on resident host bytes: experts are placed first fit in `host_formats`
      order, layer by layer, expert by expert; the others are read from disk on demand.
      None: no cap.
    lru_bytes: a separate host budget for experts read from disk (least recently used out).
    sharding: the device placement of every expert leaf and pool (fully replicated);
      None: the first device.

  Returns:
    An `ExpertStore`; its stats already count the disk -> host bytes of the load.
  """
  root = pathlib.Path(path)
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if not isinstance(sharding, jax.sharding.Sharding) or not sharding.is_fully_replicated:
    raise ConfigError(f"sharding must be a fully replicated jax Sharding, got {sharding!r}")
  for key, value in (("host_bytes", host_bytes), ("lru_bytes", lru_bytes)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
      raise ConfigError(f"{key}={value!r} must be an int >= 0")
  manifest = _read_manifest(root)
  formats = tuple(manifest["formats"])
  host_formats = formats if host_formats is None else tuple(host_formats)
  unknown = [f for f in host_formats if f not in formats]
  if unknown or len(set(host_formats)) != len(host_formats):
    raise ConfigError(f"host_formats={host_formats!r} must be distinct formats of the store "
                      f"{formats}")
  store = ExpertStore(root, manifest, _open_arrays(root, manifest), sharding, lru_bytes)
  try:
    store._load_host(host_formats, host_bytes)
  except BaseException:
    store.close()
    raise
  return store


# ---------------------------------------------------------------------------------------
# Host tier and counters


class ExpertStore:
  """An open expert store: disk arrays, the host-resident experts, the transfer counters.

  Built by `open_store`. Expert trees are nested dicts shaped like the format written, with
  the [L, E] axes taken off.
  """

  def __init__(self, root: pathlib.Path, manifest: dict, arrays, sharding, lru_bytes: int):
    self.path = root
    self.manifest = manifest
    self.meta = manifest["meta"]
    self.num_layers = manifest["num_layers"]
    self.num_experts = manifest["num_experts"]
    self.formats = tuple(manifest["formats"])
    self.host_memory_kind = _host_kind(sharding)
    self.host_sharding = sharding.with_memory_kind(self.host_memory_kind)
    self.device_sharding = sharding.with_memory_kind("device")
    self._replicas = len(sharding.device_set)
    self._arrays = arrays
    self._host: dict[tuple[str, int, int], Any] = {}
    self._lru: collections.OrderedDict = collections.OrderedDict()
    self._lru_cap = lru_bytes
    self._lru_size = 0
    self.reset_stats()

  # -- facts

  def expert_nbytes(self, fmt: str) -> int:
    """Bytes of one expert in `fmt` (all its leaves)."""
    return self.manifest["formats"][self._check_fmt(fmt)]["expert_bytes"]

  def expert_shapes(self, fmt: str) -> dict:
    """One expert's leaves in `fmt` as `jax.ShapeDtypeStruct`s (no [L, E] axes)."""
    leaves = self.manifest["formats"][self._check_fmt(fmt)]["leaves"]
    return _unflatten({n: jax.ShapeDtypeStruct(tuple(v["shape"][2:]), jnp.dtype(v["dtype"]))
                       for n, v in leaves.items()})

  def is_resident(self, layer: int, expert: int, fmt: str) -> bool:
    """Whether the expert rests in host memory (not counting the LRU)."""
    return (fmt, layer, expert) in self._host

  @property
  def host_resident_bytes(self) -> int:
    return sum(self.expert_nbytes(f) for f, _, _ in self._host)

  # -- reads

  def read(self, layer: int, expert: int, fmt: str) -> dict:
    """The expert's numpy arrays read from disk and checked against the manifest's CRC-32
    (counted disk -> host)."""
    return _unflatten(self._read_many([self._key(layer, expert, fmt)])[0])

  def host(self, layer: int, expert: int, fmt: str) -> dict:
    """The expert's arrays in host memory: resident, from the LRU, or read from disk."""
    key = self._key(layer, expert, fmt)
    if key in self._host:
      return self._host[key]
    if key in self._lru:
      self._lru.move_to_end(key)
      self._lru_hits += 1
      return self._lru[key]
    tree = jax.device_put(_unflatten(self._read_many([key])[0]), self.host_sharding)
    size = self.expert_nbytes(fmt)
    if size <= self._lru_cap:
      self._lru[key] = tree
      self._lru_size += size
      while self._lru_size > self._lru_cap:
        old, old_tree = self._lru.popitem(last=False)
        self._lru_size -= self.expert_nbytes(old[0])
        _delete(old_tree)
    return tree

  def take(self, layer: int, expert: int, fmt: str) -> dict:
    """One expert's arrays on the device, outside any pool (counted host -> device)."""
    host = self.host(layer, expert, fmt)
    out = jax.device_put(host, self.device_sharding)
    self._count(HOST_TO_DEVICE, fmt, layer, host)
    return out

  def pool(self, slots: int | Sequence[int], formats: Sequence[str]) -> ExpertPool:
    """A device pool with `slots` per layer (an int, or one per layer) for each format."""
    return ExpertPool(self, slots, formats)

  # -- counters

  def stats(self) -> dict:
    """Bytes and experts moved per transition, format and layer since the last reset.

    Returns:
      ``{"disk_to_host_bytes" | "host_to_device_bytes" | "disk_to_host_experts" |
      "host_to_device_experts": {format: [per-layer int]}, "total_bytes": {transition: int},
      "lru_hits": int, "host_resident_bytes": int, "lru_bytes": int,
      "host_memory_kind": str}``.
    """
    out = {}
    for what in ("bytes", "experts"):
      for tr in (DISK_TO_HOST, HOST_TO_DEVICE):
        out[f"{tr}_{what}"] = {f: [int(v) for v in self._counts[tr, what][f]]
                               for f in self.formats}
    out["total_bytes"] = {tr: int(sum(self._counts[tr, "bytes"][f].sum()
                                      for f in self.formats))
                          for tr in (DISK_TO_HOST, HOST_TO_DEVICE)}
    out.update(lru_hits=self._lru_hits, host_resident_bytes=self.host_resident_bytes,
               lru_bytes=self._lru_size,
               host_memory_kind=self.host_memory_kind)
    return out

  def reset_stats(self) -> None:
    self._counts = {(tr, what): {f: np.zeros(self.num_layers, np.int64) for f in self.formats}
                    for tr in (DISK_TO_HOST, HOST_TO_DEVICE) for what in ("bytes", "experts")}
    self._lru_hits = 0

  def close(self) -> None:
    """Frees the host tier (resident experts and the LRU)."""
    for tree in [*self._host.values(), *self._lru.values()]:
      _delete(tree)
    self._host.clear()
    self._lru.clear()
    self._lru_size = 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- internals

  def _check_fmt(self, fmt: str) -> str:
    if fmt not in self.formats:
      raise ConfigError(f"fmt={fmt!r} is not a format of the store {self.formats}")
    return fmt

  def _check_layer(self, layer: int) -> int:
    if not 0 <= layer < self.num_layers:
      raise ConfigError(f"layer={layer} is outside [0, {self.num_layers})")
    return int(layer)

  def _key(self, layer: int, expert: int, fmt: str) -> tuple[str, int, int]:
    self._check_fmt(fmt)
    self._check_layer(layer)
    if not 0 <= expert < self.num_experts:
      raise ConfigError(f"expert={expert} is outside [0, {self.num_experts})")
    return fmt, int(layer), int(expert)

  def _count(self, transition: str, fmt: str, layer: int, tree) -> None:
    size = sum(x.nbytes for x in jax.tree.leaves(tree))
    if transition == HOST_TO_DEVICE:
      size *= self._replicas
    self._counts[transition, "bytes"][fmt][layer] += size
    self._counts[transition, "experts"][fmt][layer] += 1

  def _read_many(self, keys: Sequence[tuple[str, int, int]]) -> list[dict[str, np.ndarray]]:
    """Flat {leaf name: array} per key, read concurrently and checksummed."""
    futures = [{n: a[l, e].read() for n, a in self._arrays[f].items()} for f, l, e in keys]
    out = []
    for (fmt, layer, expert), fut in zip(keys, futures):
      try:
        flat = {n: f.result() for n, f in fut.items()}
      except ValueError as e:
        raise StoreError(f"expert store {self.path}: format {fmt!r}, layer {layer}, expert "
                         f"{expert} does not read: {_one_line(e)}") from None
      stored = self.manifest["checksums"][fmt][layer][expert]
      actual = _crc(flat[n] for n in sorted(flat))
      if actual != stored:
        raise StoreError(f"expert store {self.path}: checksum mismatch for format {fmt!r}, "
                         f"layer {layer}, expert {expert} (crc32 {actual:08x}, manifest "
                         f"{stored:08x}): the data on disk is corrupt")
      self._count(DISK_TO_HOST, fmt, layer, flat)
      out.append(flat)
    return out

  def _load_host(self, host_formats: Sequence[str], host_bytes: int | None) -> None:
    budget = math.inf if host_bytes is None else host_bytes
    for fmt in host_formats:
      size = self.expert_nbytes(fmt)
      for layer in range(self.num_layers):
        keys = []
        for expert in range(self.num_experts):
          if size <= budget:
            budget -= size
            keys.append((fmt, layer, expert))
        for key, flat in zip(keys, self._read_many(keys)):
          self._host[key] = jax.device_put(_unflatten(flat), self.host_sharding)


def _delete(tree) -> None:
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


# ---------------------------------------------------------------------------------------
# Device tier


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_slot(pool, expert, slot, device_sharding):
  """pool[slot] = expert, with the host -> device copy inside; the pool is donated."""
  expert = jax.device_put(expert, device_sharding)
  return jax.tree.map(lambda p, x: jax.lax.dynamic_update_index_in_dim(p, x, slot, 0),
                      pool, expert)


class ExpertPool:
  """Fixed device slots per (layer, format): arrays [S_layer, ...], updated in place.

  `slots(layer, fmt)` gives the arrays to compute with; fetch them again after a `load`
  (the previous ones are donated to the update and deleted). `contents(layer, fmt)` says
  which expert each slot holds (-1: empty, zeros).
  """

  def __init__(self, store: ExpertStore, slots: int | Sequence[int], formats: Sequence[str]):
    self._store = store
    per_layer = [slots] * store.num_layers if isinstance(slots, int) else list(slots)
    if len(per_layer) != store.num_layers or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
        for s in per_layer):
      raise ConfigError(f"slots={slots!r} must be an int >= 0 or one per layer "
                        f"({store.num_layers})")
    self.slot_counts = tuple(int(s) for s in per_layer)
    self.formats = tuple(store._check_fmt(f) for f in formats)
    self._arrays, self._contents = {}, {}
    for fmt in self.formats:
      shapes = store.expert_shapes(fmt)
      for layer, s in enumerate(self.slot_counts):
        self._arrays[layer, fmt] = jax.tree.map(
            lambda x, s=s: jnp.zeros((s, *x.shape), x.dtype, device=store.device_sharding),
            shapes)
        self._contents[layer, fmt] = np.full(s, -1, np.int64)

  @property
  def nbytes(self) -> int:
    """Device bytes of all slots (per device)."""
    return sum(x.nbytes for x in jax.tree.leaves(self._arrays))

  def slots(self, layer: int, fmt: str) -> dict:
    return self._arrays[self._pool_key(layer, fmt)]

  def contents(self, layer: int, fmt: str) -> np.ndarray:
    return self._contents[self._pool_key(layer, fmt)].copy()

  def load(self, layer: int, expert: int, fmt: str, slot: int) -> None:
    """Moves the expert from host (or disk) into `slot` in place (counted host -> device).

    A disk read that fails its checksum raises before the pool is touched.
    """
    key = self._pool_key(layer, fmt)
    if not 0 <= slot < self.slot_counts[layer]:
      raise ConfigError(f"slot={slot} is outside [0, {self.slot_counts[layer]}) for layer "
                        f"{layer}")
    host = self._store.host(layer, expert, fmt)
    self._arrays[key] = _set_slot(self._arrays[key], host, np.int32(slot),
                                  self._store.device_sharding)
    self._store._count(HOST_TO_DEVICE, fmt, layer, host)
    self._contents[key][slot] = expert

  def _pool_key(self, layer: int, fmt: str) -> tuple[int, str]:
    if fmt not in self.formats:
      raise ConfigError(f"fmt={fmt!r} has no pool (pool formats {self.formats})")
    return self._store._check_layer(layer), fmt
