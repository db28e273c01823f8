"""Batches as a pure function of the step, and padded fixed-shape eval batches.

Shared by every task: the examples are a dict of arrays with one leading dimension N.
Because a training batch depends only on (data, seed, step), the integer step is the
whole data-iterator state, which is what makes checkpoint resume exact.

In a multi-process run each process reads only its rows of every global batch (``rows``,
from `zojax.train.distributed.process_rows`); the global batch stays the same for any
number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# Third word of the SeedSequence, after (seed, purpose): sentiment.py uses purposes 0 and 1.
_BATCH_STREAM = 2


def _num_examples(encoded: dict[str, np.ndarray]) -> int:
  sizes = {k: len(v) for k, v in encoded.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"encoded arrays differ in leading dimension: {sizes}")
  n = next(iter(sizes.values()))
  if n == 0:
    raise ValueError("encoded holds no examples")
  return n


def batch_indices(n: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
  """Example indices of the batch at global `step` (see `batches`)."""
  if batch_size < 1:
    raise ValueError(f"{batch_size=} must be >= 1")
  if step < 0:
    raise ValueError(f"{step=} must be >= 0")
  # Positions in the endless stream epoch 0 permutation, epoch 1 permutation, ...
  pos = np.arange(int(step) * batch_size, (int(step) + 1) * batch_size, dtype=np.int64)
  epoch, offset = np.divmod(pos, n)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epoch):
    perm = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed), _BATCH_STREAM, int(e)])))
    at = epoch == e
    out[at] = perm.permutation(n)[offset[at]]
  return out


def batches(
    encoded: dict[str, np.ndarray], batch_size: int, *, seed: int, step: int,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """The training batch for global step `step`, a pure function of (data, seed, step).

  The examples form an endless stream: a fresh seeded permutation of all N examples per
  epoch, concatenated. Step s takes stream positions [s * B, (s + 1) * B), so a batch may
  span two epochs and epoch = s * B // N. Because nothing else is consumed, the integer step
  is the whole data-iterator state: a run resumed from a checkpoint at step s sees exactly
  the batches an uninterrupted run would.

  Args:
    encoded: from `encode_prompts` (every array has leading dimension N).
    batch_size: B; may exceed N (the batch then spans several epochs).
    seed: the shuffling seed.
    step: the global optimizer step (>= 0).
    rows: positions in the batch to read (this process's share); None: all B.

  Returns:
    `encoded` with every array indexed by the B example indices of this step (or by those
    at `rows`).
  """
  n = _num_examples(encoded)
  idx = batch_indices(n, batch_size, seed=seed, step=step)
  if rows is not None:
    idx = idx[rows]
  return {k: v[idx] for k, v in encoded.items()}


def sampler(encoded: dict[str, np.ndarray], batch_size: int, *,
            seed: int) -> Callable[..., dict[str, np.ndarray]]:
  """``train_batch(step, rows=None)``: `batches` of `encoded` for a task."""
  return lambda step, rows=None: batches(encoded, batch_size, seed=seed, step=step, rows=rows)


def eval_batches(
    encoded: dict[str, np.ndarray], batch_size: int,
    rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Yields fixed-size batches covering every example once, in order.

  The last batch is filled up with copies of its last real example and `weight` 0, so every
  batch has the same shape (one compilation) and weighted sums count each example once.

  Args:
    encoded: from `encode_prompts`.
    batch_size: B.
    rows: positions in each batch to read (this process's share); None: all B.

  Yields:
    `encoded` sliced to B rows (or those at `rows`), plus `weight`: float32, 1 for real
    rows, 0 for padding.
  """
  n = _num_examples(encoded)
  if batch_size < 1:
    raise ValueError(f"{batch_size=} must be >= 1")
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  for start in range(0, n, batch_size):
    idx = start + rows
    weight = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)
    yield {**{k: v[idx] for k, v in encoded.items()}, "weight": weight}
