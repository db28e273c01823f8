"""GaLore: gradient low-rank projection as an optax transform wrapping any inner optimizer.

Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
(Algorithm 2; the official code is the `galore-torch` package). For a weight W in R^{m x n}
with gradient G, every `update_proj_gap` (T) steps a projector is refreshed from the SVD of
G (in fp32); in between the gradient is projected, the inner optimizer runs on the small
matrix, and its output is projected back and scaled:

  left   (P: m x r)          R = P^T G      (r x n)     update = scale * P N
  right  (Q: r x n)          R = G Q^T      (m x r)     update = scale * N Q
  full   (P, Q)              R = P^T G Q^T  (r x r)     update = scale * P N Q

`std` picks `right` when m >= n and `left` otherwise (it reduces the smaller dimension, so
the inner state is max(m, n) x r), `reverse_std` the opposite. m and n are the rows and
columns of the leaf as stored (zojax kernels are [in, out], torch's are [out, in]; for a
square matrix `std` is `right` either way, exactly as in galore-torch).

What differs from `optax.contrib.galore` (the JAX peer): it always projects the larger
side, and gives stacked [L, m, n] leaves plain full-rank Adam. Here every projection type of
the official projector is available, stacked leaves are projected per layer (the refresh is
vmapped over the layer axis), leaves are chosen by path with the paper's default
(attention and MLP kernels), and every leaf is accounted for: `galore_plan` lists which
leaves are projected, on which side, and which go to the inner optimizer at full rank.

Learning-rate convention (the official one): projected leaves train at lr * scale, the
full-rank ones at lr. The paper's pre-training runs use lr 0.01, scale 0.25, T 200.

Structural settings (rank, T, projection type, which leaves, ...) are one frozen
`GaLoreSettings`; the numbers (learning rate, betas, eps, weight decay, scale) are plain
arguments. `optax.inject_hyperparams` traces every numeric argument and passes the settings
through, so `optax.inject_hyperparams(galore_adamw)(learning_rate=...)` works as for any
optax optimizer, with no `static_args`.

The down and up projections go through `zojax.kernels.projection` (`implementation`: "auto"
picks its Pallas kernel on GPU where the shapes tile, `jnp` matmuls elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax.kernels import projection
from zojax.optim.adam8bit_transform import Adam8bitSettings, check_int_fields, scale_by_adam8bit

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MOMENT_POLICIES = ("keep", "reset", "reproject")
PROJECTOR_METHODS = ("svd", "randomized")

# Paper default: the linear layers of attention and MLP. Matched against the leaf's path.
DEFAULT_PATTERN = (r"(^|\W)(wq|wk|wv|wo|w_gate|w_up|w_down|q_proj|k_proj|v_proj|o_proj|"
                   r"gate_proj|up_proj|down_proj|attn|attention|self_attn|mlp)(\W|$)")


# ---------------------------------------------------------------------------------------
# Which leaves, which axes


class GaLoreDimensionNumbers(NamedTuple):
  """How a leaf is a (batch of) matrices: its batch axes, its row (m) axis, its column (n) axis.

  Batch axes are projected independently (the layer axis of a stacked [L, m, n] kernel).
  Every axis of the leaf must be named exactly once.
  """
  batch_axes: tuple[int, ...] = ()
  row_axis: int = -2
  col_axis: int = -1


def _leading_batch(ndim: int) -> GaLoreDimensionNumbers:
  return GaLoreDimensionNumbers(batch_axes=tuple(range(ndim - 2)))


def path_dimension_numbers(pattern: str = DEFAULT_PATTERN, exclude: str = r"norm|bias|embed"
                           ) -> Callable[[Any], Any]:
  """Leaf selection by path: leaves whose path matches `pattern` (and not `exclude`) are projected.

  Their leading axes are batch axes (a stacked [L, m, n] kernel is L matrices). A matched
  leaf with fewer than 2 axes is an error rather than a silent skip.

  Returns:
    A callable params -> tree of `GaLoreDimensionNumbers` (projected) or None (full rank).
  """
  include_re, exclude_re = re.compile(pattern), re.compile(exclude) if exclude else None

  def fn(params):
    def one(path, x):
      name = _path_str(path)
      if not include_re.search(name) or (exclude_re and exclude_re.search(name)):
        return None
      if np.ndim(x) < 2:
        raise ValueError(f"galore: leaf {name} with shape {tuple(np.shape(x))} matches the "
                         f"projection pattern but is not a matrix; exclude it explicitly")
      return _leading_batch(np.ndim(x))
    return jax.tree_util.tree_map_with_path(one, params)
  return fn


default_dimension_numbers = path_dimension_numbers()


def _path_str(path) -> str:
  return jax.tree_util.keystr(path)


@dataclasses.dataclass(frozen=True)
class GaLoreSettings:
  """Structural settings of the GaLore family, kept apart from the numeric hyperparameters.

  They fix the state's shapes or the traced program, so they must not be traced:
  `optax.inject_hyperparams` traces every numeric argument of a factory, but passes this
  frozen object through as it is. Each optimizer reads the fields it uses.

  Attributes:
    rank: r, per projected matrix; must be in 1..min(m, n) for every projected leaf.
    update_proj_gap: T, steps between projector refreshes (at steps 0, T, 2T, ...).
    proj_type: one of `PROJ_TYPES` (see the module docstring).
    weight_dimension_numbers: which leaves are projected and how they are matrices: a
      `GaLoreDimensionNumbers`, or a tree of them / bools / None (None or False: full
      rank; True: leading axes are batch axes), or a callable params -> such a tree.
      Default (None): `default_dimension_numbers` (attention and MLP kernels by path).
    moment_policy: what a refresh does to the inner state of the refreshed leaves: "keep"
      (official), "reset" (the inner optimizer's initial state), "reproject" (rotate it
      into the new subspace: first moments linearly, second moments by the squared
      rotation; see `LINEAR_FIELDS`, `SQUARED_FIELDS`).
    projector: "svd" (exact, fp32) or "randomized" (subspace iteration warm-started from
      the previous projector: `power_iters` iterations, `oversample` extra columns).
    power_iters, oversample: for the randomized projector.
    stagger: refresh leaf i at steps offset_i + kT (offset_i = i T / #leaves) instead of all
      at once, spreading the SVD cost; every leaf still refreshes at step 0.
    seed: for the randomized projector's Gaussian sketch (folded with step and leaf).
    implementation: of the projections, as in `zojax.kernels.projection`: "auto" (the
      Pallas kernel on GPU where the shapes tile, XLA matmuls otherwise), "pallas", "xla".
    mask: which leaves weight decay touches, as optax's `mask` (a tree of bools or a
      callable params -> one); None: all.
    block_size, min_8bit_size: `galore8bit`'s 8-bit moments, as in `Adam8bitSettings`.
    history: `natural_galore`'s s, the low-rank gradients kept per matrix for the Fisher.
  """
  rank: int = 128
  update_proj_gap: int = 200
  proj_type: str = "std"
  weight_dimension_numbers: Any = None
  moment_policy: str = "keep"
  projector: str = "svd"
  power_iters: int = 1
  oversample: int = 8
  stagger: bool = False
  seed: int = 0
  implementation: str = "auto"
  mask: Any = None
  block_size: int = 256
  min_8bit_size: int = 4096
  history: int = 20

  def __post_init__(self):
    for name, choices in (("proj_type", PROJ_TYPES), ("moment_policy", MOMENT_POLICIES),
                          ("projector", PROJECTOR_METHODS),
                          ("implementation", projection.IMPLEMENTATIONS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"GaLoreSettings: {name}={getattr(self, name)!r} is not one of "
                         f"{choices}")
    check_int_fields(self, rank=1, update_proj_gap=1, power_iters=0, oversample=0, history=1)
    self.adam8bit()  # checks block_size and min_8bit_size

  def adam8bit(self) -> Adam8bitSettings:
    """The 8-bit moments' settings (`galore8bit`'s inner optimizer)."""
    return Adam8bitSettings(block_size=self.block_size, min_8bit_size=self.min_8bit_size)


def _check_settings(caller: str, settings) -> GaLoreSettings:
  if not isinstance(settings, GaLoreSettings):
    raise TypeError(f"{caller}: settings must be a GaLoreSettings, got {type(settings).__name__}")
  return settings


class _LeafPlan(NamedTuple):
  """Static description of one projected leaf (from shapes only)."""
  path: str
  perm: tuple[int, ...]        # transpose leaf -> (*batch, m, n)
  batch_shape: tuple[int, ...]
  m: int
  n: int
  side: str                    # left / right / full
  rank: int


def _side(proj_type: str, m: int, n: int) -> str:
  if proj_type == "std":
    return "right" if m >= n else "left"
  if proj_type == "reverse_std":
    return "left" if m >= n else "right"
  return proj_type


def _resolve_dim_nums(weight_dimension_numbers, params):
  spec = default_dimension_numbers if weight_dimension_numbers is None else weight_dimension_numbers
  if callable(spec) and not isinstance(spec, GaLoreDimensionNumbers):
    spec = spec(params)
  is_spec_leaf = lambda x: x is None or isinstance(x, (GaLoreDimensionNumbers, bool))
  if isinstance(spec, GaLoreDimensionNumbers):
    return jax.tree.map(lambda _: spec, params)
  try:
    return jax.tree.map(lambda s, _: s, spec, params, is_leaf=is_spec_leaf)
  except ValueError as e:
    raise ValueError("galore: weight_dimension_numbers must have the structure of the params "
                     f"(a GaLoreDimensionNumbers, bool or None per leaf): {e}") from None


def make_plan(params, settings: GaLoreSettings):
  """Per-leaf plan: a `_LeafPlan` for projected leaves, None for full-rank ones.

  Raises:
    ValueError: rank > min(m, n) for a leaf, or bad axes; the message names the leaf path
      and its shape.
  """
  rank, proj_type = settings.rank, settings.proj_type
  dim_nums = _resolve_dim_nums(settings.weight_dimension_numbers, params)

  def one(path, x, dn):
    name = _path_str(path)
    shape = tuple(np.shape(x))
    if dn is None or dn is False:
      return None
    if dn is True:
      if len(shape) < 2:
        raise ValueError(f"galore: leaf {name} with shape {shape} is masked for projection but "
                         "is not a matrix")
      dn = _leading_batch(len(shape))
    nd = len(shape)
    axes = [a % nd for a in (*dn.batch_axes, dn.row_axis, dn.col_axis)] if nd else []
    if nd < 2 or sorted(axes) != list(range(nd)):
      raise ValueError(f"galore: leaf {name} with shape {shape}: dimension numbers {dn} must "
                       "name every axis exactly once (batch axes, one row, one column)")
    m, n = shape[axes[-2]], shape[axes[-1]]
    if rank > min(m, n):
      raise ValueError(f"galore: rank={rank} for leaf {name} with shape {shape} (matrix "
                       f"{m}x{n}) must be in 1..min(m, n)={min(m, n)}")
    return _LeafPlan(path=name, perm=tuple(axes), batch_shape=tuple(shape[a] for a in axes[:-2]),
                     m=m, n=n, side=_side(proj_type, m, n), rank=int(rank))

  return jax.tree_util.tree_map_with_path(one, params, dim_nums)


def galore_plan(params, settings: GaLoreSettings = GaLoreSettings()) -> dict[str, str]:
  """Human-readable account of every leaf: projected (side, shapes) or full rank.

  Example:
    >>> galore_plan(params, GaLoreSettings(rank=128))["['blocks']['wq']"]
    'right: 8 x [512, 512] -> [512, 128]'
  """
  plan = make_plan(params, _check_settings("galore_plan", settings))
  out = {}
  for (path, x), p in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(plan, is_leaf=_is_plan_leaf)):
    if p is None:
      out[_path_str(path)] = f"full rank: {list(np.shape(x))}"
    else:
      low = _low_rank_shape(p)
      batch = "x".join(map(str, p.batch_shape))
      out[_path_str(path)] = (f"{p.side}: {batch + ' x ' if batch else ''}[{p.m}, {p.n}] -> "
                              f"{list(low)}")
  return out


_is_plan_leaf = lambda x: x is None or isinstance(x, _LeafPlan)


def _low_rank_shape(p: _LeafPlan) -> tuple[int, int]:
  return {"left": (p.rank, p.n), "right": (p.m, p.rank), "full": (p.rank, p.rank)}[p.side]


def _to_matrix(x, p: _LeafPlan):
  """Leaf -> [*batch, m, n] fp32."""
  return jnp.transpose(x, p.perm).astype(jnp.float32)


def _from_matrix(x, p: _LeafPlan, dtype):
  inv = tuple(np.argsort(p.perm))
  return jnp.transpose(x, inv).astype(dtype)


# ---------------------------------------------------------------------------------------
# Projection math, through `zojax.kernels.projection` (its `project_reference` and
# `project_back_reference` are the same math in plain jnp). `proj` is a dict with
# "left": P [m, r] and/or "right": Q [r, n] (rows of V^T, as torch): R = P^T G, G Q^T or
# P^T G Q^T (GaLore Alg. 2, line 'R_t'); back, G~ = scale * P N, N Q or P N Q ('G~_t').


def _flat_batch(x, p: _LeafPlan):
  """[*batch, a, b] -> [prod(batch), a, b] (the kernels' stacked layout), or [a, b] unbatched."""
  return x.reshape(-1, *x.shape[-2:]) if p.batch_shape else x


def _project(g, proj: dict, p: _LeafPlan, implementation: str):
  """R on [*batch, m, n] through the projection kernels."""
  run = lambda x, side, q: projection.project(_flat_batch(x, p), _flat_batch(q, p), side,
                                              implementation=implementation)
  out = g
  if p.side in ("left", "full"):
    out = run(out, "left", proj["left"])
  if p.side in ("right", "full"):
    # The kernels take Q as [n, r]; the transpose folds into the matmul.
    out = run(out, "right", jnp.swapaxes(proj["right"], -1, -2))
  return out.reshape(*p.batch_shape, *_low_rank_shape(p))


def _project_back(n_low, proj: dict, p: _LeafPlan, scale, implementation: str):
  """G~ = scale * (P N | N Q | P N Q) on [*batch, ., .] through the projection kernels."""
  run = lambda x, side, q, a: projection.project_back(
      _flat_batch(x, p), _flat_batch(q, p), side, a, implementation=implementation)
  out = n_low
  if p.side == "full":  # P N first, as the reference associates (P N) Q
    out = run(out, "left", proj["left"], 1.0).reshape(*p.batch_shape, p.m, p.rank)
  if p.side == "left":
    out = run(out, "left", proj["left"], scale)
  else:
    out = run(out, "right", jnp.swapaxes(proj["right"], -1, -2), scale)
  return out.reshape(*p.batch_shape, p.m, p.n)


def _batched(fn, p: _LeafPlan):
  """vmap a one-matrix function over the leaf's batch axes."""
  for _ in p.batch_shape:
    fn = jax.vmap(fn)
  return fn


def _batched_decomposition(fn, p: _LeafPlan):
  """`_batched` for a function calling LAPACK (SVD, QR): one matrix at a time on CPU.

  XLA:CPU runs a batched decomposition as a parallel map on the thread pool that also runs
  each CPU device's program; with several CPU devices in one step every pool thread can end
  up waiting on map tasks that have no thread left to run them (the step hung forever with
  8 host devices). A sequential `lax.map` never calls the batched kernel. GPU and TPU keep
  the vmapped batch.
  """
  if not p.batch_shape or jax.default_backend() != "cpu":
    return _batched(fn, p)
  nb = len(p.batch_shape)

  def mapped(*args):
    flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[nb:]), args)
    out = jax.lax.map(lambda xs: fn(*xs), flat)
    return jax.tree.map(lambda a: a.reshape(*p.batch_shape, *a.shape[1:]), out)

  return mapped


