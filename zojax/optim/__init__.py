"""Optimizers as optax transforms: the GaLore family (low-rank projection, 8-bit, natural) and
the zeroth-order ones, which consume `zojax.zo.ZOGrad`s."""

from zojax.optim.adam8bit_transform import ScaleByAdam8bitState, adam8bit, scale_by_adam8bit
from zojax.optim.galore_transform import (GaLoreDimensionNumbers, GaLoreState, galore, galore8bit,
                                galore_adamw, galore_plan, path_dimension_numbers,
                                scale_by_adam_torch, scale_by_galore, static_args)
from zojax.optim.masks import decay_mask
from zojax.optim.natural_galore_transform import (WoodburyFisherState, natural_galore,
                                        scale_by_woodbury_fisher)
from zojax.optim.zo import (SkipNonfiniteState, materialize, scale_by_zo_sign, skip_nonfinite,
                            zo_adam, zo_sgd, zo_sign)

__all__ = [
    "GaLoreDimensionNumbers", "GaLoreState", "ScaleByAdam8bitState", "WoodburyFisherState",
    "adam8bit", "galore", "galore8bit", "galore_adamw", "galore_plan", "natural_galore",
    "path_dimension_numbers", "scale_by_adam8bit", "scale_by_adam_torch", "scale_by_galore",
    "scale_by_woodbury_fisher", "static_args",
    "SkipNonfiniteState", "decay_mask", "materialize", "scale_by_zo_sign", "skip_nonfinite", "zo_adam",
    "zo_sgd", "zo_sign",
]
