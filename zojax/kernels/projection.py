"""GaLore's low-rank projections as one fused Pallas matmul, with a reference and dispatch.

GaLore (Zhao et al., 2024, Algorithm 2) keeps optimizer state in a rank-r subspace of each
gradient G [m, n]. With an orthonormal basis P [m, r] ("left": used when m <= n) or
Q [n, r] ("right"):

  project:       R = Pᵀ·G  [r, n]   (left)      R = G·Q  [m, r]   (right)
  project_back:  U = α·P·N [m, n]   (left)      U = α·N·Qᵀ [m, n] (right),  optionally + A

where N is the inner optimizer's low-rank update and α GaLore's scale. Fusing "+ A" writes
the full-size update in one pass instead of materializing α·P·N and adding it after.

API (stable; what `zojax.optim` calls):

  project(g, p, side, *, implementation="auto", block_sizes=None, interpret=None)
      g [m, n] or stacked [L, m, n]; p [m, r] / [L, m, r] (left) or [n, r] / [L, n, r]
      (right). Returns [.., r, n] (left) or [.., m, r] (right).
  project_back(n, p, side, scale=1.0, *, add_to=None, implementation="auto",
               block_sizes=None, interpret=None)
      n [.., r, n] (left) or [.., m, r] (right); p as above; scale a Python float or a
      traced scalar (so `optax.inject_hyperparams` can schedule it); add_to [.., m, n] or
      None. Returns [.., m, n] in add_to's dtype (else the inputs' promoted dtype).
  project_reference / project_back_reference: the same in plain jnp.

Both accumulate in float32, take `side in ("left", "right")`, and are differentiable in
every array argument (a `custom_vjp` whose backward reuses the same kernel).

Implementations: "pallas" (the kernel; `interpret=True` on CPU), "xla" (`jnp` matmuls,
the reference), "auto": "pallas" on GPU when every dimension tiles without padding and
the rank suits Triton (a power of two >= 16), "xla" otherwise. The kernel itself pads
any shape. GPU lowering is Pallas' Triton backend via the generic `pallas_call` API, for
the reasons given in `zojax/kernels/attention.py`.

Example:
  >>> r = project(g, p, "left")                                  # [r, n]
  >>> update = project_back(n_low, p, "left", 0.25, add_to=update)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zojax.kernels import _common
from zojax.kernels._common import SQ as _SQ
from zojax.kernels._common import dot as _dot

IMPLEMENTATIONS = ("auto", "pallas", "xla")
SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the fused matmul out = α·op(X)·op(Y) + A with out [M, N], contraction K.

  Attributes:
    block_m, block_n: output tile per program.
    block_k: contraction chunk per inner-loop step.
    num_warps, num_stages: Triton launch parameters (GPU only).
  """

  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    _common.check_powers_of_two(self, ("block_m", "block_n", "block_k"))


# ---------------------------------------------------------------------------------------
# Fused matmul: out[l] = α · op(X[l]) · op(Y[l]) (+ A[l]); op transposes when asked.


