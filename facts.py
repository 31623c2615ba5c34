"""Your own facts in an adapter: train until every fact is recalled (`--until-recalled`, `--rank auto`),
the certificate that says so (per fact: exact or not, smallest p and margin; what it cost the rest of
the model), and the merged model.

    python train.py --data myfacts.jsonl --until-recalled --merge-to merged/
    python eval.py --adapter runs/NAME --certify       # measure a saved certificate again

train.py's `cli` calls `until_recalled` with its own one-run function; eval.py calls `recheck`.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from convert import resolve_model_dir
from data import (DataError, Example, Tokenizer, facts, file_sha256, load_tokenizer,
                  numbered_facts, read_facts)
from eval import same_length_batches
from locality import DEFINITIONS as LOCALITY_DEFINITIONS
from locality import measure, replies
from lora import (PRESETS, adapted_width, adapter_settings, atomic_dir, load_adapter, lora_parameters,
                  merge, unwrapped_state_dict)
from model import ModelArgs, Transformer, load_model, read_config
from parallel import Processes
from runs import RunFiles, atomic_json, base_model_path
from settings import MAX_RANK, MERGED_MARK, PLAN_FROM, Config, RunError, check, resolve_lora, target_list


def write_merged(cfg: Config, adapter: Path, out: Path) -> None:
    """--merge-to: the base model with the saved adapter folded into its weights, as a Hugging Face folder.

    Merged on the CPU in fp32 (base + s·B·A, no rounding) and saved in fp32, whatever the training dtype.
    """
    import shutil

    from safetensors.torch import save_file

    src = resolve_model_dir(cfg.model)
    model = load_model(src, dtype="fp32", device="cpu")
    load_adapter(model, adapter)
    merge(model)
    sd = {k: v.contiguous() for k, v in unwrapped_state_dict(model).items()}
    if model.args.tie_embeddings:
        del sd["lm_head.weight"]  # the same tensor as the embeddings; config.json ties them again
    config = json.loads((src / "config.json").read_text())
    for k in ("torch_dtype", "dtype"):
        if k in config:
            config[k] = "float32"
    tokenizer = [f for f in src.iterdir() if f.name.startswith("tokenizer") or f.name in (
        "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "generation_config.json")]

    def write(d: Path) -> None:
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for f in tokenizer:
            shutil.copy(f, d / f.name)
        (d / MERGED_MARK).write_text(json.dumps(dict(base_model=base_model_path(cfg.model, src), adapter=str(adapter)),
                                                indent=1))

    try:
        atomic_dir(out, write)
    except OSError as e:
        raise RunError(f"could not write the merged model to {out} ({e.strerror or e})") from None
    print(f"merged: {out} (transformers.AutoModelForCausalLM.from_pretrained loads it)")


FIRST_RANK = 4  # where --rank auto starts when the planner cannot plan


def until_recalled(cfg: Config, run_one: Callable[[Config], dict]) -> dict:
    """--until-recalled: one run, or with --rank auto runs at doubling ranks, until every fact is recalled;
    then the certificate of the last run's adapter, measured on it as saved and written beside it.

    Every attempt is a run of its own, named and identified by its rank, so a killed --rank auto
    resumes where it stopped: finished attempts are reused, the current one resumes from its checkpoint.
    """
    check(cfg)
    cfg = cfg.settled()
    procs = Processes.start()
    say = print if procs.rank == 0 else (lambda *a, **k: None)
    plan, ranks = None, [cfg.rank]
    if cfg.rank == "auto":
        width = module_width(cfg.model, target_list(cfg.targets, PRESETS[cfg.preset]["targets"]))
        tokens = sum(len(e.answer) for e in facts(load_tokenizer(cfg.model), cfg.data).train)  # as results count them: with end-of-turn
        plan = planned_rank(cfg, tokens, width)
        ranks = rank_ladder(plan["rank"], min(cfg.max_rank or MAX_RANK, width))
        say(f"rank auto: {plan_line(plan, tokens)}; ranks to try {', '.join(map(str, ranks))} (cap: --max-rank "
            f"{cfg.max_rank or MAX_RANK}, width {width})")
    attempts = []
    for rank in ranks:
        c = attempt(cfg, rank)
        result = run_one(c)
        n, got = len(result["per_sample"]), recalled(result)
        attempts.append(dict(rank=rank, name=result["name"], steps=result["steps"], budget=result["budget"],
                             **({"recalled_at": result["recalled_at"]} if "recalled_at" in result else {}),
                             facts_recalled=got, facts=n))
        grow = "" if got == n or rank == ranks[-1] else f"; doubling the rank to {ranks[len(attempts)]}"
        settled = f" (memorized at step {result['recalled_at']}, then settled)" if result.get("recalled_at") is not None else ""
        say(f"attempt {len(attempts)}: rank {rank}, {result['steps']} of {result['budget']} steps{settled}, {got}/{n} "
            f"facts recalled{grow}")
        if got == n:
            break
    adapter = RunFiles(Path(c.out), c.run_name()).adapter
    cert = write_certificate(c, adapter, attempts, plan) if procs.rank == 0 else None
    procs.barrier()
    if got < n:
        more = "raise --steps or --max-rank" if cfg.rank == "auto" else "raise --steps, or try --rank auto"
        raise RunError(f"{got}/{n} facts recalled after {len(attempts)} attempt{'s' * (len(attempts) > 1)} (the last "
                       f"at rank {rank}, {result['steps']} of {result['budget']} steps); the certificate says which; "
                       f"{more}")
    if cfg.merge_to and procs.rank == 0:
        write_merged(c, adapter, Path(cfg.merge_to))
    return cert


def adding(cfg: Config) -> Config:
    """--add-to ADAPTER: this run's settings for adding --data's facts to a saved facts adapter.

    The adapter's own facts file (as adapter.json records it, unchanged since) and --data's are joined
    into <out>/added/<new>+<adapter>.jsonl, stored facts first; the run trains on the joined file from the
    adapter's weights, with its rank, targets, layers, alpha and dropout. So the certificate covers old and
    new facts, and the old ones are trained on, not only kept by luck. Checked before anything loads: the
    adapter (files, checksum, base model), both files, and no query stored with another target.
    """
    if not cfg.add_to:
        return cfg
    check(cfg)
    c = cfg.settled()
    if c.task != "facts":
        raise RunError("--add-to adds facts to a facts adapter: give --data FILE of {\"query\", \"target\"} lines")
    if cfg.rank == "auto":
        raise RunError("--add-to keeps the adapter's rank; drop --rank auto")
    adapter = Path(cfg.add_to)
    settings = adapter_settings(adapter)
    base = settings.get("base_model")
    if base is not None and base != cfg.model:
        raise RunError(f"{adapter} was trained on --model {base}, not {cfg.model}; give --model {base}")
    old_path, old_sha = trained_data(adapter)
    if not Path(old_path).is_file():
        raise DataError(f"the facts file {adapter} was trained on is missing: {old_path}; --add-to trains on the "
                        f"stored facts again, so it needs that file")
    if file_sha256(old_path) != old_sha:
        raise DataError(f"{old_path} changed since {adapter} was trained on it; --add-to needs the facts as stored")
    old, new = numbered_facts(old_path), numbered_facts(cfg.data)
    stored = {q: (n, t, s) for n, q, t, s in old}
    rows = [(q, t, s) for _, q, t, s in old]
    for n, q, t, s in new:
        if q not in stored:
            rows.append((q, t, s))
        elif stored[q][1:] != (t, s):
            was = stored[q][1] if stored[q][1] != t else f"{t!r} under another system prompt"
            raise DataError(f"{cfg.data}:{n}: query {q!r} is stored in {adapter} as {was!r} ({old_path}:{stored[q][0]}); "
                            f"--add-to adds facts and never overwrites one: retrain from scratch to change it")
    if len(rows) == len(old):
        raise DataError(f"every fact in {cfg.data} is already stored in {adapter}; nothing to add")
    joined = Path(cfg.out) / "added" / f"{Path(cfg.data).stem}+{adapter.resolve().name}.jsonl"
    text = "".join(json.dumps(dict(query=q, target=t) | ({"system": s} if s is not None else {})) + "\n"
                   for q, t, s in rows)
    if not joined.is_file() or joined.read_text() != text:  # the same content keeps the run's identity
        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_name(joined.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(joined)
    preset = "standard" if settings["init"] == "standard" else "paper"
    return replace(cfg, data=str(joined), rank=settings["rank"], preset=preset,
                   targets=",".join(settings["targets"]), layers=",".join(map(str, settings["layers"])),
                   alpha=settings["alpha"], dropout=settings["dropout"])


def write_certificate(c: Config, adapter: Path, attempts: list[dict], plan: dict | None) -> dict:
    """The certificate of the last attempt's adapter, measured on it as saved (as eval.py --certify does),
    with how training went; written atomically beside the adapter and printed as a table."""
    cert = certify(c.model, adapter, c.data, dtype=c.dtype, device=c.device)
    cert["overall"] |= dict(steps=attempts[-1]["steps"], attempts=attempts)
    if plan is not None:
        cert["plan"] = plan
    atomic_json(adapter / CERTIFICATE, cert)
    print_certificate(cert)
    print(f"certificate: {adapter / CERTIFICATE} (python eval.py --adapter {adapter} --certify checks it again)")
    return cert


def attempt(cfg: Config, rank: int) -> Config:
    """The run of one attempt at `rank`: under --name, --rank auto's attempts get the rank as a suffix."""
    name = f"{cfg.name}-r{rank}" if cfg.name and cfg.rank == "auto" else cfg.name
    return replace(cfg, rank=rank, name=name, max_rank=None, plan_from=None, merge_to=None)