# ---------------------------------------------------------------------------------------
# Projectors


def canonicalize_signs(vectors, axis: int):
  """Flips each singular vector so its largest-magnitude entry is positive.

  `axis` is the axis running along a vector (-2 for the columns of U, -1 for the rows of
  V^T). The SVD fixes vectors only up to sign; this makes the projector (and so a run with
  kept moments) identical across LAPACK builds, backends and devices.
  """
  idx = jnp.argmax(jnp.abs(vectors), axis=axis, keepdims=True)
  sign = jnp.sign(jnp.take_along_axis(vectors, idx, axis=axis))
  return vectors * jnp.where(sign == 0, 1.0, sign)


def _exact_projector(g_MxN, side: str, rank: int) -> dict:
  u, _, vh = jnp.linalg.svd(g_MxN, full_matrices=False)
  out = {}
  if side in ("left", "full"):
    out["left"] = canonicalize_signs(u[:, :rank], axis=-2)
  if side in ("right", "full"):
    out["right"] = canonicalize_signs(vh[:rank, :], axis=-1)
  return out


def _range_finder(a_MxN, warm_MxR, key, rank: int, power_iters: int, oversample: int):
  """Top-`rank` left singular vectors of A by subspace iteration warm-started from `warm`.

  Halko et al. (2011), Alg. 4.4 with a Rayleigh-Ritz step: sketch [warm | Gaussian], power
  iterations A A^T Q with re-orthonormalization, then the SVD of the small Q^T A. Returns
  (U [m, rank], V^T [rank, n]).
  """
  m = a_MxN.shape[0]
  extra = max(min(rank + oversample, m) - rank, 0)
  sketch = warm_MxR
  if extra:
    sketch = jnp.concatenate([warm_MxR, jax.random.normal(key, (m, extra), jnp.float32)], -1)
  q, _ = jnp.linalg.qr(sketch)
  for _ in range(power_iters):
    q, _ = jnp.linalg.qr(a_MxN @ (a_MxN.T @ q))
  ub, _, vh = jnp.linalg.svd(q.T @ a_MxN, full_matrices=False)
  return q @ ub[:, :rank], vh[:rank]


