"""Adam with blockwise dynamic 8-bit moments, in pure JAX (runs on CPU, GPU and TPU).

Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization" (bitsandbytes): each
moment is cut into blocks of `block_size` consecutive entries along the last axis; a block
stores one fp32 absmax and one uint8 code per entry, the code indexing a fixed 256-entry
"dynamic" codebook on [-1, 1] (signed, for m) or [0, 1] (unsigned, for v). The codebook
spends its codes per decade (10^-6 .. 1), so small entries keep relative precision. Each
step dequantizes, runs the fp32 Adam update and requantizes.

Leaves smaller than `Adam8bitSettings.min_8bit_size` keep fp32 moments (bitsandbytes'
default: 4096), so norms and biases do not pay quantization error for no memory gain.

Memory per quantized entry: 2 bytes (m and v codes) + 8 / block_size bytes of scales,
against 8 bytes for fp32 Adam.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_DECADES = 7  # codebook magnitudes 1e-6 .. 1


@functools.cache
def dynamic_codebook(signed: bool) -> np.ndarray:
  """Sorted 256 values on [-1, 1] (signed) or [0, 1]: 0, 1 and, per decade 10^(k-6), k = 0..6,
  2^k (signed: per sign) or 2^(k+1) (unsigned) values spaced linearly inside the decade."""
  values = [0.0, 1.0]
  for k in range(_DECADES):
    count = 2 ** k if signed else 2 ** (k + 1)
    edges = np.linspace(0.1, 1.0, count + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - _DECADES + 1)
    values += list(mids)
    if signed:
      values += list(-mids)
  out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
  assert out.size == 256, out.size
  return out


def _blocks(x, block_size):
  """Any shape -> [nb, block_size]: row-major flattened and zero-padded (as bitsandbytes)."""
  flat = x.reshape(-1)
  pad = -flat.size % block_size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(-1, block_size)


def _searchsorted(book, x):
  """`jnp.searchsorted(book, x)` for a power-of-two-sized book, as unrolled halvings.

  Elementwise with lookups into the small book, so XLA fuses it into one pass; the while
  loop of `jnp.searchsorted` keeps several full-size index buffers alive (6 fp32 copies of
  the leaf per quantization on CPU).
  """
  step = book.size // 2
  i = jnp.where(book[step - 1] < x, step, 0)  # a scalar lookup: nothing to constant-fold
  step //= 2
  while step:
    i = jnp.where(book[i + step - 1] < x, i + step, i)
    step //= 2
  return i


def quantize(x, *, signed: bool, block_size: int = 256):
  """fp32 array -> (uint8 codes of the same shape, fp32 absmax [ceil(size / block_size)])."""
  x = jnp.asarray(x, jnp.float32)
  xb = _blocks(x, block_size)
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  normed = jnp.clip(xb / safe[:, None], -1.0, 1.0)
  book = jnp.asarray(dynamic_codebook(signed))
  hi = jnp.clip(_searchsorted(book, normed), 1, book.size - 1)
  lo = hi - 1
  idx = jnp.where(normed - book[lo] <= book[hi] - normed, lo, hi)
  return idx.reshape(-1)[:x.size].reshape(x.shape).astype(jnp.uint8), absmax


def zero_code(signed: bool) -> int:
  """The code `quantize` gives an all-zero block (the index of 0.0 in the codebook)."""
  return int(np.flatnonzero(dynamic_codebook(signed) == 0.0)[0])


def dequantize(codes, absmax, *, signed: bool, block_size: int = 256):
  """Inverse of `quantize` (up to the codebook's resolution)."""
  book = jnp.asarray(dynamic_codebook(signed))
  vals = _blocks(book[codes.astype(jnp.int32)], block_size) * absmax[:, None]
  return vals.reshape(-1)[:codes.size].reshape(codes.shape)


@dataclasses.dataclass(frozen=True)
class Adam8bitSettings:
  """Structural settings of 8-bit Adam, kept apart from the numeric hyperparameters.

  They fix the state's dtypes and shapes (or, for `mask`, which leaves decay), so they
  must not be traced: `optax.inject_hyperparams` traces every numeric argument of a factory,
  but passes this frozen object through as it is.

  Attributes:
    block_size: consecutive entries per absmax block (256 as in the issue; bitsandbytes'
      optimizers default to 2048).
    min_8bit_size: leaves with fewer entries keep fp32 moments.
    mask: which leaves `adam8bit`'s weight decay touches, as optax's `mask` (a tree of
      bools or a callable params -> one); None: all. `scale_by_adam8bit` ignores it.
  """
  block_size: int = 256
  min_8bit_size: int = 4096
  mask: Any = None

  def __post_init__(self):
    check_int_fields(self, block_size=1, min_8bit_size=0)


def check_int_fields(settings, **lowest: int) -> None:
  """Raises a one-line ValueError naming the first field of `settings` that is not an int
  (bools excluded) at least as large as its bound in `lowest`."""
  for name, low in lowest.items():
    value = getattr(settings, name)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{type(settings).__name__}: {name}={value!r} must be an int >= {low}")


class ScaleByAdam8bitState(NamedTuple):
  """State of `scale_by_adam8bit`. All plain arrays.

  Attributes:
    count: int32 [].
    mu, nu: param-shaped; uint8 codes for quantized leaves, fp32 for small ones.
    mu_scale, nu_scale: fp32 [ceil(size / block_size)] per-block absmax over the row-major
      flattened leaf (ones and unused for small leaves).
  """
  count: jax.Array
  mu: Any
  nu: Any
  mu_scale: Any
  nu_scale: Any


def scale_by_adam8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                      settings: Adam8bitSettings = Adam8bitSettings()
                      ) -> optax.GradientTransformation:
  """Adam's direction with moments stored blockwise in 8 bits.

    u_t = m_hat_t / (sqrt(v_hat_t) + eps)

  with m and v dequantized before and requantized after each step.

  Args:
    b1, b2, eps: as `optax.scale_by_adam`; plain numbers or traced scalars.
    settings: block size and the size below which moments stay fp32.

  Returns:
    A transform with state `ScaleByAdam8bitState`; updates keep the gradients' dtype.
  """
  if not isinstance(settings, Adam8bitSettings):
    raise TypeError(f"scale_by_adam8bit: settings must be an Adam8bitSettings, got "
                    f"{type(settings).__name__}")
  block_size = settings.block_size
  quantized = lambda x: math.prod(np.shape(x)) >= settings.min_8bit_size and np.ndim(x) >= 1
  nb = lambda x: -(-math.prod(np.shape(x)) // block_size)

  def init_fn(params):
    if not jax.tree.leaves(params):
      # optax.tree_map_params' placeholder: the codes and the scales all belong to the param.
      return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=params, nu=params,
                                  mu_scale=params, nu_scale=params)

    def codes(x, signed):
      if not quantized(x):
        return jnp.zeros(np.shape(x), jnp.float32)
      # quantize(zeros) is the code of 0.0 everywhere; written directly, XLA does not
      # constant-fold a whole quantization (tens of seconds per large leaf).
      return jnp.full(np.shape(x), zero_code(signed), jnp.uint8)
    scales = lambda x: jnp.ones((nb(x),), jnp.float32)
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda x: codes(x, True), params),
        nu=jax.tree.map(lambda x: codes(x, False), params),
        mu_scale=jax.tree.map(scales, params), nu_scale=jax.tree.map(scales, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t

    def one(g, mq, vq, ms, vs):
      g32 = jnp.asarray(g, jnp.float32)
      q = quantized(g)
      m = dequantize(mq, ms, signed=True, block_size=block_size) if q else mq
      v = dequantize(vq, vs, signed=False, block_size=block_size) if q else vq
      m = b1 * m + (1 - b1) * g32
      v = b2 * v + (1 - b2) * g32 * g32
      u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
      if q:
        (mq, ms), (vq, vs) = (quantize(m, signed=True, block_size=block_size),
                              quantize(v, signed=False, block_size=block_size))
      else:
        mq, vq = m, v
      return u.astype(jnp.asarray(g).dtype), mq, vq, ms, vs

    out = jax.tree.map(one, updates, state.mu, state.nu, state.mu_scale, state.nu_scale)
    treedef = jax.tree.structure(updates)
    u, mq, vq, ms, vs = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
    return u, ScaleByAdam8bitState(count=count, mu=mq, nu=vq, mu_scale=ms, nu_scale=vs)

  return optax.GradientTransformation(init_fn, update_fn)


def adam8bit(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0, *,
             settings: Adam8bitSettings = Adam8bitSettings()) -> optax.GradientTransformation:
  """8-bit AdamW: `scale_by_adam8bit`, decoupled weight decay, learning rate (as `optax.adamw`).

  The numeric arguments may be schedules or traced scalars, so
  `optax.inject_hyperparams(adam8bit)(learning_rate=...)` works without `static_args`.

  Example:
    >>> tx = adam8bit(1e-3, weight_decay=0.1, settings=Adam8bitSettings(mask=decay_mask))
  """
  return optax.chain(
      scale_by_adam8bit(b1=b1, b2=b2, eps=eps, settings=settings),
      optax.add_decayed_weights(weight_decay, settings.mask),
      optax.scale_by_learning_rate(learning_rate),
  )
