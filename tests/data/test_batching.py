"""Step-indexed training batches and padded eval batches."""

import numpy as np

from zojax.data import batching


def _encoded(n):
  return {"x": np.arange(n, dtype=np.int32), "y": np.arange(n, dtype=np.int32)[:, None] * 2}


def test_batches_same_step_same_batch_and_seed_matters():
  enc = _encoded(37)
  a = batching.batches(enc, 8, seed=3, step=11)
  b = batching.batches(enc, 8, seed=3, step=11)
  np.testing.assert_array_equal(a["x"], b["x"])
  np.testing.assert_array_equal(a["y"][:, 0], 2 * a["x"])
  c = batching.batches(enc, 8, seed=4, step=11)
  assert not np.array_equal(a["x"], c["x"])


def test_batches_each_epoch_is_a_permutation():
  n, bs = 37, 8  # Batches straddle epoch boundaries.
  stream = np.concatenate(
      [batching.batches(_encoded(n), bs, seed=0, step=s)["x"] for s in range(4 * n // bs)])
  epochs = stream[:4 * n // bs * bs // n * n].reshape(-1, n)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])


def test_batches_resume_matches_uninterrupted_run():
  enc = _encoded(37)

  def run(start, stop):
    return [batching.batches(enc, 8, seed=5, step=s)["x"] for s in range(start, stop)]

  through = run(0, 20)
  resumed = run(0, 9) + run(9, 20)  # A restart after the checkpoint at step 9.
  np.testing.assert_array_equal(np.stack(through), np.stack(resumed))


def test_batches_larger_than_dataset():
  x = batching.batches(_encoded(5), 12, seed=0, step=0)["x"]
  assert x.shape == (12,)
  np.testing.assert_array_equal(np.sort(x[:5]), np.arange(5))


def test_eval_batches_cover_every_example_once():
  enc = _encoded(10)
  out = list(batching.eval_batches(enc, 4))
  assert [b["x"].shape for b in out] == [(4,)] * 3
  weight = np.concatenate([b["weight"] for b in out])
  np.testing.assert_array_equal(weight, [1] * 10 + [0] * 2)
  x = np.concatenate([b["x"] for b in out])
  np.testing.assert_array_equal(x[weight == 1], np.arange(10))


