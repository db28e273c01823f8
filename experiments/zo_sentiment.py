"""MeZO's protocol on SmolLM2-135M + Rotten Tomatoes: ZO-SGD against zero-shot and AdamW.

  python experiments/zo_sentiment.py [--runs k16_lr1e-5 k512_lr1e-5 ...] [--steps 150]
                                     [--halt_at N] [--no_zero_shot] [--quick]

Each run name is ``k{K}_lr{LR}[_seed{S}][_adam][_n{N}][_rad|_gauss]``: k-shot size per class,
ZO learning rate, seed (the k-shot sample and the ZO seed, so repeats draw independent
directions), ZO-Adam instead of ZO-SGD, N SPSA samples per step (n-SPSA), and the
distribution of z (`zo.direction`: Rademacher, or Gaussian, which a name without the suffix
also means: the runs recorded before directions existed). Every run
is `configs/sentiment_zo.py` (eps 1e-3, batch 16, MeZO's settings) for `--steps` steps,
evaluated every `--eval_every` steps on a fixed 400-sentence subset of the test split (the
demo's subset; the AdamW baselines in BENCHMARKS.md use all 1000).

Runs go one after another in this process; after each one the script rewrites
experiments/results/zo_sentiment.{json,png} (a table, and test accuracy against steps),
keeping the runs already recorded there (a rerun of a name replaces its row), so a long
background sweep leaves usable results at every point. Prints a final JSON line.
A run resumes from its checkpoints: ``--halt_at N`` stops it after step N (evaluated there)
and the same command with a larger N continues it, bit for bit; keep ``--steps`` and
``--no_zero_shot`` the same for every part (they are part of the run's config).
`--summarize` only rebuilds the results from the runs' metrics.jsonl, including runs that
were stopped before their last step (marked "finished": false).
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
_NAME = re.compile(r"^k(?P<k>\d+)_lr(?P<lr>[0-9.e+-]+?)(_seed(?P<seed>\d+))?(?P<adam>_adam)?"
                   r"(_n(?P<n>\d+))?(_(?P<direction>rad|gauss))?$")
_DIRECTIONS = {"rad": "rademacher", "gauss": "gaussian", None: "gaussian"}


def parse_name(name: str) -> dict:
  """'k16_lr1e-5_seed1_adam_n4_rad' -> {k, lr, seed, adam, num_samples, direction}; one-line
  error if bad."""
  m = _NAME.match(name)
  if not m:
    raise SystemExit(f"run name {name!r} is not k<K>_lr<LR>[_seed<S>][_adam][_n<N>][_rad|_gauss]")
  return {"k": int(m["k"]), "lr": float(m["lr"]), "seed": int(m["seed"] or 0),
          "adam": bool(m["adam"]), "num_samples": int(m["n"] or 1),
          "direction": _DIRECTIONS[m["direction"]]}


def run(name: str, steps: int, eval_every: int, eval_limit: int, workroot: pathlib.Path,
        halt_at: int | None = None, zero_shot: bool = True):
  spec = parse_name(name)
  arg = (f"k={spec['k']},kshot_seed={spec['seed']},steps={steps},lr={spec['lr']}"
         + (",adam" if spec["adam"] else ""))
  config = config_lib.load(f"configs/sentiment_zo.py:{arg}")
  config_lib.override(config, [
      f"seed={spec['seed']}", f"zo.num_samples={spec['num_samples']}",
      f"zo.direction={spec['direction']}", f"train.eval_every={eval_every}",
      f"train.checkpoint_every={eval_every}", f"task.eval_limit={eval_limit}",
      "task.eval_splits=('test',)", "train.progress=False", f"train.eval_at_start={zero_shot}",
      f"train.halt_at_step={halt_at}"])
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


def row(name: str, result: dict | None, workroot: pathlib.Path) -> dict:
  """One table row; `result` is None for a run stopped early (read from metrics.jsonl)."""
  points = curve(workroot / name) if (workroot / name / "metrics.jsonl").exists() else []
  last = points[-1] if points else (0, None)
  return {
      "run": name, **parse_name(name),
      "finished": result is not None and not result.get("halted_early"),
      "steps": result["steps"] if result else last[0],
      "zero_shot_acc": points[0][1] if points and points[0][0] == 0 else None,
      "best_acc": max(a for _, a in points) if points else None,
      "final_acc": result["final_eval"]["test/accuracy"] if result else last[1],
      "seconds_per_step": result["seconds_per_step"] if result else None,
      "peak_step_bytes": result["step_memory"].get("peak_bytes") if result else None,
      "curve": points,
  }


def summarize(rows: dict) -> dict:
  baselines = json.loads(BASELINES.read_text())["summary"] if BASELINES.exists() else {}
  return {"table": list(rows.values()), "adamw_baselines_1000_test": {
      k: baselines.get(k) for k in ("zero_shot_test_accuracy", "adamw_k16_test_accuracy_mean",
                                    "adamw_k16_test_accuracy_std", "adamw_k512_test_accuracy")}}


def plot(summary: dict, path: pathlib.Path):
  fig, ax = plt.subplots(figsize=(7, 4))
  # Every run starts from the same weights on the same sentences: runs that skipped the
  # step-0 evaluation (--no_zero_shot) start from the others' zero-shot accuracy.
  zero_shot = next((r["zero_shot_acc"] for r in summary["table"] if r["zero_shot_acc"]), None)
  for row in summary["table"]:
    curve = row["curve"]
    if curve and curve[0][0] != 0 and zero_shot is not None:
      curve = [(0, zero_shot), *curve]
    steps, accs = zip(*curve) if curve else ((), ())
    ax.plot(steps, accs, marker="o", ms=3, label=row["run"],
            ls="--" if row.get("direction") == "gaussian" and "_gauss" in row["run"] else "-")
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
  parser.add_argument("--halt_at", type=int, default=None,
                      help="stop after this step (evaluated); rerun with a larger one to go on")
  parser.add_argument("--no_zero_shot", action="store_true",
                      help="skip the step-0 evaluation (zero-shot: 0.5025 on the subset)")
  parser.add_argument("--quick", action="store_true", help="2 steps, 16 eval sentences")
  parser.add_argument("--summarize", action="store_true",
                      help="only rebuild the results files from the runs' metrics.jsonl")
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
  path = RESULTS / f"{stem}.json"
  previous = json.loads(path.read_text()) if path.exists() else {"summary": {"table": []}}
  rows = {r["run"]: r for r in previous["summary"]["table"]}
  results = previous.get("runs", {})

  def write():
    summary = summarize(rows)
    summary.update(eval_limit=eval_limit, quick=args.quick)
    path.write_text(json.dumps({"summary": summary, "runs": results}, indent=2, default=str))
    plot(summary, RESULTS / f"{stem}.png")

  if args.summarize:  # rebuild rows from disk; a run without a recorded result is partial
    for name in args.runs:
      rows[name] = row(name, results.get(name), workroot)
    write()
  else:
    for name in args.runs:
      results[name] = run(name, steps, eval_every, eval_limit, workroot, halt_at=args.halt_at,
                          zero_shot=not args.no_zero_shot)
      rows[name] = row(name, results[name], workroot)
      write()
      logging.info("%s: final test acc %.3f", name, results[name]["final_eval"]["test/accuracy"])
  print(json.dumps({name: rows[name]["final_acc"] for name in args.runs}))


if __name__ == "__main__":
  main()
