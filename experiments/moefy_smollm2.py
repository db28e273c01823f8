"""SmolLM2-135M MoEfied (16 experts of 96 units per layer): router recall and perplexity cost.

  .venv/bin/python experiments/moefy_smollm2.py                 # convert (cached) + evaluate
  .venv/bin/python experiments/moefy_smollm2.py --quick         # a smoke run, seconds-minutes
  .venv/bin/python experiments/moefy_smollm2.py --convert_only  # only fill the cache

The conversion (`zojax.models.moefy`, default settings: balanced k-means of w_gate columns,
L-BFGS routers on 64 train rows x 512 tokens) is cached; later runs load it in seconds.

Reports, on rows of 512 tokens evenly spread over the corpus VALIDATION split:
  * per layer, held-out router recall@4 (and @8) of the true top groups by ||expert(h)||,
    on the dense model's FFN inputs; a random router's recall@4 as the chance control; the
    share of the summed group-output norms the true top-4 hold (how concentrated the FFN is);
    the FFN output's relative error ||FFN(h) - kept|| / ||FFN(h)|| with 4 groups kept by the
    router, by an oracle (largest norms), and by an oracle over a random equal-size
    partition of the units (the control that shows what the clustering buys);
  * perplexity of: dense SmolLM2; MoEfied top-4 (the Fate issue's setting), top-8, top-12, all 16
    (must equal dense: unit gates); a random router at top-4 (the control); and an oracle
    top-4 that keeps each token's 4 largest groups (what a perfect router could reach).
    Every MoE row runs the MoE decoder itself (`zojax.models.moe`, dispatch "dense": exact,
    nothing dropped); the oracle runs the same attention and experts in its own scan.
  * the paired standard error of each row's log-perplexity difference from dense, over
    the evaluation batches.
Writes experiments/results/moefy_smollm2.json (and _quick) and a PNG; prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zojax.data import corpus, tokenizer  # noqa: E402
from zojax.models import llama, moe, moefy, protocol, smollm2  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
QUICK = moefy.MoefyConfig(kmeans_iters=2, router_rows=4, seq_len=128, router_steps=5)


def validation_rows(seq_len: int, num_rows: int) -> np.ndarray:
  """`num_rows` rows evenly spaced over the validation split (it is in source order)."""
  rows = corpus.packed_sequences(tokenizer.smollm2_tokenizer(), seq_len, "validation")
  if num_rows > len(rows):
    raise ValueError(f"--eval_rows={num_rows}: the validation split has {len(rows)} rows")
  return rows[np.unique(np.linspace(0, len(rows) - 1, num_rows).round().astype(int))]


def _oracle_loss(config: moe.MoEConfig, params, batch):
  """The MoE forward with each token's top-K groups by ||expert(h)|| (unit gates)."""
  base = config.base

  def body(x, p):
    x = llama.attention_sublayer(base, p, x)
    h_TxD = moe.ffn_input(config, p, x)
    y_TxExD = moefy.expert_outputs(p, h_TxD)
    _, top = jax.lax.top_k(jnp.linalg.norm(y_TxExD, axis=-1), config.top_k)
    keep_TxE = jax.nn.one_hot(top, config.num_experts, dtype=y_TxExD.dtype).sum(-2)
    return x + jnp.einsum("te,ted->td", keep_TxE, y_TxExD).reshape(x.shape), None

  x, _ = jax.lax.scan(body, llama.embed(base, params, batch), params["blocks"])
  return llama.head(base, params, x, batch)[1]


def loss_sums(loss_fn, params, rows, batch_rows: int) -> np.ndarray:
  """Per-batch [loss_sum, count] of `loss_fn(params, batch) -> metrics` over `rows`."""
  step = jax.jit(loss_fn)
  out = []
  for i in range(0, len(rows), batch_rows):
    r = jnp.asarray(rows[i:i + batch_rows])
    m = step(params, {"tokens": r[:, :-1], "targets": r[:, 1:]})
    out.append([float(m["loss_sum"]), float(m["count"])])
  return np.asarray(out)


