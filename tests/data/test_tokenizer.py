"""The GGUF-rebuilt tokenizer: a synthetic vocab, then SmolLM2's real one."""

import pytest
from tokenizers import pre_tokenizers

from zojax.data import gguf_file
from zojax.data import tokenizer as tokenizer_lib

SPECIAL = ["<|endoftext|>", "<|im_start|>"]


def _metadata(pre="smollm", **overrides):
  """A tiny byte-level vocab: 2 control tokens, the 256 byte symbols, and three merges."""
  merges = ["Ġ c", "a t", "Ġc at"]
  tokens = SPECIAL + pre_tokenizers.ByteLevel.alphabet() + ["Ġc", "at", "Ġcat"]
  tokens = SPECIAL + sorted(set(tokens) - set(SPECIAL))  # the alphabet comes back unordered
  metadata = {
      "tokenizer.ggml.model": "gpt2",
      "tokenizer.ggml.pre": pre,
      "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
      "tokenizer.ggml.merges": merges,
      "tokenizer.ggml.bos_token_id": 1,
      "tokenizer.ggml.add_bos_token": False,
  }
  return {**metadata, **overrides}


def test_synthetic_vocab_merges_and_specials():
  md = _metadata()
  tok = tokenizer_lib.tokenizer_from_gguf(md)
  ids = md["tokenizer.ggml.tokens"].index
  assert tok.encode("<|im_start|>a cat").ids == [1, ids("a"), ids("Ġcat")]
  assert tok.decode(tok.encode("<|im_start|>a cat").ids) == "a cat"  # specials skipped


def test_smollm_pre_tokenizer_splits_digits_but_gpt2_does_not():
  # "12" is a merge here, so only a digit-splitting pre-tokenizer keeps "1" and "2" apart.
  md = _metadata(**{"tokenizer.ggml.merges": ["1 2"]})
  md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["12"]
  md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [1]
  assert tokenizer_lib.tokenizer_from_gguf(md).encode("12").tokens == ["1", "2"]
  md["tokenizer.ggml.pre"] = "gpt-2"
  assert tokenizer_lib.tokenizer_from_gguf(md).encode("12").tokens == ["12"]


def test_add_bos_token():
  tok = tokenizer_lib.tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.add_bos_token": True}))
  assert tok.encode("cat").ids[0] == 1


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.model", "llama", "tokenizer.ggml.model='llama' is not supported"),
    ("tokenizer.ggml.pre", "qwen2", "tokenizer.ggml.pre='qwen2' is not supported"),
])
def test_unsupported_tokenizers_raise(key, value, match):
  with pytest.raises(ValueError, match=match):
    tokenizer_lib.tokenizer_from_gguf(_metadata(**{key: value}))


@pytest.fixture(scope="module")
def smollm2_metadata():
  """SmolLM2's GGUF metadata, parsed once for the module (~10 s of pure Python)."""
  return gguf_file.read_gguf_metadata(gguf_file.smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata):
  return tokenizer_lib.smollm2_tokenizer(), smollm2_metadata["tokenizer.ggml.tokens"]


@pytest.mark.assets
@pytest.mark.parametrize("text", [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\n\nIt's 9:30, isn't it?",
    "  leading spaces,\ttabs\r\nand trailing  ",
    "Prices rose 12.5% in 2024 (from $1,999 to $2,249).",
    "naïve café — 日本語, Ελληνικά, emoji 🙂👍🏽, math ∑x² ≤ ½",
    "<|im_start|>user\nHi there!<|im_end|>\n",
])
def test_smollm2_round_trip(smollm2, text):
  tok, _ = smollm2
  assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.assets
def test_smollm2_ids_match_vocab(smollm2):
  tok, vocab = smollm2
  ids = vocab.index
  assert tok.encode("Hello world").ids == [ids("Hello"), ids("Ġworld")] == [19556, 905]
  # No BOS (add_bos_token is False); digits are single tokens, the space stands alone.
  assert tok.encode("In 2024").ids == [ids(t) for t in ["In", "Ġ", "2", "0", "2", "4"]]
  assert tok.encode("The cat sat.").ids == [ids(t) for t in ["The", "Ġcat", "Ġsat", "."]]


@pytest.mark.assets
@pytest.mark.parametrize("word", [" great", " terrible", " good", " bad", " Paris"])
def test_smollm2_label_words_are_single_tokens(smollm2, word):
  tok, vocab = smollm2
  assert tok.encode(word).ids == [vocab.index("Ġ" + word[1:])]


@pytest.mark.assets
def test_smollm2_special_tokens(smollm2):
  tok, vocab = smollm2
  for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
    assert vocab[i] == t and tok.encode(t).ids == [i] and tok.token_to_id(t) == i
  assert tok.encode("<|im_start|>user\n").ids == [1, vocab.index("user"), vocab.index("Ċ")]
  assert tok.decode(tok.encode("<|im_start|>Hi<|im_end|>").ids) == "Hi"


@pytest.mark.assets
def test_smollm2_disk_cache_equals_the_fresh_build_and_survives_a_torn_file(
    tmp_path, monkeypatch, smollm2_metadata):
  """The cached JSON restores the very tokenizer the GGUF builds; a torn file is rebuilt."""
  gguf = gguf_file.smollm2_gguf_path()  # the real asset; only the tokenizer cache moves
  metadata = smollm2_metadata
  monkeypatch.setattr(gguf_file, "smollm2_gguf_path", lambda: gguf)
  monkeypatch.setattr(gguf_file, "read_gguf_metadata", lambda path: metadata)
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  fresh = tokenizer_lib.tokenizer_from_gguf(metadata)
  tokenizer_lib.smollm2_tokenizer.cache_clear()
  built = tokenizer_lib.smollm2_tokenizer()          # builds and writes the cache
  (cached,) = (tmp_path / "tokenizers").glob("*.json")
  tokenizer_lib.smollm2_tokenizer.cache_clear()
  loaded = tokenizer_lib.smollm2_tokenizer()         # reads it back
  text = "<|im_start|>user\nPrices rose 12.5% in 2024<|im_end|>"
  for tok in (built, loaded):
    assert tok.to_str() == fresh.to_str()
    assert tok.encode(text).ids == fresh.encode(text).ids
  cached.write_text("{not json")
  tokenizer_lib.smollm2_tokenizer.cache_clear()
  assert tokenizer_lib.smollm2_tokenizer().to_str() == fresh.to_str()
  assert cached.read_text() == fresh.to_str()
  tokenizer_lib.smollm2_tokenizer.cache_clear()
