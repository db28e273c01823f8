"""Optax transforms that consume a zeroth-order estimate (`zojax.zo.ZOGrad`) as their updates.

The ``updates`` argument of these transforms is a `ZOGrad` (n scalars plus the key, step and
direction that regenerate z); they return dense updates shaped like the parameters, so
``optax.apply_updates`` applies them as usual. Two levels, as in optax:

  * directions: `materialize` (ĝ = (1/n) Σ c_i z_i, to chain with any optax optimizer) and
    `scale_by_zo_sign` (sign(ĝ), formed in float32);
  * optimizers: `zo_optimizer(direction, *post)` is ``skip_nonfinite(chain(direction,
    *post))`` with ``post`` elementwise; `zo_sgd` (MeZO, Malladi et al. 2023, Algorithm 1),
    `zo_adam` (MeZO-Adam) and `zo_sign` (ZO-signSGD, Liu et al. 2019) are built by it.

Each optimizer is defined here once, and both engines run that one definition: the dense one
(`zojax.zo.make_apply`, `zojax.zo.replay`) on the whole tree, the streamed one
(`zojax.zo.StreamEngine`) one parameter group (a layer, embed, head) at a time. For that
the engine passes the extra argument ``zo_estimate(zograd, group_params, dtype)``, which forms
ĝ for the group it updates; the direction transforms call it instead of `materialize`'s whole
tree. Since ``post`` acts on each leaf on its own, one group with its slice of the state is
the same arithmetic as the whole tree. The returned type, `ZOOptimizer`, records that promise;
wrappers (``optax.chain``, ``optax.inject_hyperparams``) return plain transforms, which the
streamed engine refuses.

`skip_nonfinite` (`zojax.optim.skip`) makes a step whose estimate is flagged non-finite a
no-op: zero updates, inner state unchanged, a skip counter incremented. Wrap your own chains
in it too: ``skip_nonfinite(optax.chain(materialize(), optax.adamw(1e-4)))``; a bare chain
passes a NaN estimate on as NaN gradients.

Random-number passes: the update regenerates each z_i exactly once (n draws per leaf for n
samples), one layer at a time, summed in a float32 accumulator and consumed by the
elementwise optimizer math in the same jitted update; no stacked z or dense gradient of the
whole model is kept (measured on CPU: temporaries 3-5x one layer's weights, the same for 8
and 16 layers). With the forward's single draw (`zojax.zo.spsa`) a one-sample step
makes 2 passes over the parameters' z, against MeZO's 4.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from zojax.optim.masks import decay_mask
from zojax.optim.skip import SkipNonfiniteState, skip_nonfinite
from zojax.zo.spsa import ZOGrad, materialize as materialize_estimate

class ZOOptimizer(optax.GradientTransformationExtraArgs):
  """A ZO optimizer that may be applied one parameter group at a time (see `zo_optimizer`).

  An ordinary optax transform; the type only records that everything after its direction is
  elementwise, which the streamed engine needs and cannot check itself.
  """

  __slots__ = ()


class _Direction(optax.GradientTransformationExtraArgs):
  """A direction transform: consumes a ZOGrad and honours the ``zo_estimate`` extra arg."""

  __slots__ = ()


def _direction(who: str, form: Callable) -> _Direction:
  """A stateless transform ``form(estimate, params)``; ``estimate(dtype)`` gives ĝ."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, zo_estimate=None, **extra_args):
    del extra_args
    if not isinstance(updates, ZOGrad):
      raise ValueError(f"{who} expects updates to be a zojax.zo.ZOGrad, got "
                       f"{type(updates).__name__}")
    if params is None:
      raise ValueError(f"{who} needs params: call update(zograd, state, params)")
    estimate = zo_estimate or materialize_estimate
    return form(lambda dtype: estimate(updates, params, dtype=dtype), params), state

  return _Direction(init_fn, update_fn)


def materialize(*, dtype=None) -> optax.GradientTransformationExtraArgs:
  """The dense estimate from a `ZOGrad`, to chain with any optax optimizer.

  ĝ = (1/n) Σ_i c_i z_i  (MeZO Eq. 1), each z_i regenerated once, Gaussian or Rademacher as
  the estimate's ``direction`` says (a static field of the `ZOGrad`, so one transform serves
  both and cannot mix them up).

  Args:
    dtype: dtype of the dense gradient; None gives each leaf its parameter's dtype.

  Returns:
    A stateless transform; `update` needs `params` (for shapes).
  """
  return _direction("materialize()", lambda estimate, params: estimate(dtype))


