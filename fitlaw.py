"""Fit the parametric memory law  ΔL = C · r^α · ℓ^(−β) + b  to results files.

    python fitlaw.py results/*.json                       # per group: fit, 95% bootstrap CI, lack of fit
    python fitlaw.py results/*.json --where seed=0 --where task=longctx --exclude-saturated
    python fitlaw.py results/*.json --x params --json     # fit against trainable params, JSON out
    python fitlaw.py results/*.json --objective rel --bootstrap 2000 --seed 1
    python fitlaw.py results/*.json --holdout 0.2 --seed 0
    python fitlaw.py results/convergence/*.json --at-step 300   # the law at a budget, from --snapshots
    python fitlaw.py results/*.json --plan --length 1000 --target-delta 2.0
    python fitlaw.py results/*.json --combine-noise --plot law.png
    python fitlaw.py results/*.json --grid grid.png --max-runs 4
    python fitlaw.py results/convergence/*.json --plan-recall --tokens 80   # rank to recall 80 tokens exactly

A group is one study: runs sharing (model, task, method, noise, preset, budget, schedule); --combine-noise
merges the noise levels into one "combined" group (whose replicates then include the other levels' runs,
so its lack-of-fit test is against the spread between levels). Within a group, runs at the same (rank or params,
length) are replicates (seeds): the law is fitted to the mean ΔL of each such point, and the seed-to-seed
spread gives a lack-of-fit F test. The fit starts from log-space linear fits and is refined by nonlinear
least squares. A group fails, with one line naming the reason, when the points cannot determine the
four parameters: fewer than 2 ranks or 2 lengths, no more distinct points than parameters, or a
near-singular Jacobian at the solution; the other groups are still fitted. Exit status is 0 when every
file loaded and at least one group fitted. --plot draws each fitted group, titled with its settings and
the fitted law, and prints which file holds which group.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import OptimizeResult, least_squares
from scipy.stats import f as f_dist

from planner import print_plans
from studies import (KEY, SATURATED, Fit, at_step, drop_saturated, group_description, group_runs, load_runs, matches,
                     parse_where, plot_fit, plot_grid, plot_paths, sample_spearman, spearman)

MIN_POINTS = 5  # the law has 4 parameters; a fit needs more distinct points than that
# Condition number of the Jacobian at the solution, columns scaled to unit norm (so it does not depend
# on the parameters' units). Grids that determine the law give 10–100. A fit that runs to α, β → 0,
# where C·r^α·ℓ^−β + b ≈ (C + b) + Cα·log r − Cβ·log ℓ and C and b trade off without bound, gives 1e8+.
MAX_COND = 1e6
NAMES = ("C", "alpha", "beta", "b")
SYMBOLS = dict(C="C", alpha="α", beta="β", b="b")



def law(r: npt.ArrayLike, l: npt.ArrayLike, C: npt.ArrayLike, alpha: npt.ArrayLike, beta: npt.ArrayLike,
        b: npt.ArrayLike) -> np.ndarray | float:
    """ΔL predicted by the memory law at rank (or params) r and answer length l."""
    return C * np.power(r, alpha) * np.power(l, -beta) + b


def r_squared(y: npt.ArrayLike, yhat: npt.ArrayLike) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def mape(y: npt.ArrayLike, yhat: npt.ArrayLike) -> float:
    """Mean absolute percentage error in percent, over points with y ≠ 0."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    keep = y != 0
    return float(np.mean(np.abs((y[keep] - yhat[keep]) / y[keep])) * 100) if keep.any() else float("nan")


def log_start(r: npt.ArrayLike, l: npt.ArrayLike, dl: npt.ArrayLike, b0: float = 0.0,
              sign: float = 1.0) -> list[float]:
    """Start (C, α, β, b0) from log(sign·(ΔL − b0)) ≈ log|C| + α log r − β log ℓ where that is defined."""
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    z = sign * (dl - b0)
    pos = z > 0
    if pos.sum() < 3:  # too few points for a 3-parameter linear fit
        return [sign * (float(np.mean(np.abs(dl))) or 1.0), 0.5, 0.5, b0]
    A = np.stack([np.ones(pos.sum()), np.log(r[pos]), -np.log(l[pos])], axis=1)  # (n_pos, 3)
    (logC, alpha, beta), *_ = np.linalg.lstsq(A, np.log(z[pos]), rcond=None)
    return [sign * float(np.exp(logC)), float(alpha), float(beta), float(b0)]


