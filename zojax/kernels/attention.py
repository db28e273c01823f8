"""Softmax attention, forward and backward: a Pallas flash kernel, a blockwise pure-JAX path, a reference.

  out = softmax(sm_scale · q kᵀ + mask) v,   sm_scale = 1/sqrt(head_dim) by default,

with q [B, T, H, D] and k, v [B, S, K, D]: H query heads share K = H/G key/value heads
(GQA, MQA when K = 1; query head h reads kv head h // G). `causal=True` masks key s > query
t and needs T == S. The backward is FlashAttention-2's (Dao, 2023, Algorithm 2): it keeps
the log-sum-exp of each query row from the forward and recomputes the probabilities block
by block, so neither direction ever holds a [T, S] matrix.

Implementations (`implementation=`):
  * "pallas": `flash_attention`, a Pallas kernel (grid over batch, head and query block;
    a loop over key blocks with online softmax), with two backward kernels (dq over query
    blocks; dk/dv over key blocks). On CPU it runs with `interpret=True`.
  * "blockwise": `blockwise_attention`, pure JAX: a `lax.scan` over key blocks with
    online softmax and a scan-based backward. O(N) memory, runs anywhere; the CPU default.
  * "xla": `attention_reference`, the naive einsum-softmax-einsum. Materializes [T, S].
  * "auto": `default_implementation()`: "pallas" on GPU; elsewhere "xla" up to
    `BLOCKWISE_FROM` keys, "blockwise" from there (measured, see there).

GPU lowering. The Pallas kernel is written with the generic `pallas_call`/`BlockSpec`
API and passes Triton `CompilerParams`, so on GPU it lowers through Pallas' Triton
backend (Hopper included: Triton targets sm_90) on both JAX 0.10 and 0.11. Why Triton
rather than Mosaic GPU, which upstream now documents as the GPU path:
  1. it is the only lowering whose kernel source also runs in `interpret=True` on CPU,
     so CI checks the exact kernel that the GPU compiles, forward and gradients; Mosaic GPU
     kernels assert a CUDA version and cannot be interpreted here;
  2. upstream's Mosaic GPU attention (`pallas/ops/gpu/attention_mgpu.py`) has no causal
     backward, which LLaMA training needs;
  3. a hand-written warp-specialized Mosaic kernel could not be tested in this session
     (no GPU was lent), and an untested fast path is worse than a tested portable one.
The Triton backend is deprecated upstream; when it goes, the same kernel body should move
to `plgpu.kernel` with TMA/wgmma. The compiled-GPU tests in tests/kernels/ run wherever a
GPU is present. Block sizes are untuned defaults.

Sequence lengths that are not multiples of the block size are padded inside the wrappers
and masked (padded keys never receive probability; padded query rows are dropped). All
implementations accumulate in float32 and return q's dtype.

Example:
  >>> out = attention(q, k, v, causal=True)                         # auto
  >>> out = attention(q, k, v, causal=True, implementation="pallas")
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from zojax.kernels import _common
from zojax.kernels._common import SQ as _SQ
from zojax.kernels._common import dot as _dot

IMPLEMENTATIONS = ("auto", "pallas", "blockwise", "xla")
PALLAS_HEAD_DIMS = (64, 128)
# Finite, so masked scores never make inf - inf = nan.
DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernels (and the key block of the blockwise path).

  Attributes:
    block_q: query rows per program in the forward and dq kernels.
    block_k: keys per inner-loop step in the forward and dq kernels.
    block_q_dkv: query rows per inner-loop step in the dk/dv kernel.
    block_k_dkv: keys per program in the dk/dv kernel.
    num_warps, num_stages: Triton launch parameters (GPU only).
    blockwise_block_k: keys per scan step of the "blockwise" implementation.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  blockwise_block_k: int = 512

  def __post_init__(self):
    _common.check_powers_of_two(self, ("block_q", "block_k", "block_q_dkv", "block_k_dkv"))
    if self.blockwise_block_k < 1:
      raise ValueError(f"BlockSizes.blockwise_block_k={self.blockwise_block_k} must be positive")


# Where "auto" leaves the naive path off a GPU (experiments/attention_auto.py on a 2-core CPU,
# causal fp32, 9 query / 3 kv heads of 64, results/attention_auto.json): at 64-256 keys the
# naive path is as fast forward + backward (blockwise 1.15-1.6x its time, forward 0.7-1.3x,
# noisy) and holds no more; from 1024 keys the scan is faster (0.81x at 1024, 0.44x at 4096)
# and holds less (230 vs 337 MB at 1024, 460 MB vs 2.5 GB at 4096).
BLOCKWISE_FROM = 1024


def default_implementation(backend: str | None = None, kv_len: int | None = None) -> str:
  """The implementation "auto" resolves to on `backend` (default: JAX's default backend).

  Only the GPU gets the Pallas kernel: it has not been lowered for TPU's Mosaic yet.
  Elsewhere `kv_len` (keys per query) decides: "xla" below `BLOCKWISE_FROM`, else (or when
  unknown) "blockwise".
  """
  backend = backend or jax.default_backend()
  if backend in _common.GPU_BACKENDS:
    return "pallas"
  return "xla" if kv_len is not None and kv_len < BLOCKWISE_FROM else "blockwise"


def _check_inputs(q, k, v, causal, implementation):
  """One-line ValueErrors that name the offending shapes and dtypes."""
  shapes = f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects q [B, T, H, D], k and v [B, S, K, D]; got {shapes}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
        f"attention: q, k, v must share one dtype, got q.dtype={q.dtype}, k.dtype={k.dtype}, "
        f"v.dtype={v.dtype} ({shapes})")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"attention: dtype {q.dtype} is not a floating type ({shapes})")
  B, T, H, D = q.shape
  if k.shape != v.shape:
    raise ValueError(f"attention: k and v shapes differ ({shapes})")
  if k.shape[0] != B or k.shape[3] != D:
    raise ValueError(f"attention: batch and head_dim of k, v must match q's ({shapes})")
  K = k.shape[2]
  if H % K:
    raise ValueError(
        f"attention: num_heads={H} must be a multiple of num_kv_heads={K} ({shapes})")
  if causal and T != k.shape[1]:
    raise ValueError(
        f"attention: causal=True needs equal query and key lengths, got T={T}, "
        f"S={k.shape[1]} ({shapes})")
  if implementation == "pallas" and D not in PALLAS_HEAD_DIMS:
    raise ValueError(
        f"attention: implementation='pallas' supports head_dim in {PALLAS_HEAD_DIMS}, "
        f"got head_dim={D} ({shapes}); use 'blockwise' or 'xla'")


# ---------------------------------------------------------------------------------------
# Reference


def attention_reference(q, k, v, *, causal: bool = False, sm_scale: float | None = None):
  """Naive attention: materializes the [B, K, G, T, S] scores. The "xla" implementation.

  With `causal=True` and the default scale this is the same computation, op for op, as
  the LLaMA model's original `causal_attention`.
  """
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  q_BxTxKxGxD = q.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(D) if sm_scale is None else scores * sm_scale
  if causal:
    scores = jnp.where(jnp.tril(jnp.ones((T, S), dtype=bool)), scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(B, T, H, D)


# ---------------------------------------------------------------------------------------
# Blockwise: pure JAX, a scan over key blocks with online softmax


def _pad_seq(x, length):
  """Zero-pads axis 1 (the sequence) of a [B, T, H, D] array to `length`."""
  return _common.pad_to(x, (x.shape[0], length, *x.shape[2:]))


class _KeyBlocks:
  """Key blocks of one attention call: padded k, v and each block's masked scores."""

  def __init__(self, q, k, v, causal, sm_scale, block_k):
    B, T, H, D = q.shape
    self.S, self.K = k.shape[1], k.shape[2]
    self.shape = (B, T, self.K, H // self.K, D)  # queries grouped by kv head
    self.block_k = min(block_k, self.S)
    self.num_blocks = -(-self.S // self.block_k)
    self.k = _pad_seq(k, self.num_blocks * self.block_k)
    self.v = _pad_seq(v, self.num_blocks * self.block_k)
    self.q_BxTxKxGxD = q.reshape(self.shape)
    self.causal, self.sm_scale = causal, sm_scale

  def scores(self, j):
    """(s [B, K, G, T, block] f32, mask [T, block], k block, v block) of key block j."""
    k_blk = lax.dynamic_slice_in_dim(self.k, j * self.block_k, self.block_k, axis=1)
    v_blk = lax.dynamic_slice_in_dim(self.v, j * self.block_k, self.block_k, axis=1)
    s = jnp.einsum("btkgd,bskd->bkgts", self.q_BxTxKxGxD, k_blk,
                   preferred_element_type=jnp.float32) * self.sm_scale
    k_pos = j * self.block_k + jnp.arange(self.block_k)
    mask = (k_pos < self.S)[None, :]  # padding keys
    if self.causal:
      mask = mask & (jnp.arange(self.shape[1])[:, None] >= k_pos[None, :])
    return s, mask, k_blk, v_blk

  def unblock(self, x_NxBxSbxKxD):
    """Scan outputs stacked over key blocks -> [B, S, K, D]."""
    B, D = self.shape[0], self.shape[-1]
    x = jnp.moveaxis(x_NxBxSbxKxD, 0, 1)
    return x.reshape(B, self.num_blocks * self.block_k, self.K, D)[:, :self.S]


def _blockwise_forward(q, k, v, causal, sm_scale, block_k):
  """Returns out [B, T, H, D] (q.dtype) and lse [B, K, G, T] (float32)."""
  blocks = _KeyBlocks(q, k, v, causal, sm_scale, block_k)
  B, T, K, G, D = blocks.shape

  def step(carry, j):
    acc_BxKxGxTxD, m_BxKxGxT, l_BxKxGxT = carry
    s, mask, _, v_blk = blocks.scores(j)
    s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
    m_new = jnp.maximum(m_BxKxGxT, jnp.max(s, axis=-1))
    correction = jnp.exp(m_BxKxGxT - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    l_new = correction * l_BxKxGxT + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v_blk,
                    preferred_element_type=jnp.float32)
    return (correction[..., None] * acc_BxKxGxTxD + pv, m_new, l_new), None

  init = (jnp.zeros((B, K, G, T, D), jnp.float32),
          jnp.full((B, K, G, T), -jnp.inf, jnp.float32),
          jnp.zeros((B, K, G, T), jnp.float32))
  (acc, m, l), _ = lax.scan(step, init, jnp.arange(blocks.num_blocks))
  out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).reshape(q.shape)
  return out.astype(q.dtype), m + jnp.log(l)


def _blockwise_backward(q, k, v, out, lse_BxKxGxT, do, causal, sm_scale, block_k):
  """dq, dk, dv by recomputing each key block's probabilities from the saved lse."""
  blocks = _KeyBlocks(q, k, v, causal, sm_scale, block_k)
  do_BxTxKxGxD = do.reshape(blocks.shape)
  # delta_t = sum_d do_td o_td = sum_s p_ts dp_ts (the softmax Jacobian's diagonal term).
  delta = jnp.einsum("btkgd,btkgd->bkgt", do_BxTxKxGxD.astype(jnp.float32),
                     out.reshape(blocks.shape).astype(jnp.float32))

  def step(dq_acc, j):
    s, mask, k_blk, v_blk = blocks.scores(j)
    p = jnp.where(mask, jnp.exp(s - lse_BxKxGxT[..., None]), 0.0)
    dv_blk = jnp.einsum("bkgts,btkgd->bskd", p.astype(do.dtype), do_BxTxKxGxD,
                        preferred_element_type=jnp.float32)
    dp = jnp.einsum("btkgd,bskd->bkgts", do_BxTxKxGxD, v_blk,
                    preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None])).astype(q.dtype)
    dq_acc = dq_acc + jnp.einsum("bkgts,bskd->btkgd", ds, k_blk,
                                 preferred_element_type=jnp.float32)
    dk_blk = jnp.einsum("bkgts,btkgd->bskd", ds, blocks.q_BxTxKxGxD,
                        preferred_element_type=jnp.float32)
    return dq_acc, (dk_blk, dv_blk)

  dq, (dk_blocks, dv_blocks) = lax.scan(
      step, jnp.zeros(blocks.shape, jnp.float32), jnp.arange(blocks.num_blocks))
  dq = (dq * sm_scale).reshape(q.shape).astype(q.dtype)
  dk = (blocks.unblock(dk_blocks) * sm_scale).astype(k.dtype)
  return dq, dk, blocks.unblock(dv_blocks).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blockwise(q, k, v, causal, sm_scale, block_k):
  return _blockwise_forward(q, k, v, causal, sm_scale, block_k)[0]


