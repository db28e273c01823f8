"""Group-wise asymmetric min-max INT4 / INT2 weights, the format Fate's experts travel in.

A weight used as ``x @ W``, W [..., K, N] (leading axes: layers, experts), is cut into
groups of ``group`` consecutive rows of the reduction axis K, column by column. Each
(group, column) keeps a float32 ``scale`` and ``zero`` (Fate: INT4 with group 64, INT2 with
group 32)::

  zero  = min(w),   scale = (max(w) - min(w)) / (2^bits - 1)
  q     = clip(round((w - zero) / scale), 0, 2^bits - 1)
  w'    = zero + scale · q,          |w - w'| <= scale / 2

``zero`` is the value code 0 decodes to (the group's minimum), not an integer zero-point:
decoding is one multiply-add and the group's min and max are represented exactly. A group
whose values are all equal gets scale 0 and decodes exactly. Grouping along K means a
kernel decodes a [group, N] tile of W with one row of scales and zeros.

Layout (``QuantizedTensor``; c = 8 / bits codes per byte, N' = N rounded up to c):
  packed       uint8   [..., K, N'/c]  byte (k, i) holds, in bits [bits·j, bits·(j+1)),
                                       the code of W[k, j·N'/c + i]: "planar" packing, so
                                       unpacking bit-plane j yields the dense column block
                                       j·N'/c ... (j+1)·N'/c, and a kernel never interleaves.
  scale, zero  float32 [..., ceil(K/group), N']
Columns beyond N (when c does not divide N) are zero columns, dropped on decoding.

K need not be a multiple of ``group`` (SmolLM2's MoEfied experts have K = 576 and 96): the
rows are zero-padded up to whole groups while quantising, but the padded rows are masked
out of the last group's min and max and are cut off before packing, so the last group is
simply short and nothing padded is stored or moved. A kernel that wants whole groups pads
the codes with zero rows and x with zero columns on the device (see
`zojax.kernels.dequant_matmul`).

``nbytes`` is what travels: K·N'·bits/8 bytes of codes + 8·ceil(K/group)·N' of scales and
zeros. Functions take numpy arrays (host-side preparation; the result stays numpy, so a
stack larger than the device never visits it) or jax arrays (pure jnp, fine under jit),
and give bit-identical results for both.

Example:
  >>> qt = quantize(w_LxExDxF, bits=4)            # QuantizedTensor, stacked like w
  >>> y_TxF = dequant_matmul(x_TxD, qt[l, e])     # zojax.kernels.dequant_matmul
  >>> w_back = dequantize(qt)                     # [L, E, D, F] float32
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zojax.errors import ConfigError

BITS = (2, 4)
DEFAULT_GROUP = {4: 64, 2: 32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A quantised weight [..., k, n]; arrays are pytree children, the rest is static.

  Attributes:
    packed: uint8 [..., k, n_pad / codes_per_byte], planar bit-planes (module docstring).
    scale, zero: float32 [..., num_groups, n_pad].
    bits: 2 or 4.
    group: rows of k per scale/zero.
    k, n: the weight's trailing (reduction, output) dims; leading dims are packed's.
  """

  packed: Any
  scale: Any
  zero: Any
  bits: int = dataclasses.field(metadata=dict(static=True))
  group: int = dataclasses.field(metadata=dict(static=True))
  k: int = dataclasses.field(metadata=dict(static=True))
  n: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """The full-precision weight's shape."""
    return (*self.packed.shape[:-2], self.k, self.n)

  @property
  def codes_per_byte(self) -> int:
    return 8 // self.bits

  @property
  def num_groups(self) -> int:
    return self.scale.shape[-2]

  def __getitem__(self, idx) -> "QuantizedTensor":
    """Indexes the leading (layer / expert) axes only, e.g. ``qt[l, e]`` or ``qt[:, ids]``."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    lead = self.packed.ndim - 2
    if len(idx) > lead or any(i is Ellipsis or i is None for i in idx):
      raise ValueError(f"QuantizedTensor[{idx}]: index only the {lead} leading axes of "
                       f"shape={self.shape}, without ... or None")
    return jax.tree.map(lambda a: a[idx], self)


def _xp(*arrays):
  """numpy when every input is a numpy array (host-side work), else jax.numpy."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _check_format(fn: str, bits, group) -> int:
  """Validates bits and group; returns the group (the default for bits when None)."""
  if bits not in BITS:
    raise ConfigError(f"{fn}: bits={bits!r} must be one of {BITS}")
  group = DEFAULT_GROUP[bits] if group is None else group
  if not isinstance(group, (int, np.integer)) or isinstance(group, bool) or group <= 0:
    raise ConfigError(f"{fn}: group={group!r} must be a positive integer")
  return int(group)


def pack(codes, bits: int):
  """Packs codes [..., R, C] (values < 2^bits, C a multiple of 8/bits) into uint8 [..., R, C·bits/8].

  Planar: byte i of a row holds code j·C' + i in bits [bits·j, bits·(j+1)), C' = C·bits/8.
  """
  _check_format("pack", bits, None)
  xp, c = _xp(codes), 8 // bits
  if codes.shape[-1] % c:
    raise ValueError(f"pack: codes.shape[-1]={codes.shape[-1]} must be a multiple of {c}")
  planes = xp.split(codes.astype(xp.uint8), c, axis=-1)
  out = planes[0]
  for j in range(1, c):
    out = out | (planes[j] << (bits * j))
  return out