def replicate_means(r: npt.ArrayLike, l: npt.ArrayLike, y: npt.ArrayLike
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs at the same (r, ℓ) in order of first appearance: (r, ℓ, mean y, count, point of each run)."""
    index, where = {}, []
    for key in zip(r, l):
        where.append(index.setdefault(key, len(index)))
    where = np.array(where, int)  # (N,) point index of each run
    counts = np.bincount(where, minlength=len(index))
    ybar = np.bincount(where, weights=np.asarray(y, float), minlength=len(index)) / counts
    pr, pl = (np.array(v, float) for v in zip(*index)) if index else (np.zeros(0), np.zeros(0))
    return pr, pl, ybar, counts, where


def check_design(r: npt.ArrayLike, l: npt.ArrayLike, x: str = "rank") -> None:
    """Raise ValueError naming each parameter the points cannot determine, before any fitting."""
    r, l = np.asarray(r, float), np.asarray(l, float)
    if len(r) == 0:
        raise ValueError("no points to fit")
    if (r <= 0).any() or (l <= 0).any():
        raise ValueError(f"{x} and length must be positive")
    problems = []
    if len(set(r)) < 2:
        problems.append(f"all points have {x} {r[0]:g}: α cannot be determined; vary the {x}")
    if len(set(l)) < 2:
        problems.append(f"all points have length {l[0]:g}: β cannot be determined; vary the length")
    m = len(set(zip(r, l)))
    if m < MIN_POINTS:
        what = f"{len(r)} points" if m == len(r) else f"{len(r)} points but only {m} distinct ({x}, length)"
        problems.append(f"{what}; a fit of 4 parameters needs at least {MIN_POINTS} distinct ({x}, length) points")
    if problems:
        raise ValueError("; ".join(problems))


def _jacobian(r: np.ndarray, l: np.ndarray, p: npt.ArrayLike, w: np.ndarray) -> np.ndarray:
    """d(w·law)/d(C, α, β, b) at p (4,) or (B, 4), w (m,) or (B, m): (m, 4) or (B, m, 4)."""
    p = np.asarray(p, float)
    C, alpha, beta = p[..., 0:1], p[..., 1:2], p[..., 2:3]
    g = np.power(r, alpha) * np.power(l, -beta)  # r^α ℓ^−β
    return w[..., None] * np.stack([g, C * g * np.log(r), -C * g * np.log(l), np.ones_like(g)], axis=-1)


def _cond(J: np.ndarray) -> np.ndarray:
    """Condition number of J (..., n, 4) with columns scaled to unit norm; nan or inf when a column is 0."""
    with np.errstate(all="ignore"):
        Jn = J / np.linalg.norm(J, axis=-2, keepdims=True)
        finite = np.isfinite(Jn).all(axis=(-2, -1))
        s = np.linalg.svd(np.where(finite[..., None, None], Jn, 1.0), compute_uv=False)  # (..., 4)
        return np.where(finite, s[..., 0] / s[..., -1], np.inf)


def conditioning(r: np.ndarray, l: np.ndarray, p: npt.ArrayLike, w: np.ndarray) -> tuple[float, list[str]]:
    """Condition number of the column-normalised Jacobian, and the parameters in its weakest direction."""
    J = _jacobian(r, l, p, w)
    cond = float(_cond(J))
    if not np.isfinite(cond):  # e.g. C = 0: α and β do nothing
        zero = np.linalg.norm(J, axis=0) == 0
        return float("inf"), [NAMES[k] for k in np.flatnonzero(zero)] or list(NAMES)
    vt = np.linalg.svd(J / np.linalg.norm(J, axis=0))[2]
    return cond, [NAMES[k] for k in np.flatnonzero(np.abs(vt[-1]) >= 0.3)]


def _solve(r: np.ndarray, l: np.ndarray, y: np.ndarray, w: np.ndarray, p0: Sequence[float],
           max_nfev: int) -> OptimizeResult | None:
    """One Levenberg–Marquardt fit of w·(law − y) from p0; None when it fails."""
    with np.errstate(all="ignore"):
        try:
            res = least_squares(lambda p: w * (law(r, l, *p) - y), p0, jac=lambda p: _jacobian(r, l, p, w),
                                method="lm", x_scale="jac", max_nfev=max_nfev)
        except (ValueError, np.linalg.LinAlgError):
            return None
    return res if np.all(np.isfinite(res.x)) and np.isfinite(res.cost) else None


def _weights(y: np.ndarray, objective: str) -> np.ndarray:
    """Residual weights: 1 for abs, 1/y for rel (so the objective is Σ((pred − y)/y)²)."""
    if objective == "abs":
        return np.ones_like(y)
    if objective == "rel":
        if (y == 0).any():
            raise ValueError("a point has mean ΔL = 0; --objective rel divides by ΔL, use --objective abs")
        return 1.0 / y
    raise ValueError(f"objective {objective!r}: choose abs or rel")


def fit_law(r: npt.ArrayLike, l: npt.ArrayLike, dl: npt.ArrayLike, objective: str = "abs", x: str = "rank") -> Fit:
    """Fit (C, α, β, b) to the mean ΔL per distinct (r, ℓ); raise ValueError when they are undetermined.

    Returns C, alpha, beta, b, r2 and mape (percent) over the point means, n (runs), points, cond (see
    MAX_COND) and objective. Starts: the log-space fit with b = 0, and ones below the smallest and above
    the largest ΔL (C < 0: ΔL rising towards b); the lowest cost wins.
    """
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    if not (len(r) == len(l) == len(dl)):
        raise ValueError(f"{x}, length and ΔL have different lengths")
    check_design(r, l, x)
    pr, pl, y, counts, _ = replicate_means(r, l, dl)
    w = _weights(y, objective)
    span = float(y.max() - y.min()) or abs(float(y.mean())) or 1.0
    starts = [log_start(pr, pl, y), log_start(pr, pl, y, y.min() - 0.1 * span, 1.0),
              log_start(pr, pl, y, y.max() + 0.1 * span, -1.0)]
    fits = [res for res in (_solve(pr, pl, y, w, s, 2000) for s in starts) if res is not None]
    if not fits:
        raise ValueError("the nonlinear fit diverged from every start")
    best = min(fits, key=lambda res: res.cost)
    p = best.x
    cond, weak = conditioning(pr, pl, p, w)
    at = ", ".join(f"{SYMBOLS[k]}={v:.3g}" for k, v in zip(NAMES, p))
    if not cond <= MAX_COND:
        raise ValueError(f"the Jacobian at the solution ({at}) is near-singular (condition number {cond:.2g} > "
                         f"{MAX_COND:.0e}): {', '.join(SYMBOLS[k] for k in weak)} cannot be determined separately "
                         f"from these points")
    if best.status == 0:
        raise ValueError(f"the nonlinear fit did not converge in 2000 evaluations (at {at})")
    C, alpha, beta, b = (float(v) for v in p)
    pred = law(pr, pl, C, alpha, beta, b)
    return dict(C=C, alpha=alpha, beta=beta, b=b, r2=r_squared(y, pred), mape=mape(y, pred), n=len(dl),
                points=len(y), cond=cond, objective=objective)


def lack_of_fit(r: npt.ArrayLike, l: npt.ArrayLike, dl: npt.ArrayLike, fit: Fit) -> dict[str, Any]:
    """Lack-of-fit F test against the seed-to-seed (pure) error, and the seed spread; needs replicates.

    SS_pe = Σ_i Σ_j (y_ij − ȳ_i)², df_pe = N − m;  SS_lof = SS_res − SS_pe, df_lof = m − 4, with SS_res
    the fit's residuals over all N runs; F = (SS_lof/df_lof) / (SS_pe/df_pe). Under the rel objective
    every term of point i is divided by ȳ_i², matching the weights the fit used.
    """
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    pr, pl, y, counts, where = replicate_means(r, l, dl)
    N, m = len(dl), len(y)
    out = dict(replicated_points=int((counts >= 2).sum()), max_replicates=int(counts.max()), seed_df=N - m,
               seed_sd=None, seed_cv=None, lof_F=None, lof_df=None, lof_p=None)
    if N == m:
        return out
    dev = dl - y[where]  # (N,) run minus its point mean
    out["seed_sd"] = float(np.sqrt(np.sum(dev ** 2) / (N - m)))
    if (y != 0).all():
        out["seed_cv"] = float(np.sqrt(np.sum((dev / y[where]) ** 2) / (N - m)))
    w2 = _weights(y, fit.get("objective", "abs"))[where] ** 2  # (N,)
    pred = law(pr, pl, fit["C"], fit["alpha"], fit["beta"], fit["b"])[where]
    ss_pe = float(np.sum(w2 * dev ** 2))
    ss_lof = float(np.sum(w2 * (dl - pred) ** 2)) - ss_pe
    df_lof, df_pe = m - 4, N - m
    out["lof_df"] = [df_lof, df_pe]
    if ss_pe > 0:
        F = max(ss_lof, 0.0) / df_lof / (ss_pe / df_pe)
        out.update(lof_F=float(F), lof_p=float(f_dist.sf(F, df_lof, df_pe)))
    return out


def lm_batch(r: np.ndarray, l: np.ndarray, y: np.ndarray, W: np.ndarray, p0: Sequence[float], iters: int = 400,
             tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt for many weightings of the same points at once (the bootstrap's refits).

    Row k of W (B, m) weights the squared residuals: minimises Σ_i W[k, i]·(law(r_i, ℓ_i) − y_i)² for
    each k from p0. One scipy call per resample costs milliseconds of Python overhead; this does all B
    in numpy, iterating only the rows not yet converged. Returns p (B, 4) and converged (B,).
    """
    def cost(p: np.ndarray, W: np.ndarray) -> np.ndarray:
        c = np.sum(W * (law(r, l, p[:, :1], p[:, 1:2], p[:, 2:3], p[:, 3:]) - y) ** 2, axis=1)  # (B,)
        return np.where(np.isfinite(c), c, np.inf)

    p = np.tile(np.asarray(p0, float), (len(W), 1))  # (B, 4)
    lam = np.full(len(W), 1e-3)  # damping per row
    done = np.zeros(len(W), bool)
    with np.errstate(all="ignore"):
        c = cost(p, W)
        for _ in range(iters):
            a = np.flatnonzero(~done)  # rows still iterating
            if not len(a):
                break
            pa, Wa = p[a], W[a]
            J = _jacobian(r, l, pa, np.ones_like(Wa))  # (A, m, 4)
            JW = J * Wa[..., None]
            H = JW.transpose(0, 2, 1) @ J  # (A, 4, 4) JᵀWJ
            res = law(r, l, pa[:, :1], pa[:, 1:2], pa[:, 2:3], pa[:, 3:]) - y  # (A, m)
            grad = np.einsum("ami,am->ai", JW, res)  # (A, 4) JᵀW·residual
            d = np.diagonal(H, axis1=1, axis2=2)  # (A, 4) Marquardt's scaling of the damping
            D = lam[a, None] * d + 1e-12 * d.max(axis=1, keepdims=True) + 1e-300
            step = np.linalg.solve(H + D[:, :, None] * np.eye(4), -grad[..., None])[..., 0]
            step[~np.isfinite(step).all(axis=1)] = 0.0
            c_new = cost(pa + step, Wa)
            better = c_new < c[a]
            small = (c[a] - c_new <= tol * c[a]) | (np.abs(step) <= tol * (np.abs(pa) + tol)).all(axis=1)
            done[a] = (better & small) | (lam[a] > 1e12) | (c[a] == 0)
            p[a[better]] += step[better]
            c[a[better]] = c_new[better]
            lam[a] = np.where(better, lam[a] / 3, lam[a] * 4)
    return p, done & np.isfinite(c)


def bootstrap(r: npt.ArrayLike, l: npt.ArrayLike, dl: npt.ArrayLike, fit: Fit, n_boot: int,
              seed: int = 0) -> dict[str, Any]:
    """Percentile 95% intervals from refits to the distinct points resampled with replacement.

    Each resample draws m of the m point means with replacement and refits from the full fit. Resamples
    that are not identifiable (the design and conditioning checks of fit_law) or do not converge are
    skipped and counted; the intervals are given only when at least half of the resamples could be
    fitted, since with few distinct points those that can are nearly the original set.
    """
    pr, pl, y, _, _ = replicate_means(*(np.asarray(v, float) for v in (r, l, dl)))
    m = len(y)
    out = dict(bootstrap_n=n_boot, bootstrap_ok=0, ci95=None)
    if not n_boot:
        return out
    idx = np.random.default_rng(seed).integers(0, m, (n_boot, m))
    counts = np.zeros((n_boot, m))  # (B, m) times each point was drawn
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
    has = counts > 0
    design = np.array([len(set(pr[h])) >= 2 and len(set(pl[h])) >= 2 and h.sum() >= MIN_POINTS for h in has])
    w = _weights(y, fit.get("objective", "abs"))
    W = counts[design] * w ** 2
    p, conv = lm_batch(pr, pl, y, W, [fit[k] for k in NAMES])
    draws = p[conv & (_cond(_jacobian(pr, pl, p, np.sqrt(W))) <= MAX_COND)] if len(W) else p
    out["bootstrap_ok"] = len(draws)
    if 2 * len(draws) >= n_boot:
        lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
        out["ci95"] = {k: [float(a), float(b)] for k, a, b in zip(NAMES, lo, hi)}
    return out


def holdout_fit(r: npt.ArrayLike, l: npt.ArrayLike, dl: npt.ArrayLike, frac: float, seed: int = 0,
                objective: str = "abs") -> tuple[Fit, float]:
    """Fit on a seeded random 1 − frac of the distinct points; return (fit, MAPE on the held-out rest).

    Replicates of a point stay together, so no held-out point was seen in training; MAPE is over the
    held-out point means.
    """
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    pr, pl, y, _, where = replicate_means(r, l, dl)
    n_test = max(1, int(round(frac * len(y))))
    perm = np.random.default_rng(seed).permutation(len(y))
    test = perm[:n_test]
    train = np.isin(where, perm[n_test:])  # (N,) runs at training points
    if len(y) - n_test < MIN_POINTS:
        raise ValueError(f"{len(y)} points leave {len(y) - n_test} to fit after holding out {n_test}; "
                         f"a fit of 4 parameters needs at least {MIN_POINTS}")
    fit = fit_law(r[train], l[train], dl[train], objective)
    pred = law(pr[test], pl[test], fit["C"], fit["alpha"], fit["beta"], fit["b"])
    return fit, mape(y[test], pred)


def plan_rank(C: float, alpha: float, beta: float, b: float, length: float, target_delta: float) -> float | None:
    """Smallest r with law(r, length) ≥ target_delta, or None when no r reaches it.

    The law is increasing in r only when C·α > 0. With C, α > 0 it rises from b to ∞, so any
    target ≤ b is met by every r > 0 (returns 0.0). With C, α < 0 it rises from −∞ towards the
    asymptote b, which it never reaches. Otherwise r = ((D − b) ℓ^β / C)^(1/α) exactly.
    """
    if C * alpha <= 0:
        return None
    if C > 0 and target_delta <= b:
        return 0.0
    if C < 0 and target_delta >= b:
        return None
    return float(((target_delta - b) * length ** beta / C) ** (1.0 / alpha))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Fixed-width text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *rows])


