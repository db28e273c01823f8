"""MeZO's protocol on SmolLM2-135M + Rotten Tomatoes: ZO-SGD against zero-shot and AdamW.

  python experiments/zo_sentiment.py [--runs k16_lr1e-5 k512_lr1e-5 ...] [--steps 150]
                                     [--quick]

Each run name is ``k{K}_lr{LR}[_seed{S}][_adam][_n{N}]``: k-shot size per class, ZO learning
rate, k-shot seed, ZO-Adam instead of ZO-SGD, N SPSA samples per step (n-SPSA). Every run
is `configs/sentiment_zo.py` (eps 1e-3, batch 16, MeZO's settings) for `--steps` steps,
evaluated every `--eval_every` steps on a fixed 400-sentence subset of the test split (the
demo's subset; the AdamW baselines in BENCHMARKS.md use all 1000).

Runs go one after another in this process; after each one the script rewrites
experiments/results/zo_sentiment.{json,png} (a table, and test accuracy against steps), so
a long background sweep leaves usable results at every point. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zojax.train import config as config_lib  # noqa: E402
from zojax.train import loop  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BASELINES = RESULTS / "baselines_sentiment.json"
_NAME = re.compile(r"^k(?P<k>\d+)_lr(?P<lr>[0-9.e+-]+)(_seed(?P<seed>\d+))?(?P<adam>_adam)?"
                   r"(_n(?P<n>\d+))?$")


def parse_name(name: str) -> dict:
  """'k16_lr1e-5_seed1_adam_n4' -> {k, lr, seed, adam, num_samples}; one-line error if bad."""
  m = _NAME.match(name)
  if not m:
    raise SystemExit(f"run name {name!r} is not k<K>_lr<LR>[_seed<S>][_adam][_n<N>]")
  return {"k": int(m["k"]), "lr": float(m["lr"]), "seed": int(m["seed"] or 0),
          "adam": bool(m["adam"]), "num_samples": int(m["n"] or 1)}


def run(name: str, steps: int, eval_every: int, eval_limit: int, workroot: pathlib.Path):
  spec = parse_name(name)
  arg = (f"k={spec['k']},kshot_seed={spec['seed']},steps={steps},lr={spec['lr']}"
         + (",adam" if spec["adam"] else ""))
  config = config_lib.load(f"configs/sentiment_zo.py:{arg}")
  config_lib.override(config, [
      f"zo.num_samples={spec['num_samples']}", f"train.eval_every={eval_every}",
      f"train.checkpoint_every={eval_every}", f"task.eval_limit={eval_limit}",
      "task.eval_splits=('test',)", "train.progress=False"])
  t0 = time.perf_counter()
  result = loop.train(config, workroot / name)
  result.pop("state", None)
  result["wall_seconds"] = time.perf_counter() - t0
  result["spec"] = spec
  return result


def curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, test accuracy) of every evaluation in a run's metrics.jsonl."""
  points = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "eval/test/accuracy" in row:
      points.append((row["step"], row["eval/test/accuracy"]))
  return sorted(dict(points).items())


def summarize(runs: dict, workroot: pathlib.Path) -> dict:
  baselines = json.loads(BASELINES.read_text())["summary"] if BASELINES.exists() else {}
  table = []
  for name, r in runs.items():
    points = curve(workroot / name)
    table.append({
        "run": name, **r["spec"], "steps": r["steps"],
        "zero_shot_acc": points[0][1] if points and points[0][0] == 0 else None,
        "best_acc": max(a for _, a in points) if points else None,
        "final_acc": r["final_eval"]["test/accuracy"],
        "seconds_per_step": r["seconds_per_step"],
        "peak_step_bytes": r["step_memory"].get("peak_bytes"),
        "curve": points,
    })
  return {"table": table, "adamw_baselines_1000_test": {
      k: baselines.get(k) for k in ("zero_shot_test_accuracy", "adamw_k16_test_accuracy_mean",
                                    "adamw_k16_test_accuracy_std", "adamw_k512_test_accuracy")}}


def plot(summary: dict, path: pathlib.Path):
  fig, ax = plt.subplots(figsize=(7, 4))
  for row in summary["table"]:
    steps, accs = zip(*row["curve"]) if row["curve"] else ((), ())
    ax.plot(steps, accs, marker="o", ms=3, label=row["run"])
  base = summary["adamw_baselines_1000_test"]
  for key, style, label in (("adamw_k16_test_accuracy_mean", ":", "AdamW k=16 (50 steps)"),
                            ("adamw_k512_test_accuracy", "--", "AdamW k=512 (150 steps)")):
    if base.get(key) is not None:
      ax.axhline(base[key], ls=style, c="k", lw=0.9, label=label)
  ax.axhline(0.5, c="0.6", lw=0.6)
  ax.set_xlabel("ZO step (batch 16, 2 forwards each)")
  ax.set_ylabel("test accuracy (400-sentence subset)")
  ax.set_title("SmolLM2-135M, Rotten Tomatoes: MeZO (ZO-SGD, eps 1e-3)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--runs", nargs="+",
                      default=["k16_lr1e-5", "k16_lr3e-5", "k16_lr1e-6", "k512_lr1e-5"])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--eval_every", type=int, default=50)
  parser.add_argument("--eval_limit", type=int, default=400)
  parser.add_argument("--workroot", default="runs/zo_sentiment")
  parser.add_argument("--quick", action="store_true", help="2 steps, 16 eval sentences")
  args = parser.parse_args()
  for name in args.runs:
    parse_name(name)  # every name checked before hours of training
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  steps, eval_every, eval_limit = ((2, 1, 16) if args.quick
                                   else (args.steps, args.eval_every, args.eval_limit))
  workroot = pathlib.Path(args.workroot)
  stem = "zo_sentiment_quick" if args.quick else "zo_sentiment"
  RESULTS.mkdir(exist_ok=True)
  runs = {}
  for name in args.runs:
    runs[name] = run(name, steps, eval_every, eval_limit, workroot)
    summary = summarize(runs, workroot)
    summary.update(steps=steps, eval_limit=eval_limit, quick=args.quick)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"summary": summary, "runs": runs},
                                                     indent=2, default=str))
    plot(summary, RESULTS / f"{stem}.png")
    logging.info("%s: final test acc %.3f", name, runs[name]["final_eval"]["test/accuracy"])
  print(json.dumps({row["run"]: row["final_acc"] for row in summary["table"]}))


if __name__ == "__main__":
  main()