def unpack(packed, bits: int):
  """Inverse of `pack`: uint8 [..., R, C'] -> uint8 codes [..., R, C'·8/bits]."""
  _check_format("unpack", bits, None)
  xp, mask = _xp(packed), (1 << bits) - 1
  return xp.concatenate([(packed >> (bits * j)) & mask for j in range(8 // bits)], axis=-1)


def quantized_nbytes(shape, bits: int, group: int | None = None) -> int:
  """Bytes of `quantize(w, bits, group)` for w of this shape, without quantising it."""
  group = _check_format("quantized_nbytes", bits, group)
  *lead, k, n = shape
  c = 8 // bits
  n_pad = -(-n // c) * c
  per_matrix = k * n_pad // c + 2 * 4 * (-(-k // group)) * n_pad
  return int(np.prod(lead, dtype=np.int64)) * per_matrix


def quantize(w, bits: int = 4, group: int | None = None) -> QuantizedTensor:
  """Group-wise asymmetric min-max quantisation of w [..., K, N] along K (module docstring).

  Args:
    w: floating [..., K, N], numpy (stays on the host) or jax.
    bits: 4 or 2.
    group: rows of K per scale/zero; default 64 for INT4, 32 for INT2.

  Returns:
    A `QuantizedTensor` with w's leading axes.
  """
  group = _check_format("quantize", bits, group)
  xp = _xp(w)
  if not isinstance(w, (np.ndarray, jax.Array)):
    w = xp.asarray(w)
  if not xp.issubdtype(w.dtype, xp.floating):
    raise ConfigError(f"quantize: w.dtype={w.dtype} must be floating")
  if w.ndim < 2 or 0 in w.shape[-2:]:
    raise ConfigError(f"quantize: w.shape={w.shape} must be [..., K, N] with K, N >= 1")
  *lead, k, n = w.shape
  c, qmax = 8 // bits, (1 << bits) - 1
  num_groups = -(-k // group)
  k_pad, n_pad = num_groups * group, -(-n // c) * c
  w = xp.pad(w.astype(xp.float32), [(0, 0)] * len(lead) + [(0, k_pad - k), (0, n_pad - n)])
  w = w.reshape(*lead, num_groups, group, n_pad)
  valid = (xp.arange(k_pad) < k).reshape(num_groups, group, 1)
  lo = xp.where(valid, w, xp.inf).min(axis=-2)
  hi = xp.where(valid, w, -xp.inf).max(axis=-2)
  # A multiply by 1/qmax rather than a division: XLA turns division by a constant into
  # that multiply, and numpy must round the same way for identical host and device results.
  scale = (hi - lo) * xp.float32(1 / qmax)
  safe = xp.where(scale > 0, scale, xp.float32(1))
  q = xp.clip(xp.round((w - lo[..., None, :]) / safe[..., None, :]), 0, qmax)
  q = q.reshape(*lead, k_pad, n_pad)[..., :k, :]
  return QuantizedTensor(pack(q, bits), scale, lo, bits=bits, group=group, k=k, n=n)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32):
  """w' = zero + scale · code for every element: [..., K, N] in `dtype`."""
  xp = _xp(qt.packed, qt.scale, qt.zero)
  codes = unpack(qt.packed, qt.bits).astype(xp.float32)
  scale = xp.repeat(qt.scale, qt.group, axis=-2)[..., :qt.k, :]
  zero = xp.repeat(qt.zero, qt.group, axis=-2)[..., :qt.k, :]
  return (zero + scale * codes)[..., :qt.n].astype(dtype)


def nbytes(qt: QuantizedTensor) -> int:
  """Exact bytes that travel for qt: packed codes + scales + zeros."""
  return int(qt.packed.nbytes + qt.scale.nbytes + qt.zero.nbytes)


def _is_quantized(x) -> bool:
  return isinstance(x, QuantizedTensor)


def quantize_tree(tree, bits: int = 4, group: int | None = None):
  """`quantize` on every array leaf, e.g. an expert's {"gate", "up", "down"} weights."""
  return jax.tree.map(lambda w: quantize(w, bits, group), tree)


def dequantize_tree(tree, dtype=jnp.float32):
  """`dequantize` on every `QuantizedTensor` leaf; other leaves pass through."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if _is_quantized(x) else x, tree,
                      is_leaf=_is_quantized)


def tree_nbytes(tree) -> int:
  """Bytes that travel for a tree of `QuantizedTensor`s and plain arrays."""
  leaves = jax.tree.leaves(tree, is_leaf=_is_quantized)
  return sum(nbytes(x) if _is_quantized(x) else int(x.nbytes) for x in leaves)


def matmul(x, w, **kernel_kwargs):
  """x @ w for a plain or quantised w [K, N]; quantised through the fused kernel."""
  if _is_quantized(w):
    # Imported here: the kernel module imports this one for the format.
    from zojax.kernels.dequant_matmul import dequant_matmul
    return dequant_matmul(x, w, **kernel_kwargs)
  return x @ w.astype(x.dtype)


def expert_swiglu(x_TxD, gate, up, down, **kernel_kwargs):
  """One expert's SwiGLU silu(x W_gate) * (x W_up) W_down, each weight plain or quantised.

  Args:
    x_TxD: the tokens routed to this expert.
    gate, up: [D, F]; down: [F, D]; arrays or `QuantizedTensor`s, freely mixed.
    **kernel_kwargs: `implementation`, `block_sizes`, `interpret` of `dequant_matmul`.

  Returns:
    [T, D] in x's dtype.
  """
  h_TxF = jax.nn.silu(matmul(x_TxD, gate, **kernel_kwargs)) * matmul(x_TxD, up,
                                                                      **kernel_kwargs)
  return matmul(h_TxF, down, **kernel_kwargs)
