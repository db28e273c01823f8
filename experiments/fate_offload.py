"""Fate (issue 12): offloaded MoE inference measured from real routing traces.

  .venv/bin/python experiments/fate_offload.py                       # both models (resumes)
  .venv/bin/python experiments/fate_offload.py --models moe_balance  # one model
  .venv/bin/python experiments/fate_offload.py --quick               # moe-tiny, random weights

CPU wall time makes offloading look free, so the headline numbers are counts and a modelled
timeline, both driven by traces the real engine (`zojax.infer.offload`) records:

  1. Models. `moe_balance`: the MoE of experiments/moe_balance.py (moe-small: 4 layers,
     16 experts, top-2), arm sign_1e-2 seed 0: the loss-free arm with the best validation
     perplexity of its table and its lowest global MaxVio bar `proportional` (whose
     perplexity is 8 points worse). `smollm2_moe`: SmolLM2-135M MoEfied (30 layers, 16 unit
     -gated experts of 96, top-4; `zojax.models.moefy`).
  2. Traces. The all-resident engine generates greedily from `--prompts` held-out rows
     (corpus validation split, evenly spaced), one request each (batch 1, the edge
     setting), `--decode_steps` decode steps after the prompt; a calibration trace is the
     prefill of `--calib_rows` train rows (EAP's table, popularity, the warm start). Once, on
     a short prompt, an offloaded Fate engine (quant off) must give bit-identical logits and
     move exactly the bytes `simulate` counts on its trace (also checked for hybrid).
  3. Prediction per layer: token accuracy (|predicted top-K ∩ used| / K, the paper's
     prefetch accuracy) and recall / precision of the prefetched set, prefetch_k = K.
  4. Timing: per-layer attention and MoE times measured on this CPU (the engine's compiled
     pieces, side by side, medians) and from a GTX 1080 Ti roofline; prefetch_k per profile
     and link; two-lane timeline replay of every policy at 4 budgets x PCIe 3.0 / 4.0.
  5. Quality with the engine, per request: perplexity over the prompts and greedy match over
     the decoded tokens against FP32, for FP32, all-INT4, Fate hybrid and all-INT2.
  6. Bytes per token by kind (warm / prefetch / demand) and format.

Stages cache their results under `--workdir` (traces as .npz, the expert store, CPU times
and quality as JSON), so a rerun skips them. Writes experiments/results/fate_offload.json
and .png (`--quick`: fate_offload_quick.*) and prints one final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import math
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from zojax.data import fetch  # noqa: E402
from zojax.errors import ConfigError  # noqa: E402
from zojax.infer import offload, planner, simulate, timeline  # noqa: E402
from zojax.infer import prefetch as prefetch_lib  # noqa: E402
from zojax.infer import quant  # noqa: E402
from zojax.infer import store as store_lib  # noqa: E402
from zojax.infer.schedule import Counters  # noqa: E402
from zojax.infer.trace import PHASES, Trace  # noqa: E402
from zojax.models import moe  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODELS = ("moe_balance", "smollm2_moe")
MOE_BALANCE_ARM = ("sign_1e-2_seed0", "rule=sign,u=0.01,seed=0,steps=400,batch=8")
PREDICTORS = ("gate", "eap", "prev_token", "popularity", "oracle")
# simulate's named policies, plus LoD moving FP16 originals (the paper's unquantised baseline).
# Sensitivity rows: "fate_topk", Fate with prefetch_k = K whatever the profile (what
# prediction buys where the formula allows no decode prefetch); "fate_uniform", Fate with
# the same number of slots spread evenly over the layers (no shallow-favoring).
POLICIES = simulate.POLICIES + ("lod_fp16", "fate_topk", "fate_uniform")
NO_BUDGET = ("lod", "lod_fp16", "all_on_device")        # the slot plan does not matter
NO_PREDICTOR = ("lod", "lod_fp16", "lod_lru", "all_on_device")
DECODE_VARIANTS = ("text", "greedy")   # teacher-forced held-out text; the engine's greedy
QUANT_MODES = {"fp32": None, "int4": "int4", "hybrid": "hybrid", "int2": "int2"}
PROFILES = ("gtx_1080_ti", "cpu")
REFERENCE = ("gtx_1080_ti", "pcie3_x16")   # the profile and link of the hit-rate curves


# ---------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class Subject:
  """A model under test and its token rows."""

  name: str
  config: moe.MoEConfig
  params: dict
  state: dict
  eval_rows: np.ndarray     # [R, prompt_len + 1] held-out rows: prompts, and perplexity targets
  continuations: np.ndarray  # [R, C] the held-out text that follows each prompt
  calib_rows: np.ndarray    # [C, prompt_len] train rows
  info: dict


def spaced(rows: np.ndarray, n: int) -> np.ndarray:
  """`n` rows evenly spaced over a split (rows are in corpus order, sources one after another)."""
  if n > len(rows):
    raise ConfigError(f"asked for {n} rows, the split has {len(rows)}")
  return rows[np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))]


def prompts_and_text(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` evenly spaced rows (prompt + the next token) and the text that follows each one:
  rows are consecutive cuts of one token stream, so row i's continuation is its last token
  and then row i + 1."""
  if n + 1 > len(rows):
    raise ConfigError(f"asked for {n} prompts, the split has {len(rows)} rows")
  idx = np.unique(np.linspace(0, len(rows) - 2, n).round().astype(int))
  return rows[idx], np.concatenate([rows[idx, -1:], rows[idx + 1]], axis=1)


def load_moe_balance(args) -> Subject:
  from configs import moe_lm  # noqa: PLC0415
  from zojax import models  # noqa: PLC0415
  from zojax.data import corpus  # noqa: PLC0415
  from zojax.data.tokenizer import smollm2_tokenizer  # noqa: PLC0415
  from zojax.generate import load_weights  # noqa: PLC0415
  from zojax.infer import generate as gen  # noqa: PLC0415
  arm, arg = MOE_BALANCE_ARM
  run_dir = pathlib.Path(args.moe_balance_root) / arm
  if not (run_dir / "checkpoints").is_dir():
    raise ConfigError(f"{run_dir} has no checkpoints: train it first with "
                      f"`python experiments/moe_balance.py --arms sign_1e-2`")
  config = moe_lm.get_config(arg)
  model = models.build(config.model, None)
  params, state = load_weights(config, model, str(run_dir))
  # The task's id map (zojax.data.tasks: the 4,095 most frequent train ids + one bucket).
  tok, task = smollm2_tokenizer(), config.task
  train = corpus.packed_sequences(tok, task.seq_len, "train", val_fraction=task.val_fraction)
  remap, _ = corpus.frequency_remap(train, tok.get_vocab_size(), task.vocab_limit)
  length = args.prompt_len or task.seq_len
  val = corpus.packed_sequences(tok, length, "validation", val_fraction=task.val_fraction)
  calib = corpus.packed_sequences(tok, length, "train", val_fraction=task.val_fraction)
  prompts, text = prompts_and_text(val, args.prompts)
  return Subject("moe_balance", gen.decoder_config(model), params, state, remap[prompts],
                 remap[text], remap[spaced(calib, args.calib_rows)][:, :-1],
                 {"run_dir": str(run_dir), "arm": arm, "config_arg": arg,
                  "trained_seq_len": task.seq_len, "vocab_limit": task.vocab_limit})


