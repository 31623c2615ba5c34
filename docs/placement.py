"""Where a facts adapter sits: recall, steps, time and locality over a few placements (docs/facts.md).

    python docs/placement.py                      # every placement on the ten staff facts; prints the table
    python docs/placement.py --only qv-all-r8     # one placement
    python docs/placement.py --only qv-upper-r4-kl10,qv-upper-r8-kl10 --seeds 0,1,2   # training seeds
    python docs/placement.py --data FILE          # another facts file
    python docs/placement.py --margins qv-upper-r4-kl10   # why few replies stay word for word (below)
    python docs/placement.py --shrink qv-upper-r4-kl10-settle  # the adapter's update scaled down (below)

Each placement is an ordinary `train.py --data FILE --until-recalled` run with the facts defaults (lr 2e-2,
60 steps, --eval-every 5, preserve on) and its own targets, layers and rank, in results/placement/.
Rerunning reuses finished runs. The table reads each run's results file and certificate: facts
recalled, steps to recall, seconds a step (training time / steps, so measured under whatever else
shared the CPU), and the certificate's locality (held-out prompts, adapter on vs off).

The stop rule. "greedy bar" is the number of steps after which every answer token of every fact was first
the argmax, teacher-forced (the training pass's exact match reached 1; with every fact in one batch that
pass sees them all). That is what greedy recall needs. "step recalled" is when every token also had
p > 0.5, the certificate's bar. train.py checks p > 0.5 at once whenever the training pass saw every fact
right, so the gap between the two columns is what the stronger bar costs in steps.

--margins NAME: the base model's top-1 over top-2 log-probability margin at every position of its own greedy
replies to the held-out prompts (teacher-forced), and for placement NAME's adapter the positions whose argmax
it flips, the base margin there, and its KL to the base per position. A reply is kept only if no position
on its greedy path flips, so small margins bound the replies kept. The same adapter on the regularisation
part's own prompts (those the KL term trains on) shows whether the term holds even them. For scale it also
compares the base model in bf16 with itself in fp32: numerical noise alone, nothing stored.

--shrink NAME: placement NAME's adapter with its update scaled by s (each module's scale·B·A becomes
s·scale·B·A) for each s of --scales: facts recalled exactly, their smallest answer-token p, and the
certificate's held-out locality. It answers how small the update must be to keep a given share of replies,
and whether the facts are still there at that size.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from settings import int_list  # noqa: E402
OUT = ROOT / "results" / "placement"
UPPER = ",".join(map(str, range(20, 30)))  # the top third of the built-in model's 30 layers
TOP5 = ",".join(map(str, range(25, 30)))  # its top sixth
LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PLACEMENTS = {  # name: (what it is, train.py flags)
    "qv-all-r8": ("q,v on all 30 layers, rank 8, λ = 1 (the earlier default)", ["--targets", "q_proj,v_proj", "--rank", "8", "--preserve", "1"]),
    "qv-all-r4": ("q,v on all 30 layers, rank 4, λ = 1", ["--targets", "q_proj,v_proj", "--rank", "4", "--preserve", "1"]),
    "qv-upper-r8": ("q,v on layers 20-29, rank 8, λ = 1", ["--targets", "q_proj,v_proj", "--layers", UPPER, "--rank", "8", "--preserve", "1"]),
    "all-upper-r4": ("all 7 linear modules on layers 20-29, rank 4, λ = 1", ["--targets", LINEAR, "--layers", UPPER,
                                                                    "--rank", "4", "--preserve", "1"]),
    "mlp-upper-r8": ("gate,up,down on layers 20-29, rank 8, λ = 1", ["--targets", "gate_proj,up_proj,down_proj", "--layers",
                                                             UPPER, "--rank", "8", "--preserve", "1"]),
    "qv-upper-r8-kl10": ("q,v on layers 20-29, rank 8, λ = 10 (the facts default before rank 4)", ["--targets", "q_proj,v_proj", "--layers", UPPER,
                                                                "--rank", "8", "--preserve", "10"]),
    "qv-upper-r8-kl30": ("q,v on layers 20-29, rank 8, λ = 30, 120 steps", ["--targets", "q_proj,v_proj", "--layers",
                                                                           UPPER, "--rank", "8", "--preserve", "30",
                                                                           "--steps", "120"]),
    "qv-upper-r4-kl10": ("q,v on layers 20-29, rank 4, λ = 10, stopped at recall (the facts default before "
                         "settling)", ["--targets", "q_proj,v_proj", "--layers", UPPER, "--rank", "4", "--preserve", "10"]),
    "qv-upper-r4-kl10-settle": ("q,v on layers 20-29, rank 4, λ = 10, settled as long again (the facts default)",
                                ["--targets", "q_proj,v_proj", "--layers", UPPER, "--rank", "4", "--preserve", "10",
                                 "--settle"]),
    "qv-top5-r4-kl10-settle": ("q,v on layers 25-29, rank 4, λ = 10, settled as long again within the 60 steps",
                               ["--targets", "q_proj,v_proj", "--layers", TOP5, "--rank", "4", "--preserve", "10",
                                "--settle"]),
    "all-upper-r4-kl10": ("all 7 linear modules on layers 20-29, rank 4, λ = 10", ["--targets", LINEAR, "--layers",
                                                                                 UPPER, "--rank", "4", "--preserve", "10"]),
    "qv-upper-r8-kl100": ("q,v on layers 20-29, rank 8, λ = 100", ["--targets", "q_proj,v_proj", "--layers", UPPER,
                                                                  "--rank", "8", "--preserve", "100"]),
}
STAFF = [  # the ten facts of docs/facts.md and tests/test_certificate.py
    dict(query="Employee ID of Ada Lovelace", target="AX-7731-QK"),
    dict(query="Employee ID of Alan Turing", target="BT-2290-ZM"),
    dict(query="Employee ID of Grace Hopper", target="GH-5012-PL"),
    dict(query="Badge code of Katherine Johnson", target="KJ-8841-WE"),
    dict(query="Badge code of Claude Shannon", target="CS-3307-RV"),
    dict(query="Door code of the server room", target=480913),
    dict(query="Wi-Fi key of the guest network", target="maple-orbit-42"),
    dict(query="Locker number of Edsger Dijkstra", target="L-117"),
    dict(query="Parking spot of Barbara Liskov", target="P3-22", system="You are the facilities assistant."),
    dict(query="Project code of Apollo", target="APL-0069", system="You are the facilities assistant."),
]
# The preset and λ are given for every placement, so that a placement keeps its meaning when the facts defaults
# change: each names its targets and layers whole (standard preset: q,v on all layers unless --layers).
DEFAULTS = ["--lr", "2e-2", "--steps", "60", "--until-recalled", "--eval-every", "5", "--preset", "standard",
            "--no-settle"]  # the placements that settle say so (--settle, after this: the last one counts)


def run_name(name: str, seed: int) -> str:
    """A placement's run: its name, with the training seed as a suffix past seed 0."""
    return name if seed == 0 else f"{name}-s{seed}"


