"""GaLore: galore-torch's numbers, the SGD identity, per-layer projection of stacked leaves,
refresh semantics (signs, subspace, non-finite SVD, moment policies), bad input. Updates run
under jax.jit, as optax's tests run them."""

import dataclasses
import importlib
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zojax import optim
from zojax.models import llama

from zojax.optim import adam8bit_transform as A8
from zojax.optim import galore_transform as G

FIXTURE = pathlib.Path(__file__).parent / "data" / "galore_torch_adamw.npz"
NAMES = ("w_tall", "w_wide", "b")
DN = {"w_tall": G.GaLoreDimensionNumbers(), "w_wide": G.GaLoreDimensionNumbers(), "b": None}


def _rel(a, b, ref):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b - ref))


def _replay(data, proj_type):
  """zojax's galore_adamw on the fixture's gradients; parameters after every step."""
  meta = eval(str(data["meta"]))  # noqa: S307  (our own fixture: a dict repr)
  settings = optim.GaLoreSettings(rank=meta["rank"], update_proj_gap=meta["update_proj_gap"],
                                  proj_type=proj_type, weight_dimension_numbers=DN)
  tx = optim.galore_adamw(meta["lr"], b1=meta["betas"][0], b2=meta["betas"][1], eps=meta["eps"],
                          scale=meta["scale"], settings=settings)
  params = {k: jnp.asarray(data[f"init_{k}"]) for k in NAMES}
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(meta["steps"]):
    grads = {k: jnp.asarray(data[f"grads_{k}"][t]) for k in NAMES}
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(jax.tree.map(np.asarray, params))
  return meta, out


@pytest.mark.parametrize("proj_type", G.PROJ_TYPES)
def test_matches_galore_torch(proj_type):
  """Recorded from galore-torch 1.0 (experiments/galore_torch_reference.py).

  Until the second SVD (steps < T) the official run does not depend on singular-vector signs
  and zojax matches it; after a refresh with kept moments it does, so the comparison goes on
  against galore-torch with canonicalized signs. `full` projects G to the nearly diagonal
  P^T G Q^T, whose off-diagonal entries are round-off that Adam normalizes to +-1: the two
  implementations agree only to ~1e-2 there.
  """
  data = np.load(FIXTURE)
  meta, traj = _replay(data, proj_type)
  tol = 1e-2 if proj_type == "full" else 2e-5
  for t, params in enumerate(traj):
    for k in NAMES:
      init = data[f"init_{k}"]
      if t < meta["update_proj_gap"]:
        assert _rel(params[k], data[f"official_{proj_type}_{k}"][t], init) < tol, (t, k)
      assert _rel(params[k], data[f"canonical_{proj_type}_{k}"][t], init) < tol, (t, k)
  # The official run really does diverge after the refresh: the test can tell the two apart.
  t = meta["steps"] - 1
  assert _rel(traj[t]["w_tall"], data[f"official_{proj_type}_w_tall"][t],
              data["init_w_tall"]) > 1e-2


def test_live_galore_torch_if_installed():
  """With torch and galore-torch installed (not a zojax dependency), re-record and compare."""
  pytest.importorskip("torch")
  pytest.importorskip("galore_torch")
  path = pathlib.Path(__file__).parents[2] / "experiments" / "galore_torch_reference.py"
  spec = importlib.util.spec_from_file_location("galore_torch_reference", path)
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  data = np.load(FIXTURE)
  grads = {k: data[f"grads_{k}"] for k in NAMES}
  init = {k: data[f"init_{k}"] for k in NAMES}
  _, traj = _replay(data, "std")
  live = ref.run("std", grads, init, canonical=True)
  for k in NAMES:
    assert _rel(traj[-1][k], live[k][-1], init[k]) < 2e-5


