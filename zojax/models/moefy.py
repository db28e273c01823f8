"""A dense SwiGLU decoder split into experts (MoEfication, Zhang et al. 2022), with routers.

MoEfication turns a pretrained dense FFN into a mixture of experts without retraining it:

  1. **Split.** Each layer's F hidden units are clustered into E equal groups of G = F / E
     by *balanced k-means* on their input weights (the unit-normalised columns of w_gate):
     units whose gate vectors point the same way tend to fire together. Expert e is the
     SwiGLU restricted to its units: w_gate / w_up columns and w_down rows, permuted into
     the `zojax.models.moe` stacks [L, E, D, G] / [L, E, G, D]. Summed over all E experts
     with weight 1 (``MoEConfig.gates="unit"``) this IS the dense FFN, up to float rounding.
  2. **Route.** A linear router [D, E] per layer (the MoE model's own float32 router:
     sigmoid scores, top-K of score + bias, bias 0) is fitted to predict which groups
     contribute most to a token: binary cross-entropy of ``sigmoid(h W)`` against the 0/1
     label "group e is among the `label_k` groups with the largest ||expert_e(h)||", on the
     FFN inputs h (post-attention RMSNorm) of the DENSE model over corpus tokens (the MoE
     model's own h drift from these once earlier layers drop experts). Top-K of
     sigmoid scores is top-K of the logits, so the fit aims at the selection rule directly.
     The fit is full-batch L-BFGS (`optax.lbfgs`) from zero: logistic regression, convex.

Balanced k-means (`balanced_kmeans`): k-means++ seeding, then alternate (a) the optimal
assignment of points to centres under "every cluster holds exactly N / k points" (a
transportation LP solved exactly by `zojax.moe.lp.solve_assignment`; its vertices are 0/1)
and (b) centres = cluster means. Each step minimises the within-cluster squared distance
given the other, so that objective never increases; it stops when the assignment repeats.

SmolLM2-135M (30 layers, F = 1536 -> 16 experts of 96)::

  config, params, meta = load_or_convert()        # minutes the first time, then seconds
  python experiments/moefy_smollm2.py --convert_only   # the same, from a shell

The cache (`cache_path`) holds only the unit permutation [L, F] and the routers [L, D, E]:
the experts are rebuilt from the GGUF weights, so the file is ~1 MB and cannot drift from
them. It is named by every setting that produced it. Registered as ``smollm2-135m-moe``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax.data import fetch
from zojax.errors import ConfigError
from zojax.models import interface, llama, moe, registry, smollm2
from zojax.moe import lp

log = logging.getLogger(__name__)

REGISTERED_NAME = "smollm2-135m-moe"
_VERSION = "moefy-v1"  # bump when the method changes, to invalidate cached conversions


@dataclasses.dataclass(frozen=True)
class MoefyConfig:
  """Settings of one conversion (all of them name its cache file)."""

  num_experts: int = 16
  label_k: int = 4            # router labels: the label_k groups with the largest outputs
  kmeans_iters: int = 20      # balanced k-means iterations at most (stops on a fixed point)
  router_rows: int = 64       # train-split rows of seq_len tokens the routers are fitted on
  seq_len: int = 512
  router_steps: int = 100     # full-batch L-BFGS steps per layer
  seed: int = 0

  def validate(self, ffn_dim: int) -> None:
    if self.num_experts < 1 or ffn_dim % self.num_experts:
      raise ConfigError(f"config key 'moefy.num_experts'={self.num_experts} must divide the "
                        f"FFN width {ffn_dim}")
    if not 1 <= self.label_k <= self.num_experts:
      raise ConfigError(f"config key 'moefy.label_k'={self.label_k} must be in [1, "
                        f"num_experts={self.num_experts}]")
    for key in ("kmeans_iters", "router_rows", "seq_len", "router_steps"):
      if getattr(self, key) < 1:
        raise ConfigError(f"config key 'moefy.{key}'={getattr(self, key)} must be >= 1")


# ---------------------------------------------------------------------------------------
# Splitting the FFN


def _sq_distances(x_NxD, c_KxD):
  return (np.sum(x_NxD ** 2, 1)[:, None] - 2 * x_NxD @ c_KxD.T
          + np.sum(c_KxD ** 2, 1)[None, :])


def _kmeans_pp(x_NxD, k, rng):
  """k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
  centres = [x_NxD[rng.integers(len(x_NxD))]]
  d2 = _sq_distances(x_NxD, centres[0][None])[:, 0]
  for _ in range(1, k):
    p = np.maximum(d2, 0)
    centres.append(x_NxD[rng.choice(len(x_NxD), p=p / p.sum())])
    d2 = np.minimum(d2, _sq_distances(x_NxD, centres[-1][None])[:, 0])
  return np.stack(centres)


