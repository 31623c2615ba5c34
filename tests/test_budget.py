"""Budget-aware runs: lr schedules, snapshots inside a run, the plateau stop, data vs training seeds,
the authors' PhoneBook schedules, nested PhoneBooks, and MemFT-SW's inactive curriculum."""

import pytest

import train
from data import load_tokenizer, phonebook
from memft import paper_schedule

pytestmark = pytest.mark.usefixtures("one_thread")
LC = dict(task="longctx", length=12, noise=1.0, rank=2, preset="standard")


def run(model, out, **kw) -> dict:
    return train.main(train.Config(model=str(model), out=str(out), **kw))


def test_learning_rate_schedules_by_hand():
    lin, const = train.Config(lr=0.02), train.Config(lr=0.02, schedule="constant")
    assert [train.learning_rate(lin, s, 4) for s in range(4)] == [0.02, 0.015, 0.01, 0.005]
    assert [train.learning_rate(const, s, 4) for s in range(4)] == [0.02] * 4


def test_paper_schedule_tables():
    assert paper_schedule("qwen", "sw_curriculum", 4000) == dict(
        lr=1e-2, batch_size=10, grad_accum=1, epochs=350, boundaries=[30, 60, 90, 120, 350])
    assert paper_schedule("qwen", "sw_curriculum", 16000)["boundaries"] == [80, 160, 240, 320, 600]
    assert paper_schedule("llama", "sw_curriculum", 24000) == dict(
        lr=3e-3, batch_size=50, grad_accum=4, epochs=700, boundaries=[100, 200, 300, 400, 700])
    # SFT and OT: lr 1e-2, 200 epochs, no accumulation, the family's batch for that length
    assert paper_schedule("qwen", "ot", 1000)["batch_size"] == 4 and paper_schedule("qwen", "sft", 8000)["batch_size"] == 8
    assert paper_schedule("llama", "sft", 20000) == dict(lr=1e-2, batch_size=20, grad_accum=1, epochs=200,
                                                        boundaries=[100, 200, 300, 400, 700])
    # a book shorter than any in the table takes the first row, a longer one the last
    assert paper_schedule("qwen", "sw_window", 320)["boundaries"] == [20, 40, 60, 80, 300]
    assert paper_schedule("llama", "sw_curriculum", 64000)["epochs"] == 800
    with pytest.raises(ValueError, match="mistral"):
        paper_schedule("mistral", "sft", 1000)


def test_paper_schedule_sets_the_run(tiny_chat, tmp_path):
    res = run(tiny_chat, tmp_path, task="phonebook", length=30, rank=2, preset="standard", method="sw",
              paper_schedule="llama", steps=3, decode=False)
    assert res["lr"] == 1e-2 and res["batch_size"] == 25 and res["grad_accum"] == 1
    assert res["paper_schedule"] == "llama" and res["settings"]["paper_schedule"] == "llama"
    with pytest.raises(train.RunError, match="--task phonebook"):
        train.check(train.Config(task="longctx", paper_schedule="qwen"))


def test_phonebooks_nest(tiny_chat):
    tok = load_tokenizer(tiny_chat)
    small, large = phonebook(tok, 30, seed=3), phonebook(tok, 320, seed=3)
    assert len(small.train) == 3 and len(large.train) == 32
    assert [(e.prompt, e.answer) for e in small.train] == [(e.prompt, e.answer) for e in large.train[:3]]
    digits = [tok.decode(e.answer[:-1]) for e in large.train]
    assert all(len(d) == 10 and d[0] in "6789" for d in digits)
    assert [e.answer for e in phonebook(tok, 30, seed=4).train] != [e.answer for e in small.train]


def test_data_seed_holds_the_data_while_the_training_seed_changes(tiny_chat, tmp_path):
    a = run(tiny_chat, tmp_path, **LC, steps=2, seed=0, data_seed=5, decode=False)
    b = run(tiny_chat, tmp_path, **LC, steps=2, seed=1, data_seed=5, decode=False)
    c = run(tiny_chat, tmp_path, **LC, steps=2, seed=0, data_seed=6, decode=False)
    assert a["name"] == "longctx-n1-L12-r2-sft-s0-d5" and b["data_seed"] == 5
    assert a["loss_init"] == b["loss_init"]  # the same random text
    assert a["loss_final"] != b["loss_final"]  # another adapter init
    assert c["loss_init"] != a["loss_init"]  # other random text