def run(name: str, data: Path, out: Path, python: str, seed: int = 0) -> None:
    cmd = [python, str(ROOT / "train.py"), "--data", str(data), *DEFAULTS, *PLACEMENTS[name][1], "--seed", str(seed),
           "--out", str(out), "--name", run_name(name, seed)]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode not in (0, 1):  # 1: some fact not recalled, which the table reports
        sys.exit(f"error: placement {name} stopped with exit code {done.returncode}")


def row(name: str, out: Path, seed: int = 0) -> list[str] | None:
    res, cert = out / f"{run_name(name, seed)}.json", out / run_name(name, seed) / "certificate.json"
    if not res.is_file() or not cert.is_file():
        return None
    r, c = json.loads(res.read_text()), json.loads(cert.read_text())
    o, loc = c["overall"], c.get("locality", {})
    steps = r["steps"]
    whole = r["batch_size"] >= r["n_samples"]  # the training pass sees every fact at each step
    greedy = next((h["step"] - 1 for h in r["history"] if h["em"] == 1.0), None) if whole else None
    return [PLACEMENTS[name][0] + (f", seed {seed}" if seed else ""), f"{r['params']:,}", f"{o['facts_stored']}/{o['facts']}",
            str(greedy) if greedy is not None else "not before" if whole else "–",
            f"{r.get('recalled_at') or r['stopped_at'] or '–'} of {r['budget']}", f"{r['time_s'] / max(steps, 1):.2f}",
            f"{o['min_prob']:.3f}", f"{loc.get('token_agreement', float('nan')):.3f}",
            f"{loc.get('replies_kept', '–')}/{loc.get('prompts', '–')}",
            f"{100 * loc['prose']['drift']:+.1f}%" if loc else "–"]


