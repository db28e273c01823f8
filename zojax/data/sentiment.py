"""Movie-review sentence polarity (Rotten Tomatoes snippets), split and prompted the MeZO way.

The 10,605 snippets are Pang & Lee's review sentences as re-rated by Hutto & Gilbert
(2014, VADER): each has the mean score of 20+ human raters on [-4, 4]. They ship in the
vaderSentiment sdist (asset "vadersentiment"); label 1 (positive) iff the score is > 0.

The protocol follows MeZO (Malladi et al., 2023), after LM-BFF (Gao et al., 2021): a
fixed test set of 1,000 examples, and for each seed k examples per class for training
plus k per class for validation, drawn from the remaining pool::

  splits = sentiment_splits(seed=0)           # fixed; vary only the k-shot seed
  data = kshot(splits, k=16, seed=13)
  enc = encode_prompts(tok, data.train, max_len=64, pad_id=0)
  batch = batching.batches(enc, 16, seed=13, step=step)

Every random choice uses numpy's `Generator(PCG64(SeedSequence([seed, purpose])))`, which
is platform-independent (unlike Python's salted `hash()`). numpy may change a Generator
method's stream in a new release; the tests pin the split's first ids to catch that.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import tarfile
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tokenizers

from zojax.data import fetch

log = logging.getLogger(__name__)

_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MEMBER = "movieReviewSnippets_GroundTruth.txt"

# Second SeedSequence word, so that the same user seed drives unrelated streams.
_SPLIT_STREAM, _KSHOT_STREAM = 0, 1  # batching.py uses stream 2


@dataclasses.dataclass(frozen=True)
class Examples:
  """A struct of arrays, one entry per snippet.

  Attributes:
    id: int32 [N], the snippet's id in the ground-truth file (1-based, unique).
    text: object [N] of `str`, the snippet.
    label: int32 [N], 1 if the mean human score is > 0, else 0.
    score: float32 [N], the mean human score on [-4, 4].
  """

  id: np.ndarray
  text: np.ndarray
  label: np.ndarray
  score: np.ndarray

  def __len__(self) -> int:
    return len(self.id)

  def take(self, index: np.ndarray) -> Examples:
    """Returns the examples at `index` (an int array or a boolean mask)."""
    return Examples(*(np.asarray(a)[index] for a in dataclasses.astuple(self)))


class Splits(NamedTuple):
  train: Examples
  dev: Examples
  test: Examples


def _ground_truth_bytes() -> bytes:
  root = fetch.fetch("vadersentiment")
  archive = root / _ARCHIVE
  if not archive.exists():
    raise fetch.AssetError(f"asset 'vadersentiment': {_ARCHIVE} is missing from {root}")
  with tarfile.open(archive) as tar:
    # The member sits under hutto_ICWSM_2014/ in 3.3.2; match the basename to not depend on it.
    members = [m for m in tar.getmembers() if pathlib.PurePosixPath(m.name).name == _MEMBER]
    if len(members) != 1:
      raise fetch.AssetError(
          f"asset 'vadersentiment': expected one {_MEMBER} in {archive.name}, "
          f"found {len(members)}")
    return tar.extractfile(members[0]).read()


def load_sentiment() -> Examples:
  """Loads all 10,605 rated snippets, in file order.

  Returns:
    `Examples` with every row of movieReviewSnippets_GroundTruth.txt. Two texts occur
    twice (under different ids, same label); `sentiment_splits` keeps only the first.

  Raises:
    AssetError: the asset is missing or a row does not parse.
  """
  raw = _ground_truth_bytes()
  # The 3.3.2 file is valid UTF-8 (CRLF lines; a few accents and curly quotes). latin-1 is a
  # fallback for other copies of the archive: it decodes any byte, so it cannot fail.
  try:
    content = raw.decode("utf-8")
  except UnicodeDecodeError:
    log.warning("%s is not UTF-8; decoding it as latin-1", _MEMBER)
    content = raw.decode("latin-1")
  ids, texts, scores = [], [], []
  for lineno, line in enumerate(content.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    try:
      if len(fields) != 3:
        raise ValueError(f"{len(fields)} tab-separated fields, expected 3 (id, score, text)")
      ids.append(int(fields[0]))
      scores.append(float(fields[1]))
    except ValueError as e:
      raise fetch.AssetError(f"{_MEMBER} line {lineno}: {e}") from None
    texts.append(fields[2].strip())
  score = np.asarray(scores, np.float32)
  text = np.empty(len(texts), object)
  text[:] = texts
  return Examples(
      id=np.asarray(ids, np.int32), text=text, label=(score > 0).astype(np.int32), score=score)


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream])))


def _per_class_counts(label: np.ndarray, size: int) -> np.ndarray:
  """Splits `size` over classes in proportion to `label`'s counts (largest remainder)."""
  counts = np.bincount(label, minlength=2)
  exact = size * counts / counts.sum()
  out = np.floor(exact).astype(np.int64)
  # Ties broken by class index, so the rule is deterministic.
  order = np.lexsort((np.arange(len(exact)), -(exact - out)))
  out[order[:size - out.sum()]] += 1
  return out


