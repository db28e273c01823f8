"""LLaMA-family decoder in the block protocol: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Parameters are a plain pytree (see `init`); `param_axes` gives the logical axis names a
mesh uses to shard them. RoPE follows the Hugging Face ("rotate half") convention: in each
head, dimension i pairs with i + head_dim/2. The loaders convert other layouts to this one.

The head scores whatever the batch asks for:
  * language modelling: batch has `targets` [B, T] (optionally `weights` [B, T] and
    a per-example `weight` [B]);
  * prompt classification: batch has `last_index` [B], `candidates` [B, C] (label-word
    token ids) and `label` [B]. Only the C candidate logits at `last_index` are computed,
    so the vocabulary-sized logits never materialize. Optional `weight` [B] masks padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zojax.errors import ConfigError
from zojax.kernels import attention as attention_lib
from zojax.models import interface, protocol, registry


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shapes and numerics of a LLaMA-family decoder."""

  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  ffn_dim: int
  head_dim: int | None = None  # defaults to dim // num_heads
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype; params keep their own dtype
  # zojax.kernels.attention implementation: "xla" (naive), "blockwise", "pallas" or "auto".
  attention: str = "xla"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.dim // self.num_heads)
    for field in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
      if getattr(self, field) <= 0:
        raise ValueError(f"LlamaConfig.{field}={getattr(self, field)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig: {self.num_heads=} must be a multiple of {self.num_kv_heads=}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")
    if self.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"LlamaConfig: attention={self.attention!r} is not one of "
                       f"{attention_lib.IMPLEMENTATIONS}")

  @property
  def num_params(self) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_shapes(self)))


CONFIGS: dict[str, LlamaConfig] = {
    # Seconds on CPU; used by tests and every config's `tiny` variant.
    "tiny": LlamaConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        ffn_dim=128),
    "smollm2-135m": LlamaConfig(vocab_size=49152, dim=576, num_layers=30, num_heads=9,
                                num_kv_heads=3, ffn_dim=1536, rope_theta=100_000.0),
    # GaLore paper (Zhao et al., 2024, Table 2 / its configs/llama_*.json): untied, MHA,
    # 32k vocab. Used for memory accounting.
    "galore-60m": LlamaConfig(vocab_size=32000, dim=512, num_layers=8, num_heads=8,
                              num_kv_heads=8, ffn_dim=1376, tie_embeddings=False),
    "galore-130m": LlamaConfig(vocab_size=32000, dim=768, num_layers=12, num_heads=12,
                               num_kv_heads=12, ffn_dim=2048, tie_embeddings=False),
    "galore-350m": LlamaConfig(vocab_size=32000, dim=1024, num_layers=24, num_heads=16,
                               num_kv_heads=16, ffn_dim=2736, tie_embeddings=False),
    "galore-1b": LlamaConfig(vocab_size=32000, dim=2048, num_layers=24, num_heads=32,
                             num_kv_heads=32, ffn_dim=5461, tie_embeddings=False),
}


def get_config(name: str, **overrides) -> LlamaConfig:
  if name not in CONFIGS:
    raise ValueError(f"model.name={name!r} is not one of {sorted(CONFIGS)}")
  return dataclasses.replace(CONFIGS[name], **overrides)


# ---------------------------------------------------------------------------------------
# Parameters


def param_axes(config: LlamaConfig) -> dict:
  """Logical axis names of every parameter, mapped to mesh axes by the config's rules."""
  blocks = {
      "attn_norm": ("layers", "embed"),
      "wq": ("layers", "embed", "q_heads"),
      "wk": ("layers", "embed", "kv_heads"),
      "wv": ("layers", "embed", "kv_heads"),
      "wo": ("layers", "q_heads", "embed"),
      "mlp_norm": ("layers", "embed"),
      "w_gate": ("layers", "embed", "mlp"),
      "w_up": ("layers", "embed", "mlp"),
      "w_down": ("layers", "mlp", "embed"),
  }
  head = {"final_norm": ("embed",)}
  if not config.tie_embeddings:
    head["unembed"] = ("embed", "vocab")
  return {"embed": {"tokens": ("vocab", "embed")}, "blocks": blocks, "head": head}


def param_shapes(config: LlamaConfig, dtype=jnp.float32) -> dict:
  """ShapeDtypeStructs of the parameter tree, without allocating it."""
  return jax.eval_shape(functools.partial(init, config, dtype=dtype), jax.random.key(0))