def _matmul_kernel(x_ref, y_ref, scale_ref, *refs, trans_x, trans_y, block_k, has_add):
  if has_add:
    add_ref, o_ref = refs
  else:
    (o_ref,) = refs
  k_len = x_ref.shape[0] if trans_x else x_ref.shape[1]
  dtype = jnp.promote_types(x_ref.dtype, y_ref.dtype)

  def body(i, acc):
    chunk = pl.ds(i * block_k, block_k)
    x = (x_ref[chunk, :] if trans_x else x_ref[:, chunk]).astype(dtype)
    y = (y_ref[:, chunk] if trans_y else y_ref[chunk, :]).astype(dtype)
    return acc + _dot(x, y, trans_a=trans_x, trans_b=trans_y)

  acc = lax.fori_loop(0, k_len // block_k, body, jnp.zeros(o_ref.shape, jnp.float32))
  out = scale_ref[0] * acc
  if has_add:
    out = out + add_ref[...].astype(jnp.float32)
  o_ref[...] = out.astype(o_ref.dtype)


def _dims(x, y, trans_x, trans_y):
  """(M, K, N) of op(X)·op(Y) for stacked [L, ., .] operands."""
  M, K = (x.shape[2], x.shape[1]) if trans_x else (x.shape[1], x.shape[2])
  N = y.shape[1] if trans_y else y.shape[2]
  return M, K, N


def _matmul_pallas(x, y, scale, add, trans_x, trans_y, out_dtype, block_sizes, interpret):
  """The kernel on stacked operands; pads every dim up to its tile and slices back."""
  L = x.shape[0]
  M, K, N = _dims(x, y, trans_x, trans_y)
  bm, bn, bk = (_common.fit_block(block_sizes.block_m, M), _common.fit_block(block_sizes.block_n, N),
                _common.fit_block(block_sizes.block_k, K))
  Mp, Np, Kp = _common.round_up(M, bm), _common.round_up(N, bn), _common.round_up(K, bk)
  x = _common.pad_to(x, (L, Kp, Mp) if trans_x else (L, Mp, Kp))
  y = _common.pad_to(y, (L, Np, Kp) if trans_y else (L, Kp, Np))
  if trans_x:
    x_spec = pl.BlockSpec((_SQ, Kp, bm), lambda l, i, j: (l, 0, i))
  else:
    x_spec = pl.BlockSpec((_SQ, bm, Kp), lambda l, i, j: (l, i, 0))
  if trans_y:
    y_spec = pl.BlockSpec((_SQ, bn, Kp), lambda l, i, j: (l, j, 0))
  else:
    y_spec = pl.BlockSpec((_SQ, Kp, bn), lambda l, i, j: (l, 0, j))
  out_spec = pl.BlockSpec((_SQ, bm, bn), lambda l, i, j: (l, i, j))
  operands = [x, y, jnp.reshape(jnp.asarray(scale, jnp.float32), (1,))]
  in_specs = [x_spec, y_spec, pl.BlockSpec((1,), lambda l, i, j: (0,))]
  if add is not None:
    operands.append(_common.pad_to(add, (L, Mp, Np)))
    in_specs.append(out_spec)
  params = _common.compiler_params(interpret, block_sizes.num_warps, block_sizes.num_stages)
  out = pl.pallas_call(
      functools.partial(_matmul_kernel, trans_x=trans_x, trans_y=trans_y, block_k=bk,
                        has_add=add is not None),
      grid=(L, Mp // bm, Np // bn),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct((L, Mp, Np), out_dtype),
      compiler_params=params,
      interpret=interpret,
      name="zojax_galore_matmul",
  )(*operands)
  return out[:, :M, :N]


def _matmul_xla(x, y, scale, add, trans_x, trans_y, out_dtype):
  x = jnp.swapaxes(x, 1, 2) if trans_x else x
  y = jnp.swapaxes(y, 1, 2) if trans_y else y
  dtype = jnp.promote_types(x.dtype, y.dtype)
  out = jnp.matmul(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
  out = jnp.asarray(scale, jnp.float32) * out
  if add is not None:
    out = out + add.astype(jnp.float32)
  return out.astype(out_dtype)


def _matmul_impl(x, y, scale, add, trans_x, trans_y, impl, block_sizes, interpret):
  out_dtype = add.dtype if add is not None else jnp.promote_types(x.dtype, y.dtype)
  if impl == "pallas":
    return _matmul_pallas(x, y, scale, add, trans_x, trans_y, out_dtype, block_sizes,
                          interpret)
  return _matmul_xla(x, y, scale, add, trans_x, trans_y, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _matmul(x, y, scale, add, trans_x, trans_y, impl, block_sizes, interpret):
  return _matmul_impl(x, y, scale, add, trans_x, trans_y, impl, block_sizes, interpret)


def _matmul_fwd(x, y, scale, add, trans_x, trans_y, impl, block_sizes, interpret):
  out = _matmul_impl(x, y, scale, add, trans_x, trans_y, impl, block_sizes, interpret)
  return out, (x, y, scale, add is None)


def _matmul_bwd(trans_x, trans_y, impl, block_sizes, interpret, residuals, d_out):
  """Z = op(X)·op(Y), out = α·Z + A: each cotangent is one more call of the same matmul."""
  x, y, scale, no_add = residuals
  mm = functools.partial(_matmul_impl, impl=impl, block_sizes=block_sizes,
                         interpret=interpret, add=None)
  # d op(X) = α·dOut·op(Y)ᵀ, written straight into X's layout.
  if trans_x:
    dx = mm(y, d_out, scale, trans_x=trans_y, trans_y=True)
  else:
    dx = mm(d_out, y, scale, trans_x=False, trans_y=not trans_y)
  # W = op(X)ᵀ·dOut; d op(Y) = α·W and dα = <W, op(Y)>.
  if trans_y:
    w = mm(d_out, x, 1.0, trans_x=True, trans_y=trans_x)
  else:
    w = mm(x, d_out, 1.0, trans_x=not trans_x, trans_y=False)
  w32 = w.astype(jnp.float32)
  d_scale = jnp.sum(w32 * y.astype(jnp.float32)).astype(jnp.result_type(scale))
  dy = (jnp.asarray(scale, jnp.float32) * w32).astype(y.dtype)
  d_add = None if no_add else d_out
  return dx.astype(x.dtype), dy, jnp.reshape(d_scale, jnp.shape(scale)), d_add


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------------------
# Public API


def _check(fn, a, p, side, a_name, want_a, add_to=None):
  """Validates a projection call; returns whether the inputs are stacked [L, ., .]."""
  shapes = f"{a_name}.shape={a.shape}, p.shape={p.shape}"
  if side not in SIDES:
    raise ValueError(f"{fn}: side={side!r} is not one of {SIDES}")
  if a.ndim not in (2, 3) or p.ndim != a.ndim:
    raise ValueError(f"{fn}: expected {a_name} and p both [m, n]-like or both stacked "
                     f"[L, ., .]; got {shapes}")
  if a.ndim == 3 and a.shape[0] != p.shape[0]:
    raise ValueError(f"{fn}: layer counts differ ({shapes})")
  if not want_a(a.shape[-2:], p.shape[-2:]):
    raise ValueError(f"{fn}(side={side!r}): {a_name} does not fit p ({shapes}); "
                     f"see the zojax.kernels.projection docstring for the shapes")
  for name, x in ((a_name, a), ("p", p)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fn}: {name}.dtype={x.dtype} is not floating ({shapes})")
  return a.ndim == 3


def _resolve(implementation, dims, rank):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  if jax.default_backend() not in _common.GPU_BACKENDS:
    return "xla"
  # Only shapes that tile without padding: padding would cost a full copy of G.
  tiles = all(d % 16 == 0 and d >= 16 for d in dims)
  return "pallas" if tiles and rank >= 16 and not rank & (rank - 1) else "xla"


def _stack(x, stacked):
  return x if stacked else x[None]


def _unstack(x, stacked):
  return x if stacked else x[0]


@functools.partial(jax.jit,
                   static_argnames=("side", "implementation", "block_sizes", "interpret"))
def project(g, p, side: str, *, implementation: str = "auto",
            block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Projects a gradient onto its rank-r subspace: Pᵀ·G (left) or G·Q (right).

  GaLore (Zhao et al., 2024), Algorithm 2, `R_t = P_tᵀ G_t`.

  Args:
    g: [m, n] or [L, m, n] gradient.
    p: basis, [m, r] (left) or [n, r] (right), with g's leading L if stacked.
    side: "left" or "right".
    implementation: "auto", "pallas" or "xla".
    block_sizes: Pallas tiles.
    interpret: Pallas interpreter flag (default: on CPU only).

  Returns:
    [.., r, n] (left) or [.., m, r] (right), in the promoted dtype of g and p.
  """
  stacked = _check("project", g, p, side, "g",
                   lambda gs, ps: gs[0] == ps[0] if side == "left" else gs[1] == ps[0])
  impl = _resolve(implementation, g.shape[-2:], p.shape[-1])
  interpret = _common.default_interpret() if interpret is None else interpret
  block_sizes = block_sizes or BlockSizes()
  g, p = _stack(g, stacked), _stack(p, stacked)
  if side == "left":
    out = _matmul(p, g, 1.0, None, True, False, impl, block_sizes, interpret)
  else:
    out = _matmul(g, p, 1.0, None, False, False, impl, block_sizes, interpret)
  return _unstack(out, stacked)


@functools.partial(jax.jit,
                   static_argnames=("side", "implementation", "block_sizes", "interpret"))
def project_back(n, p, side: str, scale=1.0, *, add_to=None, implementation: str = "auto",
                 block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Back-projects a low-rank update and scales it: α·P·N (left) or α·N·Qᵀ (right), + A.

  GaLore (Zhao et al., 2024), Algorithm 2, `G̃_t = α P_t N_t`.

  Args:
    n: low-rank update, [r, n] (left) or [m, r] (right), stacked like p.
    p: basis, [m, r] (left) or [n, r] (right), optionally stacked [L, ., r].
    side: "left" or "right".
    scale: α, a float or a traced scalar.
    add_to: optional [.., m, n] array added to the result inside the kernel.
    implementation, block_sizes, interpret: as in `project`.

  Returns:
    [.., m, n] in add_to's dtype, else the promoted dtype of n and p.
  """
  r = p.shape[-1]
  stacked = _check("project_back", n, p, side, "n",
                   lambda ns, ps: ns[0] == r if side == "left" else ns[1] == r)
  M, N = (p.shape[-2], n.shape[-1]) if side == "left" else (n.shape[-2], p.shape[-2])
  if add_to is not None and add_to.shape != (*n.shape[:-2], M, N):
    raise ValueError(f"project_back(side={side!r}): add_to.shape={add_to.shape} must be "
                     f"{(*n.shape[:-2], M, N)} (n.shape={n.shape}, p.shape={p.shape})")
  if jnp.ndim(scale) != 0:
    raise ValueError(f"project_back: scale must be a scalar, got shape {jnp.shape(scale)}")
  impl = _resolve(implementation, (M, N), r)
  interpret = _common.default_interpret() if interpret is None else interpret
  block_sizes = block_sizes or BlockSizes()
  n, p = _stack(n, stacked), _stack(p, stacked)
  add = None if add_to is None else _stack(add_to, stacked)
  scale = jnp.asarray(scale, jnp.float32)
  if side == "left":
    out = _matmul(p, n, scale, add, False, False, impl, block_sizes, interpret)
  else:
    out = _matmul(n, p, scale, add, False, True, impl, block_sizes, interpret)
  return _unstack(out, stacked)


def project_reference(g, p, side: str):
  """`project` in plain jnp (float32 accumulation at HIGHEST precision)."""
  pt = jnp.swapaxes(p, -1, -2)
  hi = lax.Precision.HIGHEST
  if side == "left":
    out = jnp.matmul(pt, g, precision=hi, preferred_element_type=jnp.float32)
  else:
    out = jnp.matmul(g, p, precision=hi, preferred_element_type=jnp.float32)
  return out.astype(jnp.promote_types(g.dtype, p.dtype))


def project_back_reference(n, p, side: str, scale=1.0, *, add_to=None):
  """`project_back` in plain jnp (float32 accumulation at HIGHEST precision)."""
  hi = lax.Precision.HIGHEST
  if side == "left":
    out = jnp.matmul(p, n, precision=hi, preferred_element_type=jnp.float32)
  else:
    out = jnp.matmul(n, jnp.swapaxes(p, -1, -2), precision=hi,
                     preferred_element_type=jnp.float32)
  out = jnp.asarray(scale, jnp.float32) * out
  if add_to is None:
    return out.astype(jnp.promote_types(n.dtype, p.dtype))
  return (out + add_to.astype(jnp.float32)).astype(add_to.dtype)
