"""Locality: the KL term against a hand computation, the base side's cache against recomputing it, the held-out
part never reaching the regulariser (checked on the token ids it is fed), the measures against a zero adapter
(nothing changes) and against a random one (computed again one prompt at a time), the prefix-cache fast path
against the plain one, and a facts run recording the term's value per step."""

import json
import math

import pytest
import torch
from test_facts import STAFF, write_jsonl

import eval as ev
import facts
import locality
import train
from data import PROSE, SYSTEM, chat_prompt, load_tokenizer
from lora import adapter_disabled, add_lora, lora_modules, lora_parameters
from model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder: a hit is one this test wrote."""
    monkeypatch.setattr(locality, "cache_folder", lambda: tmp_path / "cache")
    return tmp_path / "cache"


def adapted(tiny_chat, scale: float = 0.0, layers=None):
    """tiny_chat with rank-4 q,v adapters; B random at `scale` (0: the adapter adds exactly nothing)."""
    model = load_model(tiny_chat)
    torch.manual_seed(0)
    add_lora(model, 4, targets=("q_proj", "v_proj"), layers=layers)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, scale) if scale else m.lora_B.zero_()
    return model.eval()


# ----------------------------------------------------------------------------- the KL term


def test_topk_kl_by_hand():
    """Two positions over a vocabulary of 5: base top-2 with 0.1 left for the rest, and top-2 holding all of it."""
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5], [0.3, -0.2, 1.5, 0.0, 0.0]])
    top_ids = torch.tensor([[1, 0], [2, 0]])
    top_p = torch.tensor([[0.6, 0.3], [0.7, 0.3]])
    z = sum(math.exp(x) for x in (1.0, 2.0, 0.0, -1.0, 0.5))
    q1, q0 = math.exp(2.0) / z, math.exp(1.0) / z
    first = 0.6 * math.log(0.6 / q1) + 0.3 * math.log(0.3 / q0) + 0.1 * math.log(0.1 / (1 - q1 - q0))
    z = sum(math.exp(x) for x in (0.3, -0.2, 1.5, 0.0, 0.0))
    second = 0.7 * math.log(0.7 / (math.exp(1.5) / z)) + 0.3 * math.log(0.3 / (math.exp(0.3) / z))  # no rest mass
    got = locality.topk_kl(logits, top_ids, top_p)
    assert got.tolist() == pytest.approx([first, second], rel=1e-5)
    # the same as the full KL when the base has no mass outside its top-k, and never above it otherwise
    p = torch.softmax(torch.randn(3, 50), -1)
    q_logits = torch.randn(3, 50)
    full = (p * (p.log() - torch.log_softmax(q_logits, -1))).sum(-1)
    tp, ti = p.topk(8, -1)
    assert (locality.topk_kl(q_logits, ti, tp) <= full + 1e-6).all()
    tp, ti = p.topk(50, -1)
    assert locality.topk_kl(q_logits, ti[:, :49], tp[:, :49]).tolist() == pytest.approx(full.tolist(), rel=1e-4)
    # zero exactly where the adapted model is the base
    assert locality.topk_kl(p.log(), ti[:, :8], tp[:, :8]).abs().max() < 1e-6


# ----------------------------------------------------------------------------- the cache


def test_cached_base_side_equals_a_fresh_one(tiny_chat, own_cache, monkeypatch):
    """The regulariser's items and base top-k, and the measure's base replies and prose numbers: the first
    call computes and writes them, the second reads them (computing is made impossible), and both equal a
    computation that never touches the cache."""
    model = adapted(tiny_chat, 0.05)
    tok = load_tokenizer(tiny_chat)
    s = locality.load_set()
    first = locality.preserve(model, tok, tiny_chat, tok.pad_id)
    base1 = locality.base_side(model, tok, tiny_chat, s)
    assert len(list(own_cache.glob("*.safetensors"))) == 2

    def no(*a, **k):
        raise AssertionError("a cache hit computes nothing")

    with monkeypatch.context() as m:
        m.setattr(locality, "regulariser_items", no)
        m.setattr(locality, "replies", no)
        again = locality.preserve(model, tok, tiny_chat, tok.pad_id)
        base2 = locality.base_side(model, tok, tiny_chat, s)
    items = locality.regulariser_items(model, tok, s)  # fresh, no cache
    fresh = locality.base_topk(model, items, locality.TOP_K, tok.pad_id)
    for reg in (first, again):
        assert [(e.prompt, e.answer) for e in reg.items] == [(e.prompt, e.answer) for e in items]
        for (t, p), (ft, fp) in zip(reg.base, fresh):
            assert torch.equal(t, ft) and torch.equal(p, fp)
    with adapter_disabled(model):
        said = locality.replies(model, locality.measure_prompts(tok, s), [16] * len(s.measure.prompts), tok.eos_id)
        loss, argmax = locality.prose_losses(model, locality.prose_ids(tok, s.measure.prose))
    for b in (base1, base2):
        assert b["replies"] == said and torch.equal(b["prose_argmax"], argmax)
        assert torch.equal(b["prose_loss"], loss)
    # another dtype is another key: computed again, not read
    model.double()
    locality.base_side(model, tok, tiny_chat, s)
    assert len(list(own_cache.glob("*.safetensors"))) == 3


# ----------------------------------------------------------------------------- the two parts stay apart


def contains(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


@torch.no_grad()
def perplexity(model, ids: list[int]) -> float:
    """exp(mean next-token cross-entropy) over ids, written out: log-softmax, the next token's log-prob."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), -1)
    return math.exp(-float(logp[torch.arange(len(ids) - 1), ids[1:]].mean()))


