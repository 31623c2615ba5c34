"""train.py end to end on a tiny random Llama with the SmolLM2 tokenizer: results files, memorization,
resume after a kill, finished-run skipping, sweeps, and one-line errors on bad input."""

import json

import pytest

import train
from conftest import run_script

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
REQUIRED = ("schema model task method rank params length noise seed steps loss_init loss_final delta_loss "
            "token_acc exact_match stubborn earliest_stubborn first_failure time_s").split()
PER_SAMPLE = ("id length loss_init loss_final delta_loss token_acc exact_match first_failure stubborn_positions "
              "earliest_stubborn probs").split()


def run(model, out, **kw) -> dict:
    """train.main in this process."""
    return train.main(train.Config(model=str(model), out=str(out), **kw))


@pytest.fixture(scope="module")
def cli_run(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    p = run_script("train.py", "--model", tiny_chat, "--task", "phonebook", "--length", 60, "--rank", 4,
                   "--targets", "q_proj,v_proj", "--method", "ot", "--steps", 30, "--out", out, "--name", "run")
    return out, p


def test_cli_run_writes_results_and_adapter(cli_run, tiny_chat):
    out, p = cli_run
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "run.json").read_text())
    assert not set(REQUIRED) - set(res)
    assert res["schema"] == train.SCHEMA and res["task"] == "phonebook" and res["method"] == "ot"
    assert res["rank"] == 4 and res["steps"] == 30 and res["noise"] is None and res["seed"] == 0
    assert res["length"] == 60 and res["n_samples"] == 6  # 6 numbers of 10 digit tokens each
    assert len(res["history"]) == 30 and [h["step"] for h in res["history"]] == list(range(1, 31))
    assert all(not {"step", "loss", "n_sub", "em", "lr", "time_s"} - set(h) for h in res["history"])
    assert len(res["per_sample"]) == 6 and all(not set(PER_SAMPLE) - set(s) for s in res["per_sample"])
    assert all(s["length"] == 11 and len(s["probs"]) == 11 for s in res["per_sample"])  # 10 digits + <|im_end|>
    # The paper preset puts the adapter on one layer at 2/3 depth: layer 2 of 3.
    assert res["targets"] == ["q_proj", "v_proj"] and res["layers"] == [2]
    cfg = json.loads((tiny_chat / "config.json").read_text())
    d, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    q_out, v_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    assert res["params"] == len(res["layers"]) * 4 * ((d + q_out) + (d + v_out))
    assert res["delta_loss"] == pytest.approx(res["loss_init"] - res["loss_final"], abs=1e-9)
    assert res["loss_final"] < res["loss_init"]
    adapter = out / "run"
    names = {f.name for f in adapter.iterdir()}
    assert {"adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= names
    assert not (out / "run.ckpt").exists()  # the checkpoint goes once the results are written


def test_finished_run_is_skipped(cli_run, capsys):
    out, p = cli_run
    assert p.returncode == 0, p.stderr
    f = out / "run.json"
    before, mtime = f.read_bytes(), f.stat().st_mtime_ns
    # A different model path would fail to load: the skip must happen before anything is loaded.
    train.cli(["--model", str(out / "nowhere"), "--out", str(out), "--name", "run"])
    assert "already done" in capsys.readouterr().out
    assert f.read_bytes() == before and f.stat().st_mtime_ns == mtime


def test_memorizes_small_phonebook_exactly(tiny_chat, tmp_path):
    res = run(tiny_chat, tmp_path, task="phonebook", length=20, rank=4, preset="standard", targets=ALL_LINEAR,
              lr=1e-2, steps=40)
    assert res["n_samples"] == 2 and res["length"] == 20
    assert res["loss_init"] > 10  # random model over 49152 tokens: about ln 49152 = 10.8
    assert res["exact_match"] == 1.0 and res["stubborn"] == 0 and res["earliest_stubborn"] is None
    assert res["token_acc"] == 1.0 and res["first_failure"] == 11
    assert res["sufficient_violations"] == 0 and res["em_disagreements"] == 0
    assert all(min(s["probs"]) > 0.5 for s in res["per_sample"])


RESUME_CASES = {
    # MemFT-SW on long context carries a SlidingState (anchor, still count, expansion E) per sample; with
    # ℓ = 60 > W = 50 a lost E (back to 1) would change the weights of the last answer tokens.
    "sw-longctx": dict(task="longctx", length=60, noise=0.5, method="sw", rank=2, lr=1e-2),
    # Several batches per epoch and adapter dropout: the resumed RNG state must match too.
    "sft-phonebook-dropout": dict(task="phonebook", length=40, method="sft", rank=2, dropout=0.2, batch_size=2),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_after_kill_equals_uninterrupted_run(case, tiny_chat, tmp_path, monkeypatch, capsys):
    kw = dict(RESUME_CASES[case], steps=12, save_every=4, name="r")
    out = tmp_path / "killed"
    real_save = train.save_checkpoint

    def save_then_die(path, model, opt, state):  # killed right after the step-8 checkpoint is on disk
        real_save(path, model, opt, state)
        if state["step"] >= 8:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_chat, out, **kw)
    state = json.loads((out / "r.ckpt" / "state.json").read_text())
    assert state["step"] == 8
    if kw["method"] == "sw":  # the window has grown, so the resumed steps depend on the restored state
        assert state["sliding"]["samples"]["0"][2] > 1
    assert not (out / "r.json").exists() and not (out / "r").exists()  # nothing half-written
    capsys.readouterr()

    resumed = run(tiny_chat, out, **kw)
    assert "resuming r from step 8/12" in capsys.readouterr().out
    assert not (out / "r.ckpt").exists()
    whole = run(tiny_chat, tmp_path / "whole", **kw)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert [h["em"] for h in resumed["history"]] == [h["em"] for h in whole["history"]]
    for k in ("loss_init", "loss_final", "delta_loss", "token_acc", "stubborn", "first_failure"):
        assert resumed[k] == whole[k], k
    assert [s["probs"] for s in resumed["per_sample"]] == [s["probs"] for s in whole["per_sample"]]
    assert (out / "r" / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "r" / "adapter.safetensors").read_bytes()


def test_sweep_runs_grid_then_skips_it(tiny_chat, tmp_path, capsys):
    argv = ["--model", str(tiny_chat), "--task", "longctx", "--noise", "1.0", "--ranks", "1,2", "--lengths", "20,30",
            "--steps", "3", "--out", str(tmp_path)]
    train.cli(argv)
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"longctx-n1-L{l}-r{r}-sft-s0.json" for l in (20, 30) for r in (1, 2)]
    got = {(r["rank"], r["length"]) for r in (json.loads(f.read_text()) for f in files)}
    assert got == {(1, 20), (2, 20), (1, 30), (2, 30)}
    stamps = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    train.cli(argv)
    assert capsys.readouterr().out.count("skipped") == 4
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


