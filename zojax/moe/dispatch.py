"""Routed SwiGLU experts: dropless (sorted + `jax.lax.ragged_dot`), capacity, dense reference,
and expert parallelism (capacity buffers exchanged with `all_to_all` under `shard_map`).

Expert weights are stacked on a leading expert axis: w_gate [E, D, F], w_up [E, D, F],
w_down [E, F, D]; expert i computes ``(silu(x @ w_gate[i]) * (x @ w_up[i])) @ w_down[i]``.
A token's output is the gate-weighted sum of its K experts' outputs. Matmuls run in the
dtype of x (weights are cast to it); gates and the final weighted sum are float32.

The three single-device methods agree whenever nothing is dropped (tested, values and
gradients). The sum over the K slots always runs slot 0, 1, ..., K-1 on outputs put back
in (token, slot) order, so a token's result cannot depend on how assignments were sorted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from zojax.errors import ConfigError
from zojax.moe.routing import Routing, _check_k

METHODS = ("dropless", "capacity", "dense")


def expert_capacity(num_tokens: int, k: int, num_experts: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ``ceil(capacity_factor * T * K / E)`` (at least 1)."""
  if not capacity_factor > 0:
    raise ConfigError(f"capacity_factor={capacity_factor} must be > 0")
  return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def _cast(x_TxD, *ws):
  return tuple(w.astype(x_TxD.dtype) for w in ws)


def _expert_stack(buf_ExCxD, w_gate, w_up, w_down):
  """Every expert on its own [C, D] buffer: [E, C, D] -> [E, C, D] (batched einsum)."""
  h = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ExCxD, w_gate))
       * jnp.einsum("ecd,edf->ecf", buf_ExCxD, w_up))
  return jnp.einsum("ecf,efd->ecd", h, w_down)


def _combine(out_TxKxD, gates_TxK, dtype):
  """sum_k gates[:, k] * out[:, k] in float32, slot 0 first: a fixed order per token."""
  g_TxK = gates_TxK.astype(jnp.float32)
  y_TxD = g_TxK[:, 0, None] * out_TxKxD[:, 0].astype(jnp.float32)
  for slot in range(1, out_TxKxD.shape[1]):
    y_TxD = y_TxD + g_TxK[:, slot, None] * out_TxKxD[:, slot].astype(jnp.float32)
  return y_TxD.astype(dtype)


def _sort_by_expert(experts_TxK, num_experts):
  """Assignments (token-major, then slot) stably sorted by expert: order, group sizes, rank."""
  flat_A = experts_TxK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  sizes_E = jnp.bincount(flat_A, length=num_experts).astype(jnp.int32)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  # Rank of each assignment among those to its expert; stable sort => earlier tokens first.
  rank_sorted = jnp.arange(flat_A.shape[0], dtype=jnp.int32) - starts_E[flat_A[order_A]]
  rank_A = jnp.zeros_like(rank_sorted).at[order_A].set(rank_sorted)
  return flat_A, order_A, sizes_E, rank_A


def _dropless(x_TxD, routing, w_gate, w_up, w_down):
  T, K = routing.experts.shape
  _, order_A, sizes_E, _ = _sort_by_expert(routing.experts, w_gate.shape[0])
  xs_AxD = x_TxD[order_A // K]
  h_AxF = (jax.nn.silu(jax.lax.ragged_dot(xs_AxD, w_gate, sizes_E))
           * jax.lax.ragged_dot(xs_AxD, w_up, sizes_E))
  out_sorted = jax.lax.ragged_dot(h_AxF, w_down, sizes_E)
  inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(T * K, dtype=order_A.dtype))
  return out_sorted[inverse_A].reshape(T, K, -1)


def _slots(experts_TxK, num_experts, capacity):
  """Flat buffer slot (expert * C + rank) of each assignment; E * C (out of range) if dropped."""
  flat_A, _, _, rank_A = _sort_by_expert(experts_TxK, num_experts)
  keep_A = rank_A < capacity
  return jnp.where(keep_A, flat_A * capacity + rank_A, num_experts * capacity), keep_A


def _to_buffers(x_TxD, slot_A, k, num_experts, capacity):
  """Scatter each kept assignment's token into its expert's buffer: [E, C, D]."""
  buf = jnp.zeros((num_experts * capacity, x_TxD.shape[-1]), x_TxD.dtype)
  buf = buf.at[slot_A].add(jnp.repeat(x_TxD, k, axis=0), mode="drop")
  return buf.reshape(num_experts, capacity, -1)


