"""The primal-dual reading checked as properties (docs/moe_balance_theory.md).

One synthetic batch (n=256 tokens, E=8, K=2, skewed sigmoid scores), its exact LP optimum and
its whole dual-optimal price box from `zojax.moe.lp`; full-batch trajectories route the same
batch again and again, which is the deterministic dual subgradient method; the online check
draws a fresh batch each step. Larger sizes, longer online runs and plots:
experiments/alflb_theory.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zojax import moe
from zojax.moe import lp, theory

N, E, K = 256, 8, 2
C = N * K / E


@pytest.fixture(scope="module")
def problem():
  s = np.asarray(theory.synthetic_scores(jax.random.key(3), N, E, skew=1.0))
  x, opt, prices = lp.solve_assignment(s, K)
  lo, hi = lp.price_range(s, K, x)
  return s, x, opt, prices, lo, hi


@pytest.fixture(scope="module")
def run(problem):
  """Memoised trajectories: (rule, u, steps, keep_experts) -> numpy arrays + float64 dual."""
  s, cache = problem[0], {}

  def get(rule, u, steps, keep=False):
    if (rule, u, steps, keep) not in cache:
      out = jax.device_get(theory.trajectory(s, K, moe.BalanceConfig(rule, u=u), steps,
                                             keep_experts=keep))
      out["dual64"] = theory.dual64(s, out["bias"], K)
      cache[rule, u, steps, keep] = out
    return cache[rule, u, steps, keep]
  return get


def test_lp_oracle_on_a_planted_problem():
  s, planted, optimum, prices = theory.planted_scores(0, 48, 4, 2)
  x, value, p = lp.solve_assignment(s, 2)
  np.testing.assert_array_equal(x, planted)
  assert value == pytest.approx(optimum, rel=1e-9)
  lo, hi = lp.price_range(s, 2, x)
  # The planted prices and HiGHS's are both in the dual-optimal box, which is wide here.
  for q in (prices, p - p.mean()):
    assert np.all(lo - 1e-9 <= q) and np.all(q <= hi + 1e-9)
  assert np.all(hi - lo > 0.05)


def test_lp_optimum_is_integral_and_strong_duality_holds(problem):
  s, x, opt, prices, _, _ = problem
  np.testing.assert_allclose(x, np.round(x), atol=1e-9)  # totally unimodular
  np.testing.assert_allclose(x.sum(1), K)
  assert np.all(x.sum(0) <= C + 1e-9)
  assert theory.dual64(s, -prices, K) == pytest.approx(opt, rel=1e-9)  # D(p*) = LP*
  biases = 0.1 * np.random.default_rng(0).normal(size=(20, E))
  assert np.all(theory.dual64(s, biases, K) >= opt - 1e-9)  # weak duality
  # Negative control: a fractional capacity (T*K/E = 1.5) has a fractional optimum.
  frac, _, _ = lp.solve_assignment(np.array([[1.0, 0.0]] * 3), 1, capacity=1.5)
  assert np.any(np.abs(frac - np.round(frac)) > 0.25)


def test_routing_at_the_lp_prices_is_the_lp_assignment_except_ties(problem):
  s, x, _, prices, _, _ = problem
  r = moe.route(s, -prices, K)
  differs = np.asarray(moe.assignment(r.experts, E)) != x
  tied = np.asarray(theory.boundary_margin(s, -prices, K)) < 1e-6
  assert not np.any(differs.any(1) & ~tied)
  # HiGHS returns a vertex of the dual-optimal set, where tokens do sit on the boundary:
  # that is why the check has to skip them.
  assert tied.sum() >= 1


def test_sign_step_moves_tokens_only_from_overloaded_to_underloaded(run):
  """Claim (ii): after one sign step, a token leaves only experts with load >= C and joins
  only experts with load <= C (loads of the batch that made the step)."""
  out = run("sign", 2e-3, 1500, True)
  moved = 0
  for t in range(300):
    left, joined = theory.transfers(out["experts"][t], out["experts"][t + 1], E)
    load = out["loads"][t]
    assert not (left & (load < C)).any() and not (joined & (load > C)).any(), t
    moved += left.sum()
  assert moved > 500  # the rule is exercised, not vacuous


def test_proportional_step_moves_down_the_load_order_not_across_capacity(run):
  """The proportional step orders moves by load (a token joins only experts less loaded than
  every expert it leaves) but can move a token between two underloaded experts: the strict
  form of the preference rule does not hold for it."""
  out = run("proportional", 0.05, 200, True)
  across = 0
  for t in range(199):
    left, joined = theory.transfers(out["experts"][t], out["experts"][t + 1], E)
    load = out["loads"][t]
    moved = left.any(1)
    assert np.all(np.where(joined, load, -np.inf).max(1)[moved]
                  < np.where(left, load, np.inf).min(1)[moved]), t
    across += (left & (load < C)).any(1).sum()
  assert across > 0


@pytest.mark.parametrize("rule, u", [("decay_linear", 1.0), ("decay_sqrt", 0.3)])
def test_decaying_steps_converge_to_the_lp(problem, run, rule, u):
  """Claim (iii) with decaying steps: MaxVio -> 0, duality gap -> 0, centred b -> the set of
  centred LP dual prices, and the routing -> the LP assignment (boundary ties skipped)."""
  s, x, opt, _, lo, hi = problem
  out = run(rule, u, 1500)
  gap = out["dual64"] - opt
  tol = 1e-10 * abs(opt)
  assert gap.min() >= -tol  # weak duality along the way
  assert gap[10] > 100 * tol and abs(gap[-1]) <= tol
  np.testing.assert_array_equal(out["maxvio"][-100:], 0.0)
  b = out["bias"][-1] - out["bias"][-1].mean()
  assert np.all(-hi - 1e-6 <= b) and np.all(b <= -lo + 1e-6)
  r = moe.route(s, out["bias"][-1], K)
  differs = (np.asarray(moe.assignment(r.experts, E)) != x).any(1)
  assert not np.any(differs & (np.asarray(theory.boundary_margin(s, out["bias"][-1], K)) > 1e-6))


def test_a_too_small_one_over_t_step_stalls(problem, run):
  """Negative control for the above: u/(t+1) travels only u*log(t) in total, so with u=0.05
  the bias never reaches the prices (here ~0.2 away) and the gap stays open."""
  out = run("decay_linear", 0.05, 1500)
  assert out["dual64"][-1] - problem[2] > 0.1 and out["maxvio"][-1] > 0.05


def test_constant_step_gap_plateaus_at_a_level_growing_with_u(problem, run):
  """A constant u leaves a gap that grows with u, with the dual going up about every other
  step (a limit cycle). Where the claim fails: when a sign step (2u along any p_j - p_i) is
  shorter than the thinnest side of the balanced region, the rule can land inside it, every
  load equals C, sign(0) = 0, and the bias stops for good: no cycle, zero gap."""
  w = lp.price_differences(problem[0], K, problem[1])
  room = -w.T - w  # the interval left to p_j - p_i
  np.fill_diagonal(room, np.inf)
  opt, width = problem[2], room.min()
  plateau, ups = {}, {}
  for u in (5e-4, 2e-3, 8e-3, 3.2e-2):
    d = run("sign", u, 1500, u == 2e-3)["dual64"]
    plateau[u] = (d[-375:] - opt).mean()
    ups[u] = (np.diff(d[-375:]) > 1e-10 * abs(opt)).mean()
  assert 2 * 5e-4 < width < 2 * 2e-3 and abs(plateau[5e-4]) <= 1e-10 * abs(opt) and ups[5e-4] == 0.0
  assert 0 < plateau[2e-3] < plateau[8e-3] < plateau[3.2e-2]
  assert min(ups[2e-3], ups[8e-3], ups[3.2e-2]) > 0.3


@pytest.mark.parametrize("rule, u", [("sign", 8e-3), ("decay_linear", 1.0)])
def test_dual_is_monotone_exactly_when_no_expert_overshoots(run, rule, u):
  """Claim (i), read as "the dual D(b_t) never increases". Convexity gives, for any step
  b -> b' with loads c (routing x) and c' (routing x'), g = c - C:
      g(x) . (b' - b)  <=  D(b') - D(b)  <=  g(x') . (b' - b).
  The rules make the left side negative, so D decreases whenever the right side is <= 0,
  e.g. when no expert crosses C in the step. Far from the optimum that is what happens, and
  D falls. Near it a constant sign step overshoots and D goes up on many steps; a large
  1/t step overshoots in its first steps too. Monotonicity holds only while nothing does."""
  out = run(rule, u, 1500)
  d, b, g = out["dual64"], out["bias"].astype(np.float64), out["loads"] - C
  step = np.diff(b, axis=0)
  lower, upper = (g[:-1] * step).sum(1), (g[1:] * step).sum(1)
  change, tol = np.diff(d), 1e-10 * abs(d[0])
  assert np.all(lower <= change + tol) and np.all(change <= upper + tol)
  unbalanced = np.any(g[:-1] != 0, axis=1)
  assert np.all(lower[unbalanced] < 0) and np.all(lower[~unbalanced] == 0)  # descent dirs ...
  guaranteed, went_up = upper <= 0, change > tol  # ... but only these must descend
  if rule == "sign":
    assert guaranteed[:20].all() and np.all(change[:20] < 0)  # the approach
    assert went_up[-500:].mean() > 0.3  # the limit cycle
  else:
    assert went_up[:20].any()  # early overshoot: D rises although the step decays
    assert guaranteed[-1000:].all() and not went_up[-1000:].any()


def test_online_pseudo_regret_is_logarithmic_for_a_large_one_over_t_step():
  """Claim (iv) on i.i.d. batches (32 tokens, E=8): scores sigmoid(z) + a with z exchangeable
  across experts, so the expected dual is F(b) = F0(b + a) and b* = -a is the best fixed bias.
  F is estimated on a sample closed under cyclic expert shifts, where -a is exactly optimal
  (every term of the pseudo-regret is >= 0). Log regret adds the same amount per doubling of
  T, linear regret twice as much each time: u/(t+1) with u=0.3 is logarithmic, constant u
  linear, and u/(t+1) with a too-small u=0.02 polynomial (the step-size condition)."""
  steps, batch = 2048, 32
  a = 0.2 * np.linspace(-1.0, 1.0, E)
  z = jax.nn.sigmoid(jax.random.normal(jax.random.key(1000), (64, E)))
  z_sym = jnp.concatenate([jnp.roll(z, r, axis=1) for r in range(E)])

  @jax.jit
  def expected_dual(b_SxE):
    top, _ = jax.lax.top_k(z_sym[None] + b_SxE[:, None, :], K)
    return top.sum(-1).mean(-1) - K / E * b_SxE.sum(-1)

  best = float(expected_dual(np.zeros((1, E), np.float32))[0])
  batches = (jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (steps, batch, E)))
             + np.float32(a))
  growth = {}
  for rule, u in (("decay_linear", 0.3), ("sign", 1e-2), ("decay_linear", 0.02)):
    out = theory.online_trajectory(batches, K, moe.BalanceConfig(rule, u=u))
    terms = batch * (np.asarray(expected_dual(out["bias"] + np.float32(a)), np.float64) - best)
    assert terms.min() >= -1e-4, (rule, u)  # -a is the minimiser
    r = np.cumsum(terms)
    growth[rule, u] = (r[2047] - r[1023]) / (r[1023] - r[511])
  assert growth["decay_linear", 0.3] < 1.4   # log T: ~1 per doubling
  assert growth["sign", 1e-2] > 1.7          # linear: ~2
  assert growth["decay_linear", 0.02] > 1.5  # too small a 1/t step: ~T^0.77, 2^0.77 = 1.7
