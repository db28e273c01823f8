"""zojax.infer.quant: the INT4 / INT2 group format, against hand-computed values and bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer import quant
from zojax.models import llama


def _rng(seed=0):
  return np.random.default_rng(seed)


def _scale_per_element(qt):
  """Each element's group scale, [..., K, N]."""
  return np.repeat(np.asarray(qt.scale), qt.group, axis=-2)[..., :qt.k, :qt.n]


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_exact_on_random_codes(bits):
  codes = _rng().integers(0, 1 << bits, size=(3, 5, 16), dtype=np.uint8)
  packed = quant.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.shape == (3, 5, 16 * bits // 8)
  np.testing.assert_array_equal(quant.unpack(packed, bits), codes)
  np.testing.assert_array_equal(np.asarray(quant.pack(jnp.asarray(codes), bits)), packed)
  np.testing.assert_array_equal(np.asarray(quant.unpack(jnp.asarray(packed), bits)), codes)


def test_planar_bit_order_pinned():
  # Byte i holds code i in its low bits and code i + C/c above it (C columns, c per byte).
  assert quant.pack(np.array([[1, 2, 3, 4]]), 4).tolist() == [[0x31, 0x42]]
  assert quant.pack(np.array([[1, 2, 3, 0]]), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_hand_computed_one_group():
  # Column 0: min -3, max 12, scale 15/15 = 1, zero -3, codes (w+3) rounded: 4.25 -> 7.
  # Column 1: min 0, max 15, scale 1, codes = w. Column 2 is constant: scale 0, exact.
  w = np.array([[-3.0, 0.0, 0.5], [0.0, 1.0, 0.5], [4.25, 2.0, 0.5], [12.0, 15.0, 0.5]],
               np.float32)
  qt = quant.quantize(w, bits=4, group=4)
  assert (qt.k, qt.n, qt.group, qt.bits, qt.shape) == (4, 3, 4, 4, (4, 3))
  np.testing.assert_array_equal(qt.scale, [[1.0, 1.0, 0.0, 0.0]])  # 4th: padding column
  np.testing.assert_array_equal(qt.zero, [[-3.0, 0.0, 0.5, 0.0]])
  # Codes (col0, col1, col2, pad) = (0,0,0,0), (3,1,0,0), (7,2,0,0), (15,15,0,0); planar:
  # byte 0 = col0 | col2 << 4, byte 1 = col1 | pad << 4.
  np.testing.assert_array_equal(qt.packed, [[0, 0], [3, 1], [7, 2], [15, 15]])
  np.testing.assert_array_equal(quant.dequantize(qt),
                                [[-3, 0, 0.5], [0, 1, 0.5], [4, 2, 0.5], [12, 15, 0.5]])


@pytest.fixture(scope="module")
def stack():
  """A stacked [2, 3, K, N] weight with K = 100 (a multiple of neither group)."""
  return _rng(1).normal(size=(2, 3, 100, 24)).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 2])
