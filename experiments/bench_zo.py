"""Does a ZO step cost what MeZO promises: about two forwards in time, one forward in memory?

  python experiments/bench_zo.py [--random] [--reps 7] [--skip_1b_adamw]

SmolLM2-135M (pretrained weights from its GGUF, or random ones of the same shape with
`--random`) on a classification batch (16 prompts of 64 tokens, 2 label words), all in one
process:
  * time: one ZO step (the jitted `zo.spsa` estimate on the `BlockModel` fast path, then the
    jitted `zo_sgd` update from `zo.make_apply`, params and state donated) against two
    inference forwards (the jitted `llama.loss_fn`, called twice), for each direction of z
    (Gaussian, Rademacher). Each is warmed up, then they take turns (the order rotating) for
    `--reps` repetitions; the summary is the median per-rep ratio per direction, with the
    seconds of the estimate, the update and one random-number pass over every parameter
    (where the time goes). Target: <= 1.15 (Rademacher).
  * memory: `peak_bytes` of each compiled executable (`compiled.memory_analysis()`, see
    `zojax.train.memory`): the ZO estimate against one forward (target <= 1.1), the update
    on its own, the larger of the two (the step, as it runs) and both fused in one jit; and
    a first-order AdamW step (`value_and_grad` + `optax.adamw`, state donated) against the
    ZO step; per direction.
  * memory only, for the GaLore paper's LLaMA-1B (`galore-1b`, 1.34B params, untied):
    the same executables lowered from `jax.ShapeDtypeStruct`s and compiled, never run.

Writes experiments/results/bench_zo.{json,png} and prints a final one-line JSON. Timing on
a shared CPU is noisy; only the in-process ratios are meaningful.
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
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from zojax import zo  # noqa: E402
from zojax.models import llama  # noqa: E402
from zojax.optim import zo_sgd  # noqa: E402
from zojax.train import memory  # noqa: E402
from zojax.zo import perturb  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DIRECTIONS = perturb.DIRECTIONS


class Steps(NamedTuple):
  """The jitted functions compared (all pure; `apply` and `adamw` donate their state)."""

  forward: Callable   # (params, batch) -> loss
  estimate: Callable  # (params, batch, key, step) -> (loss, ZOGrad)
  apply: Callable     # (params, opt_state, zograd) -> (params, opt_state)
  fused: Callable     # (params, opt_state, batch, key, step) -> (params, opt_state, loss)
  adamw: Callable     # (params, opt_state, batch) -> (params, opt_state, loss)
  zo_tx: optax.GradientTransformation
  adamw_tx: optax.GradientTransformation


def classification_batch(config: llama.LlamaConfig, batch_size: int = 16, seq_len: int = 64,
                         seed: int = 0) -> dict[str, jax.Array]:
  """A synthetic prompt-classification batch (the keys `zojax.data.sentiment` produces).

  Token values do not change the cost of a step, so random ids stand in for real prompts.

  Args:
    config: the model config (for the vocabulary size).
    batch_size: B.
    seq_len: T.
    seed: numpy seed.

  Returns:
    tokens int32 [B, T], last_index int32 [B] (in the last quarter of T), candidates int32
    [B, 2] (the same two label words in every row) and label int32 [B].
  """
  rng = np.random.default_rng(seed)
  words = rng.choice(config.vocab_size, size=2, replace=False).astype(np.int32)
  return {
      "tokens": jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, seq_len)), jnp.int32),
      "last_index": jnp.asarray(rng.integers(seq_len * 3 // 4, seq_len, batch_size), jnp.int32),
      "candidates": jnp.asarray(np.tile(words, (batch_size, 1))),
      "label": jnp.asarray(rng.integers(0, 2, batch_size), jnp.int32),
  }


def make_steps(config: llama.LlamaConfig, *, direction: str = "gaussian", eps: float = 1e-3,
               zo_learning_rate: float = 1e-6, adamw_learning_rate: float = 1e-5) -> Steps:
  """Builds the jitted forward, ZO estimate and update, fused ZO step and AdamW step.

  Args:
    config: the model config.
    direction: the distribution of z ("gaussian" or "rademacher").
    eps: the SPSA ε.
    zo_learning_rate: `zo_sgd`'s η.
    adamw_learning_rate: `optax.adamw`'s η.

  Returns:
    The `Steps`.
  """
  model = llama.make(config)
  zo_tx = zo_sgd(zo_learning_rate)
  adamw_tx = optax.adamw(adamw_learning_rate)

  def forward(params, batch):
    return llama.loss_fn(config, params, batch)[0]

  def estimate(params, batch, key, step):
    return zo.spsa(model, params, batch, key, step=step, eps=eps, direction=direction)

  def fused(params, opt_state, batch, key, step):
    loss, zograd = estimate(params, batch, key, step)
    updates, opt_state = zo_tx.update(zograd, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def adamw(params, opt_state, batch):
    loss, grads = jax.value_and_grad(forward)(params, batch)
    updates, opt_state = adamw_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return Steps(
      forward=jax.jit(forward),
      estimate=jax.jit(estimate),
      apply=zo.make_apply(zo_tx, donate=True),
      fused=jax.jit(fused, donate_argnums=(0, 1)),
      adamw=jax.jit(adamw, donate_argnums=(0, 1)),
      zo_tx=zo_tx,
      adamw_tx=adamw_tx)


def noise_sums(key, step, params_like, direction: str = "gaussian"):
  """Draws every leaf's z once (as a ZO forward or update does) and sums it: one RNG pass."""
  skey = perturb.sample_key(key, step, 0)
  return perturb.map_groups(
      lambda layer, like: jax.tree.map(
          jnp.sum, perturb.layer_noise(skey, layer, like, direction=direction)), params_like)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def compile_steps(steps: Steps, params, batch, *, adamw: bool = True, fused: bool = True,
                  forward: bool = True) -> tuple[dict[str, Any], dict[str, float]]:
  """Lowers and compiles every step from shapes only (`params`/`batch` may be abstract).

  Args:
    steps: from `make_steps`.
    params: the parameter tree, arrays or `jax.ShapeDtypeStruct`s.
    batch: a batch, arrays or `jax.ShapeDtypeStruct`s.
    adamw: compile the AdamW step.
    fused: compile the fused ZO step.
    forward: compile the forward (the same for every direction: compile it once).

  Returns:
    (compiled executables by name, compile seconds by name).
  """
  params, batch = _abstract(params), _abstract(batch)
  key = jax.ShapeDtypeStruct((4,), jnp.uint32)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  zo_state = jax.eval_shape(steps.zo_tx.init, params)
  zograd = jax.eval_shape(steps.estimate, params, batch, key, step)[1]
  todo = {
      "zo_estimate": lambda: steps.estimate.lower(params, batch, key, step),
      "zo_update": lambda: steps.apply.lower(params, zo_state, zograd),
  }
  if forward:
    todo = {"forward": lambda: steps.forward.lower(params, batch), **todo}
  if fused:
    todo["zo_fused"] = lambda: steps.fused.lower(params, zo_state, batch, key, step)
  if adamw:
    adamw_state = jax.eval_shape(steps.adamw_tx.init, params)
    todo["adamw"] = lambda: steps.adamw.lower(params, adamw_state, batch)
  compiled, seconds = {}, {}
  for name, lower in todo.items():
    t0 = time.perf_counter()
    compiled[name] = lower().compile()
    seconds[name] = time.perf_counter() - t0
  return compiled, seconds


