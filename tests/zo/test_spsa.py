"""SPSA: unbiasedness, variance, the in-scan forward, micro-batching, flags, errors, RNG passes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax import optim, zo
from zojax.models import llama, protocol
from zojax.zo import perturb

# ---------------------------------------------------------------------------------------
# Statistics on small problems


def _estimates(loss_fn, theta, batch, num, eps, direction="gaussian"):
  """num independent one-sample dense estimates (vmapped over base keys): [num, d]."""
  def one(key):
    _, g = zo.spsa(loss_fn, theta, batch, key, eps=eps, direction=direction)
    return zo.materialize(g, theta)
  return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), num))


# Per-coordinate variance of the exact quadratic estimate ĝ = (zᵀg) z: E ĝ = g and
# Var ĝ_k = Σ_j g_j² E[z_j² z_k²] − g_k² = |g|² + g_k² for z ~ N(0, I) (E z⁴ = 3), and
# |g|² − g_k² for z uniform on {±1}^d (z_k² = 1).
_SIGN = {"gaussian": 1.0, "rademacher": -1.0}


def _quadratic(d, seed):
  rng = np.random.default_rng(seed)
  m = rng.standard_normal((d, d)) / np.sqrt(d)
  a = jnp.asarray(m @ m.T + np.eye(d), jnp.float32)
  b = jnp.asarray(rng.standard_normal(d), jnp.float32)
  theta = jnp.asarray(rng.standard_normal(d), jnp.float32)
  loss = lambda th, batch: 0.5 * th @ a @ th + b @ th
  return loss, theta, a @ theta + b


@pytest.mark.parametrize("direction", zo.DIRECTIONS)
def test_unbiased_on_a_quadratic_within_its_variance(direction):
  # For a quadratic the central difference is exact, so ĝ = (zᵀg) z: E ĝ = g, with the
  # variance above. The mean of N estimates is then within 5 sqrt(Var ĝ_k / N) of g_k (a
  # 5-sigma bound; P(any of d fails) < d * 6e-7), and the estimates' own spread matches it.
  loss, theta, grad = _quadratic(16, seed=0)
  grad = np.asarray(grad)
  num = 8000
  est = np.asarray(_estimates(loss, theta, None, num, eps=0.1, direction=direction))
  var = grad @ grad + _SIGN[direction] * grad ** 2
  np.testing.assert_array_less(np.abs(est.mean(0) - grad), 5 * np.sqrt(var / num))
  np.testing.assert_allclose(est.var(0), var, rtol=0.2)
  # The other distribution's variance is off by 2 g_k² somewhere by far more (measured: 0.67
  # and 1.9 relative): the check tells the two apart.
  other = grad @ grad - _SIGN[direction] * grad ** 2
  assert np.max(np.abs(est.var(0) / other - 1)) > 0.4
  np.testing.assert_allclose(np.asarray(jax.grad(loss)(theta, None)), grad, rtol=1e-5)


@pytest.mark.parametrize("direction", zo.DIRECTIONS)
def test_unbiased_on_logistic_regression(direction):
  # Not quadratic: the bias is O(ε²) (negligible at ε = 1e-3); the tolerance is 5 standard
  # errors of the mean, from the estimates' own per-coordinate spread (CLT).
  rng = np.random.default_rng(1)
  n, d = 64, 12
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(np.sign(rng.standard_normal(n)), jnp.float32)
  theta = jnp.asarray(rng.standard_normal(d) * 0.3, jnp.float32)
  loss = lambda th, batch: jnp.mean(jax.nn.softplus(-batch[1] * (batch[0] @ th)))
  num = 8000
  est = np.asarray(_estimates(loss, theta, (x, y), num, eps=1e-3, direction=direction))
  grad = np.asarray(jax.grad(loss)(theta, (x, y)))
  stderr = est.std(0) / np.sqrt(num)
  np.testing.assert_array_less(np.abs(est.mean(0) - grad), 5 * stderr)
  # The band is tight enough to catch a wrong scale (e.g. a missing factor 2 in 2ε).
  assert np.any(np.abs(0.5 * est.mean(0) - grad) > 5 * stderr)


@pytest.mark.parametrize("direction", zo.DIRECTIONS)
def test_variance_grows_with_dimension(direction):
  # E|ĝ - g|² = Σ_k Var ĝ_k = (d ± 1)|g|² for the exact quadratic estimate (+ Gaussian,
  # − Rademacher): the error energy grows like d at fixed |g|. Check both values and their
  # ratio.
  s = _SIGN[direction]
  num = 4000
  ratio = []
  for d in (8, 64):
    loss, theta, grad = _quadratic(d, seed=d)
    est = np.asarray(_estimates(loss, theta, None, num, eps=0.1, direction=direction))
    err = np.mean(np.sum((est - np.asarray(grad)) ** 2, axis=1))
    # At d = 8 the band excludes the other direction's (d ∓ 1)|g|² (9 vs 7).
    np.testing.assert_allclose(err, (d + s) * float(grad @ grad), rtol=0.2)
    ratio.append(err / float(grad @ grad))
  np.testing.assert_allclose(ratio[1] / ratio[0], (64 + s) / (8 + s), rtol=0.25)


# ---------------------------------------------------------------------------------------
# The in-scan forward on the tiny LLaMA

CFG = llama.CONFIGS["tiny"]
KEY, STEP, EPS = jax.random.key(11), 3, 1e-2


def _lm_batch(batch_size=8, seq=8, seed=1):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (batch_size, seq)), jnp.int32)
  weights = np.ones((batch_size, seq), np.float32)
  # Uneven padding: the batch halves have different token counts, so a plain mean of
  # micro-batch losses would be wrong; the head's loss_sum / count sums make it exact.
  weights[:batch_size // 2, seq - 3:] = 0.0
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.asarray(weights)}


def _params(cfg=CFG):
  return llama.init(cfg, jax.random.key(0))


# Shared compilations (XLA compile time dominates these tests on 2 CPU cores).
@jax.jit
def _explicit_losses(params, batch):
  """L(θ ± εz) with z = tree_noise(KEY, STEP, sample 1), through the dense forward."""
  z = zo.tree_noise(KEY, STEP, 1, params)
  return jnp.stack([llama.loss_fn(CFG, zo.perturb_tree(params, z, s), batch)[0]
                    for s in (EPS, -EPS)])


_plain_loss = jax.jit(lambda p, b: llama.loss_fn(CFG, p, b)[0])


@functools.partial(jax.jit, static_argnames=("microbatches", "one_sided"))
def _spsa_llama(params, batch, *, microbatches=1, one_sided=False):
  return zo.spsa(llama.make(CFG), params, batch, KEY, step=STEP, eps=EPS, num_samples=2,
                 microbatches=microbatches, one_sided=one_sided)


def test_in_scan_forward_equals_explicitly_perturbed_params():
  params, batch = _params(), _lm_batch()
  model = llama.make(CFG)
  forward = jax.jit(lambda p, b: zo.perturbed_forward(
      model, p, b, KEY, step=STEP, sample=1, scales=jnp.array([EPS, -EPS]))[0])
  in_scan = np.asarray(forward(params, batch))
  explicit = np.asarray(_explicit_losses(params, batch))
  np.testing.assert_allclose(in_scan, explicit, rtol=1e-6, atol=1e-6)
  # The perturbation is real: the branches differ by O(ε); their mean is L(θ) + O(ε² tr H)
  # (~1e-2 here: tr H is in the hundreds for this model).
  plain = float(_plain_loss(params, batch))
  assert abs(in_scan[0] - in_scan[1]) > 1e-3 and abs(in_scan.mean() - plain) < 5e-2
  # Parameters are untouched (no in-place perturbation to drift).
  np.testing.assert_array_equal(params["blocks"]["wq"], _params()["blocks"]["wq"])


@pytest.mark.parametrize("tied, direction", [(True, "gaussian"), (False, "rademacher")])
def test_lazy_token_table_equals_the_perturbed_table(tied, direction):
  """Classification reads only some table rows (tokens, label words) through PerturbedTable;
  the losses equal the dense forward on the explicitly perturbed tree, tied or untied
  (the untied [D, V] head table is sliced along its vocabulary axis, axis 1). One direction
  per case (a compile each): row draws of packed signs equal the full draw's rows too."""
  cfg = dataclasses.replace(CFG, tie_embeddings=tied)
  params = llama.init(cfg, jax.random.key(2))
  rng = np.random.default_rng(3)
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 8)), jnp.int32),
           "last_index": jnp.array([7, 5, 6, 7], jnp.int32),
           "candidates": jnp.tile(jnp.array([[11, 200]], jnp.int32), (4, 1)),
           "label": jnp.array([0, 1, 1, 0], jnp.int32)}
  lazy = jax.jit(lambda p, b: zo.perturbed_forward(
      llama.make(cfg), p, b, KEY, step=STEP, sample=0, scales=jnp.array([EPS, -EPS]),
      direction=direction)[0])

  @jax.jit
  def explicit(p, b):
    z = zo.tree_noise(KEY, STEP, 0, p, direction=direction)
    losses = [llama.loss_fn(cfg, zo.perturb_tree(p, z, s), b)[0] for s in (EPS, -EPS)]
    return jnp.stack(losses), z["embed"]["tokens"]

  got = np.asarray(lazy(params, batch))
  want, z_table = jax.device_get(explicit(params, batch))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert abs(got[0] - got[1]) > 1e-4
  # The direction reached the draw (were it ignored, both sides would be Gaussian and equal).
  assert (set(np.unique(z_table)) == {-1.0, 1.0}) == (direction == "rademacher")


