"""ZO2 streaming: block parameters rest in host memory and visit the accelerator one at a time.

ZO2 (Wang et al. 2025) fine-tunes models larger than accelerator memory with zeroth-order
SGD: a ZO step needs no activations, gradients or optimizer state on device, so only the
block being computed has to be there. `StreamEngine` is that engine in JAX:

  * **Placement.** Block parameters (the float32 master copy) and their optimizer state rest
    in host memory (``pinned_host`` memory kind); embeddings and head stay on device, and the
    first ``resident_blocks`` blocks stay on device too.
  * **One jitted step.** A `lax.scan` over the streamed blocks. The carry double-buffers the
    blocks: iteration l computes block l while ``device_put`` brings block l+1 in (the copy
    depends only on the host arrays, never on block l's compute, so the scheduler overlaps
    them; `transfer_overlaps` checks this on the jaxpr). Inside the iteration, block l first
    gets the **previous** step's update (ZO2's fused update: the weights are on device anyway,
    and z is regenerated from the perturbation stream), then both SPSA branches run through it
    (`zojax.zo.spsa.block_branches`), then it is written back to host in place.
  * **Pending update.** After step t the blocks hold θ_t and the estimate ĝ_t is pending; the
    embed/head (on device) are already at θ_{t+1}. `StreamEngine.flush` applies the pending
    update; `StreamEngine.params` always returns flushed weights, so evaluation and
    checkpoints never see stale ones. The embed/head update is a second small compiled
    program run right after the step (`StreamEngine._update_outer` says why).
  * **Estimator options** as in `zojax.zo.spsa`: ``num_samples``; ``one_sided`` (c_i =
    (L(θ+εz_i) − L(θ))/ε, L(θ) from a scale-0 branch, θ + 0·z being θ exactly);
    ``microbatches`` (more batch chunks, same z, losses combined by loss_sum/count). First
    step bit-identical to `spsa` with the same options (tested).

The same engine runs on a `jax.sharding.Mesh` with axes ``("pert", "data")``
(`zojax.zo.parallel` builds the `Layout`): the step's work is cut into *units*, one group of
SPSA branches on one chunk of the batch, and units are spread over the mesh. Each unit's
computation has the same shapes whatever the mesh, and the unit losses are all-gathered and
combined in a fixed order, so the trajectory depends on the layout's (branch_group,
data_chunks) and never on the mesh shape. With ``slice_blocks`` each device keeps and moves
only 1/N of every block and all-gathers it on device (DistZO2's sliced streaming); the update
of a slice draws only that slice's z (threefry is partitionable), so z never crosses devices.

Equivalence with the dense engine (`zojax.zo.spsa` + `zojax.zo.make_apply`). The forward is
built from the same stage functions (`embed_branches`, `block_branches`, `head_branches`)
with the same shapes, and the fused update reproduces the dense transform's op order: ĝ
(`materialize`'s arithmetic on the layer's `perturb.block_noise`), the elementwise optax
chain, `optax.apply_updates`. The first step's loss, coefficients and update are bit-identical
to the dense engine's (tested). Later steps agree to a tolerance, not bit for bit: XLA
compiles the same float expression differently depending on the program around it
(multiply-add contraction, fusion, reduction order), and the streamed scan body is a
different program, so a loss can differ by 1 ulp; the finite difference (L+ − L−)/2ε turns
that into ~1e-4 relative in c_i, and the runs drift slowly apart (tests/zo/test_stream.py
states the bounds measured over 20 steps).

Memory on CPU. XLA's CPU ``memory_analysis`` counts pinned-host arguments as ordinary
argument bytes and compiles host<->device moves away, so `device_bytes` reads the memory kind
of every argument and output from the compiled shardings and adds the temporaries;
`device_values_bound` walks the jaxpr and checks that no value in device memory is larger than
one block (or an embed/head value). On GPU/TPU ``memory_analysis`` separates host from device
itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zojax.models import protocol
from zojax.optim.masks import decay_mask
from zojax.optim import zo as zo_optim
from zojax.zo import perturb
from zojax.zo.spsa import (ZOGrad, block_branches, embed_branches, group_estimate,
                           head_branches, materialize as materialize_estimate)

PERT, DATA = "pert", "data"
HOST_KINDS = ("pinned_host", "unpinned_host")


# ---------------------------------------------------------------------------------------
# Layer-wise ZO optimizers (the fused update)


class LayerwiseZO(NamedTuple):
  """A ZO optimizer split so one group (a layer, or embed+head) can be updated on its own.

  The dense transform is ``skip_nonfinite(chain(direction, *post))``; `post` is elementwise,
  so applying it to one layer with that layer's slice of the state is the same arithmetic.
  """

  direction: str                        # "mean": ĝ = (1/n) Σ c_i z_i; "sign": sign(ĝ)
  post: optax.GradientTransformation    # elementwise chain applied to the direction
  dense: optax.GradientTransformation   # the same optimizer for the dense engine


def _decay(weight_decay, mask):
  if mask is not None and not callable(mask):
    raise ValueError("mask must be None or a callable (params -> bool tree): a layer-wise "
                     "optimizer applies it to one layer's tree at a time")
  return optax.add_decayed_weights(weight_decay, decay_mask if mask is None else mask)


def layerwise_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float | None = None,
                  weight_decay: float = 0.0, *, nesterov: bool = False,
                  mask: Callable | None = None) -> LayerwiseZO:
  """`zojax.optim.zo_sgd` (MeZO) in layer-wise form: θ ← θ − η (ĝ + λθ) (+ momentum)."""
  post = [_decay(weight_decay, mask)]
  if momentum is not None:
    post.append(optax.trace(decay=momentum, nesterov=nesterov))
  post.append(optax.scale_by_learning_rate(learning_rate))
  return LayerwiseZO("mean", optax.chain(*post),
                     zo_optim.zo_sgd(learning_rate, momentum, weight_decay, nesterov=nesterov,
                                     mask=mask))


def layerwise_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, *,
                   mask: Callable | None = None) -> LayerwiseZO:
  """`zojax.optim.zo_adam` in layer-wise form (Adam state rests on host with the block)."""
  post = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), _decay(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))
  return LayerwiseZO("mean", post, zo_optim.zo_adam(learning_rate, b1, b2, eps, weight_decay,
                                                    mask=mask))


def layerwise_sign(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, *,
                   mask: Callable | None = None) -> LayerwiseZO:
  """`zojax.optim.zo_sign` (ZO-signSGD) in layer-wise form."""
  post = optax.chain(_decay(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))
  return LayerwiseZO("sign", post, zo_optim.zo_sign(learning_rate, weight_decay, mask=mask))


def layer_estimate(zograd: ZOGrad, layer, like, *, dtype=None, constrain=None):
  """ĝ for one block layer: `zojax.zo.spsa.group_estimate`, the dense update's arithmetic."""
  return group_estimate(zograd, layer, like, dtype=dtype, constrain=constrain)