def _blockwise_fwd(q, k, v, causal, sm_scale, block_k):
  out, lse = _blockwise_forward(q, k, v, causal, sm_scale, block_k)
  return out, (q, k, v, out, lse)


def _blockwise_bwd(causal, sm_scale, block_k, residuals, do):
  return _blockwise_backward(*residuals, do, causal, sm_scale, block_k)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_k"))
def blockwise_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
                        block_k: int = 512):
  """Attention as a scan over key blocks: O(T·block_k) memory in the forward and backward.

  The "blockwise" implementation; see the module docstring for shapes.
  """
  _check_inputs(q, k, v, causal, "blockwise")
  if block_k < 1:
    raise ValueError(f"blockwise_attention: {block_k=} must be positive")
  sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  return _blockwise(q, k, v, causal, sm_scale, block_k)


# ---------------------------------------------------------------------------------------
# Pallas: kernel bodies
#
# The wrappers lay q, k, v out as [B, T, H, D] and pass blocks with batch and head squeezed,
# so every ref below is 2-D ([rows, D]) or 1-D ([rows]); lse and delta are [B, H, T].

def _causal_or_pad_mask(q_start, k_start, shape, kv_len, causal, mask_kv):
  """[rows, cols] validity of scores (None when every score is valid)."""
  mask = None
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  if mask_kv:
    mask = k_pos < kv_len
  if causal:
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    c = q_pos >= k_pos
    mask = c if mask is None else mask & c
  return mask


