"""zojax.kernels.attention against its naive reference: values and gradients.

The Pallas kernels run twice: with `interpret=True` everywhere (CPU CI), and compiled in
the tests marked `gpu`, which run only where JAX's default backend is a GPU. conftest.py
forces CPU unless JAX_PLATFORMS is set, so on a GPU machine run
`JAX_PLATFORMS=cuda pytest -m gpu tests/kernels`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.kernels import attention as attn

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# Small tiles so these shapes span several blocks (interpret mode costs ~0.5 ms per step).
SMALL = attn.BlockSizes(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32,
                        blockwise_block_k=16)

# (causal, T, S, H, K, D, dtype): odd lengths, GQA, MQA, both head dims, bf16.
CASES = [
    pytest.param(True, 37, 37, 4, 2, 64, jnp.float32, id="causal-gqa-odd"),
    pytest.param(False, 50, 70, 2, 1, 64, jnp.float32, id="mqa-odd-cross"),
    # iDisc's ISD: many pixels (queries) attend a few IDRs (keys), fewer than one key block.
    pytest.param(False, 200, 8, 1, 1, 64, jnp.float32, id="queries-much-longer-than-keys"),
    pytest.param(True, 64, 64, 2, 2, 128, jnp.bfloat16, id="causal-mha-bf16-d128-aligned"),
]


def _inputs(T, S, H, K, D, dtype, B=1):
  kq, kk, kv, ko = jax.random.split(jax.random.key(T * 1000 + S + H + D), 4)
  q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
  do = jax.random.normal(ko, (B, T, H, D), jnp.float32).astype(dtype)
  return q, k, v, do


def _value_and_grads(fn, q, k, v, do):
  """Output and (dq, dk, dv) of <fn(q, k, v), do>, all in float32."""
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v).astype(jnp.float32), q, k, v)
  return [x.astype(jnp.float32) for x in (out, *vjp(do.astype(jnp.float32)))]


def _check_against_reference(fns, causal, q, k, v, do, tol=None):
  """Every fn in `fns` against the float32 reference; one compiled program for all."""
  ref = functools.partial(attn.attention_reference, causal=causal)

  @jax.jit
  def run(q, k, v, do):
    # The reference in float32: the kernels accumulate in float32 too.
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    return ([_value_and_grads(fn, q, k, v, do) for fn in fns],
            _value_and_grads(ref, *f32), [fn(q, k, v).dtype == q.dtype for fn in fns])

  got, want, dtypes_kept = run(q, k, v, do)
  if tol is None:
    tol = 2e-5 if q.dtype == jnp.float32 else 6e-2
  for i, g in enumerate(got):
    for name, a, b in zip(("out", "dq", "dk", "dv"), g, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol,
                                 err_msg=f"fn {i}: {name}")
  assert all(dtypes_kept)


@pytest.mark.parametrize("causal, T, S, H, K, D, dtype", CASES)
def test_pallas_interpret_and_blockwise_match_reference(causal, T, S, H, K, D, dtype):
  q, k, v, do = _inputs(T, S, H, K, D, dtype)
  pallas = functools.partial(attn.flash_attention, causal=causal, block_sizes=SMALL,
                             interpret=True)
  blockwise = functools.partial(attn.blockwise_attention, causal=causal, block_k=16)
  _check_against_reference([pallas, blockwise], causal, q, k, v, do)


def test_blockwise_any_head_dim_and_custom_scale():
  q, k, v, do = _inputs(9, 9, 4, 4, 16, jnp.float32, B=2)
  fn = functools.partial(attn.blockwise_attention, causal=False, sm_scale=0.3, block_k=4)
  ref = functools.partial(attn.attention_reference, causal=False, sm_scale=0.3)
  got, want = jax.jit(lambda *a: (_value_and_grads(fn, *a), _value_and_grads(ref, *a)))(
      q, k, v, do)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_causal_masks_the_future():
  """Changing key/value t must leave outputs before t untouched (and change later ones)."""
  q, k, v, _ = _inputs(40, 40, 2, 2, 64, jnp.float32)
  k2, v2 = np.array(k), np.array(v)
  k2[:, 30] += 1.0
  v2[:, 30] += 1.0
  for fn in (functools.partial(attn.flash_attention, block_sizes=SMALL, interpret=True),
             functools.partial(attn.blockwise_attention, block_k=16)):
    both = jax.jit(jax.vmap(lambda k, v: fn(q, k, v, causal=True)))
    a, b = np.asarray(both(jnp.stack([k, k2]), jnp.stack([v, v2])))
    np.testing.assert_array_equal(a[:, :30], b[:, :30])
    assert np.max(np.abs(a[:, 30:] - b[:, 30:])) > 1e-3


def test_reference_matches_per_head_numpy():
  """The reference itself, against float64 numpy with explicit per-head loops (GQA, causal)."""
  q, k, v, _ = _inputs(11, 11, 4, 2, 16, jnp.float32, B=2)
  got = jax.jit(functools.partial(attn.attention, causal=True, implementation="xla"))(q, k, v)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  G = H // k.shape[2]
  want = np.zeros_like(q)
  for b in range(B):
    for h in range(H):
      s = q[b, :, h] @ k[b, :, h // G].T / np.sqrt(D)
      s[np.triu_indices(T, 1)] = -np.inf
      p = np.exp(s - s.max(-1, keepdims=True))
      want[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // G]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_dispatch():
  assert attn.default_implementation("cpu") == "blockwise"
  assert attn.default_implementation("gpu") == "pallas"
  assert attn.default_implementation("tpu") == "blockwise"
  # Off the GPU the key count decides: plain XLA below BLOCKWISE_FROM keys, blockwise from it.
  assert attn.default_implementation("cpu", kv_len=attn.BLOCKWISE_FROM - 1) == "xla"
  assert attn.default_implementation("cpu", kv_len=attn.BLOCKWISE_FROM) == "blockwise"
  q, k, v, _ = _inputs(20, 20, 2, 1, 64, jnp.float32, B=1)
  auto = attn.attention(q, k, v, causal=True, implementation="auto")
  blockwise = attn.blockwise_attention(q, k, v, causal=True)
  if jax.default_backend() == "cpu":
    xla = attn.attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
  for impl in ("xla", "pallas"):
    out = attn.attention(q, k, v, causal=True, implementation=impl, block_sizes=SMALL)
    np.testing.assert_allclose(np.asarray(out), np.asarray(blockwise), rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="implementation='flash' is not one of"):
    attn.attention(q, k, v, implementation="flash")


def _one_line_error(fn, *args, **kwargs):
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("impl", ["pallas", "blockwise", "xla"])
def test_bad_inputs_give_one_line_errors_naming_shapes(impl):
  call = functools.partial(attn.attention, implementation=impl)
  q = jnp.zeros((1, 8, 6, 64))
  k4 = jnp.zeros((1, 8, 4, 64))
  msg = _one_line_error(call, q, k4, k4)
  assert "num_heads=6 must be a multiple of num_kv_heads=4" in msg
  assert "q.shape=(1, 8, 6, 64)" in msg and "k.shape=(1, 8, 4, 64)" in msg
  k2 = jnp.zeros((1, 8, 2, 64))
  msg = _one_line_error(call, q, k2.astype(jnp.bfloat16), k2.astype(jnp.bfloat16))
  assert "q.dtype=float32, k.dtype=bfloat16" in msg and "q.shape=(1, 8, 6, 64)" in msg
  msg = _one_line_error(call, q, jnp.zeros((1, 9, 2, 64)), jnp.zeros((1, 9, 2, 64)),
                        causal=True)
  assert "T=8, S=9" in msg
  msg = _one_line_error(call, q, k2, jnp.zeros((1, 8, 2, 32)))
  assert "v.shape=(1, 8, 2, 32)" in msg


def test_pallas_refuses_unsupported_head_dim():
  q = jnp.zeros((1, 8, 2, 96))
  msg = _one_line_error(attn.flash_attention, q, q, q)
  assert "head_dim=96" in msg and "q.shape=(1, 8, 2, 96)" in msg and "(64, 128)" in msg
  # "auto" never picks a kernel that would refuse the shape.
  assert attn.attention(q, q, q).shape == q.shape


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="block_q=48 must be a positive power of two"):
    attn.BlockSizes(block_q=48)


# ---------------------------------------------------------------------------------------
# Compiled on a GPU (skipped elsewhere): the same checks without the interpreter.


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("causal, T, S, H, K, D, dtype", CASES)
def test_pallas_compiled_matches_reference(causal, T, S, H, K, D, dtype):
  q, k, v, do = _inputs(T, S, H, K, D, dtype, B=2)
  fn = functools.partial(attn.flash_attention, causal=causal, interpret=False)
  # float32 dots may run as TF32 on the GPU.
  _check_against_reference([fn], causal, q, k, v, do, tol=2e-2 if dtype == jnp.float32 else None)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("D", [64, 128])
def test_pallas_compiled_long_bf16_causal(D):
  q, k, v, do = _inputs(1000, 1000, 8, 2, D, jnp.bfloat16)
  fn = functools.partial(attn.flash_attention, causal=True, interpret=False)
  _check_against_reference([fn], True, q, k, v, do)
