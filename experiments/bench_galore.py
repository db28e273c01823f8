"""Optimizer memory and step time of the GaLore family at the GaLore paper's LLaMA shapes.

  .venv/bin/python experiments/bench_galore.py [--shapes galore-60m,galore-1b] [--no-compile]
      [--time-shape galore-60m] [--reps 7] [--torch /tmp/torchenv/bin/python] [--quick]

Memory, for each of the paper's 60M/130M/350M/1B shapes (untied, 32k vocab; ranks
128/256/256/512) and each optimizer (optax.adamw, zojax galore_adamw (exact and randomized
projector), galore8bit, natural_galore (s = 20), adam8bit, optax.contrib.galore):
  * optimizer-state bytes from `jax.eval_shape(tx.init, ...)`;
  * the paper's accounting for comparison: per projected m x n kernel (m <= n) weights mn,
    projector mr, moments 2nr; its claim is 65.5% less optimizer memory than Adam at 1B
    rank 512 (8-bit GaLore: 82.5% less than 8-bit Adam... we report both ratios);
  * with compilation, the jitted optimizer update (gradient in, updates + state out, state
    donated) lowered and compiled for the CPU, and `compiled.memory_analysis()` read: the
    step's argument / output / temporary bytes. Not executed.

Step time, on one shape (`--time-shape`, default galore-60m: 58M parameters, rank 128):
the jitted full update (gradient in, params and state donated, updates applied) of every
optimizer above, timed side by side in this process with interleaved repetitions (median of
`--reps`). A refresh step (new projectors) and an ordinary one are timed separately, as the
same optimizer built with update_proj_gap 1 and with a gap never reached, and amortized
over T = `--proj-gap`: ((T - 1) * ordinary + refresh) / T. Ratios are to optax.adamw.
`--torch PYTHON` also times galore-torch's GaLoreAdamW (and torch.optim.AdamW) on the same
shapes (per-layer [out, in] tensors) in a subprocess run by that interpreter, right after.
Gradients are fixed random arrays (no model runs): this is the optimizer's time alone.
`--train-batch BxS` (default 4x256) times the same way whole training steps (forward and
backward on random tokens, then the update) for AdamW and `--train-optimizers`: GaLore's
extra work is a fixed cost per step, so its share depends on how much compute the model
does per step, and this is the ratio a training run sees.
The script sets OPENBLAS_NUM_THREADS=1 unless it is set: XLA:CPU's SVD and QR call the
LAPACK that scipy bundles (OpenBLAS), whose threads spin against each other on a small,
shared CPU (a 512 x 1376 SVD took 16 s with its default threads on the 2-core machine of
BENCHMARKS.md under load, 0.2 s with one). The value used is recorded.

Writes experiments/results/bench_galore.json (updating the entries it measured) and prints a
one-line JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import time

# Before jax (and so scipy's OpenBLAS) loads; see the docstring.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from zojax import optim  # noqa: E402
from zojax.models import llama  # noqa: E402
from zojax.optim.masks import decay_mask  # noqa: E402
from zojax.train import memory  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
RANKS = {"tiny": 8, "galore-60m": 128, "galore-130m": 256, "galore-350m": 256, "galore-1b": 512}
NEVER = 2 ** 30  # an update_proj_gap no timed run reaches: only ordinary steps


def optimizers(rank: int, update_proj_gap: int = 200) -> dict:
  g = dict(rank=rank, update_proj_gap=update_proj_gap, scale=0.25)
  settings = optim.GaLoreSettings(rank=rank, update_proj_gap=update_proj_gap, history=20)
  ours = dict(scale=0.25, settings=settings)
  randomized = dict(ours, settings=dataclasses.replace(settings, projector="randomized"))
  return {
      "adamw": optax.adamw(1e-3, mask=decay_mask),
      "adam8bit": optim.adam8bit(1e-3),
      "galore_adamw": optim.galore_adamw(1e-2, **ours),
      "galore_adamw_randomized": optim.galore_adamw(1e-2, **randomized),
      "galore8bit": optim.galore8bit(1e-2, **ours),
      "natural_galore": optim.natural_galore(1e-2, **ours),
      "optax_contrib_galore": optax.contrib.galore(1e-2, **g),
  }


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def paper_formula(params, rank: int) -> dict:
  """The paper's per-kernel count (fp32 entries): Adam 2mn, GaLore mr + 2nr (m <= n)."""
  adam = galore = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    size = math.prod(x.shape)
    projected = "blocks" in name and "norm" not in name
    adam += 2 * size
    if projected:
      layers, a, b = x.shape
      m, n = min(a, b), max(a, b)
      galore += layers * (m * rank + 2 * n * rank)
    else:
      galore += 2 * size
  return {"adam_entries": adam, "galore_entries": galore,
          "reduction_pct": round(100 * (1 - galore / adam), 1)}


