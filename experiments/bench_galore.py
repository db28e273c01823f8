"""Optimizer memory of the GaLore family at the GaLore paper's LLaMA shapes (nothing trained).

  .venv/bin/python experiments/bench_galore.py [--shapes galore-60m,galore-1b] [--no-compile]

For each of the paper's 60M/130M/350M/1B shapes (untied, 32k vocab; ranks 128/256/256/512)
and each optimizer (optax.adamw, zojax galore_adamw, galore8bit, natural_galore (s = 20),
adam8bit, optax.contrib.galore):
  * optimizer-state bytes from `jax.eval_shape(tx.init, ...)`;
  * the paper's accounting for comparison: per projected m x n kernel (m <= n) weights mn,
    projector mr, moments 2nr; its claim is 65.5% less optimizer memory than Adam at 1B
    rank 512 (8-bit GaLore: 82.5% less than 8-bit Adam... we report both ratios);
  * with compilation, the jitted optimizer update (gradient in, updates + state out, state
    donated) lowered and compiled for the CPU, and `compiled.memory_analysis()` read: the
    step's argument / output / temporary bytes. Not executed.
Writes experiments/results/bench_galore.json and prints a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

from zojax import optim
from zojax.models import llama
from zojax.optim.masks import decay_mask
from zojax.train import memory

RESULTS = pathlib.Path(__file__).parent / "results"
RANKS = {"galore-60m": 128, "galore-130m": 256, "galore-350m": 256, "galore-1b": 512}


def optimizers(rank: int) -> dict:
  g = dict(rank=rank, update_proj_gap=200, scale=0.25)
  return {
      "adamw": optax.adamw(1e-3, mask=decay_mask),
      "adam8bit": optim.adam8bit(1e-3),
      "galore_adamw": optim.galore_adamw(1e-2, **g),
      "galore8bit": optim.galore8bit(1e-2, **g),
      "natural_galore": optim.natural_galore(1e-2, history=20, **g),
      "optax_contrib_galore": optax.contrib.galore(1e-2, rank=rank, update_proj_gap=200,
                                                   scale=0.25),
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default=",".join(RANKS))
  ap.add_argument("--no-compile", action="store_true")
  args = ap.parse_args()
  out = {}
  for shape in args.shapes.split(","):
    rank = RANKS[shape]
    params = llama.param_shapes(llama.get_config(shape))
    row = {"params": llama.get_config(shape).num_params, "rank": rank,
           "paper_formula": paper_formula(params, rank), "optimizers": {}}
    for name, tx in optimizers(rank).items():
      state = jax.eval_shape(tx.init, params)
      entry = {"state_bytes": nbytes(state)}
      if not args.no_compile:
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
    out[shape] = row
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "bench_galore.json").write_text(json.dumps(out, indent=1))
  print(json.dumps({s: {"state_vs_adamw_pct": r["state_vs_adamw_pct"],
                        "paper_formula_reduction_pct": r["paper_formula"]["reduction_pct"]}
                    for s, r in out.items()}))


if __name__ == "__main__":
  main()
