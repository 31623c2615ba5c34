"""Recall under sampling, for the memorised adapters of the convergence study (the paper's open
limitation). Greedy recall is certain once every answer token has p > 0.5; sampled recall is not.

    python docs/sampling.py                 # every memorised run in results/convergence/, K = 100 on seed 0
    python docs/sampling.py --k 400 --temperatures 0.5,0.7,1.0 --sample-seeds 0,1
    python docs/sampling.py --retrain --lengths 25,50   # adapters trained elsewhere: train them again first

For each memorised adapter and temperature T it draws K sampled decodes of the answer (full softmax,
no top-p) and counts those that reproduce it exactly, next to Π_t softmax(z_t / T)[target_t], the
teacher-forced probability of the whole answer. The two must agree: sampling the answer token by token
has exactly that probability. That agreement is an identity, a check of the sampler, not evidence
about memory; the evidence is how small Π p becomes for answers that greedy decoding recalls
perfectly. Each run and temperature draws with a sampler seed of its own (sampler_seed), so the sampled
fractions are independent checks; rows drawn before that (all with seed 0) are drawn again and replaced.
Writes results/convergence/sampling.json (atomically), read by docs/report.py. Runs whose
adapter folder is absent (adapters are not committed) are skipped with a line saying so, or with
--retrain trained again from their recorded settings; the adapter is kept only when the new run ends
at the same step with the same final loss (to 1e-3 relative: another machine, or a later version of
the code, adds in another order, and after hundreds of steps runs agree to 1e-6..2e-4, not bit for bit), and its rows are marked retrained.
"""

import argparse
import json
import math
import os
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from convert import resolve_model_dir  # noqa: E402
from data import load_tokenizer, make_task  # noqa: E402
from eval import sampled_recall  # noqa: E402
from lora import load_adapter  # noqa: E402
from model import load_model  # noqa: E402

OUT = ROOT / "results" / "convergence" / "sampling.json"


@torch.no_grad()
def answer_log_prob(model, prompt: list[int], answer: list[int], temperature: float) -> float:
    """log Π_t softmax(z_t / T)[answer_t], teacher-forced: the probability that sampling at T
    reproduces the answer exactly."""
    ids = torch.tensor([prompt + answer[:-1]])  # (1, P + A - 1): the answer's last token is only predicted
    logits = model(ids)[0, len(prompt) - 1:].float()  # (A, V): the logits that predict each answer token
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return float(logp.gather(1, torch.tensor(answer)[:, None]).sum())


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    p = hits / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sampler_seed(name: str, temperature: float) -> int:
    """A sampler seed of its own per run and temperature, so that the sampled fractions are independent checks
    (one seed for all would draw the same random numbers for every run and temperature)."""
    return zlib.crc32(f"{name} T={temperature:g}".encode())


def measure(run: dict, adapter: Path, k: int, temperatures: list[float]) -> list[dict]:
    """One memorised run: per temperature, predicted and (k > 0) sampled exact recall of its answers."""
    tok = load_tokenizer(run["model"])
    model = load_model(resolve_model_dir(run["model"]))
    task = make_task(tok, run["task"], run["length"], run.get("noise"), run.get("data_seed", run["seed"]),
                     run.get("data"), run.get("text"), run.get("n_samples", 100))
    load_adapter(model, adapter)
    model.eval()
    rows = []
    for t in temperatures:
        for e in task.train:
            pred = math.exp(answer_log_prob(model, e.prompt, e.answer, t))
            rate, ci, seed = None, None, None
            if k:
                seed = sampler_seed(run["name"], t)
                [rate] = sampled_recall(model, [e], k, t, 1.0, seed=seed)
                ci = wilson(round(rate * k), k)
            rows.append(dict(name=run["name"], rank=run["rank"], length=run["length"], seed=run["seed"], example=e.id,
                             temperature=t, k=k, predicted=pred, sampled=rate, ci95=ci, sampler_seed=seed))
            print(f"{run['name']} T={t}: predicted {pred:.4f}" + ("" if rate is None else
                  f", sampled {rate:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] (K={k})"), flush=True)
    return rows