BAD = {
    "rank0": (["--rank", "0"], "rank"),
    "rank-3": (["--rank", "-3"], "rank"),
    "target": (["--targets", "qq_proj"], "qq_proj"),
    "method": (["--method", "foo"], "foo"),
    "layer": (["--layers", "99"], "99"),
    "text": (["--task", "longctx", "--noise", "0.5", "--length", "60", "--text", "{small}"], "longer than the text"),
    "malformed": (["--data", "{malformed}"], "malformed"),
    "empty": (["--data", "{empty}"], "no examples"),
}


def bad_files(tmp_path) -> dict:
    (tmp_path / "small.txt").write_text("Only a few words of prose here.")
    (tmp_path / "bad.jsonl").write_text('{"query": "Ann Lee:", "target": "5550123456"}\n{"query": "Bo\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    return dict(small=tmp_path / "small.txt", malformed=tmp_path / "bad.jsonl", empty=tmp_path / "empty.jsonl")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line(case, tiny_chat, tmp_path):
    args, word = BAD[case]
    args = [a.format(**bad_files(tmp_path)) for a in args]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.cli(["--model", str(tiny_chat), "--length", "20", "--steps", "2", "--out", str(out), *args])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error:") and "\n" not in msg and word in msg, msg
    assert not out.exists() or not list(out.iterdir())  # no results, adapter or checkpoint left behind


def test_bad_input_from_the_shell(tiny_chat, tmp_path):
    """The same in a real process: exit status, a single stderr line, no traceback."""
    out = tmp_path / "out"
    p = run_script("train.py", "--model", tiny_chat, "--length", 20, "--layers", "1,99", "--out", out)
    assert p.returncode != 0
    assert p.stderr.startswith("error:") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "99" in p.stderr and "0..2" in p.stderr  # names the problem and the valid range
    assert not out.exists() or not list(out.iterdir())