def _stacked_params(rng, L=3, m=12, n=8):
  return {"blocks": {"wq": jnp.asarray(rng.standard_normal((L, m, n)), jnp.float32),
                     "w_up": jnp.asarray(rng.standard_normal((L, n, m)), jnp.float32),
                     "attn_norm": jnp.ones((L, n), jnp.float32)},
          "embed": {"tokens": jnp.asarray(rng.standard_normal((10, n)), jnp.float32)}}


@pytest.mark.parametrize("proj_type", G.PROJ_TYPES)
@pytest.mark.parametrize("projector", G.PROJECTOR_METHODS)
def test_full_rank_with_identity_inner_is_sgd(proj_type, projector):
  """rank = min(m, n), inner = identity, scale 1, refresh every step: P P^T G = G, so SGD."""
  rng = np.random.default_rng(0)
  params = _stacked_params(rng)
  tx = optim.galore(0.1, optax.identity(), scale=1.0, settings=optim.GaLoreSettings(
      rank=8, update_proj_gap=1, proj_type=proj_type, projector=projector))
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  for _ in range(2):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, grads),
                                rtol=2e-4, atol=2e-5)


def test_stacked_leaf_is_projected_per_layer():
  """An [L, m, n] leaf gives exactly what L separate [m, n] leaves give."""
  rng = np.random.default_rng(1)
  stacked = {"wq": jnp.asarray(rng.standard_normal((3, 12, 8)), jnp.float32)}
  split = {f"wq{l}": stacked["wq"][l] for l in range(3)}
  settings = optim.GaLoreSettings(rank=3, update_proj_gap=2)
  tx_s = optim.galore_adamw(1e-2, settings=settings)
  tx_p = optim.galore_adamw(1e-2, settings=dataclasses.replace(
      settings, weight_dimension_numbers=G.GaLoreDimensionNumbers()))
  s_s, s_p = jax.jit(tx_s.init)(stacked), jax.jit(tx_p.init)(split)
  up_s, up_p = jax.jit(tx_s.update), jax.jit(tx_p.update)
  for _ in range(3):
    g = jnp.asarray(rng.standard_normal((3, 12, 8)), jnp.float32)
    u_s, s_s = up_s({"wq": g}, s_s, stacked)
    u_p, s_p = up_p({f"wq{l}": g[l] for l in range(3)}, s_p, split)
    chex.assert_trees_all_close(list(u_s["wq"]), [u_p[f"wq{l}"] for l in range(3)],
                                rtol=1e-5, atol=1e-7)


def test_default_plan_projects_attention_and_mlp_kernels_only():
  params = llama.param_shapes(llama.get_config("tiny"))
  plan = optim.galore_plan(params, optim.GaLoreSettings(rank=8))
  projected = {k for k, v in plan.items() if not v.startswith("full rank")}
  assert projected == {f"['blocks']['{k}']" for k in
                       ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
  assert len(plan) == len(jax.tree.leaves(params))  # every leaf accounted for
  # std reduces the smaller side, per layer: w_up [2, 64, 128] -> [2, 8, 128].
  assert plan["['blocks']['w_up']"] == "left: 2 x [64, 128] -> [8, 128]"
  assert plan["['blocks']['w_down']"] == "right: 2 x [128, 64] -> [128, 8]"
  tx = optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(rank=8))
  state = jax.eval_shape(tx.init, params)
  mu = state[0].inner_state.mu["blocks"]
  chex.assert_shape([mu["w_up"], mu["w_down"]], [(2, 8, 128), (2, 128, 8)])
  chex.assert_shape(state[0].projectors.left["blocks"]["w_up"], (2, 64, 8))
  assert state[0].projectors.right["blocks"]["w_up"] is None


def test_canonical_signs_make_the_projector_sign_free():
  rng = np.random.default_rng(2)
  u = jnp.asarray(np.linalg.qr(rng.standard_normal((10, 4)))[0], jnp.float32)
  flips = jnp.asarray([1.0, -1.0, -1.0, 1.0])
  a, b = G.canonicalize_signs(u, -2), G.canonicalize_signs(u * flips, -2)
  np.testing.assert_array_equal(a, b)
  idx = jnp.argmax(jnp.abs(a), axis=0)
  assert bool(jnp.all(a[idx, jnp.arange(4)] > 0))