def _randomized_projector(g_MxN, old: dict, key, side: str, rank: int, power_iters: int,
                          oversample: int) -> dict:
  out = {}
  if side in ("left", "full"):
    u, vh = _range_finder(g_MxN, old["left"], key, rank, power_iters, oversample)
    out["left"] = canonicalize_signs(u, axis=-2)
    if side == "full":
      out["right"] = canonicalize_signs(vh, axis=-1)
  else:
    v, _ = _range_finder(g_MxN.T, old["right"].T, key, rank, power_iters, oversample)
    out["right"] = canonicalize_signs(v.T, axis=-1)
  return out


def _initial_projector(p: _LeafPlan) -> dict:
  """Coordinate projector (first r axes); a refresh at step 0 replaces it."""
  out = {}
  if p.side in ("left", "full"):
    out["left"] = jnp.broadcast_to(jnp.eye(p.m, p.rank, dtype=jnp.float32),
                                   (*p.batch_shape, p.m, p.rank))
  if p.side in ("right", "full"):
    out["right"] = jnp.broadcast_to(jnp.eye(p.rank, p.n, dtype=jnp.float32),
                                    (*p.batch_shape, p.rank, p.n))
  return out


# ---------------------------------------------------------------------------------------
# The transform


class GaLoreProjectors(NamedTuple):
  """The projectors, one tree per side, each with the params' structure.

  Attributes:
    left: P [*B, m, r] (fp32) of the leaves projected on the left ("left", "full"), else None.
    right: Q [*B, r, n] (fp32, rows of V^T) of the leaves projected on the right ("right",
      "full"), else None.
  """
  left: Any
  right: Any


