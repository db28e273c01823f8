"""What do the kernels buy: attention memory against sequence length, and GPU time.

  python experiments/bench_kernels.py [--seq_lens 1024,2048,4096,8192,16384] [--reps 20]

  * memory (any backend, compile only, never run): `peak_bytes` of the compiled forward
    and forward + backward (`compiled.memory_analysis()`, see `zojax.train.memory`) of
    causal attention, B=1, 8 heads, head_dim 64, float32, for the naive "xla" reference
    and the "blockwise" scan, at each sequence length. Naive should grow ~N² (it holds the
    [H, N, N] scores), blockwise ~N. `growth_exponent` is the log-log slope between
    4k and 16k.
  * GPU time (only when JAX's default backend is a GPU): forward + backward of causal
    attention, bf16, head_dim 128, 16 heads, seq 2k and 8k (16k tokens per batch), for the
    zojax Pallas kernel against `jax.nn.dot_product_attention` with
    implementation="cudnn" and "xla" (target: Pallas >= 1.0x cuDNN, i.e. no slower); and
    the GaLore projection kernel against plain `jnp` matmuls at 4096x4096, rank 128/512.
    Times are medians of `--reps` calls after a warm-up, all in one process.

Writes experiments/results/bench_kernels.{json,png} and prints a final one-line JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from zojax.kernels import attention as attn  # noqa: E402
from zojax.kernels import projection as proj  # noqa: E402
from zojax.train import memory  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MEMORY_IMPLEMENTATIONS = ("xla", "blockwise")


# ---------------------------------------------------------------------------------------
# Memory (CPU-checkable)


def attention_fns(implementation: str, causal: bool = True, **kwargs):
  """(forward, forward + backward) of attention; the backward returns (dq, dk, dv)."""
  def forward(q, k, v):
    return attn.attention(q, k, v, causal=causal, implementation=implementation, **kwargs)

  def forward_backward(q, k, v, do):
    out, vjp = jax.vjp(forward, q, k, v)
    return out, vjp(do)

  return forward, forward_backward


def attention_shapes(seq_len, *, batch=1, heads=8, kv_heads=8, head_dim=64,
                     dtype=jnp.float32):
  """ShapeDtypeStructs of q, k, v and the output cotangent."""
  q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype)
  return q, kv, kv, q


def attention_memory(seq_len: int, implementation: str, block_sizes=None,
                     **shape_kwargs) -> dict:
  """Peak bytes of the compiled forward and forward + backward, from memory_analysis."""
  q, k, v, do = attention_shapes(seq_len, **shape_kwargs)
  forward, forward_backward = attention_fns(implementation, block_sizes=block_sizes)
  fwd = jax.jit(forward).lower(q, k, v).compile()
  both = jax.jit(forward_backward).lower(q, k, v, do).compile()
  return {"forward": memory.step_memory(fwd), "forward_backward": memory.step_memory(both)}


def growth_exponent(peak_small: int, peak_large: int, n_small: int, n_large: int) -> float:
  """Log-log slope: 1 for linear growth in N, 2 for quadratic."""
  return math.log(peak_large / peak_small) / math.log(n_large / n_small)


def memory_table(seq_lens, implementations=MEMORY_IMPLEMENTATIONS, block_sizes=None,
                 **shape_kwargs) -> dict:
  table = {impl: {} for impl in implementations}
  for impl in implementations:
    for n in seq_lens:
      table[impl][n] = attention_memory(n, impl, block_sizes, **shape_kwargs)
  return table


def memory_summary(table: dict, n_small: int, n_large: int) -> dict:
  out = {}
  for impl, rows in table.items():
    for phase in ("forward", "forward_backward"):
      small, large = rows[n_small][phase]["peak_bytes"], rows[n_large][phase]["peak_bytes"]
      out[f"{impl}_{phase}_peak_bytes"] = {str(n_small): small, str(n_large): large}
      out[f"{impl}_{phase}_growth_exponent"] = growth_exponent(small, large, n_small, n_large)
  for phase in ("forward", "forward_backward"):
    naive = table["xla"][n_large][phase]["peak_bytes"]
    out[f"naive_over_blockwise_{phase}_at_{n_large}"] = (
        naive / table["blockwise"][n_large][phase]["peak_bytes"])
  return out


# ---------------------------------------------------------------------------------------
# GPU time


def median_seconds(fn, *args, reps: int = 20) -> float:
  """Median wall time of a jitted call, after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _sdpa_forward_backward(implementation):
  def forward(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

  def forward_backward(q, k, v, do):
    out, vjp = jax.vjp(forward, q, k, v)
    return out, vjp(do)

  return forward_backward


def time_attention(seq_len: int, *, tokens: int = 16384, heads: int = 16, head_dim: int = 128,
                   reps: int = 20) -> dict:
  """Forward + backward seconds: zojax Pallas vs jax.nn.dot_product_attention (cudnn, xla)."""
  batch = max(1, tokens // seq_len)
  shapes = attention_shapes(seq_len, batch=batch, heads=heads, kv_heads=heads,
                            head_dim=head_dim, dtype=jnp.bfloat16)
  keys = jax.random.split(jax.random.key(seq_len), 4)
  args = [jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype)
          for key, s in zip(keys, shapes)]
  fns = {"zojax_pallas": attention_fns("pallas")[1],
         "zojax_blockwise": attention_fns("blockwise")[1],
         "cudnn": _sdpa_forward_backward("cudnn"),
         "xla": _sdpa_forward_backward("xla")}
  row = {"batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim}
  for name, fn in fns.items():
    try:
      row[f"{name}_seconds"] = median_seconds(jax.jit(fn), *args, reps=reps)
    except Exception as e:  # noqa: BLE001 - record the failure, keep measuring the rest
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  if "zojax_pallas_seconds" in row:
    for ref in ("cudnn", "xla"):
      if f"{ref}_seconds" in row:
        row[f"pallas_speedup_vs_{ref}"] = row[f"{ref}_seconds"] / row["zojax_pallas_seconds"]
  return row


def time_projection(rank: int, *, m: int = 4096, n: int = 4096, reps: int = 20) -> dict:
  """GaLore project / project_back(+add) via the Pallas kernel vs plain jnp matmuls."""
  kg, kp, kn = jax.random.split(jax.random.key(rank), 3)
  g = jax.random.normal(kg, (m, n), jnp.float32)
  p = jax.random.normal(kp, (m, rank), jnp.float32)
  low = jax.random.normal(kn, (rank, n), jnp.float32)
  kw = dict(implementation="pallas", interpret=False)
  cases = {
      "project": (jax.jit(functools.partial(proj.project, side="left", **kw)),
                  jax.jit(lambda g, p: jnp.dot(p.T, g)), (g, p)),
      "project_back_add": (
          jax.jit(lambda low, p, a: proj.project_back(low, p, "left", 0.25, add_to=a, **kw)),
          jax.jit(lambda low, p, a: 0.25 * jnp.dot(p, low) + a), (low, p, g)),
  }
  row = {"m": m, "n": n, "rank": rank}
  for name, (kernel, plain, args) in cases.items():
    try:
      row[f"{name}_pallas_seconds"] = median_seconds(kernel, *args, reps=reps)
      row[f"{name}_jnp_seconds"] = median_seconds(plain, *args, reps=reps)
      row[f"{name}_speedup_vs_jnp"] = (row[f"{name}_jnp_seconds"]
                                       / row[f"{name}_pallas_seconds"])
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return row


# ---------------------------------------------------------------------------------------


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, phase in zip(axes, ("forward", "forward_backward")):
    for impl, style in (("xla", "o-"), ("blockwise", "s-")):
      rows = results["memory"][impl]
      ns = sorted(int(n) for n in rows)
      ax.loglog(ns, [rows[str(n)][phase]["peak_bytes"] / 2**20 for n in ns], style,
                label="naive (xla)" if impl == "xla" else "blockwise", base=2)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("peak MiB (memory_analysis)")
    ax.set_title(f"causal attention, {phase.replace('_', ' + ')}")
    ax.grid(True, which="both", lw=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_lens", default="1024,2048,4096,8192,16384")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--out", default=str(RESULTS / "bench_kernels.json"))
  args = parser.parse_args()
  seq_lens = [int(n) for n in args.seq_lens.split(",")]
  n_small, n_large = (4096, 16384) if {4096, 16384} <= set(seq_lens) else (
      seq_lens[0], seq_lens[-1])

  device = jax.devices()[0]
  table = memory_table(seq_lens)
  results = {
      "device": str(device), "device_kind": device.device_kind,
      "backend": jax.default_backend(), "jax_version": jax.__version__,
      "memory_setup": {"batch": 1, "heads": 8, "kv_heads": 8, "head_dim": 64,
                       "dtype": "float32", "causal": True,
                       "blockwise_block_k": attn.BlockSizes().blockwise_block_k},
      "memory": {impl: {str(n): rows[n] for n in rows} for impl, rows in table.items()},
  }
  summary = memory_summary(table, n_small, n_large)
  if jax.default_backend() == "gpu":
    results["gpu_attention"] = [time_attention(n, reps=args.reps) for n in (2048, 8192)]
    results["gpu_projection"] = [time_projection(r, reps=args.reps) for r in (128, 512)]
    summary["gpu_measured"] = True
    for row in results["gpu_attention"]:
      for ref in ("cudnn", "xla"):
        key = f"pallas_speedup_vs_{ref}"
        summary[f"{key}_seq{row['seq_len']}"] = row.get(key)
    for row in results["gpu_projection"]:
      for name in ("project", "project_back_add"):
        summary[f"{name}_speedup_vs_jnp_rank{row['rank']}"] = row.get(
            f"{name}_speedup_vs_jnp")
  else:
    summary["gpu_measured"] = False
    summary["gpu_note"] = (f"no GPU (backend={jax.default_backend()}): GPU timings not "
                           "measured")
  results["summary"] = dict(summary, device=results["device"], jax_version=jax.__version__)
  save(results, pathlib.Path(args.out))
  print(json.dumps(results["summary"]))


def save(results: dict, json_path: pathlib.Path) -> None:
  """The results JSON and, beside it, the memory plot (same name, .png)."""
  json_path.parent.mkdir(parents=True, exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
  plot(results, json_path.with_suffix(".png"))


if __name__ == "__main__":
  main()
