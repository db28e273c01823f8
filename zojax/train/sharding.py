"""Mesh construction and logical-axis sharding rules (MaxText's mechanism, kept small).

Parameters carry logical axis names (`llama.param_axes`); the config's `mesh.rules` map
each logical name to a mesh axis or None (replicated). Anything a rule does not name is
replicated, so a new parameter never fails to shard, it just isn't split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(axes: Sequence[tuple[str, int]]) -> Mesh:
  """A mesh from (name, size) pairs; one size may be -1 to take the remaining devices.

  A mesh smaller than the machine uses the first devices (handy for comparisons).
  """
  names = [a for a, _ in axes]
  sizes = [int(s) for _, s in axes]
  n = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.axes={list(axes)}: at most one axis may have size -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh.axes={list(axes)}: {n} devices not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) > n:
    raise ValueError(f"mesh.axes={list(axes)} needs {math.prod(sizes)} devices, have {n}")
  devices = np.asarray(jax.devices()[:math.prod(sizes)]).reshape(sizes)
  return Mesh(devices, tuple(names))


def logical_to_spec(axes: tuple[str | None, ...], rules: Sequence[tuple[str, str | None]],
                    mesh: Mesh, shape: tuple[int, ...]) -> P:
  """PartitionSpec for one array; drops a mapping whose mesh axis doesn't divide the dim."""
  table = dict(rules)
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axis = table.get(name) if name is not None else None
    if (mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape
        or dim % mesh.shape[mesh_axis]):
      spec.append(None)
    else:
      spec.append(mesh_axis)
      used.add(mesh_axis)
  return P(*spec)


def param_shardings(shapes: Any, axes: Any, rules, mesh: Mesh) -> Any:
  """NamedShardings for a parameter tree from its logical axes."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  return jax.tree.map(
      lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, rules, mesh, s.shape)),
      axes, shapes, is_leaf=is_axes)


def optimizer_state_shardings(tx: optax.GradientTransformation, state_shapes: Any,
                              params_shardings: Any, mesh: Mesh) -> Any:
  """Param-shaped optimizer state (Adam moments, ...) shards like the params; the rest replicates."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, state_shapes, params_shardings,
      transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Leading (batch) dimension split over the data axis, other dimensions replicated."""
  return NamedSharding(mesh, P(data_axis if data_axis in mesh.shape else None))
