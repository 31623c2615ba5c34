"""Facts at scale: 20, 100 and 1,000 made-up employee IDs stored with the facts defaults (docs/facts.md).

    python docs/scale.py                  # 20 and 100 facts; prints the table
    python docs/scale.py --sizes 1000     # hours on a 2-core CPU
    python docs/scale.py --table          # the table of finished runs only

Each size is an ordinary `train.py --data FILE --until-recalled` run with the facts defaults (the facts
preset: q_proj, v_proj on the top third of the layers; λ = 10), and the lr, budget, check period and rank of
SETTINGS, since a fixed lr and budget do not fit every size. The facts ("Employee ID of <First Last>" ->
"AB-1234-CD") are bench/facts.py's, seed 0, written to results/facts-scale/facts-N.jsonl. --rank auto
starts at the rank the planner plans (4 when it cannot) and doubles it while an attempt's budget runs out
before every fact is recalled; that suits 20 and 100 facts, which rank 4 holds. 1,000 facts start at rank
16 instead: a 4,000-step attempt at rank 4 and another at 8 would cost hours each, and 16 gives each
parameter 2.5 times the answer tokens that 100 facts gave rank 4, which recalled them with half its budget
to spare. Rerunning reuses finished runs; a killed one resumes from its checkpoint, saved at every check.

The table reads each run's results file and certificate: facts recalled, the rank it ended at and its
attempts, steps to recall (an attempt that recalled at step S settles to 2S within its budget), wall time of every attempt together (training, checks and certificate; measured
under whatever else shared the CPU), and the certificate's locality on the held-out prompts, adapter on vs off.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from settings import int_list  # noqa: E402
OUT = ROOT / "results" / "facts-scale"
SETTINGS = {  # facts: (lr, steps per attempt, --eval-every, --rank); batches of 16 facts, as train.py defaults to
    20: (2e-2, 200, 5, "auto"),
    100: (1e-2, 600, 10, "auto"),
    1000: (1e-2, 4000, 100, "16"),  # 100 facts recalled at 1e-2 in about 50 passes: 3,150 steps here, if a pass did as much
}


def run(n: int, python: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_facts", ROOT / "bench" / "facts.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # bench/facts.py's facts, so that the two measure the same kind
    data = OUT / f"facts-{n}.jsonl"
    if not data.is_file():
        bench.write_facts(data, n, seed=0)
    lr, steps, every, rank = SETTINGS[n]
    name = f"facts-{n}" if rank == "auto" else f"facts-{n}-r{rank}"  # auto names each attempt facts-N-r<rank> itself
    cmd = [python, str(ROOT / "train.py"), "--data", str(data), "--until-recalled", "--rank", rank, "--lr", str(lr),
           "--steps", str(steps), "--eval-every", str(every), "--save-every", str(every), "--out", str(OUT),
           "--name", name]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode not in (0, 1):  # 1: some fact not recalled, which the table reports
        sys.exit(f"error: {n} facts stopped with exit code {done.returncode}")


def row(n: int) -> list[str] | None:
    # each attempt's folder is facts-N-r<rank>; "facts-N*" alone would take 1,000 facts' folders for 100's
    certs = sorted(OUT.glob(f"facts-{n}-r*/certificate.json"), key=lambda p: p.stat().st_mtime)
    if not certs:
        return None
    c = json.loads(certs[-1].read_text())
    o, loc = c["overall"], c.get("locality", {})
    attempts = o.get("attempts", [])
    runs = [json.loads((OUT / f"{a['name']}.json").read_text()) for a in attempts if (OUT / f"{a['name']}.json").is_file()]
    last = runs[-1] if runs else {}
    tries = ", ".join(f"r{a['rank']}: {a.get('recalled_at') or a['steps']}/{a['budget']}"
                      + (", settled" if a.get("recalled_at") else "") for a in attempts)
    return [str(n), f"{SETTINGS[n][0]:g}", tries or "–", f"{o['facts_stored']}/{o['facts']}",
            f"{last.get('params', 0):,}", f"{sum(r.get('time_s', 0) for r in runs) / 60:.1f}",
            f"{o['min_prob']:.3f}", f"{loc.get('token_agreement', float('nan')):.3f}",
            f"{loc.get('replies_kept', '–')}/{loc.get('prompts', '–')}",
            f"{100 * loc['prose']['drift']:+.1f}%" if loc else "–"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int_list, default="20,100", help=f"comma list of fact counts (default 20,100; of {', '.join(map(str, SETTINGS))})")
    ap.add_argument("--python", default=sys.executable, help="interpreter for train.py (default this one)")
    ap.add_argument("--table", action="store_true", help="print the table of finished runs only; train nothing")
    a = ap.parse_args()
    sizes = a.sizes
    unknown = [n for n in sizes if n not in SETTINGS]
    if unknown:
        sys.exit(f"error: no settings for {unknown[0]} facts; choose from {', '.join(map(str, SETTINGS))}")
    OUT.mkdir(parents=True, exist_ok=True)
    if not a.table:
        for n in sizes:
            run(n, a.python)
    head = ["facts", "lr", "attempts (rank: steps to recall/budget)", "recalled", "params", "minutes", "min p", "token agreement",
            "replies kept", "prose drift"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for n in sizes:
        if r := row(n):
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
