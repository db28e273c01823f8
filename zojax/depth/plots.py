"""Depth panels: input, ground truth, prediction and error, one row per image."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def panels(rows: list[dict], path: str | pathlib.Path, title: str = "") -> None:
  """Writes a grid: per row the image, GT depth, predicted depth, and |p − gt|/gt.

  Args:
    rows: dicts with ``image`` [H, W, 3] in [0, 1], ``depth`` and ``pred`` [H, W] metres,
      ``valid`` [H, W] bool, and a ``label`` string. GT and prediction share one colour
      scale per row; invalid pixels are blank in GT and error.
    path: the PNG to write.
    title: the figure title.
  """
  fig, axes = plt.subplots(len(rows), 4, figsize=(12, 2.6 * len(rows)), squeeze=False)
  for ax_row, r in zip(axes, rows):
    valid = np.asarray(r["valid"], bool)
    gt = np.where(valid, r["depth"], np.nan)
    lo, hi = np.nanpercentile(gt, 1), np.nanpercentile(gt, 99)
    err = np.where(valid, np.abs(r["pred"] - r["depth"]) / np.where(valid, r["depth"], 1), np.nan)
    shown = [(np.clip(r["image"], 0, 1), None, "input"),
             (gt, ("viridis", lo, hi), "ground truth (m)"),
             (r["pred"], ("viridis", lo, hi), "prediction (m)"),
             (err, ("magma", 0.0, 0.5), "|p - gt| / gt")]
    for ax, (img, cmap, name) in zip(ax_row, shown):
      if cmap is None:
        ax.imshow(img)
      else:
        im = ax.imshow(img, cmap=cmap[0], vmin=cmap[1], vmax=cmap[2])
        fig.colorbar(im, ax=ax, fraction=0.035)
      ax.set_title(f"{r['label']}: {name}" if name == "input" else name, fontsize=8)
      ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
