"""FSDP equivalence, chunked cross-entropy, the frozen-prefix cache and early stop at the phase boundary."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import Example, collate
from eval import PrefixCache, answer_losses
from lora import add_lora, lora_parameters
from memft import method_weights, token_loss, weighted_loss
from model import load_model


def _examples(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Example(i, torch.randint(3, 256, (5 + i,), generator=g).tolist(),
                    torch.randint(3, 256, (20 + 3 * i,), generator=g).tolist(), 20 + 3 * i) for i in range(n)]


def _unchunked(model, ex):
    """Reference: full (B, T, V) logits, then per-token CE on the answer positions."""
    ids, labels = collate(ex, 0)
    logits = model.head(model.run_layers(model.embed(ids)))
    loss = token_loss(logits, labels)
    sel = labels != -100
    return loss[sel], logits.argmax(-1)[sel], labels[sel]


@pytest.mark.parametrize("method", ["sft", "ot", "sw_window"])
def test_chunked_ce_equals_full_logits(tiny_llama, method):
    ex = _examples()
    grads, losses, weights = [], [], []
    for chunked in (True, False):
        torch.manual_seed(0)
        m = load_model(tiny_llama)
        add_lora(m, 4, ("q_proj", "v_proj", "down_proj"))
        with torch.no_grad():
            for p in lora_parameters(m):
                p.normal_(0, 0.05)
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2, weight_decay=0)
        for _ in range(3):  # several steps, so the weights after training are compared too
            loss_t, pred, y = answer_losses(m, ex, 0, chunk=7) if chunked else _unchunked(m, ex)
            lens = torch.tensor([len(e.answer) for e in ex])
            mask = torch.arange(int(lens.max()))[None] < lens[:, None]
            lba = torch.zeros(mask.shape)
            lba[mask] = loss_t.detach()
            wrong = torch.zeros(mask.shape, dtype=torch.bool)
            wrong[mask] = pred != y
            w, _ = method_weights(method, lba, mask, wrong, p=0.02 if method == "ot" else 0.5)
            loss = weighted_loss(loss_t, w[mask])
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in lora_parameters(m)])
            losses.append(loss.item())
            opt.step()
        weights.append([p.detach().clone() for p in lora_parameters(m)])
    n = len(losses) // 2
    for a, b in zip(losses[:n], losses[n:]):
        assert abs(a - b) <= 1e-5
    for ga, gb in zip(grads[:n], grads[n:]):
        for a, b in zip(ga, gb):
            assert (a - b).abs().max() <= 1e-5
    for a, b in zip(*weights):
        assert (a - b).abs().max() <= 1e-5


def test_prefix_cache_equals_uncached_after_steps(tiny_llama):
    ex = _examples(4)
    finals = []
    for cached in (True, False):
        torch.manual_seed(0)
        m = load_model(tiny_llama)
        add_lora(m, 4, ("mlp",), layers=[2], init="paper")
        prefix = PrefixCache(m, 2) if cached else None
        opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2, weight_decay=0)
        for step in range(4):
            batch = ex[step % 2 :: 2]  # batches change composition, so cached rows get re-padded
            loss_t, _, _ = answer_losses(m, batch, 0, prefix)
            opt.zero_grad()
            loss_t.mean().backward()
            opt.step()
        if cached:
            assert len(prefix.h) == 4
        finals.append(answer_losses(m, ex, 0, prefix)[0].detach())
    assert (finals[0] - finals[1]).abs().max() <= 1e-5
    assert (finals[0] - finals[1]).abs().max() >= 0  # both ran
    assert not torch.equal(finals[0], torch.zeros_like(finals[0]))


def _train(args, out, env=None, torchrun=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
           if torchrun else [sys.executable]) + [str(ROOT / "train.py"), *args, "--out", str(out), "--name", "run"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("method,extra", [("ot", ["--batch-size", "4"]), ("sw", ["--batch-size", "3"])])
def test_fsdp_two_processes_match_one(tiny_chat, tmp_path, method, extra):
    # batch 4 splits over 2 processes (data parallel); batch 3 does not (every process runs it whole)
    args = ["--model", str(tiny_chat), "--task", "phonebook", "--length", "40", "--rank", "4", "--preset",
            "standard", "--targets", "q_proj,v_proj", "--method", method, "--steps", "5", "--no-decode", *extra]
    one = _train(args, tmp_path / "one")
    two = _train(args, tmp_path / "two", env={"OMP_NUM_THREADS": "1"}, torchrun=True)
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["n_sub"] == b["n_sub"]
    assert abs(one["loss_final"] - two["loss_final"]) <= 1e-4


def test_fsdp_sliding_windows_follow_samples_across_processes(tiny_chat, tmp_path):
    """MemFT-SW's window state is per sample; split over processes, a sample lands on a different
    process from step to step, so every process must keep every sample's window. Answers of 150
    digits exceed the 50-token window, where the window's growth changes the loss."""
    rng = random.Random(0)
    rows = [{"query": f"Person {i}:", "target": "".join(str(rng.randint(0, 9)) for _ in range(150))} for i in range(4)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(tiny_chat), "--task", "phonebook", "--data", str(data), "--rank", "4", "--preset",
            "standard", "--targets", "q_proj,v_proj", "--method", "sw", "--sw-flavour", "window",
            "--batch-size", "2", "--steps", "12", "--no-decode"]
    one = _train(args, tmp_path / "one")
    two = _train(args, tmp_path / "two", env={"OMP_NUM_THREADS": "1"}, torchrun=True)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one["history"], two["history"], strict=True)) <= 1e-4


def test_early_stop_fires_at_the_phase_boundary(tiny_chat, tmp_path):
    args = ["--model", str(tiny_chat), "--task", "longctx", "--length", "12", "--noise", "1.0", "--rank", "8",
            "--preset", "standard", "--targets", "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj", "--lr", "2e-2",
            "--steps", "200", "--stop-when-memorized", "--eval-every", "1"]
    r = _train(args, tmp_path)
    s = r["stopped_at"]
    assert s is not None and s == r["steps"] < 200
    # the history row of step k holds the loss before update k: every earlier state had a token at p <= 0.5
    assert all(h["max_ce"] >= math.log(2) for h in r["history"])
    assert len(r["history"]) == s
    # and the state it stopped in has every token above p = 0.5, confirmed by the decoder
    assert r["stubborn"] == 0 and r["exact_match"] == 1.0 and r["em_disagreements"] == 0


def test_compiled_layers_match_eager(tiny_chat, tmp_path):
    """--compile fuses the layers' elementwise work; the loss history matches the eager run."""
    args = ["--model", str(tiny_chat), "--task", "phonebook", "--length", "20", "--rank", "4", "--preset",
            "standard", "--targets", "q_proj,v_proj", "--method", "sw", "--steps", "4", "--no-decode",
            "--batch-size", "2"]
    eager = _train(args, tmp_path / "eager")
    compiled = _train(args + ["--compile"], tmp_path / "compiled")
    for a, b in zip(eager["history"], compiled["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["n_sub"] == b["n_sub"]
    assert abs(eager["delta_loss"] - compiled["delta_loss"]) <= 1e-4
