"""The perturbation stream: addresses, order invariance, sharding invariance, dtype; both
directions (Gaussian, Rademacher) where the property is the stream's, not the draw's."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax.zo import perturb


def _params(dtype=jnp.float32):
  """A small block-protocol tree with uneven leaf shapes (dims divisible by 8 for sharding)."""
  rng = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
  return {
      "embed": {"tokens": n(32, 8)},
      "blocks": {"wq": n(3, 8, 16), "attn_norm": n(3, 8), "w_down": n(3, 16, 8)},
      "head": {"final_norm": n(8), "unembed": n(8, 32)},
  }


# Jitted (step and sample traced): one compilation per tree structure keeps the file fast.
_noise = jax.jit(perturb.tree_noise, static_argnames="direction")
both = pytest.mark.parametrize("direction", perturb.DIRECTIONS)


def _signs_reference(key, shape):
  """Packed signs by the module docstring's formula, unpacked in numpy: element m of a row is
  bit m % 32 (set: -1) of word m // 32 of bits(key, [..., ceil(n / 32)])."""
  n = shape[-1] if shape else 1
  words = np.asarray(jax.random.bits(key, (*shape[:-1], -(-n // 32)), jnp.uint32))
  m = np.arange(n)
  bits = (words[..., m // 32] >> (m % 32).astype(np.uint32)) & 1
  return (1.0 - 2.0 * bits).astype(np.float32).reshape(shape)


def _draw_reference(key, shape, direction, rows=None):
  """draw(key) or, with `rows`, [draw(fold_in(key, r)) for r in rows] (one call)."""
  if rows is not None:
    keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.asarray(rows, jnp.uint32))
    return np.stack([_draw_reference(k, shape, direction) for k in keys])
  if direction == "gaussian":
    return np.asarray(jax.random.normal(key, shape, jnp.float32))
  return _signs_reference(key, shape)


def _equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@both
def test_address_formula_is_pinned(direction):
  """z of leaf j of layer l is draw(fold_in^4(key; t, i, l, j)) with j in sorted-path order."""
  params, key = _params(), jax.random.key(42, impl=perturb.IMPL)
  noise = functools.partial(_noise, direction=direction)
  draw = functools.partial(_draw_reference, direction=direction)
  z = noise(key, 5, 2, params)
  layer_key = lambda l: jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(key, 5), 2), l)
  # Sorted block leaf names: attn_norm (0), w_down (1), wq (2).
  expect = draw(jax.random.fold_in(layer_key(1), 2), (8, 16))
  np.testing.assert_array_equal(z["blocks"]["wq"][1], expect)
  # Head: final_norm (0), unembed (1), under the fixed head layer id. A 2-D embed/head leaf
  # is drawn slice by slice along its largest axis (here axis 1, of 32).
  leaf_key = jax.random.fold_in(layer_key(perturb.HEAD_LAYER), 1)
  expect = draw(leaf_key, (8,), rows=range(32)).T
  np.testing.assert_array_equal(z["head"]["unembed"], expect)
  np.testing.assert_array_equal(
      perturb.table_rows(leaf_key, (8, 32), jnp.array([[3, 30]]), direction=direction),
      expect.T[jnp.array([[3, 30]])])
  # Raw key data addresses the same stream as the typed key.
  _equal(noise(jax.random.key_data(key), 5, 2, params), z)
  # A default (threefry2x32) key, typed or as legacy data, is turned into a stream key once.
  legacy = jax.random.key(42)
  derived = jax.random.wrap_key_data(jax.random.bits(legacy, (4,), jnp.uint32),
                                     impl=perturb.IMPL)
  _equal(noise(legacy, 5, 2, params), noise(derived, 5, 2, params))
  _equal(noise(jax.random.key_data(legacy), 5, 2, params), noise(derived, 5, 2, params))


def test_packed_signs_exact_balanced_and_bit_ordered():
  key = jax.random.key(7, impl=perturb.IMPL)
  # Rows that are not a whole number of words, a scalar, a vector: the reference formula.
  for shape in [(3, 70), (), (5,), (2, 3, 33)]:
    z = jax.jit(perturb.packed_signs, static_argnums=1)(key, shape)
    assert z.dtype == jnp.float32 and z.shape == shape
    np.testing.assert_array_equal(np.asarray(z), _signs_reference(key, shape))
  z = np.asarray(perturb.packed_signs(key, (64, 1000)))
  assert set(np.unique(z)) == {-1.0, 1.0}
  assert abs(z.mean()) < 0.02  # 64k fair signs: 5 standard deviations is 0.02
  # A control for the reference: a different bit order gives other signs.
  words = np.asarray(jax.random.bits(key, (3, 3), jnp.uint32))
  msb_first = 1.0 - 2.0 * ((words[:, :, None] >> (31 - np.arange(32)).astype(np.uint32)) & 1)
  assert not np.array_equal(msb_first.reshape(3, 96)[:, :70], _signs_reference(key, (3, 70)))


def test_bad_direction_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"^direction='normal' must be one of \('gaussian', "
                     r"'rademacher'\)$"):
    perturb.tree_noise(jax.random.key(0), 0, 0, jnp.zeros(3), direction="normal")


@both
def test_whole_tree_equals_per_layer_in_reverse_order(direction):
  params, key = _params(), jax.random.key(1)
  whole = _noise(key, 7, 1, params, direction=direction)
  num_layers, one = perturb.unstacked_like(params["blocks"])
  # One compilation, the layer index traced: as inside a scan over layers.
  per_layer = jax.jit(lambda l, like: perturb.block_noise(key, 7, 1, l, like, direction=direction))
  for l in reversed(range(num_layers)):
    layer = per_layer(l, jax.tree.map(lambda a: a[l], params["blocks"]))
    _equal(layer, jax.tree.map(lambda a: a[l], whole["blocks"]))
  # ... and eagerly, layer by layer, as a streaming engine would.
  for l in (2, 0, 1):
    _equal(perturb.block_noise(key, 7, 1, l, one, direction=direction),
           jax.tree.map(lambda a: a[l], whole["blocks"]))


def test_leaf_order_does_not_depend_on_insertion_order():
  key = jax.random.key(3)
  a = {"blocks": {"x": jnp.zeros((2, 4)), "b": jnp.zeros((2, 3)), "m": jnp.zeros((2, 5))}}
  b = {"blocks": {"m": jnp.zeros((2, 5)), "x": jnp.zeros((2, 4)), "b": jnp.zeros((2, 3))}}
  # OrderedDicts flatten in insertion order; the stream must not.
  oa = collections.OrderedDict([("x", jnp.zeros(4)), ("b", jnp.zeros(3)), ("m", jnp.zeros(5))])
  ob = collections.OrderedDict([("m", jnp.zeros(5)), ("b", jnp.zeros(3)), ("x", jnp.zeros(4))])
  za, zb = _noise(key, 0, 0, a), _noise(key, 0, 0, b)
  zoa, zob = _noise(key, 0, 0, oa), _noise(key, 0, 0, ob)
  for name in ("x", "b", "m"):
    np.testing.assert_array_equal(za["blocks"][name], zb["blocks"][name])
    np.testing.assert_array_equal(zoa[name], zob[name])
  assert [perturb._path_name(p[-1]) for p in perturb.leaf_paths(ob)] == ["b", "m", "x"]


@both
def test_every_address_component_changes_z(direction):
  params, key = _params(), jax.random.key(0)
  noise = functools.partial(_noise, direction=direction)
  base = noise(key, 1, 0, params)
  for other in (noise(key, 2, 0, params), noise(key, 1, 1, params),
                noise(jax.random.key(1), 1, 0, params)):
    assert not np.allclose(base["blocks"]["wq"], other["blocks"]["wq"])
  # Layers differ from each other; same-shaped leaves in one layer differ (leaf index).
  assert not np.allclose(base["blocks"]["wq"][0], base["blocks"]["wq"][1])
  assert not np.allclose(base["head"]["final_norm"], base["blocks"]["attn_norm"][0])
  z = np.asarray(base["blocks"]["wq"]).ravel()
  assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2


def test_z_is_float32_and_the_same_for_bf16_params():
  key = jax.random.key(5)
  z32 = _noise(key, 3, 0, _params(jnp.float32))
  z16 = _noise(key, 3, 0, _params(jnp.bfloat16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(z16))
  _equal(z16, z32)
  w = jnp.ones((4,), jnp.bfloat16)
  assert perturb.perturb(w, jnp.ones((4,)), 0.5).dtype == jnp.bfloat16


@both
def test_sharding_does_not_change_z(direction):
  assert jax.device_count() == 8
  params, key = _params(), jax.random.key(9)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  # The last axis split 4 ways: for packed signs, slices of 4 (or 2) signs cut through words.
  spec = lambda a: P(*([None] * (a.ndim - 1)), "model") if a.shape[-1] % 4 == 0 else P()
  shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), params)
  sharded = jax.jit(functools.partial(perturb.tree_noise, direction=direction),
                    out_shardings=shardings)(key, 4, 1, params)
  assert len(sharded["blocks"]["wq"].sharding.device_set) == 8
  _equal(sharded, _noise(key, 4, 1, params, direction=direction))


def test_bad_inputs():
  with pytest.raises(ValueError, match="single key.*shape \\(2,\\)"):
    perturb.key_data(jax.random.split(jax.random.key(0)))
  with pytest.raises(ValueError, match=r"uint32\[4\].*got uint32\[3\]"):
    perturb.key_data(jnp.zeros((3,), jnp.uint32))
  with pytest.raises(ValueError, match="top-level keys.*'extra'"):
    _noise(jax.random.key(0), 0, 0, {"blocks": {"w": jnp.zeros((2, 3))},
                                                 "extra": jnp.zeros(3)})
  with pytest.raises(ValueError, match="disagree on the layer axis"):
    _noise(jax.random.key(0), 0, 0, {"blocks": {"a": jnp.zeros((2, 3)),
                                                            "b": jnp.zeros((3, 3))}})


def test_a_derived_key_is_hashed_once_not_in_every_draw(monkeypatch):
  """The compiled program derives each key (sample, layer, leaf) once, into a buffer of its
  own (`perturb.own_key`), instead of XLA copying the whole chain of fold_in hashes into
  every fusion that draws from it (compile time: see BENCHMARKS "Compile time"). Counted as
  instructions of fold_in hashes in the optimized HLO of a one-block-group draw.
  Negative control: with `own_key` an identity (the chain free to fuse) there are more."""
  blocks = {"blocks": {"a": jax.ShapeDtypeStruct((2, 8, 16), jnp.float32),
                       "b": jax.ShapeDtypeStruct((2, 16, 8), jnp.float32)}}

  def fold_in_instructions():
    draw = jax.jit(lambda k: perturb.tree_noise(k, 3, 1, blocks, direction="rademacher"))
    return draw.lower(jax.random.key(0)).compile().as_text().count("threefry4x32_fold_in")

  once = fold_in_instructions()
  monkeypatch.setattr(perturb, "own_key", lambda key: key)
  assert fold_in_instructions() > 1.5 * once
