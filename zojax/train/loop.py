"""The first-order training loop: sharded state, donated jitted step, exact resume, eval.

Usable from a notebook: `train(config, workdir)` runs a whole experiment and returns its
results dict; `make_state`, `make_train_step` and `evaluate` are the pieces.

State is built the big_vision way: shapes by `jax.eval_shape`, shardings from logical
axis rules, a jitted init with `out_shardings`, and a step with donated state.
Zeroth-order optimizers run the dense ZO step (`make_zo_step`), or with zo.engine='stream'
the ZO2 engine (`zojax.train.zo_stream_runner`), whose state replaces `TrainState`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from zojax.data import tasks
from zojax import zo
from zojax.models import llama
from zojax.train import checkpoint, config as config_lib, memory, metrics, optimizer, sharding
from zojax.train import zo_stream_runner

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("train.halt_at_step", "train.progress")

# Dispatching many collective-bearing steps without waiting can deadlock XLA's in-process
# collectives on fake CPU devices; waiting this often costs nothing measurable.
SYNC_EVERY = 8


class TrainState(NamedTuple):
  step: jax.Array       # int32 []: steps taken; also the data-iterator position
  params: Any
  opt_state: Any
  rng: jax.Array        # uint32 key data (raw, so orbax stores it as a plain array)
  nonfinite: jax.Array  # int32 []: steps skipped for a non-finite loss or gradient


def model_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  overrides = {"dtype": config.model.dtype, "attention": config.model.attention}
  if config.model.get("vocab_size"):
    overrides["vocab_size"] = config.model.vocab_size
  return llama.get_config(config.model.name, **overrides)


def _check_pretrained(config: ml_collections.ConfigDict) -> None:
  if config.model.init == "pretrained" and config.model.name != "smollm2-135m":
    raise config_lib.ConfigError(
        f"config key 'model.init'='pretrained' needs model.name='smollm2-135m' (the only "
        f"weights zojax ships a loader for), got {config.model.name!r}")


def _init_state(tx, params, key) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(key), nonfinite=jnp.zeros((), jnp.int32))


def state_shardings(config, model_cfg: llama.LlamaConfig, tx, mesh):
  """Abstract TrainState (shapes) and its shardings, without allocating anything."""
  _check_pretrained(config)
  shapes = jax.eval_shape(functools.partial(_init_state, tx), llama.param_shapes(model_cfg),
                          jax.random.key(config.seed))
  rules = [tuple(r) for r in config.mesh.rules]
  params_sh = sharding.param_shardings(shapes.params, llama.param_axes(model_cfg), rules, mesh)
  replicated = NamedSharding(mesh, P())
  state_sh = TrainState(
      step=replicated, params=params_sh,
      opt_state=sharding.optimizer_state_shardings(tx, shapes.opt_state, params_sh, mesh,
                                                   param_shapes=shapes.params),
      rng=replicated, nonfinite=replicated)
  return shapes, state_sh


def initial_params(config, model_cfg: llama.LlamaConfig, shardings):
  """The run's starting weights, placed: pretrained weights or a jitted random init."""
  if config.model.init == "pretrained":
    from zojax.models import smollm2  # noqa: PLC0415  (reads a 100 MB file; only when asked)
    return jax.device_put(smollm2.load_smollm2()[1], shardings)
  return jax.jit(functools.partial(llama.init, model_cfg),
                 out_shardings=shardings)(jax.random.key(config.seed))


def init_state(config, model_cfg: llama.LlamaConfig, tx, state_sh: TrainState) -> TrainState:
  """The initial TrainState, placed: pretrained weights or a jitted random init."""
  params = initial_params(config, model_cfg, state_sh.params)
  # Params are arguments, not closed-over constants, so they never land in the HLO.
  return jax.jit(functools.partial(_init_state, tx), out_shardings=state_sh,
                 donate_argnums=0)(params, jax.random.key(config.seed))


def make_state(config, model_cfg, tx, mesh):
  """Builds the sharded initial TrainState and its shardings."""
  _, state_sh = state_shardings(config, model_cfg, tx, mesh)
  return init_state(config, model_cfg, tx, state_sh), state_sh


