"""A LLaMA-family decoder whose feed-forward is a routed mixture of experts (MoE).

Each layer is LLaMA's attention sublayer followed by an MoE feed-forward: a router scores the
E experts per token in float32 (sigmoid or softmax), the top K of ``scores + bias`` are
selected, and the chosen SwiGLU experts' outputs are summed with the UNBIASED scores as gates
(optionally renormalised over the K), plus an optional shared expert every token uses.

  * **Parameters.** LLaMA's attention weights, a router [L, D, E] (float32), and the experts
    stacked [L, E, D, F] / [L, E, F, D] in the block view's ``blocks``, so in-scan ZO
    perturbation, ZO2 streaming and GaLore (leading axes are batch axes) all see them.
  * **Model state** (`zojax.models.Model`): the selection bias [L, E] of auxiliary-loss-free
    balancing, float32, never touched by an optimizer, and the previous step's bias (for
    routing churn). `update_state` applies the configured balancer (`zojax.moe.balance`) to
    the token loads of the batch just routed, so the bias it produces routes the NEXT batch:
    routing a batch with a bias computed from that batch's own loads would let each token's
    expert depend on later tokens of the sequence.
  * **Loads are metric sums** (``moe_loads`` [L, E], counted over the tokens the batch marks
    valid): they add over micro-batches and, under jit on a sharded batch, over devices,
    which is what makes the bias update see the global batch (an all-reduce in the compiled
    step; `tests/models/test_moe.py` checks it against a shard-local count).
  * **Dispatch** (`zojax.moe.dispatch`): dropless (sort by expert + ``ragged_dot``), capacity
    (dropped assignments counted), dense reference; or expert-parallel, experts sharded over
    the ``expert`` mesh axis with tokens exchanged by all-to-all.

The block carry is a dict: the hidden states, the layer index (so a block can read its own
row of the bias whichever engine runs the scan), the token mask and per-layer statistics
the head returns as metric sums. See docs/moe.md for the balancing rules and metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zojax import moe as moe_lib
from zojax.errors import ConfigError
from zojax.models import interface, llama, protocol, registry

SCORES = ("sigmoid", "softmax")
DISPATCH = ("dropless", "capacity", "dense")
GATES = ("score", "unit")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """An MoE decoder: the LLaMA shapes of `base` (its ffn_dim unused) plus the routed FFN."""

  base: llama.LlamaConfig
  num_experts: int
  top_k: int
  expert_dim: int
  score: str = "sigmoid"
  normalize_gates: bool = True
  # "unit": the chosen experts are summed with weight 1 (a dense FFN split into experts,
  # zojax.models.moefy: all E chosen then equals the dense FFN); "score": gated by scores.
  gates: str = "score"
  shared_expert: bool = False     # one always-on SwiGLU of width expert_dim
  dispatch: str = "dropless"
  capacity_factor: float = 1.25   # dispatch="capacity" and expert parallelism
  expert_parallel: bool = False   # experts sharded over the mesh's "expert" axis
  balance: moe_lib.BalanceConfig = moe_lib.BalanceConfig()

  def __post_init__(self):
    if self.num_experts < 1:
      raise ConfigError(f"config key 'model.num_experts'={self.num_experts} must be >= 1")
    if not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(f"config key 'model.top_k'={self.top_k} must be in [1, "
                        f"model.num_experts={self.num_experts}]")
    if self.expert_dim < 1:
      raise ConfigError(f"config key 'model.expert_dim'={self.expert_dim} must be >= 1")
    if self.score not in SCORES:
      raise ConfigError(f"config key 'model.score'={self.score!r} must be one of {SCORES}")
    if self.gates not in GATES:
      raise ConfigError(f"config key 'model.gates'={self.gates!r} must be one of {GATES}")
    if self.dispatch not in DISPATCH:
      raise ConfigError(f"config key 'model.dispatch'={self.dispatch!r} must be one of "
                        f"{DISPATCH}")
    if not self.capacity_factor > 0:
      raise ConfigError(f"config key 'model.capacity_factor'={self.capacity_factor} must be "
                        "> 0")
    self.balance.validate("model.balance")

  @property
  def num_params(self) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(
        jax.eval_shape(functools.partial(init, self), jax.random.key(0))))

  @property
  def active_params(self) -> int:
    """Parameters a token uses: all but the (E − K) unchosen experts of every layer."""
    per_expert = 3 * self.base.dim * self.expert_dim * self.base.num_layers
    return self.num_params - (self.num_experts - self.top_k) * per_expert


_TINY = llama.LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          ffn_dim=64)
_SMALL = llama.LlamaConfig(vocab_size=4096, dim=192, num_layers=4, num_heads=4,
                           num_kv_heads=4, ffn_dim=256, tie_embeddings=False)

CONFIGS: dict[str, MoEConfig] = {
    # Seconds on CPU: tests and every MoE config's `tiny`.
    "moe-tiny": MoEConfig(_TINY, num_experts=8, top_k=2, expert_dim=32),
    # experiments/moe_balance.py: 16 experts of width 128, top-2 (the dense control "moe-small-
    # dense" below has the same activated FFN width, 256).
    "moe-small": MoEConfig(_SMALL, num_experts=16, top_k=2, expert_dim=128),
}


# ---------------------------------------------------------------------------------------
# Parameters


def param_axes(config: MoEConfig) -> dict:
  axes = llama.param_axes(config.base)
  blocks = {k: v for k, v in axes["blocks"].items() if k not in ("w_gate", "w_up", "w_down")}
  blocks["router"] = ("layers", "embed", None)
  blocks["expert_gate"] = ("layers", "experts", "embed", "mlp")
  blocks["expert_up"] = ("layers", "experts", "embed", "mlp")
  blocks["expert_down"] = ("layers", "experts", "mlp", "embed")
  if config.shared_expert:
    blocks.update(shared_gate=("layers", "embed", "mlp"), shared_up=("layers", "embed", "mlp"),
                  shared_down=("layers", "mlp", "embed"))
  return {**axes, "blocks": blocks}


def init(config: MoEConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """LLaMA's init for attention, embeddings and norms; N(0, 0.02) router and experts, the
  experts' output projections scaled by 1/sqrt(2L) like every residual output."""
  c, b = config, config.base
  L, D, E, F = b.num_layers, b.dim, c.num_experts, c.expert_dim
  base_key, key = jax.random.split(key)
  params = llama.init(b, base_key, dtype)
  for name in ("w_gate", "w_up", "w_down"):
    del params["blocks"][name]
  keys = iter(jax.random.split(key, 7))
  std, out_std = 0.02, 0.02 / math.sqrt(2 * L)
  normal = lambda shape, s, dt=dtype: (s * jax.random.normal(next(keys), shape)).astype(dt)
  params["blocks"].update(
      router=normal((L, D, E), std, jnp.float32),   # scores are computed in float32
      expert_gate=normal((L, E, D, F), std), expert_up=normal((L, E, D, F), std),
      expert_down=normal((L, E, F, D), out_std))
  if c.shared_expert:
    params["blocks"].update(shared_gate=normal((L, D, F), std), shared_up=normal((L, D, F), std),
                            shared_down=normal((L, F, D), out_std))
  return params