def test_held_out_part_never_reaches_the_regulariser(tiny_chat, monkeypatch):
    """Every token row the regulariser feeds the model over a whole cycle: each holds one regularisation prompt
    or a piece of its prose span, and none holds a measured prompt or any 8 tokens of the measured prose."""
    model = adapted(tiny_chat, 0.05).train()
    tok = load_tokenizer(tiny_chat)
    s = locality.load_set()
    assert not set(s.measure.prompts) & set(s.regulariser.prompts)
    assert set(facts.GENERAL_PROMPTS) <= set(s.measure.prompts)  # the certificate's five are held out too
    assert len(s.measure.prompts) + len(s.regulariser.prompts) >= 50
    reg = locality.preserve(model, tok, tiny_chat, tok.pad_id)
    fed = []
    real = locality.collate
    monkeypatch.setattr(locality, "collate", lambda b, pad: fed.append(real(b, pad)[0]) or real(b, pad))
    for step in range(len(reg.chunks)):
        reg(model, step)
    rows = [r.tolist() for ids in fed for r in ids]
    assert len(rows) == len(reg.items) == len(s.regulariser.prompts) + math.ceil(192 / locality.PROSE_PIECE)
    held = [tok.encode(q) for q in s.measure.prompts]
    used = [tok.encode(q) for q in s.regulariser.prompts]
    prose = tok.encode(PROSE.read_text())
    a, b = s.measure.prose
    grams = {tuple(prose[i : i + 8]) for i in range(a, b - 7)}
    n_prompts = 0
    for row in rows:
        assert not any(contains(row, q) for q in held)
        assert not any(tuple(row[i : i + 8]) in grams for i in range(len(row) - 7))
        n_prompts += any(contains(row, q) for q in used)
    assert n_prompts == len(s.regulariser.prompts)
    # the prose items, put back together, are exactly the regularisation span
    pieces = [e.prompt + e.answer for e in reg.items if len(e.prompt) == 1]
    c, d = s.regulariser.prose
    assert sum(pieces, []) == prose[c:d] and (d <= a or c >= b)
    # both chat formats are regularised: the template's default and training's system prompt
    assert reg.items[0].prompt == chat_prompt(tok, s.regulariser.prompts[0], None)
    assert reg.items[1].prompt == chat_prompt(tok, s.regulariser.prompts[1], SYSTEM)


def test_a_set_with_shared_prompts_or_prose_is_refused(tmp_path):
    d = json.loads(locality.LOCALITY.read_text())
    d["regulariser"]["prompts"].append(d["measure"]["prompts"][3])
    with pytest.raises(ValueError, match="prompts in both parts"):
        locality.load_set(write_json(tmp_path / "a.json", d))
    d = json.loads(locality.LOCALITY.read_text())
    d["regulariser"]["prose_tokens"] = [200, 400]
    with pytest.raises(ValueError, match="disjoint"):
        locality.load_set(write_json(tmp_path / "b.json", d))


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------- the measures


