"""Generation with a KV cache for the block-view decoders: LLaMA (`llama.LlamaConfig`) and MoE
(`moe.MoEConfig`).

  cache = init_cache(config, batch, max_len)                    # k, v: [L, B, S, Hkv, Dh]
  logits_BxV, cache = prefill(config, params, state, cache, tokens_BxT, lengths_B)
  logits_BxV, cache = decode_step(config, params, state, cache, tokens_B, positions_B)
  new_ids = generate(config, params, state, [[1, 2, 3], [4, 5]], 8, temperature=0.7,
                     top_k=40, key=jax.random.key(0))

Cache slot s of a row holds that row's position s. Prompts of different lengths are padded
on the right and prefilled together from position 0; row b then decodes at its own
positions lengths[b], lengths[b] + 1, ..., overwriting its padding before any query can
see it (a query at position p reads slots 0..p). So each row gets what its prompt alone
would give.

The whole stack runs as one `lax.scan` over the stacked layers (all weights resident). An
engine that runs layers one at a time from Python (offloaded MoE inference) uses the
per-layer pieces instead: `embed`, `attention_step` on one layer's cache slice, `ffn_step`
(or its own expert FFN built from `moe.ffn_input` / `moe.select` / `moe.ffn_output`) and
`output_logits`.

What differs by model is one small `Family` adapter, looked up by the config's type. MoE
routing uses the selection bias of the model state, as in training; capacity dispatch
becomes dropless and expert parallelism is off, so that no token's output depends on the
other tokens of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zojax import moe as moe_lib
from zojax.errors import ConfigError
from zojax.models import llama, moe, protocol
from zojax.models.interface import Model

Params = Any
ModelState = Any


class Cache(NamedTuple):
  """Keys and values of every layer: [layers, batch, max_len, kv_heads, head_dim] each."""

  k: jax.Array
  v: jax.Array


# ---------------------------------------------------------------------------------------
# The model adapter


class Family(NamedTuple):
  """What generation needs from one decoder family.

  base: config -> its `llama.LlamaConfig` (attention, norms, vocabulary).
  for_inference: config -> the config generation runs (MoE: token-independent dispatch).
  ffn: (config, model_state, p, x_BxTxD, layer, mask_T) -> x + FFN(norm(x)) of one layer.
  block_view: (config, model_state) -> the model's `BlockModel` (the no-cache reference).
  carry_x: block carry -> the residual stream x_BxTxD.
  """

  base: Callable[[Any], llama.LlamaConfig]
  for_inference: Callable[[Any], Any]
  ffn: Callable[..., jax.Array]
  block_view: Callable[[Any, ModelState], protocol.BlockModel]
  carry_x: Callable[[Any], jax.Array]


def _moe_for_inference(config: moe.MoEConfig) -> moe.MoEConfig:
  dispatch = "dropless" if config.dispatch == "capacity" else config.dispatch
  return dataclasses.replace(config, dispatch=dispatch, expert_parallel=False)


FAMILIES: dict[type, Family] = {
    llama.LlamaConfig: Family(
        base=lambda c: c, for_inference=lambda c: c,
        ffn=lambda c, state, p, x, layer, mask: llama.ffn_sublayer(c, p, x),
        block_view=lambda c, state: llama.make(c), carry_x=lambda carry: carry),
    moe.MoEConfig: Family(
        base=lambda c: c.base, for_inference=_moe_for_inference,
        ffn=lambda c, state, p, x, layer, mask: moe.ffn_sublayer(c, state, p, x, layer, mask)[0],
        block_view=moe.make, carry_x=lambda carry: carry["x"]),
}


def family(config) -> Family:
  """The adapter of `config`'s decoder family (by its type)."""
  found = FAMILIES.get(type(config))
  if found is None:
    raise TypeError(f"generation needs one of {[t.__name__ for t in FAMILIES]}, got "
                    f"{type(config).__name__}")
  return found


def base_config(config) -> llama.LlamaConfig:
  return family(config).base(config)