def balanced_kmeans(x_NxD, k: int, *, iters: int = 20, seed: int = 0):
  """k clusters of exactly N / k points each, minimising within-cluster squared distance.

  Args:
    x_NxD: points (float64 internally).
    k: clusters; must divide N.
    iters: assignment/update rounds at most (it stops early at a fixed point).
    seed: k-means++ seeding.

  Returns:
    (labels [N] int64 in [0, k), objective after each assignment step [rounds]); the
    objective sequence is non-increasing.
  """
  x = np.asarray(x_NxD, np.float64)
  n = len(x)
  if k < 1 or n % k:
    raise ConfigError(f"balanced_kmeans: k={k} must divide the number of points {n}")
  centres = _kmeans_pp(x, k, np.random.default_rng(seed))
  labels, history = None, []
  for _ in range(iters):
    d2 = _sq_distances(x, centres)
    assign_NxK, _, _ = lp.solve_assignment(-d2, 1, capacity=n // k)
    new = np.argmax(assign_NxK, axis=1)
    history.append(float(d2[np.arange(n), new].sum()))
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    centres = np.stack([x[labels == j].mean(0) for j in range(k)])
  return labels, np.asarray(history)


def unit_permutation(labels_F, num_experts: int) -> np.ndarray:
  """[F] order of the units: group e's units at [e·G, (e+1)·G), ascending within a group.

  Groups are numbered by their lowest unit, so the result depends on the partition only,
  not on the cluster labels k-means happened to give it.
  """
  labels = np.asarray(labels_F)
  first = [np.flatnonzero(labels == j).min() for j in range(num_experts)]
  return np.concatenate([np.flatnonzero(labels == j) for j in np.argsort(first)])


def cluster_units(w_gate_DxF, num_experts: int, *, iters: int = 20, seed: int = 0):
  """`unit_permutation` of a layer's units, by `balanced_kmeans` of normalised w_gate columns.

  Returns (perm [F], final objective).
  """
  w = np.asarray(w_gate_DxF, np.float64).T
  w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  labels, history = balanced_kmeans(w, num_experts, iters=iters, seed=seed)
  return unit_permutation(labels, num_experts), float(history[-1])


def split_experts(blocks: dict, perm_LxF, num_experts: int) -> dict:
  """The expert stacks of a dense model's ``blocks``, unit order `perm_LxF`.

  Returns {"expert_gate": [L, E, D, G], "expert_up": [L, E, D, G],
  "expert_down": [L, E, G, D]} (G = F / E), in the weights' dtype.
  """
  perm = jnp.asarray(perm_LxF)
  L, D, F = blocks["w_gate"].shape
  G = F // num_experts
  cols = lambda w: jnp.take_along_axis(w, perm[:, None, :], axis=2)
  rows = jnp.take_along_axis(blocks["w_down"], perm[:, :, None], axis=1)
  to_stack = lambda w: w.reshape(L, D, num_experts, G).transpose(0, 2, 1, 3)
  return {"expert_gate": to_stack(cols(blocks["w_gate"])),
          "expert_up": to_stack(cols(blocks["w_up"])),
          "expert_down": rows.reshape(L, num_experts, G, D)}


def moe_config(base: llama.LlamaConfig, num_experts: int, top_k: int,
               dispatch: str = "dropless") -> moe.MoEConfig:
  """The MoE shape of a dense model split into `num_experts` unit-gated experts."""
  return moe.MoEConfig(base, num_experts=num_experts, top_k=top_k,
                       expert_dim=base.ffn_dim // num_experts, score="sigmoid",
                       normalize_gates=False, gates="unit", dispatch=dispatch)


def to_moe(base: llama.LlamaConfig, params: dict, perm_LxF, router_LxDxE, *, top_k: int,
           dispatch: str = "dropless"):
  """(MoEConfig, MoE params) of a dense LLaMA's params split by `perm_LxF`, with routers."""
  router = jnp.asarray(router_LxDxE, jnp.float32)
  E = router.shape[-1]
  config = moe_config(base, E, top_k, dispatch)
  blocks = {k: v for k, v in params["blocks"].items() if k not in ("w_gate", "w_up", "w_down")}
  blocks.update(split_experts(params["blocks"], perm_LxF, E), router=router)
  return config, {**params, "blocks": blocks}


# ---------------------------------------------------------------------------------------
# The dense model's FFN inputs and group contributions, layer by layer


def expert_outputs(p, h_TxD) -> jax.Array:
  """[T, E, D]: every expert of one layer (params `p`) on every token of h."""
  cast = lambda w: w.astype(h_TxD.dtype)
  a_TxExG = (jax.nn.silu(jnp.einsum("td,edg->teg", h_TxD, cast(p["expert_gate"])))
             * jnp.einsum("td,edg->teg", h_TxD, cast(p["expert_up"])))
  return jnp.einsum("teg,egd->ted", a_TxExG, cast(p["expert_down"]))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_layer(base: llama.LlamaConfig, p, x_BxTxD):
  x = llama.attention_sublayer(base, p, x_BxTxD)
  B, T, D = x.shape
  h_TxD = llama.rms_norm(x, p["mlp_norm"], base.norm_eps).reshape(B * T, D)
  y_TxExD = expert_outputs(p, h_TxD)
  norms_TxE = jnp.linalg.norm(y_TxExD.astype(jnp.float32), axis=-1)
  return x + y_TxExD.sum(1).reshape(B, T, D), h_TxD, norms_TxE


def teacher_layers(base: llama.LlamaConfig, moe_params: dict, tokens_NxT, *,
                   chunk_rows: int = 8):
  """Yields (layer, h [N·T, D], norms [N·T, E]) of the dense model, one layer at a time.

  h is the FFN input (post-attention RMSNorm); norms[t, e] = ||expert_e(h_t)||. Every
  expert is applied with weight 1, so the residual stream is the dense model's (the
  routers play no part). One layer's arrays are held at a time; rows go `chunk_rows` at
  a time through one compiled layer.
  """
  tokens = np.asarray(tokens_NxT)
  chunks = [tokens[i:i + chunk_rows] for i in range(0, len(tokens), chunk_rows)]
  xs = [llama.embed(base, moe_params, {"tokens": jnp.asarray(c)}) for c in chunks]
  for layer in range(base.num_layers):
    p = jax.tree.map(lambda w: w[layer], moe_params["blocks"])
    hs, norms = [], []
    for i, x in enumerate(xs):
      xs[i], h, n = _teacher_layer(base, p, x)
      hs.append(np.asarray(h))
      norms.append(np.asarray(n))
    yield layer, np.concatenate(hs), np.concatenate(norms)


# ---------------------------------------------------------------------------------------
# Routers


def top_k_mask(values_TxE, k: int) -> np.ndarray:
  """[T, E] float32: 1 where the entry is among its row's k largest (ties: lower index)."""
  _, idx = jax.lax.top_k(jnp.asarray(values_TxE, jnp.float32), k)
  return np.asarray(jax.nn.one_hot(idx, values_TxE.shape[-1]).sum(-2))


def recall_at_k(pred_TxE, true_TxE, k: int) -> float:
  """Mean over tokens of |top-k(pred) ∩ top-k(true)| / k."""
  return float(np.mean(np.sum(top_k_mask(pred_TxE, k) * top_k_mask(true_TxE, k), -1)) / k)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit(h_TxD, labels_TxE, *, steps):
  loss = lambda w: jnp.mean(optax.sigmoid_binary_cross_entropy(h_TxD @ w, labels_TxE))
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)
  w = jnp.zeros((h_TxD.shape[1], labels_TxE.shape[1]), jnp.float32)

  def step(carry, _):
    w, state = carry
    value, grad = value_and_grad(w, state=state)
    updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(w, updates), state), value

  (w, _), losses = jax.lax.scan(step, (w, opt.init(w)), None, length=steps)
  return w, losses