def memory_row(shape: str, compile_step: bool = True) -> dict:
  rank = RANKS[shape]
  params = llama.param_shapes(llama.get_config(shape))
  row = {"params": llama.get_config(shape).num_params, "rank": rank,
         "paper_formula": paper_formula(params, rank), "optimizers": {}}
  for name, tx in optimizers(rank).items():
    state = jax.eval_shape(tx.init, params)
    entry = {"state_bytes": nbytes(state)}
    if compile_step:
      t0 = time.perf_counter()
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p), donate_argnums=1)
      compiled = step.lower(params, state, params).compile()
      entry["update_step_memory"] = memory.step_memory(compiled)
      entry["compile_s"] = round(time.perf_counter() - t0, 1)
    row["optimizers"][name] = entry
    print(shape, name, entry, flush=True)
  adam = row["optimizers"]["adamw"]["state_bytes"]
  row["state_vs_adamw_pct"] = {k: round(100 * v["state_bytes"] / adam, 1)
                               for k, v in row["optimizers"].items()}
  return row


# ---------------------------------------------------------------------------------------
# Step time


def _random_like(shapes, seed: int, std: float):
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([std * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _full_step(tx, model_cfg=None):
  """Updates applied, params and state donated (as a training step does). Without
  `model_cfg` the step takes a fixed gradient (the optimizer alone); with it, a token batch,
  and the gradient comes from the model's forward and backward (the whole training step)."""
  def step(params, state, x):
    grads = x if model_cfg is None else jax.grad(
        lambda p: llama.loss_fn(model_cfg, p, x)[0])(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def _token_batch(vocab: int, batch: int, seq: int) -> dict:
  tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, vocab, jnp.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def amortized(ordinary: float, refresh: float, gap: int) -> float:
  """Mean step time when one step in `gap` refreshes the projectors."""
  return ((gap - 1) * ordinary + refresh) / gap


def time_steps(shape: str, reps: int, gap: int, names=None, batch=None) -> dict:
  """Median seconds per full update, ordinary and refresh steps, interleaved across optimizers
  (`names`: a subset of `optimizers`; adamw is always timed, as the base). With `batch`
  (batch size, sequence length) each step is a whole training step on random tokens."""
  rank = RANKS[shape]
  model_cfg = llama.get_config(shape)
  shapes = llama.param_shapes(model_cfg)
  if batch is None:
    grads, model = _random_like(shapes, 1, 1e-3), None
  else:
    grads, model = _token_batch(model_cfg.vocab_size, *batch), model_cfg
  runs = {}
  for name, tx in optimizers(rank, NEVER).items():
    if names is not None and name != "adamw" and name not in names:
      continue
    kinds = {"ordinary": _full_step(tx, model)}
    if name not in ("adamw", "adam8bit"):  # they have no refresh
      kinds["refresh"] = _full_step(optimizers(rank, 1)[name], model)
    params = _random_like(shapes, 0, 0.02)
    state = jax.jit(tx.init)(params)
    t0 = time.perf_counter()
    for fn in kinds.values():  # compile; the first step (count 0) refreshes in every variant
      params, state = jax.block_until_ready(fn(params, state, grads))
    print(f"time {shape} {name}: compiled and warmed in {time.perf_counter() - t0:.1f}s",
          flush=True)
    runs[name] = [kinds, params, state]
  times = {name: {k: [] for k in run[0]} for name, run in runs.items()}
  for rep in range(reps):
    for name, run in runs.items():
      for kind, fn in run[0].items():
        t0 = time.perf_counter()
        run[1], run[2] = jax.block_until_ready(fn(run[1], run[2], grads))
        times[name][kind].append(time.perf_counter() - t0)
    print(f"time {shape} rep {rep}: " + ", ".join(
        f"{n} {t['ordinary'][-1]:.3f}" + (f"/{t['refresh'][-1]:.3f}" if "refresh" in t else "")
        for n, t in times.items()), flush=True)
  del runs
  out = {}
  for name, t in times.items():
    ordinary = statistics.median(t["ordinary"])
    refresh = statistics.median(t["refresh"]) if "refresh" in t else ordinary
    out[name] = {"ordinary_s": ordinary, "refresh_s": refresh,
                 "amortized_s": amortized(ordinary, refresh, gap),
                 "samples_s": {k: [round(x, 4) for x in v] for k, v in t.items()}}
  base = out["adamw"]["ordinary_s"]
  for row in out.values():
    row["ordinary_over_adamw"] = round(row["ordinary_s"] / base, 3)
    row["amortized_over_adamw"] = round(row["amortized_s"] / base, 3)
  return {"shape": shape, "params": model_cfg.num_params, "rank": rank,
          "what": "optimizer update" if batch is None else
                  f"training step (forward + backward + update), batch {batch[0]} x {batch[1]}",
          "update_proj_gap": gap, "reps": reps, "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(),
          "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "optimizers": out}


# Run by the --torch interpreter (torch and galore-torch are not zojax dependencies).
# argv: JSON {"params": [[name, shape, projected], ...], "rank", "gap", "reps"}; prints JSON.
_TORCH_WORKER = r"""
import json, pathlib, statistics, sys, time
sys.path.insert(0, sys.argv[2])
import galore_torch_reference
galore_torch_reference._stub_missing()
import torch
from galore_torch import GaLoreAdamW
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
proj, full = [], []
for name, shape, projected in cfg["params"]:
  if projected:  # zojax's stacked [L, in, out] kernel: L torch [out, in] matrices
    proj += [torch.nn.Parameter(0.02 * torch.randn(shape[2], shape[1])) for _ in range(shape[0])]
  else:
    full.append(torch.nn.Parameter(0.02 * torch.randn(*shape)))
params = proj + full
grads = [1e-3 * torch.randn_like(p) for p in params]
adamw = torch.optim.AdamW(params, lr=1e-3)
galore = GaLoreAdamW([{"params": full}, {"params": proj, "rank": cfg["rank"],
                      "update_proj_gap": 1, "scale": 0.25, "proj_type": "std"}], lr=1e-2)

def step(opt, gap=None):
  for p, g in zip(params, grads):
    p.grad = g
  if gap is not None:
    for st in opt.state.values():
      if "projector" in st:
        st["projector"].update_proj_gap = gap
  t0 = time.perf_counter()
  opt.step()
  return time.perf_counter() - t0

step(adamw), step(galore, 1)  # warm: state allocated, first projectors
kinds = {"adamw": (adamw, None), "galore_ordinary": (galore, 2 ** 30),
         "galore_refresh": (galore, 1)}
times = {k: [] for k in kinds}
for _ in range(cfg["reps"]):
  for k, (opt, gap) in kinds.items():
    times[k].append(step(opt, gap))
med = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "median_s": med, "samples_s": times}))
"""


def time_torch(python: str, shape: str, reps: int) -> dict | None:
  """galore-torch's GaLoreAdamW and torch AdamW on `shape`, or None (logged) without torch."""
  if not pathlib.Path(python).exists():
    print(f"--torch {python}: no such interpreter; galore-torch not timed", flush=True)
    return None
  shapes = llama.param_shapes(llama.get_config(shape))
  names = optim.galore_plan(shapes, optim.GaLoreSettings(rank=RANKS[shape]))
  spec = [[name, list(x.shape), not names[name].startswith("full rank")]
          for name, x in zip(names, jax.tree.leaves(shapes))]
  cfg = json.dumps({"params": spec, "rank": RANKS[shape], "reps": reps})
  proc = subprocess.run([python, "-c", _TORCH_WORKER, cfg, str(pathlib.Path(__file__).parent)],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    print(f"--torch {python}: galore-torch not timed; the worker failed:\n"
          f"{proc.stderr[-2000:]}", flush=True)
    return None
  return json.loads(proc.stdout.strip().splitlines()[-1])


def train_step_summary(timing: dict) -> dict:
  opts = timing["optimizers"]
  out = {"galore_train_step_over_adamw": opts["galore_adamw"]["amortized_over_adamw"],
         "train_step_amortized_over_adamw": {k: v["amortized_over_adamw"]
                                             for k, v in opts.items()}}
  if "optax_contrib_galore" in opts:
    out["galore_train_step_over_optax_contrib_galore"] = round(
        opts["galore_adamw"]["amortized_s"] / opts["optax_contrib_galore"]["amortized_s"], 3)
  return out


def step_time_summary(timing: dict, torch_run: dict | None) -> dict:
  opts = timing["optimizers"]
  gap = timing["update_proj_gap"]
  out = {"time_shape": timing["shape"],
         "galore_step_over_adamw": opts["galore_adamw"]["amortized_over_adamw"],
         "amortized_over_adamw": {k: v["amortized_over_adamw"] for k, v in opts.items()},
         "ordinary_over_adamw": {k: v["ordinary_over_adamw"] for k, v in opts.items()}}
  if "optax_contrib_galore" in opts:
    out["galore_step_over_optax_contrib_galore"] = round(
        opts["galore_adamw"]["amortized_s"] / opts["optax_contrib_galore"]["amortized_s"], 3)
  if torch_run:
    med = torch_run["median_s"]
    torch_galore = amortized(med["galore_ordinary"], med["galore_refresh"], gap)
    out["galore_torch_step_over_torch_adamw"] = round(torch_galore / med["adamw"], 3)
    out["galore_step_over_galore_torch"] = round(opts["galore_adamw"]["amortized_s"] /
                                                 torch_galore, 3)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="galore-60m,galore-130m,galore-350m,galore-1b",
                  help="memory rows; '' for none")
  ap.add_argument("--no-compile", action="store_true")
  ap.add_argument("--time-shape", default="galore-60m", help="step-time shape; '' for none")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--proj-gap", type=int, default=200)
  ap.add_argument("--torch", default=None, help="python with torch + galore-torch")
  ap.add_argument("--optimizers", default=None, help="comma-separated subset to time")
  ap.add_argument("--train-batch", default="4x256",
                  help="BATCHxSEQ: also time whole training steps on --time-shape; '' for none")
  ap.add_argument("--train-optimizers",
                  default="galore_adamw,galore_adamw_randomized,optax_contrib_galore",
                  help="comma-separated subset for the training-step timing")
  ap.add_argument("--quick", action="store_true",
                  help="tiny shape, no compiled memory, 1 rep of adamw and galore_adamw")
  ap.add_argument("--out", default=str(RESULTS / "bench_galore.json"))
  args = ap.parse_args()
  if args.quick:
    args.shapes, args.time_shape, args.reps, args.no_compile = "tiny", "tiny", 1, True
    args.train_batch, args.train_optimizers = "2x16", "galore_adamw"
    args.optimizers = args.optimizers or "galore_adamw"
  out_path = pathlib.Path(args.out)
  # Update only what this run measures, so a timing-only run keeps the memory rows.
  out = json.loads(out_path.read_text()) if out_path.exists() else {}
  for shape in filter(None, args.shapes.split(",")):
    out[shape] = memory_row(shape, not args.no_compile)
  summary = {s: {"state_vs_adamw_pct": r["state_vs_adamw_pct"],
                 "paper_formula_reduction_pct": r["paper_formula"]["reduction_pct"]}
             for s, r in out.items() if s in RANKS}
  if args.time_shape:
    names = args.optimizers.split(",") if args.optimizers else None
    timing = time_steps(args.time_shape, args.reps, args.proj_gap, names)
    torch_run = time_torch(args.torch, args.time_shape, args.reps) if args.torch else None
    if torch_run:
      timing["galore_torch"] = torch_run
    out["step_time"] = timing
    summary.update(step_time_summary(timing, torch_run))
  if args.time_shape and args.train_batch:
    batch = tuple(int(v) for v in args.train_batch.split("x"))
    train = time_steps(args.time_shape, args.reps, args.proj_gap,
                       args.train_optimizers.split(","), batch)
    out["train_step_time"] = train
    summary.update(train_step_summary(train))
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(out, indent=1))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
