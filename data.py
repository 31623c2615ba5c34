"""Tokenizer, chat template and the memorization tasks (PhoneBook, long-context, linear rule).

    python data.py --task phonebook --length 100        # show what a task looks like
    python data.py --task longctx --length 200 --noise 0.4

    from data import load_tokenizer
    tok = load_tokenizer("default")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Every example is a (key, answer) pair: the prompt is the chat-formatted key, and only the answer's
tokens are supervised. The length ℓ is always measured in answer tokens, never hard-coded. Your own
facts are a jsonl of {"query": ..., "target": ...[, "system": ...]} lines (task `facts`).
"""

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # only for annotations: torch and jinja2 load when first used
    import torch
    from jinja2 import Template


class DataError(Exception):
    """A problem with a tokenizer or a dataset, worded for the user."""


def _token_str(t: str | dict | None) -> str | None:
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    """tokenizer.json through `tokenizers`, the chat template through `jinja2`, as transformers does."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        f = path / "tokenizer.json"
        if not f.is_file():
            raise DataError(f"no tokenizer.json in {path}; the model folder needs a Hugging Face tokenizer")
        self.tk = HFTokenizer.from_file(str(f))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template = template
        self.special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.eos_id = self._eos_id(path)
        self.context = self._context(path)

    @staticmethod
    def _context(path: Path) -> int | None:
        """The model's context, config.json's max_position_embeddings: read with the tokenizer, so examples are
        checked against it before the weights load. None when unknown (load_model reports a bad config.json)."""
        try:
            n = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return None
        return n if isinstance(n, int) and n > 0 else None

    def _eos_id(self, path: Path) -> int | None:
        if self.special["eos_token"] is not None:
            return self.tk.token_to_id(self.special["eos_token"])
        for name in ("generation_config.json", "config.json"):
            f = path / name
            if f.is_file():
                eos = json.loads(f.read_text()).get("eos_token_id")
                if eos is not None:
                    return eos[0] if isinstance(eos, list) else eos
        return None

    @property
    def pad_id(self) -> int:
        """Right padding never reaches an answer position (causal attention), so any id will do: eos, else 0."""
        return self.eos_id if self.eos_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template rendered to text, with the same Jinja environment transformers uses."""
        if not self.chat_template:
            raise DataError("this tokenizer has no chat_template in tokenizer_config.json")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **kwargs
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> list[int]:
        # Special tokens in the rendered text are matched as added tokens; no BOS/EOS is added on top.
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))


_TEMPLATES: dict = {}