def fit_router(h_TxD, labels_TxE, *, steps: int = 100):
  """A linear router [D, E] (float32) by full-batch L-BFGS on binary cross-entropy.

  Minimises mean_{t,e} BCE(sigmoid(h_t · W_e), labels[t, e]) from W = 0: logistic
  regression, convex, so no seed; L-BFGS reaches in 60 steps the loss that Adam
  (lr 3e-2) reaches in 300 on SmolLM2's layers.

  Returns:
    (W [D, E] float32, loss before each step [steps]).
  """
  w, losses = _fit(jnp.asarray(h_TxD, jnp.float32), jnp.asarray(labels_TxE, jnp.float32),
                   steps=steps)
  return np.asarray(w), np.asarray(losses)


def router_recall(base: llama.LlamaConfig, moe_params: dict, tokens_NxT, k: int) -> np.ndarray:
  """[L] recall@k of each layer's router against the true top-k groups, on `tokens_NxT`."""
  router = np.asarray(moe_params["blocks"]["router"])
  return np.asarray([recall_at_k(h @ router[layer], norms, k)
                     for layer, h, norms in teacher_layers(base, moe_params, tokens_NxT)])


def convert(base: llama.LlamaConfig, params: dict, train_tokens_NxT, settings: MoefyConfig):
  """Splits a dense LLaMA into experts and fits its routers (see the module docstring).

  Args:
    base: the dense model's config.
    params: its parameters.
    train_tokens_NxT: int32 tokens the routers are fitted on.
    settings: the conversion's settings.

  Returns:
    (perm [L, F] int32, router [L, D, E] float32, report {per-layer lists}).
  """
  settings.validate(base.ffn_dim)
  E = settings.num_experts
  start = time.perf_counter()
  w_gate = np.asarray(params["blocks"]["w_gate"])
  perm, objective = zip(*(cluster_units(w_gate[l], E, iters=settings.kmeans_iters,
                                        seed=settings.seed + l)
                          for l in range(base.num_layers)))
  perm = np.stack(perm).astype(np.int32)
  cluster_s = time.perf_counter() - start
  router = np.zeros((base.num_layers, base.dim, E), np.float32)
  _, moe_params = to_moe(base, params, perm, router, top_k=settings.label_k)
  train_recall, final_loss = [], []
  for layer, h, norms in teacher_layers(base, moe_params, train_tokens_NxT):
    labels = top_k_mask(norms, settings.label_k)
    router[layer], losses = fit_router(h, labels, steps=settings.router_steps)
    train_recall.append(recall_at_k(h @ router[layer], norms, settings.label_k))
    final_loss.append(float(losses[-1]))
    log.info("moefy layer %d: kmeans objective %.2f, train recall@%d %.3f", layer,
             objective[layer], settings.label_k, train_recall[-1])
  report = {"kmeans_objective": list(objective), "router_train_recall": train_recall,
            "router_final_bce": final_loss, "cluster_s": cluster_s,
            "router_s": time.perf_counter() - start - cluster_s}
  return perm, router, report


