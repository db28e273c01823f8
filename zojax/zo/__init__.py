"""Zeroth-order estimation: the perturbation stream, SPSA estimates and run replay."""

from zojax.zo.perturb import block_noise, leaf_paths, perturb_tree, tree_noise
from zojax.zo.replay import ZOLog, make_apply, replay
from zojax.zo.spsa import ZOGrad, materialize, perturbed_forward, spsa

__all__ = [
    "ZOGrad", "ZOLog", "block_noise", "leaf_paths", "make_apply", "materialize",
    "perturb_tree", "perturbed_forward", "replay", "spsa", "tree_noise",
]