def init(config: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random init: N(0, 0.02) weights, residual outputs scaled by 1/sqrt(2L) (GPT-2), unit norms."""
  c = config
  L, D, F = c.num_layers, c.dim, c.ffn_dim
  q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  keys = iter(jax.random.split(key, 9))
  std, out_std = 0.02, 0.02 / math.sqrt(2 * L)

  def normal(shape, s):
    return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

  params = {
      "embed": {"tokens": normal((c.vocab_size, D), std)},
      "blocks": {
          "attn_norm": jnp.ones((L, D), dtype),
          "wq": normal((L, D, q_dim), std),
          "wk": normal((L, D, kv_dim), std),
          "wv": normal((L, D, kv_dim), std),
          "wo": normal((L, q_dim, D), out_std),
          "mlp_norm": jnp.ones((L, D), dtype),
          "w_gate": normal((L, D, F), std),
          "w_up": normal((L, D, F), std),
          "w_down": normal((L, F, D), out_std),
      },
      "head": {"final_norm": jnp.ones((D,), dtype)},
  }
  if not c.tie_embeddings:
    params["head"]["unembed"] = normal((D, c.vocab_size), std)
  return params


# ---------------------------------------------------------------------------------------
# Layers


def rms_norm(x, w, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x_BxTxHxD, theta: float, positions_BxT=None):
  """Rotary position embedding, rotate-half convention.

  `positions_BxT` (int) gives each token's position; the default is 0..T-1 in every row.
  A KV cache passes the absolute positions of the tokens it appends.
  """
  T, Dh = x_BxTxHxD.shape[1], x_BxTxHxD.shape[-1]
  if positions_BxT is None:
    positions_BxT = jnp.arange(T)[None, :]
  inv_freq = theta ** (-jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh)
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles_BxTxF)[:, :, None, :], jnp.sin(angles_BxTxF)[:, :, None, :]
  x1, x2 = jnp.split(x_BxTxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


# ---------------------------------------------------------------------------------------
# Block protocol


def embed(config: LlamaConfig, params, batch):
  tokens_BxT = batch["tokens"]
  if tokens_BxT.ndim != 2:
    raise ValueError(f"batch['tokens'] must be [batch, seq], got shape {tokens_BxT.shape}")
  return protocol.take(params["embed"]["tokens"], tokens_BxT).astype(config.dtype)


def _qkv(config: LlamaConfig, p, x_BxTxD, positions_BxT=None):
  """Queries and keys (rotated to their positions) and values of norm(x)."""
  c = config
  B, T, _ = x_BxTxD.shape
  cast = lambda w: w.astype(x_BxTxD.dtype)
  h = rms_norm(x_BxTxD, p["attn_norm"], c.norm_eps)
  q = (h @ cast(p["wq"])).reshape(B, T, c.num_heads, c.head_dim)
  k = (h @ cast(p["wk"])).reshape(B, T, c.num_kv_heads, c.head_dim)
  v = (h @ cast(p["wv"])).reshape(B, T, c.num_kv_heads, c.head_dim)
  return rope(q, c.rope_theta, positions_BxT), rope(k, c.rope_theta, positions_BxT), v


def attention_sublayer(config: LlamaConfig, p, x_BxTxD):
  """x + attention(norm(x)): the first half of a layer (shared by the MoE decoder)."""
  B, T, _ = x_BxTxD.shape
  q, k, v = _qkv(config, p, x_BxTxD)
  attn = attention_lib.attention(q, k, v, causal=True, implementation=config.attention)
  return x_BxTxD + attn.reshape(B, T, -1) @ p["wo"].astype(x_BxTxD.dtype)


def cached_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxT):
  """Grouped-query attention of queries at `positions` over a cache whose slot s holds
  position s: query (b, t) sees slots 0..positions[b, t]. Scores and softmax in float32."""
  B, T, H, D = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                      preferred_element_type=jnp.float32) / math.sqrt(D)
  visible_BxTxS = jnp.arange(S)[None, None, :] <= positions_BxT[:, :, None]
  scores = jnp.where(visible_BxTxS[:, None, None], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxD.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD).reshape(B, T, H, D)


def attention_sublayer_cached(config: LlamaConfig, p, x_BxTxD, cache_k_BxSxKxD,
                              cache_v_BxSxKxD, positions_BxT):
  """`attention_sublayer` for tokens appended to one layer's KV cache.

  Writes the tokens' keys and values into slots `positions_BxT` (each row its own
  positions; slot s holds position s) and attends over the slots up to each token's
  position, so the cache must already hold positions 0 .. first position - 1 of each row.
  Slots past a row's position are never read (a padded prompt's filler is overwritten as
  that row decodes).

  Args:
    config: the decoder's shapes.
    p: one layer's parameters.
    x_BxTxD: the residual stream of the new tokens.
    cache_k_BxSxKxD, cache_v_BxSxKxD: this layer's cache, S slots.
    positions_BxT: int32 absolute positions of the new tokens, < S.

  Returns:
    (x + attention, cache_k, cache_v) with the new keys and values written.
  """
  B, T, _ = x_BxTxD.shape
  q, k, v = _qkv(config, p, x_BxTxD, positions_BxT)
  slots = (jnp.arange(B)[:, None], positions_BxT)
  cache_k = cache_k_BxSxKxD.at[slots].set(k.astype(cache_k_BxSxKxD.dtype))
  cache_v = cache_v_BxSxKxD.at[slots].set(v.astype(cache_v_BxSxKxD.dtype))
  attn = cached_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), positions_BxT)
  return x_BxTxD + attn.reshape(B, T, -1) @ p["wo"].astype(x_BxTxD.dtype), cache_k, cache_v


def swiglu(h, w_gate, w_up, w_down):
  """The SwiGLU feed-forward silu(h W_gate) * (h W_up) W_down, in h's dtype."""
  cast = lambda w: w.astype(h.dtype)
  return (jax.nn.silu(h @ cast(w_gate)) * (h @ cast(w_up))) @ cast(w_down)


