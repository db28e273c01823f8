"""Checks shared by the optimizer test matrices (ZO and GaLore families)."""

import jax
import numpy as np
import orbax.checkpoint as ocp


def assert_orbax_round_trip(state, path):
  """Saves `state` with orbax and restores it: same structure, dtypes and values."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "state", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(path / "state",
                             jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