def test_spsa_coefficient_is_the_central_difference():
  params, batch = _params(), _lm_batch()
  loss, g = _spsa_llama(params, batch)
  assert g.coeffs.shape == (2,) and bool(g.finite) and int(g.step) == STEP
  # Sample 1's coefficient is (L+ - L-)/2ε along tree_noise(STEP, sample 1). fp32 losses
  # (~5.5, ulp 5e-7) over 2ε = 0.02 leave ~1e-4 of rounding in a coefficient.
  lp, lm = np.asarray(_explicit_losses(params, batch))
  np.testing.assert_allclose(g.coeffs[1], (lp - lm) / (2 * EPS), rtol=1e-3, atol=2e-4)
  assert abs(g.coeffs[0] - g.coeffs[1]) > 1e-2  # samples use different z
  plain = float(_plain_loss(params, batch))
  assert abs(float(loss) - plain) < 5e-2


def test_two_microbatches_equal_one_double_batch():
  params, batch = _params(), _lm_batch()
  loss1, g1 = _spsa_llama(params, batch)
  loss2, g2 = _spsa_llama(params, batch, microbatches=2)
  np.testing.assert_allclose(g2.coeffs, g1.coeffs, rtol=1e-3, atol=2e-4)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
  # One-sided, accumulated the same way: L0 is the whole batch's loss, and sample 1's
  # coefficient is (L+ - L0)/ε along the same z.
  loss0, o2 = _spsa_llama(params, batch, microbatches=2, one_sided=True)
  plain = float(_plain_loss(params, batch))
  np.testing.assert_allclose(loss0, plain, rtol=1e-6)
  lp, _ = np.asarray(_explicit_losses(params, batch))
  np.testing.assert_allclose(o2.coeffs[1], (lp - plain) / EPS, rtol=1e-3, atol=4e-4)


