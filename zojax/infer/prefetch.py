"""Which experts to prefetch for a layer call, in which order and in which format (Fate).

* Prefill: every token's top-K prediction is a vote; prefetch the union of voted experts,
  most-voted first. With hybrid quantisation the least-voted experts, up to a cumulative
  share `int2_rate` of the votes, travel as INT2 and the rest as INT4: rarely used experts
  cost the least accuracy when coarsened.
* Decode: prefetch the top `prefetch_k` experts, where prefetch_k = floor(t_layer /
  t_transfer(one INT4 expert)) is how many transfers one layer's compute can hide.
* Misses are loaded on demand after the prefetched experts (`zojax.infer.schedule`).

A prediction is a ranking per token, [T, M] expert ids best first (M <= E; M = 0 means no
prediction). Ties are broken towards the lower expert id everywhere, so orders are canonical.
"""

from __future__ import annotations

import math

import numpy as np

from zojax.errors import ConfigError

FORMATS = ("full", "int4", "int2")
QUANT_MODES = ("off", "int4", "hybrid", "int2")


def check_int2_rate(int2_rate: float) -> float:
  if not 0.0 <= int2_rate <= 1.0:  # also rejects NaN
    raise ConfigError(f"config key 'int2_rate'={int2_rate} must be in [0, 1]")
  return float(int2_rate)


def check_prefetch_k(prefetch_k: int) -> int:
  if isinstance(prefetch_k, bool) or int(prefetch_k) != prefetch_k or prefetch_k < 0:
    raise ConfigError(f"config key 'prefetch_k'={prefetch_k} must be an integer >= 0")
  return int(prefetch_k)


def check_quant(quant: str) -> str:
  if quant not in QUANT_MODES:
    raise ConfigError(f"config key 'quant'={quant!r} must be one of {QUANT_MODES}")
  return quant


def votes(rank_TxM: np.ndarray, top_k: int, num_experts: int) -> np.ndarray:
  """[E] int64: how many tokens have each expert in their predicted top-K."""
  rank = np.asarray(rank_TxM)
  return np.bincount(rank[:, :top_k].ravel(), minlength=num_experts).astype(np.int64)


def prefill_order(rank_TxM: np.ndarray, top_k: int, num_experts: int) -> np.ndarray:
  """The union of per-token top-K predictions, most-voted first (ties: lower id)."""
  count = votes(rank_TxM, top_k, num_experts)
  order = np.lexsort((np.arange(num_experts), -count))
  return order[count[order] > 0]


def int2_mask(order: np.ndarray, count: np.ndarray, int2_rate: float) -> np.ndarray:
  """[len(order)] bool: INT2 for the least-voted tail of `order` holding <= int2_rate of votes.

  Walks `order` from its end (least voted) and stops at the first expert whose votes would
  push the cumulative share past `int2_rate`; 0 gives none, 1 gives all.
  """
  check_int2_rate(int2_rate)
  tail = np.cumsum(np.asarray(count)[np.asarray(order)][::-1])
  total = tail[-1] if tail.size else 0
  # The tolerance keeps e.g. 0.29 * 100 = 28.999... from excluding a 29 % tail.
  within = tail <= int2_rate * total * (1 + 1e-12)
  n = int(np.argmin(within)) if not within.all() else within.size
  mask = np.zeros(len(order), bool)
  mask[len(order) - n:] = True
  return mask


def decode_order(rank_TxM: np.ndarray, top_k: int, num_experts: int) -> np.ndarray:
  """All E experts, best first: most top-K votes, then best summed rank position, then id.

  For one token this is its own ranking (experts it does not rank come last, by id).
  """
  rank = np.asarray(rank_TxM)
  T, M = rank.shape
  position = np.full((T, num_experts), M, np.int64)  # unranked: worst position
  np.put_along_axis(position, rank.astype(np.int64), np.arange(M)[None, :], axis=1)
  count = votes(rank, top_k, num_experts)
  return np.lexsort((np.arange(num_experts), position.sum(0), -count))


def prefetch_k_for(t_layer_s: float, int4_expert_bytes: int, bandwidth: float) -> int:
  """floor(t_layer / t_transfer(one INT4 expert)): transfers one layer's compute can hide."""
  if not (t_layer_s >= 0 and int4_expert_bytes > 0 and bandwidth > 0):
    raise ConfigError(f"prefetch_k_for needs t_layer_s >= 0, bytes > 0, bandwidth > 0; got "
                      f"{t_layer_s}, {int4_expert_bytes}, {bandwidth}")
  return math.floor(t_layer_s * bandwidth / int4_expert_bytes * (1 + 1e-12))


def mode_format(quant: str) -> str:
  """The format every transfer travels in under `quant`, and the one a cache slot is sized
  for; the exception is hybrid prefill prefetch, split into INT2/INT4 by `int2_mask`.

  Hybrid mode moves decode prefetches, demand misses and warm-up loads as INT4: INT2 is kept
  for the rarely used experts of a prefill, where its accuracy cost is bounded.
  """
  return {"off": "full", "int4": "int4", "hybrid": "int4", "int2": "int2"}[check_quant(quant)]


def prefill_plan(rank_TxM: np.ndarray, top_k: int, num_experts: int, quant: str,
                 int2_rate: float) -> list[tuple[int, str]]:
  """[(expert, fmt)] to prefetch for a prefill call, most-voted first."""
  order = prefill_order(rank_TxM, top_k, num_experts)
  fmts = np.full(len(order), mode_format(quant), object)
  if quant == "hybrid":
    fmts[int2_mask(order, votes(rank_TxM, top_k, num_experts), int2_rate)] = "int2"
  return [(int(e), str(f)) for e, f in zip(order, fmts)]


def decode_plan(rank_TxM: np.ndarray, top_k: int, num_experts: int, quant: str,
                prefetch_k: int) -> list[tuple[int, str]]:
  """[(expert, fmt)] to prefetch for a decode call: the first `prefetch_k` ranked experts."""
  rank = np.asarray(rank_TxM)
  if rank.shape[1] == 0:
    return []
  ranked = decode_order(rank, top_k, num_experts)
  ranked = ranked[:min(check_prefetch_k(prefetch_k), len(np.unique(rank)))]
  fmt = mode_format(quant)
  return [(int(e), fmt) for e in ranked]


__all__ = ["FORMATS", "QUANT_MODES", "check_int2_rate", "check_prefetch_k", "check_quant",
           "decode_order", "decode_plan", "int2_mask", "mode_format", "prefetch_k_for",
           "prefill_order", "prefill_plan", "votes"]
