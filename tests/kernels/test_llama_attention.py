"""The LLaMA model through each attention implementation: logits and gradients match "xla"."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.models import llama

# head_dim 64 (a size the Pallas kernel supports), GQA 2:1, an odd sequence length.
CONFIG = llama.LlamaConfig(vocab_size=64, dim=128, num_layers=2, num_heads=2,
                           num_kv_heads=1, ffn_dim=128)


def _logits_and_grads(config, params, tokens):
  def loss(params):
    logits = llama.forward_logits(config, params, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.fixture(scope="module")
def naive():
  params = llama.init(CONFIG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, CONFIG.vocab_size)
  return params, tokens, _logits_and_grads(CONFIG, params, tokens)


@pytest.mark.parametrize("implementation", ["blockwise", "pallas"])
def test_logits_and_gradients_match_naive(naive, implementation):
  params, tokens, (want_logits, want_grads) = naive
  config = dataclasses.replace(CONFIG, attention=implementation)
  logits, grads = _logits_and_grads(config, params, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-4, atol=1e-4)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = want_grads
    for key in path:
      w = w[key.key]
    scale = float(jnp.max(jnp.abs(w))) + 1e-12
    err = float(jnp.max(jnp.abs(g - w))) / scale
    assert err < 1e-4, (jax.tree_util.keystr(path), err)


def test_attention_flag_is_validated():
  with pytest.raises(ValueError, match="attention='flash' is not one of"):
    dataclasses.replace(CONFIG, attention="flash")
  assert llama.get_config("tiny").attention == "xla"  # default: the naive path, unchanged