# ---------------------------------------------------------------------------------------
# SmolLM2-135M: cached conversion and the registered model


def cache_path(settings: MoefyConfig = MoefyConfig()):
  """Where the SmolLM2 conversion with `settings` is cached (names every setting)."""
  s = settings
  gguf_sha = fetch.ASSETS["smollm2"].sha256[:12]
  name = (f"{_VERSION}-smollm2-135m-{gguf_sha}-E{s.num_experts}-label{s.label_k}"
          f"-km{s.kmeans_iters}-rows{s.router_rows}x{s.seq_len}-lbfgs{s.router_steps}"
          f"-seed{s.seed}.npz")
  return fetch.data_dir() / "moefy" / name


def router_train_tokens(settings: MoefyConfig) -> np.ndarray:
  """`router_rows` rows of the corpus train split (seq_len tokens), drawn across sources."""
  from zojax.data import corpus, tokenizer  # data loading only when converting
  rows = corpus.packed_sequences(tokenizer.smollm2_tokenizer(), settings.seq_len, "train")
  pick = np.random.default_rng(settings.seed).choice(len(rows), settings.router_rows,
                                                     replace=False)
  return rows[np.sort(pick), :-1]


def load_smollm2_moe(settings: MoefyConfig = MoefyConfig(), *, top_k: int = 4,
                     dispatch: str = "dropless", dense=None):
  """(MoEConfig, params) of the cached SmolLM2 conversion; `dense` = (config, params) if loaded.

  Raises:
    fetch.AssetError: (one line) nothing is cached for `settings`.
  """
  path = cache_path(settings)
  if not path.exists():
    raise fetch.AssetError(f"no MoEfied SmolLM2 cached at {path}; convert it first with "
                           "`python experiments/moefy_smollm2.py --convert_only` (CPU minutes)")
  with np.load(path) as f:
    perm, router = f["perm"], f["router"]
  base, params = smollm2.load_smollm2() if dense is None else dense
  return to_moe(base, params, perm, router, top_k=top_k, dispatch=dispatch)