def sentiment_splits(seed: int = 0, *, test_size: int = 1000, dev_size: int = 500) -> Splits:
  """Fixed, seeded, label-stratified train/dev/test split of the de-duplicated snippets.

  Identical texts are collapsed to their first id before splitting, so that no text can be
  in two splits. Each class is shuffled on its own and its share of test and dev is
  proportional to its frequency, so every split keeps the overall class ratio (to within
  one example per class). Examples within a split are sorted by id.

  Args:
    seed: fixes the split. MeZO keeps the test set fixed across runs and varies only the
      k-shot seed, so keep this at its default and vary the seed of `kshot`.
    test_size: number of test examples (MeZO uses 1,000).
    dev_size: number of dev examples.

  Returns:
    `Splits(train, dev, test)`; train holds every remaining example.
  """
  data = load_sentiment()
  _, first = np.unique(data.text.astype(str), return_index=True)
  data = data.take(np.sort(first))
  if test_size + dev_size >= len(data):
    raise ValueError(f"{test_size=} + {dev_size=} leaves no training examples of {len(data)}")
  rng = _rng(seed, _SPLIT_STREAM)
  n_test = _per_class_counts(data.label, test_size)
  n_dev = _per_class_counts(data.label, dev_size)
  parts = {"train": [], "dev": [], "test": []}
  for c in (0, 1):
    idx = rng.permutation(np.flatnonzero(data.label == c))
    parts["test"].append(idx[:n_test[c]])
    parts["dev"].append(idx[n_test[c]:n_test[c] + n_dev[c]])
    parts["train"].append(idx[n_test[c] + n_dev[c]:])
  return Splits(**{k: data.take(np.sort(np.concatenate(v))) for k, v in parts.items()})


def kshot(splits: Splits, k: int, seed: int) -> Splits:
  """MeZO's k-shot sample: k per class for train and k per class for dev, test unchanged.

  Both are drawn, disjoint, from `splits.train` (the pool); `splits.dev` is not used, as in
  MeZO, where the small dev set comes from the same sample as the training set.

  Args:
    splits: from `sentiment_splits`.
    k: examples per class (MeZO: 16 or 512).
    seed: which sample (MeZO reports the mean over 5 seeds).

  Returns:
    `Splits(train, dev, test)` with 2k, 2k and `len(splits.test)` examples.

  Raises:
    ValueError: the pool has fewer than 2k examples of some class.
  """
  if k < 1:
    raise ValueError(f"{k=} must be >= 1")
  pool = splits.train
  rng = _rng(seed, _KSHOT_STREAM)
  train, dev = [], []
  for c in (0, 1):
    idx = np.flatnonzero(pool.label == c)
    if len(idx) < 2 * k:
      raise ValueError(
          f"{k=} needs 2*k={2 * k} training-pool examples of label {c}, the pool has {len(idx)}")
    idx = rng.permutation(idx)
    train.append(idx[:k])
    dev.append(idx[k:2 * k])
  return Splits(
      train=pool.take(np.sort(np.concatenate(train))),
      dev=pool.take(np.sort(np.concatenate(dev))),
      test=splits.test)


