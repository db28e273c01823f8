"""The perturbation stream: z for every parameter leaf as a pure function of its address.

The perturbation of leaf ``j`` of layer ``l`` for sample ``i`` at step ``t`` is

  z = draw(fold_in(fold_in(fold_in(fold_in(key, t), i), l), j), leaf.shape)

where ``key`` is the run's base key and ``draw`` is the run's direction (`DIRECTIONS`):
``"gaussian"`` (float32 standard normals, MeZO) or ``"rademacher"`` (±1 signs, Spall's
original SPSA, unpacked from random bits: `leaf_noise`). Nothing else enters, so the same z
comes out whatever
the execution order (whole tree, one layer at a time, layers reversed), offload setting or
mesh: ``jax_threefry_partitionable`` is on by default in JAX >= 0.5 (checked below), which
makes threefry draws independent of how the output is sharded.

Addresses:
  * ``l``: blocks are ``0 .. L-1`` (position on the stacked layer axis). The non-block
    subtrees of a block-protocol tree have fixed ids `EMBED_LAYER` (``params["embed"]``)
    and `HEAD_LAYER` (``params["head"]``). A tree without a ``"blocks"`` key (a plain
    pytree, e.g. a quadratic's parameters) is one group with id `FLAT_LAYER`.
  * ``j``: the leaf's position in `leaf_paths` order: key paths of the group's subtree
    (for blocks: the per-layer tree, without the layer axis), sorted by their entries'
    names. This is what `jax.tree_util` does for plain dicts, but it is also fixed for
    ``OrderedDict``s and other containers that flatten in insertion order.

Leaves of the non-block groups (embed, head) with two or more axes (token tables) are drawn
one slice at a time along their largest axis (the vocabulary): slice r of leaf j is
``draw(fold_in(leaf_key, r), slice_shape)``. So the rows a batch touches can be drawn
without drawing the table (`table_rows`), and a ZO forward never forms a perturbed copy of
the vocabulary table (`zojax.models.protocol.PerturbedTable`).

z is always drawn in float32 and only then cast where a lower precision is needed
(``normal(key, dtype=bfloat16)`` is a different draw from ``normal(key).astype(bfloat16)``).

Rademacher signs come 32 to a random word: a leaf of shape [..., n] draws
``bits(key, [..., ceil(n / 32)], uint32)`` and element ``m`` of a row is bit ``m % 32`` of
word ``m // 32`` (set: −1). The words run along the last axis, so a leaf sliced on any other
axis (a DistZO2 block slice, a table row) draws exactly its own words. Measured on this
2-core CPU over 30M elements: a normal draw 0.18-0.23 s, ``jax.random.rademacher`` (one word
per sign) 0.19-0.20 s, packed signs 0.06-0.08 s, the words alone 0.004 s (the unpacking is
the cost).

PRNG choice: the stream uses threefry4x32 (`IMPL`) rather than JAX's default threefry2x32.
Like every threefry variant under ``jax_threefry_partitionable``, its draws do not depend on
how the output is sharded (tested); the rbg family is documented as sharding-dependent.

Base keys: a typed `IMPL` key or its uint32[4] data is used as is. Any other key (JAX's
default threefry2x32 key, or its legacy uint32[2] data, as the train loop stores) is turned
into a stream key once, by `key_data`: 4 random uint32 words drawn from it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

IMPL = "threefry4x32"

# Layer ids of the non-block groups. Blocks use 0..L-1; these sit far above any layer count.
EMBED_LAYER = 0x7FFF_FFF0
HEAD_LAYER = 0x7FFF_FFF1
FLAT_LAYER = 0x7FFF_FFF2
_GROUP_LAYERS = {"embed": EMBED_LAYER, "head": HEAD_LAYER}

if not jax.config.jax_threefry_partitionable:  # pragma: no cover (default since JAX 0.5)
  raise ImportError("zojax.zo needs jax_threefry_partitionable=True for sharding-invariant z")


def key_data(key) -> jax.Array:
  """uint32[4] data of the stream's base key (see "Base keys" in the module docstring)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single key, got a key array of shape {key.shape}")
    if str(jax.random.key_impl(key)) == IMPL:
      return jax.random.key_data(key)
    return jax.random.bits(key, (4,), jnp.uint32)
  if key.dtype != jnp.uint32 or key.shape not in ((2,), (4,)):
    raise ValueError(f"key must be a typed PRNG key, uint32[4] {IMPL} data or uint32[2] "
                     f"threefry2x32 data, got {key.dtype}{list(key.shape)}")
  if key.shape == (2,):
    return jax.random.bits(jax.random.wrap_key_data(key, impl="threefry2x32"), (4,),
                           jnp.uint32)
  return key


