"""Tests for zojax.data.corpus: documents, the train/validation split, packing and caching."""

import re

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from zojax.data import corpus, fetch

FIRST_VERSE = "In the beginning God created the heaven and the earth."
LAST_VERSE = "The grace of our Lord Jesus Christ be with you all. Amen."


def _word_tokenizer(texts):
  """Word-level tokenizer over `texts`; ids start at 3 so they never collide with EOS (2)."""
  pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
  pieces = sorted({p for t in texts for p, _ in pre.pre_tokenize_str(t)})
  vocab = {"<unk>": 0, "<a>": 1, "<eos>": 2, **{p: i + 3 for i, p in enumerate(pieces)}}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  return tok


@pytest.fixture
def local_corpus(tmp_path, monkeypatch):
  """Three .txt documents under ZOJAX_CORPUS_DIR, and an empty cache root."""
  docs = {
      "b.txt": "\n\n".join(f"Paragraph {i} of the second document, with words." for i in range(40)),
      "a.txt": "\n\n".join(f"Line {i} of the first document here." for i in range(60)),
      "c.txt": "A short third one.\n",
  }
  src = tmp_path / "txt"
  src.mkdir()
  for name, text in docs.items():
    (src / name).write_text(text)
  (src / "ignored.md").write_text("not a .txt file")
  monkeypatch.setenv(corpus.CORPUS_DIR_ENV, str(src))
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path / "cache"))
  return [docs[k] for k in sorted(docs)]


# --------------------------------------------------------------------------- ZOJAX_CORPUS_DIR


def test_corpus_dir_documents(local_corpus):
  assert corpus.corpus_documents() == {"local": local_corpus}


def test_corpus_dir_errors(tmp_path, monkeypatch):
  monkeypatch.setenv(corpus.CORPUS_DIR_ENV, str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="ZOJAX_CORPUS_DIR=.*missing' is not a directory"):
    corpus.corpus_documents()
  monkeypatch.setenv(corpus.CORPUS_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="holds no .txt files"):
    corpus.corpus_documents()


def test_packed_sequences_shapes_and_content(local_corpus):
  tok = _word_tokenizer(local_corpus)
  seq_len = 16
  rows = corpus.packed_sequences(tok, seq_len, "train", val_fraction=0.1)
  assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == seq_len + 1
  # Rows are consecutive pieces of: doc head, EOS, doc head, EOS, ... (tail row dropped).
  train, _ = corpus.split_corpus({"local": local_corpus}, 0.1)
  expected = np.concatenate(
      [np.r_[tok.encode(t, add_special_tokens=False).ids, corpus.EOS_ID] for t in train["local"]])
  assert rows.shape[0] == len(expected) // (seq_len + 1)
  np.testing.assert_array_equal(rows.ravel(), expected[:rows.size])
  assert (rows == corpus.EOS_ID).sum() == (expected[:rows.size] == corpus.EOS_ID).sum() >= 1


def test_packed_sequences_validation_is_the_tail(local_corpus):
  tok = _word_tokenizer(local_corpus)
  val = corpus.packed_sequences(tok, 8, "validation", val_fraction=0.1)
  train = corpus.packed_sequences(tok, 8, "train", val_fraction=0.1)
  text = tok.decode(val.ravel().tolist(), skip_special_tokens=False)
  assert "Line 59 of the first document" in text
  # The first document's last paragraph is in validation only.
  train_text = tok.decode(train.ravel().tolist(), skip_special_tokens=False)
  assert "Line 59" not in train_text and "Line 0 of" in train_text


def test_packed_sequences_cache(local_corpus, monkeypatch):
  tok = _word_tokenizer(local_corpus)
  rows = corpus.packed_sequences(tok, 16, "train")
  cached = list((fetch.data_dir() / "corpus").glob("*.npy"))
  assert len(cached) == 1 and "len16-train-val0.02" in cached[0].name
  assert f"vocab{tok.get_vocab_size()}" in cached[0].name

  def fail(*args, **kwargs):
    raise AssertionError("should have been read from the cache")

  monkeypatch.setattr(corpus, "token_streams", fail)
  np.testing.assert_array_equal(corpus.packed_sequences(tok, 16, "train"), rows)
  with pytest.raises(AssertionError, match="from the cache"):
    corpus.packed_sequences(tok, 16, "validation")  # A different key is not a hit.


def test_packed_sequences_bad_arguments(local_corpus):
  tok = _word_tokenizer(local_corpus)
  with pytest.raises(ValueError, match="split='test' must be"):
    corpus.packed_sequences(tok, 16, "test")
  with pytest.raises(ValueError, match="val_fraction=0.0 must be in"):
    corpus.packed_sequences(tok, 16, "train", val_fraction=0.0)
  with pytest.raises(ValueError, match="fewer than seq_len=100000"):
    corpus.packed_sequences(tok, 100_000, "validation")


def test_split_document_cuts_at_paragraph_then_line():
  head, tail = corpus.split_document("aaaa\nbbbb\n\ncccc\ndddd", 0.5)
  assert (head, tail) == ("aaaa\nbbbb\n\n", "cccc\ndddd")
  head, tail = corpus.split_document("aaaa\nbbbb\ncccc\ndddd", 0.3)
  assert (head, tail) == ("aaaa\nbbbb\ncccc\n", "dddd")
  assert corpus.split_document("no breaks", 0.5) == ("no breaks", "")


