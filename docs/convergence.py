"""The convergence study's tables and figures, from results/convergence/*.json (docs/reproduce.sh).

    python docs/report.py        # calls report() below and writes its block into docs/REPRODUCTION.md

Stage 1, the budget curve: ranks {1, 4, 16} at ℓ = 100 (ρ = 1), 2000 steps at a constant lr with
snapshots, two training seeds on one data seed. Stage 2, the law grid: ranks {1, 2, 4, 8, 16, 32} ×
ℓ {25, 50, 100, 200}, the same settings, stopping once memorised. Every number here is computed from
those files; the only typed-in numbers are the paper's, labelled as such.
"""

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fitlaw import bootstrap, fit_law, lack_of_fit  # noqa: E402
from studies import at_step, plot_grid, saturated  # noqa: E402

VOCAB = 49152  # the built-in model's vocabulary
BUDGET_RANKS, BUDGET_LENGTH = (1, 4, 16), 100
GRID_RANKS, GRID_LENGTHS = (1, 2, 4, 8, 16, 32), (25, 50, 100, 200)
DENSITY_RHOS, DENSITY_RANKS, DENSITY_LENGTHS = (0.0, 0.4, 1.0), (1, 4, 16), (25, 50, 100)  # stage 5 (ρ = 1: stage 2)
PB_RANKS, PB_LENGTHS = (1, 2, 4, 8, 16), (80, 160, 320)  # stage 6: books of 8, 16 and 32 numbers
N_BOOT = 1000  # bootstrap resamples for the exponents' intervals, as fitlaw.py by default
SUMMARY_KEYS = ("name", "task", "noise", "length", "rank", "params", "method", "seed", "data_seed", "steps",
                "stop_reason", "loss_init", "loss_final", "delta_loss", "token_acc", "exact_match", "stubborn",
                "earliest_stubborn", "first_failure", "wall_s")


def load(folder: Path) -> list[dict]:
    """Every results file in `folder`, in its memft/ folder (stages 3, 4 and 8) and in its capacity/ folder
    (stage 7's probes), not in the runs' own folders, each with its file name as _file."""
    runs = []
    for f in sorted(folder.glob("*.json")) + sorted((folder / "memft").glob("*.json")) + \
            sorted((folder / "capacity").glob("*.json")):
        if f.name == "sampling.json":
            continue
        run = json.loads(f.read_text())
        run["_file"], run["_memft"] = f.name, f.parent.name == "memft"
        runs.append(run)
    return runs


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def grid_runs(runs: list[dict], lengths: tuple | None = GRID_LENGTHS) -> list[dict]:
    """The law grid: SFT on random text (ρ = 1), constant lr, 2000-step budget, data seed 0 (lengths
    None: also the lengths that docs/capacity.py probed)."""
    return mini_grid(runs, "longctx", 1.0, GRID_RANKS, lengths)


def snapshot_steps(runs: list[dict]) -> list[int]:
    return sorted({s["step"] for r in runs for s in r.get("snapshots") or []})


def by_seed(runs: list[dict], rank: int, length: int) -> list[dict]:
    return sorted((r for r in runs if r["rank"] == rank and r["length"] == length), key=lambda r: r["seed"])


def stable_from(steps: list[int], per_seed: np.ndarray, rel: float = 1e-3) -> int | None:
    """The first snapshot T from which ΔL stops moving: for every later pair of snapshots, the change in
    the seed-mean ΔL is below the seed spread at T (max − min over seeds), or below `rel` of ΔL (a
    memorised run only creeps). per_seed: (seeds, snapshots). None when it never settles."""
    mean, spread = per_seed.mean(0), per_seed.max(0) - per_seed.min(0)
    for i in range(len(steps) - 1):  # the last snapshot has nothing after it to settle against
        moves = np.abs(np.diff(mean[i:]))
        if np.all((moves < spread[i]) | (moves < rel * np.abs(mean[i + 1:]))):
            return steps[i]
    return None