def load_smollm2_moe(args) -> Subject:
  from zojax.data import corpus  # noqa: PLC0415
  from zojax.data.tokenizer import smollm2_tokenizer  # noqa: PLC0415
  from zojax.models import moefy  # noqa: PLC0415
  config, params = moefy.load_smollm2_moe()
  tok = smollm2_tokenizer()
  length = args.prompt_len or 512
  val = corpus.packed_sequences(tok, length, "validation")
  calib = corpus.packed_sequences(tok, length, "train")
  prompts, text = prompts_and_text(val, args.prompts)
  return Subject("smollm2_moe", config, params, moe.init_state(config, jax.random.key(0)),
                 prompts, text, spaced(calib, args.calib_rows)[:, :-1],
                 {"conversion": moefy.cache_path().name})


def load_tiny(args) -> Subject:
  """moe-tiny with random weights and a random selection bias, on random tokens (--quick)."""
  config = moe.CONFIGS["moe-tiny"]
  rng = np.random.default_rng(0)
  # numpy draws at the init's shapes: nothing to compile (the smoke test stays fast).
  shapes = jax.eval_shape(lambda: moe.init(config, jax.random.key(0)))
  draw = lambda path, s: (np.ones(s.shape, s.dtype) if "norm" in jax.tree_util.keystr(path)
                         else (0.1 * rng.standard_normal(s.shape)).astype(s.dtype))
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  bias = 0.3 * rng.standard_normal((config.base.num_layers, config.num_experts))
  length = args.prompt_len or 13
  rows = lambda n, t: rng.integers(0, config.base.vocab_size, (n, t)).astype(np.int32)
  bias = bias.astype(np.float32)
  # Calibration rows as long as prompt + continuation: one prefill shape fewer to compile.
  return Subject("moe_tiny", config, params, {"bias": bias, "prev_bias": bias},
                 rows(args.prompts, length + 1), rows(args.prompts, args.decode_steps),
                 rows(args.calib_rows, length + args.decode_steps),
                 {"weights": "random"})


LOADERS = {"moe_balance": load_moe_balance, "smollm2_moe": load_smollm2_moe,
           "moe_tiny": load_tiny}


# ---------------------------------------------------------------------------------------
# Stage 2: traces, the FP32 reference, the engine checks


def nll(prefill_logits_BxTxV: np.ndarray, targets_BxT: np.ndarray) -> np.ndarray:
  """[B, T] float64 negative log-likelihood of the targets."""
  logits = np.asarray(prefill_logits_BxTxV, np.float64)
  top = logits.max(-1, keepdims=True)
  logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  return logz - np.take_along_axis(logits, targets_BxT[..., None], -1)[..., 0]


def summarize_run(out: offload.Generation, row: np.ndarray) -> dict:
  """What quality needs from one request: tokens, NLL over the prompt, prefill argmax."""
  prompt_len = row.shape[0] - 1
  return {"tokens": out.tokens[0],
          "nll": nll(out.prefill_logits[:, :prompt_len], row[None, 1:])[0],
          "argmax": out.prefill_logits[0].argmax(-1).astype(np.int32)}


def as_decode(trace: Trace, prompt_len: int) -> Trace:
  """A batch-1 prefill trace over prompt + continuation read as a prefill of the prompt and
  one decode step per continuation token: teacher-forced decoding, each step's routing from
  the real text before it (causal attention: a token's routing does not depend on later
  tokens; only float rounding differs from one-token steps)."""
  if trace.batch_size != 1:
    raise ConfigError(f"as_decode needs a batch-1 trace, got batch {trace.batch_size}")
  steps = lambda a: a[:, prompt_len:, None].transpose(1, 0, 2, 3)   # [L, S, X] -> [S, L, 1, X]
  return Trace(trace.num_experts, trace.top_k, 1, trace.prefill_experts[:, :prompt_len],
               trace.prefill_gate_rank[:, :prompt_len], trace.prefill_true_rank[:, :prompt_len],
               steps(trace.prefill_experts), steps(trace.prefill_gate_rank),
               steps(trace.prefill_true_rank), meta={"decode": "teacher-forced"})


def record(subject: Subject, workdir: pathlib.Path, decode_steps: int) -> dict:
  """FP32 (all-resident) requests and their traces, and the calibration trace; cached.

  Two decode traces per request: 'greedy' (the engine's own generation) and 'text'
  (`as_decode` over the held-out continuation). Once per request, the greedy decode routing
  is compared with a prefill over prompt + the greedy tokens (the same routing up to
  rounding: the check that `as_decode` reads a prefill as decode steps correctly)."""
  R, prompt_len = len(subject.eval_rows), subject.eval_rows.shape[1] - 1
  paths = {"calibration": workdir / "calibration_trace.npz", "fp32": workdir / "fp32.npz"}
  for i in range(R):
    paths[f"greedy{i}"] = workdir / f"eval_trace_{i}.npz"
    paths[f"text{i}"] = workdir / f"text_trace_{i}.npz"
  if not all(p.exists() for p in paths.values()):
    engine = offload.OffloadEngine(subject.config, subject.params, subject.state,
                                   resident=True, max_len=prompt_len + decode_steps + 1)
    start = time.perf_counter()
    engine.generate(subject.calib_rows, 1).trace.save(paths["calibration"])
    fp32, agree = [], []
    for i, (row, text) in enumerate(zip(subject.eval_rows, subject.continuations)):
      out = engine.generate(row[None, :-1], decode_steps + 1)
      out.trace.save(paths[f"greedy{i}"])
      fp32.append(summarize_run(out, row))
      seq = np.concatenate([row[:-1], out.tokens[0, :decode_steps]])[None]
      replayed = as_decode(engine.generate(seq, 1).trace, prompt_len)
      same = np.sort(replayed.decode_experts, -1) == np.sort(out.trace.decode_experts, -1)
      agree.append(float(same.all(-1).mean()))
      seq = np.concatenate([row[:-1], text[:decode_steps]])[None]
      as_decode(engine.generate(seq, 1).trace, prompt_len).save(paths[f"text{i}"])
    np.savez(paths["fp32"], seconds=time.perf_counter() - start, agree=np.array(agree),
             **{f"{k}_{i}": v for i, r in enumerate(fp32) for k, v in r.items()})
    cached = False
  else:
    cached = True
  with np.load(paths["fp32"]) as f:
    fp32 = [{k: f[f"{k}_{i}"] for k in ("tokens", "nll", "argmax")} for i in range(R)]
    seconds, agree = float(f["seconds"]), f["agree"].tolist()
  return {"traces": {v: [Trace.load(paths[f"{v}{i}"]) for i in range(R)]
                     for v in DECODE_VARIANTS},
          "calibration": Trace.load(paths["calibration"]), "fp32": fp32, "seconds": seconds,
          "greedy_decode_vs_prefill_routing_agreement": agree, "cached": cached}