def _direction(update: LayerwiseZO, estimate: Callable, params):
  if update.direction == "sign":
    g = estimate(jnp.float32)
    return jax.tree.map(lambda d, p: jnp.sign(d).astype(p.dtype), g, params)
  return estimate(None)


def _apply_group(update: LayerwiseZO, direction, opt_state, params, finite, gate):
  """skip_nonfinite(post) on one group, then apply_updates; `gate` False leaves all as is."""
  updates, new_state = update.post.update(direction, opt_state, params)
  updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o).astype(o.dtype),
                           new_state, opt_state)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(gate, n, o), new, old)
  return keep(new_params, params), keep(new_state, opt_state)


# ---------------------------------------------------------------------------------------
# Layout: how the step's work is spread over a mesh


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh ("pert", "data") and the step's unit decomposition.

  A unit is `branch_group` SPSA branches (2: sample i's +ε and −ε together; 1: one branch)
  on one of `data_chunks` equal chunks of the batch. Units are spread over "pert" (branch
  groups) and "data" (chunks); the numbers depend on (branch_group, data_chunks) only.
  """

  mesh: Mesh
  branch_group: int = 2
  data_chunks: int = 1
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


# ---------------------------------------------------------------------------------------
# The engine's state


class StreamState(NamedTuple):
  """Everything a streamed ZO run carries from step to step (all plain arrays)."""

  step: jax.Array        # int32 []: steps taken
  key: jax.Array         # uint32 [4]: the perturbation stream's base key data
  outer: Any             # {"embed", "head"} on device, always current (θ_t after t steps)
  outer_opt: Any         # their optimizer state
  resident: Any          # stacked blocks [R, ...] kept on device
  resident_opt: Any
  blocks: Any            # stacked blocks [L - R, ...] in host memory (fp32 master)
  blocks_opt: Any        # their per-layer optimizer state, in host memory
  pending: ZOGrad        # the last step's estimate, not yet applied to the blocks
  has_pending: jax.Array  # bool []
  skipped: jax.Array     # int32 []: steps whose estimate was not finite


def _split_blocks(blocks, r):
  return (jax.tree.map(lambda a: a[:r], blocks), jax.tree.map(lambda a: a[r:], blocks))


def _index(tree, i):
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _set(tree, value, i):
  return jax.tree.map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0), tree, value)


def _bytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


class StreamEngine:
  """ZO training with block parameters streamed from host memory (see module docstring).

    engine = StreamEngine(llama.make(cfg), layerwise_sgd(1e-3), eps=1e-3)
    state = engine.init(params, jax.random.key(0))
    for t in range(steps):
      state, out = engine.step(state, batch(t))      # out: loss, zograd (log it to replay)
    params = engine.params(state)                     # flushed: never stale
  """

  def __init__(self, model: protocol.BlockModel, update: LayerwiseZO, *, eps: float = 1e-3,
               num_samples: int = 1, one_sided: bool = False, microbatches: int = 1,
               resident_blocks: int = 0, memory_kind: str = "pinned_host",
               layout: Layout | None = None):
    if not isinstance(update, LayerwiseZO):
      raise ValueError(f"update must be a LayerwiseZO (layerwise_sgd/adam/sign), got "
                       f"{type(update).__name__}")
    if not float(eps) > 0:
      raise ValueError(f"eps={eps} must be > 0")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
      raise ValueError(f"microbatches={microbatches!r} must be an integer >= 1")
    if isinstance(resident_blocks, bool) or not isinstance(resident_blocks, int) or \
        resident_blocks < 0:
      raise ValueError(f"resident_blocks={resident_blocks!r} must be an integer >= 0")
    self.model, self.update = model, update
    self.eps, self.num_samples, self.resident_blocks = float(eps), num_samples, resident_blocks
    self.one_sided, self.microbatches = bool(one_sided), microbatches
    self.layout = layout or single_device_layout()
    self.memory_kind = memory_kind
    _check_layout(self.layout, num_samples, self.one_sided)
    _check_memory_kind(self.layout.mesh, memory_kind)
    # The host blocks are not donated: with them donated, XLA (CPU) copies the whole stack
    # (the scan reads the input while writing the aliased output), which puts O(L) bytes in
    # temporaries; undonated, temporaries are the same for 2 and 8 blocks (measured).
    self._jit_step = jax.jit(self._split_step, donate_argnums=0)
    self._jit_flush = jax.jit(self._flush, donate_argnums=0)
    self._jit_outer = jax.jit(self._update_outer, donate_argnums=(0, 1))
    self._jit_flush_copy = jax.jit(self._flush)
    self._compiled_step = None

  # -- shardings ------------------------------------------------------------------------

  @property
  def mesh(self) -> Mesh:
    return self.layout.mesh

  def _sharding(self, spec: P, kind: str = "device") -> NamedSharding:
    return NamedSharding(self.mesh, spec, memory_kind=kind)

  def _num_slices(self) -> int:
    return self.layout.num_devices if self.layout.slice_blocks else 1

  def _streamed_specs(self, tree, stacked=True):
    """Per-leaf specs of streamed blocks (or their optimizer state): sliced or replicated."""
    n = self._num_slices()
    return jax.tree.map(lambda a: _leaf_spec(a.shape[1:] if stacked else a.shape, n, stacked),
                        tree)

  def state_shardings(self, state_like: StreamState) -> StreamState:
    """Shardings (with memory kinds) of every state leaf."""
    rep = self._sharding(P())
    host = lambda tree: jax.tree.map(lambda s: self._sharding(s, self.memory_kind),
                                     self._streamed_specs(tree), is_leaf=_is_spec)
    return StreamState(
        step=rep, key=rep, outer=jax.tree.map(lambda _: rep, state_like.outer),
        outer_opt=jax.tree.map(lambda _: rep, state_like.outer_opt),
        resident=jax.tree.map(lambda _: rep, state_like.resident),
        resident_opt=jax.tree.map(lambda _: rep, state_like.resident_opt),
        blocks=host(state_like.blocks), blocks_opt=host(state_like.blocks_opt),
        pending=jax.tree.map(lambda _: rep, state_like.pending), has_pending=rep, skipped=rep)

  def batch_sharding(self, batch_like=None):
    """Batches are split over "data" on their leading axis."""
    sh = self._sharding(P(DATA))
    return sh if batch_like is None else jax.tree.map(lambda _: sh, batch_like)

  # -- init -----------------------------------------------------------------------------

  def _init(self, params, key):
    if not perturb.is_block_tree(params):
      raise ValueError("params must be a block-protocol tree {'embed', 'blocks', 'head'}")
    num_layers, _ = perturb.unstacked_like(params["blocks"])
    if self.resident_blocks > num_layers:
      raise ValueError(f"resident_blocks={self.resident_blocks} is more than the model's "
                       f"{num_layers} blocks")
    outer = {k: v for k, v in params.items() if k != "blocks"}
    resident, blocks = _split_blocks(params["blocks"], self.resident_blocks)
    per_layer_init = jax.vmap(self.update.post.init)
    kdata = perturb.key_data(key)
    n = self.num_samples
    return StreamState(
        step=jnp.zeros([], jnp.int32), key=kdata, outer=outer,
        outer_opt=self.update.post.init(outer), resident=resident,
        resident_opt=per_layer_init(resident), blocks=blocks,
        blocks_opt=per_layer_init(blocks),
        pending=ZOGrad(key=kdata, step=jnp.zeros([], jnp.int32),
                       coeffs=jnp.zeros([n], jnp.float32), finite=jnp.ones([], bool)),
        has_pending=jnp.zeros([], bool), skipped=jnp.zeros([], jnp.int32))

  def abstract_state(self, params_like, key) -> StreamState:
    return jax.eval_shape(self._init, params_like, key)

  def init(self, params, key) -> StreamState:
    """The initial state, placed: streamed blocks and their state in host memory."""
    shardings = self.state_shardings(self.abstract_state(params, key))
    return jax.jit(self._init, out_shardings=shardings)(params, key)

  # -- the step -------------------------------------------------------------------------

  def _units(self, step, key):
    """Per branch group u: its stream key data [U, 4] and scales [U, g].

    Two-sided: sample i's branches are +ε and −ε. One-sided: +ε for each sample and one
    unperturbed branch (scale 0, so θ + 0·z is θ exactly); with branch_group 2 every sample's
    unit carries its own scale-0 branch (all units keep one shape; n − 1 forwards more than
    the dense engine's n + 1), with branch_group 1 it is a unit of its own.
    """
    g, n = self.layout.branch_group, self.num_samples
    eps = jnp.asarray(self.eps, jnp.float32)
    signs = jnp.stack([eps, jnp.zeros_like(eps) if self.one_sided else -eps])
    if g == 2:
      samples, scales = np.arange(n), jnp.tile(signs[None], (n, 1))
    elif self.one_sided:
      samples, scales = np.append(np.arange(n), 0), jnp.append(jnp.tile(eps, n), 0.0)[:, None]
    else:
      samples, scales = np.repeat(np.arange(n), 2), jnp.tile(signs, n)[:, None]
    skeys = jnp.stack([jax.random.key_data(perturb.sample_key(key, step, int(i)))
                       for i in samples])
    # Every device computes all unit keys and takes its own: without this, sharding
    # propagation splits the stack over "pert" and adds an all-to-all of key words.
    rep = self._sharding(P())
    return (jax.lax.with_sharding_constraint(skeys, rep),
            jax.lax.with_sharding_constraint(scales, rep))

  def _map_units(self, fn, per_group, per_chunk, per_unit):
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

  def _shard_map(self, fn, in_specs, out_specs, check_vma=True):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)

  def _outer_tree(self, outer):
    return {**outer, "blocks": {}}

  def _embed(self, outer, batch_C, skeys, scales):
    def local(outer, batch_C, skeys, scales):
      def fn(group, chunk, _):
        skey, sc = group
        return embed_branches(self.model, self._outer_tree(outer), chunk,
                              perturb.wrap_key(skey), sc)
      return self._map_units(fn, (skeys, scales), batch_C, None)
    return self._shard_map(local, (P(), P(DATA), P(PERT), P(PERT)), P(PERT, DATA))(
        outer, batch_C, skeys, scales)

  def _head(self, outer, acts, batch_C, skeys, scales):
    def local(outer, acts, batch_C, skeys, scales):
      def fn(group, chunk, carry):
        skey, sc = group
        losses, metrics = head_branches(self.model, self._outer_tree(outer), carry, chunk,
                                        perturb.wrap_key(skey), sc)
        if isinstance(metrics, dict) and "loss_sum" in metrics and "count" in metrics:
          return {"loss": losses, "loss_sum": metrics["loss_sum"], "count": metrics["count"]}
        return {"loss": losses}
      out = self._map_units(fn, (skeys, scales), batch_C, acts)
      # Only these scalars cross devices: every device gets every unit's losses.
      out = jax.lax.all_gather(out, PERT, axis=0, tiled=True)
      return jax.lax.all_gather(out, DATA, axis=1, tiled=True)
    # all_gather's result is the same on every device, but shard_map's replication check
    # cannot infer that; hence check_vma=False here only.
    return self._shard_map(local, (P(), P(PERT, DATA), P(DATA), P(PERT), P(PERT)), P(),
                           check_vma=False)(outer, acts, batch_C, skeys, scales)

  def _block_forward(self, block, layer, acts, skeys, scales, *, sliced: bool):
    specs = self._streamed_specs(block, stacked=False) if sliced else \
        jax.tree.map(lambda _: P(), block)

    def local(block, layer, acts, skeys, scales):
      if sliced:  # DistZO2: each device moved 1/N of the block; gather it on device
        block = jax.tree.map(
            lambda a, s: a if s == P() else jax.lax.all_gather(
                a, (PERT, DATA), axis=_spec_axis(s), tiled=True), block, specs,
            is_leaf=lambda x: isinstance(x, jax.Array))

      def fn(group, _, carry):
        skey, sc = group
        return block_branches(self.model, block, layer, carry, perturb.wrap_key(skey), sc)
      chunks = jax.tree.leaves(acts)[0].shape[1]
      return self._map_units(fn, (skeys, scales), jnp.zeros([chunks]), acts)

    return self._shard_map(local, (specs, P(), P(PERT, DATA), P(PERT), P(PERT)),
                           P(PERT, DATA))(block, layer, acts, skeys, scales)

  def _update_block(self, state, block, opt, layer, *, sliced: bool):
    """The previous step's update, fused into block `layer`'s visit (gated by has_pending)."""
    if sliced:
      dev = jax.tree.map(lambda s: self._sharding(s), self._streamed_specs(block, stacked=False),
                         is_leaf=_is_spec)
      constrain = lambda z: jax.lax.with_sharding_constraint(z, dev)
    else:
      constrain = None
    pending = state.pending
    estimate = lambda dtype: layer_estimate(pending, layer, block, dtype=dtype,
                                            constrain=constrain)
    direction = _direction(self.update, estimate, block)
    block, opt = _apply_group(self.update, direction, opt, block, pending.finite,
                              state.has_pending)
    # The forward must read the stored (rounded) weights: without the barrier XLA fuses the
    # update into the perturbation and contracts a multiply-add differently (measured:
    # losses 1 ulp off the dense engine's from the second step on).
    return jax.lax.optimization_barrier((block, opt))

  def _visit_blocks(self, state, acts, skeys, scales, *, forward: bool):
    """Resident blocks, then the streamed ones (double-buffered); returns new blocks, acts."""
    r = self.resident_blocks
    sliced = self.layout.slice_blocks

    def resident_body(carry, l):
      resident, resident_opt, acts = carry
      block, opt = self._update_block(state, _index(resident, l), _index(resident_opt, l), l,
                                      sliced=False)
      if forward:
        acts = self._block_forward(block, l, acts, skeys, scales, sliced=False)
      return (_set(resident, block, l), _set(resident_opt, opt, l), acts), None

    resident, resident_opt = state.resident, state.resident_opt
    if r:
      (resident, resident_opt, acts), _ = jax.lax.scan(
          resident_body, (resident, resident_opt, acts), jnp.arange(r))

    host_blocks, host_opt = state.blocks, state.blocks_opt
    leaves = jax.tree.leaves(host_blocks)
    num_streamed = leaves[0].shape[0] if leaves else 0
    if num_streamed:
      dev_block = jax.tree.map(lambda s: self._sharding(s),
                               self._streamed_specs(host_blocks), is_leaf=_is_spec)
      dev_opt = jax.tree.map(lambda s: self._sharding(s), self._streamed_specs(host_opt),
                             is_leaf=_is_spec)
      host_kind = _unstack(jax.tree.map(lambda s: self._sharding(s, self.memory_kind),
                                        self._streamed_specs(host_blocks), is_leaf=_is_spec))
      host_opt_kind = _unstack(jax.tree.map(lambda s: self._sharding(s, self.memory_kind),
                                            self._streamed_specs(host_opt), is_leaf=_is_spec))
      fetch = lambda host, i, sh: jax.device_put(_index(host, i), _unstack(sh))

      def body(carry, l):
        block, opt, acts = carry
        # Prefetch l+1 from the input host arrays (the last iteration re-reads its own block:
        # one block of waste). The updated block leaves as a scan output, written to host.
        nxt = jnp.minimum(l + 1, num_streamed - 1)
        next_block = fetch(host_blocks, nxt, dev_block)
        next_opt = fetch(host_opt, nxt, dev_opt)
        block, opt = self._update_block(state, block, opt, r + l, sliced=sliced)
        if forward:
          acts = self._block_forward(block, r + l, acts, skeys, scales, sliced=sliced)
        out = (jax.device_put(block, host_kind), jax.device_put(opt, host_opt_kind))
        return (next_block, next_opt, acts), out

      first = (fetch(host_blocks, 0, dev_block), fetch(host_opt, 0, dev_opt))
      (_, _, acts), (host_blocks, host_opt) = jax.lax.scan(
          body, (*first, acts), jnp.arange(num_streamed))
    return resident, resident_opt, host_blocks, host_opt, acts

  def _losses(self, out):
    """Unit losses [U, C, g] -> (L+ [n], L− [n] or the unperturbed L [], all losses).

    Chunks (micro-batches, data chunks) combine as in the dense `spsa`: by the head's
    loss_sum/count sums when it returns them, else the mean.
    """
    n = self.num_samples
    if out["loss"].shape[1] == 1:
      losses = out["loss"][:, 0]
    elif "loss_sum" in out:
      losses = jnp.sum(out["loss_sum"], axis=1) / jnp.maximum(jnp.sum(out["count"], axis=1), 1.0)
    else:
      losses = jnp.mean(out["loss"], axis=1)
    if not self.one_sided:
      both = losses.reshape(n, 2)
      return both[:, 0], both[:, 1], both
    flat = losses.reshape(-1)
    if self.layout.branch_group == 2:  # [+ε_i, 0] per sample; the 0 branches are equal
      plus, base = flat[0::2], flat[1]
    else:                              # [+ε_0 .. +ε_{n-1}, 0]
      plus, base = flat[:n], flat[n]
    return plus, base, jnp.append(plus, base)

  def _split_step(self, device_state: StreamState, host, batch):
    blocks, blocks_opt = host
    return self._step(device_state._replace(blocks=blocks, blocks_opt=blocks_opt), batch)

  @staticmethod
  def _split(state: StreamState):
    return state._replace(blocks=None, blocks_opt=None), (state.blocks, state.blocks_opt)

  def _step(self, state: StreamState, batch):
    layout = self.layout
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f"batch leaves disagree on the batch axis: sizes {sorted(sizes)}")
    size = sizes.pop()
    # Micro-batches are more chunks: same z, losses combined by the dense engine's rule.
    chunks = layout.data_chunks * self.microbatches
    if size % chunks:
      raise ValueError(f"microbatches={self.microbatches} x layout data_chunks="
                       f"{layout.data_chunks} must divide the batch size {size}")
    chunk = size // chunks
    batch_C = jax.tree.map(lambda x: x.reshape(chunks, chunk, *x.shape[1:]), batch)
    batch_C = jax.lax.with_sharding_constraint(
        batch_C, jax.tree.map(lambda _: self._sharding(P(DATA)), batch_C))

    skeys, scales = self._units(state.step, state.key)
    acts = self._embed(state.outer, batch_C, skeys, scales)
    resident, resident_opt, blocks, blocks_opt, acts = self._visit_blocks(
        state, acts, skeys, scales, forward=True)
    out = self._head(state.outer, acts, batch_C, skeys, scales)

    plus, other, all_losses = self._losses(out)
    eps = jnp.asarray(self.eps, jnp.float32)
    if self.one_sided:  # the dense `spsa`'s arithmetic, op for op
      coeffs, loss = (plus - other) / eps, other
    else:
      coeffs, loss = (plus - other) / (2 * eps), jnp.mean(all_losses)
    finite = jnp.all(jnp.isfinite(all_losses)) & jnp.all(jnp.isfinite(coeffs))
    zograd = ZOGrad(key=state.key, step=state.step, coeffs=coeffs.astype(jnp.float32),
                    finite=finite)

    new_state = StreamState(
        step=state.step + 1, key=state.key, outer=state.outer, outer_opt=state.outer_opt,
        resident=resident, resident_opt=resident_opt, blocks=blocks, blocks_opt=blocks_opt,
        pending=zograd, has_pending=jnp.ones([], bool),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, {"loss": loss, "zograd": zograd}

  def _update_outer(self, outer, outer_opt, zograd: ZOGrad, blocks):
    """This step's update of embed and head (on device), as its own compiled program.

    Kept out of the step's jit on purpose: compiled alone, its fusions match the dense
    engine's separately compiled update (`zojax.zo.make_apply`) bit for bit; fused into the
    step, XLA contracts a multiply-add differently (1 ulp apart on CPU, measured).
    """
    # embed/head plus a zero-layer blocks tree, so `materialize` addresses them as groups.
    empty = jax.tree.map(lambda a: jax.ShapeDtypeStruct((0, *a.shape[1:]), a.dtype), blocks)
    estimate = lambda dtype: {k: v for k, v in materialize_estimate(
        zograd, {**outer, "blocks": empty}, dtype=dtype).items() if k != "blocks"}
    direction = _direction(self.update, estimate, outer)
    return _apply_group(self.update, direction, outer_opt, outer, zograd.finite,
                        jnp.ones([], bool))

  def _flush(self, state: StreamState) -> StreamState:
    resident, resident_opt, blocks, blocks_opt, _ = self._visit_blocks(
        state, None, None, None, forward=False)
    return state._replace(resident=resident, resident_opt=resident_opt, blocks=blocks,
                          blocks_opt=blocks_opt, has_pending=jnp.zeros([], bool))

  # -- public ---------------------------------------------------------------------------

  def step(self, state: StreamState, batch):
    """One ZO step (donates `state`). Returns (state, {"loss", "zograd"}).

    The loss is the mean of (L+ + L−)/2 over samples, or L(θ) when one-sided (as `spsa`).
    """
    step = self._compiled_step or self._jit_step
    state, out = step(*self._split(state), batch)
    outer, outer_opt = self._jit_outer(state.outer, state.outer_opt, state.pending, state.blocks)
    return state._replace(outer=outer, outer_opt=outer_opt), out

  def flush(self, state: StreamState) -> StreamState:
    """Applies the pending update to every block (donates `state`); call before saving."""
    return self._jit_flush(state)

  def params(self, state: StreamState) -> dict:
    """The current parameters as numpy arrays, pending update applied (state is kept)."""
    flushed = self._jit_flush_copy(state)
    host = jax.device_get((flushed.outer, flushed.resident, flushed.blocks))
    outer, resident, blocks = host
    stacked = jax.tree.map(lambda a, b: np.concatenate([a, b]), resident, blocks)
    return {**outer, "blocks": stacked}

  def _structs(self, state_like: StreamState, batch_like):
    """ShapeDtypeStructs of (device state, host blocks, batch) carrying their shardings."""
    state_sh = self.state_shardings(state_like)
    structs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           state_like, state_sh)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=self._sharding(P(DATA))),
                         batch_like)
    return (*self._split(structs), batch)

  def lower(self, state_like: StreamState, batch_like):
    """The step lowered for abstract (or concrete) state and batch, with their shardings."""
    return self._jit_step.lower(*self._structs(state_like, batch_like))

  def compile(self, state_like: StreamState, batch_like):
    """Compiles the step ahead of time; `step` runs this executable from then on.

    Returns it (for `device_bytes` / `memory_analysis`). Later batches must have the same
    shapes and be placed with `batch_sharding`.
    """
    self._compiled_step = self.lower(state_like, batch_like).compile()
    return self._compiled_step

  def jaxpr(self, state_like: StreamState, batch_like):
    """The step's jaxpr, traced with the state's memory kinds (host values typed as such)."""
    return self._jit_step.trace(*self._structs(state_like, batch_like)).jaxpr

  def block_bytes(self, params_like) -> int:
    """Bytes of one block's parameters (the unit the structural memory check allows)."""
    return sum(_bytes(a.shape[1:], a.dtype) for a in jax.tree.leaves(params_like["blocks"]))


def _is_spec(x):
  return isinstance(x, P)


def _spec_axis(spec: P) -> int:
  return next(i for i, s in enumerate(spec) if s is not None)


def _unstack(shardings):
  """Sharding of one layer from the sharding of the stacked [L, ...] leaf."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:]), memory_kind=s.memory_kind),
                      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _check_layout(layout: Layout, num_samples: int, one_sided: bool = False) -> None:
  mesh = layout.mesh
  if tuple(mesh.axis_names) != (PERT, DATA):
    raise ValueError(f"layout mesh axes {tuple(mesh.axis_names)} must be ('pert', 'data')")
  if layout.branch_group not in (1, 2):
    raise ValueError(f"layout branch_group={layout.branch_group} must be 1 or 2")
  if one_sided and layout.branch_group == 1:
    branches, what = num_samples + 1, "num_samples + 1 (one-sided)"
  else:
    branches, what = 2 * num_samples, "2 x num_samples"
  if layout.pert > branches:
    raise ValueError(f"mesh pert axis size {layout.pert} is larger than {what} = "
                     f"{branches} (there are only {branches} SPSA branches to spread)")
  groups = branches // layout.branch_group
  if groups % layout.pert:
    raise ValueError(f"mesh pert axis size {layout.pert} must divide the {groups} branch "
                     f"groups ({what} with num_samples={num_samples}, branch_group="
                     f"{layout.branch_group})")
  if layout.data_chunks % layout.data:
    raise ValueError(f"mesh data axis size {layout.data} must divide layout data_chunks="
                     f"{layout.data_chunks}")


def _check_memory_kind(mesh: Mesh, memory_kind: str) -> None:
  device = mesh.devices.flat[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if memory_kind not in kinds or memory_kind not in HOST_KINDS:
    raise ValueError(f"memory_kind={memory_kind!r} is not a host memory kind this backend "
                     f"({device.platform}) supports; it has {kinds}")


# ---------------------------------------------------------------------------------------
# Memory accounting (CPU-checkable)


def _sharding_kind(sharding) -> str:
  return getattr(sharding, "memory_kind", None) or "device"


def device_bytes(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step, device and host memory apart.

  device = device-kind argument bytes + device-kind output bytes + temporaries, with each
  argument and output sized by its shard shape and its memory kind read from the compiled
  shardings (CPU's `memory_analysis` counts host arguments as device ones; see the issue).
  """
  args = jax.tree.leaves(compiled.args_info)
  in_sh = jax.tree.leaves(compiled.input_shardings[0])
  out_info = jax.tree.leaves(compiled.out_info)
  out_sh = jax.tree.leaves(compiled.output_shardings)
  totals = {"device_argument_bytes": 0, "device_output_bytes": 0, "host_argument_bytes": 0,
            "host_output_bytes": 0}
  for what, infos, shardings in (("argument", args, in_sh), ("output", out_info, out_sh)):
    if len(infos) != len(shardings):
      raise ValueError(f"{len(infos)} {what}s but {len(shardings)} shardings")
    for info, sh in zip(infos, shardings):
      nbytes = _bytes(sh.shard_shape(info.shape), info.dtype)
      place = "host" if _sharding_kind(sh) in HOST_KINDS else "device"
      totals[f"{place}_{what}_bytes"] += nbytes
  analysis = compiled.memory_analysis()
  totals["temp_bytes"] = int(analysis.temp_size_in_bytes) if analysis is not None else 0
  totals["device_bytes"] = (totals["device_argument_bytes"] + totals["device_output_bytes"]
                            + totals["temp_bytes"])
  totals["host_bytes"] = totals["host_argument_bytes"] + totals["host_output_bytes"]
  return totals


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def device_values(jaxpr) -> list[tuple[int, str]]:
  """(bytes, description) of every value in device memory space, sub-jaxprs included."""
  found = []

  def visit(jaxpr, where):
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
      add(var.aval, f"{where} input")
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        add(var.aval, f"{where}/{eqn.primitive.name}")
      for sub in _sub_jaxprs(eqn):
        visit(sub, f"{where}/{eqn.primitive.name}")

  def add(aval, what):
    if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
      return
    if getattr(aval, "memory_space", None) == jax.memory.Space.Host:
      return
    if jnp.issubdtype(aval.dtype, jax.dtypes.prng_key):
      return
    found.append((_bytes(aval.shape, aval.dtype), f"{what} {aval.str_short()}"))

  visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, "step")
  return found


def transfer_overlaps(jaxpr) -> bool:
  """True when, in every scan body that copies host->device, no copy depends on a value the
  body computes from the block on device: the prefetch can run while the block computes."""
  found = False

  def check(body) -> bool:
    nonlocal found
    host_in = {v for v in body.invars
               if getattr(v.aval, "memory_space", None) == jax.memory.Space.Host}
    # Values derived only from host inputs, constants and the loop index.
    pure = set(host_in) | {v for v in body.invars if not hasattr(v.aval, "shape")
                           or v.aval.shape == ()}
    ok = True
    for eqn in body.eqns:
      ins = [v for v in eqn.invars if isinstance(v, jcore.Var)]
      if all(v in pure for v in ins):
        pure.update(eqn.outvars)
      if eqn.primitive.name == "device_put":
        srcs = [v for v in ins if getattr(v.aval, "memory_space", None)
                == jax.memory.Space.Host]
        dsts = [v for v in eqn.outvars if getattr(v.aval, "memory_space", None)
                != jax.memory.Space.Host]
        if srcs and dsts:
          found = True
          ok &= all(v in pure for v in ins)
    return ok

  def visit(jaxpr) -> bool:
    ok = True
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        ok &= check(eqn.params["jaxpr"].jaxpr)
      for sub in _sub_jaxprs(eqn):
        ok &= visit(sub)
    return ok

  ok = visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
  return ok and found


__all__ = [
    "HOST_KINDS", "Layout", "LayerwiseZO", "StreamEngine", "StreamState", "device_bytes",
    "device_values", "layer_estimate", "layerwise_adam", "layerwise_sgd", "layerwise_sign",
    "single_device_layout", "slice_axis", "transfer_overlaps",
]
