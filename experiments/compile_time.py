"""What deriving each perturbation key once (`zojax.zo.perturb.own_key`) buys, side by side.

  python experiments/compile_time.py [--reps 5] [--skip_smollm2]

A ZO program derives a key per (sample, layer, leaf) by a chain of fold_in hashes. Left to
itself, XLA fuses that chain into every fusion that draws from the key, so each leaf's draw
re-derives its whole address: the same z, a program several times larger. `own_key` computes
each key once into a buffer of its own. This script builds every program twice in one
process, once as shipped and once with `own_key` replaced by the identity (the program as it
was before), and reports for each:
  * compile seconds (lower + compile) and optimized-HLO lines: the dense `zo.spsa` estimate
    of the `tiny` LLaMA (both directions) and the first step of the streamed engine
    (`zo.engine=stream`, one of two blocks resident, ZO-SGD with momentum: trace + compile
    + one step);
  * step seconds of the jitted estimate at the SmolLM2-135M shape (random weights, 16 x 64
    tokens), the two variants taking turns for `--reps` repetitions (median ratio);
  * that the losses are bit-identical (the change moves work, not values).

Writes experiments/results/compile_time.json and prints it. CPU timings are noisy; the
ratios, measured in one process, are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from zojax import optim, zo  # noqa: E402
from zojax.models import llama  # noqa: E402
from zojax.zo import perturb, stream  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
KEY = jax.random.key(5)
VARIANTS = ("own_key", "fused_chain")


@contextlib.contextmanager
def variant(name: str):
  """`own_key` as shipped, or the identity (the chain of hashes free to fuse)."""
  shipped = perturb.own_key
  if name == "fused_chain":
    perturb.own_key = lambda key: key
  try:
    yield
  finally:
    perturb.own_key = shipped


def lm_batch(cfg, batch: int, seq: int, seed: int = 0):
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)),
                       jnp.int32)
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1),
          "weights": jnp.ones((batch, seq), jnp.float32)}


def estimate_fn(model, direction):
  return jax.jit(lambda p, b, t: zo.spsa(model, p, b, KEY, step=t, eps=1e-3,
                                         direction=direction))


def compiled_estimate(model, params, batch, direction):
  """(executable, compile seconds, HLO lines, loss at step 0)."""
  start = time.perf_counter()
  exe = estimate_fn(model, direction).lower(params, batch, 0).compile()
  seconds = time.perf_counter() - start
  loss, _ = exe(params, batch, 0)
  return exe, seconds, exe.as_text().count("\n"), float(loss)


def streamed_first_step(model, params, batch):
  """(seconds of trace + compile + one step, loss) of a fresh streamed engine."""
  engine = stream.StreamEngine(model, optim.zo_sgd(1e-3, momentum=0.9), eps=1e-3,
                               resident_blocks=1)
  state = engine.init(params, KEY)
  start = time.perf_counter()
  _, out = engine.step(state, batch)
  loss = float(out["loss"])
  return time.perf_counter() - start, loss


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--skip_smollm2", action="store_true")
  args = parser.parse_args()

  cfg = llama.CONFIGS["tiny"]
  model, params, batch = llama.make(cfg), llama.init(cfg, jax.random.key(0)), lm_batch(cfg, 8, 8)
  out = {"tiny": {}, "devices": jax.device_count(), "backend": jax.default_backend()}
  for direction in perturb.DIRECTIONS:
    for name in VARIANTS:
      with variant(name):
        _, seconds, lines, loss = compiled_estimate(model, params, batch, direction)
      out["tiny"][f"dense_{direction}_{name}"] = {"compile_s": seconds, "hlo_lines": lines,
                                                   "loss": loss}
  for name in VARIANTS:
    with variant(name):
      seconds, loss = streamed_first_step(model, params, batch)
    out["tiny"][f"stream_first_step_{name}"] = {"seconds": seconds, "loss": loss}

  if not args.skip_smollm2:
    cfg = llama.CONFIGS["smollm2-135m"]
    model, params, batch = (llama.make(cfg), llama.init(cfg, jax.random.key(0)),
                            lm_batch(cfg, 16, 64))
    big = out["smollm2_135m"] = {}
    for direction in perturb.DIRECTIONS:
      exes = {}
      for name in VARIANTS:
        with variant(name):
          exes[name], seconds, lines, loss = compiled_estimate(model, params, batch, direction)
        big[f"{direction}_{name}"] = {"compile_s": seconds, "hlo_lines": lines, "loss": loss}
      times = {name: [] for name in VARIANTS}
      for rep in range(args.reps):
        for name in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
          start = time.perf_counter()
          jax.block_until_ready(exes[name](params, batch, rep + 1))
          times[name].append(time.perf_counter() - start)
      ratios = [a / b for a, b in zip(times["own_key"], times["fused_chain"])]
      big[f"{direction}_step_s"] = times
      big[f"{direction}_step_ratio_own_over_fused"] = statistics.median(ratios)

  summary = {}
  for group, rows in out.items():
    if not isinstance(rows, dict):
      continue
    for key, row in rows.items():
      if key.endswith("_own_key"):
        base, other = key[:-len("_own_key")], rows[key.replace("_own_key", "_fused_chain")]
        for field in ("compile_s", "seconds", "hlo_lines"):
          if field in row:
            summary[f"{group}/{base}/{field}_own_over_fused"] = row[field] / other[field]
        summary[f"{group}/{base}/loss_bit_identical"] = row["loss"] == other["loss"]
      elif key.endswith("_ratio_own_over_fused"):
        summary[f"{group}/{key}"] = row
  out["summary"] = summary
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "compile_time.json").write_text(json.dumps(out, indent=2))
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