def init_state(config: MoEConfig, key: jax.Array) -> dict:
  del key
  zeros = jnp.zeros((config.base.num_layers, config.num_experts), jnp.float32)
  return {"bias": zeros, "prev_bias": zeros}


# ---------------------------------------------------------------------------------------
# The block view


def token_mask(batch) -> jax.Array:
  """[B, T] float32: 1 for tokens that count in the loads (LM `weights`, eval `weight`)."""
  B, T = batch["tokens"].shape
  mask = batch.get("weights", jnp.ones((B, T), jnp.float32)).astype(jnp.float32)
  if "weight" in batch:
    mask = mask * batch["weight"][:, None].astype(jnp.float32)
  return mask


STAT_SHAPES = {  # per-layer statistics carried through the scan: name -> trailing shape
    "loads": ("E",), "prob_sum": ("E",), "primal": (), "dual": (), "churn": (), "dropped": (),
    "aux": (),
}


def embed(config: MoEConfig, params, batch):
  L, E = config.base.num_layers, config.num_experts
  stats = {k: jnp.zeros((L,) + tuple(E for _ in shape), jnp.float32)
           for k, shape in STAT_SHAPES.items()}
  return {"x": llama.embed(config.base, params, batch), "layer": jnp.zeros((), jnp.int32),
          "mask": token_mask(batch), "stats": stats}


