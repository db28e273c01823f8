"""The README demo: SmolLM2-135M zero-shot on Rotten Tomatoes, then a short AdamW fine-tune.

  python experiments/demo.py --workdir runs/demo

MeZO's k-shot protocol with k=16 per class (32 training sentences), 24 AdamW steps at
batch 8, test accuracy on a fixed 400-sentence subset of the 1000-sentence test split.
About 10 minutes on 2 CPU cores. Writes the run directory (metrics.jsonl, results.json,
curves.png, checkpoints) and prints a results table and a final JSON line.
"""

import argparse
import json
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from zojax.train import config as config_lib  # noqa: E402
from zojax.train import loop  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)

  config = config_lib.load("configs/sentiment_adamw.py:demo")
  config_lib.override(config, args.overrides)
  results = loop.train(config, args.workdir)

  before, after = results["initial_eval"], results["final_eval"]
  mem = results["step_memory"].get("peak_bytes", 0) / 2**30
  n_test = results["task"]["sizes"]["test"]
  rows = [("SmolLM2-135M zero-shot", before), (f"+ AdamW, {results['steps']} steps, k=16", after)]
  print(f"\nRotten Tomatoes, prompt '<sentence> It was' -> ' terrible' / ' great', "
        f"{n_test} test sentences")
  print(f"{'':34s} {'test acc':>9s} {'test loss':>10s}")
  for name, r in rows:
    print(f"{name:34s} {r['test/accuracy']:9.3f} {r['test/loss']:10.4f}")
  print(f"AdamW step: {results['seconds_per_step']:.2f} s on {results['devices']}, "
        f"peak step memory {mem:.2f} GiB (compiled.memory_analysis)")
  print(f"curves: {pathlib.Path(args.workdir) / 'curves.png'}")
  print(json.dumps({"zero_shot_test_accuracy": before["test/accuracy"],
                    "finetuned_test_accuracy": after["test/accuracy"],
                    "steps": results["steps"], "peak_step_gib": round(mem, 3)}))


if __name__ == "__main__":
  main()