def perplexities(dense, moe_config, moe_params, random_params, rows, batch_rows):
  base, params = dense
  state = moe.init_state(moe_config, None)
  moe_loss = lambda c: (lambda p, b: protocol.apply(moe.make(c, state), p, b)[1])
  with_k = lambda k: dataclasses.replace(moe_config, top_k=k)
  arms = {
      "dense": (lambda p, b: llama.loss_fn(base, p, b)[1], params),
      "moe_top4": (moe_loss(with_k(4)), moe_params),
      "moe_top8": (moe_loss(with_k(8)), moe_params),
      "moe_top12": (moe_loss(with_k(12)), moe_params),
      "moe_all16": (moe_loss(with_k(16)), moe_params),
      "random_router_top4": (moe_loss(with_k(4)), random_params),
      "oracle_top4": (lambda p, b: _oracle_loss(with_k(4), p, b), moe_params),
  }
  sums, rows_out = {}, {}
  for name, (fn, p) in arms.items():
    start = time.perf_counter()
    sums[name] = loss_sums(fn, p, rows, batch_rows)
    seconds = time.perf_counter() - start
    nll = sums[name][:, 0].sum() / sums[name][:, 1].sum()
    diff = sums[name][:, 0] / sums[name][:, 1] - sums["dense"][:, 0] / sums["dense"][:, 1]
    dense_nll = sums["dense"][:, 0].sum() / sums["dense"][:, 1].sum()  # "dense" runs first
    rows_out[name] = {"perplexity": float(np.exp(nll)), "nll": float(nll),
                      "nll_minus_dense": float(nll - dense_nll),
                      "paired_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))
                      if len(diff) > 1 else None,
                      "seconds": seconds}
    logging.info("%s: perplexity %.3f (%.0f s)", name, np.exp(nll), seconds)
  return rows_out


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_errors(p, h_TxD, router_DxE, random_perm_F, *, k):
  """Sums over tokens of ||FFN(h) - kept groups|| / ||FFN(h)|| for K groups kept by: the
  router, the oracle (largest norms), and the oracle over a random equal-size partition."""
  y_TxExD = moefy.expert_outputs(p, h_TxD)
  full_TxD = y_TxExD.sum(1)
  E = y_TxExD.shape[1]

  def err(y, choice_TxE):
    _, top = jax.lax.top_k(choice_TxE, k)
    kept_TxD = jnp.einsum("te,ted->td", jax.nn.one_hot(top, E).sum(-2), y)
    return jnp.sum(jnp.linalg.norm(full_TxD - kept_TxD, axis=-1)
                   / jnp.linalg.norm(full_TxD, axis=-1))

  D, F = p["expert_gate"].shape[1], E * p["expert_gate"].shape[2]
  flat = lambda w: w.transpose(1, 0, 2).reshape(D, F)[:, random_perm_F]
  regroup = lambda w: w.reshape(D, E, F // E).transpose(1, 0, 2)
  down = p["expert_down"].reshape(F, D)[random_perm_F].reshape(E, F // E, D)
  y_random = moefy.expert_outputs({"expert_gate": regroup(flat(p["expert_gate"])),
                                   "expert_up": regroup(flat(p["expert_up"])),
                                   "expert_down": down}, h_TxD)
  return (err(y_TxExD, h_TxD @ router_DxE),
          err(y_TxExD, jnp.linalg.norm(y_TxExD, axis=-1)),
          err(y_random, jnp.linalg.norm(y_random, axis=-1)))


def recall_table(base, moe_params, random_router, rows, chunk: int = 4096):
  """Per layer, on the dense model's FFN inputs: recall@4, @8 of the fitted routers and
  recall@4 of a random one; the true top-4's share of the group norms; and the relative
  error of the FFN output when only 4 groups are kept (router / oracle / oracle over a
  random partition: the clustering's control)."""
  router = np.asarray(moe_params["blocks"]["router"])
  names = ("recall4", "recall8", "random_recall4", "top4_norm_share", "router_top4_rel_err",
           "oracle_top4_rel_err", "random_partition_oracle_top4_rel_err")
  out = {n: [] for n in names}
  rng = np.random.default_rng(2)
  for layer, h, norms in moefy.teacher_layers(base, moe_params, rows[:, :-1]):
    logits = h @ router[layer]
    out["recall4"].append(moefy.recall_at_k(logits, norms, 4))
    out["recall8"].append(moefy.recall_at_k(logits, norms, 8))
    out["random_recall4"].append(moefy.recall_at_k(h @ random_router[layer], norms, 4))
    top4 = np.sort(norms, axis=-1)[:, -4:].sum(-1)
    out["top4_norm_share"].append(float(np.mean(top4 / norms.sum(-1))))
    p = {k: moe_params["blocks"][k][layer] for k in ("expert_gate", "expert_up", "expert_down")}
    perm = jnp.asarray(rng.permutation(base.ffn_dim))
    errs = np.sum([np.asarray(_top_k_errors(p, jnp.asarray(h[i:i + chunk]), router[layer],
                                            perm, k=4))
                   for i in range(0, len(h), chunk)], axis=0) / len(h)
    for name, e in zip(names[4:], errs):
      out[name].append(float(e))
  return out


def plot(result: dict, path: pathlib.Path) -> None:
  fig, (a, c, b) = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [3, 3, 2]})
  rec = result["recall"]
  layers = np.arange(len(rec["recall4"]))
  a.plot(layers, rec["recall4"], "o-", label="router recall@4 (held out)")
  a.plot(layers, result["conversion"]["report"]["router_train_recall"], "x:", color="C0",
         alpha=0.6, label="router recall@4 (train)")
  a.plot(layers, rec["recall8"], "s-", label="router recall@8 (held out)")
  a.plot(layers, rec["random_recall4"], "^--", color="gray", label="random router recall@4")
  a.set(xlabel="layer", ylabel="recall", ylim=(0, 1),
        title="Routers: recall of the true top groups by ||expert(h)||")
  a.legend(fontsize=8, loc="lower right")
  c.plot(layers, rec["router_top4_rel_err"], "v-", color="C4", label="router top-4")
  c.plot(layers, rec["oracle_top4_rel_err"], "v--", color="C5", label="oracle top-4")
  c.plot(layers, rec["random_partition_oracle_top4_rel_err"], "v:", color="C7",
         label="oracle top-4, random partition")
  c.plot(layers, rec["top4_norm_share"], "d-", color="C3", alpha=0.6,
         label="true top-4 share of group norms")
  c.set(xlabel="layer", ylabel="fraction", ylim=(0, 1),
        title="FFN output relative error with 4 of 16 groups")
  c.legend(fontsize=8, loc="lower left")
  names = list(result["perplexity"])
  ppl = [result["perplexity"][n]["perplexity"] for n in names]
  colors = ["black", "C0", "C1", "C9", "C2", "gray", "C3"]
  bars = b.bar(range(len(names)), ppl, color=colors[:len(names)])
  b.bar_label(bars, fmt="%.1f", fontsize=7)
  b.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
  b.set_yscale("log")
  b.set(ylabel="validation perplexity (log)",
        title=f"{result['eval_tokens']:,} validation tokens")
  fig.suptitle("SmolLM2-135M MoEfied: 16 groups of 96 units per layer, unit gates", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny conversion and evaluation")
  ap.add_argument("--convert_only", action="store_true", help="fill the cache and stop")
  ap.add_argument("--eval_rows", type=int, default=64, help="validation rows of 512 tokens")
  ap.add_argument("--batch_rows", type=int, default=4)
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  settings = QUICK if args.quick else moefy.MoefyConfig()
  eval_rows = 2 if args.quick else args.eval_rows

  start = time.perf_counter()
  dense = smollm2.load_smollm2()
  cached = moefy.cache_path(settings).exists()
  moe_config, moe_params, meta = moefy.load_or_convert(settings, dispatch="dense", dense=dense)
  conversion = {**meta, "cached": cached, "seconds": time.perf_counter() - start,
                "cache": str(moefy.cache_path(settings))}
  if args.convert_only:
    print(json.dumps({"cache": conversion["cache"], "seconds": conversion["seconds"]}))
    return conversion

  base = dense[0]
  random_router = np.random.default_rng(1).normal(
      size=moe_params["blocks"]["router"].shape).astype(np.float32)
  random_params = {**moe_params, "blocks": {**moe_params["blocks"], "router": random_router}}
  rows = validation_rows(settings.seq_len, eval_rows)
  t = time.perf_counter()
  recall = recall_table(base, moe_params, random_router, rows)
  recall_s = time.perf_counter() - t
  ppl = perplexities(dense, moe_config, moe_params, random_params, rows, args.batch_rows)
  all16_gap = abs(ppl["moe_all16"]["nll"] - ppl["dense"]["nll"])
  result = {
      "quick": args.quick, "settings": dataclasses.asdict(settings),
      "eval_tokens": int(rows[:, 1:].size), "eval_rows": len(rows),
      "conversion": conversion, "recall": recall, "recall_seconds": recall_s,
      "recall4_mean": float(np.mean(recall["recall4"])),
      "recall8_mean": float(np.mean(recall["recall8"])),
      "perplexity": ppl, "all16_nll_gap_to_dense": all16_gap,
      "device": jax.devices()[0].device_kind,
  }
  name = "moefy_smollm2_quick" if args.quick else "moefy_smollm2"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
  plot(result, RESULTS / f"{name}.png")
  summary = {"eval_tokens": result["eval_tokens"], "recall4_mean": result["recall4_mean"],
             "recall8_mean": result["recall8_mean"],
             "perplexity": {k: round(v["perplexity"], 3) for k, v in ppl.items()},
             "all16_nll_gap_to_dense": all16_gap}
  print(json.dumps(summary))
  if all16_gap > 1e-4:
    raise SystemExit(f"all 16 experts differ from dense by {all16_gap:.2e} nats/token")
  return result


if __name__ == "__main__":
  main()