def decoder_config(model: Model) -> llama.LlamaConfig | moe.MoEConfig:
  """The config a registered LLaMA or MoE `Model` was built from, read back from its `info`
  (which `llama.model` / `moe.model` fill with the config's fields)."""
  info = model.info
  names = lambda cls, skip=(): [f.name for f in dataclasses.fields(cls) if f.name not in skip]
  try:
    if "num_experts" in info:
      return moe.MoEConfig(
          base=llama.LlamaConfig(**{k: info["base"][k] for k in names(llama.LlamaConfig)}),
          balance=moe_lib.BalanceConfig(**info["balance"]),
          **{k: info[k] for k in names(moe.MoEConfig, ("base", "balance"))})
    return llama.LlamaConfig(**{k: info[k] for k in names(llama.LlamaConfig)})
  except KeyError:
    raise ConfigError(f"config key 'model.name'={model.name!r}: generation needs a LLaMA or MoE "
                      "decoder") from None


# ---------------------------------------------------------------------------------------
# Per-layer pieces (an engine may drive these one layer at a time)


def init_cache(config, batch: int, max_len: int, dtype=None) -> Cache:
  """Zeros for `batch` rows of `max_len` positions, in the compute dtype by default."""
  c = base_config(config)
  shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
  dtype = jnp.dtype(dtype or c.dtype)
  return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def embed(config, params, tokens_BxT) -> jax.Array:
  """The residual stream x_BxTxD of `tokens_BxT` (the token table, compute dtype)."""
  return llama.embed(base_config(config), params, {"tokens": tokens_BxT})


def attention_step(config, p, x_BxTxD, cache_k_BxSxKxD, cache_v_BxSxKxD, positions_BxT):
  """One layer's attention over its cache slice: (x, cache_k, cache_v) with the tokens'
  keys and values written at `positions_BxT` (`llama.attention_sublayer_cached`)."""
  return llama.attention_sublayer_cached(base_config(config), p, x_BxTxD, cache_k_BxSxKxD,
                                         cache_v_BxSxKxD, positions_BxT)


def ffn_step(config, model_state, p, x_BxTxD, layer, mask_T=None) -> jax.Array:
  """One layer's feed-forward half, x + FFN(norm(x)): SwiGLU, or the routed experts with
  bias row `layer` of the model state. `mask_T` [B·T] marks real tokens (MoE statistics
  only; default all)."""
  if mask_T is None:
    mask_T = jnp.ones((x_BxTxD.shape[0] * x_BxTxD.shape[1],), jnp.float32)
  fam = family(config)
  return fam.ffn(fam.for_inference(config), model_state, p, x_BxTxD,
                 jnp.asarray(layer, jnp.int32), mask_T)


def output_logits(config, params, x_BxTxD) -> jax.Array:
  """Next-token logits float32 [B, T, V] of the last layer's output (final norm, unembed)."""
  c = base_config(config)
  h = llama.rms_norm(x_BxTxD, params["head"]["final_norm"], c.norm_eps)
  return llama.project_logits(c, params, h)


# ---------------------------------------------------------------------------------------
# The whole stack


def forward_logits(config, params, model_state, tokens_BxT) -> jax.Array:
  """Logits [B, T, V] without a cache: the model's own block view (the training forward)."""
  fam = family(config)
  view = fam.block_view(config, model_state)
  carry = protocol.run_blocks(view, params["blocks"], view.embed(params, {"tokens": tokens_BxT}))
  return output_logits(config, params, fam.carry_x(carry))


