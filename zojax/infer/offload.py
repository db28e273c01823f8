"""Offloaded MoE inference (Fate): experts rest in a three-tier store, a scheduler decides
which ones occupy a fixed pool of device slots, and layers run one at a time from Python.

  store = offload.write_expert_store(path, config, params)          # once: disk tier
  engine = offload.OffloadEngine(config, params, state, store_lib.open_store(path),
                                 policy, warm=warm_lists)
  out = engine.generate(prompts_BxT, max_new_tokens=128)            # tokens, logits, trace
  engine.bytes_moved()                                              # what actually moved

Per layer call (prefill, then every decode step), in the order `zojax.infer.schedule` fixes:

  attention_l (KV cache) -> router_l picks the experts -> demand(l): misses loaded
  -> the cross-layer gate (router_{l+1} on h_l) -> prefetch(l+1) -> MoE_l -> release(l)

The transfers the `Scheduler` returns are performed here (`ExpertPool.load` into a cache
slot, `ExpertStore.take` for a transient one) and counted by the store from the arrays it
moved, so `bytes_moved` can be checked against `zojax.infer.simulate` replaying the trace
this engine records.

**Results do not depend on where an expert lives.** The MoE output of a layer is the sum
over the needed experts in ascending id of gate x SwiGLU_e(h), each term one call of the
same compiled function on the expert's weights sliced out eagerly, whatever pool slot,
transient buffer or (for the all-resident reference, `resident=True`) parameter stack they
came from. So with quantisation off, logits and greedy tokens are bit-identical for every
budget and every prediction, right or wrong. Each needed expert runs on all of the call's
tokens with the unrouted ones gated by 0: a masked dense form, the same FLOPs as the dense
FFN a MoEfied model came from, with shapes that never depend on the routing (no
recompilation per call).

With quantisation on, an expert computes from the format it was moved in (INT4 / INT2
through `zojax.infer.quant.expert_swiglu`), so quality depends on the policy's choices
(hybrid: the least-predicted prefill experts as INT2).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zojax.errors import ConfigError
from zojax.infer import gate as gate_lib
from zojax.infer import generate as gen
from zojax.infer import prefetch as prefetch_lib
from zojax.infer import quant
from zojax.infer import store as store_lib
from zojax.infer.schedule import PolicyConfig, Scheduler, Transfer, needed_experts
from zojax.infer.trace import Trace
from zojax.models import llama, moe

FORMATS = ("full", "int4", "int2")
BITS = {"int4": 4, "int2": 2}
# Store leaf name -> the MoE decoder's parameter name (blocks, stacked [L, E, ...]).
EXPERT_LEAVES = {"gate": "expert_gate", "up": "expert_up", "down": "expert_down"}
FULL_FACTS = tuple((leaf, ()) for leaf in sorted(EXPERT_LEAVES))  # no quantised leaves


# ---------------------------------------------------------------------------------------
# The store's contents


def expert_formats(params, formats: Sequence[str] = FORMATS) -> tuple[dict, dict]:
  """The expert stacks in each format as plain numpy trees [L, E, ...], and the static
  quantisation facts ({fmt: {leaf: {bits, group, k, n}}}) needed to read them back."""
  blocks = params["blocks"]
  trees, facts = {}, {}
  for fmt in formats:
    if fmt not in FORMATS:
      raise ConfigError(f"expert format {fmt!r} is not one of {FORMATS}")
    tree, fmt_facts = {}, {}
    for leaf, name in EXPERT_LEAVES.items():
      w = np.asarray(blocks[name])
      if fmt == "full":
        tree[leaf] = w
        continue
      q = quant.quantize(w, bits=BITS[fmt])
      tree[leaf] = {"packed": np.asarray(q.packed), "scale": np.asarray(q.scale),
                    "zero": np.asarray(q.zero)}
      fmt_facts[leaf] = {"bits": q.bits, "group": q.group, "k": q.k, "n": q.n}
    trees[fmt], facts[fmt] = tree, fmt_facts
  return trees, facts


def write_expert_store(path, config: moe.MoEConfig, params, *,
                       formats: Sequence[str] = FORMATS, overwrite: bool = False) -> dict:
  """Writes the MoE's experts (every format) as an expert store; returns its manifest."""
  trees, facts = expert_formats(params, formats)
  meta = {"num_layers": config.base.num_layers, "num_experts": config.num_experts,
          "top_k": config.top_k, "quant": facts}
  return store_lib.write_store(path, trees, meta, overwrite=overwrite)


