"""FSDP equivalence, chunked cross-entropy, the frozen-prefix cache and early stop at the phase boundary."""

import json
import math
import os
import random
import signal
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


def _plain_step(model, ex, method):
    """One step written out the plain way: full logits, per-token CE, the method's weights, Σw·l/Σw, backward."""
    loss_t, pred, y = _unchunked(model, ex)                       # (N,) each, over the answer tokens
    lens = torch.tensor([len(e.answer) for e in ex])
    mask = torch.arange(int(lens.max()))[None] < lens[:, None]     # (B, A)
    rows, wrong = torch.zeros(mask.shape), torch.zeros(mask.shape, dtype=torch.bool)
    rows[mask], wrong[mask] = loss_t.detach(), pred != y
    w, _ = method_weights(method, rows, mask, wrong)
    weighted_loss(loss_t, w[mask]).backward()


@pytest.mark.parametrize("method", ["sft", "ot", "sw_window"])
def test_train_step_equals_the_plain_step(tiny_llama, method):
    """train.train_step, with its fast paths (the prefix cache below the adapter, the chunked loss) and its
    data-parallel layer in one process, gives the plain step's gradients."""
    import train

    ex = _examples()
    grads = []
    for plain in (True, False):
        m = load_model(tiny_llama)
        torch.manual_seed(0)
        add_lora(m, 4, ("mlp",), layers=[1], init="paper")  # above layer 0, so the prefix cache has work
        with torch.no_grad():
            for p in lora_parameters(m):
                p.normal_(0, 0.05)
        if plain:
            _plain_step(m, ex, method)
        else:
            train.train_step(m, ex, method, "sft", 0, PrefixCache(m, 1), train.MemState())
        grads.append([p.grad.clone() for p in lora_parameters(m)])
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
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
    assert not torch.equal(finals[0], torch.zeros_like(finals[0]))


def _train(args, out, env=None, torchrun=False, script="train.py", name="run", check=True, timeout=240):
    """train.py (or a wrapper script) in a fresh process, or under torchrun with 2 processes; a hang fails the test."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
           if torchrun else [sys.executable]) + [str(script), *args, "--out", str(out)] + (["--name", name] if name else [])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers
        p.communicate()
        pytest.fail(f"{' '.join(cmd[-12:])} did not finish in {timeout} s (a hang)")
    if check:
        assert p.returncode == 0, stderr[-2000:]
        return json.loads((out / f"{name}.json").read_text()) if name else None
    return p


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("ot", ["--batch-size", "4"]), ("sw", ["--batch-size", "3"])])
def test_fsdp_two_processes_match_one(tiny_chat, tmp_path, method, extra):
    # batch 4 splits 2 + 2 over the processes, batch 3 splits 2 + 1
    args = ["--model", str(tiny_chat), "--task", "phonebook", "--length", "40", "--rank", "4", "--preset",
            "standard", "--targets", "q_proj,v_proj", "--method", method, "--steps", "5", "--no-decode", *extra]
    one = _train(args, tmp_path / "one")
    two = _train(args, tmp_path / "two", torchrun=True)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["n_sub"] == b["n_sub"]
    assert abs(one["loss_final"] - two["loss_final"]) <= 1e-5
    assert two["processes"] == 2 and one["processes"] == 1


def _facts(path, rows) -> str:
    path.write_text("".join(json.dumps(dict(query=q, target=t)) + "\n" for q, t in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("method", [["ot", "--ot-fallback", "skip"], ["sw", "--sw-flavour", "window"],
                                    ["sw", "--sw-flavour", "curriculum"]], ids=["ot-skip", "sw-window", "sw-curriculum"])
def test_data_parallel_memft_finishes_when_one_share_is_memorised_first(tiny_chat, tmp_path, method):
    """Two facts, one per process: the 1-digit one drops below p = 0.5 long before the 18-digit one, so
    for many steps one process's share has no sub-threshold token and the other's has some. A
    collective behind a guard on local data hung here (step 33 of 60 on the code before the fix)."""
    data = _facts(tmp_path / "facts.jsonl", [("Short:", "7"), ("Long one:", "839201746518273645")])
    args = ["--model", str(tiny_chat), "--data", data, "--rank", "8", "--preset", "standard", "--targets",
            "q_proj,v_proj", "--method", *method, "--steps", "60", "--batch-size", "2", "--lr", "2e-2",
            "--preserve", "1"]  # λ = 1, the default this test was written for (10 holds the tiny model back)
    one = _train(args, tmp_path / "one")
    two = _train(args, tmp_path / "two", torchrun=True, timeout=180)
    n_sub = [h["n_sub"] for h in one["history"]]
    assert n_sub[0] == 21 and n_sub[-1] == 0  # tokens did cross p = 0.5, all of them by the end
    assert any(h["em"] == 0.5 for h in one["history"])  # a stretch where one fact was exact and the other not
    # float-order differences (a sum over 2 processes) stay at rounding level until tokens cross p = 0.5,
    # then high-lr steps amplify them, so the tight check covers the first 20 steps
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one["history"][:20], two["history"][:20])) <= 1e-5
    assert [h["n_sub"] for h in two["history"][:20]] == n_sub[:20]
    assert two["token_acc"] == one["token_acc"] == 1.0 and two["exact_match"] == one["exact_match"] == 1.0


@pytest.mark.slow
def test_torchrun_sweep_runs_every_run_on_both_processes(tiny_chat, tmp_path):
    """Under torchrun a sweep runs its runs one after another, each over all the processes; each result
    equals the same run done alone in one process."""
    args = ["--model", str(tiny_chat), "--task", "phonebook", "--length", "40", "--ranks", "1,2", "--preset",
            "standard", "--targets", "q_proj,v_proj", "--method", "sw", "--steps", "8", "--batch-size", "4",
            "--no-decode"]
    _train(args, tmp_path / "two", torchrun=True, name=None)
    for r in (1, 2):
        single = [a for a in args if a not in ("--ranks", "1,2")] + ["--rank", str(r)]
        alone = _train(single, tmp_path / "one", name=f"r{r}")
        swept = json.loads((tmp_path / "two" / f"phonebook-L40-r{r}-sw-s0.json").read_text())
        assert swept["rank"] == r and swept["processes"] == 2
        for a, b in zip(alone["history"], swept["history"], strict=True):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["n_sub"] == b["n_sub"]
        assert abs(alone["loss_final"] - swept["loss_final"]) <= 1e-5 and alone["token_acc"] == swept["token_acc"]


DIE_AFTER = """import sys
sys.path.insert(0, {root!r})
import train
real = train.save_checkpoint
def save_then_die(path, model, opt, state, procs):
    real(path, model, opt, state, procs)
    if state["step"] >= 8:
        raise SystemExit(3)  # killed right after the step-8 checkpoint is on disk, on every process
