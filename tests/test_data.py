"""Tokenizer and chat template against transformers on the built-in SmolLM2; the tasks against hand-worked cases."""

import json
import math
import re
import shutil

import pytest
import torch
from conftest import ROOT

import convert
from data import (LONGCTX_QUESTION, PROSE, DataError, Example, add_noise, collate, load_tokenizer, make_task,
                  read_jsonl, regular_ids)

PAPER = ROOT.parent / "shared" / "paper-data"
SPECIAL = set(range(17))  # SmolLM2: ids 0-16 are special tokens
GEN_PROMPT = [1, 520, 9531, 198]  # "<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def smollm_dir():
    try:
        convert.find_gguf()
    except convert.ConvertError as e:
        pytest.skip(str(e))
    return convert.builtin_model_dir()


@pytest.fixture(scope="session")
def tok(smollm_dir):
    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def hf_tok(smollm_dir):
    tf = pytest.importorskip("transformers")
    return tf.AutoTokenizer.from_pretrained(smollm_dir)


def hf_chat_ids(hf_tok, messages, **kw) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out if isinstance(out, list) else out["input_ids"])  # transformers 5 returns a BatchEncoding


# ----------------------------------------------------------------------------- tokenizer

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; pi is about 3.14159.",
    "Phone: 555-012-3456, total $1,234,567.89 and 0000000000",
    "naïve café, Zürich, Ελληνικά, русский, 日本語, 한국어",
    "emoji 🙂👍🏽🇫🇷 and a family 👨\u200d👩\u200d👧",
    "spaces   runs\t\ttabs    and trailing   ",
    "line one\nline two\n\n\nline five\r\nwindows",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|endoftext|>",
    "    def f(x):\n        return x**2  # square",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_known_ids(tok):
    assert tok.eos_id == 2
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("2024") == [34, 32, 34, 36]  # the Digits pre-tokenizer splits every digit


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Jerry Becerra:"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?\nThanks 🙂"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!  How can I help?"},
     {"role": "user", "content": "Tell me a number."}, {"role": "assistant", "content": "5550123456"}],
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(tok, hf_tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert ours == hf_chat_ids(hf_tok, msgs, add_generation_prompt=gen)
    assert (ours[-4:] == GEN_PROMPT) == gen
    if msgs[0]["role"] != "system":  # SmolLM2's template injects its own system message
        assert "named SmolLM" in tok.decode(ours)


def test_enable_thinking_kwarg_is_harmless_for_smollm2(tok, hf_tok):
    msgs = CONVERSATIONS[1]
    plain = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False) == plain
    assert hf_chat_ids(hf_tok, msgs, add_generation_prompt=True, enable_thinking=False) == plain


