"""Skipping non-finite steps: the one transform every zojax engine uses.

`skip_nonfinite(inner)` runs `inner` and, when the step is not finite, returns zero updates
and `inner`'s state unchanged, and counts the skip. It takes either kind of updates:

  * a `zojax.zo.ZOGrad` (zeroth-order estimate): its ``finite`` flag decides; the flag also
    covers the losses, which the coefficients alone may not show;
  * any other tree (first-order gradients): finite when every leaf is.

Why not ``optax.apply_if_finite``: it judges finiteness from the updates' values only (it
cannot read a ZOGrad's flag), its rejected branch returns zeros shaped like the *incoming*
updates (a ZOGrad, not the parameter-shaped output of a ZO chain), and after
``max_consecutive_errors`` bad steps it applies them anyway. Its ``lax.cond`` also gives the
updates a buffer of their own between the branches, where ``jnp.where`` lets an elementwise
update fuse with the z draw: measured on CPU, the donated ZO-SGD update of an 8-layer,
dim-256 LLaMA (29 MB of parameters) needs 0 MB of temporaries this way, 29 MB with a cond.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zojax.zo.spsa import ZOGrad


class SkipNonfiniteState(NamedTuple):
  """State of `skip_nonfinite`."""

  inner_state: Any
  skipped: jax.Array  # int32 []: steps skipped because they were not finite


def is_finite(updates) -> jax.Array:
  """bool []: a ZOGrad's ``finite`` flag, or whether every leaf of a tree is finite."""
  if isinstance(updates, ZOGrad):
    return jnp.asarray(updates.finite, bool)
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.ones([], bool)
  # One dot, not a chain of per-leaf `and`s: XLA fused that scalar chain into every consumer
  # (each `where` below), so compile time grew with leaves squared (iDisc's 249 leaves:
  # 85 s against 19 s of CPU). Dots are not fused into them; 1 + 0*bad keeps the
  # simplifier from turning the dot back into the chain.
  bad = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.float32) for x in leaves])
  return jnp.dot(bad, 1.0 + 0.0 * bad) == 0


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Applies `inner` to finite steps; a non-finite one gives zero updates and no state change.

  Extra arguments are passed on to `inner`.

  Args:
    inner: any transform; its updates may be a `ZOGrad` or a gradient tree.

  Returns:
    A transform with state `SkipNonfiniteState`; ``skipped`` counts skipped steps. Inner state
    keeps its dtypes from init.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonfiniteState(inner_state=inner.init(params), skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    finite = is_finite(updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                             new_inner, state.inner_state)
    skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, SkipNonfiniteState(inner_state=new_inner, skipped=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["SkipNonfiniteState", "is_finite", "skip_nonfinite"]
