"""Results files as studies: read them, filter them (--where), group them into studies, take the grid
as it stood at a snapshot step, mark saturated points, and draw the per-position probability strips.

    from studies import load_runs, group_runs, at_step
    runs, errors, others = load_runs(glob.glob("results/*.json"))

fitlaw.py fits the law to these groups; planner.py plans ranks from them. numpy, scipy and matplotlib only.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import numpy as np
from scipy.stats import spearmanr

Run = dict[str, Any]  # one results file as load_runs returns it (train.py's keys and _path)
Fit = dict[str, Any]  # fitlaw.fit_law's result: C, alpha, beta, b, r2, mape, n, points, cond, objective
GroupKey = tuple[Any, ...]  # a run's values of KEY (or planner.PLAN_KEY)
SATURATED = 0.95  # --exclude-saturated: ΔL at or above this fraction of loss_init


def spearman(earliest_stubborn: Sequence[int | None], first_failure: Sequence[int | None]) -> tuple[float, int]:
    """Spearman ρ between paired positions, skipping pairs with a None; returns (rho, n)."""
    pairs = [(e, f) for e, f in zip(earliest_stubborn, first_failure) if e is not None and f is not None]
    if len(pairs) < 3 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return float("nan"), len(pairs)  # undefined for fewer than 3 pairs or a constant side
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho), len(pairs)


def sample_spearman(runs: Iterable[Run]) -> dict[str, Any]:
    """Spearman ρ(earliest stubborn, first failure) over the per-sample entries of runs, with and without (0, 0).

    Samples whose first answer token is already wrong give (0, 0); many of them make ρ look better
    than the ordering of the other samples supports, so ρ is also given with them removed.
    """
    pairs = [(s["earliest_stubborn"], s.get("first_failure")) for run in runs for s in run.get("per_sample") or []
             if isinstance(s, dict) and s.get("earliest_stubborn") is not None]
    nan = lambda v: None if math.isnan(v) else v  # noqa: E731
    rho, n = spearman(*zip(*pairs)) if pairs else (float("nan"), 0)
    rest = [p for p in pairs if p != (0, 0)]
    rho0, n0 = spearman(*zip(*rest)) if rest else (float("nan"), 0)
    return dict(sample_spearman_rho=nan(rho), sample_spearman_n=n, sample_spearman_rho_no00=nan(rho0),
                sample_spearman_n_no00=n0)


def load_runs(paths: Iterable[str], x: str = "rank") -> tuple[list[Run], list[str], list[str]]:
    """Read results files; return (runs, errors, others): errors are one line per bad results file, others
    the JSON objects that are not results files at all (no task, method or delta_loss: e.g. a study's
    sampling.json beside its runs), which a glob over a results folder picks up and which are skipped.

    Fills the documented defaults of older files: schedule "linear", data_seed = seed, budget = steps.
    A run planned in epochs (train.py --epochs, e.g. one PhoneBook study over books of several sizes) has
    the budget "N epochs", so that its lengths, whose steps differ, form one study.
    """
    runs, errors, others = [], [], []
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
        if not any(k in run for k in ("task", "method", "delta_loss")):
            others.append(path)
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
        if run.get("schedule") is None:
            run["schedule"] = "linear"
        if "data_seed" not in run:
            run["data_seed"] = run.get("seed")
        if run.get("budget") is None:  # older files: the planned steps were the steps run
            run["budget"] = run.get("steps")
        planned = run.get("settings") or {}
        if planned.get("epochs") is not None and planned.get("steps") is None:
            run["budget"] = f"{planned['epochs']} epochs"  # its steps grow with the data: the study is its epochs
        runs.append(dict(run, _path=path))
    return runs, errors, others


SNAPSHOT_KEYS = ("delta_loss", "loss_final", "token_acc", "exact_match", "stubborn", "earliest_stubborn",
                 "first_failure", "per_sample")


def at_step(runs: Iterable[Run], step: int) -> tuple[list[Run], int]:
    """Each run as it stood at its snapshot `step` (train.py --snapshots): its measurements then, and
    budget = step. A run that stopped memorised (--stop-when-memorized) before `step` has no snapshot
    there; it enters with its final measurements, since a memorised run only creeps on (ΔL by < 0.1%).
    Returns (runs, how many had neither)."""
    out, missing = [], 0
    for run in runs:
        snap = next((s for s in run.get("snapshots") or [] if s.get("step") == step), None)
        if snap is not None:
            out.append(dict(run, **{k: snap[k] for k in SNAPSHOT_KEYS if k in snap}, budget=step, steps=step))
        elif run.get("stop_reason") == "memorized" and (run.get("stopped_at") or step) < step:
            out.append(dict(run, budget=step))
        else:
            missing += 1
    return out, missing


def parse_where(items: Iterable[str]) -> list[tuple[str, Any]]:
    """["key=value", ...] -> [(key, value)], the value JSON-parsed when it parses (else the string)."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--where {item!r}: write key=value, e.g. --where seed=0")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.append((key, value))
    return out


