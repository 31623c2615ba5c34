"""Fit the parametric memory law  ΔL = C · r^α · ℓ^(−β) + b  to results files.

    python fitlaw.py results/*.json                       # table: C alpha beta b R2 MAPE n per group
    python fitlaw.py results/*.json --x params --json     # fit against trainable params, JSON out
    python fitlaw.py results/*.json --holdout 0.2 --seed 0
    python fitlaw.py results/*.json --plan --length 1000 --target-delta 2.0
    python fitlaw.py results/*.json --combine-noise --plot law.png
    python fitlaw.py results/*.json --grid grid.png --max-runs 4

Runs are grouped by (model, task, method, noise); --combine-noise merges the noise levels into one
"combined" group. Each group's fit starts from a log-space linear fit and is refined by nonlinear
least squares. The text output also prints the Spearman correlation between earliest stubborn
position and first failure across all runs, and the summed sufficient-condition violations.
Exit status is 0 only when every file loaded and every group fitted.
"""
import argparse
import json
import math
import sys

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import spearmanr

MIN_POINTS = 5  # the law has 4 parameters; a fit needs more points than that


def law(r, l, C, alpha, beta, b):
    """ΔL predicted by the memory law at rank (or params) r and answer length l."""
    return C * np.power(r, alpha) * np.power(l, -beta) + b


def r_squared(y, yhat):
    """Coefficient of determination 1 − SS_res / SS_tot."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def mape(y, yhat):
    """Mean absolute percentage error in percent, over points with y ≠ 0."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    keep = y != 0
    return float(np.mean(np.abs((y[keep] - yhat[keep]) / y[keep])) * 100) if keep.any() else float("nan")


def log_start(r, l, dl):
    """Start point (C, α, β, 0) from log ΔL ≈ log C + α log r − β log ℓ on the positive ΔL."""
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    pos = dl > 0
    if pos.sum() < 3:  # too few positive points for a 3-parameter linear fit
        return [float(np.mean(np.abs(dl))) or 1.0, 0.5, 0.5, 0.0]
    A = np.stack([np.ones(pos.sum()), np.log(r[pos]), -np.log(l[pos])], axis=1)  # (n_pos, 3)
    (logC, alpha, beta), *_ = np.linalg.lstsq(A, np.log(dl[pos]), rcond=None)
    return [float(np.exp(logC)), float(alpha), float(beta), 0.0]


def fit_law(r, l, dl):
    """Fit (C, α, β, b) by least squares; return them with r2, mape (percent) and n."""
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    n = len(dl)
    if n < MIN_POINTS:
        raise ValueError(f"{n} points; a fit of 4 parameters needs at least {MIN_POINTS}")
    if (r <= 0).any() or (l <= 0).any():
        raise ValueError("rank/params and length must be positive")
    p0 = log_start(r, l, dl)
    res = least_squares(lambda p: law(r, l, *p) - dl, p0, method="trf", x_scale="jac", max_nfev=20000)
    if not np.all(np.isfinite(res.x)):
        raise ValueError("the nonlinear fit diverged")
    C, alpha, beta, b = (float(v) for v in res.x)
    pred = law(r, l, C, alpha, beta, b)
    return dict(C=C, alpha=alpha, beta=beta, b=b, r2=r_squared(dl, pred), mape=mape(dl, pred), n=n)


def holdout_fit(r, l, dl, frac, seed=0):
    """Fit on a seeded random 1 − frac of the points; return (fit, MAPE on the held-out rest)."""
    r, l, dl = (np.asarray(v, float) for v in (r, l, dl))
    n_test = max(1, int(round(frac * len(dl))))
    perm = np.random.default_rng(seed).permutation(len(dl))
    test, train = perm[:n_test], perm[n_test:]
    if len(train) < MIN_POINTS:
        raise ValueError(f"{len(dl)} points leave {len(train)} to fit after holding out {n_test}; "
                         f"a fit of 4 parameters needs at least {MIN_POINTS}")
    fit = fit_law(r[train], l[train], dl[train])
    pred = law(r[test], l[test], fit["C"], fit["alpha"], fit["beta"], fit["b"])
    return fit, mape(dl[test], pred)


def plan_rank(C, alpha, beta, b, length, target_delta):
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


def spearman(earliest_stubborn, first_failure):
    """Spearman ρ between paired positions, skipping pairs with a None; returns (rho, n)."""
    pairs = [(e, f) for e, f in zip(earliest_stubborn, first_failure) if e is not None and f is not None]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return float("nan"), len(pairs)  # undefined for fewer than 3 pairs or a constant side
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho), len(pairs)