def _from_buffers(out_ExCxD, slot_A, num_tokens, k):
  """Gather each assignment's output back to (token, slot) order; dropped ones read 0."""
  flat = out_ExCxD.reshape(-1, out_ExCxD.shape[-1])
  return flat.at[slot_A].get(mode="fill", fill_value=0).reshape(num_tokens, k, -1)


def _dropped(keep_A, k, weights_T):
  lost_A = (~keep_A).astype(jnp.float32)
  if weights_T is not None:
    lost_A = lost_A * jnp.repeat(weights_T.astype(jnp.float32), k)
  return lost_A.sum()


def _capacity(x_TxD, routing, w_gate, w_up, w_down, capacity, weights_T):
  T, K = routing.experts.shape
  E = w_gate.shape[0]
  slot_A, keep_A = _slots(routing.experts, E, capacity)
  out_ExCxD = _expert_stack(_to_buffers(x_TxD, slot_A, K, E, capacity), w_gate, w_up, w_down)
  return _from_buffers(out_ExCxD, slot_A, T, K), _dropped(keep_A, K, weights_T)


def _dense(x_TxD, routing, w_gate, w_up, w_down):
  """Reference: all E experts on all T tokens, then a [T, E] gate mask (zero off the top-K)."""
  out_ExTxD = _expert_stack(jnp.broadcast_to(x_TxD, (w_gate.shape[0],) + x_TxD.shape),
                            w_gate, w_up, w_down)
  mask_TxE = jnp.einsum("tk,tke->te", routing.gates.astype(jnp.float32),
                        jax.nn.one_hot(routing.experts, w_gate.shape[0], dtype=jnp.float32))
  return jnp.einsum("te,etd->td", mask_TxE, out_ExTxD.astype(jnp.float32)).astype(x_TxD.dtype)


def _check(x_TxD, routing, w_gate, w_up, w_down):
  E, D, F = w_gate.shape
  if w_up.shape != (E, D, F) or w_down.shape != (E, F, D) or x_TxD.shape[-1] != D:
    raise ValueError(f"moe shapes: x {x_TxD.shape}, w_gate {w_gate.shape}, w_up {w_up.shape}, "
                     f"w_down {w_down.shape}; want [T, D], [E, D, F], [E, D, F], [E, F, D]")
  if routing.experts.shape != routing.gates.shape or routing.experts.shape[0] != x_TxD.shape[0]:
    raise ValueError(f"routing experts {routing.experts.shape} / gates {routing.gates.shape} "
                     f"must both be [T, K] with T = {x_TxD.shape[0]}")
  _check_k(routing.experts.shape[1], E)


