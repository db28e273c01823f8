"""A recorded routing trace of one generation (prefill, then decode), in numpy.

Offloading policies are judged on traces, not on wall time: a trace holds, for every MoE
layer call, the experts each token used, the cross-layer gate's ranking made one layer
earlier, and the real router's ranking (the oracle). The simulator (`zojax.infer.simulate`)
replays it through the same `Scheduler` the offloaded engine drives.

Layout, with L MoE layers, E experts, top-K, B sequences of T prompt tokens (N = B·T, row
b·T + t) and S decode steps:

  prefill_experts    [L, N, K]     experts each token used (top-K of scores + bias)
  prefill_gate_rank  [L, N, E]     row l: layer l's router (and bias) applied to layer l-1's
                                   post-attention normalised hidden (layer 0: the embedding
                                   output), experts in descending score + bias
  prefill_true_rank  [L, N, E]     layer l's real router ranking; its first K are the experts
  decode_*           [S, L, B, ...] the same per decode step (one token per sequence)

Bad fields give one-line `ConfigError`s naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, NamedTuple

import numpy as np

from zojax.errors import ConfigError

PHASES = ("prefill", "decode")
_ARRAYS = ("prefill_experts", "prefill_gate_rank", "prefill_true_rank", "decode_experts",
           "decode_gate_rank", "decode_true_rank", "layer_ids")
_SCALARS = ("num_experts", "top_k", "batch_size")
VERSION = 1


class Call(NamedTuple):
  """One MoE layer call as a policy sees it: T tokens of one phase, step and layer.

  A predictor may read `gate_rank` (computed before the call), `prev_layer_experts` (the
  same tokens' experts one layer down), `prev_token_experts` (this layer's experts for the
  previous token of each sequence; decode only) and, the oracle only, `true_rank`.
  `experts` is what the call then needs.
  """

  phase: str
  step: int
  layer: int
  experts: np.ndarray                    # [T, K]
  gate_rank: np.ndarray                  # [T, E]
  true_rank: np.ndarray                  # [T, E]
  prev_layer_experts: np.ndarray | None  # [T, K]; None at layer 0
  prev_token_experts: np.ndarray | None  # [T, K]; None in prefill


def _int_array(name: str, value) -> np.ndarray:
  a = np.asarray(value)
  if not np.issubdtype(a.dtype, np.integer):
    raise ConfigError(f"trace field {name!r} must hold integers, got dtype {a.dtype}")
  return a.astype(np.int32)


def _check_ids(name: str, a: np.ndarray, E: int) -> None:
  if a.size and (a.min() < 0 or a.max() >= E):
    raise ConfigError(f"trace field {name!r} holds expert ids in [{a.min()}, {a.max()}], "
                      f"outside [0, num_experts={E})")


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
  """A routing trace; see the module docstring for the layout. Arrays are cast to int32."""

  num_experts: int
  top_k: int
  batch_size: int
  prefill_experts: np.ndarray
  prefill_gate_rank: np.ndarray
  prefill_true_rank: np.ndarray
  decode_experts: np.ndarray
  decode_gate_rank: np.ndarray
  decode_true_rank: np.ndarray
  layer_ids: np.ndarray | None = None   # [L] model layer of each MoE layer; default arange
  meta: dict = dataclasses.field(default_factory=dict)  # JSON-able (model name, corpus, ...)

  def __post_init__(self):
    for name in _SCALARS:
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"trace field {name!r}={v!r} must be an integer >= 1")
      object.__setattr__(self, name, int(v))
    E, K, B = self.num_experts, self.top_k, self.batch_size
    if K > E:
      raise ConfigError(f"trace field 'top_k'={K} must be <= num_experts={E}")
    for name in _ARRAYS[:6]:
      object.__setattr__(self, name, _int_array(name, getattr(self, name)))
    pe = self.prefill_experts
    if pe.ndim != 3 or pe.shape[2] != K:
      raise ConfigError(f"trace field 'prefill_experts' has shape {pe.shape}, want [L, N, "
                        f"top_k={K}]")
    L, N = pe.shape[:2]
    if N % B:
      raise ConfigError(f"trace field 'prefill_experts' has N={N} tokens, not a multiple of "
                        f"batch_size={B}")
    de = self.decode_experts
    if de.ndim != 4 or de.shape[1:] != (L, B, K):
      raise ConfigError(f"trace field 'decode_experts' has shape {de.shape}, want [S, L={L}, "
                        f"batch_size={B}, top_k={K}]")
    S = de.shape[0]
    want = {"prefill_gate_rank": (L, N, E), "prefill_true_rank": (L, N, E),
            "decode_gate_rank": (S, L, B, E), "decode_true_rank": (S, L, B, E)}
    for name, shape in want.items():
      if getattr(self, name).shape != shape:
        raise ConfigError(f"trace field {name!r} has shape {getattr(self, name).shape}, "
                          f"want {list(shape)}")
    for name in _ARRAYS[:6]:
      _check_ids(name, getattr(self, name), E)
    for phase in PHASES:
      for kind in ("gate_rank", "true_rank"):
        name = f"{phase}_{kind}"
        rank = getattr(self, name)
        if rank.size and not (np.sort(rank, -1) == np.arange(E)).all():
          raise ConfigError(f"trace field {name!r}: every row must be a permutation of the "
                            f"{E} expert ids")
      name = f"{phase}_experts"
      if not np.array_equal(getattr(self, name), getattr(self, f"{phase}_true_rank")[..., :K]):
        raise ConfigError(f"trace field {name!r} must equal the first top_k={K} entries of "
                          f"{phase}_true_rank (the router picks the top of its ranking)")
    ids = np.arange(L) if self.layer_ids is None else self.layer_ids
    ids = _int_array("layer_ids", ids)
    if ids.shape != (L,):
      raise ConfigError(f"trace field 'layer_ids' has shape {ids.shape}, want [L={L}]")
    object.__setattr__(self, "layer_ids", ids)
    try:
      object.__setattr__(self, "meta", json.loads(json.dumps(dict(self.meta))))
    except (TypeError, ValueError) as e:
      raise ConfigError(f"trace field 'meta' must be JSON-serialisable: {e}") from None

  @property
  def num_layers(self) -> int:
    return self.prefill_experts.shape[0]

  @property
  def prompt_len(self) -> int:
    return self.prefill_experts.shape[1] // self.batch_size

  @property
  def num_steps(self) -> int:
    return self.decode_experts.shape[0]

  def expert_counts(self, phases=PHASES) -> np.ndarray:
    """[L, E] int64 token assignments per expert, summed over the given phases."""
    L, E = self.num_layers, self.num_experts
    counts = np.zeros((L, E), np.int64)
    for layer in range(L):
      if "prefill" in phases:
        counts[layer] += np.bincount(self.prefill_experts[layer].ravel(), minlength=E)
      if "decode" in phases:
        counts[layer] += np.bincount(self.decode_experts[:, layer].ravel(), minlength=E)
    return counts

  def calls(self, phase: str, step: int = 0) -> Iterator[Call]:
    """The L layer calls of one step in order (prefill has the single step 0)."""
    if phase == "prefill":
      if step != 0:
        raise ConfigError(f"prefill has only step 0, got step={step}")
      experts, gate, true = self.prefill_experts, self.prefill_gate_rank, self.prefill_true_rank
    elif phase == "decode":
      if not 0 <= step < self.num_steps:
        raise ConfigError(f"decode step={step} outside [0, {self.num_steps})")
      experts, gate, true = (self.decode_experts[step], self.decode_gate_rank[step],
                             self.decode_true_rank[step])
    else:
      raise ConfigError(f"phase={phase!r} must be one of {PHASES}")
    for layer in range(self.num_layers):
      yield Call(phase, step, layer, experts[layer], gate[layer], true[layer],
                 experts[layer - 1] if layer else None,
                 self._previous_token(phase, step, layer))

  def _previous_token(self, phase: str, step: int, layer: int) -> np.ndarray | None:
    if phase == "prefill":
      return None
    if step:
      return self.decode_experts[step - 1, layer]
    if self.prompt_len == 0:
      return None
    return self.prefill_experts[layer].reshape(self.batch_size, self.prompt_len, -1)[:, -1]

  def steps(self) -> Iterator[tuple[str, int]]:
    """(phase, step) in generation order."""
    yield "prefill", 0
    for s in range(self.num_steps):
      yield "decode", s

  def save(self, path: str | os.PathLike) -> None:
    arrays = {name: getattr(self, name) for name in _ARRAYS}
    scalars = {name: np.int64(getattr(self, name)) for name in _SCALARS}
    np.savez_compressed(path, version=np.int64(VERSION), meta=np.array(json.dumps(self.meta)),
                        **arrays, **scalars)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Trace":
    """Read and validate a `save`d trace; a missing file or field is a one-line error."""
    try:
      data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ConfigError(f"trace file {os.fspath(path)!r} cannot be read: {e}") from None
    with data:
      missing = [k for k in ("version", "meta", *_ARRAYS, *_SCALARS) if k not in data.files]
      if missing:
        raise ConfigError(f"trace file {os.fspath(path)!r} lacks field {missing[0]!r}")
      if int(data["version"]) != VERSION:
        raise ConfigError(f"trace file {os.fspath(path)!r} has version {int(data['version'])}"
                          f", this code reads {VERSION}")
      fields = {k: data[k] for k in _ARRAYS}
      fields.update({k: int(data[k]) for k in _SCALARS})
      meta = json.loads(str(data["meta"]))
    return cls(meta=meta, **fields)


__all__ = ["Call", "PHASES", "Trace"]
