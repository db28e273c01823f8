"""Which attention path should `model.attention = auto` take off a GPU: naive or blockwise?

  python experiments/attention_auto.py [--reps 7]

Causal fp32 attention (`zojax.kernels.attention`, "xla" = naive einsum-softmax-einsum,
"blockwise" = the O(N) scan) at the shapes the CPU configs run: the tiny LLaMA (4 query /
2 kv heads of 16, batch 8 x 64) and SmolLM2-135M's heads (9 / 3 of 64) at 64, 256, 1024 and
4096 tokens. Forward and forward + backward, compiled once, then alternating for `--reps`
repetitions (median milliseconds), and each executable's peak bytes
(`compiled.memory_analysis()`). `zojax.kernels.attention.BLOCKWISE_FROM` (1024) is set from this.

Writes experiments/results/attention_auto.{json,png} and prints a final one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from zojax.kernels import attention as attn  # noqa: E402
from zojax.train import memory  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# name: (batch, tokens, query heads, kv heads, head dim)
CASES = {"tiny T64": (8, 64, 4, 2, 16), "smollm2 T64": (16, 64, 9, 3, 64),
         "smollm2 T256": (8, 256, 9, 3, 64), "smollm2 T1024": (2, 1024, 9, 3, 64),
         "smollm2 T4096": (1, 4096, 9, 3, 64)}
IMPLEMENTATIONS = ("xla", "blockwise")


def compiled_pair(implementation, q, k, v, do):
  """(forward, forward + backward), compiled."""
  def forward(q, k, v):
    return attn.attention(q, k, v, causal=True, implementation=implementation)

  def forward_backward(q, k, v, do):
    out, vjp = jax.vjp(forward, q, k, v)
    return out, vjp(do)
  return (jax.jit(forward).lower(q, k, v).compile(),
          jax.jit(forward_backward).lower(q, k, v, do).compile())


def measure(batch, tokens, heads, kv_heads, head_dim, reps) -> dict:
  keys = jax.random.split(jax.random.key(tokens), 4)
  q, do = (jax.random.normal(key, (batch, tokens, heads, head_dim)) for key in keys[:2])
  k, v = (jax.random.normal(key, (batch, tokens, kv_heads, head_dim)) for key in keys[2:])
  fns = {impl: compiled_pair(impl, q, k, v, do) for impl in IMPLEMENTATIONS}
  row, times = {}, {impl: ([], []) for impl in fns}
  for impl, (fwd, both) in fns.items():
    jax.block_until_ready((fwd(q, k, v), both(q, k, v, do)))  # warm up
    row[f"{impl}_forward_peak_bytes"] = memory.step_memory(fwd)["peak_bytes"]
    row[f"{impl}_forward_backward_peak_bytes"] = memory.step_memory(both)["peak_bytes"]
  for r in range(reps):
    for impl in (IMPLEMENTATIONS if r % 2 else IMPLEMENTATIONS[::-1]):
      fwd, both = fns[impl]
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(q, k, v))
      t1 = time.perf_counter()
      jax.block_until_ready(both(q, k, v, do))
      times[impl][0].append(t1 - t0)
      times[impl][1].append(time.perf_counter() - t1)
  for impl, (fwd_s, both_s) in times.items():
    row[f"{impl}_forward_ms"] = 1e3 * statistics.median(fwd_s)
    row[f"{impl}_forward_backward_ms"] = 1e3 * statistics.median(both_s)
  for phase in ("forward", "forward_backward"):
    row[f"blockwise_over_xla_{phase}_time"] = (row[f"blockwise_{phase}_ms"]
                                               / row[f"xla_{phase}_ms"])
  return row


def plot(table: dict, path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  names = list(table)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for phase, style in (("forward", "o-"), ("forward_backward", "s-")):
    ax.plot(names, [table[n][f"blockwise_over_xla_{phase}_time"] for n in names], style,
            label=phase.replace("_", " + "))
  ax.axhline(1.0, c="k", lw=0.8)
  ax.set_ylabel("blockwise time / naive time")
  ax.set_title(f"causal attention on {jax.devices()[0].device_kind} (below 1: blockwise faster)")
  ax.tick_params(axis="x", labelsize=8)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--out", default=str(RESULTS / "attention_auto.json"))
  args = parser.parse_args()
  table = {}
  for name, shape in CASES.items():
    table[name] = measure(*shape, reps=args.reps if shape[1] < 4096 else 3)
    print(name, {k: round(v, 3) for k, v in table[name].items() if k.endswith(("ms", "time"))},
          flush=True)
  summary = {name: {phase: round(row[f"blockwise_over_xla_{phase}_time"], 3)
                    for phase in ("forward", "forward_backward")} for name, row in table.items()}
  results = {"device": str(jax.devices()[0]), "jax_version": jax.__version__,
             "cases": {n: dict(zip(("batch", "tokens", "heads", "kv_heads", "head_dim"), s))
                       for n, s in CASES.items()},
             "table": table,
             "summary": {"blockwise_over_xla_time": summary}}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  plot(table, out.with_suffix(".png"))
  print(json.dumps(results["summary"]))


if __name__ == "__main__":
  main()
