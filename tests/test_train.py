"""train.py end to end on a tiny random Llama with the SmolLM2 tokenizer: results files, memorization,
resume after a kill, finished-run skipping, sweeps, and one-line errors on bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_script

import runs
import train
from lora import atomic_dir, lora_parameters

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


@pytest.mark.slow
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


def test_finished_run_is_reused_only_with_the_same_settings(cli_run, tiny_chat, monkeypatch, capsys):
    out, p = cli_run
    assert p.returncode == 0, p.stderr
    f = out / "run.json"
    before = f.read_bytes()
    same = ["--model", str(tiny_chat), "--task", "phonebook", "--length", "60", "--rank", "4", "--targets",
            "q_proj,v_proj", "--method", "ot", "--steps", "30", "--out", str(out), "--name", "run"]

    def no_loading(*a, **k):
        raise AssertionError("a reused run must not load the model")

    monkeypatch.setattr(train, "load_model", no_loading)
    train.cli(same)
    assert "already done" in capsys.readouterr().out and f.read_bytes() == before
    # Another lr, another number of steps: the old numbers do not answer this run; say what differs.
    with pytest.raises(SystemExit) as e:
        train.cli(same[:-4] + ["--lr", "0.02", "--steps", "31", "--out", str(out), "--name", "run"])
    msg = e.value.code
    assert msg.startswith("error:") and "\n" not in msg
    assert "lr 0.01 -> 0.02" in msg and "steps 30 -> 31" in msg and "--overwrite" in msg and "--name" in msg
    assert f.read_bytes() == before
    # The number of processes is part of a run's identity too (it changes float order and dropout streams).
    assert runs.differences(runs.identity(train.Config(), 1), runs.identity(train.Config(), 2)) == [
        "processes 1 -> 2"]


def test_overwrite_reruns_with_the_new_settings(tiny_chat, tmp_path):
    base = dict(task="longctx", length=12, noise=1.0, rank=2, steps=3, name="r")
    first = run(tiny_chat, tmp_path, **base)
    with pytest.raises(train.RunError, match="lr 0.01 -> 0.03"):
        run(tiny_chat, tmp_path, **base, lr=0.03)
    second = run(tiny_chat, tmp_path, **base, lr=0.03, overwrite=True)
    assert second["settings"]["lr"] == 0.03 and second["loss_final"] != first["loss_final"]
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["lr"] == 0.03


def test_results_without_settings_are_not_reused(tiny_chat, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(dict(schema=1, delta_loss=1.0)))
    with pytest.raises(train.RunError, match="does not record its settings.*--overwrite"):
        run(tiny_chat, tmp_path, task="longctx", length=12, rank=2, steps=2, name="r")


def test_second_launch_of_a_running_run_names_the_holder(tiny_chat, tmp_path):
    lock = runs.RunLock(tmp_path / "r.lock")
    lock.acquire()  # as a first launch still running would hold it
    try:
        with pytest.raises(train.RunError, match=f"already running in process {os.getpid()}"):
            run(tiny_chat, tmp_path, task="longctx", length=12, rank=2, steps=2, name="r")
    finally:
        lock.release()
    assert run(tiny_chat, tmp_path, task="longctx", length=12, rank=2, steps=2, name="r")["steps"] == 2
    assert not (tmp_path / "r.lock").exists()


def test_memorizes_small_phonebook_exactly(tiny_chat, tmp_path):
    res = run(tiny_chat, tmp_path, task="phonebook", length=20, rank=4, preset="standard", targets=ALL_LINEAR,
              lr=1e-2, steps=40)
    assert res["n_samples"] == 2 and res["length"] == 20
    assert res["loss_init"] > 10  # random model over 49152 tokens: about ln 49152 = 10.8
    assert res["exact_match"] == 1.0 and res["stubborn"] == 0 and res["earliest_stubborn"] is None
    assert res["token_acc"] == 1.0 and res["first_failure"] == 11
    assert res["sufficient_violations"] == 0 and res["em_disagreements"] == 0
    assert all(min(s["probs"]) > 0.5 for s in res["per_sample"])


def test_settle_trains_on_to_the_budget_after_the_same_steps_as_a_stopped_run(tiny_chat, tmp_path, monkeypatch, capsys):
    kw = dict(task="phonebook", length=20, rank=4, preset="standard", targets=ALL_LINEAR, lr=1e-2, steps=80,
              stop_when_memorized=True, eval_every=1, save_every=1, name="r")
    stopped = run(tiny_chat, tmp_path / "stopped", **kw)
    at = stopped["stopped_at"]
    assert stopped["stop_reason"] == "memorized" and at is not None and 2 * at < 80 and "recalled_at" not in stopped
    settled = run(tiny_chat, tmp_path / "settled", settle=True, **kw)
    assert settled["recalled_at"] == at and settled["steps"] == settled["stopped_at"] == 2 * at
    assert settled["stop_reason"] == "settled"
    assert [h["loss"] for h in settled["history"][:at]] == [h["loss"] for h in stopped["history"]]
    # as many steps again, the lr from its value at step `at` (1e-2 · (1 − at/80)) linearly down to 0, by hand
    assert [h["lr"] for h in settled["history"][at:]] == pytest.approx(
        [1e-2 * (1 - at / 80) * (2 * at - k) / at for k in range(at, 2 * at)], rel=1e-12)
    assert settled["exact_match"] == 1.0 and settled["stubborn"] == 0  # still memorized at the end
    assert f"stopped at step {2 * at} (settled), memorized at step {at}" in capsys.readouterr().out

    real_save = train.save_checkpoint  # killed while settling: the resumed run keeps the step it memorized at

    def save_then_die(path, model, opt, state, procs):
        real_save(path, model, opt, state, procs)
        if state["step"] >= at + 2:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_chat, out, settle=True, **kw)
    resumed = run(tiny_chat, out, settle=True, **kw)
    assert resumed["recalled_at"] == at
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in settled["history"]]
    assert (out / "r" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "settled" / "r" / "adapter.safetensors").read_bytes()


RESUME_CASES = {
    # MemFT-SW on long context carries a SlidingState (anchor, still count, expansion E) per sample; with
    # ℓ = 60 > W = 50 a lost E (back to 1) would change the weights of the last answer tokens.
    "sw-longctx": dict(task="longctx", length=60, noise=0.5, method="sw", rank=2, lr=1e-2),
    # Several batches per epoch and adapter dropout: the resumed RNG state must match too.
    "sft-phonebook-dropout": dict(task="phonebook", length=40, method="sft", rank=2, dropout=0.2, batch_size=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_after_kill_equals_uninterrupted_run(case, tiny_chat, tmp_path, monkeypatch, capsys):
    kw = dict(RESUME_CASES[case], steps=12, save_every=4, name="r")
    out = tmp_path / "killed"
    real_save = train.save_checkpoint

    def save_then_die(path, model, opt, state, procs):  # killed right after the step-8 checkpoint is on disk
        real_save(path, model, opt, state, procs)
        if state["step"] >= 8:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(tiny_chat, out, **kw)
    state = json.loads((out / "r.ckpt" / "state.json").read_text())
    assert state["step"] == 8
    if kw["method"] == "sw":  # the window has grown, so the resumed steps depend on the restored state
        assert state["memft"]["sliding"]["samples"]["0"][2] > 1
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
    assert capsys.readouterr().out.count("done already, reused") == 4
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
# Settings that are wrong whatever the model: refused before the model (or anything else) is loaded.
BAD_SETTINGS = {
    "lr-nan": (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    "lr-negative": (["--lr", "-1"], "--lr must be a finite number above 0, got -1"),
    "lr-inf": (["--lr", "inf"], "--lr must be a finite number above 0, got inf"),
    "noise": (["--task", "longctx", "--noise", "2"], "--noise must be in [0, 1]"),
    "dropout": (["--dropout", "1"], "--dropout must be in [0, 1)"),
    "top-p": (["--top-p", "0"], "--top-p must be in (0, 1]"),
    "temperature": (["--temperature", "-1"], "--temperature must be a finite number, 0 or more"),
    "alpha": (["--alpha", "0"], "--alpha must be a finite number above 0"),
    "steps": (["--steps", "-1"], "--steps must be 1 or more"),
    "save-every": (["--save-every", "-2"], "--save-every must be 0 or more"),
    "dtype": (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    "data-missing": (["--data", "{missing}"], "file not found"),
    "out-not-a-folder": (["--out", "{afile}/sub"], "cannot write to --out"),
    "sweep-type": (["--ranks", "1,two"], "wrong type"),
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


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_are_refused_before_loading(case, tiny_chat, tmp_path, monkeypatch):
    args, words = BAD_SETTINGS[case]
    (tmp_path / "afile").write_text("a file, not a folder")
    args = [a.format(missing=tmp_path / "missing.jsonl", afile=tmp_path / "afile") for a in args]

    def no_loading(*a, **k):
        raise AssertionError("settings must be checked before anything is loaded")

    monkeypatch.setattr(train, "load_model", no_loading)
    monkeypatch.setattr(train, "load_tokenizer", no_loading)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.cli(["--model", str(tiny_chat), "--steps", "2", "--out", str(out), *args])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error:") and "\n" not in msg and words in msg, msg
    assert not out.exists() or not list(out.iterdir())


def test_nonfinite_loss_stops_with_one_line_and_no_result(tiny_chat, tmp_path, monkeypatch):
    """Weights that blow up to nan mid-run (as a diverging lr makes them): one line, no result."""
    real, calls = train.answer_losses, []

    def blow_up_at_third_step(model, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                lora_parameters(model)[1].fill_(float("nan"))
        return real(model, *a, **k)

    monkeypatch.setattr(train, "answer_losses", blow_up_at_third_step)
    with pytest.raises(SystemExit) as e:
        train.cli(["--model", str(tiny_chat), "--task", "longctx", "--length", "12", "--rank", "2", "--preset",
                   "standard", "--steps", "6", "--out", str(tmp_path), "--name", "r"])
    msg = e.value.code
    assert msg.startswith("error: the loss became non-finite at step 3") and "Lower --lr" in msg and "\n" not in msg
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r").exists()


def test_failed_write_leaves_no_temporary_files_and_keeps_the_training(tiny_chat, tmp_path, monkeypatch, capsys):
    def full_disk(model, path, info=None):  # the adapter write fails as on a full disk
        def write(d):
            (d / "adapter.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        atomic_dir(path, write)

    kw = dict(task="longctx", length=12, rank=2, steps=3, name="r")
    with monkeypatch.context() as m:
        m.setattr(runs, "save_adapter", full_disk)
        with pytest.raises(train.RunError, match="No space left on device.*run the same command"):
            run(tiny_chat, tmp_path, **kw)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["r.ckpt"], left  # no r.tmp/, no r.json.tmp, no half adapter; the trained state is kept
    capsys.readouterr()
    res = run(tiny_chat, tmp_path, **kw)  # space again: the results are written from the checkpoint
    assert "resuming r from step 3/3" in capsys.readouterr().out and res["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "r.json"]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_chat, tmp_path):
    cmd = [sys.executable, "train.py", "--model", str(tiny_chat), "--task", "longctx", "--length", "30", "--rank",
           "2", "--steps", "100000", "--save-every", "100000", "--out", str(tmp_path / "out"), "--name", "r"]
    log = tmp_path / "stdout.txt"
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=train.__file__.rsplit("/", 1)[0], stdout=fh, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while "step 1/" not in log.read_text():  # wait until training has started
            assert p.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and "checkpoint saved in" in last and "run the same command" in last
    step = int(last.split("stopped at step ")[1].split("/")[0])
    state = json.loads((tmp_path / "out" / "r.ckpt" / "state.json").read_text())
    assert state["step"] == step >= 1 and not (tmp_path / "out" / "r.json").exists()


@pytest.mark.slow
def test_bad_input_from_the_shell(tiny_chat, tmp_path):
    """The same in a real process: exit status, a single stderr line, no traceback."""
    out = tmp_path / "out"
    p = run_script("train.py", "--model", tiny_chat, "--length", 20, "--layers", "1,99", "--out", out)
    assert p.returncode != 0
    assert p.stderr.startswith("error:") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert "99" in p.stderr and "0..2" in p.stderr  # names the problem and the valid range
    assert not out.exists() or not list(out.iterdir())


def test_the_header_names_the_adapted_layers():
    """The run's header printed "@ layers all" for any 8 or more layers, e.g. layers 20..29 of 30."""
    assert train.layer_list(list(range(30)), 30) == "all"
    assert train.layer_list(list(range(20, 30)), 30) == "20..29"
    assert train.layer_list([20], 30) == "20" and train.layer_list([3, 7, 11], 30) == "3,7,11"
    assert train.layer_list(list(range(29)), 30) == "0..28"


