"""MoEfication: balanced k-means, the exact dense -> experts split, router fitting, the loader."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from zojax.data import fetch
from zojax.errors import ConfigError
from zojax.models import llama, moe, moefy, protocol, registry

BASE = dataclasses.replace(llama.CONFIGS["tiny"], ffn_dim=128)  # 8 experts of 16 units
E = 8


@pytest.fixture(scope="module")
def dense():
  params = llama.init(BASE, jax.random.key(0))
  w_gate = np.asarray(params["blocks"]["w_gate"])
  perm = np.stack([moefy.cluster_units(w_gate[l], E, iters=5, seed=l)[0]
                   for l in range(BASE.num_layers)])
  return params, perm


def _logits(config, params, tokens):
  model = moe.make(config, moe.init_state(config, None))
  carry = protocol.run_blocks(model, params["blocks"], model.embed(params, {"tokens": tokens}))
  h = llama.rms_norm(carry["x"], params["head"]["final_norm"], BASE.norm_eps)
  return h @ params["embed"]["tokens"].T


def test_all_experts_with_unit_gates_equal_the_dense_model(dense):
  params, perm = dense
  router = np.random.default_rng(0).normal(size=(BASE.num_layers, BASE.dim, E))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, BASE.vocab_size)
  want = llama.forward_logits(BASE, params, tokens)
  logits = jax.jit(_logits, static_argnums=0)
  for k, close in ((E, True), (E // 2, False)):  # half the experts: a visible change
    config, moe_params = moefy.to_moe(BASE, params, perm, router, top_k=k)
    got = logits(config, moe_params, tokens)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5) == close, (k, np.abs(got - want).max())


def test_each_expert_is_the_dense_ffn_restricted_to_its_units(dense):
  params, perm = dense
  stacks = moefy.split_experts(params["blocks"], perm, E)
  h = jax.random.normal(jax.random.key(2), (5, BASE.dim))
  layer, G = 1, BASE.ffn_dim // E
  w = {k: params["blocks"][k][layer] for k in ("w_gate", "w_up", "w_down")}
  for e in (0, 5):
    units = perm[layer, e * G:(e + 1) * G]
    mask = np.zeros(BASE.ffn_dim, np.float32)
    mask[units] = 1.0
    # The dense SwiGLU with every other hidden unit switched off.
    want = (jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"]) * mask) @ w["w_down"]
    got = llama.swiglu(h, stacks["expert_gate"][layer, e], stacks["expert_up"][layer, e],
                       stacks["expert_down"][layer, e])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Groups come in a canonical order: by lowest unit, ascending inside a group.
  groups = perm.reshape(BASE.num_layers, E, G)
  assert (np.diff(groups, axis=-1) > 0).all()
  assert (np.diff(groups[..., 0], axis=-1) > 0).all()
  assert all(sorted(p) == list(range(BASE.ffn_dim)) for p in perm)


def test_balanced_kmeans_recovers_planted_clusters_in_equal_sizes():
  rng = np.random.default_rng(0)
  centres = 10 * rng.normal(size=(4, 3))
  planted = rng.permutation(np.repeat(np.arange(4), 6))
  x = centres[planted] + 0.1 * rng.normal(size=(24, 3))
  labels, _ = moefy.balanced_kmeans(x, 4, seed=1)
  # The same partition, up to cluster names.
  assert len({(a, b) for a, b in zip(planted, labels)}) == 4
  # Unequal blobs (3, 9, 6, 6 points) still come out in four groups of six.
  uneven = np.repeat(np.arange(4), [3, 9, 6, 6])
  labels, _ = moefy.balanced_kmeans(centres[uneven] + 0.1 * rng.normal(size=(24, 3)), 4)
  assert np.bincount(labels).tolist() == [6, 6, 6, 6]
  # On structureless data it takes several rounds, and the objective never goes up.
  labels, history = moefy.balanced_kmeans(rng.normal(size=(96, 8)), 8, seed=0)
  assert len(history) > 2 and np.all(np.diff(history) <= 1e-9), history
  assert np.bincount(labels).tolist() == [12] * 8
  with pytest.raises(ConfigError, match="k=5 must divide"):
    moefy.balanced_kmeans(x, 5)


def test_unit_permutation_depends_on_the_partition_only():
  labels = np.array([2, 0, 1, 0, 2, 1])
  renamed = np.array([0, 1, 2, 1, 0, 2])  # the same partition, other names
  np.testing.assert_array_equal(moefy.unit_permutation(labels, 3), [0, 4, 1, 3, 2, 5])
  np.testing.assert_array_equal(moefy.unit_permutation(renamed, 3), [0, 4, 1, 3, 2, 5])


def test_router_recovers_a_planted_linear_rule_and_not_shuffled_labels():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(3000, 16)).astype(np.float32)
  w_true = rng.normal(size=(16, E)).astype(np.float32)
  labels = moefy.top_k_mask(h @ w_true, 2)
  train, test = slice(0, 2000), slice(2000, None)
  w, losses = moefy.fit_router(h[train], labels[train], steps=50)
  assert w.dtype == np.float32 and losses[-1] < losses[0]
  assert moefy.recall_at_k(h[test] @ w, h[test] @ w_true, 2) > 0.85
  shuffled = labels[train][rng.permutation(2000)]
  w_shuffled, _ = moefy.fit_router(h[train], shuffled, steps=50)
  # Chance is K / E = 0.25.
  assert moefy.recall_at_k(h[test] @ w_shuffled, h[test] @ w_true, 2) < 0.4


def test_convert_end_to_end_on_a_tiny_model(dense):
  params, _ = dense
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, 32), 0, BASE.vocab_size))
  settings = moefy.MoefyConfig(num_experts=E, label_k=2, router_steps=30, kmeans_iters=5)
  perm, router, report = moefy.convert(BASE, params, tokens, settings)
  assert perm.shape == (BASE.num_layers, BASE.ffn_dim) and router.shape == (2, BASE.dim, E)
  _, moe_params = moefy.to_moe(BASE, params, perm, router, top_k=2)
  recall = moefy.router_recall(BASE, moe_params, tokens, 2)
  np.testing.assert_allclose(recall, report["router_train_recall"], rtol=1e-6)
  assert (recall > 2 / E + 0.1).all(), recall  # better than chance
  with pytest.raises(ConfigError, match="'moefy.num_experts'=5 must divide"):
    moefy.convert(BASE, params, tokens, dataclasses.replace(settings, num_experts=5))


def test_registered_model_without_a_cached_conversion(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  cfg = ml_collections.ConfigDict({"name": "smollm2-135m-moe", "top_k": 8})
  model = registry.build(cfg)
  assert model.info["top_k"] == 8 and model.info["gates"] == "unit"
  with pytest.raises(fetch.AssetError) as e:
    model.pretrained()
  assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
  with pytest.raises(ConfigError, match="'model.top_k'=17"):
    registry.build(ml_collections.ConfigDict({"name": "smollm2-135m-moe", "top_k": 17}))