def _flash_forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, causal,
                          block_k, kv_len, mask_kv):
  block_q = q_ref.shape[0]
  num_k_blocks = k_ref.shape[0] // block_k
  q_start = pl.program_id(2) * block_q
  q = q_ref[...]

  def body(j, carry):
    acc, m_prev, l_prev = carry
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    s = _dot(q, k, trans_b=True) * sm_scale
    mask = _causal_or_pad_mask(q_start, k_start, s.shape, kv_len, causal, mask_kv)
    if mask is not None:
      s = jnp.where(mask, s, DEFAULT_MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(k_start, block_k), :]
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  if causal:  # key blocks past this query block's last row are all masked
    upper = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), num_k_blocks)
  else:
    upper = num_k_blocks
  init = (jnp.zeros((block_q, q.shape[1]), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, upper, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _flash_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, sm_scale,
                     causal, block_k, kv_len, mask_kv):
  block_q = q_ref.shape[0]
  num_k_blocks = k_ref.shape[0] // block_k
  q_start = pl.program_id(2) * block_q
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(j, dq):
    k_start = j * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    s = _dot(q, k, trans_b=True) * sm_scale
    p = jnp.exp(s - lse[:, None])
    mask = _causal_or_pad_mask(q_start, k_start, s.shape, kv_len, causal, mask_kv)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  if causal:
    upper = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), num_k_blocks)
  else:
    upper = num_k_blocks
  dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _flash_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                      sm_scale, causal, block_q, kv_len, mask_kv):
  block_k = k_ref.shape[0]
  num_q_blocks = q_ref.shape[0] // block_q
  k_start = pl.program_id(2) * block_k
  k, v = k_ref[...], v_ref[...]

  def body(i, carry):
    dk, dv = carry
    q_start = i * block_q
    q = q_ref[pl.ds(q_start, block_q), :]
    do = do_ref[pl.ds(q_start, block_q), :]
    lse = lse_ref[pl.ds(q_start, block_q)]
    delta = delta_ref[pl.ds(q_start, block_q)]
    s = _dot(q, k, trans_b=True) * sm_scale
    p = jnp.exp(s - lse[:, None])
    mask = _causal_or_pad_mask(q_start, k_start, s.shape, kv_len, causal, mask_kv)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  # Causal: query blocks that end before this key block starts see none of it.
  lower = lax.div(k_start, block_q) if causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lower, num_q_blocks, body, (zeros, zeros))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------