def wrap_key(data: jax.Array) -> jax.Array:
  return jax.random.wrap_key_data(data, impl=IMPL)


def sample_key(key, step, sample):
  """Key of (step, sample); `key` is any base key `key_data` accepts."""
  key = wrap_key(key_data(key))
  return own_key(jax.random.fold_in(jax.random.fold_in(key, step), sample))


def own_key(key: jax.Array) -> jax.Array:
  """`key` (an `IMPL` key) computed once, into a buffer of its own (`unfused`).

  Without it XLA fuses the chain of hashes that derived a key (sample, layer, leaf) into
  every consumer, so each leaf's draw re-derives its whole address: the same values, but a
  program several times larger and slower to compile.
  """
  return wrap_key(unfused(jax.random.key_data(key), key))


DIRECTIONS = ("gaussian", "rademacher")
_SIGN_BIT, _ONE = 0x8000_0000, 0x3F80_0000  # float32 sign bit; the bits of 1.0


def check_direction(direction) -> str:
  """`direction` if it is one of `DIRECTIONS`, else a one-line ValueError."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction={direction!r} must be one of {DIRECTIONS}")
  return direction


def unfused(x: jax.Array, key: jax.Array) -> jax.Array:
  """`x` computed into a buffer of its own, not fused into (and recomputed by) its consumers.

  XLA fuses elementwise producers into their consumers, and a consumer that reads an element
  many times (a broadcast: 32 signs from one word, 2 SPSA branches from one z) recomputes
  the producer (a threefry hash) each time. XLA does not fuse an op it counts as expensive
  into such a consumer; an integer division is one, and dividing by a 1 it cannot see at
  compile time (made from `key`) changes no bit. `jax.lax.optimization_barrier` would say
  this directly, but XLA:CPU removes it before fusion (measured: no effect). Measured in a
  30-layer scan of a [1536, 576] leaf and a 2-branch matmul on this CPU: packed signs
  1.7 s fused, 0.25-0.28 s unfused; normals 0.69-0.92 s fused, 0.57-0.61 s unfused.
  """
  word = jax.random.key_data(key).reshape(-1)[0] | jnp.uint32(1)
  one = word // word
  if x.dtype == jnp.uint32:
    return x // one
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32) // one
  return jax.lax.bitcast_convert_type(bits, x.dtype)


def packed_signs(key: jax.Array, shape) -> jax.Array:
  """float32 ±1 of `shape`, 32 signs to a random uint32 word (see module docstring)."""
  shape = tuple(shape)
  rows, n = shape[:-1], (shape[-1] if shape else 1)
  # Unfused, the generator would run once per sign (32x per word) and per SPSA branch.
  words = unfused(jax.random.bits(key, (*rows, -(-n // 32)), jnp.uint32), key)
  lanes = jnp.arange(32, dtype=jnp.uint32)
  # Bit m of a word moved to the sign bit of 1.0: exactly +1.0 or -1.0, no float arithmetic.
  signs = (words[..., None] << (31 - lanes)) & jnp.uint32(_SIGN_BIT) | jnp.uint32(_ONE)
  signs = jax.lax.bitcast_convert_type(signs, jnp.float32).reshape(*rows, -1)[..., :n]
  return signs.reshape(shape)


def leaf_noise(key: jax.Array, shape, direction: str) -> jax.Array:
  """The one place z is drawn: float32 of `shape` (tests count calls to this).

  Args:
    key: the leaf's (or slice's) key.
    shape: the leaf's shape.
    direction: "gaussian" (standard normals) or "rademacher" (±1, `packed_signs`).
  """
  if check_direction(direction) == "rademacher":
    return packed_signs(key, shape)
  return jax.random.normal(key, shape, jnp.float32)


def _path_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaf_paths(tree: Any) -> list[tuple]:
  """Key paths of `tree`'s leaves in the stream's fixed order (leaf index j = position)."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return sorted(paths, key=lambda p: tuple(_path_name(e) for e in p))


