"""What the convergence study could and could not have seen: the law over several data seeds, the share of
tokens MemFT took out of the loss, and the power of each MemFT comparison against the paper's effects.

    python docs/report.py        # calls report() below; its block follows the convergence study's

Every number here is computed from results/convergence/ (and its dataseeds/, memft/ and boundary/ folders);
the only typed-in numbers are the paper's MemFT effects and two from a replaced run, labelled as such.
"""

import json
import math
from pathlib import Path

import numpy as np

import convergence as cv  # docs/convergence.py, beside this file
from fitlaw import bootstrap, fit_law, lack_of_fit
from studies import at_step, saturated

DATA_SEED_LENGTHS = (25, 50, 100, 200, 400)
N_BOOT = 1000
# The paper's MemFT − SFT at rank 1 (SPEC §8), in our metrics' units: long-context token accuracy (a
# fraction) and PhoneBook exact recall (a fraction of numbers), for Llama-3.1-8B and Qwen3-8B.
PAPER_EFFECTS = {("long context", "ot"): (-0.001, 0.013), ("long context", "sw"): (0.051, 0.068),
                 ("PhoneBook", "ot"): (0.005, 0.035), ("PhoneBook", "sw"): (0.013, 0.062)}


# ----------------------------------------------------------------------------- the law over data seeds


