"""Optax transforms that consume a zeroth-order estimate (`zojax.zo.ZOGrad`) as their updates.

The ``updates`` argument of these transforms is a `ZOGrad` (n scalars plus the key and step
that regenerate z); they return dense updates shaped like the parameters, so
``optax.apply_updates`` applies them as usual. Two levels, as in optax:

  * directions: `materialize` (ĝ = (1/n) Σ c_i z_i, to chain with any optax optimizer) and
    `scale_by_zo_sign` (sign(ĝ), formed in float32);
  * aliases: `zo_sgd` (MeZO, Malladi et al. 2023, Algorithm 1), `zo_adam` (MeZO-Adam) and
    `zo_sign` (ZO-signSGD, Liu et al. 2019), each wrapped in `skip_nonfinite`.

`skip_nonfinite` makes a step whose estimate is flagged non-finite a no-op: zero updates,
inner state unchanged, a skip counter incremented. Wrap your own chains in it too:
``skip_nonfinite(optax.chain(materialize(), optax.adamw(1e-4)))``; a bare chain passes a
NaN estimate on as NaN gradients.

Random-number passes: the update regenerates each z_i exactly once (n draws per leaf for n
samples), one layer at a time, summed in a float32 accumulator and consumed by the
elementwise optimizer math in the same jitted update; no stacked z or dense gradient of the
whole model is kept (measured on CPU: temporaries 3-5x one layer's weights, the same for 8
and 16 layers). With the forward's single draw (`zojax.zo.spsa`) a one-sample step
makes 2 passes over the parameters' z, against MeZO's 4.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from zojax.optim.masks import decay_mask
from zojax.zo.spsa import ZOGrad, materialize as materialize_estimate


def _check_zograd(updates, who: str):
  if not isinstance(updates, ZOGrad):
    raise ValueError(f"{who} expects updates to be a zojax.zo.ZOGrad, got "
                     f"{type(updates).__name__}")


class SkipNonfiniteState(NamedTuple):
  """State of `skip_nonfinite`."""

  inner_state: Any
  skipped: jax.Array  # int32 []: steps skipped because the estimate was not finite


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """Applies `inner` to finite estimates; a non-finite one gives zero updates and no state change.

  Args:
    inner: a transform consuming a `ZOGrad`.

  Returns:
    A transform with state `SkipNonfiniteState`. Inner state keeps its dtypes from init.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return SkipNonfiniteState(inner_state=inner.init(params),
                              skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    _check_zograd(updates, "skip_nonfinite")
    finite = updates.finite
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
    new_inner = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                             new_inner, state.inner_state)
    skipped = state.skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
    return new_updates, SkipNonfiniteState(inner_state=new_inner, skipped=skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def materialize(*, dtype=None) -> optax.GradientTransformation:
  """The dense estimate from a `ZOGrad`, to chain with any optax optimizer.

  ĝ = (1/n) Σ_i c_i z_i  (MeZO Eq. 1), each z_i regenerated once.

  Args:
    dtype: dtype of the dense gradient; None gives each leaf its parameter's dtype.

  Returns:
    A stateless transform; `update` needs `params` (for shapes).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    _check_zograd(updates, "materialize()")
    if params is None:
      raise ValueError("materialize() needs params: call update(zograd, state, params)")
    return materialize_estimate(updates, params, dtype=dtype), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_zo_sign() -> optax.GradientTransformation:
  """sign(ĝ): the ZO-signSGD direction (Liu et al. 2019, Eq. 3), the sum taken in float32.

  Returns:
    A stateless transform; `update` needs `params`.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    _check_zograd(updates, "scale_by_zo_sign()")
    if params is None:
      raise ValueError("scale_by_zo_sign() needs params: call update(zograd, state, params)")
    g = materialize_estimate(updates, params, dtype=jnp.float32)
    return jax.tree.map(lambda d, p: jnp.sign(d).astype(p.dtype), g, params), state

  return optax.GradientTransformation(init_fn, update_fn)


def _decay(weight_decay, mask):
  return optax.add_decayed_weights(weight_decay, decay_mask if mask is None else mask)


def zo_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
           weight_decay: float = 0.0, *, nesterov: bool = False,
           mask: Any | Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """ZO-SGD (MeZO): θ ← θ − η (ĝ + λθ), optionally with heavy-ball momentum on ĝ + λθ.

  Args:
    learning_rate: η, a float or schedule.
    momentum: decay of the momentum buffer; None keeps no buffer (as `optax.sgd`; a number,
      even 0.0, keeps one so `inject_hyperparams` can schedule it).
    weight_decay: λ, coupled as in MeZO.
    nesterov: Nesterov momentum.
    mask: where weight decay applies; None uses `zojax.optim.masks.decay_mask` (no decay
      on norms and biases).

  Returns:
    A transform consuming `ZOGrad`s, state `SkipNonfiniteState`.
  """
  parts = [materialize(), _decay(weight_decay, mask)]
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return skip_nonfinite(optax.chain(*parts))


def zo_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-8, weight_decay: float = 0.0, *,
            mask: Any | Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """Adam on the ZO estimate with decoupled weight decay (MeZO-Adam; AdamW when λ > 0).

  Args:
    learning_rate: η, a float or schedule.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to the root second moment.
    weight_decay: λ, decoupled (AdamW).
    mask: where weight decay applies; None uses `decay_mask`.

  Returns:
    A transform consuming `ZOGrad`s, state `SkipNonfiniteState`.
  """
  return skip_nonfinite(optax.chain(
      materialize(), optax.scale_by_adam(b1=b1, b2=b2, eps=eps), _decay(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate)))


def zo_sign(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, *,
            mask: Any | Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """ZO-signSGD: θ ← θ − η (sign(ĝ) + λθ).

  Args:
    learning_rate: η, a float or schedule.
    weight_decay: λ, decoupled.
    mask: where weight decay applies; None uses `decay_mask`.

  Returns:
    A transform consuming `ZOGrad`s, state `SkipNonfiniteState`.
  """
  return skip_nonfinite(optax.chain(
      scale_by_zo_sign(), _decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)))
