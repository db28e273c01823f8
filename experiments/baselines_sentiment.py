"""First-order reference numbers for SmolLM2-135M on Rotten Tomatoes (BENCHMARKS.md).

  python experiments/baselines_sentiment.py [--quick] [--optimizer adamw|galore]

Runs, one after another in this process:
  * zero-shot: the pretrained model on the fixed 1000-sentence test split;
  * full fine-tuning, MeZO's k-shot protocol: k=16 per class over several k-shot seeds, and
    k=512 per class (fewer steps than MeZO's 1000: CPU time; see BENCHMARKS.md), with AdamW
    (configs/sentiment_adamw.py) or GaLore-AdamW (configs/sentiment_galore.py: the same
    fine-tune, attention/MLP kernels through GaLore).
Writes experiments/results/{baselines,galore}_sentiment.{json,png} and prints a final JSON
line.
`--quick` shrinks everything to check the script itself in a couple of minutes; a run whose
workdir already holds results.json for the same config is read, not retrained;
`--k512_steps 0` skips the k=512 run.
"""

import argparse
import json
import logging
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zojax.train import config as config_lib  # noqa: E402
from zojax.train import loop  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def run(name, config_file, arg, overrides, workroot):
  config = config_lib.load(f"{config_file}:{arg}")
  config_lib.override(config, overrides + ["train.progress=False"])
  done = workroot / name / "results.json"
  if done.exists() and json.loads(done.read_text())["config"] == json.loads(config.to_json()):
    logging.info("%s: finished earlier with this config; reading %s", name, done)
    return json.loads(done.read_text())
  t0 = time.perf_counter()
  r = loop.train(config, workroot / name)
  r.pop("state")
  r["wall_seconds"] = time.perf_counter() - t0
  logging.info("%s: %s", name, json.dumps(r["final_eval"]))
  return r


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw")
  parser.add_argument("--workroot", default="runs/baselines")
  parser.add_argument("--k16_seeds", type=int, default=3)
  parser.add_argument("--k16_steps", type=int, default=50)
  parser.add_argument("--k512_steps", type=int, default=150)
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  workroot = pathlib.Path(args.workroot)
  quick = ["task.eval_limit=16"] if args.quick else []
  k16_steps, k512_steps = (2, 2) if args.quick else (args.k16_steps, args.k512_steps)
  seeds = range(1 if args.quick else args.k16_seeds)

  opt = args.optimizer
  config_file = f"configs/sentiment_{opt}.py"
  runs = {}
  for seed in seeds:
    runs[f"{opt}_k16_seed{seed}"] = run(
        f"{opt}_k16_seed{seed}", config_file, f"k=16,kshot_seed={seed},steps={k16_steps}",
        quick + [f"train.eval_at_start={seed == 0}"], workroot)
  if k512_steps:
    runs[f"{opt}_k512_seed0"] = run(
        f"{opt}_k512_seed0", config_file, f"k=512,kshot_seed=0,steps={k512_steps}",
        quick + ["train.eval_at_start=False"], workroot)

  zero_shot = runs[f"{opt}_k16_seed0"]["initial_eval"]
  k16 = np.array([runs[f"{opt}_k16_seed{s}"]["final_eval"]["test/accuracy"] for s in seeds])
  k512 = runs[f"{opt}_k512_seed0"]["final_eval"]["test/accuracy"] if k512_steps else None
  summary = {
      "zero_shot_test_accuracy": zero_shot["test/accuracy"],
      f"{opt}_k16_test_accuracy_mean": float(k16.mean()),
      f"{opt}_k16_test_accuracy_std": float(k16.std()),
      f"{opt}_k16_seeds": len(k16),
      f"{opt}_k512_test_accuracy": k512,
      "peak_step_bytes": runs[f"{opt}_k16_seed0"]["step_memory"]["peak_bytes"],
      "seconds_per_step": runs[f"{opt}_k16_seed0"]["seconds_per_step"],
      "quick": args.quick,
  }
  RESULTS.mkdir(exist_ok=True)
  stem = "baselines_sentiment" if opt == "adamw" else f"{opt}_sentiment"
  stem += "_quick" if args.quick else ""
  (RESULTS / f"{stem}.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))

  fig, ax = plt.subplots(figsize=(6, 3.5))
  name = {"adamw": "AdamW", "galore": "GaLore"}[opt]
  labels = ["zero-shot", f"{name} k=16\n({len(k16)} seeds)", f"{name} k=512\n(1 seed)"]
  heights, errors = [summary["zero_shot_test_accuracy"], k16.mean(), k512], [0, k16.std(), 0]
  if k512 is None:  # --k512_steps 0
    labels, heights, errors = labels[:2], heights[:2], errors[:2]
  colors = ["#999", "#4c72b0", "#55a868"][:len(labels)]
  ax.bar(labels, heights, yerr=errors, capsize=4, color=colors)
  ax.axhline(0.5, ls="--", c="k", lw=0.8)
  ax.set_ylabel("test accuracy (1000 sentences)")
  ax.set_ylim(0.4, 1.0)
  ax.set_title("SmolLM2-135M, Rotten Tomatoes")
  fig.tight_layout()
  fig.savefig(RESULTS / f"{stem}.png", dpi=110)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