def data_seed_runs(folder: Path) -> list[dict]:
    """The law grid's runs, one per (data seed, rank, ℓ): data seed 0 from stage 2 (training seed 0; its
    ℓ = 400 from dataseeds/), data seeds 1 and 2 from dataseeds/ (training seed = data seed), so that the
    replicates at a point differ in their answer sequence and adapter init together."""
    base = [r for r in cv.grid_runs(cv.load(folder)) if r["seed"] == 0 and r.get("data_seed", 0) == 0]
    extra = [json.loads(f.read_text()) for f in sorted((folder / "dataseeds").glob("*.json"))]
    runs = base + [r for r in extra if r["task"] == "longctx" and r["noise"] == 1.0 and r["method"] == "sft"]
    seen, out = set(), []
    for r in runs:  # stage 2's run first: dataseeds/ holds none of its points but ℓ = 400
        key = (r["data_seed"], r["rank"], r["length"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def complete_lengths(runs: list[dict], seeds: list[int]) -> list[int]:
    """The lengths at which every data seed has every rank of the grid."""
    return [L for L in DATA_SEED_LENGTHS
            if all({r["rank"] for r in runs if r["length"] == L and r["data_seed"] == d} >= set(cv.GRID_RANKS)
                   for d in seeds)]


def fit_points(at: list[dict]) -> tuple[dict | None, str]:
    """fit_law over runs (mean per point), or (None, why)."""
    r, l, d = (np.array([x[k] for x in at], float) for k in ("rank", "length", "delta_loss"))
    try:
        return fit_law(r, l, d), ""
    except ValueError as e:
        return None, str(e)


def data_seed_law(folder: Path, steps: tuple = (50, 100)) -> list[str]:
    """The law at steps 50 and 100 per data seed and pooled over them, with the lack-of-fit test against
    the spread over data seeds and bootstrap intervals over points."""
    runs = data_seed_runs(folder)
    seeds = sorted({r["data_seed"] for r in runs})
    lengths = complete_lengths(runs, seeds)
    if len(seeds) < 2 or len(lengths) < 2:
        return []
    runs = [r for r in runs if r["length"] in lengths and r["rank"] in cv.GRID_RANKS]
    rows, notes = [], []
    for T in steps:
        at, _ = at_step(runs, T)
        bad = {(r["rank"], r["length"]) for r in at if saturated(r)}
        at = [r for r in at if (r["rank"], r["length"]) not in bad]
        for d in seeds:
            f, why = fit_points([r for r in at if r["data_seed"] == d])
            rows.append([T, f"data seed {d}", len(bad)] + (["–"] * 5 if f is None else
                        [f"{f['alpha']:.3f}", f"{f['beta']:.3f}", f"{f['b']:.3g}", f"{f['r2']:.3f}", "–"]))
            if f is None:
                notes.append(f"step {T}, data seed {d}: {why}")
        f, why = fit_points(at)
        if f is None:
            notes.append(f"step {T}, pooled: {why}")
            continue
        r, l, dl = (np.array([x[k] for x in at], float) for k in ("rank", "length", "delta_loss"))
        lof, boot = lack_of_fit(r, l, dl, f), bootstrap(r, l, dl, f, N_BOOT, 0)
        ci = boot["ci95"] or {}
        per = [fit_points([x for x in at if x["data_seed"] == d])[0] for d in seeds]
        spread = {k: [p[k] for p in per if p is not None] for k in ("alpha", "beta")}
        iv = lambda k: (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else "")  # noqa: E731
        test = ("–" if lof["lof_F"] is None else
                f"F({lof['lof_df'][0]}, {lof['lof_df'][1]}) = {lof['lof_F']:.3g}, p = {lof['lof_p']:.2g}")
        rows.append([T, f"pooled, {len(seeds)} data seeds", len(bad), f"{f['alpha']:.3f}{iv('alpha')}",
                     f"{f['beta']:.3f}{iv('beta')}", f"{f['b']:.3g}", f"{f['r2']:.3f}", test])
        for k, sym in (("alpha", "α"), ("beta", "β")):
            v = np.array(spread[k])
            if len(v) >= 2:
                notes.append(f"step {T}: {sym} over the {len(v)} data seeds' own fits {v.min():.3f} to {v.max():.3f} "
                             f"(sd {v.std(ddof=1):.3f})")
    return ["### The law over three data seeds", "",
            f"Stage 2's grid used one answer sequence (data seed 0) for every point. Here each (rank, ℓ) point of "
            f"ranks {{{', '.join(map(str, cv.GRID_RANKS))}}} × ℓ {{{', '.join(map(str, lengths))}}} has one run "
            f"per data seed {', '.join(map(str, seeds))} (data seed 0: stage 2's training seed 0; data seed d > 0: "
            "training seed d, 100 steps at stage 2's settings, `docs/reproduce.sh` stage 9), so the spread at a "
            "point is data and initialisation together. Points where some run is saturated are dropped for "
            "every seed. The pooled fit's interval resamples points; its lack-of-fit test is against the spread "
            "over data seeds, where stage 2's test was against training seeds on one sequence.", "",
            cv.table(["T", "fit", "points dropped", "α", "β", "b", "R²", "lack of fit vs data-seed spread"], rows),
            "", *[f"- {n}" for n in notes], ""]


# ----------------------------------------------------------------------------- MemFT: what the arms did


def offloaded_share(r: dict) -> float | None:
    """The mean over steps of the share of answer tokens MemFT took out of the loss: the logged
    `reweighted` where the run has it; for a one-sample OT run without it, 1 − n_sub/ℓ while some token is
    below p = 0.5 (else SFT's fallback, 0); None where the history cannot tell."""
    h = r.get("history") or []
    if h and "reweighted" in h[0]:
        return float(np.mean([x["reweighted"] for x in h]))
    if r["method"] == "ot" and r["n_samples"] == 1:
        n = r["answer_tokens"]
        return float(np.mean([(1 - x["n_sub"] / n) if x["n_sub"] else 0.0 for x in h]))
    return None


def memft_arms(runs: list[dict]) -> list[str]:
    """Per MemFT stage and arm: the share of tokens taken out of the loss, and what the arm's runs share
    with SFT's (long-context OT: the same first failure, ΔL within a hair)."""
    rows, out = [], []
    for label in cv.MEMFT:
        arms = cv.memft_arms(runs, label)
        for m in ("ot", "sw"):
            shares = [offloaded_share(x) for x in arms.get(m, {}).values()]
            known = [s for s in shares if s is not None]
            rows.append([label, m.upper(), len(shares),
                         f"{np.mean(known):.1%} ({min(known):.1%}–{max(known):.1%})" if known else "not logged"])
        lc = arms if label == "long context" else None
        if lc and {"ot", "sft"} <= set(lc):
            seeds = sorted(set(lc["ot"]) & set(lc["sft"]))
            same = sum(lc["ot"][s]["first_failure"] == lc["sft"][s]["first_failure"] for s in seeds)
            ddl = np.mean([lc["ot"][s]["delta_loss"] - lc["sft"][s]["delta_loss"] for s in seeds])
            out.append(f"Long-context OT could not differ much from SFT as run: with dropout on in the training "
                       f"pass (the authors compute the threshold from the same training forward pass, dropout on, "
                       f"as we do), almost no answer token passes p = 0.5 while training, so OT weights nearly every "
                       f"token as SFT does. Its first failure equals SFT's in {same} of {len(seeds)} seeds, and its "
                       f"ΔL differs by {ddl:+.3f} nats on average.")
    return ["### What the MemFT arms did", "",
            "Per arm, the mean over steps of the share of answer tokens MemFT took out of the loss (weight below "
            "0.5: tokens past p = 0.5 under OT's threshold, or outside SW's window; SFT: 0), over its seeds "
            "(range over seeds). Runs before this was logged: reconstructed for one-sample OT runs from the "
            "count of sub-threshold tokens; not for SW's soft window or PhoneBook's batches.", "",
            cv.table(["stage", "arm", "runs", "share taken out of the loss"], rows), "", *out, "",
            "Which parts of MemFT-SW each task runs: on long context (one sample) the intra-sample window with the "
            "soft threshold; on PhoneBook the inter-batch curriculum, each batch trained with OT's hard threshold "
            "(skipping a batch with no token below p = 0.5). Stage 4's curriculum (32 numbers, batch 8) trains 1, "
            "1, 2, 3 and then 4 batches per epoch; stage 8's (batch 10, boundaries [20, 40, 60, 80, 300]) 1, 1, 1, 2 "
            "and then 4, the last batch of 2 numbers: the authors' rule rounds the active set down to whole "
            "batches and so never trained 2 of the 32 numbers, which the first run of stage 8's SW arm inherited "
            "(in its files, since replaced, those two ended at token accuracy 0.09–0.27: typed in); the arm was "
            "run again with every number in the last stage.",
            ""]


# ----------------------------------------------------------------------------- power


def power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t test with n pairs to detect a mean difference `effect` when the
    differences have standard deviation `sd`."""
    from scipy.stats import nct, t

    if sd <= 0:
        return 1.0 if effect else alpha
    crit, ncp = t.ppf(1 - alpha / 2, n - 1), effect / (sd / math.sqrt(n))
    return float(nct.sf(crit, n - 1, ncp) + nct.cdf(-crit, n - 1, ncp))


def seeds_needed(effect: float, sd: float, target: float = 0.8, most: int = 1000) -> int | None:
    """The fewest pairs whose paired t test has `target` power for `effect`; None past `most`."""
    return next((n for n in range(2, most + 1) if power(effect, sd, n) >= target), None)


def memft_power(runs: list[dict]) -> list[str]:
    """For each MemFT comparison at rank 1-2: the observed sd of the paired differences, and the power the
    study's 5 pairs had to detect the paper's rank-1 effect (Llama / Qwen), with the pairs 80% power needs."""
    metric = {"long context": "token_acc", "PhoneBook": "exact_match", "PhoneBook, the authors' schedules": "exact_match"}
    rows = []
    for label, k in metric.items():
        arms = cv.memft_arms(runs, label)
        if not {"sft", "ot", "sw"} <= set(arms):
            continue
        for m in ("ot", "sw"):
            seeds = sorted(set(arms[m]) & set(arms["sft"]))
            if len(seeds) < 3:
                continue
            d = np.array([arms[m][s][k] - arms["sft"][s][k] for s in seeds])
            sd = float(d.std(ddof=1))
            effects = PAPER_EFFECTS[("long context" if label == "long context" else "PhoneBook", m)]
            pw = [power(e, sd, len(d)) for e in effects]
            need = [seeds_needed(e, sd) for e in effects]
            rows.append([label, f"{m.upper()} − SFT", len(d), f"{d.mean():+.3f}", f"{sd:.3f}",
                         " / ".join(f"{e:+.3f}" for e in effects), " / ".join(f"{p:.2f}" for p in pw),
                         " / ".join("> 1000" if n is None else str(n) for n in need)])
    if not rows:
        return []
    n_tests = sum(line.startswith("- ") and " p = " in line for label in cv.MEMFT for line in cv.memft(runs, label))
    return ["### What the MemFT comparisons could have seen", "",
            f"The three MemFT sections above make {n_tests} paired comparisons, each with its own p values, none "
            "corrected for the others: with no effect anywhere, about one comparison in twenty would still reach "
            "p < 0.05. A single p just under 0.05 among them (PhoneBook, OT − SFT at step 600) is weak evidence.", "",
            "Per comparison: the paired differences' mean and sd over the seeds, the paper's rank-1 effect in "
            "the same units (long context: token accuracy; PhoneBook: the fraction of numbers recalled; Llama / "
            "Qwen, from SPEC §8, typed in), the power of a two-sided paired t test at α = 0.05 with these pairs "
            "to detect it if the sd is as observed, and the pairs that 80% power would need. A comparison "
            "with low power says nothing about an effect of the paper's size either way.", "",
            cv.table(["stage", "comparison", "pairs", "mean", "sd", "paper's effect", "power", "pairs for 80%"],
                     rows), ""]


# ----------------------------------------------------------------------------- MemFT at the capacity boundary


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact 95% binomial interval for k successes in n."""
    from scipy.stats import beta

    return (0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1)),
            1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k)))


