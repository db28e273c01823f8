"""The block protocol: how every zojax engine sees a model.

A model is three pure functions over a parameter pytree split as
``{"embed": ..., "blocks": ..., "head": ...}``:

  carry = embed(params, batch)                # params: the whole tree (blocks unused)
  carry = block(block_params, carry)          # one layer; block_params = blocks[l]
  loss, metrics = head(params, carry, batch)  # params: the whole tree (blocks unused)

``params["blocks"]`` holds identical layers stacked on a leading axis, so the dense
forward is one ``lax.scan``. A ZO engine can instead perturb each layer inside the scan,
stream layers from host memory one at a time, or shard them over a mesh, all without
touching the model's code. `metrics` are sums (e.g. correct predictions, token counts)
so they add across micro-batches and devices.

Token tables. A model reads the leaves of ``embed``/``head`` that it only indexes or
multiplies by (the vocabulary tables) through `take` and `dense`. On plain arrays they are
ordinary indexing; a ZO engine may hand the model a `PerturbedTable` instead, the table plus
what regenerates its perturbation, so only the rows a batch touches are ever perturbed and
the vocabulary table is never copied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
Batch = dict[str, jax.Array]


class BlockModel(NamedTuple):
  """A model in the block protocol (see module docstring)."""

  embed: Callable[[Params, Batch], Any]
  block: Callable[[Params, Any], Any]
  head: Callable[[Params, Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def run_blocks(model: BlockModel, blocks: Params, carry: Any, *, remat: bool = False) -> Any:
  """Runs the stacked blocks in order with `lax.scan`; `remat` trades compute for memory."""
  block = jax.checkpoint(model.block) if remat else model.block
  carry, _ = jax.lax.scan(lambda c, p: (block(p, c), None), carry, blocks)
  return carry


def apply(model: BlockModel, params: Params, batch: Batch, *, remat: bool = False):
  """The dense forward: embed, all blocks, head. Returns (loss, metrics)."""
  carry = model.embed(params, batch)
  carry = run_blocks(model, params["blocks"], carry, remat=remat)
  return model.head(params, carry, batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerturbedTable:
  """w + scale·z for a table leaf, never formed: z slices come from `rows(key, shape, index)`.

  `rows` (e.g. `zojax.zo.perturb.table_rows`) returns z at positions `index` along `axis`,
  float32 [*index.shape, *slice_shape]; the result of `take` uses the same arithmetic as
  `zojax.zo.perturb.perturb` (float32, cast back to w's dtype).
  """

  w: jax.Array
  key: jax.Array
  scale: jax.Array
  axis: int = dataclasses.field(metadata=dict(static=True))
  rows: Callable = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self):
    return self.w.shape

  @property
  def dtype(self):
    return self.w.dtype

  def _perturbed(self, w, z):
    return (w.astype(jnp.float32) + self.scale * z).astype(w.dtype)

  def take(self, index: jax.Array) -> jax.Array:
    z = jnp.moveaxis(self.rows(self.key, self.w.shape, index),
                     tuple(range(jnp.ndim(index))), tuple(range(self.axis, self.axis + jnp.ndim(index))))
    return self._perturbed(take(self.w, index, self.axis), z)

  def dense(self) -> jax.Array:
    index = jnp.arange(self.w.shape[self.axis], dtype=jnp.uint32)
    return self._perturbed(self.w, jnp.moveaxis(self.rows(self.key, self.w.shape, index), 0,
                                                self.axis))


def take(table, index: jax.Array, axis: int = 0) -> jax.Array:
  """table indexed by `index` along `axis` (``table[index]`` for axis 0); see module docstring."""
  if isinstance(table, PerturbedTable):
    if axis != table.axis:
      raise ValueError(f"take along axis {axis} of a PerturbedTable sliced along {table.axis}")
    return table.take(index)
  return table[(slice(None),) * axis + (index,)]


def dense(table) -> jax.Array:
  """The table as an array (a `PerturbedTable` is formed in full: w + scale·z)."""
  return table.dense() if isinstance(table, PerturbedTable) else table