def test_with_metrics_returns_the_plus_branch_of_sample_0_summed_over_microbatches():
  """What a stateful model (MoE loads) updates from: the head's sums at θ + εz_0, added over
  micro-batches; sample 1's + branch (a different z) gives other sums (negative control)."""
  params, batch = _params(), _lm_batch()
  model = llama.make(CFG)
  plus = jax.jit(lambda p, b, sample: zo.perturbed_forward(
      model, p, b, KEY, step=STEP, sample=sample, scales=jnp.array([EPS]))[1])
  want = jax.device_get(plus(params, batch, 0))
  _, _, metrics = jax.jit(lambda p, b: zo.spsa(
      model, p, b, KEY, step=STEP, eps=EPS, num_samples=2, microbatches=2,
      with_metrics=True))(params, batch)
  np.testing.assert_allclose(metrics["loss_sum"], want["loss_sum"][0], rtol=1e-5)
  np.testing.assert_array_equal(metrics["count"], want["count"][0])
  other = jax.device_get(plus(params, batch, 1))["loss_sum"][0]
  assert abs(float(other) - float(want["loss_sum"][0])) > 1e-3
  with pytest.raises(ValueError, match="with_metrics"):
    zo.spsa(lambda p, b: 0.0, params, batch, KEY, with_metrics=True)