# The parts of Qwen3's template that matter here: whitespace control, `continue`, and enable_thinking.
QWEN3_STYLE = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\n' + message.content | trim + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def test_qwen3_style_template_honours_enable_thinking(smollm_dir, hf_tok, tmp_path):
    tf = pytest.importorskip("transformers")
    shutil.copy(smollm_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN3_STYLE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = load_tokenizer(tmp_path), tf.AutoTokenizer.from_pretrained(tmp_path)
    msgs = CONVERSATIONS[2]
    off = ours.render_chat(msgs, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>")
    assert "<think>" not in ours.render_chat(msgs, add_generation_prompt=True)
    for kw in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        assert ours.apply_chat_template(msgs, add_generation_prompt=True, **kw) == hf_chat_ids(
            ref, msgs, add_generation_prompt=True, **kw)


# ----------------------------------------------------------------------------- PhoneBook


def user_key(tok, prompt: list[int]) -> str:
    """The user turn's text inside a chat-formatted prompt."""
    return re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", tok.decode(prompt), re.S).group(1)


def test_phonebook_generated(tok):
    t = make_task(tok, "phonebook", length=60, seed=0)
    assert len(t.train) == 6 and t.length == 60 and not t.heldout
    for e in t.train:
        assert e.length == 10 and len(e.answer) == 11 and e.answer[-1] == tok.eos_id
        digits = tok.decode(e.answer[:-1])
        assert re.fullmatch(r"[1-9]\d{9}", digits) and tok.encode(digits) == e.answer[:-1]
        assert e.prompt[-len(GEN_PROMPT):] == GEN_PROMPT
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+:", user_key(tok, e.prompt))
    assert len({user_key(tok, e.prompt) for e in t.train}) == 6  # distinct names
    again, other = make_task(tok, "phonebook", length=60, seed=0), make_task(tok, "phonebook", length=60, seed=1)
    pairs = lambda task: [(e.prompt, e.answer) for e in task.train]  # noqa: E731
    assert pairs(again) == pairs(t)
    assert pairs(other) != pairs(t)


def test_phonebook_rounds_rows_up(tok):
    t = make_task(tok, "phonebook", length=25, seed=3)
    assert len(t.train) == 3 and t.length == 30


def test_phonebook_paper_jsonl(tok):
    path = PAPER / "phonebook" / "qwen_PB1000.jsonl"
    if not path.is_file():
        pytest.skip(f"paper data not present: {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    t = make_task(tok, "phonebook", seed=0, data=path)
    assert len(t.train) == 100 and t.length == 1000
    for e, r in zip(t.train, rows):
        assert e.length == 10 and e.answer == tok.encode(str(r["target"])) + [tok.eos_id]
        assert user_key(tok, e.prompt) == r["query"]


# ----------------------------------------------------------------------------- long context


def test_add_noise_hand_worked():
    ids, pool = list(range(100, 110)), [900, 901, 902]
    out = add_noise(ids, 0.3, pool, seed=0)  # k = 3 at floor((j + 0.5)·10/3) = 1, 5, 8
    assert [i for i in range(10) if out[i] != ids[i]] == [1, 5, 8]
    assert all(out[i] in pool for i in (1, 5, 8))
    out = add_noise(ids, 0.5, pool, seed=0)  # k = 5 at floor((j + 0.5)·2) = 1, 3, 5, 7, 9
    assert [i for i in range(10) if out[i] != ids[i]] == [1, 3, 5, 7, 9]
    assert add_noise(ids, 0.0, pool, seed=0) == ids
    assert all(x in pool for x in add_noise(ids, 1.0, pool, seed=0))
    assert add_noise(ids, 0.3, pool, seed=5) == add_noise(ids, 0.3, pool, seed=5)
    assert ids == list(range(100, 110))  # the input is not modified


def test_regular_ids_exclude_specials(tok):
    pool = regular_ids(tok)
    assert not SPECIAL & set(pool) and len(pool) == 49152 - len(SPECIAL) and max(pool) == 49151


def test_longctx_noise_fraction(tok):
    clean = tok.encode(PROSE.read_text())
    t = make_task(tok, "longctx", length=200, noise=0.4, seed=0)
    (e,) = t.train
    assert len(e.answer) == 200 and e.length == 200 and t.length == 200 and t.noise == 0.4
    assert tok.eos_id not in e.answer  # no end-of-turn suffix
    assert user_key(tok, e.prompt) == LONGCTX_QUESTION and e.prompt[-len(GEN_PROMPT):] == GEN_PROMPT
    n = len(clean)
    k = round(0.4 * n)  # the noise is laid over the whole text, then the first ℓ tokens are kept
    spots = {math.floor((j + 0.5) * n / k) for j in range(k)} & set(range(200))
    differ = {i for i in range(200) if e.answer[i] != clean[i]}
    assert differ <= spots and len(differ) >= len(spots) - 2  # a random id may equal the clean one
    assert 0.35 <= len(differ) / 200 <= 0.45
    assert not SPECIAL & set(e.answer)
    assert make_task(tok, "longctx", length=200, noise=0.4, seed=0).train[0].answer == e.answer
    assert make_task(tok, "longctx", length=200, noise=0.4, seed=1).train[0].answer != e.answer
    assert make_task(tok, "longctx", length=200, noise=0.0).train[0].answer == clean[:200]


def test_longctx_pure_noise(tok):
    (e,) = make_task(tok, "longctx", length=500, noise=1.0, seed=0).train
    assert len(e.answer) == 500 and not SPECIAL & set(e.answer) and max(e.answer) < 49152
    assert len(set(e.answer)) > 490  # uniform over ~49k ids: almost no repeats


def test_longctx_paper_jsonl(tok):
    path = PAPER / "long_context" / "r0.jsonl"
    if not path.is_file():
        pytest.skip(f"paper data not present: {path}")
    row = json.loads(path.read_text().splitlines()[0])
    (e,) = make_task(tok, "longctx", length=300, noise=0.0, data=path).train
    assert e.answer == tok.encode(row["matching"])[:300] and e.length == 300
    assert user_key(tok, e.prompt) == row["question"]


# ----------------------------------------------------------------------------- linear rule


def test_linear_rule(tok):
    t = make_task(tok, "linear", seed=0)
    assert len(t.train) == 100 and len(t.heldout) == 100

    def facts(examples):
        out = set()
        for e in examples:
            x, y = map(int, re.fullmatch(r"(\d+), (\d+) ->", user_key(tok, e.prompt)).groups())
            assert e.answer[-1] == tok.eos_id and tok.decode(e.answer[:-1]) == str(3 * x + 5 * y + 7)
            assert e.length == len(e.answer) - 1
            out.add((x, y))
        return out

    train, held = facts(t.train), facts(t.heldout)
    assert len(train) == 100 and len(held) == 100 and not train & held


# ----------------------------------------------------------------------------- batching


def test_collate_hand_worked():
    a = Example(0, prompt=[10, 11, 12], answer=[20, 21], length=2)
    b = Example(1, prompt=[10, 11], answer=[30, 31, 32, 33], length=4)
    ids, labels = collate([a, b], pad_id=2)
    # a: 10 11 12 | 20 21 -> input drops the last token; labels[t] is the token at t + 1 on the answer
    # b: 10 11 | 30 31 32 33
    assert ids.tolist() == [[10, 11, 12, 20, 2], [10, 11, 30, 31, 32]]
    assert labels.tolist() == [[-100, -100, 20, 21, -100], [-100, 30, 31, 32, 33]]
    assert ids.dtype == labels.dtype == torch.long


# ----------------------------------------------------------------------------- bad input


def test_read_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "A B:", "target": "1234567890"}\nnot json at all\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:2") + ".*malformed JSON"):
        read_jsonl(bad, ("query", "target"))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"query": "A B:", "target": "1"}\n\n{"query": "C D:"}\n')
    with pytest.raises(DataError, match=re.escape(f"{missing}:3") + ".*missing key 'target'"):
        read_jsonl(missing, ("query", "target"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(empty, ("query", "target"))
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl", ("query",))


def test_make_task_errors(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:1")):
        make_task(tok, "phonebook", data=bad)
    with pytest.raises(DataError, match=re.escape(f"{bad}:1")):
        make_task(tok, "longctx", noise=0.0, data=bad)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of prose here.")
    with pytest.raises(DataError, match=r"--length 50 is longer than the text \(\d+ tokens\)"):
        make_task(tok, "longctx", length=50, noise=0.5, text=short)
    with pytest.raises(DataError, match="text file not found"):
        make_task(tok, "longctx", length=50, noise=0.5, text=tmp_path / "none.txt")
    for n in (0, -3):
        with pytest.raises(DataError, match=f"--length must be a positive number.*got {n}"):
            make_task(tok, "phonebook", length=n)
    for rho in (-0.1, 1.5):
        with pytest.raises(DataError, match=re.escape(f"--noise must be in [0, 1], got {rho}")):
            make_task(tok, "longctx", length=10, noise=rho)
    with pytest.raises(DataError, match="unknown task 'phonbook'; choose phonebook, longctx or linear"):
        make_task(tok, "phonbook")