def _details(o: dict[str, Any], x: str) -> list[str]:
    """The per-group lines under the table: intervals, seeds, lack of fit, per-sample Spearman."""
    g = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [" ".join(f"{k}={o[k]}" for k in KEY) + f": {o['n']} runs at {o['points']} ({x}, length) points"]
    if o.get("dropped_points"):
        lines.append(f"  --exclude-saturated dropped {o['dropped_points']} points ({o['dropped_runs']} runs)")
    if o.get("bootstrap_n"):
        head = f"  95% CI (bootstrap over points, {o['bootstrap_ok']} of {o['bootstrap_n']} resamples fitted):"
        if o["ci95"]:
            lines.append(head + " " + "  ".join(f"{SYMBOLS[k]} [{g(lo)}, {g(hi)}]" for k, (lo, hi)
                                                   in o["ci95"].items()))
        else:
            lines.append(head + " n/a (fewer than half could be fitted: too few distinct points to resample)")
    if o["replicated_points"]:
        cv = f" ({100 * o['seed_cv']:.1f}%)" if o["seed_cv"] is not None else ""
        pooled = o["noise"] == "combined"  # replicates are then runs at other noise levels too, not seeds alone
        spread = "spread of ΔL over noise levels and seeds" if pooled else "seed-to-seed sd of ΔL"
        lines.append(f"  {'replicates' if pooled else 'seeds'}: {o['replicated_points']} points replicated (up to "
                     f"{o['max_replicates']} runs); {spread} {g(o['seed_sd'])}{cv}, df {o['seed_df']}")
        if o["lof_F"] is None:
            lines.append("  lack of fit: n/a (replicates identical: no pure error)")
        else:
            lines.append(f"  lack of fit: F({o['lof_df'][0]}, {o['lof_df'][1]}) = {o['lof_F']:.3g}, "
                         f"p = {o['lof_p']:.3g}" + (" (against the spread over noise levels, which holds the "
                                                    "differences between them: no evidence that the law fits)"
                                                    if pooled else ""))
    else:
        lines.append("  seeds: one run per point; lack of fit: n/a (no replicates)")
    if o["sample_spearman_n"]:
        lines.append(f"  per-sample spearman(earliest_stubborn, first_failure): rho = {g(o['sample_spearman_rho'])} "
                     f"(n = {o['sample_spearman_n']}); without (0, 0) pairs rho = {g(o['sample_spearman_rho_no00'])} "
                     f"(n = {o['sample_spearman_n_no00']})")
    return lines


