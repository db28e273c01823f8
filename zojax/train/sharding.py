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
  """Param-shaped optimizer state (Adam moments, ...) shards like the params; the rest replicates.

  With `param_shapes`, state that is not param-shaped but belongs to a param (GaLore's
  low-rank moments and projectors, 8-bit scales: a leaf whose key path contains the param's)
  shards each of its trailing axes like the param's axis of the same size, aligned from the
  right, so e.g. [L, m, r] moments of an [L, m, n] kernel keep m's mesh axis.
  """
  replicated = NamedSharding(mesh, P())
  out = optax.tree_map_params(
      tx, lambda _, sharding: sharding, state_shapes, params_shardings,
      transform_non_params=lambda _: replicated)
  # A transform may mark a whole subtree non-param (one sharding for it): expand it to leaves.
  out = jax.tree.map(lambda sh, sub: jax.tree.map(lambda _: sh, sub), out, state_shapes,
                     is_leaf=lambda x: isinstance(x, NamedSharding))
  if param_shapes is None:
    return out
  return _shard_like_owner(out, state_shapes, param_shapes, params_shardings, mesh)


def _shard_like_owner(state_sh, state_shapes, param_shapes, params_shardings, mesh):
  params = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
  param_sh = jax.tree.leaves(params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state_shapes)
  shardings = jax.tree.leaves(state_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
  out = []
  for (path, leaf), sh in zip(leaves, shardings):
    owner, length = None, 0
    for (ppath, pshape), psh in zip(params, param_sh):
      k = len(ppath)
      if k > length and any(tuple(path[s:s + k]) == tuple(ppath) for s in range(len(path) - k + 1)):
        owner, length = (pshape, psh), k
    if owner is None or sh.spec != P() or not getattr(leaf, "ndim", 0):
      out.append(sh)
      continue
    pshape, psh = owner
    pspec = list(psh.spec) + [None] * (len(pshape.shape) - len(psh.spec))
    spec = [None] * leaf.ndim
    for i in range(1, min(leaf.ndim, len(pshape.shape)) + 1):
      if leaf.shape[-i] == pshape.shape[-i]:
        spec[-i] = pspec[-i]
    out.append(NamedSharding(mesh, P(*spec)))
  return jax.tree.unflatten(jax.tree.structure(state_shapes), out)


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Leading (batch) dimension split over the data axis, other dimensions replicated."""
  return NamedSharding(mesh, P(data_axis if data_axis in mesh.shape else None))