def memory_report(compiled: dict[str, Any], params_bytes: int) -> dict[str, Any]:
  """Peak bytes of each executable and the ratios the targets are stated in.

  Args:
    compiled: from `compile_steps`.
    params_bytes: bytes of the parameter tree.

  Returns:
    A flat dict: `<name>_peak_bytes`, the ratios (present when both sides are), and
    `memory_analysis` with every executable's full `step_memory` breakdown.
  """
  analysis = {name: memory.step_memory(c) for name, c in compiled.items()}
  peak = {name: a["peak_bytes"] for name, a in analysis.items()}
  out = {"params_bytes": params_bytes}
  out.update({f"{name}_peak_bytes": p for name, p in peak.items()})
  # Estimate and update run as two executables; the parameters persist across them and
  # the ZOGrad between them is a few bytes, so the step's peak is the larger of the two.
  zo_step = max(peak["zo_estimate"], peak["zo_update"])
  out["zo_step_peak_bytes"] = zo_step
  out["zo_peak_over_forward_peak"] = peak["zo_estimate"] / peak["forward"]
  out["zo_step_peak_over_forward_peak"] = zo_step / peak["forward"]
  if "zo_fused" in peak:
    out["zo_fused_peak_over_forward_peak"] = peak["zo_fused"] / peak["forward"]
  if "adamw" in peak:
    out["adamw_peak_over_zo_peak"] = peak["adamw"] / zo_step
    out["adamw_peak_over_zo_estimate_peak"] = peak["adamw"] / peak["zo_estimate"]
  out["memory_analysis"] = analysis
  return out


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def time_zo_vs_forwards(compiled: dict[str, dict[str, Any]], steps: dict[str, Steps], params,
                        batch, key, *, reps: int = 7, warmup: int = 1, noise_pass: bool = True
                        ) -> dict[str, Any]:
  """Median wall-time ratio of one ZO step to two forwards, per direction, in this process.

  A ZO step is the compiled estimate followed by the compiled (donating) update; the
  forwards are the compiled `loss_fn` called twice. In each repetition the forwards and every
  direction's step run once, the order rotating.

  Args:
    compiled: by direction, from `compile_steps` (`zo_estimate`, `zo_update`; the first
      direction's also `forward`).
    steps: by direction, the `Steps` they came from (for the update's initial state).
    params: concrete parameters (copied per direction: the update donates them).
    batch: a concrete batch.
    key: the base key (typed threefry key or uint32 data).
    reps: timed repetitions of each.
    warmup: untimed calls of each first.
    noise_pass: also time one RNG pass over every parameter per direction (z drawn and
      summed), the work a ZO step does twice on top of its forwards.

  Returns:
    `zo_step_over_two_forwards` and `zo_estimate_over_two_forwards` ({direction: median of
    per-rep ratios}), `two_forwards_seconds` (median), per direction the median seconds of
    each part, and the per-rep seconds (``reps``, keys ``<direction>/<part>``).
  """
  key = perturb.key_data(key)
  directions = list(compiled)
  forward = compiled[directions[0]]["forward"]
  params_like = _abstract(params)
  state = {d: {"params": jax.tree.map(jnp.copy, params),
               "opt_state": steps[d].zo_tx.init(params), "step": 0} for d in directions}

  def forwards():
    forward(params, batch)
    return forward(params, batch)

  def zo_step(d):
    s, c = state[d], compiled[d]
    t0 = time.perf_counter()
    _, zograd = c["zo_estimate"](s["params"], batch, key, jnp.int32(s["step"]))
    jax.block_until_ready(zograd)
    t1 = time.perf_counter()
    s["params"], s["opt_state"] = c["zo_update"](s["params"], s["opt_state"], zograd)
    jax.block_until_ready(s["params"])
    s["step"] += 1
    return t1 - t0, time.perf_counter() - t1

  noise = {}
  if noise_pass:
    for d in directions:
      noise[d] = jax.jit(functools.partial(noise_sums, params_like=params_like,
                                           direction=d)).lower(key, jnp.int32(0)).compile()
  for _ in range(warmup):
    jax.block_until_ready(forwards())
    for d in directions:
      zo_step(d)
      if d in noise:
        jax.block_until_ready(noise[d](key, jnp.int32(0)))

  rows = []
  tasks = ["fwd", *directions]
  for r in range(reps):
    row = {}
    for what in tasks[r % len(tasks):] + tasks[:r % len(tasks)]:
      if what == "fwd":
        row["two_forwards_seconds"] = _timed(forwards)
      else:
        est, upd = zo_step(what)
        row[f"{what}/zo_estimate_seconds"], row[f"{what}/zo_update_seconds"] = est, upd
        row[f"{what}/zo_step_seconds"] = est + upd
    for d in noise:
      row[f"{d}/noise_pass_seconds"] = _timed(lambda d=d: noise[d](key, jnp.int32(r)))
    for d in directions:
      row[f"{d}/ratio"] = row[f"{d}/zo_step_seconds"] / row["two_forwards_seconds"]
    rows.append(row)

  median = lambda name: statistics.median(row[name] for row in rows)
  out = {
      "zo_step_over_two_forwards": {d: median(f"{d}/ratio") for d in directions},
      "zo_estimate_over_two_forwards": {d: statistics.median(
          row[f"{d}/zo_estimate_seconds"] / row["two_forwards_seconds"] for row in rows)
          for d in directions},
      "two_forwards_seconds": median("two_forwards_seconds"),
  }
  for d in directions:
    out[d] = {name.split("/", 1)[1]: median(name) for name in rows[0]
              if name.startswith(f"{d}/") and not name.endswith("/ratio")}
  out["reps"] = rows
  return out


