"""Every GPU claim in the README, measured in one prepared run (at most 8 minutes on an H200).

On the GPU machine, from the repository root (zojax is not installed there):

  bash experiments/gpu_wheels.sh                 # beforehand, where PyPI is reachable
  PYTHONPATH=. python experiments/gpu_check.py   # ~7 min; --budget_s, --only tests,stream

`gpu_wheels.sh` unpacks the few pure-Python packages the GPU machine lacks (gguf, which the
model registry imports, and ml_collections) into `.gpu_site/`, which this script puts on the
path; copy that folder along. Nothing is downloaded at run time, and no weights are needed:
every model runs on random weights at its real shapes.

Measurements, in this order, each in a subprocess of its own (a crash, an out-of-memory abort
or a hang loses that one only) with a time limit, under one global time budget that divides
what is left among the measurements still to run:

  tests       the `gpu`-marked tests (compiled Pallas attention and projection, the
              streamed step's host/device bytes, any kernel marked later), found by their
              marker and run with pytest.
  attention   causal flash attention forward + backward, bf16, head_dim 128 and 64, sequence
              2k / 8k / 16k (16k tokens a batch, 2048 model width): the zojax Pallas kernel
              against `jax.nn.dot_product_attention` with implementation "cudnn" and "xla";
              median seconds, speedups (target: >= 1.0x cuDNN) and the kernel's largest
              relative difference from cuDNN's output and gradients.
  projection  the GaLore projection kernel against plain jnp (`*_reference`) at LLaMA-1B's
              block shapes (24 stacked layers; 2048x2048, 2048x5461, 5461x2048), rank 512:
              project and project_back(+add), and which one "auto" picks.
  zo_step     `zo_step_over_two_forwards` for both directions of z at the SmolLM2-135M and
              LLaMA-1B shapes (experiments/bench_zo.py's functions: classification batch
              16 x 64, fp32), with the estimate's peak memory against the forward's.
  stream      the streamed ZO2 step (`zo.engine=stream`, all blocks in pinned host memory)
              against the same engine with every block resident, LLaMA-1B, a compute-bound
              batch (32 x 512 tokens): median step seconds, device and host bytes from
              `memory_analysis()`, and whether the transfers are hidden (streamed <= 1.1x
              resident).
  fate        what the offloaded-MoE timeline (zojax.infer.timeline) needs from a device:
              pinned-host -> device bandwidth (one INT4 expert, one full expert, 64 MiB) and
              the engine's per-layer pieces at the MoEfied SmolLM2-135M shape (attention +
              router for a 512-token prefill and one decode token, one expert in full
              precision and INT4).

`--smoke` runs all of it on CPU at tiny shapes (the Pallas kernels in their interpreter;
cuDNN absent, recorded as an error), so the script cannot rot before a GPU appears;
tests/experiments/test_gpu_check.py runs it in CI. Writes experiments/results/gpu_check.json
(smoke: gpu_check_smoke.json) after every measurement, prints a summary table of the claims
and a final one-line JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = ROOT / ".gpu_site"  # experiments/gpu_wheels.sh unpacks the missing packages here
for _path in (ROOT, ROOT / "experiments"):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))
if SITE.is_dir() and str(SITE) not in sys.path:
  sys.path.append(str(SITE))  # after the machine's own packages: it only fills gaps

RESULTS = ROOT / "experiments" / "results"
MEASUREMENTS = ("tests", "attention", "projection", "zo_step", "stream", "fate")
# Shares of the time left, in order: measurement i may use left * SHARE[i] / sum(SHARE[i:]).
SHARE = {"tests": 0.2, "attention": 0.26, "projection": 0.08, "zo_step": 0.18, "stream": 0.2,
         "fate": 0.08}
DIRECTION = "rademacher"  # of the streamed comparison: the configs' default direction
MIN_START_S = 15          # a measurement is not started with less than this left


def _now() -> float:
  return time.time()


def _error(e: BaseException) -> str:
  lines = str(e).strip().splitlines() or [""]
  return f"{type(e).__name__}: {lines[0][:300]}"


def _median_seconds(fn, *args, reps: int) -> float:
  """Median wall time of `fn(*args)` over `reps` calls after a warm-up call."""
  import bench_kernels  # noqa: PLC0415  (experiments/ is on the path)
  return bench_kernels.median_seconds(fn, *args, reps=reps)


def _device() -> dict:
  import jax  # noqa: PLC0415
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "jax_version": jax.__version__}


# ---------------------------------------------------------------------------------------
# tests (run from the parent: pytest is its own process already)


def gpu_test_files() -> list[str]:
  """Test files with a `gpu` marker (a kernel test added later is found the same way)."""
  files = [p for p in sorted((ROOT / "tests").rglob("test_*.py"))
           if "mark.gpu" in p.read_text(errors="replace")]
  return [str(p.relative_to(ROOT)) for p in files]


def run_tests(limit_s: float, smoke: bool, workdir: pathlib.Path) -> dict:
  """pytest -m gpu over `gpu_test_files()`: counts, and each failure's first line."""
  files = gpu_test_files()
  junit = workdir / "gpu_tests.xml"
  env = _child_env()
  if not smoke and not env.get("JAX_PLATFORMS"):
    env["JAX_PLATFORMS"] = ""  # tests/conftest.py defaults to cpu when the variable is unset
  cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         f"--junitxml={junit}", *files]
  out = {"files": files, "command": " ".join(cmd[2:])}
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=limit_s)
    out["returncode"] = proc.returncode
    out["tail"] = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
  except subprocess.TimeoutExpired:
    out["status"] = "timeout"
  if junit.exists():
    cases = ET.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
      name = f"{case.get('classname')}::{case.get('name')}"
      bad = case.find("failure") if case.find("failure") is not None else case.find("error")
      if bad is not None:
        counts["failed"] += 1
        failures.append(f"{name}: {(bad.get('message') or '').splitlines()[0][:200]}")
      elif case.find("skipped") is not None:
        counts["skipped"] += 1
      else:
        counts["passed"] += 1
    out.update(counts, failures=failures)
  out.setdefault("status", "ok" if out.get("returncode") in (0, 5) else "failed")
  return out


