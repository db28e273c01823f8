"""Flax NNX modules as zojax `Model`s: `from_flax(make, loss_fn)`.

An `nnx.Module` keeps its arrays in `nnx.Variable`s; the adapter sorts them three ways:

  * ``nnx.Param``                -> params: a plain tree of nested dicts keyed by attribute
    name (list indices become "0", "1", ..., so checkpoints round-trip), e.g.
    ``{"mlp": {"up": {"kernel": ..., "bias": ...}}}``. Optimizer masks and GaLore's
    path patterns see these ordinary paths.
  * ``nnx.RngState`` (the keys and counters of `nnx.Rngs`) -> neither: every call rebuilds
    them from a fixed seed (`rng_seed`). A forward is then a pure function of (params,
    model state, batch), which ZO's +-eps differences and bit-exact resume rely on; the
    price is that a stochastic layer (`nnx.Dropout`) draws the same mask every call.
  * every other variable (``nnx.BatchStat``, custom `nnx.Variable` types) -> model state,
    which no optimizer sees; a training-mode forward returns its new value as ``aux`` and
    ``update_state`` installs it.

Logical axis names come from each Param's ``out_sharding`` metadata (flax 0.12's name;
``nnx.with_partitioning(init, ("embed", "mlp"))`` sets it), all None where it is absent.
Modules are built with eager sharding off, so the names stay logical: the config's
``mesh.rules`` map them to mesh axes and the engine places the arrays.

Train or eval mode: the adapter calls ``module.train()`` (BatchNorm normalizes with batch
statistics and refreshes its running averages) unless the batch carries ``weight``, the
padding mask of zojax's eval batches (`zojax.data.batching.eval_batches`), in which case it
calls ``module.eval()`` (running averages; padding rows cannot leak into real ones).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zojax.models import interface

Batch = dict[str, jax.Array]
MakeFn = Callable[[nnx.Rngs], nnx.Module]
ModuleLossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]]

# Variables that are neither params nor RNG state are model state.
_STATE = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))


def is_training_batch(batch: Batch) -> bool:
  """zojax's mode rule: eval batches (and only they) carry the padding mask ``weight``."""
  return "weight" not in batch


def _keys(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


def _plain(state: nnx.State) -> dict:
  """State of Variables -> nested dicts of arrays, keyed by the attribute names as strings."""
  out: dict = {}
  for path, var in nnx.to_flat_state(state):
    *parents, leaf = _keys(path)
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = var.get_value()
  return out


def _lookup(tree: dict, keys: tuple[str, ...], what: str):
  node = tree
  for i, key in enumerate(keys):
    if not isinstance(node, dict) or key not in node:
      raise KeyError(f"from_flax: {what} has no entry {'/'.join(keys[:i + 1])!r}")
    node = node[key]
  return node


def _fill(template: nnx.State, tree: dict, what: str) -> nnx.State:
  """`template`'s Variables (types, metadata) holding the arrays of plain `tree`."""
  flat = [(path, var.replace(_lookup(tree, _keys(path), what)))
          for path, var in nnx.to_flat_state(template)]
  return nnx.from_flat_state(flat)


def _axes(params: nnx.State) -> dict:
  """Logical axis names per Param from its ``out_sharding`` metadata; None where absent."""
  out: dict = {}
  for path, var in nnx.to_flat_state(params):
    ndim = len(var.get_value().shape)
    names = var.get_metadata().get("out_sharding")
    names = (None,) * ndim if names is None else tuple(names)
    if len(names) != ndim or not all(n is None or isinstance(n, str) for n in names):
      raise ValueError(f"from_flax: Param {'/'.join(_keys(path))} of rank {ndim} has "
                       f"out_sharding={names!r}; give one logical name (str or None) per axis")
    *parents, leaf = _keys(path)
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = names
  return out


def _rng_values(template: nnx.State, seed: int) -> nnx.State:
  """Fixed RNG variables: counters at 0, key i = fold_in(key(seed), i)."""
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(template)):
    shape_dtype = var.get_value()
    if jax.dtypes.issubdtype(shape_dtype.dtype, jax.dtypes.prng_key):
      value = jax.random.fold_in(jax.random.key(seed), i)
      if value.dtype != shape_dtype.dtype or value.shape != shape_dtype.shape:
        raise ValueError(f"from_flax: RNG key {'/'.join(_keys(path))} is "
                         f"{shape_dtype.dtype}{shape_dtype.shape}; only scalar keys of the "
                         f"default impl ({value.dtype}) are supported")
    else:
      value = jnp.zeros(shape_dtype.shape, shape_dtype.dtype)
    flat.append((path, var.replace(value)))
  return nnx.from_flat_state(flat)


