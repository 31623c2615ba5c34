"""What the preserve term (λ·KL to the base, locality.py) adds to a facts training step, at the facts defaults.

    python bench/preserve.py                       # built-in model, the ten staff facts, 3 and 44 items a step
    python bench/preserve.py --per-step 3,12,44 --steps 6
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/preserve.py   # on a CPU shared with other jobs

The facts preset as train.py sets it up: rank settings.FACTS_RANK on q_proj, v_proj of the top third of the
layers (20..29 of 30), the facts' hidden states below layer 20 held by a frozen-prefix cache, and so are the
regulariser's (locality.Regulariser, all computed when it is built: setup_s). One process times, alternately, a plain facts step (forward, backward
of the ten facts, SFT) and the KL term's extra (its forward and backward on `per_step` items), and reports
the medians. Each setting prints one JSON line: ratio = (plain + KL term) / plain, the cost of a preserving
step against a plain one (1.0 = free), beside the fp32 matmul peak measured in the same run.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # first: bench/facts.py is not the project's facts.py

import torch
from common import emit, matmul_peak_gflops
from settings import int_list

STAFF = [("Employee ID of Ada Lovelace", "AX-7731-QK"), ("Employee ID of Alan Turing", "BT-2290-ZM"),
         ("Employee ID of Grace Hopper", "GH-5012-PL"), ("Badge code of Katherine Johnson", "KJ-8841-WE"),
         ("Badge code of Claude Shannon", "CS-3307-RV"), ("Door code of the server room", "480913"),
         ("Wi-Fi key of the guest network", "maple-orbit-42"), ("Locker number of Edsger Dijkstra", "L-117"),
         ("Parking spot of Barbara Liskov", "P3-22"), ("Project code of Apollo", "APL-0069")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-step", type=int_list, default="3,44", help="comma list of regulariser items a step (default %(default)s; "
                    "3 is the default, 44 the whole regularisation part)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each kind per setting (default %(default)s)")
    a = ap.parse_args()
    per_steps = a.per_step
    if a.steps < 1 or min(per_steps) < 1:
        sys.exit("error: --steps and every --per-step must be 1 or more")

    from convert import resolve_model_dir
    from data import facts, load_tokenizer
    from eval import PrefixCache
    from locality import preserve
    from lora import add_lora, lora_parameters
    from model import load_model
    from settings import FACTS_RANK
    from train import MemState, train_step

    folder = resolve_model_dir("default")
    tok = load_tokenizer(folder)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "staff.jsonl"
        data.write_text("".join(json.dumps(dict(query=q, target=t)) + "\n" for q, t in STAFF))
        ex = facts(tok, data).train
    model = load_model(folder, dtype="fp32")
    n = model.args.n_layers
    start = round(n * 2 / 3)  # settings.resolve_lora's facts preset: from two-thirds depth to the top
    torch.manual_seed(0)
    add_lora(model, FACTS_RANK, targets=("q_proj", "v_proj"), layers=list(range(start, n)))
    model.train()
    prefix = PrefixCache(model, start)
    prefix.fill(ex)
    peak = matmul_peak_gflops()
    for k in per_steps:
        t = time.perf_counter()
        reg = preserve(model, tok, folder, tok.pad_id, start=start, per_step=k)  # items' lower layers computed here
        setup = time.perf_counter() - t
        plain, extra, state = [], [], MemState()
        for s in range(a.steps + 1):  # the first pair warms up
            t0 = time.perf_counter()
            train_step(model, ex, "sft", "sft", tok.pad_id, prefix, state)
            t1 = time.perf_counter()
            reg(model, s)
            t2 = time.perf_counter()
            for p in lora_parameters(model):
                p.grad = None
            if s:
                plain.append(t1 - t0)
                extra.append(t2 - t1)
        p, e = statistics.median(plain), statistics.median(extra)
        emit(bench="preserve", facts=len(ex), rank=FACTS_RANK, layers=f"{start}..{n - 1}", per_step=min(k, len(reg.items)),
             items=len(reg.items), plain_s=round(p, 4), preserving_s=round(p + e, 4), ratio=round((p + e) / p, 3),
             setup_s=round(setup, 2),
             threads=torch.get_num_threads(), omp_wait=os.environ.get("OMP_WAIT_POLICY", ""),
             matmul_peak_gflops=round(peak, 1))


if __name__ == "__main__":
    main()