def table_axis(shape) -> int:
  """The axis a sliced leaf is drawn along: its largest (the first of equals)."""
  return max(range(len(shape)), key=lambda a: (shape[a], -a))


def table_rows(leaf_key: jax.Array, shape, index: jax.Array, *, direction: str) -> jax.Array:
  """z of a sliced leaf at positions `index` along `table_axis(shape)`.

  Returns float32 [*index.shape, *slice_shape] (the indexed axis moved to the front), equal
  to the full draw's slices at those positions.
  """
  axis = table_axis(shape)
  slice_shape = tuple(shape[:axis]) + tuple(shape[axis + 1:])
  flat = jnp.reshape(index, (-1,)).astype(jnp.uint32)
  z = jax.vmap(lambda r: leaf_noise(jax.random.fold_in(leaf_key, r), slice_shape,
                                    direction))(flat)
  return z.reshape(*jnp.shape(index), *slice_shape)


def sliced_noise(leaf_key: jax.Array, shape, *, direction: str) -> jax.Array:
  """The whole z of a sliced leaf (every slice of `table_rows`, in place)."""
  axis = table_axis(shape)
  z = table_rows(leaf_key, shape, jnp.arange(shape[axis], dtype=jnp.uint32),
                 direction=direction)
  return jnp.moveaxis(z, 0, axis)


def leaf_keys(layer_key: jax.Array, tree_like: Any) -> Any:
  """fold_in(layer_key, j) for every leaf, j its position in `leaf_paths` order."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree_like)
  index = {path: j for j, path in enumerate(leaf_paths(tree_like))}
  return jax.tree_util.tree_unflatten(
      treedef, [own_key(jax.random.fold_in(layer_key, index[path])) for path, _ in flat])


def group_noise(layer_key: jax.Array, tree_like: Any, *, direction: str,
                sliced: bool = False) -> Any:
  """z for every leaf of one group, leaf j keyed fold_in(layer_key, j).

  `sliced` draws the leaves with two or more axes slice by slice (embed/head groups; use
  `layer_noise`, which decides from the layer id).
  """
  def draw(k, leaf):
    if sliced and len(leaf.shape) >= 2:
      return sliced_noise(k, leaf.shape, direction=direction)
    return leaf_noise(k, leaf.shape, direction)
  return jax.tree.map(draw, leaf_keys(layer_key, tree_like), tree_like)


def layer_noise(skey: jax.Array, layer, tree_like: Any, *, direction: str) -> Any:
  """z of group `layer` (a block index, possibly traced, or a fixed group id) for sample key
  `skey` (`sample_key`)."""
  sliced = isinstance(layer, int) and layer in (EMBED_LAYER, HEAD_LAYER)
  return group_noise(layer_key(skey, layer), tree_like, direction=direction, sliced=sliced)


def layer_key(skey: jax.Array, layer) -> jax.Array:
  """Key of group `layer` (a block index, possibly traced, or a fixed group id) under sample
  key `skey`: the one place the layer enters a z address."""
  return own_key(jax.random.fold_in(skey, layer))


def block_noise(key, step, sample, layer, block_like: Any, *,
                direction: str = "gaussian") -> Any:
  """z for one layer's parameters (no layer axis); `layer` may be traced.

  Args:
    key: the run's base key (typed `IMPL` key or its raw uint32 data).
    step: the step t (int or int32 scalar).
    sample: the sample index i.
    layer: the layer index l in 0..L-1.
    block_like: a tree with one layer's shapes (arrays or ShapeDtypeStructs).
    direction: one of `DIRECTIONS`.

  Returns:
    A float32 tree shaped like `block_like`.
  """
  return layer_noise(sample_key(key, step, sample), layer, block_like, direction=direction)


def is_block_tree(params: Any) -> bool:
  """True for a block-protocol tree {"embed", "blocks", "head"} (see module docstring)."""
  if not (isinstance(params, dict) and "blocks" in params):
    return False
  extra = set(params) - {"embed", "blocks", "head"}
  if extra:
    raise ValueError(f"params has top-level keys {sorted(extra)} besides embed/blocks/head; "
                     "the perturbation stream has no layer id for them")
  return True


def unstacked_like(blocks: Any) -> tuple[int, Any]:
  """(L, one layer's ShapeDtypeStructs) of stacked blocks."""
  leaves = jax.tree.leaves(blocks)
  sizes = {leaf.shape[0] for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(f"params['blocks'] leaves disagree on the layer axis: sizes {sorted(sizes)}")
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), blocks)
  return sizes.pop(), one


