"""Exact-recall metrics on adapters trained to different degrees: teacher-forced EM against free-run decoding
(the KV-cached decoder and a plain recompute-everything decoder), the p > 0.5 bound on first failures, and
ΔL against cross-entropy computed from transformers' logits."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

import train
from data import load_tokenizer, make_task
from eval import LN2, evaluate, first_failures, teacher_forced
from lora import adapter_disabled, load_adapter, lora_modules, merge
from model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LC = dict(task="longctx", length=40, noise=0.5, preset="standard", targets=ALL_LINEAR, rank=4)
PB = dict(task="phonebook", length=40, preset="standard", targets=ALL_LINEAR, rank=4, batch_size=4)
# Steps chosen so the runs span untouched, failing at the first token, failing part-way and memorized.
RUNS = {
    "lc-0": dict(LC, steps=0),
    "lc-10": dict(LC, steps=10),
    "lc-25": dict(LC, steps=25),
    "lc-40": dict(LC, steps=40),
    "pb-25": dict(PB, steps=25),
    "pb20-40": dict(PB, length=20, steps=40),
    # The paper's whole-MLP probe at layer 2: not mergeable, and trained through the prefix cache.
    "mlp-15": dict(task="longctx", length=40, noise=0.5, rank=4, steps=15),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_runs")


@pytest.fixture(scope="module")
def runs(tiny_chat, run_dir, one_thread):
    """Results of every run in RUNS; adapters in run_dir/<name>/."""
    return {name: train.main(train.Config(model=str(tiny_chat), out=str(run_dir), name=name, **kw))
            for name, kw in RUNS.items()}


@pytest.fixture(scope="module")
def tok(tiny_chat):
    return load_tokenizer(tiny_chat)


def trained(tiny_chat, run_dir, name):
    """The base model with the run's saved adapter, in eval mode (dropout off)."""
    m = load_model(tiny_chat)
    load_adapter(m, run_dir / name)
    return m.eval()


def examples(tok, name):
    kw = RUNS[name]
    return make_task(tok, kw["task"], kw["length"], kw.get("noise"), seed=0).train


@torch.no_grad()
def naive_first_failure(model, e) -> int:
    """Greedy decoding without a cache: the whole sequence is recomputed for every new token."""
    seq = list(e.prompt)
    for i, want in enumerate(e.answer):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        if nxt != want:
            return i
        seq.append(nxt)
    return len(e.answer)


@pytest.mark.parametrize("name", RUNS)
def test_decoder_agrees_with_teacher_forced_and_p_half_bound(name, runs, run_dir, tiny_chat, tok):
    m, ex = trained(tiny_chat, run_dir, name), examples(tok, name)
    pad = tok.eos_id
    tf = teacher_forced(m, ex, pad)
    ff = first_failures(m, ex)
    for e, (loss, ok), f in zip(ex, tf, ff):
        tf_first = int((~ok).nonzero()[0]) if not ok.all() else len(e.answer)
        assert f == tf_first == naive_first_failure(m, e), e.id
        stubborn = (loss >= LN2).nonzero().flatten().tolist()  # p <= 0.5
        if stubborn:  # a wrong argmax has p <= 0.5, so the first failure is itself stubborn
            assert f >= stubborn[0] and (f == len(e.answer) or f in stubborn)
        else:  # every p > 0.5: each token is the argmax, so recall is exact
            assert f == len(e.answer)
    with adapter_disabled(m):
        loss_init = [loss for loss, _ in teacher_forced(m, ex, pad)]
    res = evaluate(m, ex, loss_init, pad)
    assert res["em_disagreements"] == 0 and res["sufficient_violations"] == 0
    assert [p["first_failure"] for p in res["per_sample"]] == ff
    assert res["exact_match"] == sum(f == len(e.answer) for e, f in zip(ex, ff)) / len(ex)
    # The run's own evaluation (train.py, with its prefix cache) saw the same thing.
    run = runs[name]
    assert run["em_disagreements"] == 0 and run["sufficient_violations"] == 0
    assert [p["first_failure"] for p in run["per_sample"]] == ff
    assert [p["stubborn_positions"] for p in run["per_sample"]] == [p["stubborn_positions"] for p in res["per_sample"]]
    assert run["loss_final"] == pytest.approx(res["loss_final"], abs=1e-5)