def test_eval_rebuilds_the_data_of_the_runs_data_seed(tiny_chat, tmp_path):
    """A run trained with seed 1 on data seed 5: eval.py evaluates its adapter on data seed 5's text,
    so it reproduces the run's own loss_final (not that of seed 1's text)."""
    import eval as ev

    r = run(tiny_chat, tmp_path, **LC, steps=3, seed=1, data_seed=5, decode=False)
    res = ev.main(str(tiny_chat), str(tmp_path / r["name"]))
    assert res["loss_init"] == pytest.approx(r["loss_init"], rel=1e-5)
    assert res["loss_final"] == pytest.approx(r["loss_final"], rel=1e-5)


def test_snapshots_under_a_constant_lr_equal_shorter_runs(tiny_chat, tmp_path):
    """With a constant lr, the state after T steps does not depend on the total budget: the snapshot
    at T inside a long run equals the end of a run of T steps."""
    long = run(tiny_chat, tmp_path, **LC, schedule="constant", steps=6, snapshots="3,6,50", name="long")
    short = run(tiny_chat, tmp_path, **LC, schedule="constant", steps=3, name="short")
    assert [s["step"] for s in long["snapshots"]] == [3, 6]  # steps past the budget are not reached
    s3, s6 = long["snapshots"]
    for k in ("delta_loss", "loss_final", "token_acc", "exact_match", "stubborn", "first_failure"):
        assert s3[k] == short[k], k
        assert s6[k] == long[k], k
    assert s3["per_sample"][0]["stubborn_positions"] == short["per_sample"][0]["stubborn_positions"]
    assert long["name"] == "long" and train.Config(**LC, schedule="constant").run_name().endswith("-const-s0")
    with pytest.raises(train.RunError, match="--snapshots"):
        train.check(train.Config(snapshots="3,x"))


def test_plateau_by_hand():
    flat = [dict(ce=1.0)] * 40
    assert train.plateaued(flat, 40, 10, 0.01)
    assert not train.plateaued(flat, 35, 10, 0.01)  # not a check step
    assert not train.plateaued(flat[:10], 10, 10, 0.01)  # fewer than two windows
    # last tenth (10 steps) at 1.0, the tenth before at 1.05: a 4.8% change
    moving = [dict(ce=2.0)] * 20 + [dict(ce=1.05)] * 10 + [dict(ce=1.0)] * 10
    assert not train.plateaued(moving, 40, 10, 0.01) and train.plateaued(moving, 40, 10, 0.05)


def test_plateau_stop_fires_and_is_recorded(tiny_chat, tmp_path):
    res = run(tiny_chat, tmp_path, **LC, lr=1e-7, steps=200, stop_at_plateau=0.01, eval_every=5, decode=False)
    assert res["stop_reason"] == "plateau" and res["stopped_at"] == res["steps"] == 10  # two windows of 5 steps
    full = run(tiny_chat, tmp_path, **LC, steps=3, decode=False, name="full")
    assert full["stop_reason"] == "budget" and full["stopped_at"] is None and full["budget"] == 3