def budget_curve(runs: list[dict], figures: Path) -> list[str]:
    """Stage 1: ΔL at every snapshot for ranks {1, 4, 16} at ℓ = 100, per seed, and where it settles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = [r for r in grid_runs(runs) if r["length"] == BUDGET_LENGTH and r["rank"] in BUDGET_RANKS
             and r.get("stop_reason") == "budget"]
    if not stage:
        return []
    steps = snapshot_steps(stage)
    rows, settled = [], []
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, rank in enumerate(BUDGET_RANKS):
        seeds = by_seed(stage, rank, BUDGET_LENGTH)
        if not seeds:
            continue
        dl = np.array([[next(s["delta_loss"] for s in r["snapshots"] if s["step"] == t) for t in steps]
                       for r in seeds])  # (seeds, snapshots)
        acc = np.array([[next(s["token_acc"] for s in r["snapshots"] if s["step"] == t) for t in steps]
                        for r in seeds])
        for j, r in enumerate(seeds):
            ax0.plot(steps, dl[j], color=f"C{i}", ls="-" if j == 0 else "--", marker=".",
                     label=f"r={rank}" if j == 0 else None)
            ax1.plot(steps, acc[j], color=f"C{i}", ls="-" if j == 0 else "--", marker=".")
        rows.append([f"r={rank} ΔL"] + [f"{m:.2f} ± {s / 2:.2f}" for m, s in zip(dl.mean(0), np.ptp(dl, 0))])
        rows.append([f"r={rank} token acc"] + [f"{m:.2f}" for m in acc.mean(0)])
        settled.append(f"rank {rank}: " + (f"from T = {t}" if (t := stable_from(steps, dl)) else
                                           f"not by T = {steps[-1]} (ΔL still moves by more than the seed "
                                           f"spread: {dl.mean(0)[-2]:.2f} → {dl.mean(0)[-1]:.2f}, spread "
                                           f"{np.ptp(dl, 0)[-1]:.2f})"))
    loss_init = float(np.mean([r["loss_init"] for r in stage]))
    for ax, label in ((ax0, "ΔL (nats per token)"), (ax1, "token accuracy")):
        ax.set(xscale="log", xlabel="step T (constant lr 1e-2)", ylabel=label)
    ax0.axhline(loss_init, color="k", ls=":", lw=0.8, label="L_init")
    ax0.legend(fontsize=8)
    fig.suptitle(f"ΔL and token accuracy against budget, ℓ = {BUDGET_LENGTH}, ρ = 1 (solid: seed 0, dashed: seed 1)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(figures / "budget_curve.png", dpi=100)
    plt.close(fig)
    n_seeds = len({r["seed"] for r in stage})
    return ["### Stage 1: the budget curve", "",
            f"Ranks {{{', '.join(map(str, BUDGET_RANKS))}}} at ℓ = {BUDGET_LENGTH} on random ids (ρ = 1), lr 1e-2 "
            f"held constant for 2000 steps, {n_seeds} training seeds on one data seed. A snapshot at step T "
            "equals a run of budget T (tested bit for bit). Cells: mean ± half the range over the seeds.", "",
            table(["", *[f"T={t}" for t in steps]], rows), "",
            "Where ΔL settles (every later change of the seed mean below the seed spread, or below 0.1% of ΔL): "
            + "; ".join(settled) + f". L_init = {loss_init:.2f} nats.", "",
            "![budget curve](budget_curve.png)", ""]


def law_at(runs: list[dict], step: int | None, drop_saturated: bool = False) -> dict:
    """The law fitted to the grid as it stood at step T (studies.at_step; None: as the runs ended), with
    bootstrap intervals and the lack-of-fit test; 'error' says why when the points cannot determine it."""
    at, missing = at_step(runs, step) if step is not None else (runs, 0)
    if drop_saturated:
        bad = {(r["rank"], r["length"]) for r in at if saturated(r)}
        at = [r for r in at if (r["rank"], r["length"]) not in bad]
    r, l, d = (np.array([x[k] for x in at], float) for k in ("rank", "length", "delta_loss"))
    out = dict(step="end" if step is None else step, runs=len(at), points=len({(x["rank"], x["length"]) for x in at}),
               missing=missing)
    try:
        fit = fit_law(r, l, d)
    except ValueError as e:
        return out | dict(error=str(e))
    return out | fit | bootstrap(r, l, d, fit, N_BOOT) | lack_of_fit(r, l, d, fit)


def ci(f: dict, k: str) -> str:
    lo_hi = (f.get("ci95") or {}).get(k)
    return f"{f[k]:.3g}" + (f" [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]" if lo_hi else "")


def law_rows(fits: list[dict]) -> list[list]:
    rows = []
    for f in fits:
        if "error" in f:
            rows.append([f["step"], f["runs"], f["points"], "undetermined: " + f["error"]] + [None] * 6)
            continue
        lof = "–" if f.get("lof_F") is None else f"F({f['lof_df'][0]}, {f['lof_df'][1]}) = {f['lof_F']:.2f}, " \
                                                  f"p = {f['lof_p']:.2g}"
        rows.append([f["step"], f["runs"], f["points"], ci(f, "C"), ci(f, "alpha"), ci(f, "beta"), ci(f, "b"),
                     f["r2"], f["mape"], lof])
    return rows


def law_by_budget(runs: list[dict], figures: Path) -> list[str]:
    """Stage 2: the law at every snapshot budget, with and without saturated points; α(T) and β(T)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid_runs(runs)
    if len({r["rank"] for r in grid}) < 2 or len({r["length"] for r in grid}) < 2:
        return []
    steps = snapshot_steps(grid)
    every = [law_at(grid, t) for t in steps]
    unsaturated = [law_at(grid, t, drop_saturated=True) for t in steps]
    header = ["T", "runs", "points", "C [95% CI]", "α", "β", "b", "R²", "MAPE %", "lack of fit vs seed spread"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, k, name in ((axes[0], "alpha", "α (rank exponent)"), (axes[1], "beta", "β (length exponent)")):
        for fits, label, c in ((every, "all points", "C0"), (unsaturated, "saturated points dropped", "C1")):
            ok = [f for f in fits if "error" not in f]
            if not ok:
                continue
            ts = np.array([f["step"] for f in ok])
            v = np.array([f[k] for f in ok])
            lo = np.array([(f.get("ci95") or {}).get(k, [np.nan, np.nan])[0] for f in ok])
            hi = np.array([(f.get("ci95") or {}).get(k, [np.nan, np.nan])[1] for f in ok])
            ax.errorbar(ts, v, yerr=[v - lo, hi - v], color=c, marker="o", capsize=3, label=label)
        ax.set(xscale="log", xlabel="budget T (steps)", ylabel=name)
        ax.legend(fontsize=8)
    fig.suptitle("The law's exponents against budget, ranks 1–32 × ℓ 25–200, ρ = 1 (95% bootstrap intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(figures / "exponents_vs_budget.png", dpi=100)
    plt.close(fig)
    seeds = sorted({r["seed"] for r in grid})
    points = {(r["rank"], r["length"]) for r in grid}
    return ["### Stage 2: the law at each budget", "",
            f"{len(grid)} runs at {len(points)} of the {len(GRID_RANKS) * len(GRID_LENGTHS)} grid points "
            f"(ranks {{{', '.join(map(str, GRID_RANKS))}}} × ℓ {{{', '.join(map(str, GRID_LENGTHS))}}}), training "
            f"seeds {seeds}, data seed 0. Each row fits ΔL = C·r^α·ℓ^(−β) + b to the mean ΔL per point as the runs "
            "stood at step T (a run memorised earlier enters with its final values). Intervals: percentile "
            f"bootstrap over points ({N_BOOT} resamples). Lack of fit: F test of the misfit against the "
            "seed-to-seed spread at replicated points.", "",
            "All points:", "", table(header, law_rows(every)), "",
            "Saturated points dropped (a point where some run is memorised or has ΔL ≥ 0.95·L_init: there ΔL "
            "measures L_init, not what the adapter can hold):", "", table(header, law_rows(unsaturated)), "",
            "![exponents against budget](exponents_vs_budget.png)", ""]


def heatmaps(runs: list[dict], figures: Path) -> list[str]:
    """Final loss and token accuracy over (rank, ℓ), seed means (the paper's Figure-style heatmaps)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid_runs(runs)
    if not grid:
        return []
    ranks = sorted({r["rank"] for r in grid})
    lengths = sorted({r["length"] for r in grid})
    mean = lambda k, r, L: (np.mean([x[k] for x in by_seed(grid, r, L)])  # noqa: E731
                            if by_seed(grid, r, L) else np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = []
    for ax, k, title in ((axes[0], "loss_final", "final loss (nats/token)"), (axes[1], "token_acc", "token accuracy")):
        m = np.array([[mean(k, r, L) for r in ranks] for L in lengths])  # (lengths, ranks)
        im = ax.imshow(m, origin="lower", cmap="viridis_r" if k == "loss_final" else "viridis", aspect="auto")
        for i in range(len(lengths)):
            for j in range(len(ranks)):
                if np.isfinite(m[i, j]):
                    rgb = im.cmap(im.norm(m[i, j]))[:3]
                    dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
        ax.set(xticks=range(len(ranks)), xticklabels=ranks, yticks=range(len(lengths)), yticklabels=lengths,
               xlabel="rank", ylabel="ℓ", title=title)
        fig.colorbar(im, ax=ax)
    for L in lengths:
        cells = []
        for r in ranks:
            s = by_seed(grid, r, L)
            cells.append(None if not s else f"{np.mean([x['token_acc'] for x in s]):.2f} / "
                         f"{sum(x['exact_match'] == 1.0 for x in s)} of {len(s)}")
        rows.append([L] + cells)
    fig.suptitle("After 2000 steps or once memorised, ρ = 1 (mean over training seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(figures / "heatmaps.png", dpi=100)
    plt.close(fig)
    return ["### Token accuracy and exact recall over (rank, ℓ)", "",
            "Each cell: mean token accuracy / runs recalled exactly by the decoder, after 2000 steps or once "
            "memorised.", "", table(["ℓ"] + [f"r={r}" for r in ranks], rows), "", "![heatmaps](heatmaps.png)", ""]


def steps_to_recall(run: dict) -> tuple[int | None, bool]:
    """(steps until the run recalled its answer exactly, whether that is exact): the stop step of a run
    stopped once memorised (checked every 10 steps, and at once after a training pass that saw every
    answer exact), else the first snapshot with exact match 1 (an
    upper bound), else None."""
    if run.get("stop_reason") == "memorized":
        return run["stopped_at"], True
    return next((s["step"] for s in run.get("snapshots") or [] if s["exact_match"] == 1.0), None), False


def write_speed(runs: list[dict]) -> list[str]:
    """Steps to exact recall over (rank, ℓ), and a power law steps = K·r^(−a)·ℓ^c fitted to them."""
    grid = grid_runs(runs)
    ranks = sorted({r["rank"] for r in grid})
    rows, pts = [], []
    for L in sorted({r["length"] for r in grid}):
        cells = []
        for rank in ranks:
            s = by_seed(grid, rank, L)
            got = [steps_to_recall(x) for x in s]
            if not s:
                cells.append(None)
            elif all(t is not None for t, _ in got):
                cells.append(" / ".join(("" if exact else "≤") + str(t) for t, exact in got))
                pts += [(rank, L, t) for t, exact in got if exact]
            else:
                cells.append(f"> {max(x['steps'] for x in s)}" if not any(t for t, _ in got) else
                             " / ".join("–" if t is None else str(t) for t, _ in got))
        rows.append([L] + cells)
    if not rows:
        return []
    out = ["### Steps to exact recall", "",
           "Per (rank, ℓ): the step at which each training seed's run first recalled its answer exactly by the "
           "decoder (checked every 10 steps and after any training pass that saw every token right; ≤: a run without the stop, read from its snapshots; > T: not within "
           "the budget). At convergence the law's ΔL saturates at L_init (table above), so the time to memorise "
           "is where rank and length still show.", "", table(["ℓ"] + [f"r={r}" for r in ranks], rows), ""]
    if len({p[0] for p in pts}) >= 2 and len({p[1] for p in pts}) >= 2:
        r, L, t = (np.array(c, float) for c in zip(*pts))
        X = np.column_stack([np.ones_like(r), np.log(r), np.log(L)])
        coef, *_ = np.linalg.lstsq(X, np.log(t), rcond=None)
        resid = np.log(t) - X @ coef
        out += [f"A least-squares fit of log steps over the {len(pts)} memorised runs: steps ≈ "
                f"{math.exp(coef[0]):.3g}·r^{coef[1]:.2f}·ℓ^{coef[2]:.2f} (residual sd {resid.std(ddof=3):.2f} in "
                "log steps). Runs that never recalled within the budget are left out, so the fit describes only "
                "the points the budget could reach.", ""]
    elif pts:
        r, t = (np.array(c, float) for c in zip(*[(p[0], p[2]) for p in pts]))
        if len(set(r)) >= 2:
            a, c = np.polyfit(np.log(r), np.log(t), 1)
            out += [f"At one length so far: steps ≈ {math.exp(c):.3g}·r^{a:.2f} over {len(pts)} memorised runs.", ""]
    return out


CAPACITY_HEADER = ["rank", "params", "seeds", "longest ℓ held", "shortest ℓ lost", "bits/param (ℓ·log₂V)",
                   "bits/param (Morris)"]


def verdict(got: dict[int, dict], seeds: int) -> bool | None:
    """Stage 7's rule at one (rank, length), from its runs by training seed: False as soon as one run did not
    recall exactly (one failure decides), True when all `seeds` seeds' runs did, None while undecided."""
    if any(r["exact_match"] < 1.0 for r in got.values()):
        return False
    return True if len(got) == seeds else None


def bracket(by_length: dict[int, dict[int, dict]], seeds: int) -> tuple[list[int], list[int]]:
    """(lengths held, lengths lost) by `verdict`, from each length's runs by training seed."""
    said = {L: verdict(got, seeds) for L, got in by_length.items()}
    return [L for L, v in said.items() if v], [L for L, v in said.items() if v is False]


def capacity_rows(grid: list[dict]) -> list[list]:
    """Per rank of a grid of runs: params, seeds, the longest ℓ every seed recalled exactly, the shortest ℓ
    some seed did not, and the two bit counts (CAPACITY_HEADER). A length that only some seeds have run,
    all exactly (a capacity probe under way), is neither held nor lost."""
    rows = []
    for rank in sorted({r["rank"] for r in grid}):
        at = [r for r in grid if r["rank"] == rank]
        seeds = sorted({r["seed"] for r in at})
        runs: dict = {}
        for r in at:  # seed -> run per length: a run found in two folders counts once
            runs.setdefault(r["length"], {})[r["seed"]] = r
        held, lost = bracket(runs, len(seeds))
        best = max(held) if held else None
        morris = max(r["length"] * max(0.0, math.log(VOCAB) - r["loss_final"]) / math.log(2) for r in at)
        rows.append([rank, at[0]["params"], len(seeds), best, min(lost) if lost else None,
                     None if best is None else best * math.log2(VOCAB) / at[0]["params"], morris / at[0]["params"]])
    return rows


def capacity_table(rows: list[list]) -> str:
    """The capacity rows as a table; where no longer ℓ was lost, the bits are a lower bound, shown as "≥"."""
    bound = lambda v: None if v is None else f"≥ {v:.4g}"  # noqa: E731
    return table(CAPACITY_HEADER, [row if row[4] is not None else row[:5] + [bound(v) for v in row[5:]]
                                   for row in rows])


def capacity(runs: list[dict]) -> list[str]:
    """Per rank: the longest ℓ recalled exactly by every seed, the shortest not, and two bit counts.

    bits/param = ℓ·log₂V / params counts every stored id as log₂V bits, the most a random id can carry.
    Morris et al.'s measure ℓ·(ln V − L_final)/ln 2 credits only the loss below a uniform guess."""
    rows = capacity_rows(grid_runs(runs, lengths=None))  # the grid and docs/capacity.py's probes
    if not rows:
        return []
    return ["### Capacity", "",
            "Per rank: the longest ℓ that every training seed recalls exactly within the budget (2000 steps, "
            "or once memorised), the shortest that some seed does not, the bits per parameter that the longest "
            f"held answer amounts to (ℓ·log₂V / params, V = {VOCAB}: each random id carries log₂V bits), and the "
            "most bits per parameter by Morris et al.'s measure ℓ·(ln V − L_final)/ln 2 over the rank's runs, "
            "which credits partly learned answers too. Where the two lengths are far apart, "
            "`python docs/capacity.py --rank R` narrows them. Published, for whole models trained to "
            "convergence: ≈ 2 bits per parameter (Allen-Zhu and Li) and 3.6 (Morris et al.). Where no longer ℓ "
            "was lost, the rank may hold more, so its bits are a lower bound (≥).", "",
            capacity_table(rows), ""]


def phase_states(runs: list[dict]) -> list[list[tuple]]:
    """Per stage-2 run, each state it passed through with a stubborn token (snapshots, then the end, unless
    a snapshot at the last step is that same state): (rank, ℓ, step, earliest stubborn, first failure, token
    accuracy, stubborn count)."""
    out = []
    for r in grid_runs(runs):
        states = [(s["step"], s["per_sample"][0]) for s in r.get("snapshots") or []]
        if r["steps"] not in {step for step, _ in states}:
            states.append((r["steps"], r["per_sample"][0]))
        rows = [(r["rank"], r["length"], step, ps["earliest_stubborn"], ps["first_failure"], ps["token_acc"],
                 len(ps["stubborn_positions"])) for step, ps in states if ps["earliest_stubborn"] is not None]
        if rows:
            out.append(rows)
    return out


def phase_stats(states: list[tuple]) -> tuple[float, float, float]:
    """(share of states whose first failure is the earliest stubborn token, share of stubborn tokens that
    are the argmax all the same, Spearman ρ between earliest stubborn and first failure)."""
    from scipy.stats import spearmanr

    es, ff = np.array([s[3] for s in states]), np.array([s[4] for s in states])
    acc, n_stub, L = (np.array([s[k] for s in states], float) for k in (5, 6, 1))
    right_anyway = (acc * L - (L - n_stub)).sum() / n_stub.sum()  # correct tokens minus those with p > 0.5
    rho = spearmanr(es, ff).statistic if len(set(es)) > 1 and len(set(ff)) > 1 else float("nan")
    return float(np.mean(es == ff)), float(right_anyway), float(rho)


def phase_transition(runs: list[dict], figures: Path, n_boot: int = N_BOOT) -> list[str]:
    """The p > 0.5 boundary inside training: where free-run greedy decoding first fails against the earliest
    token at p ≤ 0.5, over every snapshot of the law grid, with intervals from resampling (rank, ℓ) points
    (a point's two seeds share one answer sequence, so they are not independent)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_run = phase_states(runs)
    if len(per_run) < 2:
        return []
    flat = [s for rows in per_run for s in rows]
    same, anyway, rho = phase_stats(flat)
    points = sorted({s[:2] for s in flat})
    at = {p: [s for s in flat if s[:2] == p] for p in points}
    later = [s for s in flat if s[3] > 0]  # the earliest stubborn token past the first answer position
    rng = np.random.default_rng(0)
    draws = [[s for i in rng.integers(0, len(points), len(points)) for s in at[points[i]]] for _ in range(n_boot)]
    boot = np.array([phase_stats(d) + (np.mean([s[3] == s[4] for s in d if s[3] > 0]),) for d in draws])
    lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)
    ties = sum(s[3] == s[4] == 0 for s in flat)
    untied = [s for s in flat if not s[3] == s[4] == 0]
    rho_untied = phase_stats(untied)[2]
    violations = sum(r.get("sufficient_violations", 0) for r in grid_runs(runs))
    gaps = np.array([s[4] - s[3] for s in flat])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    ranks = np.array([s[0] for s in flat], float)
    sc = ax0.scatter([s[3] for s in flat], [s[4] for s in flat], c=np.log2(ranks), cmap="viridis", s=12, alpha=0.7)
    top = max(max(s[4] for s in flat), 1)
    ax0.plot([0, top], [0, top], "k:", lw=0.8, label="first failure = earliest stubborn")
    ax0.set(xlabel="earliest stubborn position (p ≤ 0.5)", ylabel="first failure of greedy decoding",
            title=f"{len(flat)} states of {len(per_run)} runs")
    ax0.legend(fontsize=7, loc="upper left")
    fig.colorbar(sc, ax=ax0, label="log₂ rank")
    ax1.hist(gaps, bins=np.arange(-0.5, gaps.max() + 1.5, 1), color="C0")
    ax1.set(xlabel="first failure − earliest stubborn (positions; ℓ when decoded exactly)", ylabel="states",
            yscale="log",
            title="stubborn tokens decoded right before the first failure")
    fig.tight_layout()
    fig.savefig(figures / "phase.png", dpi=100)
    plt.close(fig)
    ci = lambda k: f"[{lo[k]:.2f}, {hi[k]:.2f}]"  # noqa: E731
    return ["### The phase transition at p = 0.5", "",
            f"Every state of the law grid's runs (stage 2) that still had a token at p ≤ 0.5 (a stubborn token): "
            f"{len(flat)} snapshots and run ends of {len(per_run)} runs. The first failure of greedy decoding is "
            "the first position where the teacher-forced argmax is wrong (identical to free-run decoding, which "
            "follows the answer until then). Two facts hold by construction and check the code, not the paper: "
            "a wrong argmax has p ≤ 0.5, so the first failure is never before the earliest stubborn token "
            f"(smallest gap here: {int(gaps.min())}), and a run with no stubborn token decodes exactly "
            f"(`sufficient_violations`, summed over the {len(grid_runs(runs))} runs' ends: {violations}). What the "
            f"data add, with 95% intervals from {n_boot} resamples of the {len(points)} (rank, ℓ) points (a run's "
            "states are not independent, nor are a point's two seeds, which share one answer sequence):", "",
            f"- in {same:.0%} {ci(0)} of the states greedy decoding fails exactly at the earliest stubborn token; "
            f"{ties} of the {len(flat)} states are the tie (0, 0), where the first answer token is already wrong "
            f"and the two positions agree by construction. Among the {len(later)} states whose earliest stubborn "
            f"token lies past the first position, the failure is there in "
            f"{np.mean([s[3] == s[4] for s in later]):.0%} {ci(3)}: about as often greedy decoding gets past it;",
            f"- of all stubborn tokens, {anyway:.0%} {ci(1)} are still the argmax: p ≤ 0.5 is sufficient for a "
            "failure to be possible, not for it to happen, so the p > 0.5 stop is conservative;",
            f"- Spearman ρ between earliest stubborn and first failure: {rho:.3f} {ci(2)} over the pooled states; "
            f"{ties} of them are the tie (0, 0), a run that fails at its first token, and without them "
            f"ρ = {rho_untied:.3f} (n = {len(untied)}).", "",
            "![earliest stubborn against first failure](phase.png)", ""] + probability_grid(runs, figures)


def probability_grid(runs: list[dict], figures: Path) -> list[str]:
    """Per answer position, the target's teacher-forced probability at the end of the longest grid runs
    that did not memorise (training seed 0): where the stubborn tokens sit (the paper's Figure 5)."""
    left = [r for r in grid_runs(runs) if r["seed"] == 0 and r["exact_match"] < 1.0]
    picks = sorted(left, key=lambda r: (-r["length"], r["rank"]))[:4]
    if not picks:
        return []
    plot_grid(picks, str(figures / "prob_grid_convergence.png"), 4)
    return ["Per answer position at the end of the longest runs that did not memorise (training seed 0), the "
            "target's probability, the stubborn tokens (p ≤ 0.5) and the first failure of greedy decoding:", "",
            "![probability grid at the end of the runs](prob_grid_convergence.png)", ""]


def mini_grid(runs: list[dict], task: str, noise: float | None, ranks: tuple, lengths: tuple | None) -> list[dict]:
    """SFT runs of stages 2, 5 and 6: constant lr, data seed 0, no paper schedule, not the MemFT folder's;
    long context at a 2000-step budget, PhoneBook at batch 8; lengths None: any length."""
    return [r for r in runs if r["task"] == task and r.get("noise") == noise and r["method"] == "sft"
            and r.get("schedule") == "constant" and r.get("data_seed") == 0 and not r.get("paper_schedule")
            and not r["_memft"] and r["rank"] in ranks and (lengths is None or r["length"] in lengths)
            and (task != "phonebook" or r.get("batch_size") == 8) and (task != "longctx" or r.get("budget") == 2000)]


def cells(sel: list[dict], ranks: tuple, lengths: tuple, metric: str) -> list[list]:
    """Per ℓ and rank: the seed mean of `metric` / runs recalled entirely (steps to that, per seed)."""
    rows = []
    for L in lengths:
        row = [L]
        for rank in ranks:
            s = by_seed(sel, rank, L)
            if not s:
                row.append(None)
                continue
            t = [steps_to_recall(x) for x in s]
            steps = " / ".join("–" if a is None else ("" if exact else "≤") + str(a) for a, exact in t)
            row.append(f"{np.mean([x[metric] for x in s]):.2f} / {sum(x['exact_match'] == 1.0 for x in s)} of "
                       f"{len(s)} ({steps})")
        rows.append(row)
    return rows


LAW_HEADER = ["T", "runs", "points", "C [95% CI]", "α", "β", "b", "R²", "MAPE %", "lack of fit vs seed spread"]


def density(runs: list[dict]) -> list[str]:
    """Stage 5: ρ ∈ {0, 0.4} beside ρ = 1 at ranks {1, 4, 16} × ℓ {25, 50, 100}: recall, and the law per ρ
    at step 50 (saturated points dropped) and at the end, and over all ρ together (fitlaw --combine-noise)."""
    by_rho = {rho: mini_grid(runs, "longctx", rho, DENSITY_RANKS, DENSITY_LENGTHS) for rho in DENSITY_RHOS}
    if not by_rho[0.0] and not by_rho[0.4]:
        return []
    out = ["### Stage 5: text density", "",
           "Natural text (ρ = 0: the bundled prose), ρ = 0.4 (40% of its tokens replaced by random ids) and "
           "random ids (ρ = 1, stage 2's runs) at ranks {1, 4, 16} × ℓ {25, 50, 100}, 2000 steps at a constant "
           "lr 1e-2 or until memorised, data seed 0. Each cell: mean token accuracy / runs recalled exactly "
           "(the step each seed's run recalled its answer; –: not within the budget).", ""]
    for rho, sel in by_rho.items():
        if sel:
            out += [f"ρ = {rho:g}:", "", table(["ℓ"] + [f"r={r}" for r in DENSITY_RANKS],
                                                   cells(sel, DENSITY_RANKS, DENSITY_LENGTHS, "token_acc")), ""]
    rows, inits = [], [r["loss_init"] for sel in by_rho.values() for r in sel]
    for label, sel in [(f"ρ = {rho:g}", sel) for rho, sel in by_rho.items() if sel] + \
                      [("all ρ together", [r for sel in by_rho.values() for r in sel])]:
        for fit in (law_at(sel, 50, drop_saturated=True), law_at(sel, 2000)):
            rows.append([label] + law_rows([fit])[0])
    out += ["The law per density, at step 50 with saturated points dropped and at the end with every point. "
            "\"All ρ together\" pools the densities at each (rank, ℓ), as `fitlaw.py --combine-noise` does. Its "
            "lack-of-fit test is then against the spread over ρ and seeds, which is mostly the spread of L_init "
            f"over ρ ({min(inits):.1f} to {max(inits):.1f} nats), so that test can hardly reject: its p is no "
            "evidence that the law fits.", "",
            table(["data"] + LAW_HEADER, rows), ""]
    return out


def phonebook_law(runs: list[dict]) -> list[str]:
    """Stage 6: nested PhoneBooks of 8, 16 and 32 numbers × ranks {1, 2, 4, 8, 16}: numbers recalled, and
    the law at step 100 (saturated points dropped) and at the end of 200 epochs."""
    sel = mini_grid(runs, "phonebook", None, PB_RANKS, PB_LENGTHS)
    if not sel:
        return []
    rows = [["step 100, saturated points dropped"] + law_rows([law_at(sel, 100, drop_saturated=True)])[0]]
    rows.append(["end of 200 epochs, every point"] + law_rows([law_at(sel, None)])[0])
    return ["### Stage 6: a PhoneBook law", "",
            "Nested books (each a prefix of the next) of 8, 16 and 32 ten-digit numbers (ℓ = 80, 160, 320 digit "
            "tokens) × ranks {1, 2, 4, 8, 16}, batch 8, 200 epochs (200, 400 and 800 steps) at a constant lr 1e-2 "
            "or until memorised, data seed 0. Each cell: the mean fraction of numbers recalled exactly / runs "
            "that recalled every number (the step of that, per seed).", "",
            table(["ℓ"] + [f"r={r}" for r in PB_RANKS], cells(sel, PB_RANKS, PB_LENGTHS, "exact_match")), "",
            table(["when"] + LAW_HEADER, rows), ""]


def paired(a: list[float], b: list[float]) -> str:
    """b − a over paired seeds: mean ± sd, wins/ties/losses, the 95% t interval of the mean difference, and
    two-sided sign, Wilcoxon and t tests."""
    from scipy.stats import binomtest, ttest_rel, wilcoxon
    from scipy.stats import t as student

    d = np.array(b) - np.array(a)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    out = f"{d.mean():+.3f} ± {d.std(ddof=1):.3f} ({wins} up, {len(d) - wins - losses} tied, {losses} down)"
    if np.ptp(d) > 0:
        half = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        out += f", 95% t interval [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"
    if wins + losses:
        out += f"; sign test p = {binomtest(wins, wins + losses).pvalue:.2g}"
    if (d != 0).any():
        out += f", Wilcoxon p = {wilcoxon(d).pvalue:.2g}"
        # equal differences have no spread: the t statistic is undefined, not infinitely significant
        out += f", paired t p = {ttest_rel(b, a).pvalue:.2g}" if np.ptp(d) > 0 else ", paired t undefined (equal differences)"
    return out


EQUAL = dict(schedule="constant", paper_schedule=None)  # stages 3 and 4: one budget, a constant lr
MEMFT = {  # stage: the settings its runs share, its metrics (the first in the table), and how it is described
    "long context": (dict(task="longctx", noise=1.0, length=50, rank=1, budget=1000, **EQUAL), ("token_acc", "first_failure", "delta_loss"),
                     "ℓ = 50 random ids at rank 1, where SFT stays below exact recall; 1000 steps for every method at "
                     "a constant lr 1e-2"),
    "PhoneBook": (dict(task="phonebook", noise=None, length=320, rank=2, batch_size=8, epochs_budget=200, **EQUAL),
                  ("exact_match", "token_acc"),
                  "32 numbers (ℓ = 320 digits) at rank 2 with batch 8, so SW's curriculum grows its active set "
                  "from 8 to 32 numbers; 200 epochs for every method at a constant lr 1e-2: 800 steps for SFT and "
                  "OT, 620 for SW, whose curriculum trains 1, 1, 2, 3 and then 4 batches per epoch (the snapshots at step "
                  "600, which all three reach, compare them at equal steps)"),
    "PhoneBook, the authors' schedules": (
        dict(task="phonebook", noise=None, length=320, rank=2, paper_schedule="qwen"), ("exact_match", "token_acc"),
        "The same book and rank under the authors' Qwen PhoneBook tables (`--paper-schedule qwen`): SFT and OT "
        "at batch 4 for 200 epochs (1,600 steps), SW at batch 10 for 300 epochs with the curriculum boundaries "
        "[20, 40, 60, 80, 300] (980 steps: 1, 1, 1, 2 and then 4 batches per epoch, the last of 2 numbers; 1.5× SFT's "
        "epochs), all at lr 1e-2 decaying linearly"),
}


METRICS = {"token_acc": "token accuracy", "exact_match": "fraction of numbers recalled exactly",
           "first_failure": "first failure (answer tokens recalled before greedy decoding's first error)",
           "delta_loss": "ΔL (nats per answer token)"}
MATCHED_STEP = {"PhoneBook": 600}  # a snapshot that SW's 620 steps reach too: the same steps, not the same epochs


def memft_arm(r: dict, label: str) -> bool:
    """Whether run r belongs to a MemFT stage: its settings, the memft folder, and seed i on data seed i.
    `epochs_budget` is the run's --epochs (a run's budget in steps depends on the method: SW's curriculum
    trains fewer batches in its first epochs)."""
    def has(k: str, v: object) -> bool:
        return r.get("settings", {}).get("epochs") == v if k == "epochs_budget" else r.get(k) == v
    return r["_memft"] and r.get("data_seed") == r["seed"] and all(has(k, v) for k, v in MEMFT[label][0].items())


def memft_arms(runs: list[dict], label: str) -> dict[str, dict[int, dict]]:
    """A MemFT stage's runs as {method: {seed: run}}."""
    arms: dict = {}
    for r in (r for r in runs if memft_arm(r, label)):
        arms.setdefault(r["method"], {})[r["seed"]] = r
    return arms


def memft(runs: list[dict], label: str) -> list[str]:
    """Stages 3, 4 and 8: MemFT-OT and -SW against SFT, seed by seed (seed i on data seed i), with paired
    tests on the stage's metrics (long context: token accuracy, and the first failure, i.e. how many answer
    tokens greedy decoding recalls before its first error; PhoneBook: numbers recalled)."""
    _, metrics, what = MEMFT[label]
    metric = metrics[0]
    arms = memft_arms(runs, label)
    seeds = sorted(set.intersection(*(set(v) for v in arms.values()))) if len(arms) == 3 else []
    if len(seeds) < 2:
        return []
    name = METRICS[metric]
    rows, tests = [], []
    for m in ("sft", "ot", "sw"):
        v = [arms[m][s][metric] for s in seeds]
        em = [arms[m][s]["exact_match"] == 1.0 for s in seeds]
        t = [steps_to_recall(arms[m][s])[0] for s in seeds]
        rows.append([m] + [f"{a:.2f}" for a in v] + [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}",
                                                     f"{sum(em)} of {len(em)}",
                                                     " / ".join("–" if x is None else str(x) for x in t)])
        for k in metrics:
            if m != "sft":
                tests.append(f"- {m.upper()} − SFT, {METRICS[k].split(' (')[0]}: "
                             + paired([arms["sft"][s][k] for s in seeds], [arms[m][s][k] for s in seeds]))
    return [f"### MemFT against SFT, {label}", "",
            f"{what}, stopping once memorised. "
            f"{len(seeds)} paired seeds: seed i trains every method on data seed i. Per seed: the {name}; its "
            "mean ± sd; runs recalled entirely; the step of entire recall (– = not within the budget).", "",
            table(["method"] + [f"seed {s}" for s in seeds] + ["mean ± sd", "all exact", "steps to all exact"], rows),
            *([] if len(metrics) == 1 else
              ["", "Per seed, " + "; ".join(f"{METRICS[k]}: " + ", ".join(
                  f"{m.upper()} " + " / ".join(f"{arms[m][s][k]:.3g}" for s in seeds) for m in ("sft", "ot", "sw"))
                  for k in metrics[1:])]),
            "", "Paired differences (mean ± sd over seeds):", "", *tests, *matched_steps(arms, seeds, label, metrics), "",
            f"With {len(seeds)} pairs the smallest two-sided p a sign or Wilcoxon test can give is "
            f"{2 / 2 ** len(seeds):.3g}.", ""]


def matched_steps(arms: dict, seeds: list[int], label: str, metrics: tuple) -> list[str]:
    """For a stage whose methods train different numbers of steps in the same epochs: SW against SFT and OT
    at one snapshot step that all three reach."""
    step = MATCHED_STEP.get(label)
    if step is None:
        return []
    def at(m: str, k: str) -> list[float]:
        return [next(x[k] for x in arms[m][s]["snapshots"] if x["step"] == step) for s in seeds]
    return [f"- {b.upper()} − {a.upper()} at step {step}, {METRICS[k]}: " + paired(at(a, k), at(b, k))
            for a, b in (("sft", "ot"), ("sft", "sw"), ("ot", "sw")) for k in metrics]


def sampling(folder: Path) -> list[str]:
    """Recall under sampling (docs/sampling.py): Π p at each T per memorised run, and K sampled decodes."""
    f = folder / "sampling.json"
    if not f.exists():
        return []
    rows = json.loads(f.read_text())["rows"]
    temps = sorted({r["temperature"] for r in rows})
    out, inside, checked, shared = [], 0, 0, 0
    for L in sorted({r["length"] for r in rows}):
        for rank in sorted({r["rank"] for r in rows if r["length"] == L}):
            at = [r for r in rows if r["length"] == L and r["rank"] == rank]
            cells = []
            for t in temps:
                pred = [r["predicted"] for r in at if r["temperature"] == t]
                smp = [r for r in at if r["temperature"] == t and r["sampled"] is not None]
                cell = f"{np.mean(pred):.3f}" if pred else "–"
                if smp:  # the sampled run's own Π p beside its sampled fraction: like with like
                    cell += f" ({smp[0]['predicted']:.2f} / {smp[0]['sampled']:.2f})"
                cells.append(cell)
                for r in smp:
                    checked += 1
                    shared += r.get("sampler_seed") is None
                    inside += r["ci95"][0] <= r["predicted"] <= r["ci95"][1]
            out.append([L, rank, len({r["seed"] for r in at})] + cells)
    k = max((r["k"] for r in rows), default=0)
    return ["### Recall under sampling", "",
            "Runs that greedy decoding recalls exactly. Each cell: Π_t softmax(z_t/T)[target_t], the probability "
            "that sampling at temperature T reproduces the whole answer (mean over the training seeds), and in "
            f"brackets, for the one run sampled (training seed 0), its own Π p / the fraction of K = {k} sampled "
            "decodes that reproduced the answer.", "",
            table(["ℓ", "rank", "runs"] + [f"T = {t:g}" for t in temps], out), "",
            f"The sampled fraction lies inside its 95% Wilson interval around Π p in {inside} of {checked} cases"
            + (f" ({shared} of them drawn with one sampler seed, 0, for every run and temperature: they share their "
               "random numbers, so they are not independent checks)" if shared else "") + ". "
            "That agreement is an identity (sampling an answer token by token has exactly that probability): it "
            "checks the sampler, not the paper. The finding is the size of Π p: greedy recall is certain once every "
            "token has p > 0.5, sampled recall is not.", "", *retrained_note(rows)]


def retrained_note(rows: list[dict]) -> list[str]:
    names = sorted({r["name"] for r in rows if r.get("retrained")})
    if not names:
        return []
    return [f"{len(names)} of the {len({r['name'] for r in rows})} runs were measured on adapters trained again from "
            "their results files (`docs/sampling.py --retrain`; adapters are not committed): each new run stopped at "
            "the recorded step with the recorded final loss to within 1e-3 relative.", ""]


def summary_csv(runs: list[dict]) -> str:
    """One row per run: the compact record beside the full per-step files."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_KEYS)
    for r in sorted(runs, key=lambda r: (r["task"], r["noise"], r["length"], r["rank"], r["method"], r["seed"])):
        w.writerow(["" if r.get(k) is None else (round(r[k], 6) if isinstance(r[k], float) else r[k])
                    for k in SUMMARY_KEYS])
    return buf.getvalue()


def stages(runs: list[dict], folder: Path) -> list[str]:
    """How far each stage of docs/reproduce.sh (and the two scripts beside it) has come."""
    grid = grid_runs(runs)
    arm = lambda label: sum(memft_arm(r, label) for r in runs)  # noqa: E731
    probes = len(grid_runs(runs, lengths=None)) - len(grid)
    sampled = folder / "sampling.json"
    rows = [["1. budget curve: ranks {1, 4, 16} at ℓ = 100, 2000 steps", "6",
             sum(r["length"] == BUDGET_LENGTH and r["rank"] in BUDGET_RANKS and r.get("stop_reason") == "budget"
                 for r in grid)],
            ["2. law grid: ranks {1, 2, 4, 8, 16, 32} × ℓ {25, 50, 100, 200} at ρ = 1, 2 seeds", "48", len(grid)],
            ["3. MemFT vs SFT, long context: ℓ = 50, rank 1, 1000 steps, 5 paired seeds × 3 methods", "15",
             arm("long context")],
            ["4. MemFT vs SFT, PhoneBook: 32 numbers, rank 2, batch 8, 200 epochs, 5 paired seeds × 3 methods", "15",
             arm("PhoneBook")],
            ["5. density: ρ {0, 0.4} × ranks {1, 4, 16} × ℓ {25, 50, 100}, 2 seeds", "36",
             sum(len(mini_grid(runs, "longctx", rho, DENSITY_RANKS, DENSITY_LENGTHS)) for rho in (0.0, 0.4))],
            ["6. PhoneBook law: 8, 16, 32 numbers × ranks {1, 2, 4, 8, 16}, 2 seeds", "30",
             len(mini_grid(runs, "phonebook", None, PB_RANKS, PB_LENGTHS))],
            ["7. capacity by bisection over ℓ (`docs/capacity.py`; ranks 1, 2, 4, 8)", "–", probes],
            ["8. MemFT vs SFT, PhoneBook under the authors' schedules (`--paper-schedule qwen`), 5 paired seeds × 3 "
             "methods", "15", arm("PhoneBook, the authors' schedules")],
            ["recall under sampling (`docs/sampling.py`)", "–",
             len(json.loads(sampled.read_text())["rows"]) if sampled.exists() else 0]]
    return ["### Progress", "", table(["stage", "runs planned", "runs done"], rows), ""]


def gpu_grid(folder: Path) -> list[str]:
    """The paper-scale grid that docs/gpu_grid.sh runs on a GPU (results/gpu/), apart from the CPU study:
    recall per (rank, ℓ), the longest ℓ held per rank, and the law at step 50 and at the end."""
    files = sorted(f for f in folder.glob("*.json") if f.name != "device.json")
    if not files:
        return []
    runs = [json.loads(f.read_text()) for f in files]
    device = json.loads((folder / "device.json").read_text()) if (folder / "device.json").exists() else {}
    ranks, lengths = sorted({r["rank"] for r in runs}), sorted({r["length"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    fits = [law_at(runs, 50, drop_saturated=True), law_at(runs, None)]
    dtypes = sorted({r.get("settings", {}).get("dtype") or "the default dtype" for r in runs})
    return [f"### The paper-scale grid on a GPU ({device.get('device', 'device not recorded')})", "",
            f"`docs/gpu_grid.sh`: {len(runs)} runs, ranks {', '.join(map(str, ranks))} × ℓ "
            f"{', '.join(map(str, lengths))} random ids, training seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))} on data seed 0, stage 2's settings (constant lr 1e-2, 2000 steps or until "
            f"memorised) in {', '.join(dtypes)} on {device.get('device', 'a GPU')} (torch {device.get('torch', '?')}), "
            "where the CPU study runs fp32. Each cell: token accuracy / runs recalled entirely (steps to that).", "",
            table(["ℓ"] + [f"r={r}" for r in ranks], cells(runs, tuple(ranks), tuple(lengths), "token_acc")), "",
            "Per rank, the longest ℓ held, the shortest lost, and the bits per parameter as in the CPU study's "
            "capacity table:", "",
            capacity_table(capacity_rows(runs)), "",
            "The law over the grid at step 50 (saturated points dropped) and at the end:", "",
            table(LAW_HEADER, law_rows(fits)), ""]


def report(folder: Path, figures: Path) -> list[str]:
    """The generated block's lines; also writes the figures and folder/summary.csv."""
    runs = load(folder)
    if not runs:
        return ["No convergence runs yet: `bash docs/reproduce.sh` writes them into results/convergence/.", ""]
    (folder / "summary.csv").write_text(summary_csv(runs))
    # wall_s covers the last process only; time_s carries the training time over resumes
    hours = sum(max(r.get("wall_s", 0.0), r.get("time_s", 0.0)) for r in runs) / 3600
    return (stages(runs, folder) + budget_curve(runs, figures) + law_by_budget(runs, figures)
            + heatmaps(runs, figures) + write_speed(runs) + capacity(runs) + phase_transition(runs, figures) + density(runs) + phonebook_law(runs)
            + memft(runs, "long context") + memft(runs, "PhoneBook") + memft(runs, "PhoneBook, the authors' schedules")
            + sampling(folder) + gpu_grid(folder.parent / "gpu")
            + [f"{len(runs)} runs, {hours:.1f} h of summed run time (wall time, or training time over resumes where longer; one thread each, two chains side by side); "
               f"one row per run in results/convergence/summary.csv.", ""])