def moe_ffn(x_TxD: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array,
            w_down: jax.Array, *, method: str = "dropless", capacity_factor: float = 1.0,
            weights_T: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The routed expert layer: ``y_t = sum_k gates[t, k] * expert_{experts[t, k]}(x_t)``.

  Methods:
    * ``"dropless"``: assignments sorted by expert, three `jax.lax.ragged_dot` grouped
      matmuls, outputs put back in (token, slot) order. No token is ever dropped.
    * ``"capacity"``: each expert takes at most ``C = ceil(capacity_factor * T * K / E)``
      assignments into a fixed [E, C, D] buffer; past C, later tokens are dropped first
      (earlier token positions keep their slots), and a dropped assignment contributes 0.
      Equals dropless whenever C >= the largest load.
    * ``"dense"``: every expert on every token, then masked. O(E/K) more FLOPs; for tests.

  Args:
    x_TxD: token activations; the compute dtype.
    routing: from `route` (experts [T, K], gates [T, K]).
    w_gate, w_up, w_down: stacked expert weights [E, D, F], [E, D, F], [E, F, D].
    method: one of `METHODS`.
    capacity_factor: used by ``"capacity"`` only; must be > 0.
    weights_T: optional token weights (0 = padding); only the dropped count uses them.

  Returns:
    ``(y [T, D] in x's dtype, stats)``; ``stats["dropped"]`` is the number of dropped
    token-assignments (float32; 0 for dropless and dense).
  """
  if method not in METHODS:
    raise ConfigError(f"moe dispatch method={method!r} is not one of {METHODS}")
  _check(x_TxD, routing, w_gate, w_up, w_down)
  w_gate, w_up, w_down = _cast(x_TxD, w_gate, w_up, w_down)
  dropped = jnp.zeros((), jnp.float32)
  if method == "dropless":
    out_TxKxD = _dropless(x_TxD, routing, w_gate, w_up, w_down)
  elif method == "capacity":
    T, K = routing.experts.shape
    cap = expert_capacity(T, K, w_gate.shape[0], capacity_factor)
    out_TxKxD, dropped = _capacity(x_TxD, routing, w_gate, w_up, w_down, cap, weights_T)
  else:
    return _dense(x_TxD, routing, w_gate, w_up, w_down), {"dropped": dropped}
  return _combine(out_TxKxD, routing.gates, x_TxD.dtype), {"dropped": dropped}


def moe_ffn_expert_parallel(x_TxD: jax.Array, routing: Routing, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, *, mesh: Mesh,
                            expert_axis: str = "expert", capacity_factor: float = 1.0,
                            token_axes: tuple[str, ...] | None = None,
                            weights_T: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """`moe_ffn(method="capacity")` with experts sharded over ``expert_axis`` of ``mesh``.

  Tokens are sharded over ``token_axes`` (default: every mesh axis; must include
  ``expert_axis``), experts over ``expert_axis`` (replicated over the others). Under
  `jax.shard_map` each device routes its T_local tokens into capacity buffers
  [E, C, D] with ``C = ceil(capacity_factor * T_local * K / E)``, one `all_to_all` sends
  each expert's buffer to the device that holds it, the local experts run, and a second
  `all_to_all` brings the outputs back. Shapes are static; per device each all-to-all moves
  ``E * C * D`` elements. Capacity (and so dropping) is per source shard: the result equals
  `moe_ffn(method="capacity")` run on each token shard separately, and equals the one-device
  dropless result whenever no shard overflows (``capacity_factor >= E / K`` guarantees it).

  Returns:
    ``(y [T, D], stats)`` like `moe_ffn`; ``stats["dropped"]`` is summed over all shards.
  """
  _check(x_TxD, routing, w_gate, w_up, w_down)
  token_axes = tuple(mesh.axis_names) if token_axes is None else tuple(token_axes)
  if expert_axis not in mesh.axis_names or expert_axis not in token_axes:
    raise ConfigError(f"expert_axis={expert_axis!r} must be a mesh axis {mesh.axis_names} "
                      f"that also shards the tokens (token_axes={token_axes})")
  T, K = routing.experts.shape
  E = w_gate.shape[0]
  n_exp = mesh.shape[expert_axis]
  if E % n_exp:
    raise ConfigError(f"num_experts={E} is not divisible by the {expert_axis!r} mesh axis "
                      f"size {n_exp}")
  n_tok = math.prod(mesh.shape[a] for a in token_axes)
  if T % n_tok:
    raise ConfigError(f"tokens T={T} are not divisible by the token mesh axes {token_axes} "
                      f"({n_tok} devices)")
  cap = expert_capacity(T // n_tok, K, E, capacity_factor)
  w_gate, w_up, w_down = _cast(x_TxD, w_gate, w_up, w_down)
  if weights_T is None:
    weights_T = jnp.ones((T,), jnp.float32)

  def local(x, experts, gates, wg, wu, wd, w):
    t_local = x.shape[0]
    slot_A, keep_A = _slots(experts, E, cap)
    send = _to_buffers(x, slot_A, K, E, cap).reshape(n_exp, E // n_exp, cap, -1)
    # [dest shard, local expert, C, D] -> [source shard, local expert, C, D]
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0)
    batch = jnp.swapaxes(recv, 0, 1).reshape(E // n_exp, n_exp * cap, -1)
    out = _expert_stack(batch, wg, wu, wd).reshape(E // n_exp, n_exp, cap, -1)
    back = jax.lax.all_to_all(jnp.swapaxes(out, 0, 1), expert_axis, 0, 0)
    out_TxKxD = _from_buffers(back.reshape(E, cap, -1), slot_A, t_local, K)
    dropped = jax.lax.psum(_dropped(keep_A, K, w), token_axes)
    return _combine(out_TxKxD, gates, x.dtype), dropped

  tok, w_spec = P(token_axes), P(expert_axis)
  y, dropped = jax.shard_map(
      local, mesh=mesh, in_specs=(tok, tok, tok, w_spec, w_spec, w_spec, tok),
      out_specs=(tok, P()))(x_TxD, routing.experts, routing.gates, w_gate, w_up, w_down,
                            weights_T)
  return y, {"dropped": dropped}


__all__ = ["METHODS", "expert_capacity", "moe_ffn", "moe_ffn_expert_parallel"]