# ---------------------------------------------------------------------------------------
# attention


def _attention_fns():
  import jax  # noqa: PLC0415
  from zojax.kernels import attention as attn  # noqa: PLC0415

  def with_vjp(forward):
    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(forward, q, k, v)
      return (out, *vjp(do))
    return jax.jit(fwd_bwd)

  sdpa = lambda impl: lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=impl)
  return {"zojax_pallas": with_vjp(functools.partial(attn.flash_attention, causal=True)),
          "cudnn": with_vjp(sdpa("cudnn")), "xla": with_vjp(sdpa("xla"))}


def attention_row(head_dim: int, seq_len: int, *, tokens: int, width: int, reps: int) -> dict:
  """Forward + backward of causal bf16 attention by each implementation, and their agreement."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  batch, heads = max(1, tokens // seq_len), max(1, width // head_dim)
  shape = (batch, seq_len, heads, head_dim)
  keys = jax.random.split(jax.random.key(seq_len + head_dim), 4)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
                 for key in keys)
  row = {"head_dim": head_dim, "seq_len": seq_len, "batch": batch, "heads": heads}
  outputs = {}
  for name, fn in _attention_fns().items():
    try:
      t0 = time.perf_counter()
      outputs[name] = jax.block_until_ready(fn(q, k, v, do))  # compiles
      row[f"{name}_first_call_seconds"] = time.perf_counter() - t0
      row[f"{name}_seconds"] = _median_seconds(fn, q, k, v, do, reps=reps)
    except Exception as e:  # noqa: BLE001 - recorded; the other implementations still run
      row[f"{name}_error"] = _error(e)
  if "zojax_pallas_seconds" in row:
    for ref in ("cudnn", "xla"):
      if f"{ref}_seconds" in row:
        row[f"pallas_speedup_vs_{ref}"] = row[f"{ref}_seconds"] / row["zojax_pallas_seconds"]
  ref = "cudnn" if "cudnn" in outputs else "xla"
  if "zojax_pallas" in outputs and ref in outputs:
    diffs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                   / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
             for a, b in zip(outputs["zojax_pallas"], outputs[ref])]
    row[f"pallas_max_rel_diff_vs_{ref}"] = dict(zip(("out", "dq", "dk", "dv"), diffs))
  return row


def measure_attention(smoke: bool, deadline: float, record) -> dict:
  seq_lens = (64,) if smoke else (2048, 8192, 16384)
  tokens, width, reps = (64, 128, 1) if smoke else (16384, 2048, 10)
  rows = []
  for head_dim in (128, 64):
    for seq_len in seq_lens:
      if _now() > deadline - 20:
        rows.append({"head_dim": head_dim, "seq_len": seq_len, "skipped": "time budget"})
        continue
      rows.append(attention_row(head_dim, seq_len, tokens=tokens, width=width, reps=reps))
      record({"rows": rows})
  return {"rows": rows}


# ---------------------------------------------------------------------------------------
# projection


def projection_row(m: int, n: int, side: str, rank: int, layers: int, reps: int) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from zojax.kernels import projection as proj  # noqa: PLC0415
  kg, kp, kn = jax.random.split(jax.random.key(m * 7 + n), 3)
  g = jax.random.normal(kg, (layers, m, n), jnp.float32)
  p = jax.random.normal(kp, (layers, m if side == "left" else n, rank), jnp.float32)
  low = jax.random.normal(kn, (layers, rank, n) if side == "left" else (layers, m, rank),
                          jnp.float32)
  row = {"layers": layers, "m": m, "n": n, "side": side, "rank": rank,
         "auto_picks": proj._resolve("auto", (m, n), rank)}
  cases = {
      "project": (lambda impl: jax.jit(functools.partial(proj.project, side=side,
                                                         implementation=impl)),
                  jax.jit(functools.partial(proj.project_reference, side=side)), (g, p)),
      "project_back_add": (
          lambda impl: jax.jit(lambda low, p, a: proj.project_back(
              low, p, side, 0.25, add_to=a, implementation=impl)),
          jax.jit(lambda low, p, a: proj.project_back_reference(low, p, side, 0.25, add_to=a)),
          (low, p, g)),
  }
  for name, (kernel, plain, args) in cases.items():
    try:
      fast = kernel("pallas")
      got, want = jax.block_until_ready(fast(*args)), jax.block_until_ready(plain(*args))
      row[f"{name}_max_rel_diff"] = float(jnp.max(jnp.abs(got - want))
                                          / jnp.max(jnp.abs(want)))
      row[f"{name}_pallas_seconds"] = _median_seconds(fast, *args, reps=reps)
      row[f"{name}_jnp_seconds"] = _median_seconds(plain, *args, reps=reps)
      row[f"{name}_speedup_vs_jnp"] = row[f"{name}_jnp_seconds"] / row[f"{name}_pallas_seconds"]
    except Exception as e:  # noqa: BLE001
      row[f"{name}_error"] = _error(e)
  return row


def measure_projection(smoke: bool, deadline: float, record) -> dict:
  if smoke:
    shapes, rank, layers, reps = [(32, 48, "left"), (48, 32, "right")], 16, 2, 1
  else:  # LLaMA-1B (GaLore paper): attention 2048x2048, MLP 2048x5461 / 5461x2048
    shapes, rank, layers, reps = [(2048, 2048, "left"), (2048, 5461, "left"),
                                  (5461, 2048, "right")], 512, 24, 10
  rows = []
  for m, n, side in shapes:
    if _now() > deadline - 10:
      rows.append({"m": m, "n": n, "skipped": "time budget"})
      continue
    rows.append(projection_row(m, n, side, rank, layers, reps))
    record({"rows": rows})
  return {"rows": rows}


# ---------------------------------------------------------------------------------------
# ZO step


def measure_zo_step(smoke: bool, deadline: float, record) -> dict:
  import jax  # noqa: PLC0415
  import bench_zo  # noqa: PLC0415  (experiments/ is on the path)
  from zojax.models import llama  # noqa: PLC0415
  models = ("tiny",) if smoke else ("smollm2-135m", "galore-1b")
  batch_size, seq_len, reps = (4, 16, 1) if smoke else (16, 64, 10)
  # Smoke: one direction (the glue is direction-free; each one is two more compiles).
  directions = ("rademacher",) if smoke else bench_zo.DIRECTIONS
  rows = {}
  for name in models:
    if _now() > deadline - 30:
      rows[name] = {"skipped": "time budget"}
      continue
    config = llama.CONFIGS[name]
    params = jax.jit(functools.partial(llama.init, config))(jax.random.key(0))
    batch = bench_zo.classification_batch(config, batch_size, seq_len)
    t0 = time.perf_counter()
    steps, compiled, _ = bench_zo.compile_directions(config, params, batch, adamw=False,
                                                     fused=False, directions=directions)
    compile_seconds = time.perf_counter() - t0
    mem = {d: bench_zo.memory_report(c, bench_zo.tree_bytes(params)) for d, c in compiled.items()}
    timing = bench_zo.time_zo_vs_forwards(compiled, steps, params, batch, jax.random.key(0),
                                          reps=reps, warmup=1, noise_pass=not smoke)
    rows[name] = {
        "batch": [batch_size, seq_len], "compile_seconds": compile_seconds,
        "zo_step_over_two_forwards": timing["zo_step_over_two_forwards"],
        "zo_estimate_over_two_forwards": timing["zo_estimate_over_two_forwards"],
        "two_forwards_seconds": timing["two_forwards_seconds"],
        "seconds": {d: timing[d] for d in compiled},
        "zo_peak_over_forward_peak": {d: m["zo_peak_over_forward_peak"] for d, m in mem.items()},
        "forward_peak_bytes": mem[next(iter(mem))]["forward_peak_bytes"],
        "zo_estimate_peak_bytes": {d: m["zo_estimate_peak_bytes"] for d, m in mem.items()},
        "zo_update_peak_bytes": {d: m["zo_update_peak_bytes"] for d, m in mem.items()},
        "params_bytes": bench_zo.tree_bytes(params),
    }
    del params, compiled, steps
    record({"models": rows})
  return {"models": rows}


# ---------------------------------------------------------------------------------------
# Streamed ZO2 against resident


def _analysis(compiled) -> dict:
  a = compiled.memory_analysis()
  names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
           "alias_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
           "host_temp_size_in_bytes", "host_alias_size_in_bytes")
  return {name: int(getattr(a, name)) for name in names if hasattr(a, name)}


def _aot_stepper(engine, state, batch):
  """`StreamEngine.step` with its block program compiled ahead of time, once.

  `engine.compile` gives the executable `memory_analysis` reads; calling the jitted step as
  well would compile the same program a second time (JAX's jit cache does not see AOT
  executables), so the step here runs that executable, then the embed/head update, as
  `StreamEngine.step` does.
  """
  import jax  # noqa: PLC0415
  from zojax.zo import stream  # noqa: PLC0415
  compiled = engine.compile(state, batch)
  outer = jax.jit(functools.partial(stream.update_outer, engine.config), donate_argnums=(0, 1))

  def step(state):
    device = state._replace(blocks=None, blocks_opt=None)  # host blocks: not donated
    state, out = compiled(device, (state.blocks, state.blocks_opt), batch)
    new_outer, new_opt = outer(state.outer, state.outer_opt, state.pending)
    return state._replace(outer=new_outer, outer_opt=new_opt), out
  return compiled, step


def measure_stream(smoke: bool, deadline: float, record) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from zojax import optim  # noqa: PLC0415
  from zojax.models import llama  # noqa: PLC0415
  from zojax.zo import inspect, stream  # noqa: PLC0415
  name = "tiny" if smoke else "galore-1b"
  batch_size, seq_len, reps = (4, 16, 1) if smoke else (32, 512, 5)
  cfg = llama.CONFIGS[name]
  key = jax.random.key(0)
  params = jax.jit(functools.partial(llama.init, cfg))(key)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, seq_len))
  batch = {"tokens": jnp.asarray(tokens, jnp.int32),
           "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32)}
  out = {"model": name, "batch": [batch_size, seq_len], "direction": DIRECTION}
  for placement, resident in (("resident", cfg.num_layers), ("streamed", 0)):
    if _now() > deadline - 30:
      out[placement] = {"skipped": "time budget"}
      continue
    try:
      engine = stream.StreamEngine(llama.make(cfg), optim.zo_sgd(1e-6), eps=1e-3,
                                   resident_blocks=resident, direction=DIRECTION)
      state = engine.init(params, key)
      t0 = time.perf_counter()
      compiled, step = _aot_stepper(engine, state, batch)
      row = {"resident_blocks": resident, "compile_seconds": time.perf_counter() - t0,
             "memory_analysis": _analysis(compiled), **inspect.device_bytes(compiled)}
      del compiled
      state, _ = step(state)  # warm-up (compiles the small embed/head update)
      jax.block_until_ready(state)
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        state, step_out = step(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
      row.update(step_seconds=statistics.median(times), reps=times,
                 loss=float(step_out["loss"]))
      out[placement] = row
      del state, engine, step
    except Exception as e:  # noqa: BLE001
      out[placement] = {"error": _error(e)}
    record(out)
  both = [out.get(p, {}).get("step_seconds") for p in ("streamed", "resident")]
  if None not in both:
    out["streamed_over_resident"] = both[0] / both[1]
  return out


# ---------------------------------------------------------------------------------------
# Offloaded MoE inference: the link and the layer times the Fate timeline needs


def _h2d_seconds(jax, nbytes: int, reps: int) -> float:
  """Median seconds to move `nbytes` from pinned host memory to the device."""
  import numpy as np  # noqa: PLC0415
  device = jax.devices()[0]
  host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  on_device = host.with_memory_kind("device")
  on_host = jax.device_put(np.ones(nbytes // 4, np.float32), host)
  on_host.block_until_ready()
  put = lambda: jax.device_put(on_host, on_device).block_until_ready()
  return _median_seconds(put, reps=reps)


def measure_fate(smoke: bool, deadline: float, record) -> dict:
  """Pinned-host -> device bandwidth (one INT4 expert, one full expert, 64 MiB) and the
  offloaded engine's per-layer pieces at the MoEfied SmolLM2-135M shape (D 576, 9 heads,
  16 experts of 96, top-4; random weights): attention + router for a 512-token prefill and
  one decode token, and one expert's gate x SwiGLU in full precision and INT4."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from zojax.infer import offload, quant  # noqa: PLC0415
  from zojax.models import moe  # noqa: PLC0415
  if smoke:
    config, prompt, reps = moe.CONFIGS["moe-tiny"], 16, 2
  else:
    from zojax.models import llama  # noqa: PLC0415
    base = dataclasses.replace(llama.CONFIGS["smollm2-135m"], num_layers=1)
    config, prompt, reps = moe.MoEConfig(base, num_experts=16, top_k=4, expert_dim=96,
                                         gates="unit"), 512, 20
  params = moe.init(config, jax.random.key(0))
  one = jax.tree.map(lambda x: x[0], params["blocks"])
  expert = {leaf: params["blocks"][name][0, 0] for leaf, name in offload.EXPERT_LEAVES.items()}
  int4 = {leaf: quant.quantize(np.asarray(w), bits=4) for leaf, w in expert.items()}
  sizes = {"expert_full": sum(x.nbytes for x in expert.values()),
           "expert_int4": sum(quant.nbytes(q) for q in int4.values()),
           "bulk_64MiB": 64 << 20}
  out = {"shape": {"dim": config.base.dim, "experts": config.num_experts,
                   "expert_dim": config.expert_dim, "top_k": config.top_k, "prompt": prompt}}
  link = {}
  for name, nbytes in sizes.items():
    if _now() > deadline - 20:
      link[name] = {"skipped": "time budget"}
      continue
    seconds = _h2d_seconds(jax, nbytes, reps)
    link[name] = {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds}
    record({**out, "pinned_to_device": link})
  out["pinned_to_device"] = link
  b = config.base
  layer = {}
  bias = jnp.zeros((config.num_experts,), jnp.float32)
  for phase, tokens in (("prefill", prompt), ("decode", 1)):
    if _now() > deadline - 30:
      layer[phase] = {"skipped": "time budget"}
      continue
    cache = jnp.zeros((1, prompt + 8, b.num_kv_heads, b.head_dim), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, tokens, b.dim), jnp.float32)
    pos = jnp.arange(tokens, dtype=jnp.int32)[None] + (0 if phase == "prefill" else prompt)

    def front(x=x, pos=pos):
      # The cache is donated by the engine's step: a fresh one per call.
      k, v = jnp.copy(cache), jnp.copy(cache)
      return jax.block_until_ready(offload._front(config, one, bias, x, k, v, pos))

    front()
    h = front()[3]
    gates = jnp.ones((config.num_experts, tokens), jnp.float32)
    y = jnp.zeros(h.shape, jnp.float32)
    row = {"attention_router_s": _median_seconds(front, reps=reps)}
    for fmt, weights, facts in (
        ("full", expert, offload.FULL_FACTS),
        ("int4", {k: {"packed": q.packed, "scale": q.scale, "zero": q.zero}
                  for k, q in int4.items()},
         tuple(sorted((k, tuple(sorted({"bits": q.bits, "group": q.group, "k": q.k,
                                         "n": q.n}.items()))) for k, q in int4.items())))):
      weights = jax.device_put(weights)
      run = lambda: jax.block_until_ready(
          offload._contribution(y, h, gates, np.int32(0), weights, facts))
      row[f"expert_{fmt}_s"] = _median_seconds(run, reps=reps)
    # The MoE of one layer call: the experts the call touches (all E in a long prefill).
    touched = config.num_experts if phase == "prefill" else config.top_k
    row["moe_full_s"] = touched * row["expert_full_s"]
    layer[phase] = row
    record({**out, "layer_seconds": layer})
  out["layer_seconds"] = layer
  return out


