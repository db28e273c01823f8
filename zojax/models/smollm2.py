"""SmolLM2-135M-Instruct from its GGUF file, as `zojax.models.llama` parameters.

  config, params = load_smollm2()
  logits = llama.forward_logits(config, params, tokens_BxT)

The GGUF holds Q4_1 matrices and a Q8_0 token table (see third_party/smollm2/NOTICE.md);
they are dequantized to float32 and then cast to `dtype`, so the weights carry the
quantization error of that file, not the original bf16 checkpoint.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np

from zojax.data import gguf_file
from zojax.errors import ConfigError
from zojax.models import interface, llama, registry

CONFIG_NAME = "smollm2-135m"

# LlamaConfig field -> GGUF key holding it (llama.cpp's names for the "llama" architecture).
METADATA_KEYS = {
    "vocab_size": "llama.vocab_size",
    "dim": "llama.embedding_length",
    "num_layers": "llama.block_count",
    "num_heads": "llama.attention.head_count",
    "num_kv_heads": "llama.attention.head_count_kv",
    "ffn_dim": "llama.feed_forward_length",
    "head_dim": "llama.rope.dimension_count",
    "rope_theta": "llama.rope.freq_base",
    "norm_eps": "llama.attention.layer_norm_rms_epsilon",
}


def check_config(metadata: dict, tensor_names, config: llama.LlamaConfig) -> None:
  """Raises a one-line ValueError naming every field where a GGUF model differs from `config`.

  Args:
    metadata: the GGUF's key-value metadata.
    tensor_names: names of its tensors (a separate output.weight means untied embeddings).
    config: the config the parameters will be used with.
  """
  problems = []
  if (arch := metadata.get("general.architecture")) != "llama":
    problems.append(f"general.architecture={arch!r} (expected 'llama')")
  for field, key in METADATA_KEYS.items():
    want, got = getattr(config, field), metadata.get(key)
    # Floats are stored as float32 in GGUF (1e-5 reads back as 9.99999975e-06).
    same = got is not None and math.isclose(want, got, rel_tol=1e-6)
    if not same:
      problems.append(f"{field}={want} but {key}={got}")
  if config.tie_embeddings == ("output.weight" in tensor_names):
    problems.append(f"tie_embeddings={config.tie_embeddings} but the file "
                    f"{'has' if 'output.weight' in tensor_names else 'lacks'} output.weight")
  if problems:
    raise ValueError(f"GGUF model does not match LlamaConfig: {'; '.join(problems)}")


def unpermute_rope_rows(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's permutation of Q/K weight rows.

  llama.cpp's converter reorders each head's rows from rotate-half order (pairs i, i + Dh/2)
  to interleaved order (pairs 2i, 2i + 1) for ggml's "NORM" RoPE; `llama.rope` wants the
  former, so this maps row h*Dh + 2i + j back to h*Dh + j*Dh/2 + i.

  Args:
    w_OxI: a GGUF attn_q or attn_k weight, [num_heads * head_dim, in_features].
    num_heads: query heads for attn_q, kv heads for attn_k.

  Returns:
    The weight with rows in rotate-half order, same shape.
  """
  out, inp = w_OxI.shape
  return w_OxI.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def params_from_gguf(f: gguf_file.GGUFFile, config: llama.LlamaConfig, dtype=jnp.float32):
  """Converts a LLaMA GGUF's tensors to the `llama.init` parameter tree (after `check_config`)."""
  t = f.tensors

  def stack(name, transform=lambda w: w):
    return jnp.asarray(
        np.stack([transform(t[f"blk.{l}.{name}.weight"]) for l in range(config.num_layers)]),
        dtype)

  # GGUF matrices are [out, in]; the model applies x @ w, so they are transposed.
  q = lambda w: unpermute_rope_rows(w, config.num_heads).T
  k = lambda w: unpermute_rope_rows(w, config.num_kv_heads).T
  return {
      "embed": {"tokens": jnp.asarray(t["token_embd.weight"], dtype)},
      "blocks": {
          "attn_norm": stack("attn_norm"),
          "wq": stack("attn_q", q),
          "wk": stack("attn_k", k),
          "wv": stack("attn_v", np.transpose),
          "wo": stack("attn_output", np.transpose),
          "mlp_norm": stack("ffn_norm"),
          "w_gate": stack("ffn_gate", np.transpose),
          "w_up": stack("ffn_up", np.transpose),
          "w_down": stack("ffn_down", np.transpose),
      },
      "head": {"final_norm": jnp.asarray(t["output_norm.weight"], dtype)},
  }


def load_smollm2(dtype=jnp.float32, *, path: str | os.PathLike | None = None):
  """Loads SmolLM2-135M-Instruct, fetching its GGUF on first use.

  Args:
    dtype: parameter dtype (weights are dequantized to float32 first).
    path: a GGUF file to read instead of the fetched one.

  Returns:
    (config, params): `llama.CONFIGS["smollm2-135m"]` and its parameter tree.

  Raises:
    ValueError: the file's metadata does not match the config (names each field).
  """
  path = gguf_file.smollm2_gguf_path() if path is None else path
  f = gguf_file.read_gguf(path)
  config = llama.CONFIGS[CONFIG_NAME]
  try:
    check_config(f.metadata, f.tensors.keys(), config)
  except ValueError as e:
    raise ValueError(f"{path} (config {CONFIG_NAME!r}): {e}") from None
  return config, params_from_gguf(f, config, dtype)


@registry.register(CONFIG_NAME)
def _registered(cfg, task=None) -> interface.Model:
  """SmolLM2-135M: its GGUF weights with model.init='pretrained', else a random init."""
  config = llama.config_from(cfg, task)
  pretrained = None
  if cfg.get("init", "pretrained") == "pretrained":
    if config.vocab_size != llama.CONFIGS[CONFIG_NAME].vocab_size:
      raise ConfigError(f"config key 'model.vocab_size'={config.vocab_size}: the pretrained "
                        f"weights have {llama.CONFIGS[CONFIG_NAME].vocab_size} tokens")
    # Dequantized to float32; `config.dtype` is the compute dtype, as for a random init.
    pretrained = lambda: load_smollm2()[1]
  return llama.model(config, name=CONFIG_NAME, remat=cfg.get("remat", False),
                     pretrained=pretrained)