def _sign(estimate, params):
  # The sum over samples is taken in float32 whatever the parameters' dtype.
  return jax.tree.map(lambda d, p: jnp.sign(d).astype(p.dtype), estimate(jnp.float32), params)


def scale_by_zo_sign() -> optax.GradientTransformationExtraArgs:
  """sign(ĝ): the ZO-signSGD direction (Liu et al. 2019, Eq. 3), the sum taken in float32.

  Returns:
    A stateless transform; `update` needs `params`.
  """
  return _direction("scale_by_zo_sign()", _sign)


def zo_optimizer(direction: optax.GradientTransformation,
                 *post: optax.GradientTransformation) -> ZOOptimizer:
  """A ZO optimizer: ``skip_nonfinite(chain(direction, *post))``, streamable.

  Args:
    direction: `materialize()` or `scale_by_zo_sign()`.
    *post: transforms that treat every leaf on its own (moments, scaling, weight decay with
      a callable mask); not checked. A transform that mixes leaves (``clip_by_global_norm``)
      would update a streamed model, one group at a time, differently from a dense one.

  Returns:
    A `ZOOptimizer` consuming `ZOGrad`s, state `SkipNonfiniteState` whose ``inner_state`` is
    the chain's tuple (direction's, then each of ``post``'s).
  """
  if not isinstance(direction, _Direction):
    raise ValueError(f"direction must be zojax.optim.materialize() or scale_by_zo_sign(), got "
                     f"{type(direction).__name__}")
  return ZOOptimizer(*skip_nonfinite(optax.chain(direction, *post)))


def _decay(weight_decay, mask):
  if mask is not None and not callable(mask) and jax.tree_util.treedef_is_leaf(
      jax.tree.structure(mask)):
    # optax.inject_hyperparams calls a callable mask as a schedule and passes on its value
    # for the step count (decay_mask gives True): refuse it rather than decay every leaf.
    raise ValueError(f"mask={mask!r:.40} must be None, a callable or a tree of bools; under "
                     "optax.inject_hyperparams pass a callable mask with static_args='mask'")
  return optax.add_decayed_weights(weight_decay, decay_mask if mask is None else mask)


def _build(direction, parts, mask) -> optax.GradientTransformationExtraArgs:
  tx = zo_optimizer(direction, *parts)
  # A tree mask fits the whole parameter tree only, not one group of it: dense use only.
  return tx if mask is None or callable(mask) else optax.GradientTransformationExtraArgs(*tx)


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
    mask: where weight decay applies: a callable (params -> bool tree) or a bool tree; None
      uses `zojax.optim.masks.decay_mask` (no decay on norms and biases).

  Returns:
    A `ZOOptimizer` consuming `ZOGrad`s, state `SkipNonfiniteState`; with a tree `mask`, a
    plain transform (a tree fits the whole model, so the streamed engine cannot use it).
  """
  parts = [_decay(weight_decay, mask)]
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _build(materialize(), parts, mask)


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
    mask: where weight decay applies (as in `zo_sgd`).

  Returns:
    A `ZOOptimizer` (as `zo_sgd`).
  """
  parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps), _decay(weight_decay, mask),
           optax.scale_by_learning_rate(learning_rate)]
  return _build(materialize(), parts, mask)


def zo_sign(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, *,
            mask: Any | Callable | None = None) -> optax.GradientTransformationExtraArgs:
  """ZO-signSGD: θ ← θ − η (sign(ĝ) + λθ).

  Args:
    learning_rate: η, a float or schedule.
    weight_decay: λ, decoupled.
    mask: where weight decay applies (as in `zo_sgd`).

  Returns:
    A `ZOOptimizer` (as `zo_sgd`).
  """
  parts = [_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)]
  return _build(scale_by_zo_sign(), parts, mask)


__all__ = [
    "SkipNonfiniteState", "ZOOptimizer", "materialize", "scale_by_zo_sign",
    "skip_nonfinite", "zo_adam", "zo_optimizer", "zo_sgd", "zo_sign",
]
