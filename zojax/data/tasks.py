"""Tasks as the training loop sees them: a batch for every step, and fixed eval sets.

`build(config.task, ...)` turns a task config into a `Task`. Training batches are a pure
function of the step (see `batching.batches`), so resuming needs nothing but the step.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from zojax.data import batching, corpus, rgbd, sentiment, synthetic
from zojax.data.tokenizer import smollm2_tokenizer
from zojax.errors import ConfigError

TASKS = ("sentiment", "corpus", "oriented_bars", "markov", "rgbd_rooms")
eval_batches = batching.eval_batches

# Encoded fields the model reads; the rest (e.g. `truncated`) is bookkeeping.
CLASSIFICATION_FIELDS = ("tokens", "last_index", "candidates", "label")
EVAL_SUBSET_SEED = 20240101


class Task(NamedTuple):
  name: str
  vocab_size: int
  # train_batch(step, rows=None): the batch of `step`, or its `rows` (a process's share).
  train_batch: Callable[..., dict[str, np.ndarray]]
  eval_sets: dict[str, dict[str, np.ndarray]]
  info: dict


def _sentiment(cfg, batch_size: int, seed: int) -> Task:
  tok = smollm2_tokenizer()
  splits = sentiment.sentiment_splits(cfg.split_seed)
  if cfg.k:
    splits = sentiment.kshot(splits, cfg.k, cfg.kshot_seed)
  pad_id = tok.token_to_id("<|endoftext|>")

  def encode(examples, limit=0):
    if limit and limit < len(examples):
      # A fixed random subset: the splits are sorted by id, and ids cluster by label.
      pick = np.random.Generator(np.random.PCG64(EVAL_SUBSET_SEED)).permutation(len(examples))
      examples = examples.take(np.sort(pick[:limit]))
    enc = sentiment.encode_prompts(tok, examples, max_len=cfg.max_len, pad_id=pad_id,
                                   template=cfg.template, label_words=tuple(cfg.label_words))
    return enc, int(enc["truncated"].sum())

  train, train_trunc = encode(splits.train)
  train = {k: train[k] for k in CLASSIFICATION_FIELDS}
  evals, truncated = {}, {"train": train_trunc}
  for name in cfg.eval_splits:
    if name not in ("train", "dev", "test"):
      raise ValueError(f"config key 'task.eval_splits' has {name!r}; use train, dev or test")
    enc, truncated[name] = encode(getattr(splits, name), cfg.eval_limit)
    evals[name] = {k: enc[k] for k in CLASSIFICATION_FIELDS}
  info = {"name": "sentiment", "k": cfg.k, "kshot_seed": cfg.kshot_seed,
          "sizes": {"train": len(train["label"]), **{n: len(e["label"]) for n, e in evals.items()}},
          "truncated": truncated}
  return Task("sentiment", tok.get_vocab_size(),
              batching.sampler(train, batch_size, seed=seed),
              evals, info)


def _lm_rows(rows: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": rows[:, :-1], "targets": rows[:, 1:]}


def _corpus(cfg, batch_size: int, seed: int) -> Task:
  """The packed corpus; ``cfg.vocab_limit`` > 0 maps ids onto the most frequent ones
  (`corpus.frequency_remap`), the task's vocabulary becoming `vocab_limit`."""
  tok = smollm2_tokenizer()
  train = corpus.packed_sequences(tok, cfg.seq_len, "train", val_fraction=cfg.val_fraction)
  val = corpus.packed_sequences(tok, cfg.seq_len, "validation", val_fraction=cfg.val_fraction)
  if cfg.eval_limit:
    val = val[:cfg.eval_limit]
  vocab, info = tok.get_vocab_size(), {}
  limit = cfg.get("vocab_limit", 0)
  if limit:
    if not 2 <= limit <= vocab:
      raise ConfigError(f"config key 'task.vocab_limit'={limit} must be 0 or in [2, {vocab}]")
    remap, coverage = corpus.frequency_remap(train, vocab, limit)
    train, val, vocab = remap[train], remap[val], limit
    info = {"vocab_limit": limit, "train_token_coverage": coverage}
  train = _lm_rows(train)
  info = {"name": "corpus", "seq_len": cfg.seq_len,
          "sizes": {"train": len(train["tokens"]), "validation": len(val)}, **info}
  return Task("corpus", vocab,
              batching.sampler(train, batch_size, seed=seed),
              {"validation": _lm_rows(val)}, info)


def _oriented_bars(cfg, batch_size: int, seed: int) -> Task:
  """Synthetic images (`synthetic.oriented_bars`): train, validation and test drawn from
  independent streams of `cfg.data_seed`, so the sets are fixed while `seed` shuffles."""
  draw = lambda n, stream: synthetic.oriented_bars(
      n, size=cfg.image_size, bar_length=cfg.bar_length, noise=cfg.noise,
      seed=cfg.data_seed, stream=stream)
  train = draw(cfg.num_train, 0)
  evals = {"validation": draw(cfg.num_eval, 1), "test": draw(cfg.num_eval, 2)}
  info = {"name": "oriented_bars", "num_classes": synthetic.NUM_CLASSES,
          "image_size": cfg.image_size, "noise": cfg.noise, "data_seed": cfg.data_seed,
          "sizes": {"train": cfg.num_train, **{k: cfg.num_eval for k in evals}}}
  return Task("oriented_bars", 0,
              batching.sampler(train, batch_size, seed=seed),
              evals, info)


def _rgbd_rooms(cfg, batch_size: int, seed: int) -> Task:
  """Rendered RGB-D rooms (`rgbd.task_sets`): train and test are independent streams of
  `cfg.data_seed`, rendered once into the cache; `seed` shuffles."""
  train, test, info = rgbd.task_sets(cfg)

  def train_batch(step, rows=None):
    kw = {} if rows is None else {"rows": rows}
    return rgbd.as_float(batching.batches(train, batch_size, seed=seed, step=step, **kw))

  return Task("rgbd_rooms", 0, train_batch, {"test": test}, info)


def _markov(cfg, batch_size: int, seed: int) -> Task:
  """Next-token prediction on a random Markov chain (`synthetic.markov_tokens`): train and
  validation drawn from independent streams of `cfg.data_seed`; no download."""
  draw = lambda n, stream: synthetic.markov_tokens(
      n, seq_len=cfg.seq_len, vocab=cfg.vocab_size, successors=cfg.successors,
      seed=cfg.data_seed, stream=stream)
  train = _lm_rows(draw(cfg.num_train, 0))
  info = {"name": "markov", "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
          "successors": cfg.successors, "data_seed": cfg.data_seed,
          "sizes": {"train": cfg.num_train, "validation": cfg.num_eval}}
  return Task("markov", cfg.vocab_size, batching.sampler(train, batch_size, seed=seed),
              {"validation": _lm_rows(draw(cfg.num_eval, 1))}, info)


def build(cfg, *, batch_size: int, seed: int) -> Task:
  if cfg.name == "sentiment":
    return _sentiment(cfg, batch_size, seed)
  if cfg.name == "corpus":
    return _corpus(cfg, batch_size, seed)
  if cfg.name == "oriented_bars":
    return _oriented_bars(cfg, batch_size, seed)
  if cfg.name == "markov":
    return _markov(cfg, batch_size, seed)
  if cfg.name == "rgbd_rooms":
    return _rgbd_rooms(cfg, batch_size, seed)
  raise ValueError(f"config key 'task.name'={cfg.name!r} is not one of {TASKS}")
