"""Steps and wall time to exact recall: stop at the p > 0.5 phase boundary vs spend the whole budget.

    python bench/steps_to_em.py                # small PhoneBook, built-in model, paper preset
    python bench/steps_to_em.py --length 100 --steps 150 --rank 8

Runs train.main twice on the same data and settings: once with stop_when_memorized (training ends
as soon as every answer token has p > 0.5, which guarantees exact greedy recall), once for the full
fixed budget. One JSON line per run (steps used, wall time, exact match), then one comparing them:
ratio = budget run's time / early-stop run's time. Training progress goes to stderr.
"""

import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def main(length: int, steps: int, rank: int, threads: int, seed: int) -> None:
    torch.set_num_threads(threads)
    import train

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, early in (("early_stop", True), ("budget", False)):
            cfg = train.Config(task="phonebook", length=length, rank=rank, preset="paper", steps=steps,
                               seed=seed, stop_when_memorized=early, out=tmp, name=name)
            with contextlib.redirect_stdout(sys.stderr):  # keep stdout to the JSON lines
                r = train.main(cfg)
            rows[name] = r
            print(json.dumps(dict(bench=f"steps_to_em/{name}", length=r["length"], n_samples=r["n_samples"],
                                  rank=rank, budget=steps, steps=r["steps"], stopped_at=r["stopped_at"],
                                  time_s=r["time_s"], wall_s=r["wall_s"], exact_match=r["exact_match"],
                                  token_acc=round(r["token_acc"], 4), stubborn=r["stubborn"],
                                  delta_loss=round(r["delta_loss"], 4), threads=threads)), flush=True)
    e, b = rows["early_stop"], rows["budget"]
    # train-mode EM (dropout on) per step of the budget run: when it first looked done
    first_em = next((h["step"] for h in b["history"] if h["em"] == 1.0), None)
    print(json.dumps(dict(bench="steps_to_em/compare", early_steps=e["steps"], budget_steps=b["steps"],
                          budget_first_train_em_step=first_em,
                          early_s=e["time_s"], budget_s=b["time_s"], ratio=round(b["time_s"] / e["time_s"], 3),
                          early_em=e["exact_match"], budget_em=b["exact_match"])), flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Steps to exact recall, early stop vs a fixed budget.")
    ap.add_argument("--length", type=int, default=50, help="PhoneBook answer digits ℓ (default %(default)s)")
    ap.add_argument("--steps", type=int, default=200, help="step budget (default %(default)s)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.length <= 0 or a.steps <= 0 or a.rank <= 0:
        sys.exit("error: --length, --steps and --rank must be positive")
    main(a.length, a.steps, a.rank, a.threads, a.seed)