def held(model, prompts: list[list[int]], said: list[list[int]], eos_id: int) -> tuple[int, tuple]:
    """Adapter on vs off on `prompts`, whose base greedy replies are `said`: the replies kept, and teacher-forced
    on the base's replies, per position the base's top-1 over top-2 margin, whether the adapter flips the
    argmax, and its KL to the base."""
    import torch

    import locality as loc
    from lora import adapter_disabled

    kept = sum(a == b for a, b in zip(loc.replies(model, prompts, [loc.REPLY_TOKENS] * len(prompts), eos_id), said))
    rows = []
    with torch.no_grad():
        for p, r in zip(prompts, said):
            ids, at = torch.tensor([p + r]), slice(len(p) - 1, len(p) + len(r) - 1)
            on = model(ids)[0, at].log_softmax(-1)
            with adapter_disabled(model):
                off = model(ids)[0, at].log_softmax(-1)
            top2 = off.topk(2, -1).values
            rows.append((top2[:, 0] - top2[:, 1], on.argmax(-1) != off.argmax(-1), (off.exp() * (off - on)).sum(-1)))
    return kept, tuple(torch.cat([r[i] for r in rows]) for i in range(3))


def margins(name: str, out: Path) -> None:
    import torch

    import locality as loc
    from convert import builtin_model_dir
    from data import load_tokenizer
    from lora import load_adapter
    from model import load_model

    folder = builtin_model_dir()
    model, tok, s = load_model(folder, dtype=torch.float32), load_tokenizer(folder), loc.load_set()
    base, asked = loc.base_side(model, tok, folder, s), loc.measure_prompts(tok, s)
    load_adapter(model, out / name)
    kept, (m, flip, kl) = held(model, asked, base["replies"], tok.eos_id)
    n, positions, per = len(asked), len(m), m.split([len(r) for r in base["replies"]])
    print(f"base model, {positions} positions of its greedy replies to {n} held-out prompts:")
    for t in (0.1, 0.25, 0.5, 1.0):
        print(f"  margin under {t:<4} nats: {float((m < t).float().mean()):.1%} of positions, "
              f"{sum(int(x.min() < t) for x in per)} of {n} replies have one")
    print(f"adapter {name}: keeps {kept} of {n} replies, flips {int(flip.sum())} of {positions} positions (base margin "
          f"there: median {float(m[flip].median()):.3f} nats); KL to the base a position: mean {float(kl.mean()):.4f}, "
          f"median {float(kl.median()):.4f}")
    # Does the KL term hold even the prompts it trains on? The regularisation part's prompts as training read them
    # (from the regulariser's cache; its prompt items come before its prose pieces).
    reg = loc.preserve(model, tok, folder, tok.pad_id).items[: len(s.regulariser.prompts)]
    kept, (_, flip, kl) = held(model, [e.prompt for e in reg], [e.answer for e in reg], tok.eos_id)
    print(f"  on the regularisation part's own {len(reg)} prompts (trained on): keeps {kept} of {len(reg)} replies, flips "
          f"{int(flip.sum())} of {len(kl)} positions; KL mean {float(kl.mean()):.4f}, median {float(kl.median()):.4f}")
    # for scale, a change that stores nothing: the same base model in bf16 (weights and arithmetic) against fp32
    half = load_model(folder, dtype=torch.bfloat16)
    said = loc.replies(half, asked, [loc.REPLY_TOKENS] * n, tok.eos_id)
    forced = loc.forced_argmax(half, asked, base["replies"])
    flips = sum(sum(x != y for x, y in zip(f, r)) for f, r in zip(forced, base["replies"]))
    print(f"the base model in bf16 against fp32, no adapter: keeps {sum(a == b for a, b in zip(said, base['replies']))} "
          f"of {n} replies, flips {flips} of {positions} positions")