def forward_cached(config, params, model_state, cache: Cache, tokens_BxT, positions_BxT,
                   valid_BxT=None):
  """Runs new tokens through every layer against the cache: (x_BxTxD, cache).

  Args:
    config: a `LlamaConfig` or `MoEConfig`.
    params, model_state: the model's (model_state: {} for LLaMA, the MoE bias otherwise).
    cache: from `init_cache`; holds positions 0 .. positions[b, 0] - 1 of each row.
    tokens_BxT: int32 new tokens; positions_BxT: their int32 positions (< max_len).
    valid_BxT: 1 for real tokens, 0 for padding (MoE statistics only); default all real.

  Returns:
    The last layer's output (before the final norm) and the cache with the tokens written.
  """
  fam = family(config)
  config = fam.for_inference(config)
  B, T = tokens_BxT.shape
  mask_T = (jnp.ones((B * T,), jnp.float32) if valid_BxT is None
            else valid_BxT.reshape(-1).astype(jnp.float32))

  def layer_fn(x, inputs):
    p, k, v, layer = inputs
    x, k, v = attention_step(config, p, x, k, v, positions_BxT)
    return fam.ffn(config, model_state, p, x, layer, mask_T), (k, v)

  layers = jnp.arange(cache.k.shape[0], dtype=jnp.int32)
  x, (k, v) = jax.lax.scan(layer_fn, embed(config, params, tokens_BxT),
                           (params["blocks"], cache.k, cache.v, layers))
  return x, Cache(k, v)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def forward(config, params, model_state, cache: Cache, tokens_BxT, positions_BxT):
  """Logits float32 [B, T, V] at every new token, and the cache (`forward_cached`)."""
  x, cache = forward_cached(config, params, model_state, cache, tokens_BxT, positions_BxT)
  return output_logits(config, params, x), cache


def _prefill(config, params, model_state, cache, tokens_BxT, lengths_B):
  B, T = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  valid_BxT = positions_BxT < lengths_B[:, None]
  x, cache = forward_cached(config, params, model_state, cache, tokens_BxT, positions_BxT,
                            valid_BxT)
  x_Bx1xD = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)
  return output_logits(config, params, x_Bx1xD)[:, 0], cache


def _decode_step(config, params, model_state, cache, tokens_B, positions_B):
  x, cache = forward_cached(config, params, model_state, cache, tokens_B[:, None],
                            positions_B[:, None])
  return output_logits(config, params, x)[:, 0], cache


prefill = jax.jit(_prefill, static_argnums=0, donate_argnums=3)
prefill.__doc__ = """Prompts (right-padded) from position 0: (logits_BxV of each row's last
prompt token, cache). Args: config, params, model_state, cache (donated), tokens_BxT,
lengths_B (int32, 1..T)."""

decode_step = jax.jit(_decode_step, static_argnums=0, donate_argnums=3)
decode_step.__doc__ = """One token per row at its own position: (logits_BxV, cache). Args:
config, params, model_state, cache (donated), tokens_B, positions_B (int32)."""


# ---------------------------------------------------------------------------------------
# Choosing tokens and the decode loop


