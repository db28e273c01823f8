"""Pre-training from scratch on the offline corpus: AdamW vs the GaLore family, same token budget.

  .venv/bin/python experiments/galore_pretrain.py --size medium        # issue 14's rerun (~2 h)
  .venv/bin/python experiments/galore_pretrain.py --size small         # the first table (~40 min)
  .venv/bin/python experiments/galore_pretrain.py --size medium --steps 8 --eval-every 4 \
      --runs adamw,galore --seeds 0 --out /tmp/gp/smoke.json           # a quick check

The shape of the GaLore paper's Table 2 (validation perplexity of full-rank AdamW against
GaLore at the same budget), scaled to a shared 2-core CPU: an untied LLaMA (MHA, SwiGLU) on
the packed corpus (SmolLM2 tokenizer, rows of 128 tokens). The tokenizer's 49k vocabulary
would make the output layer most of the compute, so token ids are remapped to the V - 1 most
frequent train ids plus one shared bucket (counted from the train split only; the bucket is
a regular class).

Sizes:
  small   4 layers, d=192, V=4096: 3.3M params; batch 8 x 400 steps = 409,600 tokens; 1 seed.
  medium  8 layers, d=256, V=8192: 10.5M params; batch 16 x 512 steps = 1,048,576 tokens;
          2 seeds (init and batch order); 256 validation rows.

Runs (identical batches per seed; cosine schedule, 10% warmup to 10% of peak, no weight
decay, as the paper's pre-training):
  adamw, adamw_lr3e-3, adamw_lr1e-2   full-rank AdamW at one lr for every leaf;
  adamw_pergroup   AdamW with GaLore's learning rates: the leaves GaLore projects (block
                   matrices) at lr x scale = 2.5e-3, the rest (embedding, head, norms) at
                   1e-2. The control for "GaLore wins because its embedding and head train at
                   a higher lr than any single AdamW lr gives them";
  adam8bit         8-bit Adam, lr 1e-3;
  galore           GaLore-AdamW, lr 1e-2, scale 0.25, rank d/4, T 100 (the paper's lr/scale,
                   its rank/d ratio at 60M, T scaled to the run);
  galore_fullrank  GaLore with rank = d (every block matrix's min(m, n)): nothing is
                   compressed, Adam runs in the gradient's singular basis (refreshed every
                   T steps). Separates the low-rank restriction from the change of basis;
  galore_randomized, galore8bit, natural_galore   its variants (small size).

Each finished (run, seed) is written to experiments/results/galore_pretrain[_SIZE].json at
once, and runs already recorded there with the same settings are skipped, so a killed sweep
resumes by rerunning the same command (an interrupted run starts over). Also writes a .png
and prints a one-line JSON summary (mean and per-seed validation perplexity).
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
import numpy as np
import optax

from zojax import optim
from zojax.data import batching, corpus
from zojax.data.tokenizer import smollm2_tokenizer
from zojax.models import llama
from zojax.optim.masks import decay_mask

RESULTS = pathlib.Path(__file__).parent / "results"
SEQ = 128
GAP, SCALE, LR, GALORE_LR = 100, 0.25, 1e-3, 1e-2


@dataclasses.dataclass(frozen=True)
class Size:
  model: llama.LlamaConfig
  rank: int
  steps: int
  batch_size: int
  eval_every: int
  seeds: str
  validation_rows: int
  runs: str
  out: str


def _model(vocab, dim, layers, ffn):
  return llama.LlamaConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=4,
                           num_kv_heads=4, ffn_dim=ffn, tie_embeddings=False)


SIZES = {
    "small": Size(_model(4096, 192, 4, 512), rank=48, steps=400, batch_size=8, eval_every=50,
                  seeds="0", validation_rows=64,
                  runs="adamw,adamw_lr3e-3,adamw_lr1e-2,galore,galore_randomized,galore8bit,"
                       "natural_galore,adam8bit",
                  out="galore_pretrain.json"),
    "medium": Size(_model(8192, 256, 8, 688), rank=64, steps=512, batch_size=16,
                   eval_every=64, seeds="0,1", validation_rows=256,
                   runs="adamw,adamw_pergroup,galore,adam8bit,galore_fullrank,adamw_lr3e-3",
                   out="galore_pretrain_medium.json"),
}


def optimizers(size: Size, steps: int, params) -> dict:
  def sched(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(steps // 10, 1), steps, 0.1 * peak)
  settings = optim.GaLoreSettings(rank=size.rank, update_proj_gap=GAP, history=20)
  g = dict(scale=SCALE, settings=settings)
  randomized = dict(g, settings=dataclasses.replace(settings, projector="randomized",
                                                    power_iters=1))
  full_rank = dict(g, settings=dataclasses.replace(settings, rank=size.model.dim))
  # Which leaves GaLore projects (block matrices) and which it trains full rank.
  plan = optim.galore_plan(params, settings)
  groups = jax.tree_util.tree_map_with_path(
      lambda path, _: "full" if plan[jax.tree_util.keystr(path)].startswith("full rank")
      else "projected", params)
  adamw = lambda peak: optax.adamw(sched(peak), weight_decay=0.0, mask=decay_mask)
  return {
      "adamw": adamw(LR),
      # GaLore's projected leaves train at lr * scale = 2.5e-3: AdamW near that lr too.
      "adamw_lr3e-3": adamw(3e-3),
      # GaLore's embeddings, norms and head train at its full lr 1e-2: AdamW at that lr too.
      "adamw_lr1e-2": adamw(GALORE_LR),
      # Both of GaLore's learning rates at once, without the projection.
      "adamw_pergroup": optax.multi_transform(
          {"projected": adamw(GALORE_LR * SCALE), "full": adamw(GALORE_LR)}, groups),
      "adam8bit": optim.adam8bit(sched(LR)),
      "galore": optim.galore_adamw(sched(GALORE_LR), **g),
      # rank = min(m, n): no compression, only Adam in the gradient's singular basis.
      "galore_fullrank": optim.galore_adamw(sched(GALORE_LR), **full_rank),
      "galore_randomized": optim.galore_adamw(sched(GALORE_LR), **randomized),
      "galore8bit": optim.galore8bit(sched(GALORE_LR), **g),
      "natural_galore": optim.natural_galore(sched(GALORE_LR), damping=1e-3, **g),
  }


def data(size: Size):
  tok = smollm2_tokenizer()
  train = corpus.packed_sequences(tok, SEQ, "train")
  val = corpus.packed_sequences(tok, SEQ, "validation")[:size.validation_rows]
  remap, coverage = corpus.frequency_remap(train, tok.get_vocab_size(), size.model.vocab_size)
  rows = lambda r: {"tokens": remap[r[:, :-1]], "targets": remap[r[:, 1:]]}
  return rows(train), rows(val), coverage


def run(name, model, tx, train, val, *, steps, batch_size, eval_every, seed):
  params = llama.init(model, jax.random.key(seed))
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: llama.loss_fn(model, p, batch)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def val_loss(params):
    return llama.loss_fn(model, params, val)[0]

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
    if not math.isfinite(loss):
      raise FloatingPointError(f"{name} seed {seed}: loss {loss} at step {t}")
    if (t + 1) % eval_every == 0 or t + 1 == steps:
      evals.append((t + 1, float(val_loss(params))))
      print(f"{name} seed {seed} step {t + 1} train {np.mean(curve[-eval_every:]):.3f} "
            f"val {evals[-1][1]:.3f} ({np.median(t_steps):.2f} s/step)", flush=True)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"train_loss": curve, "val": evals, "final_val_loss": evals[-1][1],
          "final_val_ppl": math.exp(evals[-1][1]), "median_step_s": float(np.median(t_steps)),
          "optimizer_state_bytes": int(state_bytes)}


def summary(runs: dict) -> dict:
  """Per run: validation perplexity per seed, and of the mean final validation loss."""
  out = {}
  for name, by_seed in runs.items():
    losses = [r["final_val_loss"] for r in by_seed.values()]
    out[name] = {"ppl_per_seed": {s: round(r["final_val_ppl"], 2) for s, r in by_seed.items()},
                 "ppl_of_mean_loss": round(math.exp(float(np.mean(losses))), 2)}
  return out


LABELS = {
    "adamw": "AdamW lr 1e-3", "adamw_lr3e-3": "AdamW lr 3e-3", "adamw_lr1e-2": "AdamW lr 1e-2",
    "adamw_pergroup": "AdamW, GaLore's lrs (blocks 2.5e-3, embed/head/norms 1e-2)",
    "adam8bit": "8-bit Adam lr 1e-3", "galore": "GaLore (exact SVD)",
    "galore_fullrank": "GaLore at full rank (rank d: Adam in the gradient's singular basis)",
    "galore_randomized": "GaLore (randomized projector)", "galore8bit": "8-bit GaLore",
    "natural_galore": "Natural GaLore (s=20)",
}


def table(record: dict, reference: str = "adamw") -> str:
  """Markdown: final validation loss per seed, their mean's perplexity, and the paired
  (same seed: same init and batches) loss difference to `reference` per seed."""
  runs = record["runs"]
  seeds = sorted({s for r in runs.values() for s in r}, key=int)
  head = ["run", *[f"val loss seed {s}" for s in seeds], "ppl (mean loss)",
          f"paired diff. vs {reference} (nats)", "optimizer state"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  ref = runs.get(reference, {})
  for name, by_seed in runs.items():
    losses = [by_seed[s]["final_val_loss"] if s in by_seed else None for s in seeds]
    done = [x for x in losses if x is not None]
    diffs = [by_seed[s]["final_val_loss"] - ref[s]["final_val_loss"] for s in seeds
             if s in by_seed and s in ref]
    mb = next(iter(by_seed.values()))["optimizer_state_bytes"] / 1e6
    cells = [LABELS.get(name, name), *[f"{x:.3f}" if x is not None else "not run"
                                       for x in losses],
             f"{math.exp(np.mean(done)):.1f}",
             "-" if name == reference else " / ".join(f"{d:+.3f}" for d in diffs),
             f"{mb:.1f} MB"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs, path):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(1, 2, figsize=(11, 4))
  for i, (name, by_seed) in enumerate(runs.items()):
    color = f"C{i}"
    for j, (seed, r) in enumerate(sorted(by_seed.items())):
      loss = np.asarray(r["train_loss"])
      k = 10
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      style = dict(color=color, linestyle="-" if j == 0 else "--")
      ax[0].plot(np.arange(len(smooth)) + k, smooth, label=f"{name} s{seed}", **style)
      s, v = zip(*r["val"])
      ax[1].plot(s, np.exp(v), marker="o", label=f"{name} s{seed} ({r['final_val_ppl']:.1f})",
                 **style)
  ax[0].set(xlabel="step", ylabel="train loss (10-step mean)", title="training loss")
  ax[1].set(xlabel="step", ylabel="validation perplexity", yscale="log",
            title="validation perplexity")
  for a in ax:
    a.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", choices=sorted(SIZES), default="medium")
  ap.add_argument("--steps", type=int, help="default: the size's")
  ap.add_argument("--batch-size", type=int, help="default: the size's")
  ap.add_argument("--eval-every", type=int, help="default: the size's")
  ap.add_argument("--runs", help="comma-separated run names; default: the size's")
  ap.add_argument("--seeds", help="comma-separated seeds; default: the size's")
  ap.add_argument("--out", help="default: experiments/results/galore_pretrain[_SIZE].json")
  ap.add_argument("--table", action="store_true",
                  help="only print the results file's markdown table (no training)")
  args = ap.parse_args()
  size = SIZES[args.size]
  if args.table:
    print(table(json.loads(pathlib.Path(args.out or RESULTS / size.out).read_text())))
    return
  steps = args.steps or size.steps
  batch_size = args.batch_size or size.batch_size
  eval_every = args.eval_every or size.eval_every
  seeds = [int(x) for x in (args.seeds or size.seeds).split(",")]
  names = (args.runs or size.runs).split(",")
  model = size.model
  train, val, coverage = data(size)
  txs = optimizers(size, steps, jax.eval_shape(lambda: llama.init(model, jax.random.key(0))))
  unknown = sorted(set(names) - set(txs))
  if unknown:
    raise SystemExit(f"--runs: unknown {unknown}; choose from {sorted(txs)}")
  out = pathlib.Path(args.out or RESULTS / size.out)
  settings = {
      "model": {"dim": model.dim, "layers": model.num_layers, "ffn": model.ffn_dim,
                "heads": model.num_heads, "vocab": model.vocab_size,
                "params": model.num_params},
      "tokens_per_run": steps * batch_size * SEQ, "steps": steps, "batch_size": batch_size,
      "seq_len": SEQ, "vocab_coverage_of_train_tokens": coverage,
      "galore": {"lr": GALORE_LR, "rank": size.rank, "update_proj_gap": GAP, "scale": SCALE},
      "validation_rows": len(val["tokens"]),
  }
  # Runs recorded under the same settings are kept and skipped: rerunning resumes a sweep.
  runs = {}
  if out.exists():
    previous = json.loads(out.read_text())
    if all(previous.get(k) == v for k, v in settings.items() if k != "vocab_coverage_of_train_tokens"):
      runs = previous["runs"]
  for seed in seeds:
    for name in names:
      if str(seed) in runs.get(name, {}):
        print(f"{name} seed {seed}: recorded, skipped", flush=True)
        continue
      result = run(name, model, txs[name], train, val, steps=steps, batch_size=batch_size,
                   eval_every=eval_every, seed=seed)
      runs.setdefault(name, {})[str(seed)] = result
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps(dict(settings, runs=runs, summary=summary(runs)), indent=1))
  plot(runs, out.with_suffix(".png"))
  print(json.dumps({"val_ppl": summary(runs), "tokens_per_run": settings["tokens_per_run"],
                    "params": model.num_params}))


if __name__ == "__main__":
  main()