def main(paths: Sequence[str], x: str = "rank", as_json: bool = False, holdout: float | None = None, seed: int = 0,
         plan: bool = False, length: float | None = None, target_delta: float | None = None,
         combine_noise: bool = False, plot: str | None = None, grid: str | None = None, max_runs: int = 4,
         where: Sequence[str] = (), exclude_saturated: bool = False, n_boot: int = 1000, objective: str = "abs",
         step: int | None = None) -> int:
    """Fit every group, print the results, return the exit status."""
    err = lambda msg: print(f"fitlaw: {msg}", file=sys.stderr)  # noqa: E731
    if not paths:
        err("no results files given; pass them as arguments, e.g. python fitlaw.py results/*.json")
        return 2
    if holdout is not None and not 0 < holdout < 1:
        err(f"--holdout {holdout} is out of range; give a fraction between 0 and 1")
        return 2
    if plan and (length is None or target_delta is None):
        err("--plan needs --length and --target-delta")
        return 2
    if n_boot < 0:
        err(f"--bootstrap {n_boot}: give 0 (off) or a number of resamples")
        return 2
    try:
        conditions = parse_where(where)
    except ValueError as e:
        err(str(e))
        return 2
    runs, errors, others = load_runs(paths, x)
    for e in errors:
        err(e)
    for o in others:
        err(f"{o}: not a results file (no task, method or delta_loss); skipped")
    ok = not errors
    if conditions:
        n_all, runs = len(runs), [run for run in runs if matches(run, conditions)]
        err(f"--where {' '.join(where)}: {len(runs)} of {n_all} runs match")
        if not runs and n_all:
            err("no run matches --where; a key absent from a run does not match")
            ok = False
    if step is not None:
        runs, missing = at_step(runs, step)
        err(f"--at-step {step}: {len(runs)} runs have a snapshot there" + (f", {missing} do not" if missing else ""))
        if not runs:
            ok = False
    out, groups = [], group_runs(runs, combine_noise)
    targets = dict(zip(groups, plot_paths(plot, list(groups)))) if plot else {}
    plotted: list[tuple[str, str]] = []  # (path, group description) per figure written
    for key, members in groups.items():
        obj = dict(zip(KEY, key), x=x, objective=objective)
        if exclude_saturated:
            members, obj["dropped_points"], obj["dropped_runs"] = drop_saturated(members, x)
        obj["n"] = len(members)
        rho, n_rho = spearman([m.get("earliest_stubborn") for m in members],
                              [m.get("first_failure") for m in members])
        obj.update(spearman_rho=None if math.isnan(rho) else rho, spearman_n=n_rho, **sample_spearman(members))
        r = [m[x] for m in members]
        l = [m["length"] for m in members]
        dl = [m["delta_loss"] for m in members]
        try:
            fit = fit_law(r, l, dl, objective, x)
            if holdout is not None:
                held_fit, obj["holdout_mape"] = holdout_fit(r, l, dl, holdout, seed, objective)
                obj["holdout_n"] = fit["points"] - held_fit["points"]
        except ValueError as e:
            if obj.get("dropped_points"):
                e = f"{e} (after --exclude-saturated dropped {obj['dropped_points']} points)"
            err(f"group ({group_description(key)}): {e}")
            obj["error"] = str(e)
            out.append(obj)
            continue  # the other groups are still fitted and printed
        obj.update(fit)
        obj.update(lack_of_fit(r, l, dl, fit))
        obj.update(bootstrap(r, l, dl, fit, n_boot, seed))
        if plan:
            rp = plan_rank(fit["C"], fit["alpha"], fit["beta"], fit["b"], length, target_delta)
            obj["plan"] = rp
            obj["plan_int"] = None if rp is None else max(1, math.ceil(round(rp, 9)))
        if plot:
            try:
                described = group_description(key)
                plot_fit(members, fit, x, targets[key], described, law)
                plotted.append((targets[key], described))
                obj["plot"] = targets[key]
            except OSError as e:
                err(f"--plot: cannot write {targets[key]} ({e.strerror}); check the directory")
                ok = False
        out.append(obj)
    if grid:
        try:
            plot_grid(runs, grid, max_runs)
        except OSError as e:
            err(f"--grid: cannot write {grid} ({e.strerror}); check the directory")
            ok = False
        except ValueError as e:
            err(f"--grid: {e}")
            ok = False
    if not runs and not errors and not conditions:
        err("no runs loaded")
        ok = False
    if groups and all("error" in o for o in out):
        err(f"none of the {len(groups)} groups could be fitted (reasons above)")
        ok = False
    plot_lines = [f"plot: {path}  {what}" for path, what in plotted]
    if as_json:
        print(json.dumps(out, indent=1))
        if plot_lines:
            print("\n".join(plot_lines), file=sys.stderr)
        return 0 if ok else 1
    header = list(KEY) + ["C", "alpha", "beta", "b", "R2", "MAPE", "n", "points"]
    header += ["holdout_MAPE"] * (holdout is not None) + [f"plan_{x}"] * plan
    rows, details = [], []
    for o in out:
        if "error" in o:
            continue
        row = [o[k] for k in KEY] + [f"{o[k]:.4g}" for k in ("C", "alpha", "beta", "b", "r2")]
        row += [f"{o['mape']:.2f}%", o["n"], o["points"]]
        if holdout is not None:
            row.append(f"{o['holdout_mape']:.2f}%")
        if plan:
            if o["plan"] is not None:
                row.append(o["plan_int"])
            elif o["C"] * o["alpha"] <= 0:
                row.append("unreachable (law does not grow with r)")
            else:
                row.append(f"unreachable (above asymptote b={o['b']:.4g})")
        rows.append(row)
        details += _details(o, x)
    if rows:
        print(_table(rows, header))
        print(f"fit to the mean ΔL per ({x}, length) point, objective {objective}; R2 and MAPE over the points")
        print("\n".join(details))
    if plan:
        print(f"plan: smallest {x} with predicted ΔL ≥ {target_delta} at ℓ = {length}")
    rho, n_rho = spearman([m.get("earliest_stubborn") for m in runs], [m.get("first_failure") for m in runs])
    if n_rho:
        value = "undefined (under 3 runs, or one side the same in every run)" if math.isnan(rho) else f"{rho:.3f}"
        print(f"spearman(earliest_stubborn, first_failure) across runs: rho = {value}, n = {n_rho}")
    viol = [m["sufficient_violations"] for m in runs if m.get("sufficient_violations") is not None]
    if viol:
        print(f"sufficient-condition violations: {sum(viol)} over {len(viol)} runs (must be 0)")
    if plot_lines:
        print("\n".join(plot_lines))
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
--json prints a list with one object per group:
  model task method noise preset budget schedule  the group key (budget: planned steps, or "N epochs"); x, objective
  C alpha beta b, r2 mape                          the fit; R² and MAPE (%) over the point means
  n, points, cond                                  runs, distinct (x, length) points, Jacobian condition number
  ci95 {C, alpha, beta, b: [lo, hi]}, bootstrap_n, bootstrap_ok
                                                   95% intervals (null when too few resamples fitted)
  replicated_points, max_replicates, seed_sd, seed_cv, seed_df
                                                   seed-to-seed spread of ΔL (pooled sd, sd relative
                                                   to the point mean, degrees of freedom N − m)
  lof_F, lof_df [df_lof, df_pe], lof_p             lack-of-fit F test (null without replicates)
  spearman_rho, spearman_n                         earliest_stubborn vs first_failure across the runs
  sample_spearman_rho, sample_spearman_n           the same over the per-sample entries, and without
  sample_spearman_rho_no00, sample_spearman_n_no00 the (0, 0) pairs
  dropped_points, dropped_runs                     with --exclude-saturated
  holdout_mape, holdout_n                          with --holdout
  plan, plan_int                                   with --plan
  plot                                             with --plot: the file this group's figure went to
  error                                            for a group that could not be fitted
