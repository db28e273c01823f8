"""zojax.kernels.projection (GaLore's fused projections) against its jnp reference.

Interpret-mode Pallas on CPU; the `gpu`-marked tests run the compiled kernel where JAX's
default backend is a GPU (`JAX_PLATFORMS=cuda pytest -m gpu tests/kernels`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax.kernels import projection as proj

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
SMALL = proj.BlockSizes(block_m=16, block_n=32, block_k=16)


def _operands(side, m, n, r, layers=None, dtype=jnp.float32):
  lead = () if layers is None else (layers,)
  kg, kp, kn, ka = jax.random.split(jax.random.key(m * n + r), 4)
  g = jax.random.normal(kg, (*lead, m, n), jnp.float32).astype(dtype)
  p = jax.random.normal(kp, (*lead, m if side == "left" else n, r), jnp.float32)
  low = jax.random.normal(kn, (*lead, *((r, n) if side == "left" else (m, r))), jnp.float32)
  add = jax.random.normal(ka, (*lead, m, n), jnp.float32)
  return g, p, low, add


def _all_outputs(project, project_back, side, g, p, low, add, scale):
  """Values and gradients (w.r.t. every array and the scale) of both projections."""
  def loss(g, p, low, add, scale):
    r = project(g, p, side)
    u = project_back(low, p, side, scale, add_to=add)
    return jnp.sum(jnp.sin(r)) + jnp.sum(jnp.cos(u)), (r, u)
  (_, values), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      g, p, low, add, scale)
  return values, grads


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layers", [None, 3], ids=["2d", "stacked"])
def test_pallas_interpret_matches_reference(side, layers):
  # Odd sizes: every dimension is padded to its tile and sliced back.
  g, p, low, add = _operands(side, 40, 70, 24, layers)
  kernel = dict(implementation="pallas", block_sizes=SMALL, interpret=True)
  run = jax.jit(lambda *a: (
      _all_outputs(functools.partial(proj.project, **kernel),
                   functools.partial(proj.project_back, **kernel), side, *a),
      _all_outputs(proj.project_reference, proj.project_back_reference, side, *a)))
  (got_values, got_grads), (want_values, want_grads) = run(g, p, low, add, 0.25)
  for name, a, b in zip(("project", "project_back", "dg", "dp", "dn", "dadd", "dscale"),
                        (*got_values, *got_grads), (*want_values, *want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4,
                               err_msg=name)
  r, u = got_values
  lead = () if layers is None else (3,)
  assert r.shape == (*lead, *((24, 70) if side == "left" else (40, 24)))
  assert u.shape == g.shape


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_full_rank_orthonormal_basis_round_trips(implementation):
  """With an orthonormal basis of full rank, α·P·(Pᵀ·G) = α·G: the identity GaLore rests on."""
  g = jax.random.normal(jax.random.key(0), (2, 32, 48))
  p_left = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (2, 32, 32)))[0]
  q_right = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (2, 48, 48)))[0]
  kw = dict(implementation=implementation, block_sizes=SMALL)

  @jax.jit
  def round_trips(g, p_left, q_right):
    left = proj.project_back(proj.project(g, p_left, "left", **kw), p_left, "left", 0.5, **kw)
    right = proj.project_back(proj.project(g, q_right, "right", **kw), q_right, "right",
                              0.5, add_to=g, **kw)
    return left, right

  left, right = round_trips(g, p_left, q_right)
  np.testing.assert_allclose(np.asarray(left), 0.5 * np.asarray(g), atol=1e-4)
  np.testing.assert_allclose(np.asarray(right), 1.5 * np.asarray(g), atol=1e-4)


def test_dtypes_and_traced_scale():
  g, p, low, _ = _operands("left", 32, 64, 16, dtype=jnp.bfloat16)
  add = jnp.zeros((32, 64), jnp.bfloat16)
  kw = dict(implementation="pallas", block_sizes=SMALL)

  @jax.jit
  def run(g, p, low, add, scale):  # scale traced, as under optax.inject_hyperparams
    return (proj.project(g, p, "left", **kw), proj.project_back(low, p, "left", scale, **kw),
            proj.project_back(low, p, "left", scale, add_to=add, **kw))

  r, u, u_added = run(g, p, low, add, jnp.float32(2.0))
  assert r.dtype == jnp.float32  # promoted: bf16 gradient, f32 basis
  assert u.dtype == jnp.float32 and u_added.dtype == jnp.bfloat16  # add_to's dtype
  want = proj.project_reference(g, p, "left")
  np.testing.assert_allclose(np.asarray(r), np.asarray(want), rtol=1e-4, atol=1e-4)
  want_u = 2.0 * np.asarray(proj.project_back_reference(low, p, "left"))
  np.testing.assert_allclose(np.asarray(u), want_u, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(u_added, np.float32), want_u, rtol=1e-2, atol=1e-1)


def test_dispatch_on_this_backend():
  resolved = proj._resolve("auto", (64, 128), 16)
  assert resolved == ("pallas" if jax.default_backend() == "gpu" else "xla")
  # Shapes that would need padding, or a rank Triton cannot tile, stay on XLA.
  assert proj._resolve("auto", (40, 70), 16) == "xla"
  assert proj._resolve("auto", (64, 128), 24) == "xla"
  assert proj._resolve("pallas", (40, 70), 24) == "pallas"
  with pytest.raises(ValueError, match="implementation='triton' is not one of"):
    proj._resolve("triton", (64, 64), 16)


def _one_line_error(fn, *args, **kwargs):
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  assert "\n" not in str(info.value)
  return str(info.value)


def test_bad_inputs_give_one_line_errors_naming_shapes():
  g, p, low, _ = _operands("left", 32, 64, 16)
  msg = _one_line_error(proj.project, g, p, "right")
  assert "g.shape=(32, 64), p.shape=(32, 16)" in msg and "side='right'" in msg
  assert "side='top' is not one of" in _one_line_error(proj.project, g, p, "top")
  msg = _one_line_error(proj.project, g[None], p, "left")
  assert "g.shape=(1, 32, 64), p.shape=(32, 16)" in msg
  msg = _one_line_error(proj.project, jnp.stack([g, g]), jnp.stack([p, p, p]), "left")
  assert "layer counts differ" in msg
  msg = _one_line_error(proj.project_back, low.T, p, "left")
  assert "n.shape=(64, 16), p.shape=(32, 16)" in msg
  msg = _one_line_error(proj.project_back, low, p, "left", add_to=g.T)
  assert "add_to.shape=(64, 32) must be (32, 64)" in msg
  msg = _one_line_error(proj.project_back, low, p, "left", jnp.ones(2))
  assert "scale must be a scalar" in msg


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("side", ["left", "right"])
def test_pallas_compiled_matches_reference(side):
  g, p, low, add = _operands(side, 512, 1024, 128, layers=2)
  kw = dict(implementation="pallas", interpret=False)
  r = proj.project(g, p, side, **kw)
  u = proj.project_back(low, p, side, 0.25, add_to=add, **kw)
  # float32 dots may run as TF32 on the GPU: compare relative to the output scale.
  for got, want in ((r, proj.project_reference(g, p, side)),
                    (u, proj.project_back_reference(low, p, side, 0.25, add_to=add))):
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-2, err
