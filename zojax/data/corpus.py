"""A small English corpus for language-model pretraining, packed into rows.

Three sources, each from a Debian package (see third_party/corpus/NOTICE.md):

  austen    Jane Austen's six novels (r-cran-janeaustenr), one document per novel.
  kjv       the King James Bible (bible-kjv-text, decoded by bible-kjv's `bible` program),
            one document per book: a verse per line, a blank line between chapters.
  fortunes  the fortune(6) cookie files (fortunes, fortunes-min), one document per file.

Instead of the Debian packages, `ZOJAX_CORPUS_DIR` may name a directory of plain .txt
files, each one document (source "local")::

  rows = packed_sequences(smollm2_tokenizer(), 512, "train")   # int32 [N, 513]
  inputs, targets = rows[:, :-1], rows[:, 1:]
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import lzma
import os
import pathlib
import platform
import re
import subprocess
import warnings
import zlib

import numpy as np
import rdata
import tokenizers

from zojax.data import fetch

log = logging.getLogger(__name__)

CORPUS_DIR_ENV = "ZOJAX_CORPUS_DIR"
EOS_ID = 2  # SmolLM2's <|im_end|>, its GGUF's eos_token_id.
# Bump when documents, the split rule or packing change, to invalidate cached .npy files.
_VERSION = "corpus-v1"

_DEBIAN_ASSETS = ("janeaustenr", "bible-kjv-text", "bible-kjv", "fortunes", "fortunes-min")
_AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr"
# The package's data objects, in publication order.
_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
           "persuasion")
_FORTUNE_DIR = "usr/share/games/fortunes"
# The whole Bible as one reference range; `bible -f` prints "Ge1:1 In the beginning ...".
_KJV_RANGE = "Gen1:1-Rev22:21"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


# --------------------------------------------------------------------------- Jane Austen


def _read_lazyload_db(rdx: pathlib.Path, rdb: pathlib.Path) -> dict[str, object]:
  """Reads every variable of an R lazy-load database (what R installs for LazyData)."""
  # rdata warns that a lazy-load chunk has no RDS/RDA magic; it is a bare serialization.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    index = rdata.read_rds(rdx)
    db = rdb.read_bytes()
    compressed = int(np.asarray(index["compressed"]).ravel()[0])
    out = {}
    for name, (start, length) in index["variables"].items():
      chunk = db[start:start + length]
      size, body = int.from_bytes(chunk[:4], "big"), chunk[4:]
      # R's lazyLoadDBfetch: compressed=TRUE is zlib; 2 and 3 add a one-byte method tag.
      if compressed in (2, 3):
        method, body = body[:1], body[1:]
        unpack = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                  b"0": bytes}.get(method)
        if unpack is None:
          raise fetch.AssetError(f"{rdb}: variable {name!r} has unknown compression {method!r}")
        body = unpack(body)
      elif compressed:
        body = zlib.decompress(body)
      if len(body) != size:
        raise fetch.AssetError(f"{rdb}: variable {name!r} unpacks to {len(body)} bytes, "
                               f"its header says {size}")
      out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(body))
  return out


def _austen_documents() -> list[str]:
  root = fetch.fetch("janeaustenr") / _AUSTEN_DIR / "data"
  rdx, rdb = root / "Rdata.rdx", root / "Rdata.rdb"
  if not (rdx.exists() and rdb.exists()):
    raise fetch.AssetError(f"asset 'janeaustenr': no lazy-load data (Rdata.rdx/.rdb) in {root}")
  novels = _read_lazyload_db(rdx, rdb)
  missing = [n for n in _NOVELS if n not in novels]
  if missing:
    raise fetch.AssetError(f"asset 'janeaustenr': {rdb} lacks {missing}; it has {sorted(novels)}")
  return ["\n".join(str(line) for line in novels[n]) for n in _NOVELS]


# --------------------------------------------------------------------------- King James Bible


def _kjv_cache_path() -> pathlib.Path:
  return fetch.data_dir() / "corpus" / f"kjv-{fetch.ASSETS['bible-kjv-text'].version}.txt"


def _kjv_text() -> str:
  """The KJV as `bible -f` prints it, one "Ref text" line per verse; cached as a .txt."""
  cached = _kjv_cache_path()
  if cached.exists():
    return cached.read_text(encoding="utf-8")
  data = fetch.fetch("bible-kjv-text") / "usr/lib"
  binary = fetch.fetch("bible-kjv") / "usr/bin/bible"
  cannot = (f"the KJV text is decoded by Debian's `bible` program ({binary}), an amd64 Linux "
            f"binary needing libreadline8")
  fix = f"copy {cached.name} from a machine where it ran into {cached.parent}/"
  if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
    raise fetch.AssetError(f"{cannot}, which cannot run on {platform.system()} "
                           f"{platform.machine()}; {fix}")
  try:
    # -p takes a space-separated path list, so run in the data directory and pass ".".
    proc = subprocess.run([str(binary), "-f", "-p", ".", _KJV_RANGE], cwd=data,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise fetch.AssetError(f"{cannot}; running it failed ({e}); {fix}") from None
  if proc.returncode != 0 or not proc.stdout:
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
    raise fetch.AssetError(f"{cannot}; it exited with {proc.returncode} ({err[0]}); {fix}")
  text = proc.stdout.decode("ascii")  # The data file is 7-bit ASCII.
  cached.parent.mkdir(parents=True, exist_ok=True)
  tmp = cached.with_suffix(".partial")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(cached)
  return text


def _kjv_documents() -> list[str]:
  books: dict[str, dict[str, list[str]]] = {}
  for lineno, line in enumerate(_kjv_text().splitlines(), start=1):
    m = _VERSE.match(line)
    if m is None:
      raise fetch.AssetError(f"KJV line {lineno} is not 'BookC:V text': {line[:60]!r}")
    book, chapter, _, verse = m.groups()
    books.setdefault(book, {}).setdefault(chapter, []).append(verse)
  if len(books) != 66:
    raise fetch.AssetError(f"KJV: expected 66 books, found {len(books)}")
  # A verse per line, a blank line between chapters (the paragraphs `split_corpus` sees).
  return ["\n\n".join("\n".join(verses) for verses in chapters.values())
          for chapters in books.values()]


# --------------------------------------------------------------------------- fortunes


def _fortune_documents() -> list[str]:
  docs = []
  for asset in ("fortunes", "fortunes-min"):
    root = fetch.fetch(asset) / _FORTUNE_DIR
    for path in sorted(root.iterdir()):
      # .dat: strfile's binary index; .u8: symlinks to the same text; off/: offensive ones.
      if path.suffix in (".dat", ".u8") or path.is_symlink() or not path.is_file():
        continue
      raw = path.read_bytes()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      entries = [e.strip("\n") for e in re.split(r"^%$", text, flags=re.M)]
      docs.append("\n\n".join(e for e in entries if e.strip()))
  if not docs:
    raise fetch.AssetError("assets 'fortunes'/'fortunes-min': no fortune files found")
  return docs


# --------------------------------------------------------------------------- documents


def _corpus_dir() -> pathlib.Path | None:
  value = os.environ.get(CORPUS_DIR_ENV)
  if not value:
    return None
  path = pathlib.Path(value).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"{CORPUS_DIR_ENV}={value!r} is not a directory")
  return path


def _local_documents(root: pathlib.Path) -> dict[str, list[str]]:
  files = sorted(root.glob("*.txt"))
  if not files:
    raise FileNotFoundError(f"{CORPUS_DIR_ENV}={str(root)!r} holds no .txt files")
  return {"local": [f.read_text(encoding="utf-8", errors="replace") for f in files]}


def corpus_documents() -> dict[str, list[str]]:
  """The corpus as source name -> documents.

  Returns:
    {"austen": 6 novels, "fortunes": 43 cookie files, "kjv": 66 books}, or
    {"local": one document per .txt file} when `ZOJAX_CORPUS_DIR` is set.

  Raises:
    AssetError: a Debian package is missing and cannot be fetched, or the `bible` program
      cannot run here; the message names `ZOJAX_CORPUS_DIR` as the alternative.
    FileNotFoundError: `ZOJAX_CORPUS_DIR` is not a directory of .txt files.
  """
  local = _corpus_dir()
  if local is not None:
    return _local_documents(local)
  try:
    return {"austen": _austen_documents(), "fortunes": _fortune_documents(),
            "kjv": _kjv_documents()}
  except fetch.AssetError as e:
    raise fetch.AssetError(
        f"the corpus needs the Debian packages {', '.join(_DEBIAN_ASSETS)} "
        f"(`{fetch.FETCH_COMMAND} {' '.join(_DEBIAN_ASSETS)}`); alternatively set "
        f"{CORPUS_DIR_ENV} to a directory of plain .txt files (each file one document); "
        f"the error was: {e}") from e


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
  """Cuts a document into a head and a tail of about `val_fraction` of its characters.

  The cut is at the first paragraph break (blank line) at or after the target offset, or
  failing that the first line break, so no line is shared by the two parts.

  Args:
    text: the document.
    val_fraction: target share of characters in the tail.

  Returns:
    (head, tail) with head + tail == text; the tail is empty for a short last line.
  """
  target = int(round(len(text) * (1.0 - val_fraction)))
  for sep in ("\n\n", "\n"):
    cut = text.find(sep, target)
    if cut != -1:
      cut += len(sep)
      return text[:cut], text[cut:]
  return text, ""


_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_NGRAM = 13  # Word n-gram length used to find near-duplicates (as in GPT-3's decontamination).
_MAX_SHARED = 0.2  # Share of a paragraph's n-grams found in train above which it is dropped.


def _ngram_hashes(words: list[str], word_ids: dict[str, int]) -> np.ndarray:
  """uint64 hashes of every run of `_NGRAM` words; deterministic, unlike Python's hash()."""
  ids = np.asarray([word_ids.setdefault(w, len(word_ids)) for w in words], np.uint64)
  n = len(ids) - _NGRAM + 1
  if n <= 0:
    return np.zeros(0, np.uint64)
  h = np.zeros(n, np.uint64)
  for j in range(_NGRAM):  # Polynomial hash; uint64 arithmetic wraps modulo 2**64.
    h = h * np.uint64(1_000_003) + ids[j:j + n]
  return h


