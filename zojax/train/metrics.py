"""Run-directory outputs: `metrics.jsonl` (one JSON object per logged step) and the curves plot."""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLog:
  """Appends records to `metrics.jsonl`; on resume, drops records past the restored step.

  Records written after the last checkpoint belong to steps that will be run again, so
  keeping them would duplicate those steps in the curves.
  """

  def __init__(self, path: pathlib.Path, resume_step: int = 0):
    self.path = pathlib.Path(path)
    kept = [r for r in self.read() if r.get("step", 0) <= resume_step] if resume_step else []
    with open(self.path, "w") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")

  def write(self, record: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _plain(v):
  """JSON-able: arrays become (nested) lists, non-finite floats null."""
  if hasattr(v, "tolist"):  # numpy / jax scalars and arrays
    v = v.tolist()
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return None if isinstance(v, float) and not math.isfinite(v) else v


def plot_curves(records: list[dict], path: pathlib.Path, title: str = "") -> None:
  """One panel per metric family: training loss, and each eval metric against step."""
  train = [r for r in records if "train/loss" in r]
  scalar = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  eval_keys = sorted({k for r in records for k, v in r.items()
                      if k.startswith("eval/") and scalar(v)})
  panels = [("train/loss", train)] + [(k, [r for r in records if k in r]) for k in eval_keys]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  for ax, (key, rows) in zip(axes[0], panels):
    xs = [r["step"] for r in rows if r.get(key) is not None]
    ys = [r[key] for r in rows if r.get(key) is not None]
    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title(key)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