MEASURE = {"attention": measure_attention, "projection": measure_projection,
           "zo_step": measure_zo_step, "stream": measure_stream, "fate": measure_fate}


# ---------------------------------------------------------------------------------------
# Orchestration


def _child_env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
                                      + ([str(SITE)] if SITE.is_dir() else []))
  return env


def _write(path: pathlib.Path, record: dict) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
  tmp.replace(path)


def run_child(name: str, deadline: float, smoke: bool, part: pathlib.Path) -> None:
  """The body of `--one NAME`: one measurement, its record rewritten as it grows."""
  def record(partial: dict) -> None:
    _write(part, {"device": device, **partial})
  device = {}
  try:
    device = _device()
    record({})
    result = MEASURE[name](smoke, deadline, record)
    record({**result, "status": "ok"})
  except Exception as e:  # noqa: BLE001 - the parent reads the record and the error
    previous = json.loads(part.read_text()) if part.exists() else {}
    record({**previous, "status": "error", "error": _error(e),
            "traceback": traceback.format_exc()[-2000:]})


def run_isolated(name: str, limit_s: float, smoke: bool, workdir: pathlib.Path) -> dict:
  """`name` in a subprocess killed after `limit_s`; what it recorded comes back either way."""
  part = workdir / f"{name}.json"
  part.unlink(missing_ok=True)
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one", name,
         "--deadline", str(_now() + limit_s), "--part", str(part)] + (["--smoke"] if smoke else [])
  status, stderr = None, ""
  try:
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True,
                          timeout=limit_s + 10)
    stderr = proc.stderr
    if proc.returncode:
      status = f"crashed (exit {proc.returncode})"
  except subprocess.TimeoutExpired as e:
    status = "timeout"
    stderr = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (
        e.stderr or "")
  out = json.loads(part.read_text()) if part.exists() else {}
  if status:
    out["status"] = status
    out["stderr_tail"] = stderr.strip().splitlines()[-5:]
  return out