def expert_store(subject: Subject, workdir: pathlib.Path) -> pathlib.Path:
  """The model's expert store (full, INT4, INT2) on disk, written once."""
  path = workdir / "experts"
  try:
    store_lib.open_store(path, host_formats=()).close()
  except store_lib.StoreError:
    offload.write_expert_store(path, subject.config, subject.params, overwrite=True)
  return path


def expert_bytes(store_path: pathlib.Path) -> dict:
  with store_lib.open_store(store_path, host_formats=()) as store:
    return {f: store.expert_nbytes(f) for f in store.formats}


def gate_accuracy(trace: Trace) -> np.ndarray:
  """[L] the cross-layer gate's token accuracy on a trace's prefill (its top-K vs the used)."""
  K = trace.top_k
  hit = trace.prefill_gate_rank[..., :K, None] == trace.prefill_experts[..., None, :]
  return hit.any(-1).mean((1, 2))


def auto_resident_layers(calibration: Trace) -> int:
  """Fate keeps the shallow layers the gate predicts worst fully resident: here, the first
  quarter of the layers up to the last one whose calibration gate accuracy is below 1/2
  (at least layer 0, whose gate reads only the embedding output)."""
  acc = gate_accuracy(calibration)
  shallow = np.flatnonzero(acc[:max(1, len(acc) // 4)] < 0.5)
  return int(shallow.max()) + 1 if shallow.size else 1


def fraction_plan(subject: Subject, nbytes: dict, fraction: float,
                  resident_layers: int) -> planner.Plan:
  """The planner's slots for a device budget = non-expert weights + `fraction` of all
  experts as INT4 (the format a hybrid cache slot holds)."""
  L, E = subject.config.base.num_layers, subject.config.num_experts
  fixed = offload.resident_bytes(subject.config, subject.params)
  budget = fixed + int(round(fraction * L * E)) * nbytes["int4"]
  return planner.plan(budget, fixed, nbytes["int4"], L, E, resident_layers)


def offloaded(subject: Subject, store_path, policy, calibration: Trace, max_len: int,
              host_formats=None):
  store = store_lib.open_store(store_path, host_formats=host_formats)
  engine = offload.OffloadEngine(subject.config, subject.params, subject.state, store, policy,
                                 warm=simulate.warm_lists(calibration, policy.slots),
                                 max_len=max_len)
  return engine, store


def engine_checks(subject: Subject, store_path, calibration: Trace, nbytes: dict,
                  slots, max_len: int) -> dict:
  """On a short prompt: offloaded Fate == all-resident bit for bit (quant off), and the
  engine's bytes == the simulator's on its own trace (quant off and hybrid). `max_len` as
  the other stages' engines, so the compiled pieces are shared."""
  prompt = subject.eval_rows[:1, :min(32, subject.eval_rows.shape[1] - 1)]
  new = min(8, max_len - prompt.shape[1])
  ref = offload.OffloadEngine(subject.config, subject.params, subject.state, resident=True,
                              max_len=max_len).generate(prompt, new)
  out = {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new, "slots": list(slots)}
  for quant, int2_rate in (("off", 0.0), ("hybrid", 0.25)):
    policy = simulate.policy("fate", slots=slots, num_experts=subject.config.num_experts,
                             quant=quant, int2_rate=int2_rate, prefetch_k=2)
    engine, store = offloaded(subject, store_path, policy, calibration, max_len)
    try:
      got = engine.generate(prompt, new)
      moved = engine.bytes_moved()
      pool_bytes = engine.pool.nbytes
    finally:
      store.close()
    sim = simulate.simulate(got.trace, policy, nbytes, calibration=calibration)
    counted = {"setup": sim.bytes("setup"), "calls": sim.bytes("prefill") + sim.bytes("decode")}
    out[quant] = {"engine_bytes": moved, "simulator_bytes": counted,
                  "bytes_equal": moved == counted, "pool_device_bytes": pool_bytes,
                  "slots_x_mode_format_bytes": sum(slots) * nbytes[
                      prefetch_lib.mode_format(quant)]}
    if quant == "off":
      out[quant].update(
          logits_bit_identical=(got.prefill_logits.tobytes() == ref.prefill_logits.tobytes()
                                and got.decode_logits.tobytes() == ref.decode_logits.tobytes()),
          tokens_equal=got.tokens.tolist() == ref.tokens.tolist())
  if not (out["off"]["logits_bit_identical"] and out["off"]["bytes_equal"]
          and out["hybrid"]["bytes_equal"]):
    raise AssertionError(f"engine check failed for {subject.name}: {out}")
  return out


# ---------------------------------------------------------------------------------------
# Stage 3 and 6: counters pooled over the requests


def pooled(sims: list[simulate.SimResult]) -> dict:
  """Counters summed over the requests (one trace each): rates per layer and overall, token
  accuracy, bytes per token by kind/format, warm bytes per request."""
  out = {}
  for phase in PHASES:
    counts = {f: np.sum([s.report[phase]["counts"][f] for s in sims], 0)
              for f in Counters.FIELDS}
    per_layer = lambda n, d: [None if b == 0 else float(a / b)
                              for a, b in zip(counts[n], counts[d])]
    overall = lambda n, d: None if counts[d].sum() == 0 else float(counts[n].sum() /
                                                                   counts[d].sum())
    rates = {"hit_rate_unique": ("unique_hits", "unique_needed"),
             "hit_rate_assign": ("assign_hits", "assign_needed"),
             "recall": ("predicted_needed", "needed_when_predicted"),
             "precision": ("predicted_needed", "predicted")}
    accuracy = [s.token_accuracy[phase] for s in sims]
    acc_layer = (None if accuracy[0] is None else
                 [None if any(a[l] is None for a in accuracy) else
                  float(np.mean([a[l] for a in accuracy])) for l in range(len(accuracy[0]))])
    known = [a for a in acc_layer or [] if a is not None]
    tokens = sum(s.tokens[phase] for s in sims)
    kinds: dict[str, int] = {}
    for s in sims:
      for key, v in s.report[phase]["bytes"].items():
        kinds[key] = kinds.get(key, 0) + int(sum(v))
    out[phase] = {
        "per_layer": {**{k: per_layer(*v) for k, v in rates.items()},
                      "token_accuracy": acc_layer},
        **{k: overall(*v) for k, v in rates.items()},
        "token_accuracy": float(np.mean(known)) if known else None,
        "tokens": tokens,
        "bytes_per_token": sum(kinds.values()) / max(tokens, 1),
        "bytes_per_token_by_kind": {k: v / max(tokens, 1) for k, v in sorted(kinds.items())}}
  out["warm_bytes_per_request"] = float(np.mean([s.bytes("setup") for s in sims]))
  return out


class Simulator:
  """Simulations of the requests, memoised by (policy, slots, prefetch_k)."""

  def __init__(self, subject, traces, calibration, nbytes, int2_rate):
    self.subject, self.traces, self.calibration = subject, traces, calibration
    self.nbytes, self.int2_rate = nbytes, int2_rate
    self.memo: dict = {}
    self.seconds = 0.0

  def run(self, name: str, slots, prefetch_k: int) -> list[simulate.SimResult]:
    E, L = self.subject.config.num_experts, self.subject.config.base.num_layers
    if name in NO_BUDGET:
      slots = (0,) * L
    if name in NO_PREDICTOR:
      prefetch_k = 0
    if name == "fate_topk":
      name, prefetch_k = "fate", self.subject.config.top_k
    if name == "fate_uniform":
      name, slots = "fate", planner.split_slots(sum(slots), L, E, 0)
    key = (name, tuple(slots), prefetch_k)
    if key not in self.memo:
      start = time.perf_counter()
      nbytes, quant = self.nbytes, "hybrid"
      if name == "lod_fp16":  # FP16 originals: half the store's float32 bytes
        nbytes, quant = {"full": self.nbytes["full"] // 2}, "off"
      policy = simulate.policy("lod" if name == "lod_fp16" else name, slots=slots,
                               num_experts=E, quant=quant,
                               int2_rate=self.int2_rate if quant == "hybrid" else 0.0,
                               prefetch_k=prefetch_k)
      self.memo[key] = [simulate.simulate(t, policy, nbytes, calibration=self.calibration)
                        for t in self.traces]
      self.seconds += time.perf_counter() - start
    return self.memo[key]


# ---------------------------------------------------------------------------------------
# Stage 4: compute times and the timeline


def _median_times(pieces: dict, reps: int) -> dict:
  """Median seconds of each piece, run side by side (interleaved) after one warm-up."""
  for fn in pieces.values():
    jax.block_until_ready(fn())
  seconds = {k: [] for k in pieces}
  for _ in range(reps):
    for k, fn in pieces.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in seconds.items()}


def cpu_times(subject: Subject, prompt_len: int, decode_steps: int, reps: int,
              workdir: pathlib.Path) -> dict:
  """Per-layer compute on this CPU from the engine's compiled pieces (layer 0; every layer
  has the same shapes): attention + router (`_front`), one expert on the tokens routed to
  it (`_contribution`), embedding and the LM head. A sparse MoE call costs the experts it
  uses, each on its own tokens: prefill min(E, T·K) experts on ceil(T·K / E) tokens each,
  decode K experts on one token. (The engine itself runs each needed expert over all of a
  call's tokens, masked: exact, but the dense FFN's FLOPs.)"""
  path = workdir / "cpu_times.json"
  if path.exists():
    return json.loads(path.read_text())
  engine = offload.OffloadEngine(subject.config, subject.params, subject.state, resident=True,
                                 max_len=prompt_len + decode_steps + 1)
  c, p, bias = engine.config, engine.layers[0], engine.bias[0]
  b, E, K = c.base, c.num_experts, c.top_k
  shape = (1, engine.max_len, b.num_kv_heads, b.head_dim)
  tokens = jnp.asarray(subject.eval_rows[:1, :prompt_len])
  x_pre = offload._embed(c, engine.params, tokens)
  x_dec = x_pre[:, :1]
  caches = {ph: [jnp.zeros(shape, b.dtype), jnp.zeros(shape, b.dtype)] for ph in PHASES}
  pos_pre = jnp.arange(prompt_len, dtype=jnp.int32)[None]
  pos_dec = jnp.full((1, 1), prompt_len + decode_steps // 2, jnp.int32)

  def attention(phase, x, pos):
    def run():
      out = offload._front(c, p, bias, x, *caches[phase], pos)
      caches[phase] = [out[1], out[2]]   # donated: carry the new buffers
      return out[0]
    return run

  weights = {leaf: jnp.asarray(subject.params["blocks"][name][0, 0])
             for leaf, name in offload.EXPERT_LEAVES.items()}
  facts = offload.FULL_FACTS
  per_expert = min(prompt_len * K, math.ceil(prompt_len * K / E))

  def expert(n):
    h = jnp.asarray(np.random.default_rng(n).standard_normal((n, b.dim)), b.dtype)
    y, gates = jnp.zeros_like(h), jnp.ones((E, n), jnp.float32)
    return lambda: offload._contribution(y, h, gates, np.int32(0), weights, facts)

  pieces = {"attention_prefill": attention("prefill", x_pre, pos_pre),
            "attention_decode": attention("decode", x_dec, pos_dec),
            "expert_prefill": expert(per_expert), "expert_decode": expert(1),
            "embed_prefill": lambda: offload._embed(c, engine.params, tokens),
            "embed_decode": lambda: offload._embed(c, engine.params, tokens[:, :1]),
            "head_one_token": lambda: offload._logits(c, engine.params, x_dec)}
  med = _median_times(pieces, reps)
  used_prefill = min(E, prompt_len * K)
  out = {"pieces_median_s": med, "reps": reps, "expert_prefill_tokens": per_expert,
         "decode_context": prompt_len + decode_steps // 2,
         "prefill_attn": med["attention_prefill"],
         "prefill_moe": used_prefill * med["expert_prefill"],
         "decode_attn": med["attention_decode"], "decode_moe": K * med["expert_decode"],
         "prefill_other": med["embed_prefill"] + med["head_one_token"],
         "decode_other": med["embed_decode"] + med["head_one_token"]}
  path.write_text(json.dumps(out, indent=1))
  return out


def compute_profiles(subject: Subject, cpu: dict, prompt_len: int, decode_steps: int) -> dict:
  """{profile: timeline.ComputeTimes} for the CPU and the GTX 1080 Ti roofline (FP16
  weights and KV, efficiency 1; the LM head for one token as `other`)."""
  c = subject.config
  b, L = c.base, c.base.num_layers
  shape = timeline.DecoderShape(dim=b.dim, num_heads=b.num_heads, num_kv_heads=b.num_kv_heads,
                                head_dim=b.head_dim, expert_dim=c.expert_dim,
                                num_experts=c.num_experts, top_k=c.top_k,
                                shared_expert_dim=c.expert_dim if c.shared_expert else 0)
  gpu = timeline.GTX_1080_TI
  roof = timeline.roofline_times(gpu, shape, num_layers=L, batch=1, prompt_len=prompt_len,
                                 decode_steps=decode_steps)
  head = timeline.roofline_s(gpu, 2 * b.dim * b.vocab_size, b.dim * b.vocab_size * 2)
  ones = np.ones(L)
  return {
      "gtx_1080_ti": dataclasses.replace(roof, prefill_other=head, decode_other=head),
      "cpu": timeline.ComputeTimes(cpu["prefill_attn"] * ones, cpu["prefill_moe"] * ones,
                                   cpu["decode_attn"] * ones, cpu["decode_moe"] * ones,
                                   cpu["prefill_other"], cpu["decode_other"])}


def decode_layer_s(times: timeline.ComputeTimes) -> float:
  """Mean decode time of one layer (attention + MoE) over the steps and layers."""
  return float(np.mean(np.asarray(times.decode_attn) + np.asarray(times.decode_moe)))


def profile_summary(times: timeline.ComputeTimes) -> dict:
  mean = lambda a: float(np.mean(a))
  return {"prefill_attn_s": mean(times.prefill_attn), "prefill_moe_s": mean(times.prefill_moe),
          "decode_attn_s": mean(times.decode_attn), "decode_moe_s": mean(times.decode_moe),
          "prefill_other_s": times.prefill_other, "decode_other_s": times.decode_other}


def replay_all(sims, times, bandwidth) -> dict:
  """The requests replayed one after another: tokens/s over all of them, stalls, link."""
  runs = [timeline.replay(s.calls, times, bandwidth, warm=s.warm) for s in sims]
  total = lambda f: float(sum(getattr(r, f) for r in runs))
  prefill_s, decode_s = total("prefill_s"), total("decode_s")
  return {"prefill_tokens_per_s": total("prefill_tokens") / prefill_s,
          "decode_tokens_per_s": total("decode_tokens") / decode_s,
          "prefill_stall_share": total("prefill_stall_s") / prefill_s,
          "decode_stall_share": total("decode_stall_s") / decode_s,
          "link_busy_s": total("link_busy_s"), "warm_s_per_request": total("warm_s") / len(runs)}


# ---------------------------------------------------------------------------------------
# Stage 5: quality


def quality(subject: Subject, store_path, calibration: Trace, fp32: list, slots,
            prefetch_k: int, int2_rate: float, decode_steps: int, workdir: pathlib.Path,
            nbytes: dict) -> dict:
  """Perplexity over the prompts and greedy match against FP32, per quantisation mode (one
  request at a time, the Fate policy at `slots`); cached per mode."""
  prompt_len = subject.eval_rows.shape[1] - 1
  rows = {"fp32": fp32}
  out = {}
  for mode, quant in QUANT_MODES.items():
    path = workdir / (f"quality_{mode}_slots{sum(slots)}-{slots[0]}x{slots[-1]}_k{prefetch_k}"
                      f"_int2{int2_rate:g}.npz")
    if quant is not None and not path.exists():
      policy = simulate.policy("fate", slots=slots, num_experts=subject.config.num_experts,
                               quant=quant, int2_rate=int2_rate if quant == "hybrid" else 0.0,
                               prefetch_k=prefetch_k)
      runs, bytes_equal, start = [], True, time.perf_counter()
      for row in subject.eval_rows:
        engine, store = offloaded(subject, store_path, policy, calibration,
                                  prompt_len + decode_steps + 1,
                                  host_formats=("int4", "int2"))
        try:
          got = engine.generate(row[None, :-1], decode_steps + 1)
          moved = engine.bytes_moved()
        finally:
          store.close()
        sim = simulate.simulate(got.trace, policy, nbytes, calibration=calibration)
        bytes_equal &= moved["calls"] == sim.bytes("prefill") + sim.bytes("decode")
        runs.append(summarize_run(got, row))
      np.savez(path, seconds=time.perf_counter() - start, bytes_equal=bytes_equal,
               **{f"{k}_{i}": v for i, r in enumerate(runs) for k, v in r.items()})
    if quant is not None:
      with np.load(path) as f:
        rows[mode] = [{k: f[f"{k}_{i}"] for k in ("tokens", "nll", "argmax")}
                      for i in range(len(subject.eval_rows))]
        extra = {"engine_seconds": float(f["seconds"]),
                 "engine_bytes_equal_simulator": bool(f["bytes_equal"])}
    else:
      extra = {}
    ref = rows["fp32"]
    match = [float(np.mean(r["tokens"] == q["tokens"])) for r, q in zip(ref, rows[mode])]
    first = [int(np.argmin(r["tokens"] == q["tokens"])) if (r["tokens"] != q["tokens"]).any()
             else len(r["tokens"]) for r, q in zip(ref, rows[mode])]
    out[mode] = {
        "perplexity": float(np.exp(np.mean([r["nll"] for r in rows[mode]]))),
        "greedy_match": float(np.mean(match)), "greedy_match_per_request": match,
        "first_divergence": first,
        "distinct_generated_tokens": [int(len(np.unique(q["tokens"]))) for q in rows[mode]],
        "prompt_top1_agreement": float(np.mean([np.mean(r["argmax"] == q["argmax"])
                                                for r, q in zip(ref, rows[mode])])),
        **extra}
  return out


def quality_dense_control(subject: Subject, workdir: pathlib.Path) -> dict:
  """A MoEfied model (unit gates) with all E experts active is its dense model: perplexity
  and prompt top-1 agreement of FP32 / INT4 / INT2 experts there separate the formats' own
  error from the fragility of the top-K model. Dequantised weights in the resident engine
  (the engine computes quantised experts the same way, to float rounding); cached."""
  path = workdir / "quality_dense_control.json"
  if path.exists():
    return json.loads(path.read_text())
  config = dataclasses.replace(subject.config, top_k=subject.config.num_experts)
  rows = subject.eval_rows
  engine = lambda params: offload.OffloadEngine(config, params, subject.state, resident=True,
                                                max_len=rows.shape[1])
  out, ref = {}, None
  for mode, bits in (("fp32", None), ("int4", 4), ("int2", 2)):
    blocks = dict(subject.params["blocks"])
    if bits:
      for name in offload.EXPERT_LEAVES.values():
        blocks[name] = np.asarray(quant.dequantize(quant.quantize(np.asarray(blocks[name]),
                                                                  bits=bits)))
    e = engine({**subject.params, "blocks": blocks})
    runs = [summarize_run(e.generate(row[None, :-1], 0), row) for row in rows]
    ref = ref or runs
    out[mode] = {"perplexity": float(np.exp(np.mean([r["nll"] for r in runs]))),
                 "prompt_top1_agreement": float(np.mean([np.mean(r["argmax"] == q["argmax"])
                                                         for r, q in zip(ref, runs)]))}
  path.write_text(json.dumps(out, indent=1))
  return out


def analyse(sims: Simulator, plans: dict, mid: planner.Plan, fractions, profiles: dict,
            prefetch_k: dict) -> dict:
  """Per-layer prediction (stage 3), the timeline table (4), hit rates and bytes per token
  against the cache fraction (3, 6) for one set of request traces."""
  E, K = sims.subject.config.num_experts, sims.subject.config.top_k
  prediction = {}
  for pred in PREDICTORS:   # prefetch_k = K; the cache does not change these counts
    p = pooled(sims.run("fate" if pred == "gate" else pred, mid.slots, K))
    keys = ("token_accuracy", "recall", "precision")
    prediction[pred] = {ph: {k: p[ph][k] for k in keys}
                        | {"per_layer": {k: p[ph]["per_layer"][k] for k in keys}}
                        for ph in PHASES}
  table = []
  for prof in PROFILES:
    for bw, value in timeline.BANDWIDTHS.items():
      k = prefetch_k[prof][bw]
      for frac in fractions:
        plan = plans[frac]
        row = {"profile": prof, "link": bw, "cache_fraction": frac, "prefetch_k": k,
               "slots": list(plan.slots), "budget_bytes": plan.budget_bytes,
               "cached_share": plan.cache_fraction(E), "policies": {}}
        for pol in POLICIES:
          row["policies"][pol] = replay_all(sims.run(pol, plan.slots, k), profiles[prof], value)
        fate = row["policies"]["fate"]
        row["speedup"] = {f"{phase}_over_{base}": (fate[f"{phase}_tokens_per_s"] /
                                                   row["policies"][base][f"{phase}_tokens_per_s"])
                          for base in ("lod", "lod_fp16", "eap") for phase in PHASES}
        table.append(row)
  k_ref = prefetch_k[REFERENCE[0]][REFERENCE[1]]
  curve, per_layer_mid = {pol: [] for pol in POLICIES}, {}
  for frac, plan in sorted(plans.items()):
    for pol in POLICIES:
      p = pooled(sims.run(pol, plan.slots, k_ref))
      curve[pol].append({"cache_fraction": frac, "cached_share": plan.cache_fraction(E),
                         **{ph: {k: p[ph][k] for k in (
                             "hit_rate_unique", "hit_rate_assign", "recall", "precision",
                             "bytes_per_token", "bytes_per_token_by_kind")} for ph in PHASES},
                         "warm_bytes_per_request": p["warm_bytes_per_request"]})
      if plan is mid:
        per_layer_mid[pol] = {ph: {k: p[ph]["per_layer"][k]
                                   for k in ("hit_rate_unique", "hit_rate_assign")}
                              for ph in PHASES}
  return {"prediction": prediction, "timeline": table, "hit_rate_curve": curve,
          "per_layer_hit_rate": per_layer_mid}


# ---------------------------------------------------------------------------------------
# One model


def run_model(name: str, args, workdir: pathlib.Path) -> dict:
  log = logging.getLogger("fate")
  t0 = time.perf_counter()
  subject = LOADERS[name](args)
  # Weights committed to the placement the expert store moves experts to, so the resident
  # and the offloaded engines call their compiled pieces with the same input shardings
  # (an uncommitted argument is another jit cache entry: every piece would compile twice).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
  subject.params, subject.state = jax.device_put((subject.params, subject.state), device)
  c = subject.config
  L, E, K = c.base.num_layers, c.num_experts, c.top_k
  prompt_len = subject.eval_rows.shape[1] - 1
  # Caches: the store per model; traces, CPU times and quality under the settings they
  # depend on (quality files are named by their policy as well).
  rows = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in (
      subject.eval_rows, subject.continuations, subject.calib_rows))).hexdigest()[:10]
  wd = (workdir / name / f"prompts{len(subject.eval_rows)}x{prompt_len}_decode"
        f"{args.decode_steps}_calib{len(subject.calib_rows)}_reps{args.reps}_rows{rows}")
  wd.mkdir(parents=True, exist_ok=True)
  timings = {"load_s": time.perf_counter() - t0}

  t = time.perf_counter()
  rec = record(subject, wd, args.decode_steps)
  timings["traces_s"] = time.perf_counter() - t
  calibration = rec["calibration"]
  log.info("%s: traces (%s) in %.1fs", name, "cached" if rec["cached"] else "recorded",
           timings["traces_s"])

  t = time.perf_counter()
  store_path = expert_store(subject, workdir / name)
  nbytes = expert_bytes(store_path)
  resident = (auto_resident_layers(calibration) if args.resident_layers < 0
              else args.resident_layers)
  mid = fraction_plan(subject, nbytes, args.fractions[len(args.fractions) // 2], resident)
  checks = engine_checks(subject, store_path, calibration, nbytes, mid.slots,
                         prompt_len + args.decode_steps + 1)
  timings["store_and_checks_s"] = time.perf_counter() - t

  plans = {f: fraction_plan(subject, nbytes, f, resident)
           for f in sorted(set(args.fractions) | {0.0, 1.0})}
  mid = plans[args.fractions[len(args.fractions) // 2]]

  # Stage 4a: compute times and prefetch_k per profile x link.
  t = time.perf_counter()
  cpu = cpu_times(subject, prompt_len, args.decode_steps, args.reps, wd)
  timings["cpu_times_s"] = time.perf_counter() - t
  profiles = compute_profiles(subject, cpu, prompt_len, args.decode_steps)
  prefetch_k = {prof: {bw: prefetch_lib.prefetch_k_for(decode_layer_s(times), nbytes["int4"],
                                                       value)
                       for bw, value in timeline.BANDWIDTHS.items()}
                for prof, times in profiles.items()}
  k_ref = prefetch_k[REFERENCE[0]][REFERENCE[1]]

  # Stages 3, 4b and 6 on each decode variant's traces.
  t = time.perf_counter()
  variants = {}
  for variant in DECODE_VARIANTS:
    sims = Simulator(subject, rec["traces"][variant], calibration, nbytes, args.int2_rate)
    variants[variant] = analyse(sims, plans, mid, args.fractions, profiles, prefetch_k)
    timings[f"simulate_{variant}_s"] = sims.seconds
  timings["analyses_s"] = time.perf_counter() - t

  # Stage 5: quality at the middle budget, the reference prefetch_k.
  t = time.perf_counter()
  qual = quality(subject, store_path, calibration, rec["fp32"], mid.slots, k_ref,
                 args.int2_rate, args.decode_steps, wd, nbytes)
  if c.gates == "unit":
    qual["dense_control"] = quality_dense_control(subject, wd)
  timings["quality_s"] = time.perf_counter() - t
  timings["total_s"] = time.perf_counter() - t0
  log.info("%s: done in %.1fs", name, timings["total_s"])
  return {
      "model": {"name": name, **subject.info, "num_layers": L, "num_experts": E, "top_k": K,
                "dim": c.base.dim, "expert_dim": c.expert_dim, "vocab_size": c.base.vocab_size,
                "gates": c.gates, "score": c.score,
                "selection_bias_abs_mean": float(np.abs(np.asarray(subject.state["bias"])).mean()),
                "non_expert_bytes": offload.resident_bytes(c, subject.params),
                "expert_bytes": nbytes},
      "settings": {"prompts": len(subject.eval_rows), "prompt_len": prompt_len,
                   "decode_steps": args.decode_steps,
                   "calibration_tokens": int(subject.calib_rows.size),
                   "int2_rate": args.int2_rate, "resident_layers": resident,
                   "calibration_gate_accuracy": gate_accuracy(calibration).tolist(),
                   "fractions": list(args.fractions), "quality_cache_fraction":
                   args.fractions[len(args.fractions) // 2], "reference": list(REFERENCE)},
      "engine_checks": {**checks, "greedy_decode_vs_prefill_routing_agreement":
                        rec["greedy_decode_vs_prefill_routing_agreement"]},
      "fp32_engine_seconds": rec["seconds"],
      "routing": {"calibration_expert_share_max": float(
          (calibration.expert_counts() / calibration.expert_counts().sum(1, keepdims=True))
          .max(1).mean())},
      "compute": {"cpu_measured": cpu, **{p: profile_summary(t) for p, t in profiles.items()}},
      "prefetch_k": prefetch_k, "decode_variants": variants, "quality": qual,
      "timings": timings}


# ---------------------------------------------------------------------------------------
# Output


def plot(results: dict, path: pathlib.Path) -> None:
  models = list(results["models"])
  fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.3 * len(models)), squeeze=False)
  shown = ("fate", "fate_topk", "fate_uniform", "lod_lru", "eap", "prev_token", "popularity",
           "oracle")
  for row, name in zip(axes, models):
    r = results["models"][name]["decode_variants"]["text"]
    for pol in shown:
      pts = r["hit_rate_curve"][pol]
      row[0].plot([p["cached_share"] for p in pts],
                  [p["decode"]["hit_rate_unique"] for p in pts], "o-", label=pol)
    row[0].set(xlabel="cached share of experts", ylabel="decode hit rate (unique experts)",
               title=f"{name}: decode hit rate (text, GTX/PCIe3 prefetch_k)")
    for pol, style in (("fate", "o-"), ("eap", "s-"), ("lod_lru", "^-"), ("lod", "v-"),
                       ("all_on_device", "k--")):
      for link, alpha in (("pcie3_x16", 1.0), ("pcie4_x16", 0.45)):
        pts = [t for t in r["timeline"] if t["profile"] == "gtx_1080_ti" and t["link"] == link]
        row[1].plot([t["cache_fraction"] for t in pts],
                    [t["policies"][pol]["decode_tokens_per_s"] for t in pts], style,
                    alpha=alpha, label=f"{pol} {link[:5]}")
    row[1].set(xlabel="expert cache fraction (budget)", ylabel="modelled decode tokens/s",
               yscale="log", title=f"{name}: GTX 1080 Ti roofline, text decode")
    for pred in ("gate", "eap", "prev_token", "popularity"):
      acc = r["prediction"][pred]["decode"]["per_layer"]["token_accuracy"]
      row[2].plot(range(len(acc)), [np.nan if a is None else a for a in acc], "o-", ms=3,
                  label=pred)
    row[2].set(xlabel="MoE layer", ylabel="decode token accuracy (top-K)", ylim=(0, 1.02),
               title=f"{name}: prediction per layer")
    for ax in row:
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def headline(model: dict) -> dict:
  r = {**model, **model["decode_variants"]["text"]}
  mid = r["settings"]["quality_cache_fraction"]
  row = next(t for t in r["timeline"] if (t["profile"], t["link"]) == tuple(REFERENCE)
             and t["cache_fraction"] == mid)
  fate_mid = next(p for p in r["hit_rate_curve"]["fate"] if p["cache_fraction"] == mid)
  best = lambda key: max(t["speedup"][key] for t in r["timeline"]
                         if t["profile"] == "gtx_1080_ti")
  return {"gate_token_accuracy": {ph: r["prediction"]["gate"][ph]["token_accuracy"]
                                  for ph in PHASES},
          "fate_hit_rate_unique": {ph: fate_mid[ph]["hit_rate_unique"] for ph in PHASES},
          "speedup_mid": {k: round(v, 3) for k, v in row["speedup"].items()},
          "speedup_max_gtx": {k: round(best(k), 3) for k in row["speedup"]},
          "perplexity": {m: round(r["quality"][m]["perplexity"], 3) for m in QUANT_MODES},
          "greedy_match": {m: round(r["quality"][m]["greedy_match"], 3) for m in QUANT_MODES}}


def _f(x, digits=3) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def tables(results: dict) -> str:
  """The markdown tables of docs/fate.md and BENCHMARKS.md, from a results file."""
  out = []
  for (name, model), variant in itertools.product(results["models"].items(), DECODE_VARIANTS):
    r = {**model, **model["decode_variants"][variant]}
    m, st = r["model"], r["settings"]
    out.append(f"### {name}, {variant} decode: {m['num_layers']} layers, E={m['num_experts']},"
               f" top-{m['top_k']}; {st['prompts']} requests x {st['prompt_len']} prompt "
               f"tokens + {st['decode_steps']} decode steps, batch 1\n")
    out.append("| predictor | prefill token acc. | decode token acc. (= recall = precision "
               "at K) | decode per layer, first 3 / min / max |\n| --- | --- | --- | --- |")
    for pred, v in r["prediction"].items():
      layers = [a for a in v["decode"]["per_layer"]["token_accuracy"] if a is not None]
      out.append(f"| {pred} | {_f(v['prefill']['token_accuracy'])} | "
                 f"{_f(v['decode']['token_accuracy'])} | "
                 f"{' '.join(_f(a, 2) for a in layers[:3])} / {_f(min(layers), 2)} / "
                 f"{_f(max(layers), 2)} |")
    shown = ("fate", "fate_topk", "fate_uniform", "eap", "prev_token", "popularity", "oracle",
             "lod_lru")
    out.append(f"\nHit rate per unique expert per layer call, decode (prefill in brackets), "
               f"prefetch_k = {r['prefetch_k'][REFERENCE[0]][REFERENCE[1]]} (GTX 1080 Ti, "
               f"PCIe 3.0); fate_topk: prefetch_k = K; fate_uniform: slots spread evenly\n")
    out.append("| cache fraction | " + " | ".join(shown) + " |\n| --- |" + " --- |" * len(shown))
    for i, point in enumerate(r["hit_rate_curve"]["fate"]):
      cells = [f"{_f(r['hit_rate_curve'][p][i]['decode']['hit_rate_unique'])} "
               f"({_f(r['hit_rate_curve'][p][i]['prefill']['hit_rate_unique'], 2)})"
               for p in shown]
      out.append(f"| {point['cache_fraction']:g} | " + " | ".join(cells) + " |")
    out.append("\nModelled tokens/s (two-lane timeline) and Fate's speedups (cpu: the middle "
               "budget only)\n")
    out.append("| compute | link | cache fraction | prefetch_k | Fate prefill tok/s | Fate "
               "decode tok/s | prefill x LoD / LoD-FP16 / EAP | decode x LoD / LoD-FP16 / EAP "
               "| decode, fate_topk / fate_uniform |\n| --- | --- | --- | --- | --- | --- | --- "
               "| --- | --- |")
    for t in r["timeline"]:
      if t["profile"] == "cpu" and t["cache_fraction"] != st["quality_cache_fraction"]:
        continue   # the CPU rows barely move with the budget (all rows in the JSON)
      fate, sp = t["policies"]["fate"], t["speedup"]
      out.append(
          f"| {t['profile']} | {t['link']} | {t['cache_fraction']:g} | {t['prefetch_k']} | "
          f"{fate['prefill_tokens_per_s']:.3g} | {fate['decode_tokens_per_s']:.3g} | "
          f"{sp['prefill_over_lod']:.2f} / {sp['prefill_over_lod_fp16']:.2f} / "
          f"{sp['prefill_over_eap']:.2f} | {sp['decode_over_lod']:.2f} / "
          f"{sp['decode_over_lod_fp16']:.2f} / {sp['decode_over_eap']:.2f} | "
          f"{t['policies']['fate_topk']['decode_tokens_per_s']:.3g} / "
          f"{t['policies']['fate_uniform']['decode_tokens_per_s']:.3g} |")
    out.append("\nBytes per token, Fate (kind/format); warm-up per request\n")
    out.append("| cache fraction | prefill | decode | warm-up / request |\n| --- | --- | --- "
               "| --- |")
    kinds = lambda d: ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in d.items()) or "0"
    for point in r["hit_rate_curve"]["fate"]:
      out.append(f"| {point['cache_fraction']:g} | {kinds(point['prefill']['bytes_per_token_by_kind'])}"
                 f" | {kinds(point['decode']['bytes_per_token_by_kind'])} | "
                 f"{point['warm_bytes_per_request'] / 1e6:.2f} MB |")
    lod = r["hit_rate_curve"]["lod"][0]
    out.append(f"| LoD (any) | {lod['prefill']['bytes_per_token'] / 1e3:.1f} kB | "
               f"{lod['decode']['bytes_per_token'] / 1e3:.1f} kB | 0 |\n")
    if variant != DECODE_VARIANTS[-1]:
      continue
    out.append(f"\nQuality (engine, greedy, Fate at cache fraction {st['quality_cache_fraction']:g}, "
               f"int2_rate {st['int2_rate']:g})\n")
    out.append("| experts | perplexity | greedy match vs FP32 | prompt top-1 agreement |\n"
               "| --- | --- | --- | --- |")
    for mode in QUANT_MODES:
      q = r["quality"][mode]
      out.append(f"| {mode} | {q['perplexity']:.3f} | {q['greedy_match']:.3f} | "
                 f"{q['prompt_top1_agreement']:.3f} |")
    if "dense_control" in r["quality"]:
      out.append("\nControl: all E experts active (= the dense model), prompt positions\n")
      out.append("| experts | perplexity | prompt top-1 agreement |\n| --- | --- | --- |")
      for mode, q in r["quality"]["dense_control"].items():
        out.append(f"| {mode} | {q['perplexity']:.3f} | {q['prompt_top1_agreement']:.3f} |")
    out.append("")
  return "\n".join(out)


def claims_table(results: dict) -> str:
  """The paper's published claims beside ours (text decode; GTX 1080 Ti rows; maxima over
  the budgets and links swept, as the paper's "up to")."""
  models = list(results["models"])
  rows = {"prefetch accuracy (gate, decode top-K token accuracy; greedy in brackets)": "≈97%",
          "decode hit rate, up to (budgets < all)": "up to 99%",
          "prefill speedup over LoD (INT4 LoD / FP16 LoD)": "up to 4.5x",
          "decode speedup over LoD (INT4 LoD / FP16 LoD)": "up to 4.1x",
          "prefill speedup over EAP": "up to 1.9x", "decode speedup over EAP": "up to 2.2x",
          "perplexity FP32 -> hybrid (int2_rate)": "maintained"}
  cells = {k: [] for k in rows}
  for name in models:
    model = results["models"][name]
    text, greedy = (model["decode_variants"][v] for v in ("text", "greedy"))
    gtx = [t for t in text["timeline"] if t["profile"] == "gtx_1080_ti"]
    best = lambda key: max(t["speedup"][key] for t in gtx)
    hits = [p["decode"]["hit_rate_unique"] for p in text["hit_rate_curve"]["fate"]
            if p["cache_fraction"] < 1]
    q, st = model["quality"], model["settings"]
    acc = lambda r: r["prediction"]["gate"]["decode"]["token_accuracy"]
    values = [f"{acc(text):.3f} ({acc(greedy):.3f})", f"{max(hits):.3f}",
              f"{best('prefill_over_lod'):.2f}x / {best('prefill_over_lod_fp16'):.2f}x",
              f"{best('decode_over_lod'):.2f}x / {best('decode_over_lod_fp16'):.2f}x",
              f"{best('prefill_over_eap'):.2f}x", f"{best('decode_over_eap'):.2f}x",
              f"{q['fp32']['perplexity']:.1f} -> {q['hybrid']['perplexity']:.1f} "
              f"({st['int2_rate']:g})"]
    for key, v in zip(rows, values):
      cells[key].append(v)
  out = ["| claim | paper (Qwen1.5-MoE, DeepSeek-MoE, edge GPUs) | " + " | ".join(models)
         + " |", "| --- | --- |" + " --- |" * len(models)]
  out += [f"| {k} | {paper} | " + " | ".join(cells[k]) + " |" for k, paper in rows.items()]
  return "\n".join(out)


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--quick", action="store_true", help="moe-tiny, random weights: seconds")
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=0,
                 help="0: 512 for SmolLM2, the trained 128 for moe_balance")
  p.add_argument("--decode_steps", type=int, default=128)
  p.add_argument("--calib_rows", type=int, default=8)
  p.add_argument("--int2_rate", type=float, default=0.25)
  p.add_argument("--resident_layers", type=int, default=-1,
                 help="-1: auto_resident_layers on the calibration trace")
  p.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75])
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--moe_balance_root", default="runs/moe_balance")
  p.add_argument("--workdir", default=None, help="default runs/fate_offload[_quick]")
  p.add_argument("--out", default=None)
  p.add_argument("--table", action="store_true", help="print the results file's tables")
  args = p.parse_args(argv)
  if args.quick:
    args.models = ["moe_tiny"]
    args.prompts, args.calib_rows, args.decode_steps = 1, 1, 3
    args.fractions, args.reps = [0.25, 0.5], 2
  suffix = "_quick" if args.quick else ""
  args.workdir = pathlib.Path(args.workdir or f"runs/fate_offload{suffix}")
  args.out = pathlib.Path(args.out or RESULTS / f"fate_offload{suffix}.json")
  prefetch_lib.check_int2_rate(args.int2_rate)
  if sorted(args.fractions) != list(args.fractions) or not all(0 < f < 1 for f in args.fractions):
    raise ConfigError(f"--fractions {args.fractions} must be increasing, in (0, 1)")
  return args


def main(argv=None) -> dict:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  args = parse(argv)
  if args.table:
    results = json.loads(args.out.read_text())
    print(claims_table(results) + "\n\n" + tables(results))
    return {}
  started = time.perf_counter()
  try:
    models = {name: run_model(name, args, args.workdir) for name in args.models}
  except (ConfigError, fetch.AssetError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    raise SystemExit(2) from None
  # Keep other models' results from an earlier run of the full script.
  previous = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
  results = {"issue": 12, "commit": git_commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
             "bandwidths": timeline.BANDWIDTHS,
             "edge_gpu": dataclasses.asdict(timeline.GTX_1080_TI),
             "wall_s": time.perf_counter() - started,
             "models": {**{k: v for k, v in previous.items() if k not in models}, **models}}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(results, indent=1) + "\n")
  plot(results, args.out.with_suffix(".png"))
  print(json.dumps({name: headline(r) for name, r in results["models"].items()}))
  return results


if __name__ == "__main__":
  main()