def _compile(source: str) -> "Template":
    """Compile once: a sandboxed env with trim_blocks/lstrip_blocks, like transformers' chat templating."""
    if source not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> NoReturn:
            raise DataError(f"chat template error: {message}")

        def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def load_tokenizer(name_or_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a model folder, hub id or 'default' (resolved as train.py and eval.py resolve --model)."""
    from convert import resolve_model_dir

    return Tokenizer(resolve_model_dir(name_or_path))


# ----------------------------------------------------------------------------- tasks

SYSTEM = "You are a helpful assistant."
LONGCTX_QUESTION = "Please output the content of the vector memory injected into the activations."
PROSE = Path(__file__).resolve().parent / "assets" / "prose.txt"
FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan "
         "Joseph Jessica Thomas Sarah Charles Karen Daniel Lisa Matthew Nancy Anthony Betty Mark Sandra Donald "
         "Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Melissa "
         "George Deborah Edward Stephanie Ronald Rebecca Timothy Laura Jason Sharon Jeffrey Cynthia Ryan Kathleen "
         "Jacob Amy Gary Angela").split()
LAST = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez Wilson "
        "Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez Lewis "
        "Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall "
        "Rivera Campbell Mitchell Carter Roberts Becerra Laramee Becker Carrara Brashier Rust Ross Okafor Lindqvist "
        "Moreau Kowalski Tanaka").split()


@dataclass
class Example:
    id: int
    prompt: list[int]  # chat-formatted key, ending with the generation prompt
    answer: list[int]  # supervised tokens (PhoneBook/linear rule: the digits, then end-of-turn)
    length: int  # ℓ contributed by this example: answer tokens (PhoneBook: digit tokens only)


@dataclass
class Task:
    name: str
    train: list[Example]
    heldout: list[Example] = field(default_factory=list)
    noise: float | None = None
    systems: dict[str, str] = field(default_factory=dict)  # query -> its own system prompt (facts lines with one)

    @property
    def length(self) -> int:
        return sum(e.length for e in self.train)


def chat_prompt(tok: Tokenizer, key: str, system: str | None = SYSTEM) -> list[int]:
    """The key as a user turn after `system` (None: no system turn, so the template's own default), then the
    generation prompt. Training and eval.py's replies both format prompts here."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": key}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)


def qa_example(tok: Tokenizer, i: int, key: str, answer: str, eot: bool = True, system: str = SYSTEM) -> Example:
    """A (key, answer) pair; ℓ counts the answer text's tokens, end-of-turn is supervised but not counted."""
    ids = tok.encode(answer)
    suffix = [tok.eos_id] if eot and tok.eos_id is not None else []
    return Example(i, chat_prompt(tok, key, system), ids + suffix, len(ids))


MAX_LINE = 2**20  # characters in one jsonl line (the paper's long-context lines hold about 110,000)
MAX_FACT_LINE = 2**16  # characters in one line of a facts file: a query and its target, not a document


def numbered_jsonl(path: str | Path, keys: tuple[str, ...], numbers_as_text: bool = False,
                   max_line: int = MAX_LINE) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; with `numbers_as_text`, numbers keep the text written.

    Read a line at a time, never more than `max_line` characters of one: a longer line is refused
    before it is read whole, so a huge line cannot exhaust memory.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    parse = dict(parse_int=str, parse_float=str) if numbers_as_text else {}
    rows, n = [], 0
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                line = f.readline(max_line + 1)
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 text (after line {n}); save the file as UTF-8") from None
            if not line:
                break
            n += 1
            if len(line.rstrip("\n")) > max_line:
                raise DataError(f"{path}:{n}: line longer than {max_line:,} characters; a line holds one example "
                                f"(a fact: a query and its target), so shorten it or split it into several")
            if not line.strip():
                continue
            try:
                row = json.loads(line, **parse)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            missing = [k for k in keys if k not in row]
            if missing:
                raise DataError(f"{path}:{n}: missing key {missing[0]!r}; each line needs {', '.join(keys)}")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows


def read_jsonl(path: str | Path, keys: tuple[str, ...]) -> list[dict]:
    return [row for _, row in numbered_jsonl(path, keys)]


def jsonl_task(path: str | Path) -> str:
    """The task a data file's keys name: question/matching -> longctx; query/target -> facts, or
    phonebook for the paper's PhoneBook files (their lines carry target_len)."""
    keys = set(numbered_jsonl(path, ())[0][1])
    if "matching" in keys:
        return "longctx"
    if "query" in keys or "target" in keys:
        return "phonebook" if "target_len" in keys else "facts"
    raise DataError(f"{path}: cannot tell the task from the keys {', '.join(sorted(keys)) or '(none)'}; facts "
                    f"need query and target, long context needs matching (or pass --task)")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _text(row: dict, key: str, where: str) -> str | None:
    """A line's value as non-empty text (numbers arrive as the text written); None when the key is absent."""
    if key not in row:
        return None
    v = row[key]
    if not isinstance(v, str):
        got = "null" if v is None else json.dumps(v)
        raise DataError(f"{where}: {key} is {got}; it must be text{' or a number' if key == 'target' else ''}")
    if not v.strip():
        raise DataError(f"{where}: empty {key}; every line needs a non-empty {key}")
    return v


def read_facts(path: str | Path) -> list[tuple[str, str, str | None]]:
    """(query, target, system or None) per line of a facts file, refusing what cannot be a fact."""
    return [(q, t, s) for _, q, t, s in numbered_facts(path)]


def numbered_facts(path: str | Path) -> list[tuple[int, str, str, str | None]]:
    """(line number, query, target, system or None) per line of a facts file, refusing what cannot be a fact.

    Targets may be numbers, kept as the text written (42.10 stays "42.10"); null, empty and other
    non-text targets, empty queries, a query that appears twice (same target or not) and a line over
    MAX_FACT_LINE characters are refused with the file and line.
    """
    facts, seen = [], {}
    for n, row in numbered_jsonl(path, ("query", "target"), numbers_as_text=True, max_line=MAX_FACT_LINE):
        where = f"{path}:{n}"
        query, target, system = _text(row, "query", where), _text(row, "target", where), _text(row, "system", where)
        if query in seen:
            m, first = seen[query]
            same = "the same target" if first == target else f"target {first!r} there, {target!r} here"
            raise DataError(f"{where}: query {query!r} already appears at line {m} ({same}); give each query once")
        seen[query] = (n, target)
        facts.append((n, query, target, system))
    return facts


def fits_context(tok: Tokenizer, e: Example, where: str, fix: str) -> Example:
    """`e` itself, or a refusal naming `where` when its prompt and answer run past the model's context."""
    n = len(e.prompt) + len(e.answer)
    if tok.context is not None and n > tok.context:
        raise DataError(f"{where}: the prompt and answer take {n:,} tokens, more than the model's context of "
                        f"{tok.context:,} (max_position_embeddings in config.json); {fix}")
    return e


def facts(tok: Tokenizer, path: str | Path, name: str = "facts") -> Task:
    """Your own facts: each query -> its target, then end-of-turn, under the line's system prompt or SYSTEM."""
    rows = numbered_facts(path)
    ex = [fits_context(tok, qa_example(tok, i, q, t, system=s or SYSTEM), f"{path}:{n}",
                       "shorten the target, or split it into several facts")
          for i, (n, q, t, s) in enumerate(rows)]
    return Task(name, ex, systems={q: s for _, q, _, s in rows if s is not None})


def phonebook_rows(seed: int) -> list[tuple[str, str]]:
    """The largest book for a seed, (name, number) rows in a fixed order: every smaller book is a prefix.

    Nested books keep a law fitted across lengths from mixing in new names at each length. Plain
    names come first, then names with a middle initial; numbers start with 6-9, as in the paper's files.
    """
    rng = random.Random(seed)
    plain = [f"{f} {l}" for f in FIRST for l in LAST]
    middle = [f"{f} {m}. {l}" for f in FIRST for m in "ABCDEFGHJKLMNPRSTVW" for l in LAST]
    rng.shuffle(plain)
    rng.shuffle(middle)
    return [(f"{name}:", str(rng.randint(6 * 10**9, 10**10 - 1))) for name in plain + middle]


def phonebook(tok: Tokenizer, length: int, seed: int = 0, path: str | Path | None = None) -> Task:
    """Names -> 10-digit numbers. ℓ = rows × digit tokens per number, sized to reach `length`."""
    if path is not None:  # the paper's files: the same format, and the same checks, as your own facts
        return facts(tok, path, "phonebook")
    per_row = len(tok.encode("5550123456"))  # digit tokens per number for this tokenizer
    n = max(1, math.ceil(length / per_row))
    book = phonebook_rows(seed)
    if n > len(book):
        raise DataError(f"--length {length} needs {n} PhoneBook rows; at most {len(book)} names available")
    return Task("phonebook", [qa_example(tok, i, k, v) for i, (k, v) in enumerate(book[:n])])


def regular_ids(tok: Tokenizer) -> list[int]:
    """Ordinary vocabulary ids (special/added tokens excluded), the pool for random replacement."""
    special = {i for i, t in tok.tk.get_added_tokens_decoder().items() if t.special}
    return [i for i in range(tok.tk.get_vocab_size(with_added_tokens=False)) if i not in special]


def add_noise(ids: list[int], rho: float, pool: list[int], seed: int) -> list[int]:
    """Replace k = round(ρN) evenly spaced tokens, at floor((j + 0.5)·N/k), with uniform random ids."""
    n, out = len(ids), list(ids)
    k = round(rho * n)
    rng = random.Random(seed)
    for j in range(k):
        out[math.floor((j + 0.5) * n / k)] = pool[rng.randrange(len(pool))]
    return out


def longctx(tok: Tokenizer, length: int, noise: float = 1.0, seed: int = 0, text: str | Path | None = None,
            path: str | Path | None = None) -> Task:
    """One fixed instruction, one answer: the first ℓ tokens of a text with a fraction ρ of tokens randomised."""
    if not 0.0 <= noise <= 1.0:
        raise DataError(f"--noise must be in [0, 1], got {noise}")
    question = LONGCTX_QUESTION
    if path is not None:
        row = read_jsonl(path, ("matching",))[0]
        clean, question = row["matching"], row.get("question", question)
    else:
        src = Path(text) if text else PROSE
        if not src.is_file():
            raise DataError(f"text file not found: {src}")
        clean = src.read_text()
    ids = tok.encode(clean)
    if noise >= 1.0:  # ρ = 1 is pure random ids: no text needed, any length works
        ids = [0] * max(length, 1)
    if length > len(ids):
        raise DataError(f"--length {length} is longer than the text ({len(ids)} tokens); pass a longer --text")
    noisy = add_noise(ids, noise, regular_ids(tok), seed)[:length]
    e = fits_context(tok, Example(0, chat_prompt(tok, question), noisy, length), f"--length {length}",
                     "lower --length")
    return Task("longctx", [e], noise=noise)


def linear_rule(tok: Tokenizer, samples: int = 100, heldout: int = 100, seed: int = 0) -> Task:
    """Facts 'x, y -> 3x + 5y + 7': train pairs test memory, unseen pairs test generalization."""
    rng = random.Random(seed)
    pairs = rng.sample([(x, y) for x in range(100) for y in range(100)], samples + heldout)
    ex = [qa_example(tok, i, f"{x}, {y} ->", str(3 * x + 5 * y + 7)) for i, (x, y) in enumerate(pairs)]
    return Task("linear", ex[:samples], ex[samples:])


def make_task(tok: Tokenizer, task: str, length: int = 100, noise: float | None = None, seed: int = 0,
              data: str | Path | None = None, text: str | Path | None = None, samples: int = 100) -> Task:
    if length is not None and length <= 0:
        raise DataError(f"--length must be a positive number of answer tokens, got {length}")
    if task == "phonebook":
        return phonebook(tok, length, seed, data)
    if task == "longctx":
        return longctx(tok, length, (0.0 if data else 1.0) if noise is None else noise, seed, text, data)
    if task == "linear":
        return linear_rule(tok, samples, samples, seed)
    if task == "facts":
        if data is None:
            raise DataError("task facts needs a data file of {\"query\": ..., \"target\": ...} lines")
        return facts(tok, data)
    raise DataError(f"unknown task {task!r}; choose phonebook, longctx or linear (or facts, from a data file)")


def collate(examples: list[Example], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded batch: input (B, T) and labels (B, T) aligned with logits; -100 off the answer."""
    import torch

    seqs = [e.prompt + e.answer for e in examples]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (e, s) in enumerate(zip(examples, seqs)):
        ids[b, : len(s) - 1] = torch.tensor(s[:-1])
        start = len(e.prompt) - 1  # logits at the last prompt token predict the first answer token
        labels[b, start : start + len(e.answer)] = torch.tensor(e.answer)
    return ids, labels


def main(model: str, task: str, length: int, noise: float | None, seed: int, data: str | Path | None,
         text: str | Path | None) -> None:
    tok = load_tokenizer(model)
    t = make_task(tok, task, length, noise, seed, data, text)
    e = t.train[0]
    print(f"{t.name}: {len(t.train)} examples, ℓ = {t.length} answer tokens, {len(t.heldout)} held out")
    print(f"--- prompt ({len(e.prompt)} tokens)\n{tok.decode(e.prompt)}")
    print(f"--- answer ({len(e.answer)} tokens, ℓ = {e.length})\n{tok.decode(e.answer[:200])}")


if __name__ == "__main__":
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Show what a memorization task looks like after tokenization.")
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="phonebook", choices=["phonebook", "longctx", "linear", "facts"])
    ap.add_argument("--length", type=int, default=100, help="answer tokens ℓ")
    ap.add_argument("--noise", type=float, default=None, help="long-context: fraction ρ of random tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="a facts jsonl (task facts) or the paper's jsonl")
    ap.add_argument("--text", default=None, help="long-context: a text file of clean prose")
    a = ap.parse_args()
    try:
        main(a.model, a.task, a.length, a.noise, a.seed, a.data, a.text)
    except DataError as e:
        sys.exit(f"error: {e}")