def test_split_corpus_drops_validation_paragraphs_repeated_in_train():
  repeated = "the same fortune told in two files is the same fortune in both splits of it"
  docs = {"fortunes": ["\n\n".join([repeated, "x " * 200, "a fresh closing line of text here"]),
                       "\n\n".join(["y " * 200, repeated])]}
  assert corpus.split_document(docs["fortunes"][1], 0.3)[1] == repeated
  train, val = corpus.split_corpus(docs, 0.3)
  assert repeated in train["fortunes"][0]
  assert val["fortunes"] == ["a fresh closing line of text here", ""]


# --------------------------------------------------------------------------- failures


def test_fetch_failure_names_the_alternative(monkeypatch):
  monkeypatch.delenv(corpus.CORPUS_DIR_ENV, raising=False)

  def no_network(name):
    raise fetch.AssetError(f"asset {name!r} is not cached and could not be fetched: offline")

  monkeypatch.setattr(fetch, "fetch", no_network)
  with pytest.raises(fetch.AssetError) as e:
    corpus.corpus_documents()
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("the corpus needs the Debian packages janeaustenr, bible-kjv-text")
  assert "ZOJAX_CORPUS_DIR" in msg and "offline" in msg


@pytest.mark.assets
def test_bible_binary_unavailable(tmp_path, monkeypatch):
  paths = {a: fetch.fetch(a) for a in ("bible-kjv", "bible-kjv-text")}
  monkeypatch.setattr(fetch, "fetch", paths.__getitem__)
  monkeypatch.setattr(corpus, "_kjv_cache_path", lambda: tmp_path / "kjv-4.38.txt")
  monkeypatch.setattr(corpus.platform, "machine", lambda: "aarch64")
  with pytest.raises(fetch.AssetError, match="cannot run on Linux aarch64; copy kjv-4.38.txt"):
    corpus._kjv_text()
  monkeypatch.undo()
  monkeypatch.setattr(fetch, "fetch", paths.__getitem__)
  monkeypatch.setattr(corpus, "_kjv_cache_path", lambda: tmp_path / "kjv-4.38.txt")
  assert corpus._kjv_text().startswith("Ge1:1 " + FIRST_VERSE)
  assert (tmp_path / "kjv-4.38.txt").exists()


# --------------------------------------------------------------------------- the real corpus


@pytest.fixture(scope="module")
def documents():
  with pytest.MonkeyPatch.context() as m:
    m.delenv(corpus.CORPUS_DIR_ENV, raising=False)  # The Debian sources, even if it is set.
    return corpus.corpus_documents()


@pytest.mark.assets
def test_sources_hold_known_text(documents):
  assert sorted(documents) == ["austen", "fortunes", "kjv"]
  assert [len(documents[s]) for s in ("austen", "fortunes", "kjv")] == [6, 43, 66]
  for docs in documents.values():
    assert all(len(d) > 300 for d in docs)
  austen = "\n".join(documents["austen"])
  assert "It is a truth universally acknowledged, that a single man" in austen
  assert "Emma Woodhouse, handsome, clever, and rich" in austen
  assert documents["kjv"][0].startswith(FIRST_VERSE + "\n")
  assert documents["kjv"][-1].endswith(LAST_VERSE)
  assert "Jesus wept." in documents["kjv"][42]  # John 11:35
  fortunes = "\n".join(documents["fortunes"])
  assert "It was gilt by association." in fortunes
  assert not re.search(r"^%$", fortunes, re.M) and "\x00" not in fortunes


@pytest.mark.assets
def test_real_split_is_disjoint(documents):
  train, val = corpus.split_corpus(documents, 0.02)
  kjv_train, kjv_val = "\n".join(train["kjv"]), "\n".join(val["kjv"])
  assert FIRST_VERSE in kjv_train and FIRST_VERSE not in kjv_val
  assert LAST_VERSE in kjv_val and LAST_VERSE not in kjv_train
  for source, docs in documents.items():
    held = sum(len(v) for v in val[source]) / sum(len(d) for d in docs)
    assert 0.01 < held < 0.025, (source, held)
    for doc, head, tail in zip(docs, train[source], val[source]):
      assert doc.startswith(head)
      for paragraph in tail.split("\n\n"):
        assert paragraph in doc[len(head):]
    # No validation paragraph of 13+ words appears verbatim in any train text.
    norm = lambda s: " ".join(s.split())
    train_text = norm("\n".join(t for ts in train.values() for t in ts))
    for tail in val[source]:
      for paragraph in re.split(r"\n[ \t]*\n", tail):
        if len(paragraph.split()) >= 13:
          assert norm(paragraph) not in train_text, (source, paragraph[:80])


@pytest.mark.assets
def test_real_validation_rows_with_smollm2(tmp_path, monkeypatch):
  from zojax.data.tokenizer import smollm2_tokenizer

  monkeypatch.delenv(corpus.CORPUS_DIR_ENV, raising=False)
  tok = smollm2_tokenizer()
  monkeypatch.setattr(corpus, "_cache_path", lambda *a: tmp_path / "val.npy")
  rows = corpus.packed_sequences(tok, 256, "validation")
  assert rows.dtype == np.int32 and rows.shape[1] == 257 and 150 < rows.shape[0] < 250
  assert (tmp_path / "val.npy").exists()
  # The stream starts with the tail of the first novel, Sense and Sensibility.
  assert tok.decode(rows[0].tolist()).startswith("What she would engage to do towards augmenting")
  # One EOS after each non-empty tail: 6 novels, 42 of 43 fortune files, 56 of 66 books.
  assert 100 <= (rows == corpus.EOS_ID).sum() <= 104