def load_or_convert(settings: MoefyConfig = MoefyConfig(), *, top_k: int = 4,
                    dispatch: str = "dropless", dense=None):
  """`load_smollm2_moe`, converting and caching first when nothing is cached.

  Returns:
    (MoEConfig, params, the conversion's {"settings", "report"}: per-layer k-means objective,
    train recall and final BCE of the routers, seconds spent clustering and fitting).
  """
  path = cache_path(settings)
  dense = smollm2.load_smollm2() if dense is None else dense
  if not path.exists():
    perm, router, report = convert(*dense, router_train_tokens(settings), settings)
    meta = {"settings": dataclasses.asdict(settings), "report": report}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, perm=perm, router=router, meta=json.dumps(meta))
    tmp.replace(path)
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
  config, params = load_smollm2_moe(settings, top_k=top_k, dispatch=dispatch, dense=dense)
  return config, params, meta


@registry.register(REGISTERED_NAME)
def _registered(cfg, task=None) -> interface.Model:
  """SmolLM2-135M split into 16 unit-gated experts of 96 (model.top_k, default 4)."""
  base = llama.with_overrides(llama.CONFIGS[smollm2.CONFIG_NAME], cfg, task)
  if base.vocab_size != llama.CONFIGS[smollm2.CONFIG_NAME].vocab_size:
    raise ConfigError(f"config key 'model.vocab_size'={base.vocab_size}: the converted "
                      f"weights have {llama.CONFIGS[smollm2.CONFIG_NAME].vocab_size} tokens")
  settings = MoefyConfig()
  config = moe_config(base, settings.num_experts, cfg.get("top_k", 4),
                      cfg.get("dispatch", "dropless"))
  pretrained = None
  if cfg.get("init", "pretrained") == "pretrained":
    pretrained = lambda: load_smollm2_moe(settings, top_k=config.top_k)[1]
  built = moe.model(config, name=REGISTERED_NAME, remat=cfg.get("remat", False))
  return dataclasses.replace(built, pretrained=pretrained)