def recalled(result: dict) -> int:
    """How many facts a run recalls: every answer token above p = 0.5, and the decoder's reply exact."""
    return sum(p["exact_match"] and not p["stubborn_positions"] for p in result["per_sample"])


def rank_ladder(start: int, cap: int) -> list[int]:
    """--rank auto's ranks: start, then doubled, up to `cap` (the last one is `cap` itself)."""
    ranks = [max(1, min(start, cap))]
    while ranks[-1] < cap:
        ranks.append(min(2 * ranks[-1], cap))
    return ranks


def module_width(model: str, targets: tuple) -> int:
    """The smallest input or output width among the adapted modules, from config.json (the weights stay unread):
    a rank above it cannot add anything."""
    return adapted_width(ModelArgs.from_config(read_config(resolve_model_dir(model))), targets)


def planned_rank(cfg: Config, tokens: int, width: int) -> dict:
    """Where --rank auto starts: planner.plan_recall's rank for `tokens` answer tokens over the --plan-from
    results, or FIRST_RANK with the reason when it cannot plan."""
    import glob

    import planner

    paths = sorted(glob.glob(cfg.plan_from or PLAN_FROM, recursive=True))
    n_layers = ModelArgs.from_config(read_config(resolve_model_dir(cfg.model))).n_layers
    lcfg = resolve_lora(cfg.settled(), n_layers)
    layers = sorted(set(lcfg["layers"])) if lcfg["layers"] is not None else list(range(n_layers))
    try:  # runs of the same model, modules and layers: another adapter's capacity says nothing about this one
        p = planner.plan_recall(paths, tokens, width, model=cfg.model, targets=lcfg["targets"], layers=layers)
    except planner.PlanError as e:
        return dict(rank=FIRST_RANK, planned=None, reason=str(e))
    return dict(rank=p["rank"], planned=p["rank"], fit=p["fit"], group=p["group"], runs=p["runs"])