REL_TOL = 1e-3  # another machine, or the code's own later changes of summation order (chunked loss, fused
# kernels), make runs agree to 1e-6..2e-4 in the final loss after hundreds of steps at lr 1e-2, not bit for bit


def retrain(run: dict, folder: Path) -> bool:
    """Train a run again from the settings its results file records, into folder/.retrain/, and keep the
    adapter in folder/<name>/ when the new run ends where the recorded one did (the same stop step, the
    final loss within REL_TOL): the adapters are not committed, the results are. False, with a line, when
    it differs. The adapter folder gets a RETRAINED marker, and its sampling rows say so."""
    import shutil

    import train

    fields = train.Config.__dataclass_fields__
    scratch = folder / ".retrain"
    cfg = train.Config(**{k: v for k, v in run["settings"].items() if k in fields} | dict(out=str(scratch)))
    new = train.main(cfg)
    same = new["stopped_at"] == run["stopped_at"] and math.isclose(new["loss_final"], run["loss_final"], rel_tol=REL_TOL)
    if not same:
        print(f"{run['name']}: trained again, it ended at step {new['stopped_at']} with loss {new['loss_final']:.6g}, "
              f"not at {run['stopped_at']} with {run['loss_final']:.6g}: its adapter is not this run's, skipped",
              flush=True)
        return False
    shutil.move(str(scratch / run["name"]), str(folder / run["name"]))
    (folder / run["name"] / "RETRAINED").write_text(f"loss_final {new['loss_final']!r}, recorded {run['loss_final']!r}\n")
    return True


def main(k: int, temperatures: list[float], folder: Path, sample_seeds: set[int], again: bool = False,
         lengths: set[int] | None = None) -> None:
    done = json.loads(OUT.read_text()) if OUT.exists() else dict(rows=[])
    # Sampled rows drawn before each run and temperature had a sampler seed of its own all used seed 0: they are
    # drawn again, and the new rows replace them.
    have = {(r["name"], r["temperature"], r["k"]) for r in done["rows"] if not r["k"] or r.get("sampler_seed") is not None}
    for f in sorted(folder.glob("*.json")):
        run = json.loads(f.read_text())
        if not isinstance(run, dict) or run.get("exact_match") != 1.0 or run.get("task") != "longctx":
            continue
        if lengths and run["length"] not in lengths:
            continue
        kk = k if run["seed"] in sample_seeds else 0
        want = [t for t in temperatures if (run["name"], t, kk) not in have]
        if want and not (folder / run["name"] / "adapter.json").is_file() and not (again and retrain(run, folder)):
            print(f"{run['name']}: no adapter in {folder / run['name']} (adapters are not committed; they exist "
                  f"where the run was trained; --retrain trains it again), skipped", flush=True)
            continue
        if want:
            retrained = (folder / run["name"] / "RETRAINED").exists()
            new = [row | dict(retrained=retrained) for row in measure(run, folder / run["name"], kk, want)]
            drawn = {(r["name"], r["temperature"], r["k"]) for r in new}
            done["rows"] = [r for r in done["rows"] if (r["name"], r["temperature"], r["k"]) not in drawn] + new
            tmp = OUT.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, OUT)  # resumable: each finished run is kept


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=100, help="sampled decodes per answer and temperature (default 100)")
    ap.add_argument("--sample-seeds", default="0",
                    help="training seeds whose runs are also sampled (default 0); every memorised run gets Π p")
    ap.add_argument("--temperatures", default="0.5,0.7,1.0", help="comma list (default 0.5,0.7,1.0)")
    ap.add_argument("--results", default=str(ROOT / "results" / "convergence"))
    ap.add_argument("--retrain", action="store_true",
                    help="train a memorised run again when its adapter is absent, from the settings in its results "
                         "file, and keep the adapter if the run ends exactly where it did")
    ap.add_argument("--lengths", default="", help="comma list: only the runs of these answer lengths ℓ")
    a = ap.parse_args()
    torch.manual_seed(0)
    main(a.k, [float(x) for x in a.temperatures.split(",")], Path(a.results),
         {int(x) for x in a.sample_seeds.split(",") if x}, a.retrain, {int(x) for x in a.lengths.split(",") if x})