class GaLoreState(NamedTuple):
  """State of `scale_by_galore`. All plain arrays.

  Attributes:
    count: int32 [], steps taken (non-finite steps excluded).
    projectors: `GaLoreProjectors`.
    inner_state: the inner optimizer's state, on low-rank shapes for projected leaves.
    low_rank_state: state of the low-rank preconditioner (Natural GaLore's history), or ().
    svd_failures: int32 [], per-matrix refreshes whose projector came out non-finite (the old
      one was kept).
  """
  count: jax.Array
  projectors: GaLoreProjectors
  inner_state: Any
  low_rank_state: Any
  svd_failures: jax.Array


def _projectors(treedef, per_leaf: list) -> GaLoreProjectors:
  """Per-leaf projector dicts ({"left": P} and/or {"right": Q}, or None) -> the state's trees."""
  side = lambda k: treedef.unflatten([None if d is None else d.get(k) for d in per_leaf])
  return GaLoreProjectors(left=side("left"), right=side("right"))


def _projector_dicts(treedef, projectors: GaLoreProjectors) -> list:
  """The inverse of `_projectors`: per leaf a dict of its projectors, or None."""
  pairs = zip(treedef.flatten_up_to(projectors.left), treedef.flatten_up_to(projectors.right))
  return [{k: v for k, v in (("left", l), ("right", r)) if v is not None} or None
          for l, r in pairs]


