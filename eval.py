"""KV-cached greedy decoding and exact-recall metrics.

    python eval.py --prompt "What is the capital of France?"          # greedy reply of the built-in model
    python eval.py --model DIR --prompt "Hi" --max-new-tokens 64
    python eval.py --adapter runs/NAME/ --prompt "Employee ID of Ada Lovelace"   # asked as in training
    python eval.py --adapter runs/NAME                 # exact-recall metrics of a saved run, on its own task
    python eval.py --adapter runs/NAME --sample-recall 20 --temperature 0.7 --top-p 0.9
    python eval.py --adapter runs/NAME --certify       # re-check a facts adapter's certificate.json

    from eval import generate
    new_ids = generate(model, prompt_ids, max_new_tokens=32, eos_id=tok.eos_id)
"""

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from convert import ConvertError, resolve_model_dir
from data import SYSTEM, DataError, Example, chat_prompt, collate, load_tokenizer
from lora import LoraError, load_adapter, read_adapter
from model import ModelError, Transformer, load_model

LN2 = math.log(2)  # loss below ln 2 <=> p > 0.5 <=> the token is the greedy argmax


@torch.no_grad()
def decode_batch(model: Transformer, prompts: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                 targets: torch.Tensor | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched decoding of equal-length prompts (B, P): prefill, then one token per step.

    Greedy by default; with temperature > 0 it samples instead (nucleus sampling, top_p). With
    `targets` (B, n) it stops as soon as every row has diverged from its target, which is all that
    finding the first free-run failure needs. With `eos_id` it stops once every row has produced it
    (rows go on past their own end of turn until then: cut them there). Returns the new tokens
    (B, <= max_new_tokens).
    """
    B, P = prompts.shape
    cache = model.new_cache(batch=B, max_len=P + max_new_tokens)
    logits = model(prompts, pos0=0, cache=cache, last_only=True)  # (B, 1, V)
    out = []
    diverged = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    ended = torch.zeros(B, dtype=torch.bool, device=prompts.device)
    for i in range(max_new_tokens):
        tok = pick(logits[:, -1], temperature, top_p, generator)  # (B,)
        out.append(tok)
        if targets is not None:
            diverged |= tok != targets[:, i]
            if bool(diverged.all()):
                break
        if eos_id is not None:
            ended |= tok == eos_id
        if bool(ended.all()) or i == max_new_tokens - 1:
            break
        logits = model(tok[:, None], pos0=P + i, cache=cache)
    return torch.stack(out, dim=1)


def pick(logits: torch.Tensor, temperature: float, top_p: float,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax, or a sample from the top-p nucleus at `temperature`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    p, idx = probs.sort(dim=-1, descending=True)
    keep = p.cumsum(-1) - p < top_p  # smallest set whose mass reaches top_p (always keeps the top token)
    p = p * keep
    choice = torch.multinomial(p / p.sum(-1, keepdim=True), 1, generator=generator)
    return idx.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def sampled_recall(model: Transformer, examples: list[Example], k: int, temperature: float, top_p: float,
                   seed: int = 0) -> list[float]:
    """Fraction of k sampled decodes per example that reproduce its answer exactly (per example)."""
    g = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    dev = model.lm_head.weight.device
    out = []
    for e in examples:
        prompts = torch.tensor([e.prompt] * k, device=dev)
        targets = torch.tensor([e.answer] * k, device=dev)
        toks = decode_batch(model, prompts, len(e.answer), targets=targets, temperature=temperature, top_p=top_p,
                            generator=g)
        exact = (toks == targets[:, : toks.shape[1]]).all(dim=1) & (toks.shape[1] == len(e.answer))
        out.append(float(exact.float().mean()))
    return out


def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
             eos_id: int | None = None) -> list[int]:
    """Greedy reply to one prompt (a list of ids): the new tokens only, ending at EOS if it comes."""
    dev = model.lm_head.weight.device
    idx = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)[None]
    return decode_batch(model, idx, max_new_tokens, eos_id)[0].tolist()


class PrefixCache:
    """Hidden states entering layer `start`, per example id, computed once with no grad.

    When every adapter sits at layer `start` or above, layers below it see only frozen weights,
    so their output never changes during training. Holding it (up to `max_mb`) lets each step run
    layers start.. only. Examples that do not fit are recomputed each time, with the same result.
    """

    def __init__(self, model: Transformer, start: int, max_mb: float = 4096) -> None:
        self.model, self.start, self.budget = model, start, max_mb * 2**20
        self.h: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _compute(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.run_layers(self.model.embed(ids), stop=self.start)

    def _keep(self, key: int, h: torch.Tensor) -> bool:
        """Hold h for example `key` if the memory budget allows; whether it did."""
        size = h.numel() * h.element_size()
        if size > self.budget:
            return False
        self.budget -= size
        self.h[key] = h
        return True

    def fill(self, examples: list[Example]) -> bool:
        """Compute every example now, in order; False if they do not all fit in memory."""
        for e in examples:
            if e.id not in self.h:
                ids = torch.tensor([e.prompt + e.answer[:-1]], device=self.model.lm_head.weight.device)
                if not self._keep(e.id, self._compute(ids)[0]):
                    return False
        return True

    def batch(self, examples: list[Example], ids: torch.Tensor) -> torch.Tensor:
        """(B, T, D) hidden states entering layer `start` for the collated batch `ids`."""
        if self.start == 0:
            return self.model.embed(ids)
        B, T = ids.shape
        out = None
        for b, e in enumerate(examples):
            n = len(e.prompt) + len(e.answer) - 1
            h = self.h.get(e.id)
            if h is None:
                h = self._compute(ids[b : b + 1, :n])[0]  # (n, D)
                self._keep(e.id, h)
            if out is None:
                out = torch.zeros(B, T, h.shape[-1], dtype=h.dtype, device=h.device)
            out[b, :n] = h  # right padding stays zero: causal attention never looks ahead
        return out


def answer_losses(model: Transformer, examples: list[Example], pad_id: int, prefix: PrefixCache | None = None,
                  chunk: int | None = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token CE and teacher-forced argmax over the answers of a batch: flat (N,), (N,), and labels (N,).

    Plain: every layer on the whole padded batch, then the loss at the answer positions only. Fast
    paths with the same numbers: a prefix cache (layers below the first adapter run once per example,
    ever) and the chunked loss (chunk=None for the plain one; see Transformer.token_losses)."""
    dev = model.lm_head.weight.device
    ids, labels = collate(examples, pad_id)                           # (B, T) each, labels -100 off-answer
    ids, labels = ids.to(dev), labels.to(dev)
    if prefix is None:
        h = model.run_layers(model.embed(ids))                        # (B, T, D)
    else:
        h = model.run_layers(prefix.batch(examples, ids), start=prefix.start)
    sel = labels != -100  # answer positions, row-major: each row's answer is one contiguous run
    y = labels[sel]                                                   # (N,)
    loss, pred = model.token_losses(h[sel], y, chunk)                 # (N,), (N,)
    return loss, pred, y


@torch.no_grad()
def teacher_forced(model: Transformer, examples: list[Example], pad_id: int, batch_size: int = 16,
                   prefix: PrefixCache | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: (token losses (A,), argmax correct (A,) bool). Call it in eval mode: dropout off."""
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        loss, pred, y = answer_losses(model, chunk, pad_id, prefix)
        lens = [len(e.answer) for e in chunk]
        out += list(zip(loss.cpu().split(lens), (pred == y).cpu().split(lens)))
    return out


def same_length_batches(keys: list, batch_size: int) -> Iterator[list[int]]:
    """Indices of `keys` grouped by equal key (a prompt length, or prompt and answer lengths), in chunks of
    at most `batch_size`: batches that need no padding."""
    by_key: dict = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    for idx in by_key.values():
        for k in range(0, len(idx), batch_size):
            yield idx[k : k + batch_size]


@torch.no_grad()
def first_failures(model: Transformer, examples: list[Example], batch_size: int = 32) -> list[int]:
    """Free-run greedy decoding from each prompt: the first answer position that differs (or ℓ)."""
    dev = model.lm_head.weight.device
    res = [0] * len(examples)
    for chunk in same_length_batches([(len(e.prompt), len(e.answer)) for e in examples], batch_size):
        A = len(examples[chunk[0]].answer)
        prompts = torch.tensor([examples[i].prompt for i in chunk], device=dev)
        targets = torch.tensor([examples[i].answer for i in chunk], device=dev)
        out = decode_batch(model, prompts, A, targets=targets)  # (B, n <= A)
        wrong = out != targets[:, : out.shape[1]]
        for i, row in zip(chunk, wrong):
            res[i] = int(row.nonzero()[0]) if bool(row.any()) else A
    return res


def evaluate(model: Transformer, examples: list[Example], loss_init: list[torch.Tensor], pad_id: int,
             prefix: PrefixCache | None = None, decode: bool = True) -> dict:
    """ΔL, token accuracy, exact match (teacher-forced and decoded), first failure, stubborn tokens.

    Greedy decoding reproduces an answer iff the teacher-forced argmax is right at every answer
    position, so EM needs one forward pass; the decoder checks it. A token with p > 0.5 is always
    the argmax (no other token can hold more than the remaining 1 - p < 0.5), so a sample with no
    stubborn token (p <= 0.5) must decode exactly: `sufficient_violations` counts exceptions, and a
    theorem says it is 0.
    """
    was_training = model.training
    model.eval()
    tf = teacher_forced(model, examples, pad_id, prefix=prefix)
    fails = first_failures(model, examples) if decode else [None] * len(examples)
    model.train(was_training)
    per, disagree, violations = [], 0, 0
    for e, (loss, ok), l0, ff in zip(examples, tf, loss_init, fails):
        stub = (loss >= LN2).nonzero().flatten().tolist()  # p <= 0.5
        em_tf = bool(ok.all())
        tf_fail = int((~ok).nonzero()[0]) if not em_tf else len(e.answer)
        if ff is None:
            ff = tf_fail
        if (ff == len(e.answer)) != em_tf or ff != tf_fail:
            disagree += 1
            print(f"WARNING: example {e.id}: teacher-forced first error at {tf_fail} but the decoder "
                  f"first fails at {ff} (near-tie in the logits?)", file=sys.stderr)
        violations += int(not stub and ff != len(e.answer))
        per.append(dict(id=e.id, length=len(e.answer), loss_init=float(l0.mean()), loss_final=float(loss.mean()),
                        delta_loss=float(l0.mean() - loss.mean()), token_acc=float(ok.float().mean()),
                        exact_match=ff == len(e.answer), first_failure=ff, stubborn_positions=stub,
                        earliest_stubborn=stub[0] if stub else None,
                        probs=[round(p, 4) for p in torch.exp(-loss).tolist()]))
    n_tok = sum(p["length"] for p in per)
    l0 = sum(float(x.sum()) for x in loss_init) / n_tok
    l1 = sum(float(loss.sum()) for loss, _ in tf) / n_tok
    earliest = [p["earliest_stubborn"] for p in per if p["earliest_stubborn"] is not None]
    return dict(loss_init=l0, loss_final=l1, delta_loss=l0 - l1,
                token_acc=sum(float(ok.sum()) for _, ok in tf) / n_tok,
                exact_match=sum(p["exact_match"] for p in per) / len(per),
                stubborn=sum(len(p["stubborn_positions"]) for p in per),
                earliest_stubborn=min(earliest) if earliest else None,
                first_failure=min(p["first_failure"] for p in per),
                sufficient_violations=violations, em_disagreements=disagree, per_sample=per)


# ----------------------------------------------------------------------------- the certificate


def trained_system(settings: dict, query: str) -> str:
    """The system prompt `query` was trained under, from adapter.json: the fact's own, else the run's.
    Adapters saved before train.py recorded it were all trained under data.SYSTEM."""
    p = settings.get("prompt") or {}
    return p.get("systems", {}).get(query, p.get("system", SYSTEM))


def reply(model: str | None, prompt: str, max_new_tokens: int, system: str | None = None,
          adapter: str | Path | None = None) -> str:
    """Greedy reply to one user message. With an adapter, the prompt is formatted as in its training
    (base model, system prompt, chat template) unless `system` is given ("" for none)."""
    settings = read_adapter(adapter)[0] if adapter else {}  # a damaged adapter: one line, before anything loads
    model = model or settings.get("base_model") or "default"
    if system is None and adapter:
        system = trained_system(settings, prompt)
    folder = resolve_model_dir(model)
    tok = load_tokenizer(folder)
    m = load_model(folder)
    if adapter:
        load_adapter(m, adapter)
    ids = chat_prompt(tok, prompt, system or None)
    t0 = time.perf_counter()
    out = generate(m, ids, max_new_tokens, eos_id=tok.eos_id)
    dt = time.perf_counter() - t0
    text = tok.decode(out, skip_special_tokens=True)
    print(text)
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return text


def run_settings(run_file: Path) -> dict:
    """A run's results file, for its task settings: {} when there is none, one line when it is damaged."""
    if not run_file.is_file():
        return {}
    fix = "give --task, --length and --data yourself, or run the training again to rewrite it"
    try:
        run = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{run_file} is damaged (not valid JSON{where}); it holds the run's task settings: {fix}") from None
    if not isinstance(run, dict):
        raise DataError(f"{run_file} is damaged (a JSON {type(run).__name__}, not an object); {fix}")
    return run


def main(model: str | None, adapter: str, task: str | None = None, length: int | None = None,
         noise: float | None = None, seed: int | None = None, data: str | Path | None = None,
         text: str | Path | None = None, sample_recall: int = 0,
         temperature: float = 1.0, top_p: float = 1.0, as_json: bool = False) -> dict:
    """Evaluate a saved adapter on its task; settings default to those in the run's results file."""
    from data import make_task

    run_file = Path(str(adapter).rstrip("/") + ".json")
    run = run_settings(run_file)
    model = model or run.get("model", "default")
    read_adapter(adapter)  # no adapter, or a damaged one: one line, before anything loads
    folder = resolve_model_dir(model)
    tok = load_tokenizer(folder)
    task = make_task(tok, task or run.get("task", "phonebook"), length or run.get("length", 100),
                     noise if noise is not None else run.get("noise"),
                     seed if seed is not None else run.get("data_seed", run.get("seed", 0)),  # the data's seed
                     data or run.get("data"), text or run.get("text"), run.get("n_samples", 100))
    m = load_model(folder)  # after the data: its errors come before the slow load
    pad = tok.pad_id
    loss_init = [loss for loss, _ in teacher_forced(m, task.train, pad)]
    load_adapter(m, adapter)
    res = evaluate(m, task.train, loss_init, pad)
    if sample_recall:
        rec = sampled_recall(m, task.train, sample_recall, temperature, top_p)
        res["sampled_recall"] = dict(k=sample_recall, temperature=temperature, top_p=top_p, mean=sum(rec) / len(rec),
                                     per_sample=rec)
    summary = {k: v for k, v in res.items() if k != "per_sample"}
    if as_json:
        print(json.dumps(res))
    else:
        if summary["exact_match"] == 1.0:  # the results' first_failure is then the shortest answer's length
            summary["first_failure"] = "none: every answer recalled exactly"
        for k, v in summary.items():
            print(f"{k:>22}: {v}")
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Greedy reply to a prompt, or exact-recall metrics of a saved adapter.",
                                 epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="'default' (built-in SmolLM2-135M), a folder, or a hub id (default: the adapter's base model)")
    ap.add_argument("--prompt", default=None, help="reply mode: the user message")
    ap.add_argument("--system", default=None,
                    help="reply mode: the system message (default: with --adapter, the one it was trained under; "
                         "else none, so the model's own); '' for none")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="reply mode: the most tokens to generate "
                    "(default %(default)s; decoding stops earlier at end of turn)")
    ap.add_argument("--adapter", default=None, help="a saved adapter folder (<out>/<name>/)")
    ap.add_argument("--task", default=None, help="phonebook | longctx | linear | facts (default: the run's)")
    ap.add_argument("--length", type=int, default=None, help="answer tokens ℓ of the task (default: the run's)")
    ap.add_argument("--noise", type=float, default=None, help="longctx: fraction ρ of random tokens (default: the run's)")
    ap.add_argument("--seed", type=int, default=None, help="the seed of the task's data (default: the run's data seed)")
    ap.add_argument("--data", default=None, help="the task's jsonl (facts or PhoneBook; default: the run's)")
    ap.add_argument("--text", default=None, help="longctx: the prose file (default: the run's)")
    ap.add_argument("--sample-recall", type=int, default=0, metavar="K", help="also decode K samples per example")
    ap.add_argument("--temperature", type=float, default=1.0, help="with --sample-recall (default %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --sample-recall: nucleus mass (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="metrics mode: print the metrics as one JSON object")
    ap.add_argument("--certify", action="store_true",
                    help="with --adapter: measure the adapter's certificate.json again from its facts file (refused "
                         "when that file is missing or changed), print it and compare it with the stored one; exit "
                         "0 only if every fact is still recalled exactly")
    a = ap.parse_args()
    try:
        if a.certify:
            if not a.adapter or a.prompt is not None:
                sys.exit("error: --certify re-checks a saved adapter: give --adapter DIR (and no --prompt)")
            from facts import recheck  # the facts product, beside this module

            sys.exit(0 if recheck(a.adapter, a.model) else 1)
        if a.prompt is not None:
            reply(a.model, a.prompt, a.max_new_tokens, a.system, a.adapter)
        elif a.adapter:
            main(a.model, a.adapter, a.task, a.length, a.noise, a.seed, a.data, a.text, a.sample_recall,
                 a.temperature, a.top_p, a.json)
        else:
            ap.error("give --prompt (greedy reply) or --adapter (evaluate a saved run)")
    except (ModelError, DataError, LoraError, ConvertError) as e:
        sys.exit(f"error: {e}")