def from_flax(make: MakeFn, loss_fn: ModuleLossFn, *, name: str = "flax",
              rng_seed: int = 0, info: dict | None = None) -> interface.Model:
  """A zojax `Model` over the Flax NNX module that `make` builds.

  The module's ``nnx.Param``s are the params (plain nested dicts), its other non-RNG
  variables the model state (see the module docstring for RNG state and train/eval mode).
  Every returned function is pure and jittable: it rebuilds the module with `nnx.merge`
  from the arrays it is given and never keeps one between calls.

  Args:
    make: ``rngs -> nnx.Module``. A constructor rather than an instance, so that
      ``init(key)`` draws fresh weights from `key` (``make(nnx.Rngs(key))``).
    loss_fn: ``(module, batch) -> (mean loss, metric sums)``, with ``loss_sum`` and
      ``count`` (and e.g. ``correct``) among the sums; it must weight rows by
      ``batch["weight"]`` when the batch has one (0 marks padding).
    name: the model's name in results files.
    rng_seed: seeds the RNG variables the module holds, if any.
    info: extra JSON-able facts for results files.

  Returns:
    A `zojax.models.Model`; ``update_state`` is set only when the module has model state.

  Example:
    >>> def make(rngs):
    ...   return nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs))
    >>> def loss_fn(module, batch):
    ...   err = jnp.mean((module(batch["x"]) - batch["y"]) ** 2, axis=-1)
    ...   w = batch.get("weight", jnp.ones_like(err))
    ...   return jnp.sum(w * err) / jnp.sum(w), {"loss_sum": jnp.sum(w * err), "count": jnp.sum(w)}
    >>> model = from_flax(make, loss_fn, name="toy")
    >>> params, state = model.init(jax.random.key(0)), model.init_state(jax.random.key(0))
    >>> loss, metrics, aux = model.loss(params, state, batch)
    >>> state = model.update_state(state, aux, 0)
  """

  def build(key) -> nnx.Module:
    # Logical names only: placing arrays on a mesh is the engine's job, not the module's.
    with nnx.use_eager_sharding(False):
      return make(nnx.Rngs(key))

  abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
  graphdef, params_t, rngs_t, state_t = nnx.split(abstract, nnx.Param, nnx.RngState, _STATE)
  has_state = bool(jax.tree.leaves(_plain(state_t)))

  def split(module):
    _, params, _, state = nnx.split(module, nnx.Param, nnx.RngState, _STATE)
    return params, state

  def init(key):
    return _plain(split(build(key))[0])

  def init_state(key):
    return _plain(split(build(key))[1])

  def merge(params, model_state):
    return nnx.merge(graphdef, _fill(params_t, params, "params"),
                     _rng_values(rngs_t, rng_seed), _fill(state_t, model_state, "model_state"))

  def loss(params, model_state, batch):
    module = merge(params, model_state)
    training = is_training_batch(batch)
    if training:
      module.train()
    else:
      module.eval()
    value, metrics = loss_fn(module, batch)
    # Eval leaves the running statistics alone; only a training forward's are news.
    aux = _plain(split(module)[1]) if training and has_state else model_state
    return value, metrics, aux

  def update_state(model_state, aux, step):
    del step
    if jax.tree.structure(aux) != jax.tree.structure(model_state):
      raise ValueError("from_flax: aux does not match model_state's structure; pass the "
                       "aux of this model's training-mode loss")
    return aux

  count = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(_plain(params_t)))
  facts = {"module": type(abstract).__name__, "num_params": int(count),
           "model_state": sorted("/".join(_keys(p)) for p, _ in nnx.to_flat_state(state_t)),
           **(info or {})}
  return interface.Model(name=name, init=init, axes=_axes(params_t), loss=loss,
                         init_state=init_state,
                         update_state=update_state if has_state else None, info=facts)
