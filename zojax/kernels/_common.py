"""Helpers shared by the kernel modules: tile fitting, padding, the in-kernel dot, lowering."""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# A squeezed block dimension; `None` meant the same in older Pallas.
SQ = getattr(pl, "squeezed", None)
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
  """2-D a·b (either side transposed) with float32 accumulation; lowers on Triton as tl.dot."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def fit_block(block: int, length: int) -> int:
  """The block, shrunk to the smallest power of two >= length (and >= 16) for short inputs.

  16 is the smallest tile Triton's tl.dot accepts.
  """
  return min(block, max(16, 1 << (length - 1).bit_length()))


def check_powers_of_two(block_sizes, names) -> None:
  """Raises a one-line ValueError unless every named tile is a positive power of two."""
  for name in names:
    value = getattr(block_sizes, name)
    if value < 1 or value & (value - 1):
      raise ValueError(
          f"{type(block_sizes).__name__}.{name}={value} must be a positive power of two")


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_to(x, shape):
  """Zero-pads x at the end of every axis up to `shape` (no copy when already there)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


def default_interpret() -> bool:
  """Pallas runs only in its interpreter on CPU."""
  return jax.default_backend() == "cpu"


def compiler_params(interpret: bool, num_warps: int, num_stages: int):
  """Triton launch parameters; passing them selects Pallas' Triton lowering on GPU.

  See the module docstring of zojax/kernels/attention.py for why Triton.
  """
  if interpret:
    return None
  from jax.experimental.pallas import triton as pl_triton
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
