"""model.attention = auto: the Pallas kernel on a GPU; off it, naive or blockwise by length."""

import jax
import jax.numpy as jnp
import numpy as np

from zojax.kernels import attention as attn


def test_auto_picks_by_backend_and_key_length():
  assert attn.default_implementation("gpu", kv_len=64) == "pallas"
  assert attn.default_implementation("cpu", kv_len=attn.BLOCKWISE_FROM - 1) == "xla"
  assert attn.default_implementation("cpu", kv_len=attn.BLOCKWISE_FROM) == "blockwise"
  assert attn.default_implementation("tpu", kv_len=64) == "xla"
  assert attn.default_implementation("cpu") == "blockwise"  # length unknown: O(N) memory


def test_auto_dispatches_to_the_chosen_path():
  """Short sequences run the naive path bit for bit; the blockwise scan (a different
  summation order) at BLOCKWISE_FROM keys, within float tolerance of it."""
  def qkv(t):
    keys = jax.random.split(jax.random.key(t), 3)
    return [jax.random.normal(key, (1, t, 2, 16)) for key in keys]
  run = lambda impl: jax.jit(lambda q, k, v: attn.attention(q, k, v, causal=True,
                                                            implementation=impl))
  auto, naive, blockwise = run("auto"), run("xla"), run("blockwise")
  q, k, v = qkv(64)
  np.testing.assert_array_equal(auto(q, k, v), naive(q, k, v))
  q, k, v = qkv(attn.BLOCKWISE_FROM)
  got = auto(q, k, v)
  np.testing.assert_array_equal(got, blockwise(q, k, v))
  assert not np.array_equal(got, naive(q, k, v))  # the two paths are told apart
  np.testing.assert_allclose(got, naive(q, k, v), atol=2e-5)
  assert got.dtype == jnp.float32