def _is_placeholder(params) -> bool:
  # optax.tree_map_params initializes with a leafless placeholder to find param-shaped state.
  return not jax.tree.leaves(params)


def _refresh_mask(count, gap, index: int, num: int, stagger: bool):
  """Whether leaf `index` of `num` refreshes at step `count`: at 0, T, 2T, ... (shifted per
  leaf by index * T / num when staggered; every leaf still refreshes at step 0)."""
  if not stagger:
    return count % gap == 0
  offset = (index * gap) // max(num, 1)
  return (count == 0) | ((count >= offset) & ((count - offset) % gap == 0))


def _rotation(old: dict, new: dict, side: str):
  """Maps low-rank coordinates in the old subspace to the new one: (R_left, R_right)."""
  rl = rr = None
  if side in ("left", "full"):
    rl = jnp.swapaxes(new["left"], -1, -2) @ old["left"]       # [r, r] = P_new^T P_old
  if side in ("right", "full"):
    rr = old["right"] @ jnp.swapaxes(new["right"], -1, -2)     # [r, r] = Q_old Q_new^T
  return rl, rr


# How moment_policy="reproject" carries each field of the inner state (optax's names) into
# the new subspace. The field decides, never the values: a first moment can be all
# non-negative too, and rotating it by the squared rotation would be wrong.
LINEAR_FIELDS = ("mu", "trace", "ema")               # first moments and momenta
SQUARED_FIELDS = ("nu", "nu_max", "sum_of_squares")  # second moments: stay non-negative


def _reproject(x, rl, rr, squared: bool):
  """R_l x R_r, or with the elementwise squares of the rotations for a second moment.

    x -> R_l x R_r    or    x -> (R_l * R_l) x (R_r * R_r)

  A rotation is None on a side that is not projected.
  """
  if squared:
    rl, rr = (None if r is None else r * r for r in (rl, rr))
  if rl is not None:
    x = rl @ x
  if rr is not None:
    x = x @ rr
  return x


def _key_name(key) -> str:
  """A key path entry's name: a NamedTuple field, a dict key or a sequence index."""
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _state_owners(inner, inner_state, params_def) -> list[tuple[int, str] | None]:
  """For each leaf of `inner_state` (flattened): (index of its param, the state field that
  holds it), or None for a leaf of no param (a count, ...).

  `optax.tree_map_params` finds the param-structured subtrees (from `inner.init` on its
  placeholder); the field is the key just above such a subtree.
  """
  flat, state_def = jax.tree_util.tree_flatten_with_path(inner_state)
  param_index = params_def.unflatten(range(params_def.num_leaves))
  depth = [len(path) for path, _ in jax.tree_util.tree_flatten_with_path(param_index)[0]]
  owner = {}

  def record(leaf, param):
    owner[leaf] = param
    return leaf
  optax.tree_map_params(inner, record, state_def.unflatten(range(len(flat))), param_index)
  out = []
  for i, (path, _) in enumerate(flat):
    if i not in owner:
      out.append(None)
      continue
    k = depth[owner[i]]
    out.append((owner[i], _key_name(path[-k - 1]) if len(path) > k else ""))
  return out


