"""Optimizers as optax transforms: the GaLore family (low-rank projection, 8-bit, natural) and
the zeroth-order ones, which consume `zojax.zo.ZOGrad`s.

Structural settings of the GaLore family and 8-bit Adam are one frozen object per optimizer
(`GaLoreSettings`, `Adam8bitSettings`) and the numbers are plain arguments, so
`optax.inject_hyperparams(optimizer)(learning_rate=...)` works with no `static_args`.
"""

from zojax.optim.adam8bit_transform import (Adam8bitSettings, ScaleByAdam8bitState, adam8bit,
                                            scale_by_adam8bit)
from zojax.optim.galore_transform import (GaLoreDimensionNumbers, GaLoreProjectors,
                                          GaLoreSettings, GaLoreState, galore, galore8bit,
                                          galore_adamw, galore_plan, path_dimension_numbers,
                                          scale_by_adam_torch, scale_by_galore)
from zojax.optim.masks import decay_mask
from zojax.optim.natural_galore_transform import (WoodburyFisherState, natural_galore,
                                                  scale_by_woodbury_fisher)
# zo before skip: skip needs zojax.zo.ZOGrad, and zojax.zo's streamed engine needs optim.zo.
from zojax.optim.zo import (ZOOptimizer, materialize, scale_by_zo_sign, zo_adam, zo_optimizer,
                            zo_sgd, zo_sign)
from zojax.optim.skip import SkipNonfiniteState, skip_nonfinite  # noqa: I001

__all__ = [
    "Adam8bitSettings", "GaLoreDimensionNumbers", "GaLoreProjectors", "GaLoreSettings",
    "GaLoreState", "ScaleByAdam8bitState", "WoodburyFisherState",
    "adam8bit", "galore", "galore8bit", "galore_adamw", "galore_plan", "natural_galore",
    "path_dimension_numbers", "scale_by_adam8bit", "scale_by_adam_torch", "scale_by_galore",
    "scale_by_woodbury_fisher",
    "SkipNonfiniteState", "decay_mask", "materialize", "scale_by_zo_sign", "skip_nonfinite",
    "ZOOptimizer", "zo_adam", "zo_optimizer", "zo_sgd", "zo_sign",
]