def router_scores(config: MoEConfig, p, h_TxD) -> jax.Array:
  """[T, E] float32 router scores of one layer's normalised hidden states."""
  return moe_lib.scores(h_TxD.astype(jnp.float32) @ p["router"].astype(jnp.float32),
                        config.score)


def _ffn(config: MoEConfig, p, h_TxD, routing, mask_T):
  weights = (p["expert_gate"], p["expert_up"], p["expert_down"])
  if config.expert_parallel:
    # The mesh the step is traced under (the engines trace inside `jax.set_mesh`).
    mesh = jax.sharding.get_abstract_mesh()
    if "expert" in mesh.axis_names and mesh.shape["expert"] > 1:
      return moe_lib.moe_ffn_expert_parallel(h_TxD, routing, *weights, mesh=mesh,
                                             expert_axis="expert", weights_T=mask_T,
                                             capacity_factor=config.capacity_factor)
  return moe_lib.moe_ffn(h_TxD, routing, *weights, method=config.dispatch,
                         capacity_factor=config.capacity_factor, weights_T=mask_T)


def ffn_input(config: MoEConfig, p, x_BxTxD) -> jax.Array:
  """h [B·T, D], the post-attention RMSNorm that the router and the experts read.

  Fate's cross-layer gate applies layer l+1's router (`select`) to layer l's h.
  """
  B, T, D = x_BxTxD.shape
  return llama.rms_norm(x_BxTxD, p["mlp_norm"], config.base.norm_eps).reshape(B * T, D)


def select(config: MoEConfig, p, bias_E, h_TxD):
  """One layer's expert choice for normalised states h: (scores [T, E] float32, Routing).

  `bias_E` is that layer's selection bias (model state); it picks the experts, the gates
  stay the unbiased scores.
  """
  scores_TxE = router_scores(config, p, h_TxD)
  routing = moe_lib.route(scores_TxE, bias_E, config.top_k, normalize=config.normalize_gates)
  if config.gates == "unit":
    routing = routing._replace(gates=jnp.ones_like(routing.gates))
  return scores_TxE, routing


def ffn_output(config: MoEConfig, p, h_TxD, routing, mask_T=None):
  """(y [T, D] in h's dtype, dispatch stats): the chosen experts (+ the shared expert) on h."""
  y_TxD, ffn_stats = _ffn(config, p, h_TxD, routing, mask_T)
  if config.shared_expert:
    y_TxD = y_TxD + llama.swiglu(h_TxD, p["shared_gate"], p["shared_up"], p["shared_down"])
  return y_TxD, ffn_stats


