"""Capacity by bisection: the longest answer ℓ (random ids, ρ = 1) that a rank recalls exactly within the
convergence study's budget (2000 steps at a constant lr 1e-2, stopping once memorised).

    python docs/capacity.py --rank 1                # bisect between the grid's longest held and shortest lost ℓ
    python docs/capacity.py --rank 1,2,4 --seeds 0,1 --tolerance 0.1
    python docs/capacity.py --rank 8                # no length lost yet: double ℓ until one is, then bisect
    python docs/capacity.py --rank 1,2 --method sw   # MemFT's capacity, against SFT's bracket

A length counts as held when the run of every training seed recalls its answer exactly by the decoder.
The seeds of a probe run one after another, and a probe stops at the first seed that fails: that run
alone decides the length is lost.
The bounds start from the law grid's runs in results/convergence/. While no length is lost, the next
probe doubles the longest held one (up to --max-length); then each new length is the geometric midpoint
of the bounds, rounded, and bisection stops when hi / lo − 1 ≤ tolerance or hi − lo ≤ 1. Every probe is
an ordinary train.py run in results/convergence/capacity/ (apart from the grid, so that a law fit over
results/convergence/*.json stays the designed grid), and rerunning resumes: finished runs are reused and
a killed one continues from its checkpoint.

With --method ot or sw the bounds come from that method's own runs (the probes, and stage 10's runs at
the boundary in results/convergence/boundary/). While it has held no length, the first probe is SFT's
longest held ℓ, then half the shortest lost one, so that the bracket is found from either side.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from convergence import verdict  # docs/convergence.py, beside this file: stage 7's held/lost rule

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "results" / "convergence"  # the law grid's runs: the first bounds
OUT = GRID / "capacity"  # the probes
BOUNDARY = GRID / "boundary"  # stage 10: SFT, OT and SW at the boundary, read as probes too
SETTINGS = ["--task", "longctx", "--noise", "1.0", "--data-seed", "0", "--schedule", "constant", "--steps", "2000",
            "--snapshots", "50,100,200,300,500,700,1000,1500,2000", "--stop-when-memorized", "--save-every", "100"]


def results(pattern: str) -> list[Path]:
    """The grid's and the probes' results files matching a glob pattern."""
    return sorted(GRID.glob(pattern)) + sorted(OUT.glob(pattern)) + sorted(BOUNDARY.glob(pattern))


def held(rank: int, length: int, seeds: list[int], method: str = "sft") -> bool | None:
    """Whether every seed's run at (rank, length) recalled exactly: False as soon as one finished run did
    not (one failure decides, so the other seeds need not run), None while that is undecided."""
    runs = {}
    for f in results(f"longctx-n1-L{length}-r{rank}-{method}-const-s*.json"):
        run = json.loads(f.read_text())
        if run.get("data_seed") == 0 and run.get("budget") == 2000 and run["seed"] in seeds:
            runs[run["seed"]] = run
    return verdict(runs, len(seeds))


def bounds(rank: int, seeds: list[int], method: str = "sft") -> tuple[int | None, int | None]:
    """(longest ℓ held, shortest ℓ lost) among the finished runs of this rank and method."""
    files = results(f"longctx-n1-L*-r{rank}-{method}-const-*.json")
    lengths = sorted({int(f.name.split("-L")[1].split("-")[0]) for f in files})
    verdicts = {L: held(rank, L, seeds, method) for L in lengths}
    lo = max((L for L, v in verdicts.items() if v), default=None)
    hi = min((L for L, v in verdicts.items() if v is False), default=None)
    return lo, hi


def first_probe(rank: int, seeds: list[int], method: str, hi: int | None) -> int:
    """A MemFT method that has held no length yet: SFT's longest held ℓ, else half its own shortest lost."""
    sft_lo, _ = bounds(rank, seeds)
    if sft_lo is None:
        sys.exit(f"error: rank {rank} needs a length SFT holds in {GRID} first (run the law grid: "
                 "bash docs/reproduce.sh)")
    return sft_lo if hi is None or sft_lo < hi else max(1, hi // 2)


def bisect(rank: int, seeds: list[int], tolerance: float, python: str, max_length: int,
           method: str = "sft") -> tuple[int, int | None]:
    """Probe lengths until the capacity of `rank` under `method` is bracketed to within `tolerance`: (held, lost)."""
    while True:
        lo, hi = bounds(rank, seeds, method)
        if lo is None and method == "sft":
            sys.exit(f"error: rank {rank} needs a held length in {GRID} first (run the law grid: "
                     "bash docs/reproduce.sh)")
        if lo is None:
            probe(rank, first_probe(rank, seeds, method, hi), seeds, method, python)
            continue
        if hi is None and 2 * lo > max_length:
            print(f"rank {rank}: holds ℓ = {lo}; doubling would pass --max-length {max_length}", flush=True)
            return lo, None
        if hi is not None and (hi / lo - 1 <= tolerance or hi - lo <= 1):
            print(f"rank {rank}: capacity between ℓ = {lo} (held) and ℓ = {hi} (lost)", flush=True)
            return lo, hi
        mid = 2 * lo if hi is None else min(hi - 1, max(lo + 1, round(math.sqrt(lo * hi))))
        print(f"rank {rank}, {method}: held {lo}, lost {hi or 'none yet'}; trying ℓ = {mid}", flush=True)
        probe(rank, mid, seeds, method, python)


def probe(rank: int, length: int, seeds: list[int], method: str, python: str) -> None:
    """Train `length` at `rank`, one seed at a time: the first seed that fails decides the length is lost."""
    for seed in seeds:
        if held(rank, length, seeds, method) is False:
            break
        cmd = [python, str(ROOT / "train.py"), *SETTINGS, "--length", str(length), "--rank", str(rank),
               "--method", method, "--seed", str(seed), "--out", str(OUT)]
        subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", required=True, help="comma list of ranks, bisected one after another")
    ap.add_argument("--seeds", default="0,1", help="training seeds that must all recall (default 0,1)")
    ap.add_argument("--tolerance", type=float, default=0.1, help="stop when hi/lo − 1 ≤ this (default 0.1)")
    ap.add_argument("--method", default="sft", choices=["sft", "ot", "sw"],
                    help="the training method whose capacity is bisected (default %(default)s)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs train.py")
    ap.add_argument("--max-length", type=int, default=1600,
                    help="while no length is lost, ℓ doubles up to this (default %(default)s)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    for r in (int(x) for x in a.rank.split(",")):
        bisect(r, seeds, a.tolerance, a.python, a.max_length, a.method)
