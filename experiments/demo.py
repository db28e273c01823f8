"""The README demo: MeZO against AdamW, fine-tuning SmolLM2-135M on Rotten Tomatoes.

  python experiments/demo.py --workdir runs/demo

MeZO's k-shot protocol with k=16 per class (32 training sentences); test accuracy on a fixed
400-sentence subset of the 1000-sentence test split. Runs, one after the other:
  1. AdamW (`configs/sentiment_adamw.py:demo`): zero-shot evaluation, 24 steps at batch 8;
  2. MeZO, zeroth-order SGD (`configs/sentiment_zo.py:demo`): 100 steps at batch 16, lr 3e-5,
     Rademacher z; each step two forward passes and no backward, the run's weights
     recoverable from the base weights plus a seed log of a few KB.
Then prints accuracy, peak step memory (`compiled.memory_analysis()`) and step time for both,
and writes runs/demo/demo.png. About 10 minutes on 2 idle CPU cores. MeZO needs more steps
than AdamW to match it (the paper runs 100k); the demo shows the memory side of the trade
and that ZO learns; experiments/zo_sentiment.py goes further.
"""

import argparse
import json
import logging
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zojax.train import config as config_lib  # noqa: E402
from zojax.train import loop  # noqa: E402


def train(config_path: str, workdir: pathlib.Path, overrides: list[str]) -> dict:
  config = config_lib.load(config_path)
  config_lib.override(config, overrides)
  return loop.train(config, workdir)


def plot(rows, path: pathlib.Path):
  fig, (acc, mem) = plt.subplots(1, 2, figsize=(8, 3.2))
  names = [name for name, _, _ in rows]
  acc.bar(names, [r["test/accuracy"] for _, r, _ in rows], color=["#999", "#4c72b0", "#c44e52"])
  acc.axhline(0.5, ls="--", c="k", lw=0.8)
  acc.set_ylim(0.4, 1.0)
  acc.set_ylabel("test accuracy (400 sentences)")
  trained = [(name, gib) for name, _, gib in rows if gib is not None]
  mem.bar([n for n, _ in trained], [g for _, g in trained], color=["#4c72b0", "#c44e52"])
  mem.set_ylabel("peak step memory (GiB)")
  for ax in (acc, mem):
    ax.tick_params(axis="x", labelsize=8)
  fig.suptitle("SmolLM2-135M, Rotten Tomatoes, k=16 per class")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  workdir = pathlib.Path(args.workdir)

  adamw = train("configs/sentiment_adamw.py:demo", workdir / "adamw", [])
  mezo = train("configs/sentiment_zo.py:demo", workdir / "mezo", ["train.eval_at_start=False"])

  gib = lambda r: r["step_memory"]["peak_bytes"] / 2**30
  rows = [("zero-shot", adamw["initial_eval"], None),
          (f"AdamW, {adamw['steps']} steps", adamw["final_eval"], gib(adamw)),
          (f"MeZO, {mezo['steps']} steps", mezo["final_eval"], gib(mezo))]
  seconds = {"AdamW": adamw["seconds_per_step"], "MeZO": mezo["seconds_per_step"]}
  print(f"\nRotten Tomatoes, prompt '<sentence> It was' -> ' terrible' / ' great', "
        f"{adamw['task']['sizes']['test']} test sentences, k=16 per class")
  print(f"{'':22s} {'test acc':>9s} {'test loss':>10s} {'peak step GiB':>14s} {'s/step':>7s}")
  for (name, r, g), s in zip(rows, (None, seconds["AdamW"], seconds["MeZO"])):
    print(f"{name:22s} {r['test/accuracy']:9.3f} {r['test/loss']:10.4f} "
          f"{'' if g is None else f'{g:.2f}':>14s} {'' if s is None else f'{s:.2f}':>7s}")
  print(f"AdamW's step holds {gib(adamw) / gib(mezo):.1f}x MeZO's peak memory "
        f"(compiled.memory_analysis, {adamw['devices']}).")
  plot(rows, workdir / "demo.png")
  print(f"plot: {workdir / 'demo.png'}")
  print(json.dumps({
      "zero_shot_test_accuracy": adamw["initial_eval"]["test/accuracy"],
      "adamw_test_accuracy": adamw["final_eval"]["test/accuracy"],
      "mezo_test_accuracy": mezo["final_eval"]["test/accuracy"],
      "adamw_peak_step_gib": round(gib(adamw), 3), "mezo_peak_step_gib": round(gib(mezo), 3),
      "adamw_seconds_per_step": seconds["AdamW"], "mezo_seconds_per_step": seconds["MeZO"]}))


if __name__ == "__main__":
  main()
