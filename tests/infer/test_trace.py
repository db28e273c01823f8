"""zojax.infer.trace: save/load round trip, validation, and the views policies read."""

import dataclasses

import _traces
import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer.trace import Trace

FIELDS = ("prefill_experts", "prefill_gate_rank", "prefill_true_rank", "decode_experts",
          "decode_gate_rank", "decode_true_rank", "layer_ids")


def _fields(trace):
  return {f.name: getattr(trace, f.name) for f in dataclasses.fields(trace)}


def test_round_trip(tmp_path):
  trace = _traces.synthetic(1)
  trace.save(tmp_path / "t.npz")
  back = Trace.load(tmp_path / "t.npz")
  for name in FIELDS:
    assert np.array_equal(getattr(back, name), getattr(trace, name)), name
    assert getattr(back, name).dtype == np.int32
  assert (back.num_experts, back.top_k, back.batch_size) == (6, 2, 2)
  assert back.meta == {"source": "synthetic", "seed": 1}
  assert (back.num_layers, back.prompt_len, back.num_steps) == (3, 4, 3)


@pytest.mark.parametrize("name, change, message", [
    ("prefill_experts", lambda a: a[..., :1], "'prefill_experts' has shape"),
    ("decode_experts", lambda a: a[:, :, :1], "'decode_experts' has shape"),
    ("prefill_gate_rank", lambda a: a[..., :5], "'prefill_gate_rank' has shape"),
    ("decode_true_rank", lambda a: a.astype(np.float32), "'decode_true_rank' must hold integers"),
    ("prefill_gate_rank", lambda a: np.where(a == 5, 6, a), "'prefill_gate_rank' holds expert ids"),
    ("decode_gate_rank", lambda a: np.where(a == 5, 0, a), "'decode_gate_rank': every row must"),
    ("prefill_experts", lambda a: a[..., ::-1], "'prefill_experts' must equal the first"),
    ("layer_ids", lambda a: np.arange(2), "'layer_ids' has shape"),
    ("batch_size", lambda a: 3, "'prefill_experts' has N=8 tokens"),
    ("top_k", lambda a: 0, "'top_k'=0"),
    ("meta", lambda a: {"x": object()}, "'meta' must be JSON"),
])
def test_validation_names_the_field(name, change, message):
  fields = _fields(_traces.synthetic(2))
  fields[name] = change(fields[name])
  with pytest.raises(ConfigError, match=message) as e:
    Trace(**fields)
  assert "\n" not in str(e.value)


def test_load_errors(tmp_path):
  with pytest.raises(ConfigError, match="cannot be read"):
    Trace.load(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ConfigError, match="cannot be read"):
    Trace.load(tmp_path / "junk.npz")
  trace = _traces.synthetic(3)
  arrays = {k: getattr(trace, k) for k in FIELDS if k != "decode_gate_rank"}
  np.savez(tmp_path / "partial.npz", version=1, meta="{}", num_experts=6, top_k=2,
           batch_size=2, **arrays)
  with pytest.raises(ConfigError, match="lacks field 'decode_gate_rank'"):
    Trace.load(tmp_path / "partial.npz")


def test_calls_give_causal_context():
  trace = _traces.synthetic(4, L=2, B=2, T=3, S=2)
  pre = list(trace.calls("prefill"))
  assert pre[0].prev_layer_experts is None and pre[0].prev_token_experts is None
  assert np.array_equal(pre[1].prev_layer_experts, trace.prefill_experts[0])
  d0 = list(trace.calls("decode", 0))
  last = trace.prefill_experts[1].reshape(2, 3, 2)[:, -1]   # each sequence's last prompt token
  assert np.array_equal(d0[1].prev_token_experts, last)
  d1 = list(trace.calls("decode", 1))
  assert np.array_equal(d1[0].prev_token_experts, trace.decode_experts[0, 0])
  assert list(trace.steps()) == [("prefill", 0), ("decode", 0), ("decode", 1)]
  counts = trace.expert_counts()
  assert counts.sum() == 2 * (6 + 2 * 2) * 2   # L x (prefill + decode tokens) x K