def run_inline(name: str, limit_s: float, smoke: bool) -> dict:
  """`name` in this process (smoke tests): no isolation, no kill, the same record."""
  out = {"device": _device()}
  try:
    out.update(MEASURE[name](smoke, _now() + limit_s, lambda partial: None), status="ok")
  except Exception as e:  # noqa: BLE001
    out.update(status="error", error=_error(e))
  return out


def _versions() -> dict:
  out = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def claims(results: dict) -> list[dict]:
  """The README's GPU claims as rows: what was measured, the target, whether it was met."""
  rows, m = [], results["measurements"]

  def add(claim, value, target, met):
    rows.append({"claim": claim, "value": value, "target": target, "met": met})

  t = m.get("tests", {})
  if "passed" in t:  # all skipped (no GPU): nothing was shown either way
    add("gpu-marked tests pass", f"{t['passed']} passed, {t['failed']} failed, "
        f"{t['skipped']} skipped", "all pass",
        False if t["failed"] else (True if t["passed"] else None))
  for r in m.get("attention", {}).get("rows", []):
    where = f"flash fwd+bwd D={r['head_dim']} T={r['seq_len']}"
    if "pallas_speedup_vs_cudnn" in r:
      add(f"{where} vs cuDNN", round(r["pallas_speedup_vs_cudnn"], 3), ">= 1.0",
          r["pallas_speedup_vs_cudnn"] >= 1.0)
    else:
      add(f"{where} vs cuDNN", r.get("skipped") or r.get("cudnn_error")
          or r.get("zojax_pallas_error"), ">= 1.0", None)
  for r in m.get("projection", {}).get("rows", []):
    for op in ("project", "project_back_add"):
      if f"{op}_speedup_vs_jnp" in r:
        add(f"projection {op} {r['m']}x{r['n']} r{r['rank']} vs jnp",
            round(r[f"{op}_speedup_vs_jnp"], 3), ">= 1.0", r[f"{op}_speedup_vs_jnp"] >= 1.0)
  for model, r in m.get("zo_step", {}).get("models", {}).items():
    for d, ratio in r.get("zo_step_over_two_forwards", {}).items():
      add(f"ZO step / two forwards, {model}, {d}", round(ratio, 3), "<= 1.15", ratio <= 1.15)
  s = m.get("stream", {})
  if "streamed_over_resident" in s:
    ratio = s["streamed_over_resident"]
    add(f"streamed / resident step, {s['model']} {s['batch']}", round(ratio, 3), "<= 1.1",
        ratio <= 1.1)
    add("streamed device bytes / resident", round(
        s["streamed"]["device_bytes"] / s["resident"]["device_bytes"], 3), "< 1",
        s["streamed"]["device_bytes"] < s["resident"]["device_bytes"])
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
  parser.add_argument("--budget_s", type=float, default=450.0,
                      help="global time budget (default 450 s: fits 8 minutes with start-up)")
  parser.add_argument("--only", default=",".join(MEASUREMENTS),
                      help=f"comma-separated subset of {','.join(MEASUREMENTS)}")
  parser.add_argument("--inline", action="store_true",
                      help="run measurements in this process (no isolation; for quick tests)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--one", choices=sorted(MEASURE), help=argparse.SUPPRESS)
  parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
  parser.add_argument("--part", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    run_child(args.one, args.deadline, args.smoke, pathlib.Path(args.part))
    return {}
  only = [name.strip() for name in args.only.split(",") if name.strip()]
  bad = sorted(set(only) - set(MEASUREMENTS))
  if bad:
    parser.error(f"--only: {bad} not among {list(MEASUREMENTS)}")
  out = pathlib.Path(args.out or RESULTS / f"gpu_check{'_smoke' if args.smoke else ''}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  workdir = out.parent / f".{out.stem}_parts"
  workdir.mkdir(exist_ok=True)
  start = _now()
  deadline = start + args.budget_s
  results = {"mode": "smoke" if args.smoke else "full", "budget_s": args.budget_s,
             "versions": _versions(), "measurements": {}}
  todo = [name for name in MEASUREMENTS if name in only]
  for i, name in enumerate(todo):
    left = deadline - _now()
    if left < MIN_START_S:
      results["measurements"][name] = {"status": "skipped", "why": "global time budget spent"}
      continue
    limit = left * SHARE[name] / sum(SHARE[n] for n in todo[i:])
    t0 = _now()
    if name == "tests":
      result = run_tests(limit, args.smoke, workdir)
    elif args.inline:
      result = run_inline(name, limit, args.smoke)
    else:
      result = run_isolated(name, limit, args.smoke, workdir)
    result.update(limit_s=round(limit, 1), seconds=round(_now() - t0, 1))
    results["device"] = results.get("device") or result.get("device")
    results["measurements"][name] = result
    results["seconds"] = round(_now() - start, 1)
    _write(out, results)
  results["claims"] = claims(results)
  results["seconds"] = round(_now() - start, 1)
  _write(out, results)

  print(f"\ngpu_check ({results['mode']}) on {results.get('device')}, "
        f"{results['seconds']} s of {args.budget_s:.0f}")
  for name, r in results["measurements"].items():
    print(f"  {name:11s} {r.get('status', '?'):22s} {r.get('seconds', 0):7.1f} s  "
          f"{r.get('error', '') or ' '.join(r.get('stderr_tail', [])[-1:])}")
  for row in results["claims"]:
    met = {True: "met", False: "MISSED", None: "n/a"}[row["met"]]
    print(f"  {row['claim']:58s} {str(row['value']):>24s}  {row['target']:>8s}  {met}")
  print(f"results: {out}")
  summary = {"device": results.get("device"), "seconds": results["seconds"],
             "status": {n: r.get("status") for n, r in results["measurements"].items()},
             "claims_met": sum(r["met"] is True for r in results["claims"]),
             "claims_missed": sum(r["met"] is False for r in results["claims"]),
             "claims_unmeasured": sum(r["met"] is None for r in results["claims"])}
  print(json.dumps(summary))
  return results


if __name__ == "__main__":
  main()