def ffn_sublayer(config: LlamaConfig, p, x_BxTxD):
  """x + SwiGLU(norm(x)): the second half of a layer."""
  h = rms_norm(x_BxTxD, p["mlp_norm"], config.norm_eps)
  return x_BxTxD + swiglu(h, p["w_gate"], p["w_up"], p["w_down"])


def block(config: LlamaConfig, p, x_BxTxD):
  """One pre-norm decoder layer; `p` holds one layer's parameters (no layer axis)."""
  return ffn_sublayer(config, p, attention_sublayer(config, p, x_BxTxD))


def _unembed(config: LlamaConfig, params):
  """[D, V] output projection (the transposed token table when tied)."""
  if config.tie_embeddings:
    return protocol.dense(params["embed"]["tokens"]).T
  return protocol.dense(params["head"]["unembed"])


def head(config: LlamaConfig, params, x_BxTxD, batch):
  """Final norm and loss. Returns (mean loss, metric sums); see the module docstring."""
  h = rms_norm(x_BxTxD, params["head"]["final_norm"], config.norm_eps)
  if "candidates" in batch:
    return _classification_loss(config, params, h, batch)
  if "targets" in batch:
    return _lm_loss(config, params, h, batch)
  raise ValueError(
      f"batch has keys {sorted(batch)}: expected 'targets' (language modelling) or "
      "'candidates', 'last_index', 'label' (prompt classification)")


def candidate_logits(config: LlamaConfig, params, h_BxTxD, batch):
  """Logits [B, C] of the candidate label words at `last_index` (h already final-normed)."""
  B = h_BxTxD.shape[0]
  h_BxD = h_BxTxD[jnp.arange(B), batch["last_index"]].astype(jnp.float32)
  if config.tie_embeddings:
    w_BxCxD = protocol.take(params["embed"]["tokens"], batch["candidates"])
  else:
    w_BxCxD = jnp.moveaxis(protocol.take(params["head"]["unembed"], batch["candidates"], 1),
                           0, -1)
  return jnp.einsum("bd,bcd->bc", h_BxD, w_BxCxD.astype(jnp.float32))


def _classification_loss(config, params, h_BxTxD, batch):
  B = h_BxTxD.shape[0]
  logits_BxC = candidate_logits(config, params, h_BxTxD, batch)
  logp_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
  nll_B = -jnp.take_along_axis(logp_BxC, batch["label"][:, None], axis=-1)[:, 0]
  weight_B = batch.get("weight", jnp.ones((B,), jnp.float32)).astype(jnp.float32)
  count = jnp.sum(weight_B)
  correct = jnp.sum(weight_B * (jnp.argmax(logits_BxC, axis=-1) == batch["label"]))
  loss_sum = jnp.sum(weight_B * nll_B)
  metrics = {"loss_sum": loss_sum, "correct": correct, "count": count}
  return loss_sum / jnp.maximum(count, 1.0), metrics


def _lm_loss(config, params, h_BxTxD, batch):
  logits_BxTxV = (h_BxTxD @ _unembed(config, params).astype(h_BxTxD.dtype)).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  nll_BxT = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
  weights_BxT = batch.get("weights", jnp.ones_like(nll_BxT)).astype(jnp.float32)
  if "weight" in batch:  # per-example padding mask from eval batching
    weights_BxT = weights_BxT * batch["weight"][:, None]
  count = jnp.sum(weights_BxT)
  loss_sum = jnp.sum(weights_BxT * nll_BxT)
  metrics = {"loss_sum": loss_sum, "count": count}
  return loss_sum / jnp.maximum(count, 1.0), metrics


