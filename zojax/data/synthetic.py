"""Synthetic image classification, generated from a seed: no download, CPU-sized.

`oriented_bars` draws small grey images, each holding one bright bar of fixed length at a
random position, in one of four orientations (the label), under Gaussian pixel noise:

  label 0  horizontal  ----      label 2  diagonal       \\
  label 1  vertical      |       label 3  anti-diagonal  /

A linear model on raw pixels cannot solve it (a bar of either orientation can sit
anywhere), a small CNN can: it needs oriented filters, which is what the example network
learns. The noise level sets how hard it is.
"""

from __future__ import annotations

import numpy as np

# Bar directions (dy, dx) per label.
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
NUM_CLASSES = len(DIRECTIONS)


def oriented_bars(n: int, *, size: int = 8, bar_length: int = 5, noise: float = 0.5,
                  seed: int = 0, stream: int = 0) -> dict[str, np.ndarray]:
  """`n` noisy bar images with balanced random labels, a pure function of its arguments.

  pixel = 1 on the bar, 0 elsewhere, + N(0, noise^2).

  Args:
    n: number of examples.
    size: images are size x size (one channel).
    bar_length: pixels per bar; odd, and at most `size`.
    noise: standard deviation of the pixel noise.
    seed: the data seed.
    stream: which independent set to draw for this seed (train, validation, test, ...).

  Returns:
    ``image`` float32 [n, size, size, 1] and ``label`` int32 [n].

  Example:
    >>> data = oriented_bars(256, seed=0, stream=1)
    >>> data["image"].shape, data["label"][:4]
  """
  if n < 1:
    raise ValueError(f"oriented_bars: n={n} must be >= 1")
  if bar_length < 1 or bar_length % 2 == 0 or bar_length > size:
    raise ValueError(f"oriented_bars: bar_length={bar_length} must be odd and in 1..size={size}")
  if noise < 0:
    raise ValueError(f"oriented_bars: noise={noise} must be >= 0")
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(stream)])))
  label_N = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
  half = bar_length // 2
  # Centres keep the whole bar inside the image for every direction.
  centre_Nx2 = rng.integers(half, size - half, size=(n, 2))
  dir_Nx2 = np.asarray(DIRECTIONS)[label_N]
  offset_L = np.arange(-half, half + 1)
  y_NxL = centre_Nx2[:, :1] + dir_Nx2[:, :1] * offset_L
  x_NxL = centre_Nx2[:, 1:] + dir_Nx2[:, 1:] * offset_L
  image = np.zeros((n, size, size), np.float32)
  image[np.arange(n)[:, None], y_NxL, x_NxL] = 1.0
  image += rng.normal(0.0, noise, size=image.shape).astype(np.float32)
  return {"image": image[..., None], "label": label_N}


def markov_tokens(n: int, *, seq_len: int, vocab: int, successors: int = 4, seed: int = 0,
                  stream: int = 0) -> np.ndarray:
  """`n` token sequences from a fixed random first-order Markov chain, a pure function of
  its arguments: a tiny language to learn, with no download.

  The chain (fixed by `seed`) lets each token be followed by one of `successors` tokens,
  with Dirichlet(1) probabilities, so a model can bring its loss from log(vocab) towards
  the chain's entropy, at most log(successors). `stream` draws another set of sequences
  from the same chain (train, validation, ...).

  Returns:
    int32 [n, seq_len + 1]: rows for next-token prediction (tokens = [:, :-1], targets =
    [:, 1:]).
  """
  if min(n, seq_len, vocab, successors) < 1:
    raise ValueError(f"markov_tokens: n={n}, seq_len={seq_len}, vocab={vocab}, "
                     f"successors={successors} must all be >= 1")
  chain = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0])))
  next_VxS = chain.integers(0, vocab, size=(vocab, successors))
  cdf_VxS = np.cumsum(chain.dirichlet(np.ones(successors), size=vocab), axis=1)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 1, int(stream)])))
  tokens = np.empty((n, seq_len + 1), np.int32)
  tokens[:, 0] = rng.integers(0, vocab, size=n)
  u_NxT = rng.random((n, seq_len))
  for t in range(seq_len):
    pick = np.minimum((u_NxT[:, t, None] > cdf_VxS[tokens[:, t]]).sum(axis=1), successors - 1)
    tokens[:, t + 1] = next_VxS[tokens[:, t], pick]
  return tokens
