"""Expert predictors over a trace: the cross-layer gate and the baselines it is compared with.

Each predictor maps a layer call (`zojax.infer.trace.Call`, read only through the fields it
is allowed to know) to a per-token ranking [T, M] of expert ids, best first; M = 0 means it
has nothing to say (previous-token during prefill).

* `gate`: the cross-layer gate's ranking recorded in the trace (Fate).
* `eap`: an expert-activation-path transition table fitted on a calibration trace:
  score_j = sum over the token's layer-(l-1) experts i of P(j at l | i at l-1). Layer 0 has
  no previous layer and falls back to calibration popularity.
* `prev_token`: the experts the previous token of the same sequence used at this layer.
* `popularity`: the calibration trace's most used experts of the layer, for every token.
* `oracle`: the real router's ranking (an upper bound, not a method).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from zojax.errors import ConfigError
from zojax.infer.trace import Call, Trace

NAMES = ("gate", "eap", "prev_token", "popularity", "oracle")
NEEDS_CALIBRATION = ("eap", "popularity")


class Predictor(Protocol):
  name: str

  def rank(self, call: Call) -> np.ndarray:
    """[T, M] int32 expert ids per token, best first."""


def rank_from_scores(scores_TxE: np.ndarray) -> np.ndarray:
  """[T, E] int32: experts by descending score, ties towards the lower id."""
  return np.argsort(-np.asarray(scores_TxE, np.float64), axis=-1, kind="stable").astype(
      np.int32)


def _tokens(call: Call) -> int:
  return call.experts.shape[0]


class Gate:
  name = "gate"

  def rank(self, call: Call) -> np.ndarray:
    return call.gate_rank


class Oracle:
  name = "oracle"

  def rank(self, call: Call) -> np.ndarray:
    return call.true_rank


class PrevToken:
  name = "prev_token"

  def rank(self, call: Call) -> np.ndarray:
    if call.prev_token_experts is None:
      return np.zeros((_tokens(call), 0), np.int32)
    return call.prev_token_experts


class Popularity:
  name = "popularity"

  def __init__(self, counts_LxE: np.ndarray):
    self.order_LxE = rank_from_scores(counts_LxE)

  def rank(self, call: Call) -> np.ndarray:
    row = self.order_LxE[call.layer]
    return np.broadcast_to(row, (_tokens(call), row.size))


def transition_counts(trace: Trace) -> np.ndarray:
  """[L-1, E, E] int64: C[l, i, j] = tokens using expert i at layer l and j at layer l+1."""
  E, L = trace.num_experts, trace.num_layers
  paths_LxNxK = np.concatenate(
      [trace.prefill_experts, trace.decode_experts.transpose(1, 0, 2, 3).reshape(L, -1,
                                                                                trace.top_k)],
      axis=1)
  onehot = np.zeros(paths_LxNxK.shape[:2] + (E,), np.int64)
  np.put_along_axis(onehot, paths_LxNxK.astype(np.int64), 1, axis=-1)
  return np.einsum("lni,lnj->lij", onehot[:-1], onehot[1:])


class EAP:
  """Transition-table predictor: P(expert j at layer l | expert i at layer l-1)."""

  name = "eap"

  def __init__(self, calibration: Trace):
    counts = transition_counts(calibration).astype(np.float64)
    self.cond = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)  # rows never seen: 0
    self.popularity = Popularity(calibration.expert_counts())

  def rank(self, call: Call) -> np.ndarray:
    if call.prev_layer_experts is None:
      return self.popularity.rank(call)
    # Sum of the conditional rows of the token's K previous experts.
    scores_TxE = self.cond[call.layer - 1][call.prev_layer_experts].sum(1)
    return rank_from_scores(scores_TxE)


def make(name: str, calibration: Trace | None = None) -> Predictor:
  """The predictor called `name`; EAP and popularity are fitted on `calibration`."""
  if name not in NAMES:
    raise ConfigError(f"config key 'predictor'={name!r} must be one of {NAMES}")
  if name in NEEDS_CALIBRATION and calibration is None:
    raise ConfigError(f"predictor {name!r} needs a calibration trace")
  if name == "eap":
    return EAP(calibration)
  if name == "popularity":
    return Popularity(calibration.expert_counts())
  return {"gate": Gate, "oracle": Oracle, "prev_token": PrevToken}[name]()


def token_overlap(rank_TxM: np.ndarray, experts_TxK: np.ndarray) -> int:
  """Sum over tokens of |predicted top-K ∩ used experts| (the paper's prefetch accuracy
  numerator; divide by T·K)."""
  K = experts_TxK.shape[1]
  predicted = np.asarray(rank_TxM)[:, :K]
  return int((predicted[:, :, None] == experts_TxK[:, None, :]).any(-1).sum())


__all__ = ["EAP", "Gate", "NAMES", "NEEDS_CALIBRATION", "Oracle", "Popularity", "PrevToken",
           "Predictor", "make", "rank_from_scores", "token_overlap", "transition_counts"]