def test_round_trip_within_half_a_scale(stack, bits):
  qt = quant.quantize(stack, bits)
  assert qt.group == {4: 64, 2: 32}[bits] and qt.shape == stack.shape
  assert qt.scale.shape == (2, 3, -(-100 // qt.group), 24)
  err = np.abs(quant.dequantize(qt) - stack)
  ratio = err / _scale_per_element(qt)
  assert ratio.max() <= 0.5 + 1e-5
  assert ratio.max() > 0.45  # the bound is reached, so the check has teeth


def test_host_and_jit_agree_bit_for_bit(stack):
  quantize = jax.jit(quant.quantize, static_argnums=(1,))
  for bits in (4, 2):
    host = quant.quantize(stack, bits)
    assert isinstance(host.packed, np.ndarray)
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(quantize(jnp.asarray(stack), bits))):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_int2_error_larger_than_int4(stack):
  err = {b: np.abs(quant.dequantize(quant.quantize(stack, b)) - stack).mean() for b in (4, 2)}
  assert err[2] > 2 * err[4], err


def test_short_last_group_uses_only_real_rows():
  # All weights in [1, 2]: a zero-padded row counted in the last group's range would pull
  # its zero (the minimum) to 0.
  w = _rng(2).uniform(1.0, 2.0, size=(96, 8)).astype(np.float32)
  qt = quant.quantize(w, 4)                      # group 64: rows 64..95 form a short group
  assert qt.packed.shape == (96, 4) and qt.scale.shape == (2, 8)
  head, tail = quant.quantize(w[:64], 4), quant.quantize(w[64:], 4)
  np.testing.assert_array_equal(qt.zero, np.concatenate([head.zero, tail.zero]))
  np.testing.assert_array_equal(qt.scale, np.concatenate([head.scale, tail.scale]))
  np.testing.assert_array_equal(qt.packed, np.concatenate([head.packed, tail.packed]))
  np.testing.assert_array_equal(qt.zero[1], w[64:].min(axis=0))
  back = quant.dequantize(qt)
  assert back.shape == w.shape
  assert (np.abs(back - w) <= _scale_per_element(qt) / 2 + 1e-7).all()


def test_odd_column_count_is_padded_and_dropped():
  w = _rng(3).normal(size=(32, 7)).astype(np.float32)
  qt = quant.quantize(w, 2)                      # 4 codes a byte: 7 columns -> 8
  assert qt.packed.shape == (32, 2) and qt.scale.shape == (1, 8) and qt.shape == (32, 7)
  np.testing.assert_array_equal(qt.scale[:, 7], 0)
  assert quant.dequantize(qt).shape == (32, 7)


@pytest.mark.parametrize("bits, gate_bytes, down_bytes", [(4, 34560, 36864), (2, 27648, 27648)])
def test_nbytes_is_arrays_and_formula(bits, gate_bytes, down_bytes):
  # SmolLM2-135M MoEfied experts: gate/up [576, 96], down [96, 576].
  gate = quant.quantize(np.zeros((2, 3, 576, 96), np.float32), bits)
  down = quant.quantize(np.zeros((2, 3, 96, 576), np.float32), bits)
  for qt, one, (k, n) in ((gate, gate_bytes, (576, 96)), (down, down_bytes, (96, 576))):
    arrays = qt.packed.nbytes + qt.scale.nbytes + qt.zero.nbytes
    formula = 6 * (k * n * bits // 8 + -(-k // qt.group) * n * 2 * 4)
    assert quant.nbytes(qt) == arrays == formula == 6 * one
    assert quant.quantized_nbytes((2, 3, k, n), bits) == formula
    assert quant.nbytes(qt[1, 2]) == one
  tree = {"gate": gate, "up": gate, "down": down}
  assert quant.tree_nbytes(tree) == 6 * (2 * gate_bytes + down_bytes)


def test_tree_helpers_pytree_and_indexing(stack):
  weights = {"gate": stack, "up": stack * 2, "down": np.swapaxes(stack, -1, -2).copy()}
  qtree = quant.quantize_tree(weights, bits=4)
  assert all(isinstance(q, quant.QuantizedTensor) for q in qtree.values())
  on_device = jax.device_put(qtree)
  back = jax.jit(quant.dequantize_tree)(on_device)
  for name, w in weights.items():
    # Under jit XLA fuses zero + scale·code into one FMA: an ulp from numpy's two roundings.
    np.testing.assert_allclose(np.asarray(back[name]), quant.dequantize(qtree[name]),
                               rtol=1e-6, atol=1e-6)
    # Indexing a stack equals quantising the one matrix (groups never cross experts).
    one = quant.quantize(w[1, 2], 4)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(on_device[name][1, 2])):
      np.testing.assert_array_equal(a, np.asarray(b))
  # Stacking per-expert QuantizedTensors gives the stacked one.
  experts = [quant.quantize(stack[0, e], 2) for e in range(3)]
  stacked = jax.tree.map(lambda *a: np.stack(a), *experts)
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(quant.quantize(stack[0], 2))):
    np.testing.assert_array_equal(a, b)
  assert quant.tree_nbytes(qtree) == sum(quant.nbytes(q) for q in qtree.values())
  assert quant.tree_nbytes(weights) == sum(w.nbytes for w in weights.values())


def test_expert_swiglu_plain_and_quantised():
  rng = _rng(4)
  x = jnp.asarray(rng.normal(size=(5, 64)), jnp.float32)
  w = {"gate": rng.normal(size=(64, 32)) / 8, "up": rng.normal(size=(64, 32)) / 8,
       "down": rng.normal(size=(32, 64)) / 6}
  w = {k: v.astype(np.float32) for k, v in w.items()}
  swiglu = jax.jit(lambda x, w: quant.expert_swiglu(x, w["gate"], w["up"], w["down"],
                                                    implementation="xla"))
  plain = swiglu(x, w)
  np.testing.assert_array_equal(np.asarray(plain),
                                np.asarray(llama.swiglu(x, w["gate"], w["up"], w["down"])))
  q = quant.quantize_tree(w, bits=4)
  got = swiglu(x, q)
  d = quant.dequantize_tree(q)
  want = llama.swiglu(x, d["gate"], d["up"], d["down"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Quantisation changes the output, by less than the output's own size.
  rel = float(jnp.linalg.norm(got - plain) / jnp.linalg.norm(plain))
  assert 1e-4 < rel < 0.2, rel


def _one_line(fn, *args, match, **kwargs):
  with pytest.raises(ConfigError, match=match) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)


def test_bad_input_one_line_errors_naming_the_argument():
  w = np.ones((64, 8), np.float32)
  _one_line(quant.quantize, w, 3, match=r"bits=3 must be one of \(2, 4\)")
  _one_line(quant.quantize, w, 4, 0, match="group=0 must be a positive integer")
  _one_line(quant.quantize, w, 4, -32, match="group=-32 must be a positive integer")
  _one_line(quant.quantize, w, 4, 2.5, match="group=2.5 must be a positive integer")
  _one_line(quant.quantize, w.astype(np.int32), match="w.dtype=int32 must be floating")
  _one_line(quant.quantize, jnp.ones(8), match=r"w.shape=\(8,\) must be \[..., K, N\]")
  with pytest.raises(ValueError, match="index only the 0 leading axes"):
    quant.quantize(w)[0]
