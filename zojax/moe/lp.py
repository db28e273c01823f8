"""The routing assignment LP solved exactly (SciPy's HiGHS): the oracle for theory checks.

    maximise   sum_{t,i} s[t, i] x[t, i]
    subject to sum_i x[t, i] = K  (each token),  sum_t x[t, i] <= C  (each expert),
               0 <= x <= 1.

The constraint matrix is a bipartite incidence matrix, hence totally unimodular, so with
integer K and C every vertex is integral: the simplex answer is a 0/1 assignment (tested).
The capacity rows' duals are the expert prices p >= 0; loss-free routing's bias is b = -p
(see `zojax.moe.balance`). Numpy in float64, not jitted: keep T * E to a few hundred
thousand.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse

from zojax.errors import ConfigError


def _capacity(num_tokens: int, k: int, num_experts: int, capacity) -> float:
  if capacity is not None:
    return float(capacity)
  cap = num_tokens * k / num_experts
  if cap != int(cap):
    raise ConfigError(f"capacity: T*K/E = {num_tokens}*{k}/{num_experts} is not an integer; "
                      "pass capacity explicitly")
  return cap


def _rows(num_tokens: int, num_experts: int):
  """Token rows [T, T*E] and expert rows [E, T*E] over x flattened token-major."""
  cols = np.arange(num_tokens * num_experts)
  tokens = scipy.sparse.csr_matrix(
      (np.ones(cols.size), (cols // num_experts, cols)), shape=(num_tokens, cols.size))
  experts = scipy.sparse.csr_matrix(
      (np.ones(cols.size), (cols % num_experts, cols)), shape=(num_experts, cols.size))
  return tokens, experts


def solve_assignment(scores_TxE, k: int, capacity: float | None = None):
  """Optimal capacity-constrained top-K assignment.

  Args:
    scores_TxE: [T, E] scores (any array-like; used in float64).
    k: experts per token.
    capacity: per-expert capacity C; default T*K/E (must then be an integer).

  Returns:
    ``(assignment [T, E] float64, optimum, prices [E] >= 0)``. When HiGHS's vertex is
    within 1e-7 of 0/1 (always, for integer K and C) it is rounded to exactly 0/1, and the
    optimum is the float64 sum of the chosen scores, not the solver's rounded objective.
  """
  s = np.asarray(scores_TxE, np.float64)
  T, E = s.shape
  if not 1 <= k <= E:
    raise ConfigError(f"top-k k={k} must be in [1, num_experts={E}]")
  cap = _capacity(T, k, E, capacity)
  tokens, experts = _rows(T, E)
  res = scipy.optimize.linprog(
      -s.ravel(), A_ub=experts, b_ub=np.full(E, cap), A_eq=tokens, b_eq=np.full(T, float(k)),
      bounds=(0.0, 1.0), method="highs")
  if res.status != 0:
    raise RuntimeError(f"assignment LP failed: {res.message}")
  x = res.x.reshape(T, E)
  if np.allclose(x, np.round(x), rtol=0, atol=1e-7):
    x = np.round(x)  # a vertex of a TU system: exact 0/1, so the optimum below is exact too
  return x, float((s * x).sum()), -np.asarray(res.ineqlin.marginals)


def price_differences(scores_TxE, k: int, assignment_TxE=None) -> np.ndarray:
  """The dual-optimal set as difference constraints: p_j - p_i >= w[i, j] ([E, E], -inf: none).

  By complementary slackness the optimal prices are exactly those under which an optimal
  assignment x* is a top-K choice of every token (ties allowed), i.e.
  p_j - p_i >= s[t, j] - s[t, i] whenever x*[t, i] = 1 and x*[t, j] = 0, closed under
  chains (p_j - p_i >= w[i, m] + w[m, j]). The interval then left to p_j - p_i,
  [w[i, j], -w[j, i]], is exactly the set's extent along that direction.

  Args:
    scores_TxE: [T, E] scores.
    k: experts per token.
    assignment_TxE: an optimal 0/1 assignment; solved with `solve_assignment` if None.
  """
  s = np.asarray(scores_TxE, np.float64)
  x = solve_assignment(s, k)[0] if assignment_TxE is None else np.asarray(assignment_TxE)
  chosen = x > 0.5
  pairs = chosen[:, :, None] & ~chosen[:, None, :]  # [t, i, j]: i chosen, j not
  w = np.where(pairs, s[:, None, :] - s[:, :, None], -np.inf).max(0)
  # Chains tighten the bounds: p_j - p_i >= w_im + w_mj. Longest paths (Floyd-Warshall).
  for m in range(w.shape[0]):
    w = np.maximum(w, w[:, m:m + 1] + w[m:m + 1, :])
  np.fill_diagonal(w, np.where(np.diag(w) > 0, np.diag(w), -np.inf))
  return w


def price_range(scores_TxE, k: int, assignment_TxE=None):
  """Per-expert range of the centred optimal prices, over the whole dual optimal set.

  The dual optimum is rarely a point: `price_differences` leaves an E-dimensional
  polyhedron (a line of common shifts); [lo_i, hi_i] bounds p_i - mean(p) over it (2E LPs
  in E variables).

  Returns:
    ``(lo [E], hi [E])``: a centred bias b is dual optimal only if -b_i in [lo_i, hi_i] for
    all i (the box around the polyhedron; what converging iterates are checked against).
  """
  w = price_differences(scores_TxE, k, assignment_TxE)
  E = w.shape[0]
  i_idx, j_idx = np.nonzero(np.isfinite(w))
  a_ub = np.zeros((i_idx.size, E))  # p_i - p_j <= -w_ij
  a_ub[np.arange(i_idx.size), i_idx] = 1.0
  a_ub[np.arange(i_idx.size), j_idx] = -1.0
  lo, hi = np.empty(E), np.empty(E)
  for i in range(E):
    for sign, out in ((1.0, lo), (-1.0, hi)):
      c = np.zeros(E)
      c[i] = sign
      res = scipy.optimize.linprog(c, A_ub=a_ub, b_ub=-w[i_idx, j_idx], A_eq=np.ones((1, E)),
                                   b_eq=[0.0], bounds=(None, None), method="highs")
      if res.status == 3:
        out[i] = -sign * np.inf
      elif res.status != 0:
        raise RuntimeError(f"price range LP failed: {res.message}")
      else:
        out[i] = res.x[i]
  return lo, hi


__all__ = ["price_differences", "price_range", "solve_assignment"]