def make_train_step(model_cfg: llama.LlamaConfig, tx: optax.GradientTransformation, *,
                    remat: bool):
  """One AdamW/SGD step. A non-finite loss or gradient leaves params and opt state as they were."""

  def step(state: TrainState, batch):
    def loss_fn(params):
      return llama.loss_fn(model_cfg, params, batch, remat=remat)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        rng=state.rng,
        nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    out = {"loss": loss, "grad_norm": grad_norm, "skipped": ~finite}
    if "correct" in sums:
      out["accuracy"] = sums["correct"] / jnp.maximum(sums["count"], 1.0)
    return new_state, out

  return step


class ZOStep(NamedTuple):
  """A ZO training step as two compiled pieces, so the update is replayable bit-exactly."""

  estimate: Any  # compiled (params, batch, rng, step) -> (loss, ZOGrad): the dual forward
  apply: Any     # jitted (params, opt_state, ZOGrad) -> (params, opt_state), donating both


def make_zo_step(model_cfg: llama.LlamaConfig, tx, zo_cfg, state, state_sh, example_batch,
                 batch_sh) -> tuple[ZOStep, dict]:
  """Compiles the SPSA estimate (perturbation inside the block scan) and the update.

  The update is `zo.make_apply(tx)`, kept out of the estimate's jit because `zo.replay`
  must run the very same compiled update to reproduce the weights bit for bit.
  Returns the step and the memory of both compiled pieces.
  """
  model = llama.make(model_cfg)

  def estimate(params, batch, rng, step):
    return zo.spsa(model, params, batch, rng, step=step, eps=zo_cfg.eps,
                   num_samples=zo_cfg.num_samples, one_sided=zo_cfg.one_sided)

  replicated = state_sh.step
  compiled = jax.jit(estimate, in_shardings=(state_sh.params, batch_sh, replicated, replicated)
                     ).lower(state.params, example_batch, state.rng, state.step).compile()
  apply = zo.make_apply(tx, donate=True)
  update_memory = memory.step_memory(
      apply.lower(state.params, state.opt_state,
                  jax.eval_shape(estimate, state.params, example_batch, state.rng,
                                 state.step)[1]).compile())
  step_memory = memory.step_memory(compiled)
  step_memory["estimate_peak_bytes"] = step_memory.get("peak_bytes")
  step_memory["update_peak_bytes"] = update_memory.get("peak_bytes")
  if None not in (step_memory["estimate_peak_bytes"], step_memory["update_peak_bytes"]):
    # The two run one after the other: the step's peak is the larger.
    step_memory["peak_bytes"] = max(step_memory["estimate_peak_bytes"],
                                    step_memory["update_peak_bytes"])
  return ZOStep(compiled, apply), step_memory


def _zo_outputs(loss, zograd: zo.ZOGrad) -> dict:
  return {"loss": loss, "skipped": ~zograd.finite, "projected_grad": jnp.mean(zograd.coeffs)}


def zo_train_step(zo_step: ZOStep, state: TrainState, batch, log: zo.ZOLog):
  """One ZO step; appends its (step, coeffs) to `log`. Same outputs as the first-order step."""
  loss, zograd = zo_step.estimate(state.params, batch, state.rng, state.step)
  params, opt_state = zo_step.apply(state.params, state.opt_state, zograd)
  log.append(zograd)
  state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                     nonfinite=state.nonfinite + (~zograd.finite).astype(jnp.int32))
  return state, _zo_outputs(loss, zograd)


def stream_train_step(run: zo_stream_runner.StreamRun, state, batch, log: zo.ZOLog):
  """`zo_train_step` for the streamed engine: the same log entry and outputs."""
  state, out = run.step(state, batch)
  log.append(out["zograd"])
  return state, _zo_outputs(out["loss"], out["zograd"])


def make_eval_step(model_cfg: llama.LlamaConfig):
  def eval_step(params, batch):
    return llama.loss_fn(model_cfg, params, batch)[1]
  return eval_step