def ffn_sublayer(config: MoEConfig, model_state, p, x_BxTxD, layer, mask_T):
  """x + MoE(norm(x)), the second half of a layer, and this layer's routing statistics.

  Args:
    config, model_state: the model and its state (the bias row `layer` routes).
    p: one layer's parameters.
    x_BxTxD: the attention sublayer's output.
    layer: int32 [] index of this layer.
    mask_T: [B·T] float32, 1 for tokens that count in the statistics (and in dropped counts).

  Returns:
    (x_BxTxD, {name: per-layer value} with the `STAT_SHAPES` names).
  """
  c = config
  B, T, D = x_BxTxD.shape
  h_TxD = ffn_input(c, p, x_BxTxD)
  bias_E = model_state["bias"][layer]
  scores_TxE, routing = select(c, p, bias_E, h_TxD)
  y_TxD, ffn_stats = ffn_output(c, p, h_TxD, routing, mask_T)
  x = x_BxTxD + y_TxD.reshape(B, T, D).astype(x_BxTxD.dtype)

  previous = moe_lib.route(scores_TxE, model_state["prev_bias"][layer], c.top_k).experts
  chosen_TxE = moe_lib.assignment(routing.experts, c.num_experts, mask_T)
  probs_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
  stats = {
      "loads": jnp.sum(chosen_TxE, axis=0),  # = moe_lib.loads
      "prob_sum": jnp.sum(mask_T[:, None] * probs_TxE, axis=0),
      "primal": jnp.sum(chosen_TxE * scores_TxE),
      "dual": moe_lib.dual_value(scores_TxE, bias_E, c.top_k, mask_T),
      "churn": jnp.sum(chosen_TxE * (1 - moe_lib.assignment(previous, c.num_experts))),
      "dropped": jnp.asarray(ffn_stats["dropped"], jnp.float32),
      "aux": (moe_lib.aux_loss(probs_TxE, routing.experts, c.top_k, mask_T)
              if c.balance.rule == "aux" else jnp.zeros((), jnp.float32)),
  }
  return x, stats


def block(config: MoEConfig, model_state, p, carry):
  """One layer: attention, then the routed FFN; records this layer's routing statistics."""
  layer = carry["layer"]
  x = llama.attention_sublayer(config.base, p, carry["x"])
  x, new = ffn_sublayer(config, model_state, p, x, layer, carry["mask"].reshape(-1))
  stats = {k: v.at[layer].set(new[k].astype(jnp.float32)) for k, v in carry["stats"].items()}
  return {"x": x, "layer": layer + 1, "mask": carry["mask"], "stats": stats}


def head(config: MoEConfig, params, carry, batch):
  """LLaMA's head loss (+ alpha x the mean aux term for the aux balancer); routing sums."""
  loss, metrics = llama.head(config.base, params, carry["x"], batch)
  stats = carry["stats"]
  if config.balance.aux_weight:
    loss = loss + config.balance.aux_weight * jnp.mean(stats["aux"])
  metrics = dict(metrics)
  metrics.update({f"moe_{k}": v for k, v in stats.items() if k != "aux"})
  metrics["moe_tokens"] = jnp.sum(carry["mask"])
  return loss, metrics


def make(config: MoEConfig, model_state) -> protocol.BlockModel:
  return protocol.BlockModel(embed=functools.partial(embed, config),
                             block=functools.partial(block, config, model_state),
                             head=functools.partial(head, config))


def layer_scores(config: MoEConfig, params, model_state, batch) -> jax.Array:
  """Router scores [L, B·T, E] of every layer on a batch (for analysis: LP duality gaps)."""
  blocks = make(config, model_state)

  def body(carry, p):
    x = llama.attention_sublayer(config.base, p, carry["x"])
    h = llama.rms_norm(x, p["mlp_norm"], config.base.norm_eps)
    return blocks.block(p, carry), router_scores(config, p, h.reshape(-1, h.shape[-1]))

  _, scores = jax.lax.scan(body, blocks.embed(params, batch), params["blocks"])
  return scores


# ---------------------------------------------------------------------------------------
# Balancing and reporting


def update_state(config: MoEConfig, model_state, aux, step):
  """The balancer's bias step from the loads of the batch just routed (used from the next)."""
  bias = moe_lib.update_bias(model_state["bias"], aux["moe_loads"], step, config.balance)
  return {"bias": bias, "prev_bias": model_state["bias"]}


