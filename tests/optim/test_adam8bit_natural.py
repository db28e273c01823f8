"""8-bit Adam (quantizer, agreement with fp32 Adam) and Natural GaLore (Woodbury = dense
inverse Fisher, history cleared at a refresh). Optimizer steps run under jax.jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax import optim

from zojax.optim import adam8bit_transform as A8
from zojax.optim import natural_galore_transform as NG


def test_codebooks_are_256_sorted_codes_spanning_the_range():
  for signed, lo in ((True, -0.9930), (False, 0.0)):  # signed: 1 is a code, -1 rounds to -0.993
    book = A8.dynamic_codebook(signed)
    assert book.shape == (256,) and np.all(np.diff(book) > 0)
    assert abs(book[0] - lo) < 1e-4 and book[-1] == 1.0 and 0.0 in book
    assert np.sum((np.abs(book) > 1e-6) & (np.abs(book) < 1e-5)) >= 1  # reaches 1e-6 magnitudes


def test_blockwise_quantization_error_is_small_and_per_block():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 300)) * np.logspace(-4, 0, 300), jnp.float32)
  codes, absmax = A8.quantize(x, signed=True, block_size=256)
  assert codes.dtype == jnp.uint8
  chex.assert_shape([codes, absmax], [x.shape, (4,)])
  back = A8.dequantize(codes, absmax, signed=True, block_size=256)
  flat = np.abs(np.asarray(x)).reshape(-1)
  np.testing.assert_allclose(absmax[:3], [flat[i * 256:(i + 1) * 256].max() for i in range(3)])
  # Relative to each block's absmax the error is below half the widest codebook gap (~0.07).
  err = np.abs(np.asarray(back) - np.asarray(x)).reshape(-1)
  scale = np.repeat(np.asarray(absmax), 256)[:err.size]
  assert np.max(err / scale) < 0.04 and np.median(err / scale) < 1e-2


def test_adam8bit_tracks_fp32_adam_and_keeps_small_leaves_exact():
  rng = np.random.default_rng(1)
  params = {"w": jnp.zeros((64, 128), jnp.float32), "b": jnp.zeros((16,), jnp.float32)}
  tx8, tx32 = optim.adam8bit(1e-2), optax.adam(1e-2)
  s8, s32 = jax.jit(tx8.init)(params), jax.jit(tx32.init)(params)
  assert s8[0].mu["w"].dtype == jnp.uint8 and s8[0].mu["b"].dtype == jnp.float32
  p8 = p32 = params
  up8, up32 = jax.jit(tx8.update), jax.jit(tx32.update)
  for _ in range(20):
    g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    u8, s8 = up8(g, s8, p8)
    u32, s32 = up32(g, s32, p32)
    p8, p32 = optax.apply_updates(p8, u8), optax.apply_updates(p32, u32)
  chex.assert_trees_all_close(p8["b"], p32["b"], rtol=1e-5, atol=1e-7)
  rel = np.linalg.norm(p8["w"] - p32["w"]) / np.linalg.norm(p32["w"])
  assert rel < 0.05, rel


def test_woodbury_solve_is_the_dense_inverse_fisher():
  rng = np.random.default_rng(2)
  hist = jnp.asarray(rng.standard_normal((5, 4, 3)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  lam = 0.3
  cols = np.asarray(hist, np.float64).reshape(5, -1).T
  dense = np.linalg.solve(lam * np.eye(12) + cols @ cols.T, np.asarray(g, np.float64).reshape(-1))
  np.testing.assert_allclose(NG.woodbury_fisher_solve(g, hist, lam).reshape(-1), dense,
                             rtol=1e-4, atol=1e-5)


def test_fisher_history_is_a_ring_buffer_cleared_at_a_refresh():
  rng = np.random.default_rng(3)
  params = {"blocks": {"wq": jnp.zeros((2, 8, 6), jnp.float32)}}
  tx = optim.natural_galore(1e-2, settings=optim.GaLoreSettings(rank=2, update_proj_gap=3,
                                                                  history=2))
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  hist = lambda s: s[0].low_rank_state.history["blocks"]["wq"]
  chex.assert_shape(hist(state), (2, 2, 8, 2))  # [s, L, m, r]: std on 8x6 keeps m
  nonzero = lambda h: int(jnp.sum(jnp.any(h != 0, axis=(1, 2, 3))))
  counts = []
  for _ in range(4):
    g = {"blocks": {"wq": jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)}}
    _, state = update(g, state, params)
    counts.append(nonzero(hist(state)))
  assert counts == [1, 2, 2, 1]  # step 3 refreshes: history cleared, then this step's gradient


def test_unrolled_codebook_search_and_zero_init_match_the_plain_versions():
  rng = np.random.default_rng(9)
  for signed in (True, False):
    book = jnp.asarray(A8.dynamic_codebook(signed))
    x = jnp.concatenate([jnp.asarray(rng.uniform(-1.0 if signed else 0.0, 1.0, 5000), jnp.float32),
                         book, (book[1:] + book[:-1]) / 2])  # codes and exact midpoints
    np.testing.assert_array_equal(A8._searchsorted(book, x), jnp.searchsorted(book, x))
  tx = A8.scale_by_adam8bit(settings=A8.Adam8bitSettings(block_size=8, min_8bit_size=16))
  state = jax.jit(tx.init)({"w": jnp.ones((4, 8))})
  chex.assert_trees_all_equal(
      (state.mu["w"], state.nu["w"]),
      (A8.quantize(jnp.zeros((4, 8)), signed=True, block_size=8)[0],
       A8.quantize(jnp.zeros((4, 8)), signed=False, block_size=8)[0]))