def evaluate(eval_step, params, task: tasks.Task, batch_size: int, batch_sharding) -> dict:
  """Metrics on every eval split: accuracy + loss (classification) or loss + perplexity (LM)."""
  results = {}
  for split, data in task.eval_sets.items():
    total = None
    for batch in tasks.eval_batches(data, batch_size):
      sums = eval_step(params, jax.device_put(batch, batch_sharding))
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.device_get(total)
    count = float(total["count"])
    results[f"{split}/loss"] = float(total["loss_sum"]) / count
    if "correct" in total:
      results[f"{split}/accuracy"] = float(total["correct"]) / count
    else:
      results[f"{split}/perplexity"] = math.exp(results[f"{split}/loss"])
  return results


def _config_diff(a: dict, b: dict, prefix="") -> list[str]:
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    name = f"{prefix}{k}"
    if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
      out += _config_diff(a[k], b[k], name + ".")
    elif a.get(k) != b.get(k) and name not in RESUMABLE_CHANGES:
      out.append(name)
  return out


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs (or resumes) the experiment `config` in `workdir`; returns the results dict."""
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = json.loads(config.to_json())

  mesh = sharding.make_mesh([tuple(a) for a in config.mesh.axes])
  data_size = mesh.shape.get("data", 1)
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % data_size:
      raise config_lib.ConfigError(
          f"config key 'train.{key}'={config.train[key]} must be a multiple of the mesh's "
          f"data axis ({data_size} devices)")
  model_cfg = model_config(config)
  task = tasks.build(config.task, batch_size=config.train.batch_size, seed=config.seed)
  if task.vocab_size > model_cfg.vocab_size:
    raise config_lib.ConfigError(
        f"config key 'model.vocab_size'={model_cfg.vocab_size} is smaller than the task's "
        f"tokenizer vocabulary ({task.vocab_size})")
  tx = optimizer.build(config.optim, config.train.steps)
  batch_sh = sharding.batch_sharding(mesh)
  zeroth = optimizer.is_zeroth_order(config.optim)
  # zo.engine='stream': the ZO2 engine; its state (blocks in host memory) replaces TrainState.
  streamed = zo_stream_runner.StreamRun(config, model_cfg, mesh) if (
      zeroth and config.zo.engine == "stream") else None
  if streamed:
    _check_pretrained(config)
    abstract_state = streamed.abstract_state()
    train_batch_sh = streamed.batch_sharding
    settle, eval_params, nonfinite_of = streamed.settle, streamed.params, streamed.nonfinite
  else:
    shapes, state_sh = state_shardings(config, model_cfg, tx, mesh)
    abstract_state = checkpoint.abstract(shapes, state_sh)
    train_batch_sh = batch_sh
    settle, eval_params = (lambda s: s), (lambda s: s.params)
    nonfinite_of = lambda s: s.nonfinite

  mngr = checkpoint.manager(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  restored = checkpoint.restore_latest(mngr, abstract_state)
  start = 0
  zo_log = zo.ZOLog.start(jax.random.key(config.seed)) if zeroth else None
  if restored is None and streamed:
    state = streamed.init(initial_params(config, model_cfg, streamed.params_sharding))
  elif restored is None:
    state = init_state(config, model_cfg, tx, state_sh)
  else:
    start, state, meta = restored
    if zeroth:
      zo_log = zo.ZOLog.from_json(meta["zo_log"])
    changed = _config_diff(meta["config"], config_json)
    if changed:
      raise config_lib.ConfigError(
          f"workdir {workdir} holds a run with a different config (keys {', '.join(changed)}); "
          "use a new --workdir or the original config")
    log.info("resumed from step %d", start)
  log_file = metrics.MetricsLog(workdir / "metrics.jsonl", resume_step=start)

  example = jax.device_put(task.train_batch(start), train_batch_sh)
  if streamed:
    step_memory = streamed.compile(state, example)
    run_step = functools.partial(stream_train_step, streamed, log=zo_log)
  elif zeroth:
    zo_step, step_memory = make_zo_step(model_cfg, tx, config.zo, state, state_sh, example,
                                        batch_sh)
    run_step = functools.partial(zo_train_step, zo_step, log=zo_log)
  else:
    train_step = jax.jit(make_train_step(model_cfg, tx, remat=config.model.remat),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                         donate_argnums=0)
    run_step = train_step.lower(state, example).compile()
    step_memory = memory.step_memory(run_step)

  def meta():
    record = {"config": config_json}
    if zeroth:
      record["zo_log"] = zo_log.to_json()
    return record

  def save(step, *, force):
    nonlocal state
    if checkpoint.due(mngr, step, every=config.train.checkpoint_every, force=force):
      state = settle(state)  # streamed: apply the pending update, so no block is stale
      checkpoint.save(mngr, step, state, meta(), force=True)
  eval_step = jax.jit(make_eval_step(model_cfg))

  def run_eval(step):
    with mesh:
      results = evaluate(eval_step, eval_params(state), task, config.train.eval_batch_size,
                         batch_sh)
    log_file.write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
    return results

  initial_eval = run_eval(0) if start == 0 and config.train.eval_at_start else None
  last = config.train.halt_at_step or config.train.steps
  bar = tqdm.tqdm(total=last, initial=start, disable=not config.train.progress,
                  desc=workdir.name, dynamic_ncols=True)
  t0, timed_steps = None, 0
  try:
    for step in range(start, last):
      batch = jax.device_put(task.train_batch(step), train_batch_sh)
      state, out = run_step(state, batch)
      done = step + 1
      if done % config.train.log_every == 0 or done % SYNC_EVERY == 0 or done == last:
        out = jax.device_get(out)
        if bool(out["skipped"]):
          log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped", done,
                      out["loss"])
        nonfinite = int(nonfinite_of(state))
        if nonfinite > config.train.max_nonfinite_steps:
          save(done, force=True)
          raise FloatingPointError(
              f"{nonfinite} steps had a non-finite loss or gradient, more than "
              f"train.max_nonfinite_steps={config.train.max_nonfinite_steps}; state saved at "
              f"step {done} in {workdir / 'checkpoints'}")
        if done % config.train.log_every == 0 or done == last:
          log_file.write({"step": done, **{f"train/{k}": v for k, v in out.items()},
                          "train/nonfinite_steps": nonfinite})
        bar.set_postfix(loss=f"{float(out['loss']):.4f}")
      if t0 is None:  # time steady-state steps only: the first includes dispatch warm-up
        jax.block_until_ready(state.step)
        t0 = time.perf_counter()
      else:
        timed_steps += 1
      bar.update(1)
      save(done, force=done == last)
      if config.train.eval_every and done % config.train.eval_every == 0 and done != last:
        run_eval(done)
  except KeyboardInterrupt:
    step_now = int(state.step)
    save(step_now, force=True)
    log.warning("interrupted: state saved at step %d", step_now)
    raise
  finally:
    bar.close()
  jax.block_until_ready(state)
  seconds_per_step = (time.perf_counter() - t0) / timed_steps if timed_steps else None

  final = run_eval(last)
  extra = {}
  if zeroth:
    zo_log.save(workdir / "zo_log.json")
    extra["zo_log_bytes"] = (workdir / "zo_log.json").stat().st_size
    if config.zo.verify_replay and streamed:
      initial = initial_params(config, model_cfg, streamed.params_sharding)
      extra.update(streamed.verify_replay(initial, zo_log, state))
    elif config.zo.verify_replay:
      initial = init_state(config, model_cfg, tx, state_sh).params
      replayed, _ = zo.replay(initial, zo_log, tx, apply=zo_step.apply)
      extra["replay_bit_identical"] = all(
          bool(jnp.array_equal(a, b)) for a, b in
          zip(jax.tree.leaves(replayed), jax.tree.leaves(state.params)))
  results = {
      "model": dataclasses.asdict(model_cfg) | {"num_params": model_cfg.num_params},
      "task": task.info,
      "steps": last,
      "halted_early": last != config.train.steps,
      "nonfinite_steps": int(nonfinite_of(state)),
      "initial_eval": initial_eval,
      "final_eval": final,
      "step_memory": step_memory,
      "seconds_per_step": seconds_per_step,
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "config": config_json,
      **extra,
  }
  (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  metrics.plot_curves(log_file.read(), workdir / "curves.png", title=workdir.name)
  results["state"] = state
  return results