def group_layer(name: str) -> int:
  return _GROUP_LAYERS[name]


def map_groups(fn: Callable[[Any, Any], Any], params: Any) -> Any:
  """fn(layer_id, group_like) over every group of `params`, reassembled into its tree.

  Stacked blocks are `vmap`ped over the layer index (`group_like` without the layer axis).
  Threefry draws are elementwise in the key, so layer l's values are bit-identical to a
  one-layer call, and an elementwise consumer (an SGD update) fuses with the draw: measured
  on SmolLM2-135M, the donated ZO-SGD update compiles to 0 temporary bytes, against 442 MB
  (the whole z) with a sequential `lax.map` over layers.
  """
  if not is_block_tree(params):
    return fn(FLAT_LAYER, params)
  out = {}
  for name, sub in params.items():
    if name == "blocks":
      num_layers, one = unstacked_like(sub)
      out[name] = jax.vmap(lambda l, one=one: fn(l, one))(
          jnp.arange(num_layers, dtype=jnp.int32))
    else:
      out[name] = fn(group_layer(name), sub)
  return out


def tree_noise(key, step, sample, params: Any, *, direction: str = "gaussian") -> Any:
  """z for a whole parameter tree (float32, shaped like `params`).

  Stacked blocks are generated per layer, so layer l of the result is bit-identical to
  `block_noise(key, step, sample, l, ...)`.

  Args:
    key: the run's base key (typed or raw data).
    step: the step t.
    sample: the sample index i.
    params: the parameter tree (arrays or ShapeDtypeStructs).
    direction: one of `DIRECTIONS`.

  Returns:
    A float32 tree shaped like `params`.
  """
  skey = sample_key(key, step, sample)
  return map_groups(lambda layer, like: layer_noise(skey, layer, like, direction=direction),
                    params)


def perturb(w: jax.Array, z: jax.Array, scale) -> jax.Array:
  """w + scale * z, computed in float32 and cast back to w's dtype (the one formula used)."""
  return (w.astype(jnp.float32) + scale * z).astype(w.dtype)


def perturb_tree(params: Any, z: Any, scale) -> Any:
  """θ + scale · z leaf by leaf (a new tree; params are never modified)."""
  return jax.tree.map(lambda w, zz: perturb(w, zz, scale), params, z)


def perturb_stacked(w: jax.Array, z: jax.Array, scales_S: jax.Array) -> jax.Array:
  """[S, *w.shape]: w + scales[s] * z for each branch s, by the same formula as `perturb`."""
  return jax.vmap(lambda s: perturb(w, z, s))(scales_S)


__all__ = [
    "IMPL", "DIRECTIONS", "EMBED_LAYER", "HEAD_LAYER", "FLAT_LAYER", "check_direction",
    "key_data", "wrap_key", "sample_key", "own_key", "unfused", "packed_signs", "leaf_noise",
    "leaf_paths", "leaf_keys", "group_noise", "layer_key", "layer_noise", "table_axis",
    "table_rows", "sliced_noise", "group_layer", "block_noise", "map_groups",
    "tree_noise", "is_block_tree", "unstacked_like", "perturb", "perturb_tree",
    "perturb_stacked",
]
