"""Which parameters an optimizer's weight decay touches."""

import jax


def decay_mask(params):
  """Weight decay on weight matrices only: not on norms (nor biases), as MeZO and HF do.

  Decided by name, since stacked norm scales [L, D] are 2-D like matrices.
  """
  def keep(path, _):
    name = jax.tree_util.keystr(path)
    return "norm" not in name and "bias" not in name
  return jax.tree_util.tree_map_with_path(keep, params)