def choose(logits_BxV, key, step, temperature, top_k) -> jax.Array:
  """The next token of each row (int32 [B]).

  Argmax where `temperature` is 0; else a sample of softmax(logits / temperature) over the
  `top_k` largest logits (0: all). Both are traced, so every setting shares one
  compilation. Row b's randomness is fold_in(fold_in(key, b), step): it does not depend on
  the other rows.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  B, V = logits_BxV.shape
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  kth_Bx1 = jax.lax.dynamic_slice_in_dim(jnp.sort(logits_BxV, axis=-1), V - k, 1, axis=1)
  kept_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  scaled_BxV = kept_BxV / jnp.where(temperature > 0, temperature, 1.0)
  keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(key, b), step))(jnp.arange(B))
  sampled_B = jax.vmap(jax.random.categorical)(keys, scaled_BxV)
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_len", "num_tokens"))
def decode_loop(config, params, model_state, tokens_BxT, lengths_B, key, temperature, top_k,
                eos_id, *, max_len: int, num_tokens: int):
  """Prefill into a fresh cache of `max_len`, then decode until `num_tokens` per row or
  every row has produced `eos_id` (-1: none); tokens picked by `choose`. Returns int32
  [B, num_tokens]; after a row's EOS its entries are EOS."""
  cache = init_cache(config, tokens_BxT.shape[0], max_len)
  pick = functools.partial(choose, key=key, temperature=temperature, top_k=top_k)
  logits_BxV, cache = _prefill(config, params, model_state, cache, tokens_BxT, lengths_B)
  first_B = pick(logits_BxV, step=0)
  B = tokens_BxT.shape[0]
  # EOS-filled: when every row has stopped, the loop ends before the last columns.
  out_BxN = jnp.full((B, num_tokens), eos_id, jnp.int32).at[:, 0].set(first_B)

  def running(s):
    i, _, _, done_B = s
    return (i < num_tokens) & ~jnp.all(done_B)

  def step(s):
    i, cache, out_BxN, done_B = s
    logits_BxV, cache = _decode_step(config, params, model_state, cache, out_BxN[:, i - 1],
                                     lengths_B + i - 1)
    token_B = jnp.where(done_B, eos_id, pick(logits_BxV, step=i))
    return i + 1, cache, out_BxN.at[:, i].set(token_B), done_B | (token_B == eos_id)

  state = (jnp.ones((), jnp.int32), cache, out_BxN, first_B == eos_id)
  return jax.lax.while_loop(running, step, state)[2]


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int, *,
                  max_len: int | None = None, temperature: float = 0.0,
                  top_k: int | None = None) -> int:
  """Raises a one-line `ConfigError` naming the argument that is wrong; returns the cache
  length the request needs (the longest prompt + max_new_tokens − 1)."""
  if not prompts:
    raise ConfigError("prompts: no prompt given")
  for i, ids in enumerate(prompts):
    if len(ids) == 0:
      raise ConfigError(f"prompt {i} is empty: generation needs at least one token")
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
      raise ConfigError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if not temperature >= 0:
    raise ConfigError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
  if top_k is not None and not 1 <= top_k <= vocab_size:
    raise ConfigError(f"top_k={top_k!r} must be in [1, vocab size {vocab_size}] or None")
  longest = max(len(ids) for ids in prompts)
  needed = longest + max_new_tokens - 1
  if max_len is not None and needed > max_len:
    raise ConfigError(f"max_len={max_len} is too short: the longest prompt has {longest} tokens "
                      f"and max_new_tokens={max_new_tokens} needs {needed} cache positions")
  return needed


def generate(config, params, model_state, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             key: jax.Array | None = None, eos_id: int | None = None,
             max_len: int | None = None) -> list[list[int]]:
  """New token ids for each prompt: greedy at temperature 0, else sampled.

  Args:
    config: a `llama.LlamaConfig` or `moe.MoEConfig`.
    params, model_state: the model's (`{}` for LLaMA; MoE routing uses its bias).
    prompts: token ids per row, any lengths >= 1 (padded on the right internally).
    max_new_tokens: tokens to produce per row (fewer when the row produces `eos_id`).
    temperature: 0 for greedy; else the softmax temperature of sampling.
    top_k: sample among the k largest logits only (None: all).
    key: PRNG key for sampling (default key 0); row b draws from fold_in(key, b), so a row
      is reproducible and, at index 0, equals that prompt generated alone.
    eos_id: stop a row after it produces this id (kept as its last token).
    max_len: cache length; default exactly what the request needs.

  Returns:
    Per row, the new ids (up to and including the first `eos_id`).
  """
  vocab = base_config(config).vocab_size
  needed = check_request(prompts, max_new_tokens, vocab, max_len=max_len,
                         temperature=temperature, top_k=top_k)
  B, T = len(prompts), max(len(ids) for ids in prompts)
  tokens_BxT = np.zeros((B, T), np.int32)
  for b, ids in enumerate(prompts):
    tokens_BxT[b, :len(ids)] = ids
  lengths_B = np.asarray([len(ids) for ids in prompts], np.int32)
  out = decode_loop(config, params, model_state, jnp.asarray(tokens_BxT), jnp.asarray(lengths_B),
                    jax.random.key(0) if key is None else key, jnp.float32(temperature),
                    jnp.int32(top_k or 0), jnp.int32(-1 if eos_id is None else eos_id),
                    max_len=max_len or needed, num_tokens=int(max_new_tokens))
  rows = np.asarray(out).tolist()
  if eos_id is not None:
    rows = [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]
  return rows