def _mib(b):
  return b / 2**20


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = ["forward", "zo_estimate", "zo_update", "adamw"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, (model, by_direction) in zip(axes, results["memory"].items()):
    labels, values = [], []
    for name in names:
      for d, mem in by_direction.items():
        if name in ("forward", "adamw") and d != DIRECTIONS[0]:
          continue  # the same executable for every direction
        if f"{name}_peak_bytes" in mem:
          labels.append(name if name in ("forward", "adamw") else f"{name[3:]}\n{d[:5]}")
          values.append(_mib(mem[f"{name}_peak_bytes"]))
    ax.bar(labels, values, color="#4c72b0")
    params_bytes = next(iter(by_direction.values()))["params_bytes"]
    ax.axhline(_mib(params_bytes), ls="--", c="k", lw=0.8, label="params")
    ax.set_title(model)
    ax.set_ylabel("peak MiB (memory_analysis)")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
  ratios = results["timing"]["zo_step_over_two_forwards"]
  axes[2].bar(list(ratios), list(ratios.values()), color=["#7fa7d9", "#4c72b0"])
  axes[2].axhline(1.15, ls="--", c="#c44e52", lw=0.8, label="target 1.15")
  axes[2].set_ylabel("ZO step / two forwards (median)")
  axes[2].set_title("time, smollm2-135m")
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def compile_directions(config, params, batch, *, adamw: bool = True, fused: bool = True,
                       directions=DIRECTIONS):
  """`compile_steps` for each direction; forward and AdamW (direction-free) compiled once.

  Returns:
    ({direction: Steps}, {direction: compiled by name}, {direction: compile seconds}); every
    direction's compiled dict holds the shared forward (and adamw) too.
  """
  steps, compiled, seconds = {}, {}, {}
  for i, d in enumerate(directions):
    steps[d] = make_steps(config, direction=d)
    compiled[d], seconds[d] = compile_steps(steps[d], params, batch, adamw=adamw and i == 0,
                                            fused=fused, forward=i == 0)
    shared = {k: v for k, v in compiled[directions[0]].items() if k in ("forward", "adamw")}
    compiled[d] = {**shared, **compiled[d]}
  return steps, compiled, seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--random", action="store_true", help="random SmolLM2-shaped weights")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--skip_1b", action="store_true")
  parser.add_argument("--skip_1b_adamw", action="store_true")
  parser.add_argument("--out", default=str(RESULTS / "bench_zo.json"))
  args = parser.parse_args()

  if args.random:
    config = llama.CONFIGS["smollm2-135m"]
    params = jax.jit(functools.partial(llama.init, config))(jax.random.key(0))
  else:
    from zojax.models import smollm2  # noqa: PLC0415
    config, params = smollm2.load_smollm2()
  batch = classification_batch(config, args.batch_size, args.seq_len)
  steps, compiled, compile_seconds = compile_directions(config, params, batch)
  mem_small = {d: memory_report(c, tree_bytes(params)) for d, c in compiled.items()}
  timing = time_zo_vs_forwards(compiled, steps, params, batch, jax.random.key(0),
                               reps=args.reps)
  del compiled, params

  results = {
      "device": str(jax.devices()[0]),
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "weights": "random" if args.random else "pretrained (GGUF)",
      "batch_size": args.batch_size, "seq_len": args.seq_len,
      "timing": timing,
      "compile_seconds": {"smollm2-135m": compile_seconds},
      "memory": {"smollm2-135m": mem_small},
      "notes": [],
  }
  if not args.skip_1b:
    big = llama.CONFIGS["galore-1b"]
    big_params = llama.param_shapes(big)
    big_batch = _abstract(classification_batch(big, args.batch_size, args.seq_len))
    _, big_compiled, big_seconds = compile_directions(big, big_params, big_batch,
                                                      adamw=not args.skip_1b_adamw)
    results["memory"]["galore-1b"] = {d: memory_report(c, tree_bytes(big_params))
                                      for d, c in big_compiled.items()}
    results["compile_seconds"]["galore-1b"] = big_seconds
    if args.skip_1b_adamw:
      results["notes"].append("galore-1b AdamW step not compiled (--skip_1b_adamw)")

  small, t = results["memory"]["smollm2-135m"], results["timing"]
  per = lambda mem, name: {d: m[name] for d, m in mem.items() if name in m}
  summary = {
      "zo_step_over_two_forwards": t["zo_step_over_two_forwards"],
      "zo_peak_over_forward_peak": per(small, "zo_peak_over_forward_peak"),
      "adamw_peak_over_zo_peak": per(small, "adamw_peak_over_zo_peak"),
      "targets_met": {
          **{f"zo_step_over_two_forwards<=1.15 ({d})": r <= 1.15
             for d, r in t["zo_step_over_two_forwards"].items()},
          "zo_peak_over_forward_peak<=1.1": all(
              r <= 1.1 for r in per(small, "zo_peak_over_forward_peak").values()),
      },
      "zo_step_peak_over_forward_peak": per(small, "zo_step_peak_over_forward_peak"),
      "zo_estimate_over_two_forwards": t["zo_estimate_over_two_forwards"],
      "two_forwards_seconds": t["two_forwards_seconds"],
      "seconds": {d: t[d] for d in DIRECTIONS},
      "params_bytes": small[DIRECTIONS[0]]["params_bytes"],
      "forward_peak_bytes": small[DIRECTIONS[0]]["forward_peak_bytes"],
      "adamw_peak_bytes": small[DIRECTIONS[0]]["adamw_peak_bytes"],
  }
  for name in ("zo_estimate_peak", "zo_update_peak", "zo_step_peak", "zo_fused_peak"):
    summary[f"{name}_bytes"] = per(small, f"{name}_bytes")
  if "galore-1b" in results["memory"]:
    big = results["memory"]["galore-1b"]
    first = big[DIRECTIONS[0]]
    for name in ("params", "forward_peak", "adamw_peak"):
      if f"{name}_bytes" in first:
        summary[f"galore_1b_{name}_bytes"] = first[f"{name}_bytes"]
    for name in ("zo_estimate_peak_bytes", "zo_update_peak_bytes", "zo_step_peak_bytes",
                 "zo_peak_over_forward_peak", "zo_step_peak_over_forward_peak",
                 "adamw_peak_over_zo_peak"):
      if name in first:
        summary[f"galore_1b_{name}"] = per(big, name)
  summary.update(device=results["device"], jax_version=results["jax_version"],
                 weights=results["weights"], notes=results["notes"])
  results["summary"] = summary

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + "\n")
  plot(results, out.with_suffix(".png"))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
