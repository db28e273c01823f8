"""Zeroth-order estimation: the perturbation stream, SPSA estimates, run replay, and the
streamed (ZO2) and distributed (DistZO2) engines."""

from zojax.zo.perturb import DIRECTIONS, block_noise, leaf_paths, perturb_tree, tree_noise
from zojax.zo.replay import ZOLog, make_apply, replay
from zojax.zo.spsa import ZOGrad, materialize, perturbed_forward, spsa
from zojax.zo.stream import Layout, StreamConfig, StreamEngine, StreamState
from zojax.zo.inspect import device_bytes
from zojax.zo.parallel import collective_traffic, make_layout, make_mesh

__all__ = [
    "DIRECTIONS", "ZOGrad", "ZOLog", "block_noise", "leaf_paths", "make_apply", "materialize",
    "perturb_tree", "perturbed_forward", "replay", "spsa", "tree_noise",
    "Layout", "StreamConfig", "StreamEngine", "StreamState", "collective_traffic",
    "device_bytes", "make_layout", "make_mesh",
]
