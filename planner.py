"""The recall planner: how many answer tokens each rank held in finished runs, a capacity fit
held = K·r^γ over them, and the smallest rank predicted to recall N tokens exactly.

    python fitlaw.py --plan-recall --tokens 84 results/convergence/*.json results/convergence/capacity/*.json
    python train.py --data myfacts.jsonl --until-recalled --rank auto      # starts from this plan

Numpy only; it refuses lengths or ranks beyond those measured rather than extrapolate.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from studies import GroupKey, Run, load_runs, matches


PLAN_KEY = ("model", "targets", "layers", "task", "noise", "method", "schedule", "budget")


class PlanError(ValueError):
    """The planner cannot answer from these runs; the message says why and what would let it."""


def memorised(run: Run) -> bool:
    """Every answer recalled: the decoder's exact match is 1 and no answer token is at p ≤ 0.5."""
    return run.get("exact_match") == 1 and not run.get("stubborn")


def capacity_points(runs: Iterable[Run]) -> list[tuple[int, int, int | None]]:
    """(rank, held, lost) per rank: `held` is the longest answer (in tokens) that every run of that length
    memorised, with every training seed of that rank run at it, `lost` the shortest longer one that some run
    did not (None when none was tried or all held). A length that only some seeds have run, all memorised
    (a capacity probe under way), is neither. Ranks with nothing held are left out."""
    by_rank = {}
    for run in runs:
        by_rank.setdefault(run["rank"], {}).setdefault(run["answer_tokens"], []).append(run)
    points = []
    for rank, lengths in sorted(by_rank.items()):
        seeds = {r.get("seed") for at in lengths.values() for r in at}
        held = max((n for n, at in lengths.items() if {r.get("seed") for r in at} == seeds
                    and all(map(memorised, at))), default=None)
        if held is None:
            continue
        lost = min((n for n, at in lengths.items() if n > held and not all(map(memorised, at))), default=None)
        points.append((rank, held, lost))
    return points


def fit_capacity(points: Sequence[tuple[int, int, int | None]]) -> tuple[float, float]:
    """(K, γ) of held = K · r^γ, least squares in log-log over the (rank, held) points."""
    r = np.log([p[0] for p in points])
    n = np.log([p[1] for p in points])
    gamma, log_k = np.polyfit(r, n, 1)
    return float(np.exp(log_k)), float(gamma)


def plan_group(runs: Sequence[Run], tokens: int, width: int | None = None) -> dict[str, Any]:
    """The smallest rank whose fitted capacity K·r^γ holds `tokens` answer tokens, from one group of runs.

    The fit uses the ranks whose capacity is bracketed: some length held by every run, and a longer one
    that some run lost. A rank where every length was held says only "at least", so it bounds the
    measured range but does not enter the fit. Raises PlanError, naming the reason, when fewer than two
    ranks are bracketed, when capacity does not grow with rank, when `tokens` is longer than any answer
    memorised here, or when the rank would lie beyond the measured ranks or above `width`. The plan is never
    a rank at or below one that some run showed losing `tokens` or fewer tokens."""
    if tokens <= 0:
        raise PlanError(f"--tokens {tokens}: give the number of answer tokens to store, a positive integer")
    points = capacity_points(runs)
    bracketed = [p for p in points if p[2] is not None]
    if len({p[0] for p in bracketed}) < 2:
        raise PlanError(f"capacity is bracketed (a length held and a longer one lost) at {len(bracketed)} rank(s) "
                        f"of {len({r['rank'] for r in runs})}; the fit needs 2 or more: run longer answers at more "
                        f"ranks (docs/capacity.py bisects them)")
    K, gamma = fit_capacity(bracketed)
    if gamma <= 1e-6:  # equal held lengths at two ranks fit γ = 0 up to rounding
        raise PlanError(f"the fitted capacity does not grow with rank (γ = {gamma:.3g}); the runs cannot plan a rank")
    longest = max(p[1] for p in points)
    if tokens > longest:
        raise PlanError(f"{tokens} answer tokens is more than the longest answer memorised in these runs "
                        f"({longest}); the planner does not extrapolate beyond the measured lengths")
    ranks = sorted({r["rank"] for r in runs})
    exact = (tokens / K) ** (1.0 / gamma)
    rank = max(ranks[0], math.ceil(round(exact, 9)))
    failed = [r["rank"] for r in runs if r["answer_tokens"] <= tokens and not memorised(r)]
    if failed and rank <= max(failed):  # a rank measured to lose this many tokens cannot be the plan
        rank = max(failed) + 1
        if rank > ranks[-1]:
            raise PlanError(f"rank {rank - 1}, the largest measured, lost {tokens} answer tokens or fewer in some "
                            "run; the planner does not extrapolate beyond the measured ranks")
    if rank > ranks[-1]:
        raise PlanError(f"the fit gives rank {rank} for {tokens} tokens, above the largest rank measured "
                        f"({ranks[-1]}); the planner does not extrapolate beyond the measured ranks")
    if width is not None and rank > width:
        raise PlanError(f"the fit gives rank {rank} for {tokens} tokens, above the adapted modules' width {width}")
    seen = [p[0] for p in points if p[1] >= tokens]  # direct evidence: ranks measured to hold this many
    return dict(rank=rank, exact=exact, K=K, gamma=gamma, tokens=tokens,
                fit=f"held tokens = {K:.3g}·r^{gamma:.3g} over ranks {', '.join(str(p[0]) for p in bracketed)}",
                points=[list(p) for p in points], measured_rank=min(seen) if seen else None,
                runs=sorted(r["_path"] for r in runs))


