"""A two-lane timeline: compute and one host-to-device link (FIFO), replaying a policy.

CPU wall time makes offloading look free, so modelled throughput comes from here: the
simulator's per-layer-call transfers (`zojax.infer.simulate.CallRecord`) against per-layer
compute times and a link bandwidth. Within a step:

  * the prefetches for layer 0 are issued at the step's start (gate on the embedding output);
  * attention_l needs no experts; when it ends, layer l's router and the gate for l+1 run
    (their cost is neglected): layer l's demand loads are queued, then l+1's prefetches;
  * MoE_l starts once every transfer of layer l that it uses (prefetched or demanded) has
    arrived; the wait is stall time. Wrong prefetches occupy the link but block nothing,
    until a later step hits on a cached copy that is still in flight.

So prefetches for layer l overlap MoE_{l-1} and attention_l, and a miss waits behind every
transfer queued before it. The link is one FIFO queue shared by all layers and carried over
from step to step; a transfer takes latency + nbytes / bandwidth.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from zojax.errors import ConfigError

# Host-to-device bandwidths (modelling constants): PCIe 3.0 x16 is 15.75 GB/s raw and
# PCIe 4.0 x16 31.5 GB/s; pinned-memory copies reach about 12 and 25 GB/s in practice.
PCIE3_X16 = 12e9
PCIE4_X16 = 25e9
BANDWIDTHS = {"pcie3_x16": PCIE3_X16, "pcie4_x16": PCIE4_X16}


@dataclasses.dataclass(frozen=True)
class ComputeTimes:
  """Seconds per layer call: prefill [L]; decode [L] (every step alike) or [S, L]; a scalar
  stands for every layer.

  other: per step, everything outside the L layers (embedding, final norm, LM head).
  """

  prefill_attn: np.ndarray
  prefill_moe: np.ndarray
  decode_attn: np.ndarray
  decode_moe: np.ndarray
  prefill_other: float = 0.0
  decode_other: float = 0.0

  def layer(self, phase: str, step: int, layer: int) -> tuple[float, float]:
    attn, moe = ((self.prefill_attn, self.prefill_moe) if phase == "prefill"
                 else (self.decode_attn, self.decode_moe))
    pick = lambda a: float(np.asarray(a)[(step, layer)[2 - np.ndim(a):]])  # scalar, [L], [S, L]
    return pick(attn), pick(moe)


@dataclasses.dataclass(frozen=True)
class TimelineResult:
  prefill_s: float
  decode_s: float
  prefill_stall_s: float
  decode_stall_s: float
  prefill_tokens: int
  decode_tokens: int
  link_busy_s: float       # seconds the link moved data during prefill and decode
  warm_s: float            # the warm-up loads alone on the link (before generation)

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("inf")

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(prefill_tokens_per_s=self.prefill_tokens_per_s,
               decode_tokens_per_s=self.decode_tokens_per_s)
    return out


def replay(calls: Sequence, times: ComputeTimes, bandwidth: float, *, latency_s: float = 0.0,
           warm: Sequence = ()) -> TimelineResult:
  """Model the run of `calls` (one policy's `SimResult.calls`) on a `bandwidth` B/s link."""
  if not bandwidth > 0 or latency_s < 0:
    raise ConfigError(f"timeline needs bandwidth > 0 and latency_s >= 0, got {bandwidth}, "
                      f"{latency_s}")
  cost = lambda t: latency_s + t.nbytes / bandwidth
  clock = link = busy = 0.0
  elapsed = {"prefill": 0.0, "decode": 0.0}
  stall = {"prefill": 0.0, "decode": 0.0}
  tokens = {"prefill": 0, "decode": 0}

  cached: dict[tuple[int, int], float] = {}   # (layer, expert) -> arrival of its cache copy

  def issue(transfers, at, arrivals) -> None:
    nonlocal link, busy
    for t in transfers:
      link = max(link, at) + cost(t)
      busy += cost(t)
      arrivals[t.expert] = link
      if t.dest == "cache":
        cached[t.layer, t.expert] = link

  for (phase, step), group in itertools.groupby(calls, key=lambda c: (c.phase, c.step)):
    group = sorted(group, key=lambda c: c.layer)
    if [c.layer for c in group] != list(range(len(group))):
      raise ConfigError(f"timeline: {phase} step {step} does not hold layers 0..L-1 once each")
    start = clock
    tokens[phase] += group[0].tokens
    arrival = [dict() for _ in group]   # per layer: expert -> arrival of this call's copy
    issue(group[0].prefetch, clock, arrival[0])
    for layer, call in enumerate(group):
      attn, moe = times.layer(phase, step, layer)
      clock += attn
      issue(call.demand, clock, arrival[layer])
      if layer + 1 < len(group):
        issue(group[layer + 1].prefetch, clock, arrival[layer + 1])
      # A hit may be a copy still in flight from an earlier step's (unneeded) prefetch.
      ready = max((arrival[layer].get(e, cached.get((layer, e), 0.0)) for e in call.needed),
                  default=0.0)
      stall[phase] += max(0.0, ready - clock)
      clock = max(clock, ready) + moe
    clock += times.prefill_other if phase == "prefill" else times.decode_other
    elapsed[phase] += clock - start
  warm_s = sum(cost(t) for t in warm)
  return TimelineResult(elapsed["prefill"], elapsed["decode"], stall["prefill"],
                        stall["decode"], tokens["prefill"], tokens["decode"], busy, warm_s)


# ---------------------------------------------------------------------------------------
# A roofline of a named edge GPU for per-layer compute (modelling constants).


@dataclasses.dataclass(frozen=True)
class EdgeGPU:
  name: str
  peak_flops: float   # FLOP/s
  memory_bw: float    # B/s


# The GPU the Fate paper names as its edge example (11 GB, PCIe 3.0 x16). Peak FP32 =
# 3584 CUDA cores x 2 FLOP x 1.582 GHz boost = 11.34 TFLOP/s; memory 352-bit GDDR5X at
# 11 Gb/s = 484 GB/s (NVIDIA's published GTX 1080 Ti specifications). Pascal GP102 runs FP16
# arithmetic at a small fraction of FP32, so FP32 is the compute roof for any weight format.
GTX_1080_TI = EdgeGPU("NVIDIA GeForce GTX 1080 Ti", peak_flops=11.34e12, memory_bw=484e9)


@dataclasses.dataclass(frozen=True)
class DecoderShape:
  """The per-layer shapes the roofline needs (one MoE decoder layer)."""

  dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  expert_dim: int
  num_experts: int
  top_k: int
  shared_expert_dim: int = 0


def roofline_s(gpu: EdgeGPU, flops: float, nbytes: float, efficiency: float = 1.0) -> float:
  """max(flops / peak, bytes / bandwidth) / efficiency: a lower bound on a kernel's time."""
  return max(flops / gpu.peak_flops, nbytes / gpu.memory_bw) / efficiency


def roofline_times(gpu: EdgeGPU, shape: DecoderShape, *, num_layers: int, batch: int,
                   prompt_len: int, decode_steps: int, weight_bytes: float = 2.0,
                   kv_bytes: float = 2.0, efficiency: float = 1.0) -> ComputeTimes:
  """Per-layer attention and MoE times from the roofline (weights and KV read once per call).

  Attention: Q/K/V/O projections plus causal scores and values over the context; reads its
  weights and the KV cache. MoE: K SwiGLU experts per token (+ shared expert, router); reads
  the weights of the experts touched (all E in prefill when tokens·K >= E, B·K in decode).
  """
  s, B, T = shape, batch, prompt_len
  q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
  proj_flops, proj_bytes = 2 * s.dim * (2 * q + 2 * kv), s.dim * (2 * q + 2 * kv) * weight_bytes
  ffn = 3 * s.dim * s.expert_dim

  def attn(tokens, pairs, context_tokens):   # pairs: (query, key) pairs summed over tokens
    flops = tokens * proj_flops + 4 * q * pairs
    nbytes = proj_bytes + context_tokens * 2 * kv * kv_bytes
    return roofline_s(gpu, flops, nbytes, efficiency)

  def moe(tokens):
    touched = min(s.num_experts, tokens * s.top_k)
    flops = tokens * (2 * ffn * s.top_k + 2 * 3 * s.dim * s.shared_expert_dim +
                      2 * s.dim * s.num_experts)
    nbytes = (touched * ffn + 3 * s.dim * s.shared_expert_dim + s.dim * s.num_experts
              ) * weight_bytes
    return roofline_s(gpu, flops, nbytes, efficiency)

  prefill_attn = attn(B * T, B * T * (T + 1) / 2, B * T)
  decode_attn = np.array([attn(B, B * (T + i + 1), B * (T + i + 1))
                          for i in range(decode_steps)])
  ones = np.ones(num_layers)
  return ComputeTimes(prefill_attn * ones, moe(B * T) * ones,
                      decode_attn[:, None] * ones[None, :], moe(B) * ones)


__all__ = ["BANDWIDTHS", "ComputeTimes", "DecoderShape", "EdgeGPU", "GTX_1080_TI",
           "PCIE3_X16", "PCIE4_X16", "TimelineResult", "replay", "roofline_s",
           "roofline_times"]