def _contains(sorted_set: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Elementwise `x in sorted_set` (np.isin re-sorts the large array on every call)."""
  if not len(sorted_set):
    return np.zeros(x.shape, bool)
  at = np.minimum(np.searchsorted(sorted_set, x), len(sorted_set) - 1)
  return sorted_set[at] == x


def split_corpus(
    documents: dict[str, list[str]], val_fraction: float
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """Holds out the tail of every document for validation, minus near-duplicates of train.

  Each document is cut by `split_document`. A validation paragraph (blank-line separated)
  is then dropped if more than 20% of its word 13-grams (lower-cased) occur anywhere in the
  train text of any source: the fortune files repeat some fortunes, and the same text in
  both splits would make validation loss measure memorization.

  Args:
    documents: from `corpus_documents`.
    val_fraction: target share of each document held out.

  Returns:
    (train, validation), each source -> one text per document (possibly empty).
  """
  train = {s: [] for s in documents}
  tails = {s: [] for s in documents}
  for source, docs in documents.items():
    for doc in docs:
      head, tail = split_document(doc, val_fraction)
      train[source].append(head)
      tails[source].append(tail)
  word_ids: dict[str, int] = {}
  seen = np.unique(np.concatenate(
      [_ngram_hashes(t.lower().split(), word_ids) for ts in train.values() for t in ts]))
  validation = {s: [] for s in documents}
  dropped = 0
  for source, ts in tails.items():
    for tail in ts:
      kept = []
      for paragraph in _PARAGRAPH_BREAK.split(tail):
        h = _ngram_hashes(paragraph.lower().split(), word_ids)
        if len(h) and _contains(seen, h).mean() > _MAX_SHARED:
          dropped += 1
        else:
          kept.append(paragraph)
      validation[source].append("\n\n".join(kept))
  log.info("split_corpus: dropped %d validation paragraphs that repeat train text", dropped)
  return train, validation


# --------------------------------------------------------------------------- packing


def _source_key() -> str:
  """Identifies the corpus text without reading it, for the cache key."""
  local = _corpus_dir()
  if local is not None:
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(local.glob("*.txt"))]
    return "local-" + hashlib.sha256(repr((str(local.resolve()), stats)).encode()).hexdigest()[:12]
  shas = [fetch.ASSETS[a].sha256 for a in _DEBIAN_ASSETS]
  return "debian-" + hashlib.sha256(" ".join(shas).encode()).hexdigest()[:12]


def _cache_path(tokenizer: tokenizers.Tokenizer, seq_len: int, split: str, val_fraction: float,
                eos_id: int) -> pathlib.Path:
  # The vocab size alone cannot tell two tokenizers apart; the serialized one can.
  tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
  name = (f"{_VERSION}-{_source_key()}-vocab{tokenizer.get_vocab_size()}-{tok_hash}"
          f"-eos{eos_id}-len{seq_len}-{split}-val{val_fraction:g}.npy")
  return fetch.data_dir() / "corpus" / name


def _check_split(split: str, val_fraction: float) -> None:
  if split not in ("train", "validation"):
    raise ValueError(f"{split=} must be 'train' or 'validation'")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"{val_fraction=} must be in (0, 1)")


def token_streams(
    tokenizer: tokenizers.Tokenizer, split: str, *, val_fraction: float = 0.02,
    eos_id: int = EOS_ID,
) -> dict[str, np.ndarray]:
  """Each source's `split` part as one int32 token stream, each document followed by EOS."""
  _check_split(split, val_fraction)
  train, validation = split_corpus(corpus_documents(), val_fraction)
  streams = {}
  for source, texts in (train if split == "train" else validation).items():
    texts = [t for t in texts if t.strip()]
    pieces = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
      pieces += [np.asarray(enc.ids, np.int32), np.asarray([eos_id], np.int32)]
    streams[source] = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  return streams


def packed_sequences(
    tokenizer: tokenizers.Tokenizer, seq_len: int, split: str, *, val_fraction: float = 0.02,
    eos_id: int = EOS_ID,
) -> np.ndarray:
  """Tokenized corpus packed into rows of seq_len + 1 tokens, cached as .npy.

  The validation split is the tail of every document (`split_corpus`), not whole held-out
  documents: with six novels, whole documents would leave a source out of one split. No
  text position is in both splits, and validation paragraphs that repeat train text
  elsewhere are dropped, so validation loss does not reward memorization.
  The `split` parts of all documents (sources in name order, documents in order) are
  tokenized without special tokens, each followed by `eos_id`, concatenated, and cut into
  consecutive rows; the final partial row is dropped. Rows are in corpus order: shuffle
  them when sampling batches.

  The result is cached under `data_dir()/corpus/`, keyed by the corpus source, the
  tokenizer (vocab size and a hash), `eos_id`, `seq_len`, `split`, `val_fraction` and a
  format version.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (e.g. `zojax.data.tokenizer.smollm2_tokenizer()`).
    seq_len: model context; rows hold seq_len + 1 tokens so that inputs = row[:-1] and
      targets = row[1:].
    split: "train" or "validation".
    val_fraction: share of each document held out for validation, in (0, 1).
    eos_id: separator after each document (SmolLM2: 2, <|im_end|>).

  Returns:
    int32 [N, seq_len + 1].

  Raises:
    ValueError: bad arguments, or the split holds fewer than seq_len + 1 tokens.
    AssetError: see `corpus_documents`.
  """
  _check_split(split, val_fraction)
  if seq_len < 1:
    raise ValueError(f"{seq_len=} must be >= 1")
  path = _cache_path(tokenizer, seq_len, split, val_fraction, eos_id)
  if path.exists():
    return np.load(path)
  streams = token_streams(tokenizer, split, val_fraction=val_fraction, eos_id=eos_id)
  for source, s in streams.items():
    log.info("corpus %s: %s tokens in source %s", split, f"{len(s):,}", source)
  stream = np.concatenate([streams[s] for s in sorted(streams)])
  row = seq_len + 1
  if len(stream) < row:
    raise ValueError(f"the {split} split has {len(stream)} tokens, fewer than {seq_len=} + 1")
  rows = stream[:len(stream) // row * row].reshape(-1, row)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".partial")
  with open(tmp, "wb") as f:
    np.save(f, rows)
  tmp.replace(path)
  return rows


def frequency_remap(train_rows: np.ndarray, vocab_size: int, limit: int) -> tuple[np.ndarray, float]:
  """A token-id map onto the `limit` − 1 most frequent train ids plus one shared bucket.

  For CPU-sized pre-training: a 49k vocabulary would make the output layer most of the
  compute. Counted on the train split only; ties keep the lower id; the bucket (id
  ``limit − 1``) is a regular class. Returns (remap [vocab_size] int32, the share of train
  tokens that keep their own id).
  """
  counts = np.bincount(train_rows.reshape(-1), minlength=vocab_size)
  keep = np.argsort(-counts, kind="stable")[:limit - 1]
  remap = np.full(vocab_size, limit - 1, np.int32)
  remap[keep] = np.arange(limit - 1, dtype=np.int32)
  return remap, float(counts[keep].sum() / counts.sum())
