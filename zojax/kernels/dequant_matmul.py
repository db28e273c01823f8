"""x @ W for an INT4 / INT2 group-quantised W, dequantised tile by tile inside a Pallas kernel.

Fate's experts travel and rest on the device quantised (`zojax.infer.quant`); decoding the
whole W to float32 in device memory before each use would cost K·N·4 bytes of traffic and
memory per expert call. The kernel instead reads the packed codes, decodes one group of
rows at a time in registers and multiplies:

  out[m, n] = Σ_g Σ_{k in group g} x[m, k] · (zero[g, n] + scale[g, n] · code[k, n])

with float32 accumulation. Grid: (row blocks of x, blocks of packed columns). A program
owns ``block_n`` packed columns, i.e. the same ``block_n`` columns of every one of the
8/bits bit-planes (the format packs planes as contiguous column blocks), and loops over
the groups of K; per group it loads x [block_m, group] and codes [group, block_n] once and
does one dot per bit-plane. The output is written as [M, planes, N'/planes], which is
[M, N'] in memory, so no interleave or transpose is needed.

Shapes: x [M, K] (or [..., K], flattened), qw a 2-D `QuantizedTensor` [K, N] (index a
stack first: ``qw[l, e]``). Any M works (decode M = 1..8 is padded to one 16-row tile,
the smallest Triton dot). K not a multiple of the group: codes are padded with zero rows
and x with zero columns up to whole groups (a device copy of the codes, only then).
Packed column counts are split into the largest power-of-two tile <= ``block_n`` that
divides them; only widths with no such tile >= 16 are padded. The kernel's group loop
needs ``group`` to be a power of two >= 16 (the Fate defaults 64 and 32 are).

Implementations: "pallas" (the kernel; `interpret=True` on CPU), "xla"
(`dequant_matmul_reference`: dequantise, then one matmul), "auto": "pallas" on GPU when
the group suits the kernel, "xla" elsewhere. GPU lowering is Pallas' Triton backend
through the generic `pallas_call` API, for the reasons in `zojax/kernels/attention.py`.
Forward only (inference): no custom_vjp.

Example:
  >>> qw = quant.quantize(w_DxF, bits=4)
  >>> y_TxF = dequant_matmul(x_TxD, qw)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zojax.infer import quant
from zojax.kernels import _common
from zojax.kernels._common import dot as _dot

IMPLEMENTATIONS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the kernel; the K step is the quantisation group itself.

  Attributes:
    block_m: rows of x per program (shrunk to the input, >= 16).
    block_n: packed columns per program (each covers 8/bits output columns).
    num_warps, num_stages: Triton launch parameters (GPU only).
  """

  block_m: int = 64
  block_n: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    _common.check_powers_of_two(self, ("block_m", "block_n"))


def _kernel(x_ref, p_ref, s_ref, z_ref, o_ref, *, bits, group):
  # x [bm, K'], codes [K', bn] uint8, scale/zero [G, planes, bn], out [bm, planes, bn].
  planes, mask = 8 // bits, (1 << bits) - 1

  def body(g, accs):
    rows = pl.ds(pl.multiple_of(g * group, group), group)
    x = x_ref[:, rows]
    packed = p_ref[rows, :]
    new = []
    for j in range(planes):
      codes = ((packed >> (bits * j)) & mask).astype(jnp.float32)
      w = z_ref[pl.ds(g, 1), j, :] + s_ref[pl.ds(g, 1), j, :] * codes
      new.append(accs[j] + _dot(x, w.astype(x.dtype)))
    return tuple(new)

  zeros = jnp.zeros((o_ref.shape[0], o_ref.shape[2]), jnp.float32)
  accs = lax.fori_loop(0, s_ref.shape[0], body, (zeros,) * planes)
  for j in range(planes):
    o_ref[:, j, :] = accs[j].astype(o_ref.dtype)


def _column_block(block_n: int, width: int) -> int:
  """The largest power of two <= block_n dividing width, if >= 16; else a padded tile."""
  b = block_n
  while b >= 16:
    if width % b == 0:
      return b
    b //= 2
  return _common.fit_block(block_n, width)