def test_a_zero_adapter_changes_nothing(tiny_chat):
    """B = 0: the adapted model is the base, so every measure says so exactly."""
    model = adapted(tiny_chat, 0.0)
    tok = load_tokenizer(tiny_chat)
    loc = locality.measure(model, tok, tiny_chat)
    assert loc["token_agreement"] == 1.0 and loc["replies_kept"] == loc["prompts"] == 60
    assert loc["prose"]["drift"] == 0.0 and loc["prose"]["agreement"] == 1.0 and loc["prose"]["tokens"] == 256
    assert all(r["same"] and r["agreement"] == 1.0 for r in loc["per_prompt"])


def test_measures_of_a_random_adapter_equal_one_prompt_at_a_time(tiny_chat):
    """Random B: the batched, cached measures against generate() and full forward passes, one prompt at a time."""
    model = adapted(tiny_chat, 0.03)
    tok = load_tokenizer(tiny_chat)
    s = locality.load_set()
    loc = locality.measure(model, tok, tiny_chat)
    agree = n_tok = kept = 0
    for q, row in zip(s.measure.prompts, loc["per_prompt"]):
        p = chat_prompt(tok, q, None)
        with adapter_disabled(model):
            base = ev.generate(model, p, 16, tok.eos_id)
        base = base[: base.index(tok.eos_id) + 1] if tok.eos_id in base else base
        mine = ev.generate(model, p, 16, tok.eos_id)
        mine = mine[: mine.index(tok.eos_id) + 1] if tok.eos_id in mine else mine
        with torch.no_grad():
            pred = model(torch.tensor([p + base[:-1]]))[0, len(p) - 1 :].argmax(-1).tolist()
        hits = sum(x == y for x, y in zip(pred, base))
        assert row["agreement"] == pytest.approx(hits / len(base), abs=1e-6) and row["same"] == (mine == base)
        agree, n_tok, kept = agree + hits, n_tok + len(base), kept + (mine == base)
    assert loc["token_agreement"] == pytest.approx(agree / n_tok, abs=1e-6) and loc["replies_kept"] == kept
    assert 0 < loc["token_agreement"] < 1 and kept < 60  # the adapter does change things
    ids = locality.prose_ids(tok, s.measure.prose)
    with adapter_disabled(model):
        off = perplexity(model, ids)
        with torch.no_grad():
            base_argmax = model(torch.tensor([ids[:-1]]))[0].argmax(-1)
    on = perplexity(model, ids)
    with torch.no_grad():
        argmax = model(torch.tensor([ids[:-1]]))[0].argmax(-1)
    pr = loc["prose"]
    assert pr["perplexity_without_adapter"] == pytest.approx(off, rel=1e-5)
    assert pr["perplexity_with_adapter"] == pytest.approx(on, rel=1e-5)
    assert pr["drift"] == pytest.approx(on / off - 1, abs=1e-5) and pr["drift"] != 0
    assert pr["agreement"] == pytest.approx(float((argmax == base_argmax).float().mean()), abs=1e-6)


# ----------------------------------------------------------------------------- the regulariser in training


def test_prefix_cache_gives_the_plain_numbers(tiny_chat):
    """Adapters on layers 1 and 2 only: the regulariser that runs layers 1.. from cached hidden states gives
    the KL and the gradients of the one that runs every layer."""
    tok = load_tokenizer(tiny_chat)
    got = []
    for start in (0, 1):
        model = adapted(tiny_chat, 0.05, layers=[1, 2]).train()
        reg = locality.preserve(model, tok, tiny_chat, tok.pad_id, start=start)
        assert (reg.prefix is not None) == (start == 1)
        kl = [reg(model, step) for step in range(3)]  # three chunks, gradients summed
        got.append((kl, [p.grad.clone() for p in lora_parameters(model)]))
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-5) and all(k > 0 for k in got[0][0])
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_facts_run_records_the_term_each_step(tiny_chat, tmp_path):
    """The KL starts at 0 (B = 0: the adapter is the base) and grows as the facts are written; the results
    say how the term was set."""
    f = write_jsonl(tmp_path / "f.jsonl", STAFF[:3])
    res = train.main(train.Config(model=str(tiny_chat), data=str(f), rank=4, steps=4, lr=5e-2, out=str(tmp_path),
                                  name="r", decode=False))
    kl = [h["kl"] for h in res["history"]]
    assert len(kl) == 4 and abs(kl[0]) < 1e-5 and all(k > 1e-4 for k in kl[1:])
    p = res["preserve"]
    assert p["weight"] == locality.WEIGHT and p["top_k"] == locality.TOP_K and p["per_step"] == locality.PER_STEP
    assert p["items"] == 44 and p["cycle"] == math.ceil(44 / locality.PER_STEP)