@pytest.mark.slow
def test_sw_equals_ot_when_the_curriculum_is_inactive(tiny_chat, tmp_path, capsys):
    """With every sample in one batch the curriculum trains them all from step 1, and its loss is OT
    with the skip fallback: the two runs match (up to the order of samples inside the batch)."""
    kw = dict(task="phonebook", length=30, rank=4, preset="standard", batch_size=16, steps=25, lr=2e-2,
              decode=False, ot_fallback="skip")
    sw = run(tiny_chat, tmp_path, **kw, method="sw")
    assert "the curriculum is active from the start" in capsys.readouterr().out
    ot = run(tiny_chat, tmp_path, **kw, method="ot")
    assert any(h["n_sub"] < sw["history"][0]["n_sub"] for h in sw["history"])  # tokens crossed p = 0.5
    for a, b in zip(sw["history"], ot["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["n_sub"] == b["n_sub"] and a["skipped"] == b["skipped"]
    assert sw["token_acc"] == ot["token_acc"]


# Every (N samples, settings, method, answer length, boundaries) the study schedules: stage 3 and the law grid
# (one long-context sample), stages 4 and 6 (books of 8, 16, 32 numbers at batch 8), stage 8 (the authors'
# Qwen tables: SFT and OT at batch 4 for 200 epochs, SW at batch 10 for 300 epochs), and the facts example.
QWEN_SW = paper_schedule("qwen", "sw_curriculum", 320)["boundaries"]
STUDY = [(1, dict(batch_size=16, steps=2000), m, 50, None) for m in ("sft", "ot", "sw_window")] \
    + [(n, dict(batch_size=8, epochs=200), m, 10 * n, None) for n in (8, 16, 32) for m in ("sft", "ot", "sw_curriculum")] \
    + [(32, dict(batch_size=4, epochs=200), m, 320, None) for m in ("sft", "ot")] \
    + [(32, dict(batch_size=10, epochs=300), "sw_curriculum", 320, QWEN_SW), (10, dict(batch_size=16, steps=60), "sft", 74, None)]


@pytest.mark.parametrize("n, kw, method, length, bounds", STUDY)
def test_every_schedule_of_the_study_trains_every_sample(n, kw, method, length, bounds):
    plan = train.schedule(n, train.Config(**kw), method, length, bounds)
    assert {i for step in plan for micro in step for i in micro} == set(range(n))


def test_every_curriculum_trains_every_sample_by_its_last_stage():
    for n in range(1, 41):
        for b in range(1, 13):
            plan = train.schedule(n, train.Config(batch_size=b, epochs=300), "sw_curriculum", 320, QWEN_SW)
            assert {i for step in plan for micro in step for i in micro} == set(range(n)), (n, b)


def test_stage_8_curriculum_by_hand():
    """32 numbers at batch 10, boundaries [20, 40, 60, 80, 300]: active 10, 10, 10, 20, then all 32, so
    1, 1, 1, 2 and then 4 batches per epoch (the last of 2 numbers): 20 + 20 + 20 + 40 + 220·4 = 980 steps.
    The paper's rule stopped at 30 active (760 steps) and never trained the last 2 numbers of the order."""
    plan = train.schedule(32, train.Config(batch_size=10, epochs=300), "sw_curriculum", 320, QWEN_SW)
    assert QWEN_SW == [20, 40, 60, 80, 300] and len(plan) == 980
    sizes = [len(step[0]) for step in plan]
    assert sizes[:100] == [10] * 100 and sizes[100:104] == [10, 10, 10, 2] and sorted(set(sizes[100:])) == [2, 10]
    assert len({i for step in plan[:100] for i in step[0]}) == 20  # the first 100 steps: stages 1-4


def test_reweighted_share_is_the_tokens_memft_takes_out(tiny_llama):
    """train_step's count of answer tokens at weight < 0.5, against the tokens at p > 0.5 of an independent
    forward pass (dropout off in this adapter, so the training pass sees the same probabilities): OT takes
    those out while some token is still below p = 0.5, SFT none."""
    import math

    import torch

    from eval import answer_losses
    from lora import add_lora, lora_parameters
    from model import load_model
    from test_scale import _examples

    ex = _examples(3)
    for method in ("sft", "ot"):
        m = load_model(tiny_llama)
        torch.manual_seed(0)
        add_lora(m, 4, ("q_proj", "v_proj"), init="standard")
        opt = torch.optim.AdamW(lora_parameters(m), lr=2e-2)
        for _ in range(200):  # plain SFT until some answer tokens, not all, are past p = 0.5
            with torch.no_grad():
                loss, _, _ = answer_losses(m, ex, 0)
            above = int((loss < math.log(2)).sum())
            if 0.2 * len(loss) < above < len(loss):
                break
            opt.zero_grad()
            answer_losses(m, ex, 0)[0].mean().backward()
            opt.step()
        assert 0 < above < len(loss)
        opt.zero_grad()
        r = train.train_step(m, ex, method, "sft", 0, None, train.MemState())
        assert r["n_tok"] == len(loss) and r["n_off"] == (above if method == "ot" else 0)
