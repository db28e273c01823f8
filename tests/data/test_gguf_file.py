"""GGUF reading: shapes, dequantization against a hand-written Q4_1/Q8_0 decoder, errors."""

import gguf
import numpy as np
import pytest

from zojax.data import gguf_file

QT = gguf.GGMLQuantizationType


def _write(path, tensors):
  """Writes a small GGUF file; `tensors` maps name -> (float or int array, storage type)."""
  w = gguf.GGUFWriter(path, "llama")
  w.add_uint32("llama.block_count", 2)
  w.add_array("test.names", ["a", "b"])
  for name, (x, qtype) in tensors.items():
    if qtype in (QT.F32, QT.I32):
      w.add_tensor(name, x)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_small_file_round_trip(tmp_path):
  x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
  path = tmp_path / "small.gguf"
  _write(path, {"f": (x, QT.F32), "q": (x, QT.Q4_1)})
  f = gguf_file.read_gguf(path)
  assert f.metadata == {"general.architecture": "llama", "llama.block_count": 2,
                        "test.names": ["a", "b"]}
  np.testing.assert_array_equal(f.tensors["f"], x)
  assert f.tensors["q"].shape == (3, 64) and f.tensors["q"].dtype == np.float32
  # 4-bit codes over each 32-value block's [min, max]: error at most half a step.
  step = np.ptp(x.reshape(3, 2, 32), axis=-1, keepdims=True) / 15
  err = np.abs(f.tensors["q"] - x).reshape(3, 2, 32)
  assert np.all(err <= step / 2 + 1e-3), err.max()
  assert gguf_file.read_gguf_metadata(path) == f.metadata


def test_unsupported_type_is_a_one_line_error(tmp_path):
  path = tmp_path / "ints.gguf"
  _write(path, {"ids": (np.arange(6, dtype=np.int32).reshape(2, 3), QT.I32)})
  with pytest.raises(ValueError, match=r"tensor 'ids' has unsupported type I32") as e:
    gguf_file.read_gguf(path)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_is_a_one_line_error(tmp_path):
  path = tmp_path / "nope.gguf"
  for read in (gguf_file.read_gguf, gguf_file.read_gguf_metadata):
    with pytest.raises(FileNotFoundError, match="GGUF file not found") as e:
      read(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.fixture(scope="module")
def smollm2():
  path = gguf_file.smollm2_gguf_path()
  return gguf_file.read_gguf(path), gguf.GGUFReader(path)


def _raw_row(reader, name, row):
  (t,) = [t for t in reader.tensors if t.name == name]
  return t.tensor_type, np.asarray(t.data[row], np.uint8)


@pytest.mark.assets
def test_smollm2_shapes(smollm2):
  f, _ = smollm2
  D, F, V, kv = 576, 1536, 49152, 192
  expected = {
      "token_embd.weight": (V, D),
      "output_norm.weight": (D,),
      "blk.0.attn_q.weight": (D, D),  # [out_features, in_features]
      "blk.0.attn_k.weight": (kv, D),
      "blk.29.attn_v.weight": (kv, D),
      "blk.0.attn_output.weight": (D, D),
      "blk.0.ffn_gate.weight": (F, D),
      "blk.0.ffn_up.weight": (F, D),
      "blk.0.ffn_down.weight": (D, F),
      "blk.0.attn_norm.weight": (D,),
      "blk.0.ffn_norm.weight": (D,),
  }
  assert {k: f.tensors[k].shape for k in expected} == expected
  assert len(f.tensors) == 2 + 30 * 9 and "output.weight" not in f.tensors
  assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in f.tensors.values())
  assert f.metadata["llama.block_count"] == 30
  assert f.metadata["tokenizer.ggml.pre"] == "smollm"
  assert isinstance(f.metadata["tokenizer.ggml.tokens"], list)


@pytest.mark.assets
@pytest.mark.parametrize("name,row", [("blk.0.ffn_down.weight", 7), ("blk.17.attn_q.weight", 300)])
def test_q4_1_matches_hand_decoder(smollm2, name, row):
  f, reader = smollm2
  qtype, raw = _raw_row(reader, name, row)
  assert qtype == QT.Q4_1
  # Block of 32 values in 20 bytes: fp16 scale d, fp16 min m, 16 bytes of two 4-bit codes.
  blocks = raw.reshape(-1, 20)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
  nibbles = blocks[:, 4:]
  codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # elements 0..15, 16..31
  expected = (d * codes.astype(np.float32) + m).reshape(-1)
  np.testing.assert_allclose(f.tensors[name][row], expected, rtol=1e-6, atol=0)


@pytest.mark.assets
def test_q8_0_matches_hand_decoder(smollm2):
  f, reader = smollm2
  qtype, raw = _raw_row(reader, "token_embd.weight", 19556)  # "Hello"
  assert qtype == QT.Q8_0
  # Block of 32 values in 34 bytes: fp16 scale d, then 32 signed bytes.
  blocks = raw.reshape(-1, 34)
  d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
  codes = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
  np.testing.assert_allclose(f.tensors["token_embd.weight"][19556], (d * codes).reshape(-1),
                             rtol=1e-6, atol=0)