# Pallas: calls, custom_vjp and the public wrapper


def _flash_plan(q, k, block_sizes: BlockSizes):
  """Padded lengths and fitted blocks: every length becomes a multiple of both its blocks."""
  T, S = q.shape[1], k.shape[1]
  bq, bk = _common.fit_block(block_sizes.block_q, T), _common.fit_block(block_sizes.block_k, S)
  bq_dkv = _common.fit_block(block_sizes.block_q_dkv, T)
  bk_dkv = _common.fit_block(block_sizes.block_k_dkv, S)
  T_pad = _common.round_up(T, max(bq, bq_dkv))
  S_pad = _common.round_up(S, max(bk, bk_dkv))
  return bq, bk, bq_dkv, bk_dkv, T_pad, S_pad


def _flash_forward(q, k, v, causal, sm_scale, block_sizes, interpret):
  """Padded (out [B, T_pad, H, D], lse [B, H, T_pad]) from unpadded inputs."""
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  bq, bk, _, _, T_pad, S_pad = _flash_plan(q, k, block_sizes)
  q_p, k_p, v_p = _pad_seq(q, T_pad), _pad_seq(k, S_pad), _pad_seq(v, S_pad)
  kernel = functools.partial(_flash_forward_kernel, sm_scale=sm_scale, causal=causal,
                             block_k=bk, kv_len=S, mask_kv=S != S_pad)
  q_spec = pl.BlockSpec((_SQ, bq, _SQ, D), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((_SQ, S_pad, _SQ, D), lambda b, h, i: (b, 0, h // G, 0))
  return pl.pallas_call(
      kernel,
      grid=(B, H, T_pad // bq),
      in_specs=[q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, pl.BlockSpec((_SQ, _SQ, bq), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q_p.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, H, T_pad), jnp.float32)],
      compiler_params=_common.compiler_params(interpret, block_sizes.num_warps, block_sizes.num_stages),
      interpret=interpret,
      name="zojax_flash_forward",
  )(q_p, k_p, v_p)


def _flash_backward(q, k, v, out_p, lse, do, causal, sm_scale, block_sizes, interpret):
  B, T, H, D = q.shape
  S, K = k.shape[1], k.shape[2]
  G = H // K
  bq, bk, bq_dkv, bk_dkv, T_pad, S_pad = _flash_plan(q, k, block_sizes)
  q_p, k_p, v_p = _pad_seq(q, T_pad), _pad_seq(k, S_pad), _pad_seq(v, S_pad)
  do_p = _pad_seq(do, T_pad)  # zero rows: padded queries contribute nothing
  delta = jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), out_p.astype(jnp.float32))
  mask_kv = S != S_pad
  params = _common.compiler_params(interpret, block_sizes.num_warps, block_sizes.num_stages)

  row_spec = pl.BlockSpec((_SQ, bq, _SQ, D), lambda b, h, i: (b, i, h, 0))
  kv_all = pl.BlockSpec((_SQ, S_pad, _SQ, D), lambda b, h, i: (b, 0, h // G, 0))
  stat_spec = pl.BlockSpec((_SQ, _SQ, bq), lambda b, h, i: (b, h, i))
  dq = pl.pallas_call(
      functools.partial(_flash_dq_kernel, sm_scale=sm_scale, causal=causal, block_k=bk,
                        kv_len=S, mask_kv=mask_kv),
      grid=(B, H, T_pad // bq),
      in_specs=[row_spec, kv_all, kv_all, row_spec, stat_spec, stat_spec],
      out_specs=row_spec,
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="zojax_flash_dq",
  )(q_p, k_p, v_p, do_p, lse, delta)

  # One dk/dv per query head; the G heads of a group are summed below (in f32 when G > 1).
  q_all = pl.BlockSpec((_SQ, T_pad, _SQ, D), lambda b, h, j: (b, 0, h, 0))
  kv_spec = pl.BlockSpec((_SQ, bk_dkv, _SQ, D), lambda b, h, j: (b, j, h // G, 0))
  stat_all = pl.BlockSpec((_SQ, _SQ, T_pad), lambda b, h, j: (b, h, 0))
  dkv_spec = pl.BlockSpec((_SQ, bk_dkv, _SQ, D), lambda b, h, j: (b, j, h, 0))
  grad_dtype = k.dtype if G == 1 else jnp.float32
  dk, dv = pl.pallas_call(
      functools.partial(_flash_dkv_kernel, sm_scale=sm_scale, causal=causal,
                        block_q=bq_dkv, kv_len=S, mask_kv=mask_kv),
      grid=(B, H, S_pad // bk_dkv),
      in_specs=[q_all, kv_spec, kv_spec, q_all, stat_all, stat_all],
      out_specs=[dkv_spec, dkv_spec],
      out_shape=[jax.ShapeDtypeStruct((B, S_pad, H, D), grad_dtype)] * 2,
      compiler_params=params,
      interpret=interpret,
      name="zojax_flash_dkv",
  )(q_p, k_p, v_p, do_p, lse, delta)
  if G > 1:
    dk = dk.reshape(B, S_pad, K, G, D).sum(axis=3)
    dv = dv.reshape(B, S_pad, K, G, D).sum(axis=3)
  return dq[:, :T], dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _flash(q, k, v, causal, sm_scale, block_sizes, interpret):
  out_p, _ = _flash_forward(q, k, v, causal, sm_scale, block_sizes, interpret)
  return out_p[:, :q.shape[1]]


def _flash_fwd(q, k, v, causal, sm_scale, block_sizes, interpret):
  out_p, lse = _flash_forward(q, k, v, causal, sm_scale, block_sizes, interpret)
  return out_p[:, :q.shape[1]], (q, k, v, out_p, lse)


def _flash_bwd(causal, sm_scale, block_sizes, interpret, residuals, do):
  q, k, v, out_p, lse = residuals
  return _flash_backward(q, k, v, out_p, lse, do, causal, sm_scale, block_sizes, interpret)


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """FlashAttention-2 forward and backward as Pallas kernels (the "pallas" implementation).

  Args:
    q: [B, T, H, D] queries; D must be 64 or 128.
    k, v: [B, S, K, D] keys and values, same dtype as q; H must be a multiple of K.
    causal: mask keys after the query position (needs T == S).
    sm_scale: score scale, default 1/sqrt(D).
    block_sizes: tiles; lengths that are not multiples of them are padded and masked.
    interpret: run the kernels in Pallas' interpreter; default: only on CPU.

  Returns:
    [B, T, H, D] in q's dtype.
  """
  _check_inputs(q, k, v, causal, "pallas")
  block_sizes = block_sizes or BlockSizes()
  if interpret is None:
    interpret = _common.default_interpret()
  sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
  return _flash(q, k, v, causal, sm_scale, block_sizes, interpret)


# ---------------------------------------------------------------------------------------
# Dispatch


def attention(q, k, v, *, causal: bool = False, sm_scale: float | None = None,
              implementation: str = "auto", block_sizes: BlockSizes | None = None,
              interpret: bool | None = None):
  """Softmax attention through the chosen implementation (see the module docstring).

  Args:
    q: [B, T, H, D]; k, v: [B, S, K, D] with H a multiple of K; one floating dtype.
    causal: mask future keys (needs T == S).
    sm_scale: score scale, default 1/sqrt(D).
    implementation: "auto", "pallas", "blockwise" or "xla".
    block_sizes: Pallas tiles and the blockwise path's key block.
    interpret: Pallas interpreter flag (default: on CPU only).

  Returns:
    [B, T, H, D] in q's dtype; differentiable in q, k, v.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention: implementation={implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = default_implementation(kv_len=k.shape[1] if k.ndim == 4 else None)
    if implementation == "pallas" and q.shape[-1] not in PALLAS_HEAD_DIMS:
      implementation = "blockwise"
  if implementation == "pallas":
    return flash_attention(q, k, v, causal=causal, sm_scale=sm_scale,
                           block_sizes=block_sizes, interpret=interpret)
  if implementation == "blockwise":
    block_k = (block_sizes or BlockSizes()).blockwise_block_k
    return blockwise_attention(q, k, v, causal=causal, sm_scale=sm_scale, block_k=block_k)
  _check_inputs(q, k, v, causal, "xla")
  return attention_reference(q, k, v, causal=causal, sm_scale=sm_scale)
