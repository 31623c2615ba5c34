"""Bad input that used to get through (issue #25): a huge facts line, a fact longer than the model's context,
a lock left by a killed run, damaged or altered adapters, --steps 0, an absurd --lr, and merged/ in git.
Each is refused, or warned about, in one line before anything slow loads."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tracemalloc
from contextlib import contextmanager

import pytest
import torch
from conftest import ROOT, run_script
from test_facts import STAFF, refusal, write_jsonl

import eval as ev
import runs
import settings
import train
from data import DataError, chat_prompt, facts, load_tokenizer, make_task, read_facts
from lora import LoraError, add_lora, load_adapter, lora_modules, save_adapter
from model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts the block after `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- facts files


def test_a_huge_line_is_refused_with_its_line_without_reading_it_whole(tiny_chat, tmp_path, monkeypatch):
    """One 10 MB line used to be read whole, accepted, and trained until memory ran out (leaving a lock)."""
    huge = json.dumps(dict(query="Door code", target="7" * 10_000_000))
    f = write_jsonl(tmp_path / "f.jsonl", [STAFF[0], huge, STAFF[1]])
    out = tmp_path / "out"
    with deadline(30):
        msg = refusal(monkeypatch, ["--model", str(tiny_chat), "--data", str(f), "--out", str(out)])
        assert msg.startswith(f"error: {f}:2: line longer than ") and "characters" in msg, msg
        tracemalloc.start()
        with pytest.raises(DataError, match=f"{f}:2: line longer than 65,536 characters"):
            read_facts(f)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 2_000_000, f"read {peak:,} bytes at once: the line was read whole"  # the line is 10,000,035
    assert not out.exists() or not list(out.iterdir())  # refused before the run was claimed: no lock


def test_a_fact_longer_than_the_context_is_refused_before_the_weights_load(tiny_chat, tmp_path, monkeypatch):
    """tiny_chat's config.json says max_position_embeddings 512. Digits are one token each, so a target of
    k digits takes k + 1 answer tokens (end-of-turn): it fits while len(prompt) + k + 1 <= 512."""
    tok = load_tokenizer(tiny_chat)
    assert tok.context == 512 and len(tok.encode("7" * 100)) == 100
    k = 512 - len(chat_prompt(tok, "Long code")) - 1  # the longest target that fits
    fits = write_jsonl(tmp_path / "fits.jsonl", [STAFF[0], dict(query="Long code", target="7" * k)])
    assert len(facts(tok, fits).train[1].prompt + facts(tok, fits).train[1].answer) == 512
    f = write_jsonl(tmp_path / "f.jsonl", [STAFF[0], dict(query="Long code", target="7" * (k + 1))])
    with pytest.raises(DataError, match=f"{f}:2: the prompt and answer take 513 tokens, more than the model's "
                                        f"context of 512"):
        facts(tok, f)
    with pytest.raises(DataError, match="--length 600: the prompt and answer take .* context of 512"):
        make_task(tok, "longctx", 600, noise=1.0)

    def no_weights(*a, **k):
        raise AssertionError("an over-long fact must be refused before the model loads")

    monkeypatch.setattr(train, "load_model", no_weights)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.cli(["--model", str(tiny_chat), "--data", str(f), "--out", str(out)])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith(f"error: {f}:2: the prompt and answer take 513 tokens"), msg
    assert "\n" not in msg and not list(out.glob("*.lock"))  # and the run's lock is released


# ----------------------------------------------------------------------------- locks


def test_a_lock_left_by_a_killed_run_does_not_block_the_next_launch(tmp_path, capsys):
    """SIGKILL (as the OOM killer sends) leaves the lock file behind; the OS has dropped its flock."""
    lock = tmp_path / "r.lock"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; import runs; "
            f"runs.RunLock(Path({str(lock)!r})).acquire(); print('locked', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        with deadline(60):
            assert p.stdout.readline().strip() == "locked"
    finally:
        p.kill()
        p.wait(timeout=30)
    assert lock.read_text().split()[0] == str(p.pid)  # left behind, naming the dead process
    with deadline(10):
        held = runs.RunLock(lock)
        held.acquire()
    err = capsys.readouterr().err
    assert f"note: {lock} was left by process {p.pid}, which ended without releasing it" in err, err
    assert lock.read_text().split()[0] == str(os.getpid())
    held.release()
    assert not lock.exists()


def test_a_lock_still_held_after_its_taker_ended_says_so(tmp_path):
    """A process the run started can keep its flock after the run itself died: the message must not call
    the dead process the one running."""
    import fcntl

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock = tmp_path / "r.lock"
    holder = open(lock, "a+")  # the surviving child's copy of the lock
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write(f"{gone.pid} {socket.gethostname()}\n")
    holder.flush()
    try:
        with pytest.raises(settings.RunError, match=f"held, but process {gone.pid}, which took it, has ended"):
            runs.RunLock(lock).acquire()
    finally:
        holder.close()


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def saved(tiny_chat, tmp_path_factory):
    """An adapter on tiny_chat with random B (so it changes the replies), saved as train.py saves one."""
    m = load_model(tiny_chat)
    add_lora(m, rank=2, targets=("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter") / "a"
    save_adapter(m, path, dict(base_model=str(tiny_chat)))
    return path


def damaged(saved, tmp_path, how):
    path = tmp_path / "a"
    shutil.copytree(saved, path)
    how(path)
    return path


def truncate(path, keep=50):
    """adapter.safetensors cut short, as an interrupted copy leaves it (by default inside its JSON header)."""
    f = path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[: keep or f.stat().st_size // 2])


DAMAGE = {  # how the folder is damaged -> the words of the one line
    "truncated weights": (truncate, "adapter.safetensors is damaged (Error while deserializing: invalid header length"),
    "half-copied weights": (lambda p: truncate(p, keep=0), "adapter.safetensors is damaged (Error while deserializing"),
    "broken adapter.json": (lambda p: (p / "adapter.json").write_text('{"rank": 2, "targ'),
                            "adapter.json is damaged (not valid JSON at line 1)"),
    "missing weights": (lambda p: (p / "adapter.safetensors").unlink(), "adapter.safetensors is missing"),
    "adapter.json without rank": (
        lambda p: (p / "adapter.json").write_text(json.dumps({k: v for k, v in json.loads(
            (p / "adapter.json").read_text()).items() if k != "rank"})), "adapter.json has no 'rank'"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_adapter_is_one_line_naming_the_file(case, saved, tiny_chat, tmp_path, monkeypatch):
    how, words = DAMAGE[case]
    path = damaged(saved, tmp_path, how)

    def no_loading(*a, **k):
        raise AssertionError("a damaged adapter must be refused before the model loads")

    monkeypatch.setattr(ev, "load_model", no_loading)
    with pytest.raises(LoraError) as e:
        ev.reply(str(tiny_chat), "Hi", 4, adapter=path)
    msg = str(e.value)
    assert msg.startswith(f"{path}/{words}"), msg
    assert "\n" not in msg and ("retrain" in msg or "copy" in msg)


def test_eval_prompt_on_a_truncated_adapter_prints_one_line(saved, tiny_chat, tmp_path):
    path = damaged(saved, tmp_path, truncate)
    r = run_script("eval.py", "--model", tiny_chat, "--adapter", path, "--prompt", "Hi", "--max-new-tokens", "2",
                   timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {path}/adapter.safe")


@pytest.mark.parametrize("content,words", [('{"task": "facts", "len', "not valid JSON at line 1"),
                                           ("[1, 2]", "a JSON list, not an object")])
def test_eval_metrics_on_a_damaged_results_file_prints_one_line(saved, tiny_chat, tmp_path, content, words):
    """eval.py --adapter runs/NAME reads the run's settings from runs/NAME.json; a damaged one is one line."""
    path = damaged(saved, tmp_path, lambda p: None)
    (tmp_path / "a.json").write_text(content)
    r = run_script("eval.py", "--model", tiny_chat, "--adapter", path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == r.stderr.strip().splitlines()[0]
    assert r.stderr.startswith(f"error: {tmp_path / 'a.json'} is damaged ({words}") and "--task" in r.stderr


def test_an_altered_adapter_is_refused_and_an_old_one_still_loads(saved, tiny_chat, tmp_path):
    """adapter.json records the sha256 of adapter.safetensors; an adapter saved before it did still loads."""
    from safetensors.torch import load_file, save_file

    path = damaged(saved, tmp_path, lambda p: None)
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((path / "adapter.safetensors").read_bytes()).hexdigest()
    sd = load_file(str(path / "adapter.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B"))
    sd[key] = sd[key] * 3  # a valid file, other weights: garbage replies, and exit 0, before
    save_file(sd, str(path / "adapter.safetensors"))
    with pytest.raises(LoraError, match="adapter.safetensors does not match the sha256 that adapter.json records.*"
                                        "Retrain the adapter"):
        ev.reply(str(tiny_chat), "Hi", 4, adapter=path)
    with pytest.raises(LoraError, match="does not match the sha256"):
        load_adapter(load_model(tiny_chat), path)

    # Saved before the checksum existed: no key, loaded as it is.
    (path / "adapter.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    m = load_model(tiny_chat)
    cfg = load_adapter(m, path)
    assert "weights_sha256" not in cfg and torch.equal(m.get_submodule(key.rsplit(".", 1)[0]).lora_B, sd[key])


def test_an_adapter_for_another_model_names_the_file_and_the_shape(saved, tiny_chat, tiny_qwen3):
    """tiny_chat is a Llama with 4 heads of 16 (q_proj out 64); tiny_qwen3 has heads of 32 (q_proj out 128)."""
    with pytest.raises(LoraError) as e:
        load_adapter(load_model(tiny_qwen3), saved)
    msg = str(e.value)
    assert msg == (f"{saved}/adapter.safetensors does not fit this model: tensor model.layers.0.self_attn.q_proj.lora_B "
                   f"has shape (64, 2), the model's is (128, 2) (it was trained on {tiny_chat})"), msg


# ----------------------------------------------------------------------------- settings


def test_steps_0_is_refused_on_the_command_line(tiny_chat, tmp_path, monkeypatch):
    """It used to train nothing and write a result with ΔL 0."""
    for steps in ("0", "-3"):
        msg = refusal(monkeypatch, ["--model", str(tiny_chat), "--steps", steps, "--out", str(tmp_path)])
        assert msg.startswith(f"error: --steps must be 1 or more, got {steps}"), msg
    assert not list(tmp_path.iterdir())


def test_an_lr_far_outside_the_studied_range_warns_once_and_runs_on(monkeypatch, capsys):
    monkeypatch.setattr(settings, "_warned", set(), raising=False)
    for lr in (1e-2, 2e-2, 1e-6, 1.0):
        settings.check(settings.Config(lr=lr))
    assert capsys.readouterr().err == ""
    for _ in range(2):  # a sweep or --until-recalled checks the same settings again
        settings.check(settings.Config(lr=1e30))  # not refused: it runs
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --lr 1e+30 is far outside 1e-6..1; the study trained at "
                                               "1e-2"), err
    settings.check(settings.Config(lr=1e-7))
    assert capsys.readouterr().err.startswith("warning: --lr 1e-07 is far outside")


def test_merged_models_are_not_tracked_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("merged/config.json", "merged/staff/model.safetensors", "merged/staff/tokenizer.json"):
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert r.returncode == 0, f"{path} is not ignored"