def matches(run: Run, where: Iterable[tuple[str, Any]]) -> bool:
    """True when the run has every key with an equal value (1 matches 1.0; true does not match 1)."""
    return all(k in run and isinstance(run[k], bool) == isinstance(v, bool) and run[k] == v for k, v in where)


def saturated(run: Run) -> bool:
    """Memorised (exact_match == 1) or saturated (ΔL ≥ 0.95·loss_init): ΔL no longer measures capacity."""
    li = run.get("loss_init")
    return run.get("exact_match") == 1 or (isinstance(li, (int, float)) and run["delta_loss"] >= SATURATED * li)


KEY = ("model", "task", "method", "noise", "preset", "budget", "schedule")


def group_runs(runs: Iterable[Run], combine_noise: bool = False) -> dict[GroupKey, list[Run]]:
    """Group runs by KEY (the study); noise becomes "combined" when merged."""
    groups = {}
    for run in runs:
        key = tuple("combined" if k == "noise" and combine_noise else run.get(k) for k in KEY)
        groups.setdefault(key, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])))


def drop_saturated(members: Sequence[Run], x: str) -> tuple[list[Run], int, int]:
    """Drop every point (all its replicates) where some run is saturated; return (kept, points, runs dropped)."""
    bad = {(m[x], m["length"]) for m in members if saturated(m)}
    kept = [m for m in members if (m[x], m["length"]) not in bad]
    return kept, len(bad), len(members) - len(kept)


def group_description(key: GroupKey) -> str:
    """A KEY group as KEY=value pairs, leaving out the settings a run did not have (None or empty)."""
    return " ".join(f"{k}={v}" for k, v in zip(KEY, key) if v not in (None, "", [], ()))


def _slug_part(k: str, v: Any) -> str:
    """One setting in a file name: the value, with noise and budget marked (noise1.0, 2000steps)."""
    if k == "noise":
        return f"noise{v}"
    if k == "budget":
        return f"{v}steps" if isinstance(v, (int, float)) else str(v).replace(" ", "")  # 2000steps, 200epochs
    return str(v).rstrip("/").rsplit("/", 1)[-1] if k == "model" else str(v)  # a model path: its last part


def group_slugs(keys: Sequence[GroupKey]) -> list[str]:
    """A short, filesystem-safe, unique name per group from the settings that differ between the groups:
    longctx-sft-noise1.0-constant-2000steps. Settings a group lacks are left out; a clash gets -2, -3, ..."""
    differ = [i for i in range(len(KEY)) if len({key[i] for key in keys}) > 1]
    slugs: list[str] = []
    for key in keys:
        parts = [_slug_part(KEY[i], key[i]) for i in differ if key[i] not in (None, "", [], ())]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("._-") or "group"
        name, n = slug, 2
        while name in slugs:
            name, n = f"{slug}-{n}", n + 1
        slugs.append(name)
    return slugs


def plot_paths(plot: str, keys: Sequence[GroupKey]) -> list[str]:
    """--plot's file per group: the path itself for one group, else <stem>_<group slug><ext>."""
    if len(keys) == 1:
        return [plot]
    stem, ext = os.path.splitext(plot)
    return [f"{stem}_{slug}{ext}" for slug in group_slugs(keys)]


def plot_grid(runs: Sequence[Run], path: str, max_runs: int = 4) -> None:
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


X_SYMBOL = dict(rank="r", params="P")  # the law's variable for --x


X_LABEL = dict(rank="LoRA rank r", params="trainable parameters P")


def law_label(fit: Fit, x: str = "rank") -> str:
    """The fitted law as text: ΔL = 53.2·r^0.335·ℓ^−0.703 + 0.67 (R² 0.992), each number to 3 figures."""
    def num(v: float) -> str:
        return f"{v + 0.0:.3g}".replace("-", "−")  # + 0.0 turns −0 into 0

    sign = "−" if fit["b"] < 0 else "+"
    return (f"ΔL = {num(fit['C'])}·{X_SYMBOL[x]}^{num(fit['alpha'])}·ℓ^{num(-fit['beta'])} {sign} "
            f"{num(abs(fit['b']))} (R² {fit['r2']:.3f})")


def plot_fit(runs: Sequence[Run], fit: Fit, x: str, path: str, title: str, law: Callable[..., np.ndarray]) -> None:
    """Left: ΔL vs x on log-log axes per ℓ with the fitted law's curves (`law`: fitlaw.law). Right: predicted vs true."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = np.array([run[x] for run in runs], float)
    l = np.array([run["length"] for run in runs], float)
    dl = np.array([run["delta_loss"] for run in runs], float)
    p = (fit["C"], fit["alpha"], fit["beta"], fit["b"])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.4))
    fig.suptitle(title, fontsize=10)
    grid = np.geomspace(r.min(), r.max(), 100)
    for i, length in enumerate(np.unique(l)):
        m = l == length
        ax0.scatter(r[m], dl[m], color=f"C{i % 10}", label=f"ℓ={length:g}")
        ax0.plot(grid, law(grid, length, *p), color=f"C{i % 10}")
    ax0.set(xscale="log", yscale="log", xlabel=X_LABEL[x], ylabel="ΔL")
    ax0.set_title(law_label(fit, x), fontsize=9)
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
