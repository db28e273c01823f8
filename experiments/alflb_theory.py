"""Auxiliary-loss-free balancing read as a primal-dual method: the claims checked at size.

  python experiments/alflb_theory.py [--quick]

docs/moe_balance_theory.md states the reading; tests/moe/test_moe_theory.py checks the same
properties on a 256-token batch. Here, on CPU in a few minutes:

  * **Full batch** (n=2048 tokens, E=16, K=2, skewed sigmoid scores): the same batch routed
    again and again is the deterministic dual subgradient method. Against the exact LP
    optimum and the whole box of optimal centred prices (`zojax.moe.lp`): the duality gap,
    MaxVio and the distance of the centred bias to that box, per step, for the sign rule at
    six constant u, the proportional rule at two, and decaying steps (u/(t+1) at a good and a
    too-small u, u/sqrt(t+1)). Per arm: the plateau gap, how often the dual rose, and the
    convexity sandwich g(x).(b'-b) <= D(b')-D(b) <= g(x').(b'-b) (never violated).
  * **Preference rule**: over the first 300 steps of a sign and a proportional run, how many
    tokens left an expert with load < C or joined one with load > C.
  * **Online i.i.d. batches** (32 tokens a step, E=8, K=2, 8192 steps, 2 seeds): scores
    sigmoid(z) + a_i with exchangeable z, so the best fixed bias for the score distribution
    is b* = -a exactly. Pseudo-regret R(T) = sum_t [F(b_t) - F(b*)], F the expected per-batch
    dual, estimated on an evaluation sample closed under cyclic expert shifts (so that -a
    minimises the estimate exactly). Fitted over T in [128, 8192]: R = c + beta ln T,
    R = c + lambda T, and the log-log slope gamma. Also the regret against the best fixed b
    in hindsight on the realised batches (the LP of their union, strong duality), for
    T <= 256.

Writes experiments/results/alflb_theory.{json,png} and prints a final one-line JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zojax import moe  # noqa: E402
from zojax.moe import lp, theory  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

FULL_ARMS = [("sign", u) for u in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)] + [
    ("proportional", 0.01), ("proportional", 0.1), ("decay_linear", 1.0),
    ("decay_linear", 0.05), ("decay_sqrt", 0.3)]
ONLINE_ARMS = [("decay_linear", 0.3), ("decay_linear", 0.02), ("decay_sqrt", 0.1),
               ("sign", 1e-3), ("sign", 1e-2), ("proportional", 0.01)]


def _name(rule, u):
  return f"{rule} u={u:g}"


def _box_distance(b_SxE, lo_E, hi_E):
  """Inf-norm distance of each centred bias to the box of centred optimal biases [-hi, -lo]."""
  b = b_SxE - b_SxE.mean(1, keepdims=True)
  return np.maximum(np.maximum(-hi_E - b, b + lo_E), 0.0).max(1)


def full_batch(n, num_experts, k, steps, seed=0):
  s = np.asarray(theory.synthetic_scores(jax.random.key(seed), n, num_experts, skew=1.0))
  t0 = time.perf_counter()
  x, opt, prices = lp.solve_assignment(s, k)
  lo, hi = lp.price_range(s, k, x)
  lp_s = time.perf_counter() - t0
  cap = n * k / num_experts
  tol = 1e-10 * abs(opt)  # D in float64 from exact float32 biases; LP* exact (0/1 sum)
  summary, curves = {}, {}
  for rule, u in FULL_ARMS:
    out = jax.device_get(theory.trajectory(s, k, moe.BalanceConfig(rule, u=u), steps))
    b = out["bias"].astype(np.float64)
    d = theory.dual64(s, b, k)
    gap = d - opt
    g = out["loads"] - cap
    step = np.diff(b, axis=0)
    lower, upper, change = (g[:-1] * step).sum(1), (g[1:] * step).sum(1), np.diff(d)
    late = slice(-steps // 4, None)
    up = change > tol
    reached = np.nonzero(np.abs(gap) <= tol)[0]
    q3, q4 = gap[-steps // 2:-steps // 4].mean(), gap[late].mean()
    summary[_name(rule, u)] = dict(
        rule=rule, u=u, gap_final=float(gap[-1]), gap_plateau=float(gap[late].mean()),
        gap_min=float(gap.min()), first_step_at_zero_gap=int(reached[0]) if reached.size else None,
        stationary=bool(abs(q3 - q4) <= 0.2 * abs(q4) + tol),
        maxvio_final=float(out["maxvio"][-1]), maxvio_late_mean=float(out["maxvio"][late].mean()),
        box_distance_final=float(_box_distance(b[-1:], lo, hi)[0]),
        stopped=bool(np.all(step[late] == 0)),
        dual_rose_fraction=float(up.mean()), dual_rose_fraction_late=float(up[late].mean()),
        no_overshoot_fraction=float((upper <= 0).mean()),
        dual_rose_without_overshoot=int((up & (upper <= 0)).sum()),
        sandwich_violations=int(((lower > change + tol) | (change > upper + tol)).sum()))
    curves[_name(rule, u)] = dict(gap=gap / abs(opt), maxvio=out["maxvio"],
                                  box=_box_distance(b, lo, hi), dual=d)
  pref = {}
  for rule, u in (("sign", 1e-3), ("proportional", 0.1)):
    out = jax.device_get(theory.trajectory(s, k, moe.BalanceConfig(rule, u=u), 300,
                                           keep_experts=True))
    moved = strict = order = 0
    for t in range(299):
      left, joined = theory.transfers(out["experts"][t], out["experts"][t + 1], num_experts)
      load = out["loads"][t]
      tokens = left.any(1)
      moved += int(tokens.sum())
      strict += int(((left & (load < cap)).any(1) | (joined & (load > cap)).any(1)).sum())
      order += int((np.where(joined, load, -np.inf).max(1)
                    >= np.where(left, load, np.inf).min(1))[tokens].sum())
    pref[_name(rule, u)] = dict(tokens_moved=moved, tokens_against_capacity=strict,
                                tokens_against_load_order=order)
  width = hi - lo
  room = -lp.price_differences(s, k, x)
  room = room + room.T  # the interval left to p_j - p_i
  np.fill_diagonal(room, np.inf)
  sign = [(v["u"], v["gap_plateau"]) for v in summary.values()
          if v["rule"] == "sign" and v["gap_plateau"] > 0]
  plateau_slope = float(np.polyfit(*np.log(np.array(sign)).T, 1)[0])
  problem = dict(n=n, num_experts=num_experts, k=k, steps=steps, capacity=cap, lp_optimum=opt,
                 lp_seconds=round(lp_s, 2), lp_integral=bool(np.allclose(x, np.round(x))),
                 price_box_width_min=float(width.min()), price_box_width_max=float(width.max()),
                 thinnest_price_difference=float(room.min()),
                 centred_lp_bias=(-(prices - prices.mean())).tolist())
  return dict(problem=problem, arms=summary, preference=pref,
              sign_plateau_loglog_slope_in_u=plateau_slope), curves


def _topk_sum(z_TxE, k):
  """Sum of the k largest per row by k rounds of max (much faster than lax.top_k on CPU)."""
  total = jnp.zeros(z_TxE.shape[0], z_TxE.dtype)
  for _ in range(k):
    total = total + z_TxE.max(-1)
    first = jnp.argmax(z_TxE, -1)
    z_TxE = jnp.where(jnp.arange(z_TxE.shape[-1]) == first[:, None], -jnp.inf, z_TxE)
  return total


def _fit(t, r):
  """Least squares of r on [1, f(t)] for f = ln t and t; the log-log slope; R^2 of each."""
  out = {}
  for name, f in (("per_ln_T", np.log(t)), ("per_step", t.astype(np.float64))):
    coef, res, *_ = np.linalg.lstsq(np.stack([np.ones_like(f), f], 1), r, rcond=None)
    r2 = 1 - float(res[0]) / float(((r - r.mean()) ** 2).sum()) if res.size else 1.0
    out[f"slope_{name}"], out[f"r2_{name}"] = float(coef[1]), r2
  pos = r > 0
  out["loglog_slope"] = float(np.polyfit(np.log(t[pos]), np.log(r[pos]), 1)[0])
  return out


def online(num_experts, k, batch, steps, seeds, n_eval, hindsight_ts):
  a = 0.2 * np.linspace(-1.0, 1.0, num_experts)
  a -= a.mean()
  z = jax.nn.sigmoid(jax.random.normal(jax.random.key(1000), (n_eval, num_experts)))
  z_sym = jnp.concatenate([jnp.roll(z, r, axis=1) for r in range(num_experts)])

  def f_hat(delta_E):  # expected per-token dual at b = delta - a, up to the constant sum(a)
    return _topk_sum(z_sym + delta_E, k).mean() - k / num_experts * delta_E.sum()

  f_curve = jax.jit(lambda d_SxE: jax.lax.map(f_hat, d_SxE, batch_size=64))
  f_star = float(f_hat(jnp.zeros(num_experts)))
  regret = {_name(*arm): [] for arm in ONLINE_ARMS}
  hindsight = {_name(*arm): [] for arm in ONLINE_ARMS}
  for seed in seeds:
    batches = (jax.nn.sigmoid(jax.random.normal(jax.random.key(seed), (steps, batch, num_experts)))
               + jnp.asarray(a, jnp.float32))
    union = np.asarray(batches[:max(hindsight_ts)]).reshape(-1, num_experts)
    best = [lp.solve_assignment(union[:t * batch], k)[1] for t in hindsight_ts]
    for rule, u in ONLINE_ARMS:
      out = jax.device_get(theory.online_trajectory(batches, k, moe.BalanceConfig(rule, u=u)))
      terms = batch * (np.asarray(f_curve(jnp.asarray(out["bias"]) + a), np.float64) - f_star)
      regret[_name(rule, u)].append(np.cumsum(terms))
      realised = np.cumsum(out["dual"].astype(np.float64))
      hindsight[_name(rule, u)].append([realised[t - 1] - v for t, v in zip(hindsight_ts, best)])
  ts = np.unique(np.geomspace(128, steps, 24).astype(int))
  summary, curves = {}, {}
  for name, runs in regret.items():
    mean = np.mean(runs, 0)
    curves[name] = mean
    summary[name] = dict(
        pseudo_regret={str(t): float(mean[t - 1])
                       for t in sorted({64, 512, 4096, steps}) if t <= steps},
        last_quarter_per_step=float((mean[-1] - mean[-steps // 4]) / (steps // 4)),
        fit_128_to_end=_fit(ts, mean[ts - 1]),
        hindsight_regret={str(t): float(np.mean([h[i] for h in hindsight[name]]))
                          for i, t in enumerate(hindsight_ts)})
  setup = dict(num_experts=num_experts, k=k, batch=batch, steps=steps, seeds=list(seeds),
               eval_tokens=int(z_sym.shape[0]), offsets=a.tolist(), hindsight_ts=hindsight_ts)
  return dict(setup=setup, arms=summary), curves


def plot(full, full_curves, onl, onl_curves, path):
  fig, ax = plt.subplots(2, 4, figsize=(22, 9.5))
  shown = ["sign u=0.0001", "sign u=0.001", "sign u=0.01", "proportional u=0.1",
           "decay_linear u=1", "decay_linear u=0.05", "decay_sqrt u=0.3"]
  steps = np.arange(1, len(next(iter(full_curves.values()))["gap"]) + 1)
  floor = 1e-10
  for name in shown:
    c = full_curves[name]
    ax[0, 0].loglog(steps, np.maximum(c["gap"], floor), label=name, lw=1)
    ax[0, 1].semilogx(steps, c["maxvio"], label=name, lw=1)
    ax[0, 2].loglog(steps, np.maximum(c["box"], floor), label=name, lw=1)
  ax[0, 0].set(title="duality gap (D - LP*) / |LP*| (floored at 1e-10)", xlabel="step")
  ax[0, 1].set(title="MaxVio of the routed batch", xlabel="step", ylim=(0, 1.5))
  ax[0, 2].set(title="inf-distance of centred b to the optimal price box", xlabel="step")
  ax[0, 2].axhline(full["problem"]["price_box_width_min"], color="k", ls=":", lw=0.8)
  ax[0, 0].legend(fontsize=7)
  for rule, marker in (("sign", "o"), ("proportional", "s")):
    arms = [v for v in full["arms"].values() if v["rule"] == rule]
    pts = [(v["u"], max(v["gap_plateau"] / abs(full["problem"]["lp_optimum"]), floor))
           for v in arms]
    line, = ax[1, 0].loglog(*zip(*pts), marker=marker, label=f"{rule}, constant u")
    moving = [pt for pt, v in zip(pts, arms) if not v["stationary"]]
    if moving:
      ax[1, 0].plot(*zip(*moving), ls="", marker="x", ms=12, color=line.get_color(),
                    label=f"{rule}: not yet stationary")
  ax[1, 0].axvline(full["problem"]["thinnest_price_difference"] / 2, color="k", ls=":", lw=0.8,
                   label="half the thinnest extent of the balanced region")
  ax[1, 0].set(title="plateau gap (last quarter) vs u", xlabel="u", ylabel="gap / |LP*|")
  ax[1, 0].legend(fontsize=7)
  for name in ("sign u=0.001", "sign u=0.003", "proportional u=0.1", "decay_sqrt u=0.3"):
    g = np.maximum(full_curves[name]["gap"][-60:], floor)
    ax[1, 1].semilogy(np.arange(len(full_curves[name]["gap"]) - 60,
                                len(full_curves[name]["gap"])), g, marker=".", label=name)
  ax[1, 1].set(title="last 60 steps: gap / |LP*| (constant u cycles)", xlabel="step")
  ax[1, 1].legend(fontsize=7)
  t = np.arange(1, onl["setup"]["steps"] + 1)
  window = t[127:]
  for name, r in onl_curves.items():
    fit = onl["arms"][name]["fit_128_to_end"]
    line, = ax[1, 2].semilogx(t, r, lw=1.2, label=(
        f"{name}: {fit['slope_per_ln_T']:.2f}/ln T (R2 {fit['r2_per_ln_T']:.3f}), "
        f"{fit['slope_per_step']:.4f}/step (R2 {fit['r2_per_step']:.3f})"))
    # The better of the two fits, dashed over the fitted window.
    if fit["r2_per_ln_T"] >= fit["r2_per_step"]:
      f, slope = np.log(window), fit["slope_per_ln_T"]
    else:
      f, slope = window.astype(np.float64), fit["slope_per_step"]
    offset = np.mean(r[window - 1] - slope * f)
    ax[1, 2].semilogx(window, offset + slope * f, ls="--", color=line.get_color(), lw=0.9)
  ax[1, 2].set(title="online pseudo-regret, mean of seeds (y clipped)\ndashed: the better fit "
                     "over T >= 128", xlabel="T (log)", ylim=(0, 60))
  ax[1, 2].legend(fontsize=6, ncol=1)
  hs = onl["setup"]["hindsight_ts"]
  for name, v in onl["arms"].items():
    ax[1, 3].semilogx(hs, [v["hindsight_regret"][str(h)] for h in hs], marker="o", label=name)
  ax[1, 3].set(title="regret vs best fixed b in hindsight\n(LP of the union of batches)",
               xlabel="T")
  ax[1, 3].legend(fontsize=7)
  rows = [(n, f"{v['dual_rose_fraction']:.2f}", f"{v['dual_rose_fraction_late']:.2f}",
           f"{v['no_overshoot_fraction']:.2f}", str(v["dual_rose_without_overshoot"]))
          for n, v in full["arms"].items()]
  ax[0, 3].axis("off")
  table = ax[0, 3].table(cellText=rows, colLabels=["arm", "D rose", "D rose (late)",
                                                   "no overshoot", "rose w/o overshoot"],
                         loc="center", fontsize=7)
  table.auto_set_font_size(False)
  table.set_fontsize(7)
  ax[0, 3].set_title("monotone dual? fraction of steps")
  fig.suptitle(f"ALF-LB as dual descent: full batch n={full['problem']['n']}, "
               f"E={full['problem']['num_experts']}, K={full['problem']['k']}; online batches of "
               f"{onl['setup']['batch']} tokens, E={onl['setup']['num_experts']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  if args.quick:
    full, full_curves = full_batch(256, 8, 2, 600)
    onl, onl_curves = online(8, 2, 32, 1024, (0,), 128, [16, 32, 64])
  else:
    full, full_curves = full_batch(2048, 16, 2, 4000)
    onl, onl_curves = online(8, 2, 32, 8192, (0, 1), 512, [16, 32, 64, 128, 256])
  results = dict(full_batch=full, online=onl, seconds=round(time.perf_counter() - t0, 1),
                 device=str(jax.devices()[0].platform))
  stem = "alflb_theory_quick" if args.quick else "alflb_theory"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
  plot(full, full_curves, onl, onl_curves, RESULTS / f"{stem}.png")
  final = {name: v["fit_128_to_end"]["slope_per_ln_T"] for name, v in onl["arms"].items()}
  print(json.dumps(dict(seconds=results["seconds"], regret_slope_per_ln_T=final,
                        sandwich_violations=sum(v["sandwich_violations"]
                                                for v in full["arms"].values()))))


if __name__ == "__main__":
  main()