def plan_groups(runs: Iterable[Run]) -> dict[GroupKey, list[Run]]:
    """SFT runs with the fields a plan needs, grouped by PLAN_KEY (one adapter configuration, task and budget)."""
    groups = {}
    for run in runs:
        if run.get("method") != "sft" or not isinstance(run.get("answer_tokens"), int) or "exact_match" not in run:
            continue
        key = tuple(tuple(v) if isinstance(v := run.get(k), list) else v for k in PLAN_KEY)
        groups.setdefault(key, []).append(run)
    return groups


def spans(values: Iterable[Any]) -> str:
    """A list as text, runs of consecutive integers shortened: [0, 1, 2, 3, 7] -> "0-3,7"; names joined."""
    values = list(values)
    if not all(isinstance(v, int) for v in values):
        return ",".join(map(str, values))
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(f"{values[i]}-{values[j]}" if j > i else str(values[i]))
        i = j + 1
    return ",".join(out)


def group_label(key: GroupKey) -> str:
    """A PLAN_KEY group as text: key=value joined by ", ", lists shortened by spans."""
    return ", ".join(f"{k}={spans(v) if isinstance(v, tuple) else v}" for k, v in zip(PLAN_KEY, key))


def plan_recall(paths: Sequence[str], tokens: int, width: int | None = None, model: str | None = None,
                targets: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The smallest rank at which `tokens` answer tokens are predicted to be recalled exactly, from the
    results files in `paths` (files that are not runs are skipped).

    Only SFT runs of the same model, adapted modules and layers count (those given; all when None). They
    are grouped by task, noise, schedule and budget, since capacity within a fixed budget depends on them;
    among the groups that can plan, the one with the largest budget (the nearest to convergence) answers,
    and of those the largest rank. Returns dict(rank, exact, K, gamma, fit, points, measured_rank, runs,
    group). Raises PlanError with the reason when no group can plan."""
    runs, _, _ = load_runs(paths)
    return best_plan(runs, tokens, width, model, targets, layers, files=len(paths))


def best_plan(runs: Sequence[Run], tokens: int, width: int | None = None, model: str | None = None,
              targets: Sequence[str] | None = None, layers: Sequence[int] | None = None,
              files: int | None = None) -> dict[str, Any]:
    """plan_recall over runs already loaded (load_runs); `files` counts them in the message when none fits."""
    files = len(runs) if files is None else files
    want = dict(model=model, targets=None if targets is None else list(targets),
                layers=None if layers is None else list(layers))
    runs = [r for r in runs if all(v is None or r.get(k) == v for k, v in want.items())]
    groups = plan_groups(runs)
    if not groups:
        named = ", ".join(f"{k} {spans(v) if isinstance(v, list) else v}" for k, v in want.items() if v is not None)
        raise PlanError(f"no finished SFT runs{' with ' + named if named else ''} among "
                        f"{files} files; the planner has nothing to fit")
    plans, reasons = [], []
    for key, members in groups.items():
        try:
            plans.append(plan_group(members, tokens, width) | dict(group=group_label(key), budget=key[-1]))
        except PlanError as e:
            reasons.append((len(members), f"{group_label(key)}: {e}"))
    if not plans:
        raise PlanError(max(reasons)[1])  # the largest group's reason
    steps = lambda b: b if isinstance(b, (int, float)) else 0  # noqa: E731  a budget in epochs ranks last
    return max(plans, key=lambda p: (steps(p["budget"]), p["rank"]))


def print_plans(paths: Sequence[str], tokens: int, width: int | None = None,
                where: Sequence[tuple[str, Any]] = ()) -> int:
    """fitlaw.py --plan-recall: each group's capacity points and plan (or why not), then, per adapter
    configuration, the rank train.py --rank auto would start from. Exit status 0 when one plans."""
    runs, errors, others = load_runs(paths)
    errors += others
    runs = [r for r in runs if matches(r, where)]
    groups = plan_groups(runs)
    print(f"recall plan for {tokens} answer tokens: {len(runs)} runs read ({len(errors)} other files skipped), "
          f"{len(groups)} group(s) of SFT runs")
    for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        print(f"\n{group_label(key)}: {len(members)} runs")
        for r, held, lost in capacity_points(members):
            print(f"  rank {r:>3}: every run held {held} tokens; " + (f"some lost {lost}" if lost else "none longer lost"))
        try:
            p = plan_group(members, tokens, width)
        except PlanError as e:
            print(f"  cannot plan: {e}")
            continue
        seen = f"; runs held {tokens}+ tokens from rank {p['measured_rank']}" if p["measured_rank"] else ""
        print(f"  {p['fit']}: rank {p['rank']} (r = {p['exact']:.3g}){seen}")
    planned = 0
    for model, targets, layers in sorted({(k[0], k[1], k[2]) for k in groups}, key=str):
        try:
            best = best_plan(runs, tokens, width, model, targets, layers)
        except PlanError:
            continue
        planned += 1
        print(f"\n{model}, targets {spans(targets)}, layers {spans(layers)}: planned rank "
              f"{best['rank']} (from the group with the largest budget that plans: {best['group']})")
    if not planned:
        print("fitlaw: no group can plan; the reasons are above", file=sys.stderr)
    return 0 if planned else 1