train.save_checkpoint = save_then_die
train.cli(sys.argv[1:])
"""


@pytest.mark.slow
def test_torchrun_resume_restores_each_process_rng(tiny_chat, tmp_path):
    """Each process draws its own dropout masks; a resumed 2-process run equals the uninterrupted one
    only if every process gets its own RNG state back, not process 0's."""
    data = _facts(tmp_path / "facts.jsonl", [("Ann:", "1234567890"), ("Bartholomew Fitzgerald-Smythe:", "5550123456"),
                                             ("Cy:", "9876543210"), ("Dorothea Wilhelmina Q.:", "1112223334")])
    args = ["--model", str(tiny_chat), "--data", data, "--rank", "4", "--preset", "standard", "--targets",
            "q_proj,v_proj", "--dropout", "0.3", "--method", "sft", "--steps", "12", "--save-every", "4",
            "--batch-size", "4", "--no-decode"]
    wrapper = tmp_path / "die_after.py"
    wrapper.write_text(DIE_AFTER.format(root=str(ROOT)))
    p = _train(args, tmp_path / "killed", torchrun=True, script=wrapper, check=False)
    assert p.returncode != 0
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "killed" / "run.ckpt" / "state.safetensors"))
    assert not torch.equal(saved["rng0"], saved["rng1"])  # the processes' streams did diverge
    resumed = _train(args, tmp_path / "killed", torchrun=True)
    whole = _train(args, tmp_path / "whole", torchrun=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["loss_final"] == whole["loss_final"]
    a, b = (tmp_path / d / "run" / "adapter.safetensors" for d in ("killed", "whole"))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
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
    two = _train(args, tmp_path / "two", torchrun=True)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one["history"], two["history"], strict=True)) <= 1e-4


@pytest.mark.slow
def test_early_stop_fires_at_the_phase_boundary(tiny_chat, tmp_path):
    args = ["--model", str(tiny_chat), "--task", "longctx", "--length", "12", "--noise", "1.0", "--rank", "8",
            "--preset", "standard", "--targets", "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj", "--lr", "2e-2",
            "--steps", "200", "--stop-when-memorized", "--eval-every", "1"]
    r = _train(args, tmp_path)
    s = r["stopped_at"]
    assert s is not None and s == r["steps"] < 200 and r["stop_reason"] == "memorized"
    # the history row of step k holds the loss before update k: every earlier state had a token at p <= 0.5
    assert all(h["max_ce"] >= math.log(2) for h in r["history"])
    assert len(r["history"]) == s
    # and the state it stopped in has every token above p = 0.5, confirmed by the decoder
    assert r["stubborn"] == 0 and r["exact_match"] == 1.0 and r["em_disagreements"] == 0


@pytest.mark.slow
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
