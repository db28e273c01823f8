"""iDisc ablation on rendered RGB-D rooms, with a zero-shot Middlebury frame beside it.

  python experiments/depth_ablation.py [--steps 3000] [--rows baseline,idisc,...] [--quick]
                                       [--workroot runs/depth_ablation]

Rows (all `configs/depth_idisc.py` with the same data, steps, batch and seed):
  baseline   (a) same encoder + FPN, per-resolution MLP head, no AFP/ISD, params matched
  idisc      (b) iDisc, 32 IDRs per resolution (also row (d)'s 32)
  no_afp     (c) ISD attends to the static learned priors (no AFP refinement)
  idrs8      (d) iDisc with 8 IDRs
  galore     (e) iDisc trained with galore_adamw (attention and MLP kernels at rank 8)

Columns: the rooms test set (300 rooms, Eigen-style crop) d1 d2 d3 abs_rel rmse log10 silog
(pooling as zojax/depth/metrics.py says), seconds per step and its ratio to iDisc's, and the
Middlebury Motorcycle frame zero-shot (prediction median-scaled to the ground truth, since a
monocular network trained on other rooms cannot know this scene's scale): SIlog and d1.
The paper's NYU row (Swin-L backbone, pretrained, 40k steps) is printed beside the table as
context only: a different dataset, backbone and budget.

Each row is a `zojax.run` workdir under --workroot, so an interrupted sweep resumes where it
stopped (a finished row is only re-evaluated). After each row the script rewrites
experiments/results/depth_ablation.json and .png (bars of the metrics) and
depth_ablation_panels.png (input / GT / prediction / error for test rooms and the
motorcycle, iDisc and baseline rows) and depth_ablation_curves.png (every row's training
loss and test-set loss / d1 against step, also kept in the JSON under "curves").
--curves_only adds the finished rows' curves to the JSON and redraws that plot (no training,
no evaluation).
--quick runs the tiny config for a few steps: the plumbing, end to end, in CPU minutes.
--time_steps N only compiles every row's full-size training step and times N steps per row,
interleaved in rounds in this one process (random batches, no data), into
depth_ablation_timing.json: the s/step column as ratios measured side by side.
Prints a final one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zojax import models  # noqa: E402
from zojax.data import middlebury, tasks  # noqa: E402
from zojax.depth import metrics as depth_metrics  # noqa: E402
from zojax.depth import plots  # noqa: E402
from zojax.models import idisc  # noqa: E402
from zojax.train import checkpoint, engines, loop, optimizer, sharding  # noqa: E402
from zojax.train.engines import base, first_order  # noqa: E402
from zojax.train import config as config_lib  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROWS = {
    "baseline": "variant=baseline",
    "idisc": "variant=idisc",
    "no_afp": "variant=no_afp",
    "idrs8": "variant=idisc,idrs=8",
    "galore": "variant=idisc,opt=galore_adamw",
}
COLUMNS = ("d1", "d2", "d3", "abs_rel", "rmse", "log10", "silog")
# iDisc, NYU v2, Swin-L (the headline numbers): context, not a comparable row.
PAPER_NYU = {"d1": 0.940, "abs_rel": 0.086, "rmse": 0.313}


def config_for(row: str, steps: int, quick: bool):
  arg = ROWS[row] + (",tiny" if quick else "") + (f",steps={steps}" if steps else "")
  config = config_lib.load(f"configs/depth_idisc.py:{arg}")
  config_lib.override(config, ["train.progress=False"])
  return config


def trained_params(config, workdir: pathlib.Path):
  """The params of the newest checkpoint in `workdir` (the run's final state)."""
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  model = models.build(config.model)
  engine = engines.build(config, model, mesh)
  mngr = checkpoint.manager(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  restored = checkpoint.restore_latest(mngr, engine.abstract_state())
  if restored is None:
    raise RuntimeError(f"{workdir} has no checkpoint that restores")
  return engine.params(restored[1])[0]


def zero_shot(predict, params, frame) -> tuple[dict, np.ndarray]:
  """Median-scaled SIlog and d1 on one frame, and the scaled prediction."""
  pred = np.asarray(predict(params, frame["image"][None]))[0]
  scaled = depth_metrics.median_scale(pred, frame["depth"], frame["valid"])
  sums = depth_metrics.metric_sums(scaled[None], frame["depth"][None], frame["valid"][None])
  m = depth_metrics.finish(jax.device_get(sums))
  return {"silog": m["silog"], "d1": m["d1"], "scale": float(np.median(
      frame["depth"][frame["valid"]]) / np.median(pred[frame["valid"]]))}, scaled


def run_row(row: str, args, frame, test_set) -> tuple[dict, list[dict]]:
  config = config_for(row, args.steps, args.quick)
  workdir = args.workroot / row
  t0 = time.perf_counter()
  result = loop.train(config, workdir)
  s = idisc.settings_from(config.model)
  params = trained_params(config, workdir)
  predict = jax.jit(idisc.predictor(s))
  motorcycle, scaled = zero_shot(predict, params, frame)
  final = result["final_eval"]
  out = {"row": row, "arg": ROWS[row], "steps": result["steps"],
         "num_params": result["model"]["num_params"],
         **{k: final[f"test/{k}"] for k in COLUMNS},
         "sq_rel": final["test/sq_rel"], "rmse_log": final["test/rmse_log"],
         "loss": final["test/loss"],
         "seconds_per_step": result["seconds_per_step"],
         "nonfinite_steps": result["nonfinite_steps"],
         "motorcycle_silog": motorcycle["silog"], "motorcycle_d1": motorcycle["d1"],
         "motorcycle_scale": motorcycle["scale"],
         "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
         "workdir": str(workdir), "curves": curves(workdir)}
  images = test_set["image"][:3]
  preds = np.asarray(predict(params, images))
  panels = [{"image": images[i], "depth": test_set["depth"][i], "pred": preds[i],
             "valid": (test_set["depth"][i] > depth_metrics.MIN_DEPTH)
             & (test_set["eval_mask"][i] > 0), "label": f"{row} room {i}"} for i in range(3)]
  panels.append({"image": frame["image"], "depth": frame["depth"], "pred": scaled,
                 "valid": frame["valid"], "label": f"{row} motorcycle (median-scaled)"})
  return out, panels


def time_steps(rows: list[str], steps: int, rounds: int = 3) -> dict:
  """Seconds per training step of each row, side by side in this process: every row's step
  compiled first, then `rounds` rounds of `steps` steps per row, interleaved, median kept."""
  compiled = {}
  for row in rows:
    config = config_for(row, 0, False)
    model = models.build(config.model)
    tx = optimizer.build(config.optim, config.train.steps)
    params = jax.jit(model.init)(jax.random.key(0))
    state = base.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                            opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
    t = config.task
    rng = np.random.default_rng(0)
    b = config.train.batch_size
    batch = {"image": rng.random((b, t.image_height, t.image_width, 3), np.float32),
             "depth": rng.uniform(1, 8, (b, t.image_height, t.image_width)).astype(np.float32)}
    step = jax.jit(first_order.make_step(model, tx))
    state, out = step(state, batch)
    jax.block_until_ready(out)
    compiled[row] = [step, state, batch]
  times = {row: [] for row in rows}
  for _ in range(rounds):
    for row in rows:
      step, state, batch = compiled[row]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, out = step(state, batch)
      jax.block_until_ready(out)
      times[row].append((time.perf_counter() - t0) / steps)
      compiled[row][1] = state
  med = {row: float(np.median(v)) for row, v in times.items()}
  ref = med.get("idisc")
  return {row: {"seconds_per_step": v, "vs_idisc": v / ref if ref else None}
          for row, v in med.items()}


def curves(workdir: pathlib.Path) -> dict:
  """The run's logged training loss and test-set evaluations (from its metrics.jsonl)."""
  out = {"train_step": [], "train_loss": [], "eval_step": [], "eval_loss": [], "eval_d1": []}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/loss" in record:
      out["train_step"].append(record["step"])
      out["train_loss"].append(record["train/loss"])
    if "eval/test/loss" in record:
      out["eval_step"].append(record["step"])
      out["eval_loss"].append(record["eval/test/loss"])
      out["eval_d1"].append(record["eval/test/d1"])
  return out


def plot_curves(rows: list[dict], path: pathlib.Path, title: str) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for i, r in enumerate(rows):
    c, style = r["curves"], dict(color=f"C{i}", label=r["row"])
    loss = np.asarray(c["train_loss"])
    k = min(5, len(loss)) or 1  # points are logged every few steps; a short running mean
    axes[0].plot(c["train_step"][k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), **style)
    axes[1].plot(c["eval_step"], c["eval_loss"], marker="o", ms=3, **style)
    axes[2].plot(c["eval_step"], c["eval_d1"], marker="o", ms=3, **style)
  for ax, (ylabel, sub) in zip(axes, (("SIlog loss", "train (running mean of 5 logged points)"),
                                      ("SIlog loss", "rooms test set"),
                                      ("d1", "rooms test set"))):
    ax.set(xlabel="step", ylabel=ylabel, title=sub)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_table(rows: list[dict], path: pathlib.Path, title: str) -> None:
  keys = COLUMNS + ("motorcycle_silog", "motorcycle_d1", "seconds_per_step")
  fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.4))
  names = [r["row"] for r in rows]
  for ax, key in zip(axes, keys):
    values = [r[key] if r[key] is not None else np.nan for r in rows]
    ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), names, rotation=60, fontsize=7)
    ax.set_title(key, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def curves_title(summary: dict) -> str:
  return (f"iDisc ablation on rendered rooms: training curves ({summary['steps']} steps"
          f"{', quick' if summary['quick'] else ''}, one seed)")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=0, help="0: the config's default")
  ap.add_argument("--rows", default=",".join(ROWS))
  ap.add_argument("--quick", action="store_true", help="tiny config (plumbing check)")
  ap.add_argument("--workroot", type=pathlib.Path, default=pathlib.Path("runs/depth_ablation"))
  ap.add_argument("--out", type=pathlib.Path, default=RESULTS / "depth_ablation")
  ap.add_argument("--curves_only", action="store_true",
                  help="only add the finished rows' curves to the results JSON and plot them")
  ap.add_argument("--time_steps", type=int, default=0,
                  help="only time N full-size training steps per row, side by side (no data)")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  rows = [r.strip() for r in args.rows.split(",") if r.strip()]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise SystemExit(f"--rows: {unknown} not among {list(ROWS)}")
  if args.quick:  # never mixed with, nor written over, the real table
    if args.workroot == ap.get_default("workroot"):
      args.workroot = pathlib.Path("runs/depth_ablation_quick")
    if args.out == ap.get_default("out"):
      args.out = RESULTS / "depth_ablation_quick"
  args.out.parent.mkdir(parents=True, exist_ok=True)
  if args.curves_only:
    json_path = args.out.with_suffix(".json")
    summary = json.loads(json_path.read_text())
    for r in summary["rows"]:
      r["curves"] = curves(pathlib.Path(r["workdir"]))
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(summary["rows"], args.out.with_name(args.out.name + "_curves.png"),
                curves_title(summary))
    return 0
  if args.time_steps:
    timing = {"timing": time_steps(rows, args.time_steps), "steps_timed": args.time_steps,
              "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}
    path = args.out.with_name(args.out.name + "_timing.json")
    path.write_text(json.dumps(timing, indent=2) + "\n")
    print(json.dumps(timing))
    return 0

  first = config_for(rows[0], args.steps, args.quick)
  h, w = first.task.image_height, first.task.image_width
  frame = middlebury.motorcycle(h, w)
  test_set = tasks.build(first.task, batch_size=first.train.batch_size,
                         seed=first.seed).eval_sets["test"]
  json_path = args.out.with_suffix(".json")
  before = ({r["row"]: r for r in json.loads(json_path.read_text())["rows"]}
            if json_path.exists() else {})
  done, panel_rows = [], []
  for row in rows:
    result, panels = run_row(row, args, frame, test_set)
    if result["seconds_per_step"] is None and row in before:
      # A finished row resumes straight to evaluation: keep the time its training measured.
      result["seconds_per_step"] = before[row].get("seconds_per_step")
    done.append(result)
    if row in ("idisc", "baseline") or len(rows) == 1:
      panel_rows += panels
    ref = next((r for r in done if r["row"] == "idisc"), None)
    for r in done:
      r["time_vs_idisc"] = (r["seconds_per_step"] / ref["seconds_per_step"]
                            if ref and r["seconds_per_step"] and ref["seconds_per_step"]
                            else None)
    summary = {"rows": done, "paper_nyu_swinl_context": PAPER_NYU,
               "quick": args.quick, "steps": done[0]["steps"],
               "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
               "motorcycle": frame["info"]}
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot_table(done, args.out.with_suffix(".png"),
               f"iDisc ablation on rendered rooms ({done[0]['steps']} steps"
               f"{', quick' if args.quick else ''}); motorcycle zero-shot, median-scaled")
    plot_curves(done, args.out.with_name(args.out.name + "_curves.png"), curves_title(summary))
    if panel_rows:
      plots.panels(panel_rows, args.out.with_name(args.out.name + "_panels.png"))
  print(json.dumps({"rows": {r["row"]: {k: round(r[k], 4) if isinstance(r[k], float) else r[k]
                                          for k in COLUMNS + ("motorcycle_silog",
                                                              "motorcycle_d1",
                                                              "seconds_per_step")}
                             for r in done}, "steps": done[0]["steps"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