def _dequant_matmul_pallas(x, qw, block_sizes, interpret):
  (m, _), planes = x.shape, qw.codes_per_byte
  num_groups, width = qw.num_groups, qw.packed.shape[-1]
  k_pad = num_groups * qw.group
  bm = _common.fit_block(block_sizes.block_m, m)
  bn = _column_block(block_sizes.block_n, width)
  m_pad, w_pad = _common.round_up(m, bm), _common.round_up(width, bn)
  x = _common.pad_to(x, (m_pad, k_pad))
  packed = _common.pad_to(qw.packed, (k_pad, w_pad))
  # [G, N'] viewed as [G, planes, N'/planes]: bit-plane j's scales are row j.
  scale, zero = (_common.pad_to(a.reshape(num_groups, planes, width), (num_groups, planes, w_pad))
                 for a in (qw.scale, qw.zero))
  group_spec = pl.BlockSpec((num_groups, planes, bn), lambda i, j: (0, 0, j))
  out = pl.pallas_call(
      functools.partial(_kernel, bits=qw.bits, group=qw.group),
      grid=(m_pad // bm, w_pad // bn),
      in_specs=[pl.BlockSpec((bm, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((k_pad, bn), lambda i, j: (0, j)), group_spec, group_spec],
      out_specs=pl.BlockSpec((bm, planes, bn), lambda i, j: (i, 0, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, planes, w_pad), x.dtype),
      compiler_params=_common.compiler_params(interpret, block_sizes.num_warps,
                                              block_sizes.num_stages),
      interpret=interpret,
      name="zojax_dequant_matmul",
  )(x, packed, scale, zero)
  return out[:m, :, :width].reshape(m, planes * width)[:, :qw.n]


def _kernel_fits(qw) -> bool:
  return qw.group >= 16 and not qw.group & (qw.group - 1)


def _resolve(implementation: str, qw) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation == "pallas" and not _kernel_fits(qw):
    raise ValueError(f"dequant_matmul: implementation='pallas' needs qw.group={qw.group} to "
                     f"be a power of two >= 16")
  if implementation != "auto":
    return implementation
  on_gpu = jax.default_backend() in _common.GPU_BACKENDS
  return "pallas" if on_gpu and _kernel_fits(qw) else "xla"


def _check(x, qw) -> None:
  if not isinstance(qw, quant.QuantizedTensor):
    raise ValueError(f"dequant_matmul: qw must be a QuantizedTensor, got {type(qw).__name__}")
  if qw.packed.ndim != 2:
    raise ValueError(f"dequant_matmul: qw.shape={qw.shape} is stacked; pass one matrix "
                     f"[K, N] (index it first, e.g. qw[l, e])")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"dequant_matmul: x.dtype={x.dtype} is not floating")
  if x.ndim < 1 or x.shape[-1] != qw.k:
    raise ValueError(f"dequant_matmul: x.shape={x.shape} must end in K={qw.k} "
                     f"(qw.shape={qw.shape})")


@functools.partial(jax.jit, static_argnames=("implementation", "block_sizes", "interpret"))
def dequant_matmul(x, qw, *, implementation: str = "auto",
                   block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """x @ dequantize(qw) without materialising the dequantised W (module docstring).

  Args:
    x: floating [..., K].
    qw: `zojax.infer.quant.QuantizedTensor` [K, N].
    implementation: "auto", "pallas" or "xla".
    block_sizes: Pallas tiles.
    interpret: Pallas interpreter flag (default: on CPU only).

  Returns:
    [..., N] in x's dtype (float32 accumulation; W is decoded in float32, then cast to
    x's dtype for the dot).
  """
  _check(x, qw)
  impl = _resolve(implementation, qw)
  if impl == "xla":
    return dequant_matmul_reference(x, qw)
  interpret = _common.default_interpret() if interpret is None else interpret
  out = _dequant_matmul_pallas(x.reshape(-1, qw.k), qw, block_sizes or BlockSizes(),
                               interpret)
  return out.reshape(*x.shape[:-1], qw.n)


def dequant_matmul_reference(x, qw):
  """`dequant_matmul` in plain jnp: dequantise W, then one matmul (float32 accumulation)."""
  w = quant.dequantize(qw, jnp.float32).astype(x.dtype)
  return jnp.matmul(x, w, precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32).astype(x.dtype)
