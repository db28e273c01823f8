"""zojax.kernels.dequant_matmul (fused INT4/INT2 dequantise + matmul) against references.

Interpret-mode Pallas on CPU; the `gpu`-marked test runs the compiled kernel where JAX's
default backend is a GPU (`JAX_PLATFORMS=cuda pytest -m gpu tests/kernels`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.infer import quant
from zojax.kernels import dequant_matmul as dm

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
SMALL = dm.BlockSizes(block_m=16, block_n=16)


def _decode_f64(qt, swap_planes=False):
  """W in float64 from the packed bytes, written from the documented layout alone."""
  packed, c = np.asarray(qt.packed).astype(np.int64), qt.codes_per_byte
  width = packed.shape[-1]
  codes = np.empty((qt.k, c * width))
  for j in range(c):
    plane = c - 1 - j if swap_planes else j
    codes[:, j * width:(j + 1) * width] = (packed >> (qt.bits * plane)) % (1 << qt.bits)
  g = np.arange(qt.k) // qt.group
  w = np.asarray(qt.zero, np.float64)[g] + np.asarray(qt.scale, np.float64)[g] * codes
  return w[:, :qt.n]


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _case(bits, m, k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  return x, quant.quantize(rng.normal(size=(k, n)).astype(np.float32), bits)


pallas = jax.jit(lambda x, qw: dm.dequant_matmul(x, qw, implementation="pallas",
                                                 block_sizes=SMALL, interpret=True))

# (bits, M, K, N): decode M = 1, 3 and 5, prefill-like M = 37 (not a tile multiple); K a
# multiple of the group or not (200 = 3·64 + 8, 40 = 32 + 8: codes padded to whole groups);
# packed widths 20 and 24 (padded to 32), 32 and 144 (tiled by 16 without padding), the
# last being SmolLM2's MoEfied down [96, 576] in INT2.
CASES = [(4, 1, 200, 40), (4, 37, 128, 64), (2, 5, 40, 96), (2, 3, 96, 576)]


@pytest.mark.parametrize("bits, m, k, n", CASES)
def test_pallas_interpret_matches_reference_and_float64(bits, m, k, n):
  x, qw = _case(bits, m, k, n)
  got = pallas(x, qw)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  ref = dm.dequant_matmul_reference(x, qw)
  assert _rel_err(got, ref) < 2e-6  # measured: <= 4e-7
  want = np.asarray(x, np.float64) @ _decode_f64(qw)
  assert _rel_err(got, want) < 2e-6
  assert _rel_err(ref, want) < 2e-6


def test_negative_controls_are_caught():
  """A wrong bit-plane order or one corrupted scale must fail the comparison above."""
  x, qw = _case(4, 5, 128, 64, seed=1)
  want = np.asarray(x, np.float64) @ _decode_f64(qw)
  assert _rel_err(np.asarray(x, np.float64) @ _decode_f64(qw, swap_planes=True), want) > 1e-2
  bad_scale = np.asarray(qw.scale).copy()
  bad_scale[1, 3] *= 1.01
  corrupted = pallas(x, quant.QuantizedTensor(qw.packed, bad_scale, qw.zero, bits=qw.bits,
                                              group=qw.group, k=qw.k, n=qw.n))
  assert _rel_err(corrupted, want) > 1e-3  # measured: 1e-2
  assert _rel_err(pallas(x, qw), want) < 2e-6


def test_bfloat16_and_leading_axes():
  x, qw = _case(4, 6, 64, 32, seed=2)
  x3 = x.astype(jnp.bfloat16).reshape(2, 3, 64)
  got = pallas(x3, qw)
  assert got.shape == (2, 3, 32) and got.dtype == jnp.bfloat16
  want = dm.dequant_matmul_reference(x3, qw)
  assert _rel_err(got, want) < 2e-2


def test_float32_weight_never_materialised():
  """The kernel's scratch stays below the float32 W; the reference's holds it (the control)."""
  k = n = 1024
  qw = quant.quantize(np.random.default_rng(3).normal(size=(k, n)).astype(np.float32), 4)
  x = jnp.ones((4, k))
  temp = {impl: jax.jit(lambda x, qw: dm.dequant_matmul(x, qw, implementation=impl,
                                                        interpret=True))
          .lower(x, qw).compile().memory_analysis().temp_size_in_bytes
          for impl in ("pallas", "xla")}
  assert temp["pallas"] < k * n * 4 // 2 <= k * n * 4 <= temp["xla"], temp


def test_dispatch_on_this_backend():
  _, qw = _case(4, 1, 64, 32)
  assert dm._resolve("auto", qw) == ("pallas" if jax.default_backend() == "gpu" else "xla")
  odd = quant.quantize(np.ones((96, 8), np.float32), 4, group=48)
  assert dm._resolve("auto", odd) == "xla"
  x = jnp.ones((2, 96))
  np.testing.assert_allclose(np.asarray(dm.dequant_matmul(x, odd)), 96.0)
  with pytest.raises(ValueError, match="qw.group=48 to be a power of two >= 16"):
    dm.dequant_matmul(x, odd, implementation="pallas")
  with pytest.raises(ValueError, match="implementation='triton' is not one of"):
    dm._resolve("triton", qw)


def test_bad_inputs_give_one_line_errors():
  x, qw = _case(4, 2, 64, 32)
  stacked = quant.quantize(np.ones((3, 64, 32), np.float32), 4)
  for args, match in (((x, stacked), r"qw.shape=\(3, 64, 32\) is stacked"),
                      ((x.astype(jnp.int32), qw), "x.dtype=int32 is not floating"),
                      ((x[:, :60], qw), r"x.shape=\(2, 60\) must end in K=64"),
                      ((x, np.ones((64, 32))), "qw must be a QuantizedTensor")):
    with pytest.raises(ValueError, match=match) as info:
      dm.dequant_matmul(*args)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("bits", [4, 2])
def test_pallas_compiled_matches_reference(bits):
  k, n = 4096, 4096
  for m, kk, nn in ((1, 576, 96), (8, 96, 576), (2048, 576, 96), (1, k, n), (512, k, n)):
    x, qw = _case(bits, m, kk, nn)
    qw = jax.device_put(qw)
    got = dm.dequant_matmul(x, qw, implementation="pallas", interpret=False)
    # float32 dots may run as TF32 on the GPU: compare relative to the output scale.
    assert _rel_err(got, dm.dequant_matmul_reference(x, qw)) < 1e-2, (m, kk, nn)
  # The fused kernel never holds the float32 W: its scratch is far below K·N·4 bytes.
  x, qw = _case(bits, 8, k, n)
  lowered = jax.jit(lambda x, qw: dm.dequant_matmul(x, qw, implementation="pallas",
                                                    interpret=False)).lower(x, qw)
  temp = lowered.compile().memory_analysis().temp_size_in_bytes
  assert temp < k * n * 4 // 8, temp
