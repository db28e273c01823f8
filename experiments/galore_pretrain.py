"""Pre-training from scratch on the offline corpus: AdamW vs the GaLore family, same token budget.

  .venv/bin/python experiments/galore_pretrain.py                       # the CPU run (~40 min)
  .venv/bin/python experiments/galore_pretrain.py --steps 20 --eval-every 10 --runs adamw,galore

The shape of the GaLore paper's Table 2 (validation perplexity of full-rank AdamW against
GaLore at the same budget), scaled to what a shared 2-core CPU affords: a 4-layer, d=192
LLaMA (untied, MHA, SwiGLU; 3.3M parameters) on the packed corpus (SmolLM2 tokenizer,
rows of 128 tokens). The tokenizer's 49k vocabulary would make the output layer most of the
compute, so token ids are remapped to the 4095 most frequent train ids plus one shared
bucket for the rest (counted from the train split only; the bucket is a regular class).

Runs (one seed, identical batches): AdamW (lr 1e-3, the paper's baseline lr; 3e-3, near the
lr GaLore's projected leaves get, 1e-2 x 0.25; and 1e-2, the lr its full-rank leaves get),
8-bit Adam, GaLore (lr 1e-2, scale 0.25, rank 48 = d/4, T = 100; the paper's lr/scale, its
rank/d ratio at 60M, T scaled to the run), GaLore with the randomized projector, 8-bit
GaLore, Natural GaLore. Cosine schedule with 10% warmup to 10% of peak, as the paper. Writes
experiments/results/galore_pretrain.json and .png (runs already recorded there with the same
steps and batch size are kept, so the sweep can be spread over several processes) and prints
a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax import optim
from zojax.data import batching, corpus
from zojax.data.tokenizer import smollm2_tokenizer
from zojax.models import llama
from zojax.optim.masks import decay_mask

RESULTS = pathlib.Path(__file__).parent / "results"
VOCAB = 4096
SEQ = 128
MODEL = llama.LlamaConfig(vocab_size=VOCAB, dim=192, num_layers=4, num_heads=4, num_kv_heads=4,
                          ffn_dim=512, tie_embeddings=False)
RANK, GAP, SCALE = 48, 100, 0.25


def optimizers(steps: int) -> dict:
  def sched(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps, 0.1 * peak)
  settings = optim.GaLoreSettings(rank=RANK, update_proj_gap=GAP, history=20)
  g = dict(scale=SCALE, settings=settings)
  randomized = dict(g, settings=dataclasses.replace(settings, projector="randomized",
                                                    power_iters=1))
  return {
      "adamw": optax.adamw(sched(1e-3), weight_decay=0.0, mask=decay_mask),
      # GaLore's embeddings, norms and head train at its full lr 1e-2: AdamW at that lr too.
      "adamw_lr1e-2": optax.adamw(sched(1e-2), weight_decay=0.0, mask=decay_mask),
      # GaLore's projected leaves train at lr * scale = 2.5e-3: AdamW near that lr too.
      "adamw_lr3e-3": optax.adamw(sched(3e-3), weight_decay=0.0, mask=decay_mask),
      "adam8bit": optim.adam8bit(sched(1e-3)),
      "galore": optim.galore_adamw(sched(1e-2), **g),
      "galore_randomized": optim.galore_adamw(sched(1e-2), **randomized),
      "galore8bit": optim.galore8bit(sched(1e-2), **g),
      "natural_galore": optim.natural_galore(sched(1e-2), damping=1e-3, **g),
  }


def data(seed: int = 0):
  tok = smollm2_tokenizer()
  train = corpus.packed_sequences(tok, SEQ, "train")
  val = corpus.packed_sequences(tok, SEQ, "validation")[:64]
  remap, coverage = corpus.frequency_remap(train, tok.get_vocab_size(), VOCAB)
  rows = lambda r: {"tokens": remap[r[:, :-1]], "targets": remap[r[:, 1:]]}
  return rows(train), rows(val), coverage


def run(name, tx, train, val, *, steps, batch_size, eval_every, seed=0):
  params = llama.init(MODEL, jax.random.key(seed))
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: llama.loss_fn(MODEL, p, batch)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def val_loss(params):
    return llama.loss_fn(MODEL, params, val)[0]

  curve, evals, t_steps = [], [], []
  evals.append((0, float(val_loss(params))))
  for t in range(steps):
    batch = batching.batches(train, batch_size, seed=seed, step=t)
    t0 = time.perf_counter()
    params, state, loss = step(params, state, batch)
    loss = float(loss)
    if t:  # step 0 compiles
      t_steps.append(time.perf_counter() - t0)
    curve.append(loss)
    if (t + 1) % eval_every == 0 or t + 1 == steps:
      evals.append((t + 1, float(val_loss(params))))
      print(f"{name} step {t + 1} train {np.mean(curve[-eval_every:]):.3f} "
            f"val {evals[-1][1]:.3f} ({np.median(t_steps):.2f} s/step)", flush=True)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"train_loss": curve, "val": evals, "final_val_loss": evals[-1][1],
          "final_val_ppl": math.exp(evals[-1][1]), "median_step_s": float(np.median(t_steps)),
          "optimizer_state_bytes": int(state_bytes)}


def plot(results, path):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in results.items():
    loss = np.asarray(r["train_loss"])
    k = 10
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax[0].plot(np.arange(len(smooth)) + k, smooth, label=name)
    s, v = zip(*r["val"])
    ax[1].plot(s, np.exp(v), marker="o", label=f"{name} ({r['final_val_ppl']:.1f})")
  ax[0].set(xlabel="step", ylabel="train loss (10-step mean)", title="training loss")
  ax[1].set(xlabel="step", ylabel="validation perplexity", yscale="log",
            title="validation perplexity")
  for a in ax:
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--eval-every", type=int, default=50)
  ap.add_argument("--runs", default="adamw,adamw_lr3e-3,adamw_lr1e-2,galore,galore_randomized,"
                                    "galore8bit,"
                                    "natural_galore,adam8bit")
  ap.add_argument("--out", default=str(RESULTS / "galore_pretrain.json"))
  args = ap.parse_args()
  train, val, coverage = data()
  txs = optimizers(args.steps)
  out = pathlib.Path(args.out)
  # Runs already recorded (same settings) are kept, so runs can be spread over processes.
  results = {}
  if out.exists():
    previous = json.loads(out.read_text())
    if (previous.get("steps"), previous.get("batch_size")) == (args.steps, args.batch_size):
      results = previous["runs"]
  for name in args.runs.split(","):
    results[name] = run(name, txs[name], train, val, steps=args.steps,
                        batch_size=args.batch_size, eval_every=args.eval_every)
    record = {
        "model": {"dim": MODEL.dim, "layers": MODEL.num_layers, "ffn": MODEL.ffn_dim,
                  "vocab": VOCAB, "params": MODEL.num_params},
        "tokens_per_run": args.steps * args.batch_size * SEQ, "seeds": [0],
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ,
        "vocab_coverage_of_train_tokens": coverage,
        "galore": {"rank": RANK, "update_proj_gap": GAP, "scale": SCALE},
        "validation_rows": len(val["tokens"]), "runs": results,
    }
    out.write_text(json.dumps(record, indent=1))
  plot(results, out.with_suffix(".png"))
  base = results.get("adamw", {}).get("final_val_ppl")
  summary = {k: round(r["final_val_ppl"], 2) for k, r in results.items()}
  if base:
    summary["gap_vs_adamw_pct"] = {k: round(100 * (r["final_val_ppl"] / base - 1), 1)
                                   for k, r in results.items() if k != "adamw"}
  print(json.dumps({"val_ppl": summary, "tokens_per_run": record["tokens_per_run"],
                    "params": MODEL.num_params}))


if __name__ == "__main__":
  main()
