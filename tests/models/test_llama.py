"""The JAX LLaMA against an independent numpy forward, plus protocol and config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.models import llama, protocol


def _numpy_forward(c: llama.LlamaConfig, params, tokens):
  """Straightforward numpy LLaMA: explicit per-head loops, float64, no shared code."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  B, T = tokens.shape
  Dh, G = c.head_dim, c.num_heads // c.num_kv_heads

  def norm(x, w):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * w

  def rotate(x):  # x: [T, Dh]; pairs (i, i + Dh/2)
    half = Dh // 2
    out = np.empty_like(x)
    for t in range(T):
      for i in range(half):
        angle = t / c.rope_theta ** (2 * i / Dh)
        a, b = x[t, i], x[t, i + half]
        out[t, i] = a * np.cos(angle) - b * np.sin(angle)
        out[t, i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out

  x = p["embed"]["tokens"][tokens]
  for l in range(c.num_layers):
    w = {k: v[l] for k, v in p["blocks"].items()}
    h = norm(x, w["attn_norm"])
    q, k, v = h @ w["wq"], h @ w["wk"], h @ w["wv"]
    heads = []
    for b in range(B):
      per_head = []
      for hq in range(c.num_heads):
        hk = hq // G  # query head hq reads kv head hq // G
        qh = rotate(q[b, :, hq * Dh:(hq + 1) * Dh])
        kh = rotate(k[b, :, hk * Dh:(hk + 1) * Dh])
        vh = v[b, :, hk * Dh:(hk + 1) * Dh]
        s = qh @ kh.T / np.sqrt(Dh)
        s[np.triu_indices(T, 1)] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        per_head.append((s / s.sum(-1, keepdims=True)) @ vh)
      heads.append(np.concatenate(per_head, -1))
    x = x + np.stack(heads) @ w["wo"]
    h = norm(x, w["mlp_norm"])
    gate = h @ w["w_gate"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w_up"])) @ w["w_down"]
  h = norm(x, p["head"]["final_norm"])
  unembed = p["embed"]["tokens"].T if c.tie_embeddings else p["head"]["unembed"]
  return h @ unembed


@pytest.mark.parametrize("tie", [True, False])
def test_matches_numpy_reference(tie):
  c = dataclasses.replace(llama.CONFIGS["tiny"], tie_embeddings=tie)
  params = llama.init(c, jax.random.key(1))
  # Norm weights away from 1 so a missing norm scale would show.
  params["blocks"]["attn_norm"] = 1 + 0.1 * jax.random.normal(jax.random.key(2), (c.num_layers, c.dim))
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 7), 0, c.vocab_size))
  got = jax.jit(lambda p, t: llama.forward_logits(c, p, t))(params, tokens)
  want = _numpy_forward(c, params, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_losses_match_logits():
  c = llama.CONFIGS["tiny"]
  params = llama.init(c, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, c.vocab_size)
  logits = llama.forward_logits(c, params, tokens)
  logp = jax.nn.log_softmax(logits, -1)
  targets = jnp.roll(tokens, -1, axis=1)
  lm_loss, lm_metrics = jax.jit(lambda p, b: llama.loss_fn(c, p, b))(
      params, {"tokens": tokens, "targets": targets})
  want = -jnp.take_along_axis(logp, targets[..., None], -1).mean()
  np.testing.assert_allclose(lm_loss, want, rtol=1e-5)
  assert lm_metrics["count"] == 18

  # Classification = softmax restricted to the candidate words' logits at last_index.
  last, cands, label = jnp.array([2, 5, 0]), jnp.array([[7, 9]] * 3), jnp.array([1, 0, 1])
  weight = jnp.array([1.0, 1.0, 0.0])  # third example is padding
  loss, m = llama.loss_fn(c, params, {"tokens": tokens, "last_index": last,
                                      "candidates": cands, "label": label, "weight": weight})
  sel = logits[jnp.arange(3), last][:, jnp.array([7, 9])]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(sel, -1), label[:, None], -1)[:, 0]
  np.testing.assert_allclose(loss, nll[:2].mean(), rtol=1e-5)
  assert m["count"] == 2
  assert m["correct"] == jnp.sum((jnp.argmax(sel, -1) == label)[:2])


def test_remat_and_scan_match_unrolled_blocks():
  c = llama.CONFIGS["tiny"]
  params = llama.init(c, jax.random.key(0))
  model = llama.make(c)
  batch = {"tokens": jax.random.randint(jax.random.key(1), (2, 5), 0, c.vocab_size)}
  x = model.embed(params, batch)
  for l in range(c.num_layers):
    x = model.block(jax.tree.map(lambda a: a[l], params["blocks"]), x)
  scanned = protocol.run_blocks(model, params["blocks"], model.embed(params, batch), remat=True)
  np.testing.assert_allclose(scanned, x, rtol=1e-6, atol=1e-6)


def test_param_axes_cover_every_leaf():
  for name in ("tiny", "galore-60m"):
    c = llama.CONFIGS[name]
    shapes, axes = llama.param_shapes(c), llama.param_axes(c)
    assert jax.tree.structure(shapes) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple))
    for s, a in zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
      assert len(s.shape) == len(a), (s.shape, a)


def test_paper_sizes():
  # GaLore's Table 2 names these 60M / 130M / 350M / 1B; SmolLM2 is 135M.
  sizes = {n: llama.CONFIGS[n].num_params / 1e6 for n in llama.CONFIGS}
  assert 55 < sizes["galore-60m"] < 62 and 125 < sizes["galore-130m"] < 140
  assert 340 < sizes["galore-350m"] < 380 and 1200 < sizes["galore-1b"] < 1400
  assert 134 < sizes["smollm2-135m"] < 136


def test_bad_config_and_batch_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama.LlamaConfig(vocab_size=8, dim=8, num_layers=1, num_heads=3, num_kv_heads=2, ffn_dim=8)
  with pytest.raises(ValueError, match="model.name"):
    llama.get_config("nope")
  c = llama.CONFIGS["tiny"]
  with pytest.raises(ValueError, match="targets"):
    llama.loss_fn(c, llama.init(c, jax.random.key(0)), {"tokens": jnp.zeros((1, 3), jnp.int32)})
