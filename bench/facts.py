"""Time from a facts file to certified exact recall: train.py --until-recalled next to a transformers + PEFT loop.

    python bench/facts.py                      # 20 and 100 facts, built-in SmolLM2-135M, fp32, 2 threads
    python bench/facts.py --sizes 10 --steps 60 --check-every 5
    OMP_WAIT_POLICY=PASSIVE python bench/facts.py   # on a CPU shared with other jobs (see bench/train_step.py)

For each size the bench writes a facts file of n made-up employee IDs ("Employee ID of Ada Smith" ->
"KQ-4821-TX", fixed seed) into a temporary folder, then times two fresh processes from launch to exit:
  ours   python train.py --data FILE --until-recalled --rank auto --lr LR --steps S --eval-every K
         as a user types it: the rank is planned (planner.plan_recall) or, when the planner cannot plan,
         starts at 4 and doubles while an attempt's budget of S steps runs out; training stops once every
         answer token has p > 0.5 (checked with one teacher-forced pass every K steps, or at once when the
         last training pass saw every fact right), the decoder confirms, and the certificate (per-fact p and
         margins, prose perplexity and general answers with the adapter on and off) is measured on the
         adapter as saved and written.
  peer   what a transformers + PEFT user writes: AutoModelForCausalLM (fp32) + LoraConfig at the rank ours
         settled on, the same targets and layers (q_proj, v_proj on the layers ours adapted: the facts preset's
         20..29 since it became the default; every layer before), alpha = rank, no dropout, the same
         chat-formatted prompts and answer-only loss, AdamW (weight decay 0, grad-norm clip 1.0, linear decay
         over the same S steps, as ours), batches of the same size in the same order; every K steps
         model.generate (greedy, all facts in one left-padded batch) checks recall, and it stops as soon as
         every reply is the target verbatim. It runs at each lr of --peer-lrs (three by default), and its best
         (the fastest to recall every fact) is the one compared.
Locality, not timed: ours from its certificate; the peer's adapter (save_pretrained) is put onto our model
and measured the same way (locality.measure: the held-out prompts and prose, adapter on vs off), after our
decoder has recalled the facts the peer's generate recalled.
One JSON line per side and size, one comparing them (ratio = peer_s / ours_s: above 1, ours certifies sooner;
ratio_to_recall uses ours' time to the line saying every fact is recalled, the certificate's measures after it
left out, as the peer has none),
and the fp32 matmul peak measured before and after in the same run, to read the absolute times against.
A table goes to stderr at the end, with the training progress of both sides as it happens.

Both sides are timed by wall clock from process launch (interpreter, imports and model load included) to
exit. Ours' time is split at the lines train.py prints: start (imports, tokenizer, model, L_init), the
training loops with their p > 0.5 checks, the final evaluation and save of each attempt, and the certificate.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's modules first: this file shares its name with the project's facts.py, which train.py
# imports, and Python puts this script's folder at the front of the path. bench/ (common.py) goes last.
BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH] + [str(BENCH)]

import torch
from common import emit, matmul_peak_gflops

SYSTEM = "You are a helpful assistant."  # train.py's system prompt for facts lines without their own


# ----------------------------------------------------------------------------- the facts


def write_facts(path: Path, n: int, seed: int = 0) -> None:
    """n made-up facts "Employee ID of <First Last>" -> "AB-1234-CD", one JSON object per line, fixed by `seed`."""
    from data import FIRST, LAST

    rng = random.Random(seed)
    names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], n)  # distinct people
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"

    def code() -> str:
        pick = lambda k: "".join(rng.choice(letters) for _ in range(k))  # noqa: E731
        return f"{pick(2)}-{rng.randrange(1000, 10000)}-{pick(2)}"

    path.write_text("".join(json.dumps(dict(query=f"Employee ID of {name}", target=code())) + "\n" for name in names))


def peer_examples(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per fact as a transformers user builds them: the chat template with the
    generation prompt, then the target's tokens and end-of-turn."""
    out = []
    for r in rows:
        msgs = [{"role": "system", "content": r.get("system", SYSTEM)}, {"role": "user", "content": r["query"]}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompt = tok(text, add_special_tokens=False).input_ids
        answer = tok(str(r["target"]), add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((prompt, answer))
    return out


def same_tokens(path: Path, model_dir: Path) -> bool:
    """Whether the peer's prompts and answers are token for token the ones train.py trains on."""
    from transformers import AutoTokenizer

    from data import facts, load_tokenizer

    ours = [(e.prompt, e.answer) for e in facts(load_tokenizer("default"), path).train]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return ours == peer_examples(AutoTokenizer.from_pretrained(model_dir), rows)


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Each step's fact indices, as train.py orders them for sft (train.schedule: reshuffled every epoch)."""
    from train import Config, schedule

    return [step[0] for step in schedule(n, Config(seed=seed, batch_size=batch, steps=steps), "sft", 0)]


# ----------------------------------------------------------------------------- ours


def run_ours(path: Path, out: Path, lr: float, steps: int, batch: int, every: int, seed: int, env: dict) -> dict:
    """train.py --until-recalled --rank auto on `path`, timed from launch to exit, split at the lines it prints."""
    cmd = [sys.executable, "train.py", "--data", str(path), "--until-recalled", "--rank", "auto", "--lr", str(lr),
           "--steps", str(steps), "--eval-every", str(every), "--batch-size", str(batch), "--seed", str(seed),
           "--out", str(out)]
    print("ours: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    marks: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        now = time.perf_counter() - t0
        print("  " + line.rstrip(), file=sys.stderr, flush=True)
        for key, start in (("start", f"{path.stem}-"), ("done", "done:"), ("attempt", "attempt "),
                           ("certificate", "certificate: ")):
            if line.startswith(start) and (key != "start" or ": facts," in line):
                marks.setdefault(key, []).append(now)
    rc = p.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"error: train.py exited {rc} on {path.name}")
    certs = sorted(out.glob("*/certificate.json"))
    cert = json.loads(certs[-1].read_text())
    attempts = cert["overall"]["attempts"]
    results = [json.loads((out / f"{a['name']}.json").read_text()) for a in attempts]
    loop = sum(r["time_s"] for r in results)  # the training loops, p > 0.5 checks included
    evals = sum(d - s for s, d in zip(marks["start"], marks["done"])) - loop  # each attempt's final evaluation, save
    return dict(wall_s=wall, rank=cert["overall"]["rank"], steps=cert["overall"]["steps"], layers=results[-1]["layers"],
                total_steps=sum(a["steps"] for a in attempts), attempts=[[a["rank"], a["steps"]] for a in attempts],
                facts_stored=cert["overall"]["facts_stored"], facts=cert["overall"]["facts"],
                min_prob=cert["overall"]["min_prob"], min_margin=cert["overall"]["min_margin"],
                start_s=marks["start"][0], train_loop_s=loop, final_eval_s=evals, recall_s=marks["attempt"][-1],
                certificate_s=marks["certificate"][-1] - marks["attempt"][-1],
                per_step_s=loop / max(1, sum(a["steps"] for a in attempts)))


# ----------------------------------------------------------------------------- the transformers + PEFT user


def peer_until_recalled(path: Path, model_dir: Path, rank: int, lr: float, steps: int, batch: int, every: int,
                        seed: int, layers: list[int] | None = None, save: Path | None = None) -> dict:
    """A plain transformers + PEFT loop: train, and every `every` steps generate every fact greedily, until all
    come back verbatim (or the `steps` budget ends). The adapter goes to `save` (PEFT's save_pretrained) after
    the clock stops, for the locality measure."""
    t0 = time.perf_counter()
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, layers_to_transform=layers,
                                                       target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=steps)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ex = peer_examples(tok, rows)
    targets = [str(r["target"]) for r in rows]
    # generation: every prompt in one batch, padded on the left; room for the longest answer and its end-of-turn
    tok.padding_side = "left"
    texts = [tok.decode(p) for p, _ in ex]
    gen_in = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert all(gen_in.input_ids[i, -len(p):].tolist() == p for i, (p, _) in enumerate(ex)), "prompts changed"
    max_new = max(len(a) for _, a in ex)

    def recalled() -> int:
        model.eval()
        with torch.no_grad():
            out = model.generate(**gen_in, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        model.train()
        replies = tok.batch_decode(out[:, gen_in.input_ids.shape[1]:], skip_special_tokens=True)
        return sum(r == t for r, t in zip(replies, targets))

    def collate(idx: list[int]):
        seqs = [ex[i][0] + ex[i][1] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(idx), T), tok.pad_token_id)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        labels = torch.full((len(idx), T), -100)
        for b, (i, s) in enumerate(zip(idx, seqs)):
            ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), 1
            labels[b, len(ex[i][0]) : len(s)] = torch.tensor(ex[i][1])  # the answer only; the model shifts them
        return ids, mask, labels

    t_ready = time.perf_counter()
    check_s, got, step = 0.0, 0, 0
    model.train()
    for step, idx in enumerate(batch_order(len(ex), batch, steps, seed), start=1):
        ids, mask, labels = collate(idx)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            t1 = time.perf_counter()
            got = recalled()
            check_s += time.perf_counter() - t1
            print(f"  peer step {step}/{steps}: {got}/{len(ex)} facts recalled", file=sys.stderr, flush=True)
            if got == len(ex):
                break
    end = time.perf_counter()
    if save is not None:
        model.save_pretrained(save)
    return dict(steps=step, facts_recalled=got, facts=len(ex), start_s=t_ready - t0, train_s=end - t_ready - check_s,
                check_s=check_s, checks=step // every + (step % every > 0), per_step_s=(end - t_ready - check_s) / step)


def run_peer(path: Path, model_dir: Path, rank: int, lr: float, steps: int, batch: int, every: int, seed: int,
             env: dict, layers: list[int] | None = None, save: Path | None = None) -> dict:
    """peer_until_recalled in a fresh process, timed from launch to exit like ours."""
    cmd = [sys.executable, __file__, "--peer", str(path), "--model-dir", str(model_dir), "--rank", str(rank),
           "--lr", str(lr), "--steps", str(steps), "--batch-size", str(batch), "--check-every", str(every),
           "--seed", str(seed)] + (["--layers", ",".join(map(str, layers))] if layers else []) \
        + (["--save", str(save)] if save else [])
    print(f"peer: transformers + PEFT, rank {rank}, lr {lr:g}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: the transformers + PEFT loop exited {r.returncode} on {path.name}")
    return dict(wall_s=wall, rank=rank, lr=lr, **json.loads(r.stdout.strip().splitlines()[-1]))


def best_peer(runs: list[dict]) -> dict:
    """The peer's best lr: the fastest run that recalled every fact, else the one that recalled most."""
    return min(runs, key=lambda r: (r["facts"] - r["facts_recalled"], r["wall_s"]))


# ----------------------------------------------------------------------------- locality, not timed


def peer_locality(path: Path, saved: Path, rank: int, layers: list[int]) -> dict:
    """The certificate's locality measure (locality.measure: held-out prompts and prose, adapter on vs off) of
    the peer's adapter, put onto our model: PEFT's key <module>.lora_A.weight is our <module>.lora_A, alpha =
    rank is our scale 1. Refused unless our decoder recalls the facts the peer recalled, so a key that failed
    to load cannot pass for a harmless adapter."""
    from safetensors.torch import load_file

    from convert import builtin_model_dir
    from data import facts, load_tokenizer
    from eval import first_failures
    from locality import measure
    from lora import add_lora, lora_state_dict
    from model import load_model

    folder = builtin_model_dir()
    model = load_model(folder)
    add_lora(model, rank, ("q_proj", "v_proj"), layers)
    peft = load_file(str(saved / "adapter_model.safetensors"))
    ours = {k[len("base_model.model."):-len(".weight")]: v for k, v in peft.items()}
    if set(ours) != set(lora_state_dict(model)):
        raise SystemExit(f"error: the peer's adapter keys do not map onto ours: {sorted(set(ours) ^ set(lora_state_dict(model)))[:3]}")
    model.load_state_dict(ours, strict=False)  # every adapter key is there (checked above); the base's are not
    model.eval()
    tok = load_tokenizer("default")
    ex = facts(tok, path).train
    recalled = sum(f == len(e.answer) for f, e in zip(first_failures(model, ex), ex))
    return dict(recalled_by_ours=recalled, **summary(measure(model, tok, folder)))


def summary(loc: dict) -> dict:
    """The locality figures the table shows."""
    return dict(token_agreement=loc["token_agreement"], replies_kept=loc["replies_kept"], prompts=loc["prompts"],
                prose_drift=loc["prose"]["drift"])


# ----------------------------------------------------------------------------- the comparison


def rounded(row: dict) -> dict:
    """Floats to 2 decimals, small ones (an lr) to 3 significant digits."""
    return {k: (round(v, 2) if abs(v) >= 0.1 else float(f"{v:.3g}")) if isinstance(v, float) else v
            for k, v in row.items()}


def main(sizes: list[int], lr: float, steps: int, batch: int, every: int, seed: int, threads: int,
         peer_lrs: list[float]) -> None:
    torch.set_num_threads(threads)
    from convert import builtin_model_dir

    model_dir = builtin_model_dir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    peak0 = matmul_peak_gflops()
    emit(bench="facts/matmul_peak", when="before", n=2048, gflops=round(peak0, 1), threads=threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"facts{n}.jsonl"
            write_facts(path, n, seed)
            if not same_tokens(path, model_dir):
                raise SystemExit(f"error: the peer's prompts or answers differ from train.py's for {path.name}")
            ours = run_ours(path, Path(tmp) / f"runs{n}", lr, steps, batch, every, seed, env)
            emit(bench=f"facts/{n}/ours", **rounded(ours), lr=lr, budget=steps, check_every=every)
            tries = []
            for plr in peer_lrs:  # the peer at each lr; its best is the one compared
                save = Path(tmp) / f"peer{n}-{plr:g}"
                tries.append(run_peer(path, model_dir, ours["rank"], plr, steps, batch, every, seed, env,
                                      ours["layers"], save) | dict(saved=save))
                emit(bench=f"facts/{n}/peer-lr", **rounded({k: v for k, v in tries[-1].items() if k != "saved"}),
                     budget=steps, check_every=every)
            peer = best_peer(tries)
            cert = json.loads(sorted((Path(tmp) / f"runs{n}").glob("*/certificate.json"))[-1].read_text())
            ours["locality"] = summary(cert["locality"])
            peer["locality"] = peer_locality(path, peer.pop("saved"), ours["rank"], ours["layers"])
            for t in tries:
                t.pop("saved", None)
            if peer["locality"]["recalled_by_ours"] != peer["facts_recalled"]:
                raise SystemExit(f"error: our decoder recalls {peer['locality']['recalled_by_ours']} of the peer's "
                                 f"facts, generate {peer['facts_recalled']}: the adapter did not carry over")
            emit(bench=f"facts/{n}/peer", **rounded(peer), budget=steps, check_every=every, peer="transformers+peft",
                 lrs_tried=peer_lrs)
            ratio = peer["wall_s"] / ours["wall_s"]
            done = peer["facts_recalled"] == n
            emit(bench=f"facts/{n}/compare", facts=n, ours_s=round(ours["wall_s"], 1), peer_s=round(peer["wall_s"], 1),
                 ratio=round(ratio, 3), ours_recall_s=round(ours["recall_s"], 1),
                 ratio_to_recall=round(peer["wall_s"] / ours["recall_s"], 3), peer_recalled_all=done, ours_rank=ours["rank"], peer_rank=peer["rank"],
                 ours_steps=ours["steps"], ours_total_steps=ours["total_steps"], peer_steps=peer["steps"],
                 peer_lr=peer["lr"], ours_locality=ours["locality"], peer_locality=peer["locality"], goal=3.0)
            rows.append((n, ours, peer, ratio, done))
    peak1 = matmul_peak_gflops()
    emit(bench="facts/matmul_peak", when="after", n=2048, gflops=round(peak1, 1), threads=threads)

    print(f"\nfacts -> certified exact recall, built-in model, fp32, {threads} threads, lr {lr:g}, batch {batch}, "
          f"budget {steps} steps, checks every {every} steps; fp32 2048² matmul peak {peak0:.0f} GFLOP/s before, "
          f"{peak1:.0f} after", file=sys.stderr)
    print(f"{'facts':>5}  {'ours':>8}  {'peer':>8}  {'ratio':>6}  {'ours to recall':>14}  {'ratio':>6}  "
          f"{'ours steps (attempts)':<24}  {'peer steps':>10}  {'rank':>4}", file=sys.stderr)
    for n, o, p, ratio, done in rows:
        att = ", ".join(f"r{r}: {s}" for r, s in o["attempts"])
        peer_steps = f"{p['steps']}" + ("" if done else f" ({p['facts_recalled']}/{n})")
        print(f"{n:>5}  {o['wall_s']:>7.1f}s  {p['wall_s']:>7.1f}s  {ratio:>5.2f}×  {o['recall_s']:>13.1f}s  "
              f"{p['wall_s'] / o['recall_s']:>5.2f}×  {o['steps']:>3} ({att})".ljust(82)
              + f"  {peer_steps:>10}  {o['rank']:>4}", file=sys.stderr)
    for n, o, p, _, _ in rows:
        for side, x in (("ours", o), (f"peer (lr {p['lr']:g})", p)):
            loc = x["locality"]
            print(f"{n:>5} facts, {side} locality (held out): token agreement {loc['token_agreement']:.3f}, replies "
                  f"kept {loc['replies_kept']}/{loc['prompts']}, prose drift {loc['prose_drift']:+.1%}", file=sys.stderr)
    for n, o, p, _, _ in rows:
        print(f"{n:>5} facts, ours: start {o['start_s']:.1f}s, training {o['train_loop_s']:.1f}s "
              f"({o['per_step_s']:.2f}s/step, checks included), final evaluation {o['final_eval_s']:.1f}s, "
              f"certificate {o['certificate_s']:.1f}s | peer: start {p['start_s']:.1f}s, training {p['train_s']:.1f}s "
              f"({p['per_step_s']:.2f}s/step), {p['checks']} generate checks {p['check_s']:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Facts file -> certified exact recall, ours vs transformers+PEFT.")
    ap.add_argument("--sizes", default="20,100", help="comma list of fact counts (default %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-2, help="both sides (default %(default)s, the README's facts runs)")
    ap.add_argument("--steps", type=int, default=200, help="budget of each attempt of ours, and of the peer's linear "
                                                          "decay (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16, help="both sides (default %(default)s, train.py's)")
    ap.add_argument("--check-every", type=int, default=10, help="k: ours' --eval-every, and the peer's generate "
                                                                "period (default %(default)s)")
    ap.add_argument("--peer-lrs", default="5e-3,1e-2,2e-2", help="the peer runs at each; the fastest to recall "
                                                                   "every fact is compared (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="facts, adapter init and batch order")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)  # internal: run the peer's loop on this file
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--layers", default=None, help=argparse.SUPPRESS)  # the peer's: the layers ours adapted
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)  # the peer's: where its adapter goes
    a = ap.parse_args()
    if a.peer:
        print(json.dumps(peer_until_recalled(Path(a.peer), Path(a.model_dir), a.rank, a.lr, a.steps, a.batch_size,
                                             a.check_every, a.seed,
                                             [int(x) for x in a.layers.split(",")] if a.layers else None,
                                             Path(a.save) if a.save else None)))
        sys.exit(0)
    try:
        chosen = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"error: --sizes must be a comma list of whole numbers, got {a.sizes!r}")
    try:
        peer_lrs = [float(x) for x in a.peer_lrs.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"error: --peer-lrs must be a comma list of numbers, got {a.peer_lrs!r}")
    if not chosen or min(chosen) <= 0 or a.steps <= 0 or a.batch_size <= 0 or a.check_every <= 0 or a.lr <= 0 \
            or not peer_lrs or min(peer_lrs) <= 0:
        sys.exit("error: --sizes, --steps, --batch-size, --check-every, --lr and --peer-lrs must be positive")
    main(chosen, a.lr, a.steps, a.batch_size, a.check_every, a.seed, a.threads, peer_lrs)
