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
                              params_shardings: Any, mesh: Mesh, param_shapes: Any = None) -> Any:
  """Optimizer state shards like the param it belongs to; the rest replicates.

  `optax.tree_map_params` finds each param's state: its moments, and what a transform marks
  as the param's (GaLore's low-rank moments and projectors, 8-bit scales). With
  `param_shapes`, each trailing axis of such a leaf takes the mesh axis of the param's axis
  of the same size, aligned from the right, so e.g. [L, m, r] moments of an [L, m, n] kernel
  keep m's mesh axis and param-shaped state shards exactly like the param. Without it, a
  leaf takes the param's sharding where that divides the leaf's shape, else replicates.
  """
  replicated = NamedSharding(mesh, P())

  def like_param(leaf, param_sharding, param_shape=None):
    if leaf is None:  # a param this transform keeps no state for (GaLore: not projected)
      return None
    shape, pspec = tuple(leaf.shape), tuple(param_sharding.spec)
    if param_shape is None:
      fits = len(pspec) <= len(shape) and all(
          a is None or shape[i] % math.prod(mesh.shape[x] for x in _axes(a)) == 0
          for i, a in enumerate(pspec))
      return param_sharding if fits else replicated
    pshape = tuple(param_shape.shape)
    pspec += (None,) * (len(pshape) - len(pspec))
    spec = [None] * len(shape)
    for i in range(1, min(len(shape), len(pshape)) + 1):
      if shape[-i] == pshape[-i]:
        spec[-i] = pspec[-i]
    return NamedSharding(mesh, P(*spec))

  rest = (params_shardings,) if param_shapes is None else (params_shardings, param_shapes)
  out = optax.tree_map_params(tx, like_param, state_shapes, *rest,
                              transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: x is None)
  # A transform may mark a whole subtree non-param (one sharding for it): expand it to leaves.
  return jax.tree.map(lambda sh, sub: jax.tree.map(lambda _: sh, sub), out, state_shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (a name or a tuple of names)."""
  return entry if isinstance(entry, tuple) else (entry,)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Leading (batch) dimension split over the data axis, other dimensions replicated."""
  return NamedSharding(mesh, P(data_axis if data_axis in mesh.shape else None))