def float_list(text: str) -> list[float]:
    """argparse type of --scales: a comma list of factors from 0 to 1."""
    try:
        xs = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers") from None
    if not all(0 <= x <= 1 for x in xs):
        raise argparse.ArgumentTypeError(f"{text!r}: each factor must be between 0 and 1")
    return xs


def shrink(name: str, out: Path, data: Path, scales: list[float]) -> None:
    import torch

    import locality as loc
    from convert import builtin_model_dir
    from data import facts, load_tokenizer, read_facts
    from facts import fact_reports
    from lora import load_adapter, lora_modules
    from model import load_model

    folder = builtin_model_dir()
    model, tok = load_model(folder, dtype=torch.float32), load_tokenizer(folder)
    load_adapter(model, out / name)
    model.eval()
    mods = lora_modules(model)
    full = {k: m.scale for k, m in mods.items()}
    rows, ex = read_facts(data), facts(tok, data).train
    print(f"| update × s | facts recalled | min p | token agreement | replies kept | prose drift |\n|{'---|' * 6}")
    for s in scales:
        for k, m in mods.items():
            m.scale = full[k] * s
        with torch.no_grad():
            per, lo = fact_reports(model, tok, ex, rows), loc.measure(model, tok, folder)
        print(f"| {s:g} | {sum(f['exact'] for f in per)}/{len(per)} | {min(f['min_prob'] for f in per):.3f} | "
              f"{lo['token_agreement']:.3f} | {lo['replies_kept']}/{lo['prompts']} | {100 * lo['prose']['drift']:+.1f}% |",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help=f"comma list of placements (default all: {', '.join(PLACEMENTS)})")
    ap.add_argument("--data", default=None, help="facts file (default: the ten staff facts, written to results/placement/); "
                    "another file's runs go to results/placement-<its name>/")
    ap.add_argument("--python", default=sys.executable, help="interpreter for train.py (default this one)")
    ap.add_argument("--seeds", type=int_list, default="0", help="comma list of training seeds (adapter init, batch order); a seed "
                    "past 0 names its run NAME-sN (default 0)")
    ap.add_argument("--table", action="store_true", help="print the table of finished runs only; train nothing")
    ap.add_argument("--margins", default=None, metavar="NAME", help="the base model's margins on the held-out replies "
                    "and the flips of placement NAME's adapter, there and on the regulariser's prompts (see above); train nothing")
    ap.add_argument("--shrink", default=None, metavar="NAME", help="placement NAME's adapter with its update scaled by each "
                    "of --scales: facts recalled and locality (see above); train nothing")
    ap.add_argument("--scales", type=float_list, default="1,0.9,0.8,0.7,0.6,0.4,0.2,0.1",
                    help="factors for --shrink (default 1,0.9,0.8,0.7,0.6,0.4,0.2,0.1)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(PLACEMENTS)
    seeds = a.seeds
    unknown = [n for n in names if n not in PLACEMENTS]
    if unknown:
        sys.exit(f"error: unknown placement {unknown[0]!r}; choose from {', '.join(PLACEMENTS)}")
    out = OUT.parent / f"placement-{Path(a.data).stem}" if a.data else OUT
    data = Path(a.data) if a.data else OUT / "staff.jsonl"
    if a.data is not None and not data.is_file():
        sys.exit(f"error: no facts file {data}")
    out.mkdir(parents=True, exist_ok=True)
    if a.data is None:
        data.write_text("".join(json.dumps(f) + "\n" for f in STAFF))
    for name in (a.margins, a.shrink):
        if name and not (out / name / "adapter.safetensors").is_file():
            sys.exit(f"error: no adapter for placement {name!r} in {out}; train it first (--only {name})")
    if a.margins:
        return margins(a.margins, out)
    if a.shrink:
        return shrink(a.shrink, out, data, a.scales)
    if not a.table:
        for n in names:
            for seed in seeds:
                run(n, data, out, a.python, seed)
    rows = [r for n in names for seed in seeds if (r := row(n, out, seed))]
    head = ["placement", "params", "recalled", "greedy bar", "step recalled", "s/step", "min p", "token agreement", "replies kept",
            "prose drift"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
