"""Small Flax NNX networks registered as zojax models through `from_flax`.

``nnx-cnn``: a small CNN image classifier with a BatchNorm (so model state is exercised),
for `zojax.data.synthetic.oriented_bars`::

  image [B, S, S, 1] -> conv1 3x3 -> batch_norm -> relu -> conv2 3x3 stride 2 -> relu
    -> mean over pixels [B, C] -> h + mlp(layer_norm(h)) -> head -> logits [B, K]

The residual MLP's kernels live under ``mlp/`` so GaLore's default path pattern projects
them (`zojax.optim.galore_transform.DEFAULT_PATTERN`); the conv and head kernels train at full rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from zojax.errors import ConfigError
from zojax.models import flax_adapter, interface, registry

_lecun = nnx.initializers.lecun_normal()


def _named(*names: str | None):
  """A kernel initializer tagged with logical axis names (the adapter reads them as axes)."""
  return nnx.with_partitioning(_lecun, names)


class Mlp(nnx.Module):
  """Two dense layers, C -> H -> C, relu between."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, kernel_init=_named("embed", "mlp"), dtype=dtype,
                         rngs=rngs)
    self.down = nnx.Linear(hidden, dim, kernel_init=_named("mlp", "embed"), dtype=dtype,
                           rngs=rngs)

  def __call__(self, x_BxC):
    return self.down(jax.nn.relu(self.up(x_BxC)))


class SmallCNN(nnx.Module):
  """The ``nnx-cnn`` network (see the module docstring)."""

  def __init__(self, num_classes: int, channels: int, hidden: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = channels
    self.conv1 = nnx.Conv(1, c, (3, 3), kernel_init=_named(None, None, None, "embed"),
                          dtype=dtype, rngs=rngs)
    self.batch_norm = nnx.BatchNorm(c, momentum=0.9, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), strides=2, kernel_init=_named(None, None, "embed", None),
                          dtype=dtype, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(c, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(c, hidden, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(c, num_classes, kernel_init=_named("embed", None), dtype=dtype,
                           rngs=rngs)

  def __call__(self, image_BxSxSx1):
    x = jax.nn.relu(self.batch_norm(self.conv1(image_BxSxSx1)))
    x = jax.nn.relu(self.conv2(x))
    h_BxC = jnp.mean(x, axis=(1, 2))
    h_BxC = h_BxC + self.mlp(self.layer_norm(h_BxC))
    return self.head(h_BxC).astype(jnp.float32)


def classification_loss(module: nnx.Module, batch):
  """Softmax cross-entropy of ``module(batch["image"])`` against ``batch["label"]``.

  Rows are weighted by ``batch["weight"]`` when present (0 marks eval padding).

  Returns:
    (mean loss, {"loss_sum", "count", "correct"}), the sums over weighted rows.
  """
  logits_BxK = module(batch["image"])
  label_B = batch["label"]
  loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, label_B)
  weight_B = batch.get("weight", jnp.ones_like(loss_B))
  count = jnp.sum(weight_B)
  loss_sum = jnp.sum(weight_B * loss_B)
  correct = jnp.sum(weight_B * (jnp.argmax(logits_BxK, -1) == label_B))
  return loss_sum / jnp.maximum(count, 1.0), {"loss_sum": loss_sum, "count": count,
                                               "correct": correct}


def _positive_int(cfg, key: str) -> int:
  value = cfg.get(key)
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"config key 'model.{key}'={value!r} must be a positive int "
                      f"(model.name={cfg.name!r})")
  return value


@registry.register("nnx-cnn")
def _small_cnn(cfg, task=None) -> interface.Model:
  if cfg.get("init", "random") != "random":
    raise ConfigError(f"config key 'model.init'={cfg.init!r}: model.name={cfg.name!r} has "
                      "no published weights; use 'random'")
  num_classes = (task.info if task is not None else {}).get("num_classes")
  if not num_classes:
    raise ConfigError(f"model.name={cfg.name!r} needs a classification task (task.info has "
                      f"no 'num_classes'; task.name={getattr(task, 'name', None)!r})")
  channels, hidden = _positive_int(cfg, "channels"), _positive_int(cfg, "hidden")
  dtype = jnp.dtype(cfg.get("dtype", "float32"))
  make = lambda rngs: SmallCNN(num_classes, channels, hidden, dtype=dtype, rngs=rngs)
  return flax_adapter.from_flax(make, classification_loss, name=cfg.name,
                                info={"channels": channels, "hidden": hidden,
                                      "num_classes": num_classes})