def _ids(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
  return tokenizer.encode(text, add_special_tokens=False).ids


def encode_prompts(
    tokenizer: tokenizers.Tokenizer,
    examples: Examples,
    *,
    max_len: int,
    pad_id: int,
    template: str = "{sentence} It was",
    label_words: Sequence[str] = (" terrible", " great"),
) -> dict[str, np.ndarray]:
  """Tokenizes MeZO-style cloze prompts, scored by the next-token logits of the label words.

  The prompt is `template` with the snippet as `{sentence}`, e.g. "A fine film. It was";
  the model's prediction is argmax over `candidates` of the logits at `last_index` (MeZO's
  SST-2 template with label words " terrible"/" great"). No BOS token is added.

  The text up to and including `{sentence}` and the suffix after it are tokenized
  separately and concatenated; with a suffix starting with a space (" It was") this equals
  tokenizing the whole prompt for byte-level BPE. A prompt longer than `max_len` loses
  tokens from the start of the sentence (text before `{sentence}` is kept), so the suffix
  the label words follow stays intact; the `truncated` field marks those rows.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (e.g. `zojax.data.tokenizer.smollm2_tokenizer()`).
    examples: from `sentiment_splits` or `kshot`.
    max_len: padded length of `tokens`.
    pad_id: fills `tokens` after each prompt; never attended to by `last_index`.
    template: a format string with one `{sentence}` field.
    label_words: one word per label, each exactly one token.

  Returns:
    A dict of numpy arrays with leading dimension N:
      tokens: int32 [N, max_len], right-padded with `pad_id`.
      last_index: int32 [N], position of the prompt's last token.
      label: int32 [N].
      candidates: int32 [N, C], the label words' token ids (index = label).
      id: int32 [N], the example ids.
      truncated: bool [N], whether the sentence was cut to fit `max_len`.

  Raises:
    ValueError: a bad template, a label word that is not one token, or `max_len` too short
      for the template alone.
  """
  if template.count("{sentence}") != 1:
    raise ValueError(f"template {template!r} must contain '{{sentence}}' exactly once")
  prefix, suffix = template.split("{sentence}")
  candidates = []
  for word in label_words:
    ids = _ids(tokenizer, word)
    if len(ids) != 1:
      raise ValueError(
          f"label word {word!r} is {len(ids)} tokens {ids} under this tokenizer; it must be one")
    candidates.append(ids[0])
  suffix_ids = _ids(tokenizer, suffix) if suffix else []
  # Tokens kept from the front of "prefix + sentence" when the sentence is cut: the prefix
  # without its trailing space, whose space a byte-level BPE attaches to the next word.
  keep = len(_ids(tokenizer, prefix.rstrip())) if prefix.strip() else 0
  if keep + len(suffix_ids) >= max_len:
    raise ValueError(
        f"{max_len=} leaves no room for a sentence: the template alone is "
        f"{keep + len(suffix_ids)} tokens")

  n = len(examples)
  tokens = np.full((n, max_len), pad_id, np.int32)
  last_index = np.empty(n, np.int32)
  truncated = np.zeros(n, bool)
  heads = tokenizer.encode_batch(
      [prefix + str(s) for s in examples.text], add_special_tokens=False)
  for i, head in enumerate(heads):
    head_ids = head.ids
    excess = len(head_ids) + len(suffix_ids) - max_len
    if excess > 0:
      head_ids = head_ids[:keep] + head_ids[keep + excess:]
      truncated[i] = True
    ids = head_ids + suffix_ids
    tokens[i, :len(ids)] = ids
    last_index[i] = len(ids) - 1
  if truncated.any():
    log.warning("encode_prompts: %d of %d prompts were longer than max_len=%d; their "
                "sentences lost tokens from the start", truncated.sum(), n, max_len)
  return {
      "tokens": tokens,
      "last_index": last_index,
      "label": np.asarray(examples.label, np.int32),
      "candidates": np.tile(np.asarray(candidates, np.int32), (n, 1)),
      "id": np.asarray(examples.id, np.int32),
      "truncated": truncated,
  }