def _refresh_actions(inner, inner_state, params_def, plans, policy: str) -> list:
  """Per leaf of `inner_state`: None (a refresh leaves it alone) or (param index, "reset" |
  "linear" | "squared").

  Raises:
    ValueError: "reproject" and a leaf of a projected param that it cannot rotate (not
      float, a field of unknown kind, not the low-rank shape); the message names the field
      and the leaf.
  """
  out = []
  owners = _state_owners(inner, inner_state, params_def)
  for x, owned in zip(jax.tree.leaves(inner_state), owners):
    p = None if owned is None else plans[owned[0]]
    if p is None:
      out.append(None)
      continue
    i, field = owned
    if policy == "reset":
      out.append((i, "reset"))
      continue
    where = f"galore: moment_policy='reproject': inner state field {field!r} of {p.path}"
    low = (*p.batch_shape, *_low_rank_shape(p))
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{where} is {x.dtype} (e.g. 8-bit moments), not float: use 'keep' "
                       "or 'reset'")
    if field not in LINEAR_FIELDS + SQUARED_FIELDS:
      raise ValueError(f"{where} is neither a first moment {LINEAR_FIELDS} nor a second "
                       f"moment {SQUARED_FIELDS}: use 'keep' or 'reset'")
    if tuple(np.shape(x)) != low:
      raise ValueError(f"{where} has shape {tuple(np.shape(x))}, not the low-rank {low}")
    out.append((i, "squared" if field in SQUARED_FIELDS else "linear"))
  return out


def _apply_moment_policy(inner_state, fresh, actions, plans, old_proj, new_proj, refreshed):
  """The inner state with `actions` applied to the leaves of refreshed params.

  "reset" takes the leaf from `fresh` (the inner optimizer's initial state, so 8-bit codes
  reset to the code of zero); "linear" / "squared" rotate it from the old subspace to the new.
  """
  leaves, state_def = jax.tree.flatten(inner_state)
  fresh = [None] * len(leaves) if fresh is None else jax.tree.leaves(fresh)
  out = []
  for x, x0, action in zip(leaves, fresh, actions):
    if action is None:
      out.append(x)
      continue
    i, how = action
    if how == "reset":
      new = x0
    else:
      p = plans[i]
      def one(y, old, new, side=p.side, squared=how == "squared"):
        return _reproject(y, *_rotation(old, new, side), squared=squared)
      new = _batched(one, p)(x, old_proj[i], new_proj[i]).astype(x.dtype)
    out.append(jnp.where(refreshed[i], new, x))
  return state_def.unflatten(out)