def make(config: LlamaConfig) -> protocol.BlockModel:
  """This model as a `BlockModel` for the engines."""
  return protocol.BlockModel(
      embed=functools.partial(embed, config),
      block=functools.partial(block, config),
      head=functools.partial(head, config),
  )


def model(config: LlamaConfig, *, name: str = "llama", remat: bool = False,
          pretrained=None) -> interface.Model:
  """This decoder as a `zojax.models.Model` (stateless, with its block view)."""
  return interface.from_block_model(
      name, make(config), init=functools.partial(init, config), axes=param_axes(config),
      remat=remat, pretrained=pretrained,
      info=dataclasses.asdict(config) | {"num_params": config.num_params})


DTYPES = ("float32", "bfloat16")


def config_from(cfg, task=None) -> LlamaConfig:
  """The `LlamaConfig` a config's model block names (model.name, vocab_size, dtype, attention).

  Raises `ConfigError` naming the key for a bad value, or when the task's tokenizer has
  more tokens than the model's vocabulary.
  """
  if cfg.name not in CONFIGS:
    raise ConfigError(f"config key 'model.name'={cfg.name!r} is not one of {sorted(CONFIGS)}")
  return with_overrides(CONFIGS[cfg.name], cfg, task)


def with_overrides(config: LlamaConfig, cfg, task=None) -> LlamaConfig:
  """`config` with a config's model.vocab_size / dtype / attention applied and checked."""
  if cfg.get("dtype", "float32") not in DTYPES:
    raise ConfigError(f"config key 'model.dtype'={cfg.dtype!r}: must be one of {DTYPES}")
  if cfg.get("attention", "xla") not in attention_lib.IMPLEMENTATIONS:
    raise ConfigError(f"config key 'model.attention'={cfg.attention!r}: must be one of "
                      f"{attention_lib.IMPLEMENTATIONS}")
  overrides = {k: cfg[k] for k in ("dtype", "attention") if k in cfg}
  if cfg.get("vocab_size"):
    overrides["vocab_size"] = cfg.vocab_size
  config = dataclasses.replace(config, **overrides)
  vocab = getattr(task, "vocab_size", 0) or 0
  if vocab > config.vocab_size:
    raise ConfigError(f"config key 'model.vocab_size'={config.vocab_size} is smaller than the "
                      f"task's tokenizer vocabulary ({vocab})")
  return config


@registry.register(*(name for name in CONFIGS if name != "smollm2-135m"))
def _registered(cfg, task=None) -> interface.Model:
  if cfg.get("init", "random") == "pretrained":
    raise ConfigError(f"config key 'model.init'='pretrained' needs a model with published "
                      f"weights (smollm2-135m), got model.name={cfg.name!r}")
  return model(config_from(cfg, task), name=cfg.name, remat=cfg.get("remat", False))


def loss_fn(config: LlamaConfig, params, batch, *, remat: bool = False):
  """Dense forward to (mean loss, metric sums)."""
  return protocol.apply(make(config), params, batch, remat=remat)


def final_hidden(config: LlamaConfig, params, tokens_BxT):
  """Final-normed hidden states [B, T, D]."""
  model = make(config)
  x = protocol.run_blocks(model, params["blocks"], model.embed(params, {"tokens": tokens_BxT}))
  return rms_norm(x, params["head"]["final_norm"], config.norm_eps)


def project_logits(config: LlamaConfig, params, h_BxTxD):
  """Next-token logits [B, T, V] float32 of final-normed hidden states."""
  return (h_BxTxD @ _unembed(config, params).astype(h_BxTxD.dtype)).astype(jnp.float32)


def forward_logits(config: LlamaConfig, params, tokens_BxT):
  """Full next-token logits [B, T, V] (for generation and tests; training uses `head`)."""
  return project_logits(config, params, final_hidden(config, params, tokens_BxT))


def greedy_generate(config: LlamaConfig, params, prompt_ids, num_tokens: int) -> list[int]:
  """Greedy decoding without a KV cache (re-runs the prefix; fine for short checks)."""
  ids = list(prompt_ids)
  total = len(ids) + num_tokens
  step = jax.jit(lambda p, t: forward_logits(config, p, t))
  for _ in range(num_tokens):
    # Pad to a fixed length so every step reuses one compilation; causality makes it exact.
    tokens = np.zeros((1, total), np.int32)
    tokens[0, :len(ids)] = ids
    logits = step(params, jnp.asarray(tokens))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids[len(prompt_ids):]