def test_non_differentiable_loss_negative_accuracy():
  """A head returning −accuracy (untied embeddings: the head's own leaf is perturbed too)."""
  cfg = dataclasses.replace(CFG, tie_embeddings=False)
  params = _params(cfg)
  rng = np.random.default_rng(2)
  b = 16
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, 6)), jnp.int32),
           "last_index": jnp.full((b,), 5, jnp.int32),
           "candidates": jnp.tile(jnp.array([[3, 7]], jnp.int32), (b, 1)),
           "label": jnp.asarray(rng.integers(0, 2, b), jnp.int32)}
  neg_acc = lambda p, x, bt: (lambda s: (-s["correct"] / s["count"], s))(
      llama.head(cfg, p, x, bt)[1])
  base = llama.make(cfg)
  model = protocol.BlockModel(embed=base.embed, block=base.block, head=neg_acc)
  key, eps = jax.random.key(4), 0.5  # large ε so the accuracy actually moves
  in_scan = jax.jit(lambda p: zo.perturbed_forward(
      model, p, batch, key, step=0, sample=0, scales=jnp.array([eps, -eps]))[0])(params)

  @jax.jit
  def explicit(p):
    z = zo.tree_noise(key, 0, 0, p)
    return jnp.stack([protocol.apply(model, zo.perturb_tree(p, z, s), batch)[0]
                      for s in (eps, -eps)])
  np.testing.assert_array_equal(np.asarray(in_scan), np.asarray(explicit(params)))
  assert np.all((in_scan <= 0) & (in_scan >= -1)) and in_scan[0] != in_scan[1]


