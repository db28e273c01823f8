"""A random MoE layer problem shared by the dispatch and expert-parallel tests."""

import jax


def problem(seed: int, T: int, D: int, F: int, E: int, logit_scale: float = 1.0):
  """Tokens x [T, D], router logits [T, E], SwiGLU expert weights (w_gate, w_up, w_down)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (T, D))
  w = (jax.random.normal(keys[1], (E, D, F)) / 4, jax.random.normal(keys[2], (E, D, F)) / 4,
       jax.random.normal(keys[3], (E, F, D)) / 5)
  return x, logit_scale * jax.random.normal(keys[4], (T, E)), w
