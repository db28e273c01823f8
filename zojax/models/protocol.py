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
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

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