def plan_line(plan: dict, tokens: int) -> str:
    """What the planner said, in a few words."""
    if plan["planned"] is None:
        return f"the planner cannot plan ({plan['reason']}); starting from rank {plan['rank']}"
    return f"the planner gives rank {plan['rank']} for {tokens} answer tokens ({plan['fit']}, {len(plan['runs'])} runs)"


CERTIFICATE = "certificate.json"  # written beside the adapter by train.py --until-recalled


BITS = "tokens·log2(V)/params"  # the information the stored answers would carry as uniform tokens, per parameter


GENERAL_PROMPTS = ("What is the capital of France?", "How many days are in a week?", "What is 7 times 8?",
                   "Name a primary color.", "What is the opposite of hot?")


DEFINITIONS = {
    "exact": "the greedy reply (KV-cached decoder, from the training prompt) is the target's tokens, then end-of-turn",
    "min_prob": "the smallest teacher-forced probability of a target token (end-of-turn included), adapter on, "
                "dropout off; above 0.5 at every token is sufficient for greedy recall",
    "margin": "p_target - p_runner_up at the answer position where that difference is smallest; p_runner_up is "
              "the most probable other token there (margin > 0 at every position <=> greedy recall); positions "
              "count answer tokens from 0",
    "answer_tokens": "target tokens (ℓ), end-of-turn not counted",
    BITS: "answer tokens of the facts recalled exactly × log2(vocabulary size) / trainable adapter parameters",
    "prose_drift": "perplexity with the adapter / perplexity without it - 1, on the first tokens of assets/prose.txt",
    "prompts": "greedy replies (16 new tokens at most) to general questions in the model's own default chat "
               "format (no system turn of ours), adapter on and off",
    **{f"locality.{k}": v for k, v in LOCALITY_DEFINITIONS.items()},
}