def _lowrank_grad(rng, m, n, k=3, noise=1e-3):
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  return jnp.asarray((u * [3.0, 2.0, 1.0][:k]) @ v.T + noise * rng.standard_normal((m, n)),
                     jnp.float32)


def test_update_at_a_refresh_lies_in_the_new_subspace():
  """Kept moments from the old subspace are projected back with the new P: the update is in
  span(P_new), and P_new spans G_T's top-r left singular vectors."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros((8, 20), jnp.float32)}
  tx = optim.galore_adamw(1.0, scale=1.0, settings=optim.GaLoreSettings(
      rank=3, update_proj_gap=3, weight_dimension_numbers=G.GaLoreDimensionNumbers()))
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  for t in range(4):
    g = _lowrank_grad(rng, 8, 20)
    u, state = update({"w": g}, state, params)
  p = np.asarray(state[0].projectors.left["w"])  # refreshed at t = 3 from g
  u = np.asarray(u["w"])
  assert np.linalg.norm(u - p @ (p.T @ u)) < 1e-5 * np.linalg.norm(u)
  top = np.linalg.svd(np.asarray(g))[0][:, :3]
  np.testing.assert_allclose(p @ p.T, top @ top.T, atol=1e-4)


def test_randomized_projector_is_close_to_optimal():
  rng = np.random.default_rng(4)
  g = _lowrank_grad(rng, 64, 48, k=3, noise=0.05)
  exact = G._exact_projector(g, "left", 3)["left"]
  warm = jnp.eye(64, 3, dtype=jnp.float32)
  rand = G._randomized_projector(g, {"left": warm}, jax.random.key(0), "left", 3, 1, 8)["left"]
  energy = lambda p: float(jnp.linalg.norm(p.T @ g) ** 2)
  assert energy(rand) >= 0.99 * energy(exact)
  assert np.allclose(rand.T @ rand, np.eye(3), atol=1e-5)


def test_non_finite_svd_keeps_the_old_projector_and_counts(monkeypatch):
  rng = np.random.default_rng(5)
  params = {"w": jnp.zeros((3, 8, 6), jnp.float32)}
  real = G._exact_projector

  def poisoned(g, side, rank):  # the SVD of a layer whose gradient starts with 123 fails
    out = real(g, side, rank)
    bad = jnp.any(g[0, 0] == 123.0)
    return jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), out)
  # Patched before the first trace: jit caches traces by function, not by jit wrapper.
  monkeypatch.setattr(G, "_exact_projector", poisoned)
  tx = optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(
      rank=2, update_proj_gap=2,
      weight_dimension_numbers=G.GaLoreDimensionNumbers(batch_axes=(0,))))
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  draw = lambda: jnp.asarray(rng.standard_normal((3, 8, 6)), jnp.float32)
  state = update({"w": draw()}, state, params)[1]  # step 0: refresh, all layers fine
  before = state[0].projectors.right["w"]
  state = update({"w": draw()}, state, params)[1]  # step 1: no refresh
  u, state = update({"w": draw().at[1, 0, 0].set(123.0)}, state, params)  # step 2: refresh
  after = state[0].projectors.right["w"]
  assert int(state[0].svd_failures) == 1
  chex.assert_trees_all_equal(after[1], before[1])
  assert not np.allclose(after[0], before[0])
  chex.assert_tree_all_finite(u)


def test_non_finite_gradient_is_skipped_and_counted_by_skip_nonfinite():
  # GaLore skips nothing itself; the one skipping transform keeps its whole state, so a NaN
  # gradient's failed refresh SVD is not counted either.
  rng = np.random.default_rng(6)
  params = _stacked_params(rng)
  tx = optim.skip_nonfinite(
      optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(rank=4, update_proj_gap=1)))
  update = jax.jit(tx.update)
  good = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
  _, state = update(good, jax.jit(tx.init)(params), params)
  bad = jax.tree.map(lambda x: x, good)
  bad["blocks"]["wq"] = bad["blocks"]["wq"].at[0, 0, 0].set(jnp.inf)
  u, new = update(bad, state, params)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
  assert int(new.skipped) == 1 and int(new.inner_state[0].svd_failures) == 0
  chex.assert_trees_all_equal(new.inner_state, state.inner_state)


def _refresh_with(inner, policy, grad, rank=3, shape=(10, 6)):
  """Inner states and projectors just before and after the refresh at step 2 (T = 2)."""
  tx = G.scale_by_galore(inner, settings=optim.GaLoreSettings(
      rank=rank, update_proj_gap=2, moment_policy=policy,
      weight_dimension_numbers=G.GaLoreDimensionNumbers()))
  state = jax.jit(tx.init)({"w": jnp.zeros(shape, jnp.float32)})
  update = jax.jit(tx.update)
  for _ in range(2):
    state = update({"w": grad()}, state)[1]
  g = grad()
  return g, state, update({"w": g}, state)[1]


@pytest.mark.parametrize("policy", ["keep", "reset", "reproject"])
def test_moment_policy_at_a_refresh(policy):
  rng = np.random.default_rng(7)
  b1, b2 = 0.9, 0.999
  g, old, new = _refresh_with(optax.scale_by_adam(b1=b1, b2=b2), policy,
                              lambda: _lowrank_grad(rng, 10, 6))
  q_old, q_new = old.projectors.right["w"], new.projectors.right["w"]
  rot = q_old @ q_new.T
  low = g @ q_new.T
  mu, nu = old.inner_state.mu["w"], old.inner_state.nu["w"]
  carried = {"keep": (mu, nu), "reset": (0 * mu, 0 * nu),
             "reproject": (mu @ rot, nu @ (rot * rot))}[policy]
  chex.assert_trees_all_close(
      (new.inner_state.mu["w"], new.inner_state.nu["w"]),
      (b1 * carried[0] + (1 - b1) * low, b2 * carried[1] + (1 - b2) * low * low),
      rtol=1e-5, atol=1e-6)


def test_reproject_rotates_a_nonnegative_first_moment_linearly():
  """Which moment a leaf is comes from its state field, not its values: an all non-negative
  first moment (positive gradients, rank 1) still rotates linearly, the second moment by the
  squared rotation. Deciding by sign gave mu the squared rotation."""
  rng = np.random.default_rng(8)
  b1, b2 = 0.9, 0.999
  g, old, new = _refresh_with(optax.scale_by_adam(b1=b1, b2=b2), "reproject",
                              lambda: jnp.asarray(np.abs(rng.standard_normal((10, 6))),
                                                  jnp.float32), rank=1)
  mu, nu = old.inner_state.mu["w"], old.inner_state.nu["w"]
  assert bool(jnp.all(mu >= 0))  # the case a sign test gets wrong
  rot = old.projectors.right["w"] @ new.projectors.right["w"].T  # [1, 1]
  assert abs(float(rot[0, 0])) < 0.999  # the squared rotation differs from the rotation
  low = g @ new.projectors.right["w"].T
  chex.assert_trees_all_close(new.inner_state.mu["w"], b1 * mu @ rot + (1 - b1) * low,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new.inner_state.nu["w"],
                              b2 * nu @ (rot * rot) + (1 - b2) * low * low, rtol=1e-5, atol=1e-6)


def test_reset_of_8bit_moments_is_the_initial_state():
  """A reset puts the inner optimizer's initial state back: for 8-bit moments the code of
  zero (code 0 is -1 on the signed codebook) and unit scales, so after the refresh step the
  moments hold only that step's gradient."""
  rng = np.random.default_rng(9)
  b1 = 0.9
  inner = optim.scale_by_adam8bit(b1=b1, settings=optim.Adam8bitSettings(block_size=8,
                                                                          min_8bit_size=16))
  g, old, new = _refresh_with(inner, "reset", lambda: _lowrank_grad(rng, 16, 8), shape=(16, 8))
  assert old.inner_state.mu["w"].dtype == jnp.uint8
  mu = A8.dequantize(new.inner_state.mu["w"], new.inner_state.mu_scale["w"], signed=True,
                     block_size=8)
  want = (1 - b1) * (g @ new.projectors.right["w"].T)
  chex.assert_trees_all_close(mu, want, atol=0.05 * float(jnp.max(jnp.abs(want))))