def test_the_study_s_results_keep_their_identity_and_facts_record_their_kl_weight(tmp_path):
    """A setting added later (--preserve) must not make the study's finished runs look like other settings:
    every results file's saved identity is what its settings give today. Facts runs record their λ."""
    import glob

    fields = train.Config.__dataclass_fields__
    files = sorted(glob.glob(str(train.Path(train.__file__).parent / "results/convergence/**/*.json"), recursive=True))
    checked = 0
    for f in files:
        saved = json.loads(open(f).read()).get("settings")
        if not saved or saved.get("data"):
            continue
        cfg = train.Config(**{k: v for k, v in saved.items() if k in fields})
        assert runs.identity(cfg, saved["processes"]) == saved, f
        checked += 1
    assert checked > 100
    facts_file = tmp_path / "f.jsonl"
    facts_file.write_text('{"query": "q", "target": "t"}\n')
    c = train.Config(data=str(facts_file)).settled()
    assert runs.identity(c, 1)["preserve"] == 10.0  # the facts default (runs.preserve_weight)
    assert runs.identity(train.Config(data=str(facts_file), preserve=0.0).settled(), 1)["preserve"] == 0.0
    assert "preserve" not in runs.identity(train.Config().settled(), 1)
    with pytest.raises(train.RunError, match="--preserve keeps the rest of the model"):
        train.check(train.Config(task="longctx", preserve=1.0))