def p_and_margin(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., A, V) logits at the positions that predict the answer, (..., A) answer tokens -> the p of each
    answer token and its margin over the most probable other token, both (..., A)."""
    p = torch.softmax(logits.float(), dim=-1)
    p_target = p.gather(-1, y[..., None])[..., 0]
    runner_up = p.scatter(-1, y[..., None], -1.0).max(dim=-1).values  # the best of the other tokens
    return p_target, p_target - runner_up


@torch.no_grad()
def token_margins(model: Transformer, e: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced p of each answer token (A,) and its margin over the most probable other token (A,)."""
    dev = model.lm_head.weight.device
    ids = torch.tensor([e.prompt + e.answer[:-1]], device=dev)
    logits = model(ids)[0, len(e.prompt) - 1 :]  # (A, V): the positions that predict the answer
    p_target, margin = p_and_margin(logits, torch.tensor(e.answer, device=dev))
    return p_target.cpu(), margin.cpu()


@torch.no_grad()
def margins(model: Transformer, examples: list[Example],
            batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """token_margins of every example; those of equal prompt and answer length in one forward pass."""
    dev = model.lm_head.weight.device
    out: list = [None] * len(examples)
    for chunk in same_length_batches([(len(e.prompt), len(e.answer)) for e in examples], batch_size):
        P = len(examples[chunk[0]].prompt)
        ids = torch.tensor([examples[i].prompt + examples[i].answer[:-1] for i in chunk], device=dev)
        y = torch.tensor([examples[i].answer for i in chunk], device=dev)  # (B, A)
        p_target, margin = p_and_margin(model(ids)[:, P - 1 :], y)  # (B, A) each, from the positions predicting y
        for i, pt, m in zip(chunk, p_target.cpu(), margin.cpu()):
            out[i] = (pt, m)
    return out


def fact_reports(model: Transformer, tok: Tokenizer, examples: list[Example], rows: list[tuple]) -> list[dict]:
    """Each fact's line of the certificate: the greedy reply, exact or not, the smallest p and the smallest
    margin. Measured in batches; the plain path is generate() and token_margins() one fact at a time, and
    tests/test_certificate.py holds the two together."""
    more = 8 if tok.eos_id is not None else 0  # a few more tokens show what follows a wrong reply
    outs = replies(model, [e.prompt for e in examples], [len(e.answer) + more for e in examples], tok.eos_id)
    out = []
    for e, (query, target, _), reply, (p, margin) in zip(examples, rows, outs, margins(model, examples)):
        i, j = int(p.argmin()), int(margin.argmin())
        out.append(dict(query=query, target=target, exact=reply == e.answer,
                        reply=tok.decode(reply, skip_special_tokens=True), answer_tokens=e.length,
                        min_prob=round(float(p[i]), 6), min_prob_position=i, margin=round(float(margin[j]), 6),
                        margin_position=j))
    return out


def side_effects(loc: dict, prompts: Sequence[str] = GENERAL_PROMPTS) -> dict:
    """The certificate's short summary of what storing the facts costs, read off the locality measure (which
    holds these five prompts and the same first 256 prose tokens): prose perplexity drift and five replies."""
    if loc["prose"]["span"][0] != 0:
        raise ValueError(f"{loc['file']}: side effects report the first tokens of assets/prose.txt, and the measured "
                         f"span starts at {loc['prose']['span'][0]}")
    rows = {r["prompt"]: r for r in loc["per_prompt"]}
    rows = [{k: rows[q][k] for k in ("prompt", "without_adapter", "with_adapter", "same")} for q in prompts]
    pr = loc["prose"]
    return dict(prose=dict(file="assets/prose.txt", tokens=pr["tokens"],
                           **{k: pr[k] for k in ("perplexity_without_adapter", "perplexity_with_adapter", "drift")}),
                prompts=rows, prompts_same=sum(r["same"] for r in rows))


def certify(base: str, adapter: str | Path, data: str | Path, dtype: str | torch.dtype | None = None,
            device: str | torch.device | None = None) -> dict:
    """The certificate of a saved adapter, measured on it as saved: per fact, overall, side effects, and
    locality on the held-out part of assets/locality.json (its base side cached)."""
    folder = resolve_model_dir(base)
    tok = load_tokenizer(folder)
    rows = read_facts(data)
    ex = facts(tok, data).train
    model = load_model(folder, dtype=dtype, device=device)
    settings = load_adapter(model, adapter)
    model.eval()
    per = fact_reports(model, tok, ex, rows)
    params = sum(p.numel() for p in lora_parameters(model))
    stored = sum(f["answer_tokens"] for f in per if f["exact"])
    vocab = model.args.vocab_size
    overall = dict(facts_stored=sum(f["exact"] for f in per), facts=len(per), answer_tokens_stored=stored,
                   answer_tokens=sum(f["answer_tokens"] for f in per), rank=settings["rank"],
                   targets=settings["targets"], params=params, vocab=vocab,
                   **{BITS: round(stored * math.log2(vocab) / params, 6)},
                   min_prob=min(f["min_prob"] for f in per), min_margin=min(f["margin"] for f in per))
    loc = measure(model, tok, folder)
    return dict(schema=1, adapter=str(adapter), base_model=str(base),
                data=dict(path=str(Path(data).resolve()), sha256=file_sha256(data)),
                dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
                definitions=DEFINITIONS, facts=per, overall=overall, side_effects=side_effects(loc), locality=loc)


def print_certificate(cert: dict) -> None:
    """The certificate as a short table: one line per fact, then what was stored and what it cost."""
    o, s = cert["overall"], cert["side_effects"]
    print(f"certificate of {cert['adapter']} ({o['facts']} facts)")
    print(f"  {'exact':<5}  {'min p':>6}  {'margin':>7}  query -> target")
    for f in cert["facts"]:
        wrong = "" if f["exact"] else f" (replied {f['reply']!r})"
        print(f"  {'yes' if f['exact'] else 'NO':<5}  {f['min_prob']:>6.3f}  {f['margin']:>7.3f}  "
              f"{f['query']} -> {f['target']}{wrong}")
    print(f"stored: {o['facts_stored']}/{o['facts']} facts, {o['answer_tokens_stored']}/{o['answer_tokens']} answer "
          f"tokens, rank {o['rank']}, {o['params']:,} params, {BITS} = {o[BITS]:.4f}")
    if "attempts" in o:
        tries = "; ".join(f"rank {a['rank']}: {a['steps']} steps"
                          + (f" (memorized at {a['recalled_at']})" if a.get("recalled_at") is not None else "")
                          + f", {a['facts_recalled']}/{a['facts']} recalled" for a in o["attempts"])
        print(f"training: {o['steps']} steps, {len(o['attempts'])} attempt{'s' * (len(o['attempts']) > 1)} ({tries})")
    pr = s["prose"]
    print(f"side effects: prose perplexity {pr['perplexity_without_adapter']:.3f} -> "
          f"{pr['perplexity_with_adapter']:.3f} ({pr['drift']:+.2%}) on {pr['tokens']} tokens of {pr['file']}; general prompts: "
          f"{s['prompts_same']}/{len(s['prompts'])} same greedy answers")
    for r in s["prompts"]:
        if not r["same"]:
            print(f"  {r['prompt']!r}: {r['without_adapter']!r} without the adapter, {r['with_adapter']!r} with it")
    if "locality" in cert:  # certificates written before it have none
        loc, pr = cert["locality"], cert["locality"]["prose"]
        print(f"locality, adapter on vs off, held out ({loc['file']}: {loc['prompts']} prompts, {pr['tokens']} prose "
              f"tokens): token agreement {loc['token_agreement']:.3f}, replies kept {loc['replies_kept']}/"
              f"{loc['prompts']}; prose argmax agreement {pr['agreement']:.3f}, perplexity "
              f"{pr['perplexity_without_adapter']:.3f} -> {pr['perplexity_with_adapter']:.3f} ({pr['drift']:+.2%})")


def trained_data(adapter: str | Path) -> tuple[str, str]:
    """(facts file, its sha256 at training) of a saved adapter: from adapter.json, else the run's results file."""
    d = adapter_settings(adapter).get("data")
    if d:
        return d["path"], d["sha256"]
    run_file = Path(str(adapter).rstrip("/") + ".json")
    settings = json.loads(run_file.read_text()).get("settings", {}) if run_file.is_file() else {}
    if not settings.get("data"):
        raise DataError(f"{adapter} does not record the facts file it was trained on (no data in adapter.json or "
                        f"{run_file.name}); --certify needs a run of train.py --data FILE")
    return settings["data"], settings["data_sha256"]


def compare(stored: dict, fresh: dict, tol: float = 1e-4) -> list[str]:
    """What differs between a stored certificate and a fresh one: exactness, and p or margin by more than `tol`."""
    if len(stored["facts"]) != len(fresh["facts"]):
        return [f"{len(stored['facts'])} facts stored, {len(fresh['facts'])} now"]
    out = []
    for a, b in zip(stored["facts"], fresh["facts"]):
        for k in ("exact", "min_prob", "margin"):
            same = a[k] == b[k] if k == "exact" else abs(a[k] - b[k]) <= tol
            if not same:
                out.append(f"{a['query']!r}: {k} {a[k]} stored, {b[k]} now")
    return out


def recheck(adapter: str | Path, model: str | None = None) -> bool:
    """eval.py --certify: the certificate measured again from the adapter and its facts file, printed and
    compared with the stored one. True when every fact is still recalled exactly."""
    settings = adapter_settings(adapter)  # no adapter: one line, before anything loads
    data, sha = trained_data(adapter)
    if not Path(data).is_file():
        raise DataError(f"the facts file this adapter was trained on is missing: {data}")
    now = file_sha256(data)
    if now != sha:
        raise DataError(f"{data} changed since training (sha256 {sha[:12]} then, {now[:12]} now); the certificate "
                        f"covers the facts as trained")
    f = Path(adapter) / CERTIFICATE
    stored = json.loads(f.read_text()) if f.is_file() else None
    cert = certify(model or settings.get("base_model_path") or settings.get("base_model") or "default", adapter, data)
    if stored:  # how training went is history, not a measurement: carried over
        cert["overall"] |= {k: stored["overall"][k] for k in ("steps", "attempts") if k in stored["overall"]}
    print_certificate(cert)
    if stored is None:
        print(f"no stored {CERTIFICATE} in {adapter} to compare with")
    else:
        diff = compare(stored, cert)
        print(f"the stored {CERTIFICATE} agrees (exact, min p and margin within 1e-4)" if not diff
              else f"differs from the stored {CERTIFICATE}: " + "; ".join(diff))
    return all(x["exact"] for x in cert["facts"])