def test_runs_span_exact_partial_and_immediate_failure(runs):
    """Guards the test above against passing vacuously: the runs must cover every regime."""
    samples = [p for name in RUNS for p in runs[name]["per_sample"]]
    assert any(p["first_failure"] == 0 for p in samples)
    assert any(0 < p["first_failure"] < p["length"] for p in samples)
    assert any(p["first_failure"] == p["length"] and p["earliest_stubborn"] is None for p in samples)
    # Stubborn is necessary for a failure, not sufficient: a token can be the argmax with p <= 0.5.
    assert any(p["earliest_stubborn"] is not None and p["earliest_stubborn"] < p["first_failure"] for p in samples)


def test_zero_steps_is_the_base_model(runs):
    """B = 0 at the start, so an untrained adapter changes nothing: ΔL is exactly 0."""
    r = runs["lc-0"]
    assert r["steps"] == 0 and r["history"] == []
    assert r["delta_loss"] == 0.0 and r["loss_final"] == r["loss_init"]
    assert all(p["delta_loss"] == 0.0 for p in r["per_sample"])


def answer_ce(hf, e) -> torch.Tensor:
    """Per-answer-token CE from transformers' logits: the logit at position t predicts token t + 1."""
    ids = torch.tensor([e.prompt + e.answer[:-1]])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(e.prompt) - 1 :]  # (A, V)
    return F.cross_entropy(logits.float(), torch.tensor(e.answer), reduction="none")


@pytest.mark.parametrize("name", ["lc-25", "pb-25", "mlp-15"])
def test_delta_loss_matches_transformers(name, runs, run_dir, tiny_chat, tok):
    ex = examples(tok, name)
    hf = hf_model(tiny_chat)
    init = [answer_ce(hf, e) for e in ex]
    cfg = json.loads((run_dir / name / "adapter.json").read_text())
    if "mlp" in cfg["targets"]:  # the whole-MLP probe, written out independently: h_mid + MLP(x) + s·x·Aᵀ·Bᵀ
        from safetensors.torch import load_file

        sd = load_file(str(run_dir / name / "adapter.safetensors"))
        for i in cfg["layers"]:
            A, B = sd[f"model.layers.{i}.mlp.lora_A"], sd[f"model.layers.{i}.mlp.lora_B"]
            hf.model.layers[i].mlp.register_forward_hook(
                lambda mod, args, out, A=A, B=B: out + cfg["scale"] * (args[0] @ A.T @ B.T))
    else:  # linear targets: fold s·B·A into our base weights and copy them into transformers' modules
        ours = trained(tiny_chat, run_dir, name)
        merge(ours)
        with torch.no_grad():
            for path, mod in lora_modules(ours).items():
                hf.get_submodule(path).weight.copy_(mod.base.weight)
    final = [answer_ce(hf, e) for e in ex]
    n = sum(len(e.answer) for e in ex)
    l0, l1 = sum(float(x.sum()) for x in init) / n, sum(float(x.sum()) for x in final) / n
    r = runs[name]
    assert r["loss_init"] == pytest.approx(l0, abs=1e-4) and r["loss_final"] == pytest.approx(l1, abs=1e-4)
    assert r["delta_loss"] == pytest.approx(l0 - l1, abs=1e-4) and r["delta_loss"] > 0.5
    for p, a, b in zip(r["per_sample"], init, final):
        assert p["delta_loss"] == pytest.approx(float(a.mean() - b.mean()), abs=1e-4)
        assert p["probs"] == pytest.approx(torch.exp(-b).tolist(), abs=1e-4)
