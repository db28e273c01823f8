"""ZO2 streaming: block parameters rest in host memory and visit the accelerator one at a time.

ZO2 (Wang et al. 2025) fine-tunes models larger than accelerator memory with zeroth-order
SGD: a ZO step needs no activations, gradients or optimizer state on device, so only the
block being computed has to be there. This module is that engine in JAX:

  * **Pure functions over a frozen config.** `StreamConfig` holds the model, the optimizer
    and every setting; `init`, `step` and `flush` are pure functions of it, jittable by a
    user (``jax.jit(functools.partial(stream.step, config))``). `StreamEngine` holds one
    config and its jitted functions, and places and compiles them.
  * **Placement.** Block parameters (the float32 master copy) and their optimizer state rest
    in host memory (``pinned_host`` memory kind); embeddings and head stay on device, and the
    first ``resident_blocks`` blocks stay on device too.
  * **The step.** A `lax.scan` over the streamed blocks. The carry double-buffers the
    blocks: iteration l computes block l while ``device_put`` brings block l+1 in (the copy
    depends only on the host arrays, never on block l's compute, so the scheduler overlaps
    them; `zojax.zo.inspect.transfer_overlaps` checks this on the jaxpr). Inside the
    iteration, block l first gets the **previous** step's update (ZO2's fused update: the
    weights are on device anyway, and z is regenerated from the perturbation stream), then
    both SPSA branches run through it (`zojax.zo.spsa.block_branches`), then it is written
    back to host in place.
  * **Pending update.** After step t the blocks hold θ_t and the estimate ĝ_t is pending; the
    embed/head (on device) are already at θ_{t+1}. `flush` applies the pending update;
    `StreamEngine.params` always returns flushed weights, so evaluation and checkpoints never
    see stale ones.
  * **The optimizer** is a plain `zojax.optim.zo_sgd` / `zo_adam` / `zo_sign` (any
    `zojax.optim.zo.ZOOptimizer`), the very transform the dense engine runs: the engine
    calls it once per group (each layer, embed+head) with that group's slice of the state,
    passing ``zo_estimate`` so the direction is formed from the group's own z. Non-finite
    steps are skipped by the optimizer's `zojax.optim.skip_nonfinite`.
  * **Estimator options** as in `zojax.zo.spsa`: ``num_samples``; ``one_sided`` (c_i =
    (L(θ+εz_i) − L(θ))/ε, L(θ) from a scale-0 branch, θ + 0·z being θ exactly);
    ``microbatches`` (batch chunks, same z, losses combined by loss_sum/count). First step
    bit-identical to `spsa` with the same options (tested).

The same engine runs on a `jax.sharding.Mesh` with axes ``("pert", "data")``
(`zojax.zo.parallel` builds the `Layout`): the step's work is cut into *units*, one group of
``branch_group`` SPSA branches on one of the ``microbatches`` batch chunks, and units are
spread over the mesh. The decomposition is part of the config, never derived from the mesh:
each unit's computation has the same shapes whatever the mesh, and the unit losses are
all-gathered and combined in a fixed order, so one config gives one trajectory on every mesh
its decomposition fits (checked in one line). With ``slice_blocks`` each device keeps and
moves only 1/N of every block and all-gathers it on device (DistZO2's sliced streaming); the
update of a slice draws only that slice's z (threefry is partitionable), so z never crosses
devices.

Equivalence with the dense engine (`zojax.zo.spsa` + `zojax.zo.make_apply`). The forward is
built from the same stage functions (`embed_branches`, `block_branches`, `head_branches`)
with the same shapes, and the group update is the dense transform itself. The first step's
loss, coefficients and update are bit-identical to the dense engine's (tested). Later steps
agree to a tolerance, not bit for bit: XLA compiles the same float expression differently
depending on the program around it (multiply-add contraction, fusion, reduction order), and
the streamed scan body is a different program, so a loss can differ by 1 ulp; the finite
difference (L+ − L−)/2ε turns that into ~1e-4 relative in c_i, and the runs drift slowly
apart (tests/zo/test_stream.py states the bounds measured over 20 steps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zojax.models import protocol
from zojax.optim import zo as zo_optim
from zojax.zo import perturb
from zojax.zo.inspect import HOST_KINDS, nbytes
from zojax.zo.spsa import (ZOGrad, _check_count, _check_eps, block_branches, embed_branches,
                           group_estimate, head_branches)

PERT, DATA = "pert", "data"


# ---------------------------------------------------------------------------------------
# Layout and config


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh with axes ("pert", "data") and whether blocks rest sliced over it.

  Placement only: units (`StreamConfig.branch_group`, `StreamConfig.microbatches`) go to
  "pert" (branch groups) and "data" (batch chunks), and the numbers never depend on the mesh.
  """

  mesh: Mesh
  slice_blocks: bool = False

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def pert(self) -> int:
    return self.mesh.shape[PERT]

  @property
  def data(self) -> int:
    return self.mesh.shape[DATA]