def recall_points(cells: dict, held: dict) -> dict:
    """Per arm, for each (rank, ℓ) of a rank with a known capacity: (ℓ / held[rank], share of runs recalled
    exactly, its exact binomial 95% interval)."""
    points: dict = {}
    for (rank, L), arms in sorted(cells.items()):
        for m, got in arms.items():
            if rank in held and got:
                k = sum(recalled(x) for x in got.values())
                points.setdefault(m, []).append((L / held[rank], k / len(got), *clopper_pearson(k, len(got))))
    return points


def boundary_figure(points: dict, figures: Path) -> str:
    """Exact-recall rate per arm against ℓ / SFT's capacity, with 95% intervals, to figures/boundary.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for j, (m, color) in enumerate((("sft", "tab:gray"), ("ot", "tab:blue"), ("sw", "tab:orange"))):
        pts = points.get(m, [])
        if pts:
            x, y, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(x * (1 + 0.01 * (j - 1)), y, yerr=[y - lo, hi - y], fmt="o", color=color, label=m.upper(),
                        capsize=3)  # the arms side by side
    ax.axvline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("ℓ / SFT's longest held ℓ at that rank (stage 7)")
    ax.set_ylabel("share of runs recalled exactly")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(figures / "boundary.png", dpi=100)
    plt.close(fig)
    return "![Exact-recall rate per arm against ℓ over SFT's capacity, with 95% intervals](boundary.png)"


def recalled(run: dict) -> bool:
    """Exact recall as the certificate defines it: greedy decoding exact and every answer token at p > 0.5."""
    return run["exact_match"] == 1.0 and not run["stubborn"]


def pooled(cells: dict, method: str, bar, name: str) -> str:
    """One MemFT arm against SFT over every (rank, ℓ, training seed, data seed) pair that ran both: how often
    each succeeded by `bar`, the discordant pairs with an exact sign test, and a conservative 95% interval on
    the difference in rate, [−CP⁺(only SFT), +CP⁺(only MemFT)] with CP⁺ the upper 97.5% Clopper-Pearson bound."""
    from scipy.stats import binomtest

    pairs = [(arms[method][p], arms["sft"][p]) for arms in cells.values() for p in sorted(set(arms.get(method, {}))
                                                                                      & set(arms.get("sft", {})))]
    if not pairs:
        return ""
    n = len(pairs)
    up = sum(bar(m) and not bar(s) for m, s in pairs)
    down = sum(bar(s) and not bar(m) for m, s in pairs)
    hi = lambda k: clopper_pearson(k, n)[1]  # noqa: E731  # two-sided 95% interval: its upper end is a 97.5% bound
    sign = f"sign test p = {binomtest(up, up + down).pvalue:.2g}" if up + down else "no pair differs"
    return (f"- {method.upper()} against SFT, {name}: {sum(bar(m) for m, _ in pairs)} of {n} against "
            f"{sum(bar(s) for _, s in pairs)} of {n}; only {method.upper()} {up}, only SFT {down}, {sign}; difference "
            f"in rate {(up - down) / n:+.2f}, 95% interval [{-hi(down):+.2f}, {hi(up):+.2f}]")


def method_capacity(folder: Path, seeds: tuple = (0, 1)) -> list[str]:
    """Each method's own capacity at the ranks where a MemFT method was bisected (docs/capacity.py --method):
    stage 7's definition, over the grid, the probes and stage 10's runs at data seed 0: the longest ℓ that
    every one of `seeds` recalls exactly by the decoder, the shortest ℓ that one of them does not, and the
    steps each seed took to recall at the longest held ℓ."""
    runs = [json.loads(f.read_text()) for sub in ("", "capacity", "boundary") for f in sorted((folder / sub).glob("*.json"))]
    runs = [r for r in runs if r.get("task") == "longctx" and r.get("noise") == 1.0 and r.get("data_seed") == 0
            and r.get("budget") == 2000 and r.get("schedule") == "constant" and not r.get("paper_schedule")
            and r["seed"] in seeds]
    rows = []
    for rank in sorted({r["rank"] for r in runs if r["method"] != "sft"}):
        for m in ("sft", "ot", "sw"):
            at: dict = {}
            for r in runs:
                if r["rank"] == rank and r["method"] == m:
                    at.setdefault(r["length"], {})[r["seed"]] = r
            if m != "sft" and len(at) < 2:  # stage 10's single length alone brackets nothing
                continue
            held, lost = cv.bracket(at, len(seeds))
            best = max(held, default=None)
            steps = "–" if best is None else ", ".join(str(at[best][s]["stopped_at"] or at[best][s]["steps"]) for s in seeds)
            rows.append([rank, m.upper(), best or "–", min(lost, default="–"), steps,
                         ", ".join(str(L) for L in sorted(at))])
    if not any(row[1] != "SFT" for row in rows):
        return []
    return ["MemFT's own capacity, found by bisection as SFT's was in stage 7 (`python docs/capacity.py --rank 1,2 "
            "--method sw`): the longest ℓ that training seeds 0 and 1 both recall exactly by the decoder within the "
            "2000 steps, the shortest ℓ that one of them does not (one seed's run decides a loss), at data seed 0; "
            "stage 10's runs count as probes. A rank whose method has not yet bracketed its capacity is still "
            "being bisected.", "",
            cv.table(["rank", "method", "longest ℓ held", "shortest ℓ lost", "steps to recall at the held ℓ (seeds 0, 1)",
                      "lengths run"], rows), ""]


def boundary(folder: Path, figures: Path | None = None) -> list[str]:
    """Stage 10: SFT, OT and SW at the lost length and inside the bracket of ranks 1, 2, 4: per arm the share
    of runs that recall exactly (exact binomial interval), the paired differences over (training seed, data
    seed) pairs, and the steps to recall relative to SFT where both recalled."""
    from scipy.stats import binomtest

    runs = [json.loads(f.read_text()) for f in sorted((folder / "boundary").glob("*.json"))]
    cells: dict = {}
    for r in runs:
        cells.setdefault((r["rank"], r["length"]), {}).setdefault(r["method"], {})[(r["seed"], r["data_seed"])] = r
    rows, tests = [], []
    for (rank, L), arms in sorted(cells.items()):
        for m in ("sft", "ot", "sw"):
            got = list(arms.get(m, {}).values())
            if not got:
                continue
            k = sum(recalled(x) for x in got)
            greedy = sum(x["exact_match"] == 1.0 for x in got)
            lo, hi = clopper_pearson(k, len(got))
            share = [offloaded_share(x) for x in got]
            rows.append([rank, L, m.upper(), f"{k} of {len(got)}", f"[{lo:.2f}, {hi:.2f}]", f"{greedy} of {len(got)}",
                         f"{np.mean([x['token_acc'] for x in got]):.3f}", f"{np.mean([x['stubborn'] for x in got]):.1f}",
                         "–" if m == "sft" or None in share else f"{np.mean(share):.1%}"])
        for m in ("ot", "sw"):
            pairs = sorted(set(arms.get(m, {})) & set(arms.get("sft", {})))
            if len(pairs) < 2:
                continue
            rec = recalled
            up = sum(rec(arms[m][p]) and not rec(arms["sft"][p]) for p in pairs)
            down = sum(rec(arms["sft"][p]) and not rec(arms[m][p]) for p in pairs)
            both = [(arms[m][p]["stopped_at"], arms["sft"][p]["stopped_at"]) for p in pairs
                    if rec(arms[m][p]) and rec(arms["sft"][p]) and arms[m][p]["stopped_at"] and arms["sft"][p]["stopped_at"]]
            ratio = (f"; steps to recall {m.upper()}/SFT, geometric mean over {len(both)} pairs that both recalled: "
                     f"{math.exp(np.mean([math.log(a / b) for a, b in both])):.2f}" if both else "")
            sign = f", sign test p = {binomtest(up, up + down).pvalue:.2g}" if up + down else ""
            tests.append(f"- rank {rank}, ℓ = {L}, {m.upper()} − SFT over {len(pairs)} pairs: recalled where SFT did "
                         f"not {up}, the reverse {down}{sign}; token accuracy "
                         + cv.paired([arms["sft"][p]["token_acc"] for p in pairs], [arms[m][p]["token_acc"] for p in pairs])
                         + ratio)
    if not rows:
        return []
    verdict = [pooled(cells, m, bar, name) for m in ("ot", "sw") for bar, name in
               ((recalled, "recalled (p > 0.5)"), (lambda x: x["exact_match"] == 1.0, "greedy exact"))]
    figure = []
    if figures:  # SFT's capacity per rank: the longest ℓ every seed held in stage 7's grid and probes
        held = {row[0]: row[3] for row in cv.capacity_rows(cv.grid_runs(cv.load(folder), lengths=None)) if row[3]}
        figure = [boundary_figure(recall_points(cells, held), figures), ""]
    return ["### MemFT at the capacity boundary", "",
            "Stage 10: at each rank's lost length and inside its bracket (stage 7), SFT, OT and SW (the long-context "
            "window), five training seeds on each of two data seeds, 2000 steps at a constant lr 1e-2 or until "
            "memorised. Per arm: the runs that recall their answer exactly (every token at p > 0.5, confirmed by "
            "the decoder) with the exact binomial 95% interval; the runs whose greedy decoding is exact at the end "
            "(every token the argmax, some at p ≤ 0.5: a weaker bar); mean token accuracy and stubborn tokens at the "
            "end; and the mean share of answer tokens MemFT took out of the loss.", "",
            cv.table(["rank", "ℓ", "arm", "recalled", "95% interval", "greedy exact", "token acc", "stubborn", "share taken out"],
                     rows), "", *figure, "Paired by (training seed, data seed):", "", *tests, "",
            "Pooled over every boundary cell, pairs counted once each. The interval on the difference in rate "
            "(MemFT − SFT) runs from minus the exact upper 97.5% bound on the share of pairs where only SFT "
            "succeeded to plus that bound on the share where only MemFT did: conservative, and never empty when no "
            "pair differs.", "", *[v for v in verdict if v], "", *method_capacity(folder)]


def report(folder: Path, figures: Path | None = None) -> list[str]:
    """The review's lines, after the convergence study's."""
    runs = cv.load(folder)
    if not runs:
        return []
    return ["## What the study could and could not have seen", ""] + data_seed_law(folder) + memft_arms(runs) \
        + memft_power(runs) + boundary(folder, figures)
