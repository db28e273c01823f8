"""The training loop: any engine, any model; resume, eval, checkpoints, metrics in one place.

  results = train(config, workdir)   # runs or resumes; returns plain values (results.json)

The model comes from the registry (`zojax.models.build`, by ``model.name``), the engine from
the optimizer and ``zo.engine`` (`zojax.train.engines.build`); this loop knows neither.
Re-running in the same workdir resumes from the newest checkpoint that restores, bit for bit:
params, optimizer and model state, step, PRNG key and the engine's record (the ZO seed log)
are all in the checkpoint, and batches are a pure function of (seed, step).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from zojax import models
from zojax.data import tasks
from zojax.train import checkpoint, config as config_lib, distributed, engines, metrics, sharding

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("train.halt_at_step", "train.progress")

# Dispatching many collective-bearing steps without waiting can deadlock XLA's in-process
# collectives on fake CPU devices; waiting this often costs nothing measurable.
SYNC_EVERY = 8


def make_eval_step(model: models.Model):
  """``(params, model_state, batch) -> metric sums``, jitted."""
  return jax.jit(lambda params, model_state, batch: model.loss(params, model_state, batch)[1])


def evaluate(eval_step, params, model_state, task: tasks.Task, batch_size: int,
             batch_sharding, eval_metrics=None) -> dict:
  """Metrics on every eval split: accuracy + loss (classification) or loss + perplexity (LM),
  plus the model's own (`Model.eval_metrics`, given the split's totalled sums)."""
  results = {}
  rows = distributed.process_rows(batch_sharding, batch_size)  # this process's share
  for split, data in task.eval_sets.items():
    total = None
    for batch in tasks.eval_batches(data, batch_size, rows=rows):
      sums = eval_step(params, model_state,
                       distributed.put_batch(batch, batch_sharding, batch_size))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = distributed.fetch(total)
    count = float(total["count"])
    results[f"{split}/loss"] = float(total["loss_sum"]) / count
    if "correct" in total:
      results[f"{split}/accuracy"] = float(total["correct"]) / count
    elif task.vocab_size:
      results[f"{split}/perplexity"] = math.exp(results[f"{split}/loss"])
    if eval_metrics is not None:
      results.update({f"{split}/{k}": v for k, v in eval_metrics(total).items()})
  return results


def _config_diff(a: dict, b: dict, prefix="") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    name = f"{prefix}{k}"
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _config_diff(a[k], b[k], name + ".")
    elif a.get(k) != b.get(k) and name not in RESUMABLE_CHANGES:
      out.append(name)
  return out


def _check_batch_sizes(config, mesh) -> None:
  data_size = mesh.shape.get("data", 1)
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % data_size:
      raise config_lib.ConfigError(
          f"config key 'train.{key}'={config.train[key]} must be a multiple of the mesh's "
          f"data axis ({data_size} devices)")


def _restore_or_init(engine, mngr, config_json: dict, workdir):
  """(first step, state): the newest checkpoint that restores, else a fresh init."""
  restored = checkpoint.restore_latest(mngr, engine.abstract_state())
  if restored is None:
    return 0, engine.init()
  start, state, meta = restored
  changed = _config_diff(meta["config"], config_json)
  if changed:
    raise config_lib.ConfigError(
        f"workdir {workdir} holds a run with a different config (keys {', '.join(changed)}); "
        "use a new --workdir or the original config")
  engine.load_meta(meta)
  log.info("resumed from step %d", start)
  return start, state


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes) the experiment `config` in `workdir`; returns the results dict."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = json.loads(config.to_json())
  t = config.train
  mesh = distributed.make_mesh(config.mesh.axes)  # checked before any collective runs
  _check_batch_sizes(config, mesh)
  primary = distributed.is_primary()  # writes the run's output; the others only compute
  with distributed.primary_first("build"):  # one process fills a shared asset cache
    task = tasks.build(config.task, batch_size=t.batch_size, seed=config.seed)
    model = models.build(config.model, task)
  engine = engines.build(config, model, mesh)

  mngr = checkpoint.manager(workdir / "checkpoints", keep=t.keep_checkpoints)
  start, state = _restore_or_init(engine, mngr, config_json, workdir)
  metrics_log = (metrics.MetricsLog(workdir / "metrics.jsonl", resume_step=start) if primary
                 else distributed.Discard())
  rows = distributed.process_rows(engine.batch_sharding, t.batch_size)  # this process's share
  batch_at = lambda step: distributed.put_batch(task.train_batch(step, rows=rows),
                                                engine.batch_sharding, t.batch_size)
  with jax.set_mesh(mesh):  # models that shard_map inside (MoE experts) trace under the mesh
    step_memory = engine.compile(state, batch_at(start))
  eval_step = make_eval_step(model)
  eval_sharding = sharding.batch_sharding(mesh)

  def save(step, *, force=False):
    nonlocal state
    if checkpoint.due(mngr, step, every=t.checkpoint_every, force=force):
      state = engine.finalize(state)  # e.g. streamed: apply the pending update first
      checkpoint.save(mngr, step, state, {"config": config_json, **engine.meta()}, force=True)

  def run_eval(step):
    with jax.set_mesh(mesh):
      results = evaluate(eval_step, *engine.params(state), task, t.eval_batch_size,
                         eval_sharding, eval_metrics=model.eval_metrics)
    metrics_log.write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
    return results

  initial_eval = run_eval(0) if start == 0 and t.eval_at_start else None
  last = t.halt_at_step or t.steps
  bar = tqdm.tqdm(total=last, initial=start, disable=not (t.progress and primary),
                  desc=workdir.name, dynamic_ncols=True)
  t0, timed_steps = None, 0
  try:
    for step in range(start, last):
      with jax.set_mesh(mesh):  # as at compile: a different context would compile again
        state, out = engine.step(state, batch_at(step))
      done = step + 1
      if done % t.log_every == 0 or done % SYNC_EVERY == 0 or done == last:
        out = distributed.fetch(out)
        _check_nonfinite(engine, state, out, done, t, save, workdir)
        if done % t.log_every == 0 or done == last:
          metrics_log.write({"step": done, **{f"train/{k}": v for k, v in out.items()},
                             "train/nonfinite_steps": engine.nonfinite(state)})
        bar.set_postfix(loss=f"{float(out['loss']):.4f}")
      if t0 is None:  # time steady-state steps only: the first includes dispatch warm-up
        jax.block_until_ready(state)
        t0 = time.perf_counter()
      else:
        timed_steps += 1
      bar.update(1)
      save(done, force=done == last)
      if t.eval_every and done % t.eval_every == 0 and done != last:
        run_eval(done)
  except KeyboardInterrupt:
    if jax.process_count() == 1:  # many: the processes may stand at different steps
      step_now = int(state.step)
      save(step_now, force=True)
      log.warning("interrupted: state saved at step %d", step_now)
    raise
  finally:
    bar.close()
  jax.block_until_ready(state)
  seconds_per_step = (time.perf_counter() - t0) / timed_steps if timed_steps else None

  results = {
      "model": {"name": model.name, **model.info},
      "task": task.info,
      "engine": type(engine).__name__,
      "steps": last,
      "halted_early": last != t.steps,
      "nonfinite_steps": engine.nonfinite(state),
      "initial_eval": initial_eval,
      "final_eval": run_eval(last),
      "step_memory": step_memory,
      "seconds_per_step": seconds_per_step,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "processes": jax.process_count(),
      "config": config_json,
      **engine.results(state, workdir),
  }
  if primary:
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    metrics.plot_curves(metrics_log.read(), workdir / "curves.png", title=workdir.name)
  return results


def _check_nonfinite(engine, state, out, done, t, save, workdir) -> None:
  """Logs a skipped step; past train.max_nonfinite_steps saves the state and stops."""
  if bool(out["skipped"]):
    log.warning("step %d: non-finite loss or update (loss=%s); update skipped", done,
                out["loss"])
  nonfinite = engine.nonfinite(state)
  if nonfinite > t.max_nonfinite_steps:
    save(done, force=True)
    raise FloatingPointError(
        f"{nonfinite} steps had a non-finite loss or gradient, more than "
        f"train.max_nonfinite_steps={t.max_nonfinite_steps}; state saved at step {done} in "
        f"{workdir / 'checkpoints'}")