def scale_by_galore(
    inner: optax.GradientTransformation | None = None,
    *,
    scale: float = 0.25,
    settings: GaLoreSettings = GaLoreSettings(),
    low_rank_transform: optax.GradientTransformationExtraArgs | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GaLore direction: project, run `inner` in the low-rank space, project back (Alg. 2).

    R_t = P_t^T G_t,    N_t = inner(R_t),    G~_t = scale * P_t N_t

  (left projection; right and full as in the module docstring), P_t refreshed from the SVD
  of G_t every `settings.update_proj_gap` steps.

  Args:
    inner: any optax transform; it sees low-rank fp32 gradients for projected leaves and
      fp32 full gradients for the others, and no params (weight decay belongs outside, in
      the full space: see `galore`). Default: `scale_by_adam_torch()` (the official AdamW).
    scale: alpha; the back-projected update of projected leaves is multiplied by it. A
      number or a traced scalar.
    settings: rank, refresh gap, projection type, which leaves, projector and moment
      policy; see `GaLoreSettings`.
    low_rank_transform: applied to the projected leaves' low-rank gradients before `inner`
      (non-projected leaves are None in its trees); it gets `refreshed` (a tree of bool
      scalars) as an extra argument. Natural GaLore uses it.

  Returns:
    A `GradientTransformationExtraArgs` with state `GaLoreState`. Like optax's transforms it
    passes a non-finite gradient on; wrap the optimizer in `zojax.optim.skip_nonfinite` (as
    `zojax.train` does) to skip such steps with the state, SVD-failure count included, kept.
  """
  s = _check_settings("scale_by_galore", settings)
  inner = optax.with_extra_args_support(scale_by_adam_torch() if inner is None else inner)
  lrt = None if low_rank_transform is None else optax.with_extra_args_support(low_rank_transform)

  def low_rank_inputs(plan, updates):
    """Gradients as the inner optimizer sees them: fp32, low-rank where projected."""
    def one(p, g):
      if p is None:
        return jnp.zeros(np.shape(g), jnp.float32)
      return jnp.zeros((*p.batch_shape, *_low_rank_shape(p)), jnp.float32)
    return jax.tree.map(one, plan, updates, is_leaf=_is_plan_leaf)

  def only_projected(plan, tree):
    return jax.tree.map(lambda p, x: None if p is None else x, plan, tree, is_leaf=_is_plan_leaf)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    if _is_placeholder(params):
      # optax.tree_map_params' placeholder: the projectors and the inner and low-rank state
      # are the params', so state shardings can follow the params' (zojax.train.sharding).
      return GaLoreState(count=zero, projectors=GaLoreProjectors(left=params, right=params),
                         inner_state=inner.init(params),
                         low_rank_state=() if lrt is None else lrt.init(params),
                         svd_failures=zero)
    plan = make_plan(params, s)
    plans, treedef = jax.tree.leaves(plan, is_leaf=_is_plan_leaf), jax.tree.structure(params)
    proxies = low_rank_inputs(plan, params)
    inner_state = inner.init(proxies)
    if s.moment_policy == "reproject":  # fail at init, not at the first refresh
      _refresh_actions(inner, inner_state, treedef, plans, s.moment_policy)
    projectors = _projectors(treedef, [None if p is None else _initial_projector(p)
                                       for p in plans])
    low_rank_state = () if lrt is None else lrt.init(only_projected(plan, proxies))
    return GaLoreState(count=zero, projectors=projectors, inner_state=inner_state,
                       low_rank_state=low_rank_state, svd_failures=zero)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    plan = make_plan(updates, s)
    plans = jax.tree.leaves(plan, is_leaf=_is_plan_leaf)
    grads = jax.tree.leaves(updates)
    treedef = jax.tree.structure(updates)
    old_proj = _projector_dicts(treedef, state.projectors)
    count = state.count
    projected_index = [i for i, p in enumerate(plans) if p is not None]

    new_proj, low, refreshed, failures = [], [], [], jnp.zeros([], jnp.int32)
    base_key = jax.random.fold_in(jax.random.key(s.seed), count)
    for i, (p, g, old) in enumerate(zip(plans, grads, old_proj)):
      if p is None:
        new_proj.append(None)
        low.append(g.astype(jnp.float32))
        refreshed.append(jnp.zeros([], bool))
        continue
      g_m = _to_matrix(g, p)
      # LAPACK's SVD can loop forever on inf/NaN input (it did, on CPU): decompose zeros
      # instead. The step's updates stay non-finite, so `skip_nonfinite` still skips it.
      g_svd = jnp.where(jnp.all(jnp.isfinite(g_m)), g_m, jnp.zeros_like(g_m))
      do = _refresh_mask(count, s.update_proj_gap, projected_index.index(i),
                         len(projected_index), s.stagger)

      def refresh(g_m=g_svd, old=old, p=p, i=i):
        def one(g2, old2, key):
          if s.projector == "svd":
            cand = _exact_projector(g2, p.side, p.rank)
          else:
            cand = _randomized_projector(g2, old2, key, p.side, p.rank, s.power_iters,
                                         s.oversample)
          ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(c)) for c in cand.values()]))
          return jax.tree.map(lambda c, o: jnp.where(ok, c, o), cand, old2), ~ok
        nb = math.prod(p.batch_shape)
        keys = jax.random.split(jax.random.fold_in(base_key, i), max(nb, 1))
        keys = keys.reshape(*p.batch_shape, *keys.shape[1:]) if p.batch_shape else keys[0]
        proj, bad = _batched_decomposition(one, p)(g_m, old, keys)
        return proj, jnp.sum(bad.astype(jnp.int32))

      proj, bad = jax.lax.cond(do, refresh, lambda old=old: (old, jnp.zeros([], jnp.int32)))
      failures = failures + bad
      new_proj.append(proj)
      refreshed.append(do)
      low.append(_project(g_m, proj, p, s.implementation))

    inner_state = state.inner_state
    if s.moment_policy != "keep":
      actions = _refresh_actions(inner, inner_state, treedef, plans, s.moment_policy)
      fresh = inner.init(low_rank_inputs(plan, updates)) if s.moment_policy == "reset" else None
      inner_state = _apply_moment_policy(inner_state, fresh, actions, plans, old_proj, new_proj,
                                         refreshed)
    low_tree = treedef.unflatten(low)
    lrt_state = state.low_rank_state
    if lrt is not None:
      sub, lrt_state = lrt.update(only_projected(plan, low_tree), lrt_state, None,
                                  refreshed=only_projected(plan, treedef.unflatten(refreshed)))
      low_tree = jax.tree.map(lambda p, x, y: x if p is None else y, plan, low_tree, sub,
                              is_leaf=_is_plan_leaf)
    directions, inner_state = inner.update(low_tree, inner_state, None)

    out = []
    for p, d, g, proj in zip(plans, treedef.flatten_up_to(directions), grads, new_proj):
      if p is None:
        out.append(d.astype(g.dtype))
        continue
      out.append(_from_matrix(_project_back(d, proj, p, scale, s.implementation), p, g.dtype))

    new_state = GaLoreState(
        count=count + 1, projectors=_projectors(treedef, new_proj), inner_state=inner_state,
        low_rank_state=lrt_state, svd_failures=state.svd_failures + failures)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------
# Inner optimizer with the official eps convention, and the aliases


def scale_by_adam_torch(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
                        ) -> optax.GradientTransformation:
  """Adam as galore-torch's AdamW (and Hugging Face's) computes it: eps outside the uncorrected sqrt.

    u_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

  which is optax's `scale_by_adam` with eps_t = eps / sqrt(1 - b2^t). State is optax's
  `ScaleByAdamState` (fp32 moments).
  """
  def init_fn(params):
    zeros = lambda p: jnp.zeros(np.shape(p), jnp.float32)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      state.nu, updates)
    t = count.astype(jnp.float32)
    step = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    out = jax.tree.map(lambda m, v, g: (step * m / (jnp.sqrt(v) + eps)).astype(g.dtype),
                       mu, nu, updates)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def galore_chain(direction: optax.GradientTransformation, learning_rate, weight_decay, mask
                 ) -> optax.GradientTransformationExtraArgs:
  """`direction`, then decoupled weight decay in the full space, then the learning rate."""
  return optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def galore(
    learning_rate: optax.ScalarOrSchedule,
    inner: optax.GradientTransformation | None = None,
    *,
    weight_decay: float = 0.0,
    scale: float = 0.25,
    settings: GaLoreSettings = GaLoreSettings(),
) -> optax.GradientTransformationExtraArgs:
  """GaLore around `inner`, with decoupled weight decay in the full space and the learning rate.

  `optax.chain(scale_by_galore(inner, scale=scale, settings=settings),
  add_decayed_weights(weight_decay, settings.mask), scale_by_learning_rate(learning_rate))`:
  projected leaves move by lr * scale * direction, the others by lr * direction. `inner`
  should be scale-only (no learning rate).

  Args:
    learning_rate: a number or a schedule.
    inner: see `scale_by_galore`.
    weight_decay: decoupled, on the leaves `settings.mask` selects.
    scale: alpha, see `scale_by_galore`.
    settings: see `GaLoreSettings`.

  Returns:
    A `GradientTransformationExtraArgs`.
  """
  direction = scale_by_galore(inner, scale=scale, settings=settings)
  return galore_chain(direction, learning_rate, weight_decay, settings.mask)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    scale: float = 0.25,
    settings: GaLoreSettings = GaLoreSettings(),
    eps_convention: str = "torch",
) -> optax.GradientTransformationExtraArgs:
  """GaLore-AdamW (Zhao et al., 2024, Alg. 2), the official `GaLoreAdamW`.

    W_t = W_{t-1} - lr * (scale * P_t Adam(P_t^T G_t) + weight_decay * W_{t-1})

  for projected leaves (P_t as in `scale_by_galore`); the others train by plain AdamW.
  Defaults follow galore-torch: eps 1e-6 added outside the uncorrected sqrt
  (`eps_convention="torch"`; "optax" puts it after bias correction), no weight decay. The
  paper: lr 0.01, scale 0.25, T 200, rank 128/256/256/512 for 60M/130M/350M/1B. Weight decay
  is decoupled and applied in the full space on the pre-update params (optax's convention;
  torch applies it after the Adam step, a difference of order lr^2 * wd).

  Args:
    learning_rate: a number or a schedule.
    b1, b2, eps: Adam's; numbers or traced scalars.
    weight_decay: decoupled, on the leaves `settings.mask` selects.
    scale: alpha, the projected leaves' factor on the learning rate.
    settings: see `GaLoreSettings`.
    eps_convention: "torch" or "optax".

  Returns:
    A `GradientTransformationExtraArgs`.

  Example:
    >>> tx = galore_adamw(1e-2, settings=GaLoreSettings(rank=128, update_proj_gap=200))
  """
  if eps_convention == "torch":
    inner = scale_by_adam_torch(b1=b1, b2=b2, eps=eps)
  elif eps_convention == "optax":
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32)
  else:
    raise ValueError(f"galore_adamw: eps_convention={eps_convention!r} is not 'torch' or 'optax'")
  return galore(learning_rate, inner, weight_decay=weight_decay, scale=scale, settings=settings)


def galore8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    scale: float = 0.25,
    settings: GaLoreSettings = GaLoreSettings(),
) -> optax.GradientTransformationExtraArgs:
  """8-bit GaLore (the official `GaLoreAdamW8bit`): GaLore around `scale_by_adam8bit`.

    W_t = W_{t-1} - lr * (scale * P_t Adam8bit(P_t^T G_t) + weight_decay * W_{t-1})

  Low-rank moments (and the full-rank ones of large non-projected leaves) are stored as
  blockwise 8-bit codes (`settings.block_size`, `settings.min_8bit_size`); eps 1e-8 as
  bitsandbytes. `moment_policy="reproject"` is not available (the moments are codes): use
  "keep" or "reset".

  Args:
    learning_rate, b1, b2, eps, weight_decay, scale, settings: as `galore_adamw`.

  Returns:
    A `GradientTransformationExtraArgs`.
  """
  settings = _check_settings("galore8bit", settings)
  if settings.moment_policy == "reproject":
    raise ValueError("galore8bit: settings.moment_policy='reproject' cannot rotate 8-bit "
                     "moments; use 'keep' or 'reset'")
  inner = scale_by_adam8bit(b1=b1, b2=b2, eps=eps, settings=settings.adam8bit())
  return galore(learning_rate, inner, weight_decay=weight_decay, scale=scale, settings=settings)