The text output prints the table, then these per group, then the run-level Spearman across all runs,
the summed sufficient-condition violations and, with --plot, which file holds which group's figure.""")
    ap.add_argument("paths", nargs="*", help="results JSON files, one run each")
    ap.add_argument("--x", choices=["rank", "params"], default="rank",
                    help="the law's variable: the LoRA rank r, or params, the adapter's trainable parameters")
    ap.add_argument("--json", action="store_true", help="print a JSON list of groups (keys below)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only runs whose KEY equals VALUE, VALUE read as JSON when it parses (seed=0, "
                         "noise=1.0, noise=null, task=longctx); repeatable, a run must match all; a key absent "
                         "from a run does not match (schedule and data_seed get their defaults first)")
    ap.add_argument("--exclude-saturated", action="store_true",
                    help=f"drop each point (with all its replicates) where a run is memorised (exact_match == 1) "
                         f"or saturated (delta_loss ≥ {SATURATED}·loss_init), since ΔL there no longer grows "
                         f"with capacity; the counts dropped are reported per group")
    ap.add_argument("--objective", choices=["abs", "rel"], default="abs",
                    help="least squares on ΔL (abs: Σ(pred − y)²) or on relative error (rel: Σ((pred − y)/y)²)")
    ap.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="resamples for the 95%% percentile intervals of C, α, β, b (0: off). Resamples the "
                         "distinct points with replacement and refits; skips resamples that are not "
                         "identifiable and reports how many were fitted; no interval when fewer than half were")
    ap.add_argument("--at-step", type=int, default=None, metavar="T",
                    help="fit each run as it stood at its snapshot at step T (train.py --snapshots), budget = T; "
                         "with train.py --schedule constant that equals a run of T steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for the bootstrap and the holdout split")
    ap.add_argument("--holdout", type=float, metavar="FRAC",
                    help="fraction of the distinct points held out (replicates together) to report MAPE on; the "
                         "table's fit still uses every point")
    ap.add_argument("--plan", action="store_true",
                    help="add to each group the smallest rank (or params) whose predicted ΔL reaches --target-delta "
                         "at answer length --length")
    ap.add_argument("--length", type=float, metavar="L", help="answer length ℓ for --plan")
    ap.add_argument("--target-delta", type=float, metavar="D", help="target ΔL for --plan")
    ap.add_argument("--combine-noise", action="store_true", help="merge noise levels into one 'combined' group")
    ap.add_argument("--plot", metavar="PATH",
                    help="PNG of each group's fit: ΔL against rank (or params) per length with the fitted law, and "
                         "predicted against true ΔL. One group is drawn to PATH itself; several, to one file each, "
                         "named by PATH's stem and the settings that tell the groups apart, e.g. law.png -> "
                         "law_longctx-sft-noise1.0-constant-2000steps.png. Prints 'plot: <file>  <group settings>' "
                         "per file (to stderr with --json)")
    ap.add_argument("--grid", metavar="PATH",
                    help="PNG of the teacher-forced probability of each answer position, one strip per run, for "
                         "the first --max-runs runs that stored per-sample probabilities")
    ap.add_argument("--max-runs", type=int, default=4, metavar="N", help="how many runs --grid draws (default 4)")
    ap.add_argument("--plan-recall", action="store_true",
                    help="instead of fitting the law: the smallest rank at which --tokens answer tokens are predicted "
                         "to be recalled exactly, from a capacity fit (held tokens = K·r^γ) over the SFT runs that "
                         "memorised, per group of model, adapted modules, task, noise, schedule and budget; refuses "
                         "lengths or ranks beyond those measured (train.py --rank auto calls the same planner)")
    ap.add_argument("--tokens", type=int, metavar="N", help="answer tokens to store, for --plan-recall")
    ap.add_argument("--width", type=int, metavar="W", help="--plan-recall: refuse ranks above W, the adapted "
                                                           "modules' smallest width")
    a = ap.parse_args()
    if a.plan_recall:
        if not a.paths:
            sys.exit("fitlaw: --plan-recall needs results files, e.g. python fitlaw.py --plan-recall --tokens 100 "
                     "results/convergence/*.json")
        if a.tokens is None or a.tokens <= 0:
            sys.exit("fitlaw: --plan-recall needs --tokens N, the number of answer tokens to store (a positive integer)")
        if a.width is not None and a.width <= 0:
            sys.exit(f"fitlaw: --width {a.width}: give the adapted modules' smallest width, a positive integer")
        try:
            conditions = parse_where(a.where)
        except ValueError as e:
            sys.exit(f"fitlaw: {e}")
        sys.exit(print_plans(a.paths, a.tokens, a.width, conditions))
    sys.exit(main(a.paths, a.x, a.json, a.holdout, a.seed, a.plan, a.length, a.target_delta, a.combine_noise,
                  a.plot, a.grid, a.max_runs, a.where, a.exclude_saturated, a.bootstrap, a.objective, a.at_step))