def test_generic_path_microbatches_and_one_sided():
  loss, theta, grad = _quadratic(6, seed=3)
  batch = jnp.ones((4, 1))
  f = lambda th, b: loss(th, None) * jnp.mean(b)
  key = jax.random.key(0)
  _, g1 = zo.spsa(f, theta, batch, key, num_samples=3, eps=0.1)
  _, g2 = zo.spsa(f, theta, batch, key, num_samples=3, eps=0.1, microbatches=2)
  np.testing.assert_allclose(g2.coeffs, g1.coeffs, rtol=1e-4)
  # Exact for a quadratic: c_i = z_iᵀ g.
  z = [zo.tree_noise(key, 0, i, theta) for i in range(3)]
  np.testing.assert_allclose(g1.coeffs, [float(zi @ grad) for zi in z], rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(zo.materialize(g1, theta),
                             sum(c * zi for c, zi in zip(g1.coeffs, z)) / 3, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Flags and errors


def test_non_finite_loss_is_flagged():
  key = jax.random.key(0)
  theta = jnp.ones(3)
  _, g = zo.spsa(lambda th, b: jnp.sum(th) + jnp.log(b[0] - 1.0), theta, jnp.ones((2,)), key)
  assert not bool(g.finite)
  _, g = zo.spsa(lambda th, b: jnp.sum(th ** 2), theta, jnp.ones((2,)), key)
  assert bool(g.finite)
  params, batch = _params(), _lm_batch()
  batch["weights"] = batch["weights"].at[0, 0].set(jnp.nan)
  loss, g = _spsa_llama(params, batch)
  assert not bool(g.finite) and not np.isfinite(float(loss))


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), r"^eps=0.0 must be > 0$"),
    (dict(eps=-1e-3), r"^eps=-0.001 must be > 0$"),
    (dict(num_samples=0), r"^num_samples=0 must be an integer >= 1$"),
    (dict(num_samples=2.0), r"^num_samples=2.0 must be an integer >= 1$"),
    (dict(microbatches=3), r"^microbatches=3 must divide the batch size 4$"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    zo.spsa(lambda th, b: jnp.sum(th), jnp.ones(3), jnp.ones((4, 2)), jax.random.key(0),
            **kwargs)


def test_non_scalar_loss_is_an_error():
  with pytest.raises(ValueError, match=r"^loss_fn must return a scalar loss, got \(4,\)$"):
    zo.spsa(lambda th, b: b[:, 0] * jnp.sum(th), jnp.ones(3), jnp.ones((4, 2)),
            jax.random.key(0))
  with pytest.raises(ValueError, match="block-protocol tree"):
    zo.spsa(llama.make(CFG), {"w": jnp.ones(3)}, _lm_batch(), jax.random.key(0))


# ---------------------------------------------------------------------------------------
# Random-number passes per step


@pytest.mark.parametrize("direction", zo.DIRECTIONS)
def test_z_is_drawn_once_in_the_forward_and_once_in_the_update(monkeypatch, direction):
  """Counts draws while tracing a whole step: MeZO draws every leaf 4 times, zojax 2.

  Stacked block leaves are drawn per layer inside a scan / vmap body, traced once: one traced
  draw per leaf is one pass over that leaf's z at run time. The token table is drawn in rows
  (`perturb.table_rows`): the forward draws only the rows a batch reads, per branch.
  """
  calls, rows, in_rows = [], [], []
  original_noise, original_rows = perturb.leaf_noise, perturb.table_rows

  def counting_noise(key, shape, direction):
    if not in_rows:  # draws of table rows are counted by counting_rows
      calls.append(tuple(shape))
    return original_noise(key, shape, direction)

  def counting_rows(key, shape, index, *, direction):
    rows.append(int(np.prod(jnp.shape(index))))
    in_rows.append(True)
    try:
      return original_rows(key, shape, index, direction=direction)
    finally:
      in_rows.pop()

  monkeypatch.setattr(perturb, "leaf_noise", counting_noise)
  monkeypatch.setattr(perturb, "table_rows", counting_rows)
  params, model = _params(), llama.make(CFG)
  batch = {"tokens": _lm_batch()["tokens"], "last_index": jnp.full((8,), 7, jnp.int32),
           "candidates": jnp.tile(jnp.array([[3, 5]], jnp.int32), (8, 1)),
           "label": jnp.zeros((8,), jnp.int32)}
  tx = optim.zo_sgd(1e-3, weight_decay=0.1)
  blocks = sorted(a.shape[1:] for a in jax.tree.leaves(params["blocks"]))
  table = params["embed"]["tokens"].shape
  norm = params["head"]["final_norm"].shape

  # The forward: each block leaf once for both branches; per branch, the final norm and
  # the table rows of the batch's 8x8 tokens and 8x2 label words.
  estimate = lambda p, b: zo.spsa(model, p, b, jax.random.key(0), direction=direction)[1]
  jax.make_jaxpr(estimate)(params, batch)
  assert sorted(calls) == sorted(blocks + 2 * [norm])
  assert sorted(rows) == [16, 16, 64, 64]
  # The update: every leaf once, the table in full (all of its rows).
  zograd = jax.eval_shape(estimate, params, batch)
  assert zograd.direction == direction
  calls.clear()
  rows.clear()
  jax.make_jaxpr(lambda p, s, g: tx.update(g, s, p))(params, tx.init(params), zograd)
  assert sorted(calls) == sorted(blocks + [norm])
  assert rows == [table[0]]
