"""Optimizers as optax transforms; the zeroth-order ones consume `zojax.zo.ZOGrad`s."""

from zojax.optim.masks import decay_mask
from zojax.optim.zo import (SkipNonfiniteState, materialize, scale_by_zo_sign, skip_nonfinite,
                            zo_adam, zo_sgd, zo_sign)

__all__ = [
    "SkipNonfiniteState", "decay_mask", "materialize", "scale_by_zo_sign", "skip_nonfinite", "zo_adam",
    "zo_sgd", "zo_sign",
]