def single_device_layout(device=None) -> Layout:
  device = device or jax.devices()[0]
  mesh = Mesh(np.array([[device]]), (PERT, DATA),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return Layout(mesh)


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """Everything a streamed ZO step depends on (frozen and hashable: a static jit argument).

  Attributes:
    model: the model's `BlockModel`.
    update: a `zojax.optim.zo.ZOOptimizer` (`zo_sgd`, `zo_adam`, `zo_sign`, `zo_optimizer`).
    eps: ε > 0.
    num_samples: n >= 1 perturbation directions.
    one_sided: forward differences against the unperturbed loss.
    microbatches: k >= 1 batch chunks (same z; losses combined as in `zojax.zo.spsa`); the
      mesh's data axis must divide it.
    branch_group: SPSA branches per unit: 2 (sample i's +ε and −ε together, z drawn once for
      both) or 1; the mesh's pert axis must divide the branch groups.
    resident_blocks: blocks kept on device (the first ones).
    memory_kind: where the other blocks rest: "pinned_host" or "unpinned_host".
    layout: the mesh and slicing (`zojax.zo.parallel.make_layout`); None: one device.
    direction: the distribution of z, "gaussian" or "rademacher" (`zojax.zo.spsa`).
    block_view: for a model with state (`zojax.models.Model`): ``model_state -> BlockModel``;
      the step runs ``block_view(state.model_state)`` instead of `model`.
    update_state: ``(model_state, aux, step) -> model_state`` after each step, where aux is
      the head's metric sums at θ + εz_0 (sample 0's + branch, summed over the chunks) as
      in the dense engine; a non-finite step keeps the state.
  """

  model: protocol.BlockModel
  update: optax.GradientTransformationExtraArgs
  eps: float = 1e-3
  num_samples: int = 1
  one_sided: bool = False
  microbatches: int = 1
  branch_group: int = 2
  resident_blocks: int = 0
  memory_kind: str = "pinned_host"
  layout: Layout | None = None
  direction: str = "gaussian"
  block_view: Any = None
  update_state: Any = None

  def __post_init__(self):
    if not isinstance(self.update, zo_optim.ZOOptimizer):
      raise ValueError(
          f"update must be a zojax.optim.zo.ZOOptimizer as built (zo_sgd, zo_adam, zo_sign, "
          f"zo_optimizer), got {type(self.update).__name__}: wrappers such as "
          "optax.inject_hyperparams or optax.chain, and tree masks, hide whether it may "
          "update one layer at a time (give learning_rate a schedule instead)")
    _check_eps(self.eps)
    _check_count("num_samples", self.num_samples)
    _check_count("microbatches", self.microbatches)
    perturb.check_direction(self.direction)
    _check_count("resident_blocks", self.resident_blocks, minimum=0)
    if self.branch_group not in (1, 2) or isinstance(self.branch_group, bool):
      raise ValueError(f"branch_group={self.branch_group!r} must be 1 or 2")
    set_ = functools.partial(object.__setattr__, self)
    set_("eps", float(self.eps))
    set_("one_sided", bool(self.one_sided))
    for name in ("num_samples", "microbatches", "branch_group", "resident_blocks"):
      set_(name, int(getattr(self, name)))
    if self.layout is None:
      set_("layout", single_device_layout())
    _check_layout(self)
    _check_memory_kind(self.layout.mesh, self.memory_kind)

  @property
  def mesh(self) -> Mesh:
    return self.layout.mesh

  def model_at(self, model_state) -> protocol.BlockModel:
    """The block view the step runs: `model`, or `block_view(model_state)` with state."""
    return self.model if self.block_view is None else self.block_view(model_state)

  @property
  def num_branches(self) -> int:
    """Forward branches per step: ±ε per sample, or +ε per sample and one unperturbed."""
    if self.one_sided and self.branch_group == 1:
      return self.num_samples + 1
    return 2 * self.num_samples


def _check_layout(cfg: StreamConfig) -> None:
  layout = cfg.layout
  if tuple(layout.mesh.axis_names) != (PERT, DATA):
    raise ValueError(f"layout mesh axes {tuple(layout.mesh.axis_names)} must be "
                     "('pert', 'data')")
  what = ("num_samples + 1 (one-sided)" if cfg.one_sided and cfg.branch_group == 1
          else "2 x num_samples")
  branches = cfg.num_branches
  if layout.pert > branches:
    raise ValueError(f"mesh pert axis size {layout.pert} is larger than {what} = "
                     f"{branches} (there are only {branches} SPSA branches to spread)")
  groups = branches // cfg.branch_group
  if groups % layout.pert:
    raise ValueError(f"mesh pert axis size {layout.pert} must divide the {groups} branch "
                     f"groups ({what} with num_samples={cfg.num_samples}, branch_group="
                     f"{cfg.branch_group})")
  if cfg.microbatches % layout.data:
    raise ValueError(f"mesh data axis size {layout.data} must divide microbatches="
                     f"{cfg.microbatches} (the batch chunks spread over it)")


def _check_memory_kind(mesh: Mesh, memory_kind: str) -> None:
  device = mesh.devices.flat[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if memory_kind not in kinds or memory_kind not in HOST_KINDS:
    raise ValueError(f"memory_kind={memory_kind!r} is not a host memory kind this backend "
                     f"({device.platform}) supports; it has {kinds}")


# ---------------------------------------------------------------------------------------
# Shardings


def slice_axis(shape, num: int) -> int | None:
  """The axis a leaf is sliced on for `num` devices: its first axis divisible by num."""
  if num == 1:
    return None
  for axis, size in enumerate(shape):
    if size % num == 0:
      return axis
  return None  # no divisible axis: every device keeps the whole (small) leaf


def _leaf_spec(shape, num: int, stacked: bool) -> P:
  axis = slice_axis(shape, num)
  lead = (None,) if stacked else ()
  if axis is None:
    return P(*lead)
  return P(*lead, *([None] * axis), (PERT, DATA))


def _is_spec(x):
  return isinstance(x, P)


def _spec_axis(spec: P) -> int:
  return next(i for i, s in enumerate(spec) if s is not None)


def _unstack(shardings):
  """Sharding of one layer from the sharding of the stacked [L, ...] leaf."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:]), memory_kind=s.memory_kind),
                      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _sharding(cfg: StreamConfig, spec: P, kind: str = "device") -> NamedSharding:
  return NamedSharding(cfg.mesh, spec, memory_kind=kind)


def _streamed_specs(cfg: StreamConfig, tree, stacked=True):
  """Per-leaf specs of streamed blocks (or their optimizer state): sliced or replicated."""
  n = cfg.layout.num_devices if cfg.layout.slice_blocks else 1
  return jax.tree.map(lambda a: _leaf_spec(a.shape[1:] if stacked else a.shape, n, stacked),
                      tree)


def _streamed_shardings(cfg: StreamConfig, tree, kind: str = "device", stacked=True):
  return jax.tree.map(lambda s: _sharding(cfg, s, kind), _streamed_specs(cfg, tree, stacked),
                      is_leaf=_is_spec)


# ---------------------------------------------------------------------------------------
# State


class StreamState(NamedTuple):
  """Everything a streamed ZO run carries from step to step (all plain arrays)."""

  step: jax.Array        # int32 []: steps taken
  key: jax.Array         # uint32 [4]: the perturbation stream's base key data
  outer: Any             # {"embed", "head"} on device, always current (θ_t after t steps)
  outer_opt: Any         # their optimizer state
  resident: Any          # stacked blocks [R, ...] kept on device
  resident_opt: Any      # their per-layer optimizer state (a leading [R] axis)
  blocks: Any            # stacked blocks [L - R, ...] in host memory (fp32 master)
  blocks_opt: Any        # their per-layer optimizer state, in host memory
  pending: ZOGrad        # the last step's estimate, not yet applied to the blocks
  has_pending: jax.Array  # bool []
  skipped: jax.Array     # int32 []: steps whose estimate was not finite (counted at once)
  model_state: Any = {}  # the model's non-trainable state ({} without), on device


def state_shardings(cfg: StreamConfig, state_like: StreamState) -> StreamState:
  """Shardings (with memory kinds) of every state leaf."""
  rep = _sharding(cfg, P())
  replicated = lambda tree: jax.tree.map(lambda _: rep, tree)
  host = lambda tree: _streamed_shardings(cfg, tree, cfg.memory_kind)
  return StreamState(
      step=rep, key=rep, outer=replicated(state_like.outer),
      outer_opt=replicated(state_like.outer_opt), resident=replicated(state_like.resident),
      resident_opt=replicated(state_like.resident_opt), blocks=host(state_like.blocks),
      blocks_opt=host(state_like.blocks_opt), pending=replicated(state_like.pending),
      has_pending=rep, skipped=rep, model_state=replicated(state_like.model_state))


def batch_sharding(cfg: StreamConfig, batch_like=None):
  """Batches are split over "data" on their leading axis."""
  sh = _sharding(cfg, P(DATA))
  return sh if batch_like is None else jax.tree.map(lambda _: sh, batch_like)


def init(cfg: StreamConfig, params, key, model_state=None) -> StreamState:
  """The initial state (unplaced; `StreamEngine.init` places it).

  Args:
    cfg: the config.
    params: a block-protocol tree {"embed", "blocks", "head"}.
    key: the run's base key (typed or raw data).
    model_state: the model's initial state (with `StreamConfig.block_view`), else None.
  """
  if not perturb.is_block_tree(params):
    raise ValueError("params must be a block-protocol tree {'embed', 'blocks', 'head'}")
  num_layers, _ = perturb.unstacked_like(params["blocks"])
  if cfg.resident_blocks > num_layers:
    raise ValueError(f"resident_blocks={cfg.resident_blocks} is more than the model's "
                     f"{num_layers} blocks")
  outer = {k: v for k, v in params.items() if k != "blocks"}
  r = cfg.resident_blocks
  resident = jax.tree.map(lambda a: a[:r], params["blocks"])
  blocks = jax.tree.map(lambda a: a[r:], params["blocks"])
  per_layer_init = jax.vmap(cfg.update.init)
  kdata = perturb.key_data(key)
  return StreamState(
      step=jnp.zeros([], jnp.int32), key=kdata, outer=outer,
      outer_opt=cfg.update.init(outer), resident=resident,
      resident_opt=per_layer_init(resident), blocks=blocks, blocks_opt=per_layer_init(blocks),
      pending=ZOGrad(key=kdata, step=jnp.zeros([], jnp.int32),
                     coeffs=jnp.zeros([cfg.num_samples], jnp.float32),
                     finite=jnp.ones([], bool), direction=cfg.direction),
      has_pending=jnp.zeros([], bool), skipped=jnp.zeros([], jnp.int32),
      model_state={} if model_state is None else model_state)


# ---------------------------------------------------------------------------------------
# The forward, unit by unit


def _units(cfg: StreamConfig, step, key):
  """Per branch group u: its stream key data [U, 4] and scales [U, g].

  Two-sided: sample i's branches are +ε and −ε. One-sided: +ε for each sample and one
  unperturbed branch (scale 0, so θ + 0·z is θ exactly); with branch_group 2 every sample's
  unit carries its own scale-0 branch (all units keep one shape; n − 1 forwards more than
  the dense engine's n + 1), with branch_group 1 it is a unit of its own.
  """
  g, n = cfg.branch_group, cfg.num_samples
  eps = jnp.asarray(cfg.eps, jnp.float32)
  signs = jnp.stack([eps, jnp.zeros_like(eps) if cfg.one_sided else -eps])
  if g == 2:
    samples, scales = np.arange(n), jnp.tile(signs[None], (n, 1))
  elif cfg.one_sided:
    samples, scales = np.append(np.arange(n), 0), jnp.append(jnp.tile(eps, n), 0.0)[:, None]
  else:
    samples, scales = np.repeat(np.arange(n), 2), jnp.tile(signs, n)[:, None]
  skeys = jnp.stack([jax.random.key_data(perturb.sample_key(key, step, int(i)))
                     for i in samples])
  # Every device computes all unit keys and takes its own: without this, sharding
  # propagation splits the stack over "pert" and adds an all-to-all of key words.
  rep = _sharding(cfg, P())
  return (jax.lax.with_sharding_constraint(skeys, rep),
          jax.lax.with_sharding_constraint(scales, rep))


def _map_units(fn, per_group, per_chunk, per_unit):
  """fn(group_inputs, chunk_inputs, unit_inputs) over local units -> [G_l, C_l, ...].

  Sequential (`lax.map`) so that every unit's computation has the same shapes on every
  mesh; a single local unit is called directly.
  """
  groups = jax.tree.leaves(per_group)[0].shape[0]
  chunks = jax.tree.leaves(per_chunk)[0].shape[0]

  def one(k):
    u, c = k // chunks, k % chunks
    unit = None if per_unit is None else jax.tree.map(lambda a: a[u, c], per_unit)
    return fn(jax.tree.map(lambda a: a[u], per_group),
              jax.tree.map(lambda a: a[c], per_chunk), unit)

  if groups * chunks == 1:
    out = jax.tree.map(lambda a: a[None], one(0))
  else:
    out = jax.lax.map(one, jnp.arange(groups * chunks))
  return jax.tree.map(lambda a: a.reshape(groups, chunks, *a.shape[1:]), out)


def _shard_map(cfg: StreamConfig, fn, in_specs, out_specs, check_vma=True):
  return jax.shard_map(fn, mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=check_vma)


def _outer_tree(outer):
  return {**outer, "blocks": {}}


def _embed(cfg: StreamConfig, mstate, outer, batch_C, skeys, scales):
  def local(mstate, outer, batch_C, skeys, scales):
    def fn(group, chunk, _):
      skey, sc = group
      return embed_branches(cfg.model_at(mstate), _outer_tree(outer), chunk,
                            perturb.wrap_key(skey), sc, direction=cfg.direction)
    return _map_units(fn, (skeys, scales), batch_C, None)
  return _shard_map(cfg, local, (P(), P(), P(DATA), P(PERT), P(PERT)), P(PERT, DATA))(
      mstate, outer, batch_C, skeys, scales)


def _head(cfg: StreamConfig, mstate, outer, acts, batch_C, skeys, scales):
  def local(mstate, outer, acts, batch_C, skeys, scales):
    def fn(group, chunk, carry):
      skey, sc = group
      losses, metrics = head_branches(cfg.model_at(mstate), _outer_tree(outer), carry, chunk,
                                      perturb.wrap_key(skey), sc, direction=cfg.direction)
      out = {"loss": losses}
      if isinstance(metrics, dict) and "loss_sum" in metrics and "count" in metrics:
        out.update(loss_sum=metrics["loss_sum"], count=metrics["count"])
      if cfg.update_state is not None:  # the model state's aux: every metric sum
        out["metrics"] = metrics
      return out
    out = _map_units(fn, (skeys, scales), batch_C, acts)
    # Only these scalars cross devices: every device gets every unit's losses.
    out = jax.lax.all_gather(out, PERT, axis=0, tiled=True)
    return jax.lax.all_gather(out, DATA, axis=1, tiled=True)
  # all_gather's result is the same on every device, but shard_map's replication check
  # cannot infer that; hence check_vma=False here only.
  return _shard_map(cfg, local, (P(), P(), P(PERT, DATA), P(DATA), P(PERT), P(PERT)), P(),
                    check_vma=False)(mstate, outer, acts, batch_C, skeys, scales)


def _block_forward(cfg: StreamConfig, mstate, block, layer, acts, skeys, scales, *,
                   sliced: bool):
  specs = _streamed_specs(cfg, block, stacked=False) if sliced else \
      jax.tree.map(lambda _: P(), block)

  def local(mstate, block, layer, acts, skeys, scales):
    if sliced:  # DistZO2: each device moved 1/N of the block; gather it on device
      block = jax.tree.map(
          lambda a, s: a if s == P() else jax.lax.all_gather(
              a, (PERT, DATA), axis=_spec_axis(s), tiled=True), block, specs,
          is_leaf=lambda x: isinstance(x, jax.Array))

    def fn(group, _, carry):
      skey, sc = group
      return block_branches(cfg.model_at(mstate), block, layer, carry, perturb.wrap_key(skey),
                            sc, direction=cfg.direction)
    chunks = jax.tree.leaves(acts)[0].shape[1]
    return _map_units(fn, (skeys, scales), jnp.zeros([chunks]), acts)

  return _shard_map(cfg, local, (P(), specs, P(), P(PERT, DATA), P(PERT), P(PERT)),
                    P(PERT, DATA))(mstate, block, layer, acts, skeys, scales)


# ---------------------------------------------------------------------------------------
# The update, one group at a time


def _apply_group(cfg: StreamConfig, zograd: ZOGrad, opt_state, params, estimate, gate):
  """The optimizer on one group (its skip included), then apply_updates; `gate` False keeps
  params and state as they were.

  `estimate(zograd, like, dtype)` forms ĝ for this group: the ``zo_estimate`` extra argument
  of `zojax.optim.zo` directions.
  """
  updates, new_state = cfg.update.update(zograd, opt_state, params, zo_estimate=estimate)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(gate, n, o), new, old)
  return keep(new_params, params), keep(new_state, opt_state)


def _update_block(cfg: StreamConfig, state, block, opt, layer, *, sliced: bool):
  """The previous step's update, fused into block `layer`'s visit (gated by has_pending)."""
  constrain = None
  if sliced:  # each device draws z for its own slice only
    dev = _streamed_shardings(cfg, block, stacked=False)
    constrain = lambda z: jax.lax.with_sharding_constraint(z, dev)
  estimate = lambda zograd, like, dtype: group_estimate(zograd, layer, like, dtype=dtype,
                                                        constrain=constrain)
  block, opt = _apply_group(cfg, state.pending, opt, block, estimate, state.has_pending)
  # The forward must read the stored (rounded) weights: without the barrier XLA fuses the
  # update into the perturbation and contracts a multiply-add differently (measured:
  # losses 1 ulp off the dense engine's from the second step on).
  return jax.lax.optimization_barrier((block, opt))


def _index(tree, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _set(tree, value, i):
  return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, value)


def _visit_blocks(cfg: StreamConfig, state, acts, skeys, scales, *, forward: bool):
  """Resident blocks, then the streamed ones (double-buffered); returns new blocks, acts."""
  r = cfg.resident_blocks
  sliced = cfg.layout.slice_blocks

  def resident_body(carry, l):
    resident, resident_opt, acts = carry
    block, opt = _update_block(cfg, state, _index(resident, l), _index(resident_opt, l), l,
                               sliced=False)
    if forward:
      acts = _block_forward(cfg, state.model_state, block, l, acts, skeys, scales,
                            sliced=False)
    return (_set(resident, block, l), _set(resident_opt, opt, l), acts), None

  resident, resident_opt = state.resident, state.resident_opt
  if r:
    (resident, resident_opt, acts), _ = jax.lax.scan(
        resident_body, (resident, resident_opt, acts), jnp.arange(r))

  host_blocks, host_opt = state.blocks, state.blocks_opt
  leaves = jax.tree.leaves(host_blocks)
  num_streamed = leaves[0].shape[0] if leaves else 0
  if num_streamed:
    dev_block = _unstack(_streamed_shardings(cfg, host_blocks))
    dev_opt = _unstack(_streamed_shardings(cfg, host_opt))
    host_kind = _unstack(_streamed_shardings(cfg, host_blocks, cfg.memory_kind))
    host_opt_kind = _unstack(_streamed_shardings(cfg, host_opt, cfg.memory_kind))
    fetch = lambda host, i, sh: jax.device_put(_index(host, i), sh)

    def body(carry, l):
      block, opt, acts = carry
      # Prefetch l+1 from the input host arrays (the last iteration re-reads its own block:
      # one block of waste). The updated block leaves as a scan output, written to host.
      nxt = jnp.minimum(l + 1, num_streamed - 1)
      next_block = fetch(host_blocks, nxt, dev_block)
      next_opt = fetch(host_opt, nxt, dev_opt)
      block, opt = _update_block(cfg, state, block, opt, r + l, sliced=sliced)
      if forward:
        acts = _block_forward(cfg, state.model_state, block, r + l, acts, skeys, scales,
                              sliced=sliced)
      out = (jax.device_put(block, host_kind), jax.device_put(opt, host_opt_kind))
      return (next_block, next_opt, acts), out

    first = (fetch(host_blocks, 0, dev_block), fetch(host_opt, 0, dev_opt))
    (_, _, acts), (host_blocks, host_opt) = jax.lax.scan(
        body, (*first, acts), jnp.arange(num_streamed))
  return resident, resident_opt, host_blocks, host_opt, acts


def _losses(cfg: StreamConfig, out):
  """Unit losses [U, C, g] -> (L+ [n], L− [n] or the unperturbed L [], all losses).

  Chunks combine as in the dense `spsa`: by the head's loss_sum/count sums when it returns
  them, else the mean.
  """
  n = cfg.num_samples
  if out["loss"].shape[1] == 1:
    losses = out["loss"][:, 0]
  elif "loss_sum" in out:
    losses = jnp.sum(out["loss_sum"], axis=1) / jnp.maximum(jnp.sum(out["count"], axis=1), 1.0)
  else:
    losses = jnp.mean(out["loss"], axis=1)
  if not cfg.one_sided:
    both = losses.reshape(n, 2)
    return both[:, 0], both[:, 1], both
  flat = losses.reshape(-1)
  if cfg.branch_group == 2:  # [+ε_i, 0] per sample; the 0 branches are equal
    plus, base = flat[0::2], flat[1]
  else:                      # [+ε_0 .. +ε_{n-1}, 0]
    plus, base = flat[:n], flat[n]
  return plus, base, jnp.append(plus, base)


# ---------------------------------------------------------------------------------------
# The step


def estimate_step(cfg: StreamConfig, state: StreamState, batch):
  """The blocks' pending update and the dual forward: `step` without the embed/head update.

  Returns (state, out) with the new estimate pending and ``outer`` not yet updated.
  """
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves disagree on the batch axis: sizes {sorted(sizes)}")
  size = sizes.pop()
  chunks = cfg.microbatches
  if size % chunks:
    raise ValueError(f"microbatches={chunks} must divide the batch size {size}")
  batch_C = jax.tree.map(lambda x: x.reshape(chunks, size // chunks, *x.shape[1:]), batch)
  batch_C = jax.lax.with_sharding_constraint(batch_C, batch_sharding(cfg, batch_C))

  skeys, scales = _units(cfg, state.step, state.key)
  acts = _embed(cfg, state.model_state, state.outer, batch_C, skeys, scales)
  resident, resident_opt, blocks, blocks_opt, acts = _visit_blocks(
      cfg, state, acts, skeys, scales, forward=True)
  out = _head(cfg, state.model_state, state.outer, acts, batch_C, skeys, scales)

  plus, other, all_losses = _losses(cfg, out)
  eps = jnp.asarray(cfg.eps, jnp.float32)
  if cfg.one_sided:  # the dense `spsa`'s arithmetic, op for op
    coeffs, loss = (plus - other) / eps, other
  else:
    coeffs, loss = (plus - other) / (2 * eps), jnp.mean(all_losses)
  finite = jnp.all(jnp.isfinite(all_losses)) & jnp.all(jnp.isfinite(coeffs))
  zograd = ZOGrad(key=state.key, step=state.step, coeffs=coeffs.astype(jnp.float32),
                  finite=finite, direction=cfg.direction)
  result = {"loss": loss, "zograd": zograd}
  model_state = state.model_state
  if cfg.update_state is not None:
    # Unit 0, branch 0 is sample 0's +ε branch for every branch grouping (see `_units`).
    aux = jax.tree.map(lambda m: jnp.sum(m[0, :, 0], axis=0), out["metrics"])
    new = cfg.update_state(model_state, aux, state.step)
    model_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype), new,
                               model_state)
    result["aux"] = aux
  new_state = state._replace(
      step=state.step + 1, resident=resident, resident_opt=resident_opt, blocks=blocks,
      blocks_opt=blocks_opt, pending=zograd, has_pending=jnp.ones([], bool),
      skipped=state.skipped + (~finite).astype(jnp.int32), model_state=model_state)
  return new_state, result


def update_outer(cfg: StreamConfig, outer, outer_opt, zograd: ZOGrad):
  """The embed/head update by `zograd` (on device): the other half of `step`.

  ĝ per group (embed, head) is `materialize`'s arithmetic for those groups.
  """
  def estimate(zograd, like, dtype):
    return {name: group_estimate(zograd, perturb.group_layer(name), sub, dtype=dtype)
            for name, sub in like.items()}
  return _apply_group(cfg, zograd, outer_opt, outer, estimate, jnp.ones([], bool))


def step(cfg: StreamConfig, state: StreamState, batch):
  """One ZO step: returns (state, {"loss", "zograd"}). Pure; jit it with the config static.

  The loss is the mean of (L+ + L−)/2 over samples, or L(θ) when one-sided (as `spsa`).
  `StreamEngine` compiles `estimate_step` and `update_outer` as two programs (the way the
  dense engine's update is compiled on its own, so the first step is bit-identical to it);
  one program computes the same up to float rounding.
  """
  state, out = estimate_step(cfg, state, batch)
  outer, outer_opt = update_outer(cfg, state.outer, state.outer_opt, state.pending)
  return state._replace(outer=outer, outer_opt=outer_opt), out


def flush(cfg: StreamConfig, state: StreamState) -> StreamState:
  """The state with the pending update applied to every block (no forward)."""
  resident, resident_opt, blocks, blocks_opt, _ = _visit_blocks(
      cfg, state, None, None, None, forward=False)
  return state._replace(resident=resident, resident_opt=resident_opt, blocks=blocks,
                        blocks_opt=blocks_opt, has_pending=jnp.zeros([], bool))


# ---------------------------------------------------------------------------------------
# The engine: one config, its jitted functions, placement


def _split(state: StreamState):
  """(device part, host blocks): only the device part is donated."""
  return state._replace(blocks=None, blocks_opt=None), (state.blocks, state.blocks_opt)


def _split_estimate(cfg: StreamConfig, device_state: StreamState, host, batch):
  blocks, blocks_opt = host
  return estimate_step(cfg, device_state._replace(blocks=blocks, blocks_opt=blocks_opt), batch)


class StreamEngine:
  """ZO training with block parameters streamed from host memory (see module docstring).

    engine = StreamEngine(llama.make(cfg), zojax.optim.zo_sgd(1e-3), eps=1e-3)
    state = engine.init(params, jax.random.key(0))
    for t in range(steps):
      state, out = engine.step(state, batch(t))      # out: loss, zograd (log it to replay)
    params = engine.params(state)                     # flushed: never stale

  Args:
    model: the model's `BlockModel`.
    update: a `zojax.optim.zo.ZOOptimizer`, e.g. ``zojax.optim.zo_sgd(1e-3)``.
    **settings: the other `StreamConfig` fields (eps, num_samples, one_sided, microbatches,
      branch_group, resident_blocks, memory_kind, layout, direction).
  """

  def __init__(self, model: protocol.BlockModel, update, **settings):
    self.config = cfg = StreamConfig(model, update, **settings)
    # The host blocks are not donated: with them donated, XLA (CPU) copies the whole stack
    # (the scan reads the input while writing the aliased output), which puts O(L) bytes in
    # temporaries; undonated, temporaries are the same for 2 and 8 blocks (measured).
    self._estimate = jax.jit(functools.partial(_split_estimate, cfg), donate_argnums=0)
    self._outer = jax.jit(functools.partial(update_outer, cfg), donate_argnums=(0, 1))
    self._flush = jax.jit(functools.partial(flush, cfg), donate_argnums=0)
    self._flush_copy = jax.jit(functools.partial(flush, cfg))

  @property
  def mesh(self) -> Mesh:
    return self.config.mesh

  def state_shardings(self, state_like: StreamState) -> StreamState:
    """Shardings (with memory kinds) of every state leaf."""
    return state_shardings(self.config, state_like)

  def batch_sharding(self, batch_like=None):
    """Batches are split over "data" on their leading axis."""
    return batch_sharding(self.config, batch_like)

  def abstract_state(self, params_like, key, model_state=None) -> StreamState:
    return jax.eval_shape(functools.partial(init, self.config), params_like, key, model_state)

  def init(self, params, key, model_state=None) -> StreamState:
    """The initial state, placed: streamed blocks and their state in host memory."""
    shardings = self.state_shardings(self.abstract_state(params, key, model_state))
    return jax.jit(functools.partial(init, self.config), out_shardings=shardings)(
        params, key, model_state)

  def step(self, state: StreamState, batch):
    """`step` (donates `state`'s device part): two compiled programs, see `step`."""
    state, out = self._estimate(*_split(state), batch)
    outer, outer_opt = self._outer(state.outer, state.outer_opt, state.pending)
    return state._replace(outer=outer, outer_opt=outer_opt), out

  def flush(self, state: StreamState) -> StreamState:
    """Applies the pending update to every block (donates `state`); call before saving."""
    return self._flush(state)

  def params(self, state: StreamState) -> dict:
    """The current parameters as numpy arrays, pending update applied (state is kept)."""
    flushed = self._flush_copy(state)
    # Whole arrays on every process, also when slices live on other processes' devices.
    outer, resident, blocks = multihost_utils.process_allgather(
        (flushed.outer, flushed.resident, flushed.blocks), tiled=True)
    stacked = jax.tree.map(lambda a, b: np.concatenate([a, b]), resident, blocks)
    return {**outer, "blocks": stacked}

  def _structs(self, state_like: StreamState, batch_like):
    """ShapeDtypeStructs of (device state, host blocks, batch) carrying their shardings."""
    structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           state_like, self.state_shardings(state_like))
    batch = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         batch_like, self.batch_sharding(batch_like))
    return (*_split(structs), batch)

  def lower(self, state_like: StreamState, batch_like):
    """The step's block program (`estimate_step`) lowered for abstract or concrete inputs."""
    return self._estimate.lower(*self._structs(state_like, batch_like))

  def compile(self, state_like: StreamState, batch_like):
    """The step's block program compiled ahead of time, for `zojax.zo.inspect.device_bytes`
    or its HLO.

    `step` keeps calling the jitted function, which finds this compilation in JAX's cache
    when its inputs have these shapes and shardings (and compiles anew otherwise), so no
    shape-locked executable is ever used behind the caller's back.
    """
    return self.lower(state_like, batch_like).compile()

  def jaxpr(self, state_like: StreamState, batch_like):
    """The block program's jaxpr, traced with the state's memory kinds (host values typed
    as such)."""
    return self._estimate.trace(*self._structs(state_like, batch_like)).jaxpr

  def block_bytes(self, params_like) -> int:
    """Bytes of one block's parameters (the unit the structural memory check allows)."""
    return sum(nbytes(a.shape[1:], a.dtype) for a in jax.tree.leaves(params_like["blocks"]))


__all__ = [
    "Layout", "StreamConfig", "StreamEngine", "StreamState", "batch_sharding",
    "estimate_step", "flush", "init", "single_device_layout", "slice_axis", "state_shardings",
    "step", "update_outer",
]