def non_expert_params(params):
  """The params without the routed experts' stacks: what always stays on device."""
  blocks = {k: v for k, v in params["blocks"].items() if k not in EXPERT_LEAVES.values()}
  return {**params, "blocks": blocks}


def tree_bytes(tree) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------
# Compiled pieces (one layer each; shapes never depend on the routing)


@functools.partial(jax.jit, static_argnums=0)
def _embed(config, params, tokens_BxT):
  return gen.embed(config, params, tokens_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _first_gate_input(config, p0, x_BxTxD):
  """Layer 0's gate input: the embedding output through layer 0's MLP norm."""
  return moe.ffn_input(config, p0, x_BxTxD)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4, 5))
def _front(config, p, bias_E, x_BxTxD, cache_k, cache_v, positions_BxT):
  """Attention with the KV cache, then the router: (x, k, v, h, experts, gates, rank)."""
  x, cache_k, cache_v = gen.attention_step(config, p, x_BxTxD, cache_k, cache_v, positions_BxT)
  h_TxD = moe.ffn_input(config, p, x)
  _, routing = moe.select(config, p, bias_E, h_TxD)
  true_rank = gate_lib.rank(p["router"], bias_E, h_TxD, score=config.score)
  return x, cache_k, cache_v, h_TxD, routing.experts, routing.gates, true_rank


@functools.partial(jax.jit, static_argnums=0)
def _gate_rank(config, router_DxE, bias_E, h_TxD):
  return gate_lib.rank(router_DxE, bias_E, h_TxD, score=config.score)


@functools.partial(jax.jit, static_argnums=2)
def _gates_per_expert(experts_TxK, gates_TxK, num_experts):
  """[E, T] float32: each token's gate for each expert (0 where not routed)."""
  onehot = experts_TxK[..., None] == jnp.arange(num_experts)
  return jnp.sum(jnp.where(onehot, gates_TxK[..., None].astype(jnp.float32), 0.0), axis=1).T