def test_reproject_refuses_state_it_cannot_rotate():
  params = {"w": jnp.zeros((10, 6), jnp.float32)}
  settings = optim.GaLoreSettings(rank=3, moment_policy="reproject",
                                  weight_dimension_numbers=G.GaLoreDimensionNumbers())
  with pytest.raises(ValueError, match=r"^galore8bit: settings.moment_policy='reproject' "
                                       r"cannot rotate 8-bit moments"):
    optim.galore8bit(1e-2, settings=settings)
  quantized = optim.scale_by_adam8bit(settings=optim.Adam8bitSettings(min_8bit_size=16))
  with pytest.raises(ValueError, match=r"field 'mu' of \['w'\] is uint8 \(e.g. 8-bit moments\)"):
    G.scale_by_galore(quantized, settings=settings).init(params)
  # Adan's m, v, n: no known first or second moment names.
  with pytest.raises(ValueError, match=r"field 'm' of \['w'\] is neither a first moment"):
    G.scale_by_galore(optax.scale_by_adan(), settings=settings).init(params)


def test_bad_settings_are_one_line_errors_naming_the_field():
  params = {"blocks": {"wq": jnp.zeros((2, 8, 6))}, "norm": jnp.ones(6)}
  with pytest.raises(ValueError, match=r"rank=7 for leaf \['blocks'\]\['wq'\] with shape "
                                       r"\(2, 8, 6\).*1\.\.min\(m, n\)=6"):
    optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(rank=7)).init(params)
  with pytest.raises(ValueError, match=r"^GaLoreSettings: rank=0 must be an int >= 1$"):
    optim.GaLoreSettings(rank=0)
  with pytest.raises(ValueError, match=r"rank=2.0 must be an int"):
    optim.GaLoreSettings(rank=2.0)
  with pytest.raises(ValueError, match=r"proj_type='sideways' is not one of \('std', "
                                       r"'reverse_std', 'left', 'right', 'full'\)"):
    optim.GaLoreSettings(proj_type="sideways")
  with pytest.raises(ValueError, match=r"^Adam8bitSettings: block_size=0 must be an int >= 1$"):
    optim.GaLoreSettings(block_size=0)
  with pytest.raises(TypeError, match=r"galore8bit: settings must be a GaLoreSettings, got dict"):
    optim.galore8bit(1e-2, settings={"rank": 2})
  with pytest.raises(TypeError, match=r"unexpected keyword argument 'rank'"):
    optim.galore_adamw(1e-2, rank=2)  # structural settings go in GaLoreSettings
  with pytest.raises(ValueError, match=r"leaf \['norm'\] with shape \(6,\) is masked for "
                                       r"projection but is not a matrix"):
    optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(rank=2, weight_dimension_numbers={
        "blocks": {"wq": True}, "norm": True})).init(params)
  with pytest.raises(ValueError, match=r"name every axis exactly once"):
    optim.galore_adamw(1e-2, settings=optim.GaLoreSettings(rank=2, weight_dimension_numbers={
        "blocks": {"wq": G.GaLoreDimensionNumbers()}, "norm": None})).init(params)