def step_metrics(config: MoEConfig, metrics, model_state) -> dict:
  """Per-layer routing numbers of one training step (see docs/moe.md)."""
  tokens = jnp.maximum(metrics["moe_tokens"], 1.0)
  loads = metrics["moe_loads"]
  bias = model_state["bias"]
  K = config.top_k
  return {
      "moe/loads": loads,
      "moe/max_vio_batch": moe_lib.max_violation(loads),
      "moe/bias": bias - jnp.mean(bias, axis=-1, keepdims=True),
      "moe/dual_per_token": metrics["moe_dual"] / tokens,
      "moe/primal_per_token": metrics["moe_primal"] / tokens,
      "moe/churn": metrics["moe_churn"] / (K * tokens),
      "moe/dead_experts": moe_lib.dead_experts(loads),
      "moe/dropped_fraction": metrics["moe_dropped"] / (K * tokens),
  }


def eval_metrics(config: MoEConfig, totals) -> dict:
  """MaxVio_global over an eval split (per layer, and their mean), dead experts, drops."""
  loads = np.asarray(totals["moe_loads"], np.float64)
  vio = (loads.max(-1) - loads.mean(-1)) / np.maximum(loads.mean(-1), 1e-9)
  tokens = max(float(totals["moe_tokens"]), 1.0)
  return {"max_vio_global": float(vio.mean()),
          "max_vio_global_per_layer": [float(v) for v in vio],
          "dead_experts": int((loads == 0).sum()),
          "dropped_fraction": float(np.sum(totals["moe_dropped"]) /
                                    (config.top_k * tokens * loads.shape[0]))}


def model(config: MoEConfig, *, name: str, remat: bool = False) -> interface.Model:
  def loss(params, model_state, batch):
    value, metrics = protocol.apply(make(config, model_state), params, batch, remat=remat)
    return value, metrics, metrics

  info = {"base": dataclasses.asdict(config.base),
          **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in ("base", "balance")},
          "balance": dataclasses.asdict(config.balance),
          "num_params": config.num_params, "active_params": config.active_params}
  return interface.Model(
      name=name, init=functools.partial(init, config), axes=param_axes(config), loss=loss,
      init_state=functools.partial(init_state, config),
      update_state=functools.partial(update_state, config),
      block_view=functools.partial(make, config),
      step_metrics=functools.partial(step_metrics, config),
      eval_metrics=functools.partial(eval_metrics, config), info=info)


# Config keys (model.*) that override a registered MoE shape, and the balancer's keys.
MOE_KEYS = ("num_experts", "top_k", "expert_dim", "score", "normalize_gates", "gates",
            "shared_expert", "dispatch", "capacity_factor", "expert_parallel")
BALANCE_KEYS = ("rule", "u", "alpha", "freeze_after", "recenter")


def config_from(cfg, task=None) -> MoEConfig:
  """The `MoEConfig` named by a config's model block (model.name + overrides + model.balance)."""
  if cfg.get("init", "random") == "pretrained":
    raise ConfigError(f"config key 'model.init'='pretrained': {cfg.name} has no published "
                      "weights; use 'random'")
  base = llama.with_overrides(CONFIGS[cfg.name].base, cfg, task)
  fields = {k: cfg[k] for k in MOE_KEYS if k in cfg}
  balance = cfg.get("balance", None)
  if balance is not None:
    settings = {k: balance[k] for k in BALANCE_KEYS if k in balance}
    if not settings.get("freeze_after"):  # 0 / None: never freeze
      settings["freeze_after"] = None
    fields["balance"] = moe_lib.BalanceConfig(**settings)
  return dataclasses.replace(CONFIGS[cfg.name], base=base, **fields)


@registry.register(*CONFIGS)
def _registered(cfg, task=None) -> interface.Model:
  return model(config_from(cfg, task), name=cfg.name, remat=cfg.get("remat", False))


@registry.register("moe-small-dense")
def _dense_control(cfg, task=None) -> interface.Model:
  """The dense LLaMA with moe-small's activated parameters (FFN width K x expert_dim)."""
  config = llama.with_overrides(_SMALL, cfg, task)
  return llama.model(config, name=cfg.name, remat=cfg.get("remat", False))