@functools.partial(jax.jit, static_argnums=5)
def _contribution(y_TxD, h_TxD, gates_ExT, expert, weights, facts):
  """y + gate_e ⊙ SwiGLU_e(h) for expert `expert`; `facts` rebuilds quantised leaves."""
  w = {leaf: (quant.QuantizedTensor(**weights[leaf], **dict(f)) if f else weights[leaf])
       for leaf, f in facts}
  out = quant.expert_swiglu(h_TxD, w["gate"], w["up"], w["down"])
  return y_TxD + gates_ExT[expert][:, None] * out.astype(y_TxD.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _finish(config, p, x_BxTxD, h_TxD, y_TxD):
  if config.shared_expert:
    y_TxD = y_TxD + llama.swiglu(h_TxD, p["shared_gate"], p["shared_up"],
                                 p["shared_down"]).astype(y_TxD.dtype)
  return x_BxTxD + y_TxD.reshape(x_BxTxD.shape).astype(x_BxTxD.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, x_BxTxD):
  return gen.output_logits(config, params, x_BxTxD)


# ---------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass
class Generation:
  """What `OffloadEngine.generate` returns (numpy)."""

  tokens: np.ndarray            # [B, max_new_tokens] greedy tokens
  prefill_logits: np.ndarray    # [B, T, V] float32, every prompt position
  decode_logits: np.ndarray     # [max_new_tokens - 1, B, V] float32 (the logits that chose
                                # tokens 1.. of `tokens`; token 0 comes from prefill)
  trace: Trace


class OffloadEngine:
  """Greedy generation and scoring for an MoE decoder whose experts are offloaded.

  Args:
    config: the `moe.MoEConfig` (dispatch settings are not used: the engine computes the
      experts itself).
    params: the model's params; only the non-expert ones are put on device.
    model_state: the MoE state (the selection bias routes, as in training).
    store: an open `ExpertStore` holding this model's experts (`write_expert_store`), or
      None with `resident=True`.
    policy: the `PolicyConfig` (slots per layer, predictor 'gate' | 'none', cache,
      quantisation, int2_rate, prefetch_k).
    warm: per layer, the experts to load before the first call (most preferred first), for
      policies with warm='popular'; e.g. `simulate.warm_lists(calibration_trace, slots)`.
    resident: the all-resident reference: every expert from `params` on device, nothing
      moved, no scheduler; computes exactly as the offloaded path does.
    rank_hook: (phase, layer, rank [T, E]) -> rank, applied to the gate's predictions
      (tests: adversarially wrong predictions).
    max_len: the KV cache's positions (prompt + generated tokens).
  """

  def __init__(self, config: moe.MoEConfig, params, model_state, store=None,
               policy: PolicyConfig | None = None, *, warm=None, resident: bool = False,
               rank_hook: Callable | None = None, max_len: int = 1024):
    if not isinstance(config, moe.MoEConfig):
      raise ConfigError(f"offloaded inference needs an MoE decoder, got "
                        f"{type(config).__name__}")
    self.config = gen.family(config).for_inference(config)
    c = self.config
    self.L, self.E, self.K = c.base.num_layers, c.num_experts, c.top_k
    self.resident, self.rank_hook, self.max_len = resident, rank_hook, max_len
    # Everything the compiled pieces take lives on the store's device, committed: mixing
    # committed and uncommitted inputs would compile each piece once per combination.
    self.device = (store.device_sharding if store is not None and not resident
                   else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    self.params = jax.device_put(non_expert_params(params), self.device)
    self.layers = [jax.tree.map(lambda x, l=l: x[l], self.params["blocks"])
                   for l in range(self.L)]
    self.bias = [jax.device_put(jnp.asarray(model_state["bias"][l]), self.device)
                 for l in range(self.L)]
    if resident:
      self._stacks = {leaf: jax.device_put(params["blocks"][name], self.device)
                      for leaf, name in EXPERT_LEAVES.items()}
      self.store = self.policy = self.scheduler = self.pool = None
      return
    if store is None or policy is None:
      raise ConfigError("offloaded inference needs an expert store and a policy "
                        "(or resident=True)")
    self._check_store(store, policy)
    self.store, self.policy = store, policy
    self._facts = {fmt: tuple(sorted((leaf, tuple(sorted(f.items())))
                                     for leaf, f in store.meta["quant"][fmt].items()))
                   for fmt in store.formats}
    self._facts["full"] = FULL_FACTS
    formats = self._policy_formats(policy)
    self.scheduler = Scheduler(policy, {f: store.expert_nbytes(f) for f in store.formats},
                               num_experts=self.E, top_k=self.K)
    self.pool = store.pool(list(policy.slots), formats)
    self._transient: dict[int, dict[int, tuple[str, Any]]] = {}
    self._moved_before = store.stats()["total_bytes"]["host_to_device"]
    self.warm_transfers: list[Transfer] = []
    if policy.warm == "popular" and policy.cache != "none" and any(policy.slots):
      if warm is None:
        raise ConfigError("policy warm='popular' needs warm lists (per layer, experts most "
                          "used first), e.g. simulate.warm_lists(calibration, slots)")
      self.warm_transfers = self.scheduler.warm(warm)
      self._perform(self.warm_transfers)
    self._moved_after_warm = store.stats()["total_bytes"]["host_to_device"]

  # -- setup checks

  def _check_store(self, store, policy):
    meta = store.meta
    if (store.num_layers, store.num_experts) != (self.L, self.E):
      raise ConfigError(f"expert store {store.path} holds {store.num_layers} layers x "
                        f"{store.num_experts} experts, the model {self.L} x {self.E}")
    need = self._policy_formats(policy)
    missing = [f for f in need if f not in store.formats]
    if missing:
      raise ConfigError(f"expert store {store.path} lacks format {missing[0]!r} that "
                        f"quant={policy.quant!r} moves (it has {store.formats})")
    if len(policy.slots) != self.L:
      raise ConfigError(f"config key 'slots' has {len(policy.slots)} layers, the model "
                        f"{self.L}")
    if "quant" not in meta:
      raise ConfigError(f"expert store {store.path} was not written by write_expert_store "
                        "(no quantisation facts in its meta)")

  @staticmethod
  def _policy_formats(policy) -> list[str]:
    formats = [prefetch_lib.mode_format(policy.quant)]
    if policy.quant == "hybrid" and policy.int2_rate > 0:
      formats.append("int2")
    return formats

  # -- transfers

  def _perform(self, transfers: Sequence[Transfer]) -> None:
    for t in transfers:
      if t.dest == "cache":
        self.pool.load(t.layer, t.expert, t.fmt, t.slot)
      else:
        self._transient.setdefault(t.layer, {})[t.slot] = (
            t.fmt, self.store.take(t.layer, t.expert, t.fmt))

  def bytes_moved(self) -> dict:
    """Host-to-device bytes the store counted: at warm-up, and since (the calls)."""
    if self.resident:
      return {"setup": 0, "calls": 0}
    now = self.store.stats()["total_bytes"]["host_to_device"]
    return {"setup": self._moved_after_warm - self._moved_before,
            "calls": now - self._moved_after_warm}

  def device_bytes(self) -> dict:
    """Device bytes this engine holds for weights: the non-expert params and the slot pools.

    In 'hybrid' mode every cache slot exists in both INT4 and INT2 (a slot keeps the format
    its expert arrived in), so the pools hold more than a plan sized in INT4 slots budgets.
    """
    pools = 0 if self.resident else self.pool.nbytes
    experts = tree_bytes(self._stacks) if self.resident else 0
    return {"non_expert": tree_bytes(self.params), "expert_pools": pools + experts}

  def _weights(self, layer: int, expert: int) -> tuple[dict, tuple]:
    """One expert's device arrays, sliced out eagerly, and its format's static facts."""
    if self.resident:
      return ({leaf: s[layer, expert] for leaf, s in self._stacks.items()}, FULL_FACTS)
    where = self.scheduler.locate(layer, expert)
    if where.dest == "transient":
      fmt, tree = self._transient[layer][where.slot]
      return tree, self._facts[fmt]
    tree = self.pool.slots(layer, where.fmt)
    return jax.tree.map(lambda a: a[where.slot], tree), self._facts[where.fmt]

  # -- running

  def _prediction(self, phase, layer, gate_rank):
    """What the scheduler is told layer `layer` will need: the gate's ranking (through
    `rank_hook` if given), or nothing for predictor 'none'."""
    if self.policy.predictor == "none":
      return np.zeros((gate_rank.shape[0], 0), np.int32)
    if self.rank_hook is not None:
      return np.asarray(self.rank_hook(phase, layer, gate_rank), np.int32)
    return gate_rank

  def _run(self, phase: str, tokens_BxT, positions_BxT, cache, record: dict):
    """All layers on new tokens: the last layer's output x; `cache` updated in place."""
    c = self.config
    x = _embed(c, self.params, tokens_BxT)
    sched = self.scheduler
    h0 = _first_gate_input(c, self.layers[0], x)
    gate_rank = np.asarray(_gate_rank(c, self.layers[0]["router"], self.bias[0], h0))
    if sched:
      self._perform(sched.prefetch(phase, 0, self._prediction(phase, 0, gate_rank)))
    for l in range(self.L):
      p = self.layers[l]
      x, cache[0][l], cache[1][l], h, experts, gates, true_rank = _front(
          c, p, self.bias[l], x, cache[0][l], cache[1][l], positions_BxT)
      experts_np = np.asarray(experts)
      unique, counts = needed_experts(experts_np, self.E)
      if sched:
        self._perform(sched.demand(phase, l, unique, counts))
      next_rank = None
      if l + 1 < self.L:
        next_rank = np.asarray(_gate_rank(c, self.layers[l + 1]["router"], self.bias[l + 1], h))
        if sched:
          self._perform(sched.prefetch(phase, l + 1,
                                       self._prediction(phase, l + 1, next_rank)))
      gates_ExT = _gates_per_expert(experts, gates, self.E)
      y = jnp.zeros(h.shape, jnp.float32 if h.dtype == jnp.float32 else h.dtype,
                    device=self.device)
      for e in unique:  # ascending id: the canonical summation order
        weights, facts = self._weights(l, int(e))
        y = _contribution(y, h, gates_ExT, np.int32(e), weights, facts)
      x = _finish(c, p, x, h, y)
      if sched:
        sched.release(l)
        self._transient.pop(l, None)
      record["experts"].append(experts_np)
      record["gate_rank"].append(gate_rank)
      record["true_rank"].append(np.asarray(true_rank))
      gate_rank = next_rank
    return x

  def _new_cache(self, batch: int):
    b = self.config.base
    shape = (batch, self.max_len, b.num_kv_heads, b.head_dim)
    dtype = jnp.dtype(b.dtype)
    return ([jnp.zeros(shape, dtype, device=self.device) for _ in range(self.L)],
            [jnp.zeros(shape, dtype, device=self.device) for _ in range(self.L)])

  def _check_prompts(self, prompts, new_tokens: int) -> np.ndarray:
    tokens = np.asarray(prompts)
    if tokens.ndim != 2 or tokens.shape[1] < 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ConfigError(f"prompts must be [batch, length >= 1] integers (equal lengths), got "
                        f"shape {tokens.shape} dtype {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= self.config.base.vocab_size:
      raise ConfigError(f"prompt token ids must be in [0, {self.config.base.vocab_size})")
    if tokens.shape[1] + new_tokens > self.max_len:
      raise ConfigError(f"prompt length {tokens.shape[1]} + max_new_tokens {new_tokens} "
                        f"exceeds max_len={self.max_len}")
    return tokens.astype(np.int32)

  def score(self, tokens_BxT) -> np.ndarray:
    """Logits float32 [B, T, V] at every position (one prefill; for perplexity)."""
    return self.generate(tokens_BxT, 0).prefill_logits

  def generate(self, prompts_BxT, max_new_tokens: int) -> Generation:
    """Greedy generation: a prefill of the prompts, then `max_new_tokens` - 1 decode steps
    (the first new token comes from the prefill's last logits)."""
    if max_new_tokens < 0:
      raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    tokens = self._check_prompts(prompts_BxT, max_new_tokens)
    B, T = tokens.shape
    cache = self._new_cache(B)
    prefill = {"experts": [], "gate_rank": [], "true_rank": []}
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    put = lambda a: jax.device_put(np.ascontiguousarray(a), self.device)
    x = self._run("prefill", put(tokens), put(positions), cache, prefill)
    prefill_logits = np.asarray(_logits(self.config, self.params, x))
    out = []
    decode = {"experts": [], "gate_rank": [], "true_rank": []}
    decode_logits = []
    if max_new_tokens:
      out.append(prefill_logits[:, -1].argmax(-1).astype(np.int32))
    for s in range(max_new_tokens - 1):
      step = {"experts": [], "gate_rank": [], "true_rank": []}
      pos = np.full((B, 1), T + s, np.int32)
      x = self._run("decode", put(out[-1][:, None]), put(pos), cache, step)
      logits = np.asarray(_logits(self.config, self.params, x))[:, 0]
      decode_logits.append(logits)
      out.append(logits.argmax(-1).astype(np.int32))
      for k, v in step.items():
        decode[k].append(np.stack(v))
    trace = self._trace(B, prefill, decode)
    V = self.config.base.vocab_size
    return Generation(
        tokens=np.stack(out, 1) if out else np.zeros((B, 0), np.int32),
        prefill_logits=prefill_logits,
        decode_logits=np.stack(decode_logits) if decode_logits else np.zeros((0, B, V)),
        trace=trace)

  def _trace(self, batch: int, prefill: dict, decode: dict) -> Trace:
    E = self.E
    S = len(decode["experts"])
    arr = lambda rows, tail: (np.stack(rows) if rows else np.zeros((0, self.L, batch, tail),
                                                                    np.int32))
    return Trace(
        num_experts=E, top_k=self.K, batch_size=batch,
        prefill_experts=np.stack(prefill["experts"]),
        prefill_gate_rank=np.stack(prefill["gate_rank"]),
        prefill_true_rank=np.stack(prefill["true_rank"]),
        decode_experts=arr(decode["experts"], self.K),
        decode_gate_rank=arr(decode["gate_rank"], E),
        decode_true_rank=arr(decode["true_rank"], E),
        meta={"decode_steps": S})

  def report(self) -> dict:
    """The scheduler's counters (hit rates, recall/precision, bytes by kind and format)."""
    return {} if self.resident else self.scheduler.report()


def resident_bytes(config: moe.MoEConfig, params) -> int:
  """Device bytes of the weights that never move (everything but the routed experts)."""
  del config
  return tree_bytes(non_expert_params(params))


__all__ = ["EXPERT_LEAVES", "FORMATS", "FULL_FACTS", "Generation", "OffloadEngine", "expert_formats",
           "non_expert_params", "resident_bytes", "tree_bytes", "write_expert_store"]
