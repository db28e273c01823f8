"""Byte-level BPE tokenizers rebuilt from GGUF metadata with Hugging Face `tokenizers`.

A GGUF file carries the whole tokenizer (vocab, merges, token types, pre-tokenizer name),
so no tokenizer.json has to be shipped alongside it::

  tok = smollm2_tokenizer()
  tok.encode("Hello world").ids            # [19556, 905]: "Hello", "Ġworld"
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from zojax.data import fetch, gguf_file

_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens such as <|im_start|>


def _byte_level() -> pre_tokenizers.PreTokenizer:
  # GPT-2's split regex, then bytes mapped to printable characters ("Ġ" for space).
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp runs for it.
_PRE_TOKENIZERS = {
    "gpt-2": _byte_level,
    # llama.cpp splits "smollm" text with the regexes ["\p{N}", GPT-2's] in turn: every digit
    # becomes its own piece before the GPT-2 split, which is exactly Digits(individual) then
    # ByteLevel (the same Sequence as SmolLM2's own tokenizer.json).
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
}


def tokenizer_from_gguf(metadata: dict[str, Any]) -> tokenizers.Tokenizer:
  """Rebuilds a GGUF model's byte-level BPE ("gpt2") tokenizer.

  Args:
    metadata: the GGUF key-value metadata (see `gguf_file.read_gguf_metadata`).

  Returns:
    A `tokenizers.Tokenizer` whose ids are the GGUF vocab's; control tokens are special
    tokens, and a BOS token is prepended only if `tokenizer.ggml.add_bos_token` is set.

  Raises:
    ValueError: a tokenizer model or pre-tokenizer this function does not rebuild.
  """
  kind, pre = metadata["tokenizer.ggml.model"], metadata.get("tokenizer.ggml.pre", "gpt-2")
  if kind != "gpt2":
    raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; only 'gpt2' (BPE)")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
        f"tokenizer.ggml.pre={pre!r} is not supported; known: {', '.join(_PRE_TOKENIZERS)}")
  tokens = metadata["tokenizer.ggml.tokens"]
  vocab = {t: i for i, t in enumerate(tokens)}
  # Byte-level tokens never hold a literal space (it is "Ġ"), so each merge splits cleanly.
  merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab, merges))
  tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  # The ids already exist in the vocab, so this only marks them as special: matched whole in
  # the input and dropped by decode(skip_special_tokens=True).
  tok.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, ttype in zip(tokens, metadata["tokenizer.ggml.token_type"]) if ttype == _CONTROL])
  if metadata.get("tokenizer.ggml.add_bos_token", False):
    bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])])
  return tok


# Bump when `tokenizer_from_gguf` changes what it builds: the cached JSON is then rebuilt.
_CONVERSION_VERSION = 1


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> tokenizers.Tokenizer:
  """SmolLM2-135M-Instruct's tokenizer, from its GGUF's metadata (tensors are not read).

  Parsing the metadata's 49k-entry arrays takes ~10 s of pure Python, which every process
  (each CLI run, each test worker) would pay; the built tokenizer is kept as JSON in the
  cache, keyed by the GGUF file's size and mtime and by `_CONVERSION_VERSION`.
  """
  gguf = gguf_file.smollm2_gguf_path()
  stat = gguf.stat()
  cached = (fetch.data_dir() / "tokenizers" /
            f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{_CONVERSION_VERSION}.json")
  if cached.exists():
    try:
      return tokenizers.Tokenizer.from_file(str(cached))
    except Exception:  # a torn or foreign file: rebuild it below
      pass
  tok = tokenizer_from_gguf(gguf_file.read_gguf_metadata(gguf))
  _write_atomically(cached, tok.to_str())
  return tok


def _write_atomically(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)  # concurrent writers each write whole files; the last one wins