def load_runs(paths, x="rank"):
    """Read results files; return (runs, errors) where errors are one line per bad file."""
    runs, errors = [], []
    for path in paths:
        try:
            with open(path) as f:
                run = json.load(f)
        except OSError as e:
            errors.append(f"{path}: cannot read ({e.strerror}); check the path")
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            errors.append(f"{path}: not valid JSON ({e}); pass results files written by train.py")
            continue
        if not isinstance(run, dict):
            errors.append(f"{path}: not a JSON object; expected one run per file")
            continue
        missing = [k for k in ("model", "task", "method", x, "length", "delta_loss") if run.get(k) is None]
        if missing:
            errors.append(f"{path}: missing key '{missing[0]}'; results files need model, task, method, "
                          f"{x}, length, delta_loss")
            continue
        bad = [k for k in (x, "length", "delta_loss") if not isinstance(run[k], (int, float))]
        if bad:
            errors.append(f"{path}: key '{bad[0]}' is not a number")
            continue
        runs.append(dict(run, _path=path))
    return runs, errors


def group_runs(runs, combine_noise=False):
    """Group runs by (model, task, method, noise); noise becomes "combined" when merged."""
    groups = {}
    for run in runs:
        noise = "combined" if combine_noise else run.get("noise")
        groups.setdefault((run["model"], run["task"], run["method"], noise), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


def plot_fit(runs, fit, x, path, title):
    """Left: ΔL vs x on log-log axes per ℓ with fitted curves. Right: predicted vs true."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = np.array([run[x] for run in runs], float)
    l = np.array([run["length"] for run in runs], float)
    dl = np.array([run["delta_loss"] for run in runs], float)
    p = (fit["C"], fit["alpha"], fit["beta"], fit["b"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4))
    grid = np.geomspace(r.min(), r.max(), 100)
    for i, length in enumerate(np.unique(l)):
        m = l == length
        ax0.scatter(r[m], dl[m], color=f"C{i % 10}", label=f"ℓ={length:g}")
        ax0.plot(grid, law(grid, length, *p), color=f"C{i % 10}")
    ax0.set(xscale="log", yscale="log", xlabel=x, ylabel="ΔL", title=title)
    ax0.legend(fontsize=7)
    pred = law(r, l, *p)
    lo, hi = min(pred.min(), dl.min()), max(pred.max(), dl.max())
    ax1.scatter(dl, pred)
    ax1.plot([lo, hi], [lo, hi], "k--", label="y = x")
    ax1.set(xlabel="true ΔL", ylabel="predicted ΔL", title=f"R² = {fit['r2']:.3f}, MAPE = {fit['mape']:.1f}%")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(runs, path, max_runs=4):
    """One strip per run: teacher-forced target probability per answer position (like Figure 5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [run for run in runs if any(s.get("probs") for s in run.get("per_sample") or [])][:max_runs]
    if not runs:
        raise ValueError("no run has per_sample[*].probs; write results with per-sample probabilities")
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        probs, stubborn, failures, start = [], [], [], 0
        for s in run["per_sample"]:
            p = s.get("probs") or []
            # positions are within the sample; shift them onto the concatenated strip
            stubborn += [start + i for i, q in enumerate(p) if q <= 0.5]
            if s.get("first_failure") is not None and s["first_failure"] < len(p):
                failures.append(start + s["first_failure"])
            probs += p
            start += len(p)
        pos = np.arange(len(probs))
        probs = np.array(probs)
        ax.plot(pos, probs, lw=0.8, color="C0", label="p(target)")
        ax.axhline(0.5, color="k", ls=":", lw=0.8, label="p = 0.5")
        ax.scatter(stubborn, probs[stubborn], color="C3", s=10, zorder=3, label="stubborn (p ≤ 0.5)")
        for j, f in enumerate(failures):
            ax.axvline(f, color="C1", ls="--", lw=1, label="first failure" if j == 0 else None)
        name = run.get("name") or (f"{run['model']} {run['task']} {run['method']} "
                                   f"r={run.get('rank')} ℓ={run['length']}")
        ax.set(ylim=(-0.02, 1.02), xlim=(0, max(1, len(probs) - 1)), ylabel="p", title=name)
        ax.legend(fontsize=7, loc="lower left", ncol=4)
    axes[-1, 0].set_xlabel("answer position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows, header):
    """Fixed-width text table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *rows])


def main(paths: list, x: str = "rank", as_json: bool = False, holdout: float = None, seed: int = 0,
         plan: bool = False, length: float = None, target_delta: float = None, combine_noise: bool = False,
         plot: str = None, grid: str = None, max_runs: int = 4) -> int:
    """Fit every group, print the results, return the exit status."""
    err = lambda msg: print(f"fitlaw: {msg}", file=sys.stderr)
    if not paths:
        err("no results files given; pass them as arguments, e.g. python fitlaw.py results/*.json")
        return 2
    if holdout is not None and not 0 < holdout < 1:
        err(f"--holdout {holdout} is out of range; give a fraction between 0 and 1")
        return 2
    if plan and (length is None or target_delta is None):
        err("--plan needs --length and --target-delta")
        return 2
    runs, errors = load_runs(paths, x)
    for e in errors:
        err(e)
    ok = not errors
    out, groups = [], group_runs(runs, combine_noise)
    for gi, (key, members) in enumerate(groups.items()):
        model, task, method, noise = key
        obj = dict(model=model, task=task, method=method, noise=noise, x=x, n=len(members))
        rho, n_rho = spearman([m.get("earliest_stubborn") for m in members],
                              [m.get("first_failure") for m in members])
        obj.update(spearman_rho=None if math.isnan(rho) else rho, spearman_n=n_rho)
        r = [m[x] for m in members]
        l = [m["length"] for m in members]
        dl = [m["delta_loss"] for m in members]
        try:
            if holdout is not None:
                fit, obj["holdout_mape"] = holdout_fit(r, l, dl, holdout, seed)
            else:
                fit = fit_law(r, l, dl)
        except ValueError as e:
            err(f"group (model={model}, task={task}, method={method}, noise={noise}): {e}")
            obj["error"] = str(e)
            out.append(obj)
            ok = False
            continue
        obj.update(fit)
        if plan:
            rp = plan_rank(fit["C"], fit["alpha"], fit["beta"], fit["b"], length, target_delta)
            obj["plan"] = rp
            obj["plan_int"] = None if rp is None else max(1, math.ceil(round(rp, 9)))
        if plot:
            stem, dot, ext = plot.rpartition(".")
            target = plot if len(groups) == 1 else f"{stem}_{gi}.{ext}" if dot else f"{plot}_{gi}"
            try:
                plot_fit(members, fit, x, target, f"{model} {task} {method} noise={noise}")
            except OSError as e:
                err(f"--plot: cannot write {target} ({e.strerror}); check the directory")
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
    if not runs and not errors:
        err("no runs loaded")
        ok = False
    if as_json:
        print(json.dumps(out, indent=1))
        return 0 if ok else 1
    header = ["model", "task", "method", "noise", "C", "alpha", "beta", "b", "R2", "MAPE", "n"]
    header += ["holdout_MAPE"] * (holdout is not None) + [f"plan_{x}"] * plan
    rows = []
    for o in out:
        if "error" in o:
            continue
        row = [o["model"], o["task"], o["method"], o["noise"]] + [f"{o[k]:.4g}" for k in
                                                                 ("C", "alpha", "beta", "b", "r2")]
        row += [f"{o['mape']:.2f}%", o["n"]]
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
    if rows:
        print(_table(rows, header))
    if plan:
        print(f"plan: smallest {x} with predicted ΔL ≥ {target_delta} at ℓ = {length}")
    rho, n_rho = spearman([m.get("earliest_stubborn") for m in runs], [m.get("first_failure") for m in runs])
    if n_rho:
        print(f"spearman(earliest_stubborn, first_failure) across runs: rho = {rho:.3f}, n = {n_rho}")
    viol = [m["sufficient_violations"] for m in runs if m.get("sufficient_violations") is not None]
    if viol:
        print(f"sufficient-condition violations: {sum(viol)} over {len(viol)} runs (must be 0)")
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "--json prints a list with one object per group: model task method noise x C alpha beta b r2 mape n, "
        "spearman_rho and spearman_n (earliest_stubborn vs first_failure within the group), holdout_mape "
        "with --holdout, plan/plan_int with --plan, and error for groups that could not be fitted. "
        "The text output prints the Spearman correlation across all runs."))
    ap.add_argument("paths", nargs="*", help="results JSON files, one run each")
    ap.add_argument("--x", choices=["rank", "params"], default="rank", help="fit against LoRA rank or params")
    ap.add_argument("--json", action="store_true", help="print a JSON list of groups")
    ap.add_argument("--holdout", type=float, help="fraction of points held out to report MAPE on")
    ap.add_argument("--seed", type=int, default=0, help="seed for the holdout split")
    ap.add_argument("--plan", action="store_true", help="print the smallest rank/params reaching --target-delta")
    ap.add_argument("--length", type=float, help="answer length ℓ for --plan")
    ap.add_argument("--target-delta", type=float, help="target ΔL for --plan")
    ap.add_argument("--combine-noise", action="store_true", help="merge noise levels into one 'combined' group")
    ap.add_argument("--plot", help="PNG path for the fit figure (suffixed _<group index> when several groups)")
    ap.add_argument("--grid", help="PNG path for the per-position probability grid")
    ap.add_argument("--max-runs", type=int, default=4, help="runs drawn in --grid")
    a = ap.parse_args()
    sys.exit(main(a.paths, a.x, a.json, a.holdout, a.seed, a.plan, a.length, a.target_delta,
                  a.combine_noise, a.plot, a.grid, a.max_runs))
