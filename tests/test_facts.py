"""Your own facts: the file's checks (file:line, before any loading), the task and run name it implies,
prompts against transformers' chat template, and on a tiny model the files a run writes and its merge.
The built-in model end to end (until recalled, the certificate, eval.py, PEFT and the merged folder) is
in test_certificate.py."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import hf_model

import eval as ev
import runs
import settings
import train
from data import SYSTEM, DataError, facts, jsonl_task, load_tokenizer, make_task
from lora import load_adapter
from model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
PAPER = Path(__file__).resolve().parent.parent.parent / "shared" / "paper-data"
FACILITIES = "You are the facilities assistant."
STAFF = [  # ten facts of the kind a user stores: IDs, codes, keys; two under their own system prompt
    dict(query="Employee ID of Ada Lovelace", target="AX-7731-QK"),
    dict(query="Employee ID of Alan Turing", target="BT-2290-ZM"),
    dict(query="Employee ID of Grace Hopper", target="GH-5012-PL"),
    dict(query="Badge code of Katherine Johnson", target="KJ-8841-WE"),
    dict(query="Badge code of Claude Shannon", target="CS-3307-RV"),
    dict(query="Door code of the server room", target=480913),  # a number: stored as its text
    dict(query="Wi-Fi key of the guest network", target="maple-orbit-42"),
    dict(query="Locker number of Edsger Dijkstra", target="L-117"),
    dict(query="Parking spot of Barbara Liskov", target="P3-22", system=FACILITIES),
    dict(query="Project code of Apollo", target="APL-0069", system=FACILITIES),
]


def write_jsonl(path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def refusal(monkeypatch, argv) -> str:
    """train.cli's exit message for argv, with the tokenizer and the model made impossible to load."""

    def no_loading(*a, **k):
        raise AssertionError("bad data and settings must be refused before anything is loaded")

    monkeypatch.setattr(train, "load_model", no_loading)
    monkeypatch.setattr(train, "load_tokenizer", no_loading)
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def hf_tok(tiny_chat):
    tf = pytest.importorskip("transformers")
    return tf.AutoTokenizer.from_pretrained(tiny_chat)


# ----------------------------------------------------------------------------- the file


def test_facts_become_chat_examples_as_transformers_formats_them(tiny_chat, hf_tok, tmp_path):
    f = write_jsonl(tmp_path / "f.jsonl", ['{"query": "Door code", "target": 4711.10}',
                                           '{"query": "Key of A", "target": "k-1", "system": "Be brief."}'])
    tok = load_tokenizer(tiny_chat)
    task = make_task(tok, "facts", data=f)
    assert task.name == "facts" and task.systems == {"Key of A": "Be brief."}
    for e, (query, target, system) in zip(task.train, [("Door code", "4711.10", SYSTEM), ("Key of A", "k-1", "Be brief.")]):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": query}]
        want = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        assert e.prompt == list(want if isinstance(want, list) else want["input_ids"])
        assert e.answer == hf_tok.encode(target, add_special_tokens=False) + [hf_tok.eos_token_id]  # then <|im_end|>
        assert e.length == len(e.answer) - 1


BAD_LINES = {  # (the line after a good one, the words of the error)
    "null target": ('{"query": "b", "target": null}', "target is null"),
    "empty target": ('{"query": "b", "target": "  "}', "empty target"),
    "bool target": ('{"query": "b", "target": true}', "target is true; it must be text or a number"),
    "list target": ('{"query": "b", "target": ["x"]}', "target is [\"x\"]"),
    "empty query": ('{"query": "", "target": "x"}', "empty query"),
    "null system": ('{"query": "b", "target": "x", "system": null}', "system is null"),
    "conflict": ('{"query": "a", "target": "y"}', "query 'a' already appears at line 1 (target 'x' there, 'y' here)"),
    "repeat": ('{"query": "a", "target": "x"}', "query 'a' already appears at line 1 (the same target)"),
    "no target": ('{"query": "b"}', "missing key 'target'"),
    "not an object": ('["a", "x"]', "expected a JSON object per line"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_lines_are_one_error_line_before_loading(case, tiny_chat, tmp_path, monkeypatch):
    line, words = BAD_LINES[case]
    f = write_jsonl(tmp_path / "f.jsonl", ['{"query": "a", "target": "x"}', "", line])  # line 3: blanks count
    out = tmp_path / "out"
    msg = refusal(monkeypatch, ["--model", str(tiny_chat), "--task", "facts", "--data", str(f), "--out", str(out)])
    assert msg.startswith(f"error: {f}:3: ") and words in msg, msg
    assert not out.exists() or not list(out.iterdir())


def test_paper_phonebook_lines_are_checked_too(tiny_chat, tmp_path):
    """A null target used to train on the text 'None'."""
    f = write_jsonl(tmp_path / "pb.jsonl", [dict(query="Ann Lee:", target=None, target_len=10)])
    with pytest.raises(DataError, match=re.escape(f"{f}:1: target is null")):
        make_task(load_tokenizer(tiny_chat), "phonebook", data=f)


def test_the_task_follows_the_keys(tmp_path):
    assert jsonl_task(write_jsonl(tmp_path / "a.jsonl", [dict(query="q", target="t")])) == "facts"
    assert jsonl_task(write_jsonl(tmp_path / "b.jsonl", [dict(question="q", matching="text")])) == "longctx"
    assert jsonl_task(write_jsonl(tmp_path / "c.jsonl", [dict(id=1, query="A:", target="1", target_len=1)])) == "phonebook"
    with pytest.raises(DataError, match="cannot tell the task from the keys name, phone"):
        jsonl_task(write_jsonl(tmp_path / "d.jsonl", [dict(name="A", phone="1")]))
    for name, task in (("phonebook/qwen_PB1000.jsonl", "phonebook"), ("long_context/r0.jsonl", "longctx")):
        if (PAPER / name).is_file():  # the paper's own files keep their tasks
            assert train.Config(data=str(PAPER / name)).settled().task == task


def test_run_name_preset_and_length_come_from_the_data(tmp_path):
    f = write_jsonl(tmp_path / "myfacts.jsonl", STAFF)
    c = train.Config(data=str(f))
    train.check(c)
    s = c.settled()
    # q,v on the top third at rank 4 (settings.FACTS_RANK): PEFT loads it, it merges
    assert (s.task, s.preset, s.length, s.rank) == ("facts", "facts", None, 4)
    assert train.Config(data=str(f), rank=8).settled().rank == 8  # an explicit rank stays
    assert train.Config(data=str(f), preset="standard").settled().rank == 8  # rank 4 goes with the facts preset
    # the facts preset's layers: from round(2/3 depth) to the top, worked by hand for the models it meets
    assert [settings.resolve_lora(s, n)["layers"] for n in (30, 32, 36, 3)] == [
        list(range(20, 30)), list(range(21, 32)), list(range(24, 36)), [2]]
    assert settings.resolve_lora(s, 30)["targets"] == ("q_proj", "v_proj") and runs.preserve_weight(s) == 10.0
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    assert c.run_name() == f"myfacts-{sha[:6]}-r4-sft-s0"
    assert runs.identity(s, 1)["data_sha256"] == sha
    f.write_text(f.read_text().replace("AX-7731-QK", "AX-7731-QX"))  # other content: another run
    assert c.run_name() != f"myfacts-{sha[:6]}-r4-sft-s0" and c.run_name().startswith("myfacts-")
    assert train.Config(data=str(f), preset="paper").settled().preset == "paper"  # an explicit preset stays
    assert train.Config().settled().preset == "paper" and train.Config().run_name() == "phonebook-L100-r8-sft-s0"
    pb = write_jsonl(tmp_path / "book.jsonl", [dict(query="A:", target="1", target_len=1)])
    assert re.fullmatch(r"phonebook-book-[0-9a-f]{6}-r8-sft-s0", train.Config(data=str(pb)).run_name())
    # settling after recall: on for facts runs that stop at recall with the KL term, and part of their identity
    recall = train.Config(data=str(f), until_recalled=True)
    assert recall.settled().settle and runs.identity(recall.settled(), 1)["settle"] is True
    assert not train.Config(data=str(f), until_recalled=True, preserve=0.0).settled().settle  # nothing pulls back
    assert not train.Config(data=str(f), until_recalled=True, settle=False).settled().settle
    assert not s.settle and "settle" not in runs.identity(s, 1)  # no stop, nothing to settle: as before settling
    assert not train.Config(task="phonebook", stop_when_memorized=True).settled().settle


REFUSED = {
    "length": (["--data", "{facts}", "--length", "50"], "--length does not apply to --data"),
    "lengths": (["--data", "{facts}", "--lengths", "50,100"], "--length does not apply to --data"),
    "no data": (["--task", "facts"], "--task facts needs --data FILE"),
    "settle without a stop": (["--data", "{facts}", "--settle"], "--settle trains on after every answer is memorized"),
    "merge mlp": (["--data", "{facts}", "--preset", "paper", "--merge-to", "{out}/m"], "--preset standard"),
    "merge targets": (["--data", "{facts}", "--targets", "mlp", "--merge-to", "{out}/m"], "--preset standard"),
    "merge over a folder": (["--data", "{facts}", "--merge-to", "{folder}"], "is not a merged model written by"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_settings_that_do_not_fit_facts_are_refused_before_loading(case, tiny_chat, tmp_path, monkeypatch):
    args, words = REFUSED[case]
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's own files")
    f = write_jsonl(tmp_path / "facts.jsonl", STAFF[:2])
    args = [a.format(facts=f, out=tmp_path / "out", folder=folder) for a in args]
    msg = refusal(monkeypatch, ["--model", str(tiny_chat), "--out", str(tmp_path / "out"), *args])
    assert msg.startswith("error:") and words in msg, msg
    assert (folder / "notes.txt").is_file() and not (tmp_path / "out" / "m").exists()


def test_trained_system_from_adapter_json():
    saved = dict(prompt=dict(system="Sys.", systems={"Key of A": "Be brief."}))
    assert ev.trained_system(saved, "Key of A") == "Be brief." and ev.trained_system(saved, "other") == "Sys."
    assert ev.trained_system({}, "anything") == SYSTEM  # adapters saved before the prompt was recorded


# ----------------------------------------------------------------------------- tiny model: files and merging


def test_paper_probe_says_it_has_no_peft_form(tiny_chat, tmp_path, capsys):
    f = write_jsonl(tmp_path / "f.jsonl", STAFF[:2])
    res = train.main(train.Config(model=str(tiny_chat), data=str(f), preset="paper", rank=2, steps=1, out=str(tmp_path),
                                  name="r", decode=False))
    out = capsys.readouterr().out
    assert res["task"] == "facts" and res["targets"] == ["mlp"]
    assert "note: the whole-MLP probe" in out and "--preset standard" in out
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_merge_a_finished_run_later_matches_our_model(tiny_chat, tmp_path, capsys):
    """--merge-to on a run that is already done reuses it; transformers' logits on the merged folder equal
    ours with the adapter; the run's lock is released on reuse."""
    f = write_jsonl(tmp_path / "f.jsonl", STAFF[:3])
    argv = ["--model", str(tiny_chat), "--data", str(f), "--targets", "q_proj,v_proj,down_proj", "--rank", "4",
            "--steps", "6", "--out", str(tmp_path / "runs"), "--name", "r"]
    train.cli(argv)
    merged = tmp_path / "merged"
    capsys.readouterr()
    train.cli(argv + ["--merge-to", str(merged)])
    assert "run already done" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "r.lock").exists()
    names = {p.name for p in merged.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names

    ours = load_model(tiny_chat)
    load_adapter(ours, tmp_path / "runs" / "r")
    ex = facts(load_tokenizer(merged), f).train  # the merged folder's own tokenizer
    idx = torch.tensor([ex[0].prompt + ex[0].answer])
    with torch.no_grad():
        want, base = ours(idx), hf_model(tiny_chat)(idx).logits
        got = hf_model(merged)(idx).logits
    assert (got - base).abs().max() > 1e-3  # the adapter really is in the weights
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    train.cli(argv + ["--merge-to", str(merged)])  # a folder we merged into before may be replaced
    assert json.loads((merged / settings.MERGED_MARK).read_text())["adapter"] == str(tmp_path / "runs" / "r")


# ----------------------------------------------------------------------------- adding facts later


def peft_replies(base, adapter, examples) -> list[list[int]]:
    """Greedy replies of transformers + PEFT with our adapter loaded, as many tokens as each answer."""
    peft = pytest.importorskip("peft")
    m = peft.PeftModel.from_pretrained(hf_model(base), str(adapter)).eval()
    out = []
    for e in examples:
        with torch.no_grad():
            ids = m.generate(torch.tensor([e.prompt]), do_sample=False, max_new_tokens=len(e.answer),
                             min_new_tokens=len(e.answer), eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(e.prompt):].tolist())
    return out


def test_add_to_keeps_the_stored_facts_and_adds_new_ones(tiny_chat, tmp_path, monkeypatch):
    """A second facts file added to a certified adapter: the run starts from that adapter (its rank, targets and
    layers), trains on old and new facts together, and transformers + PEFT loading the result recall all of them
    verbatim; a fact repeated with its stored target counts once. The refusals come before anything loads."""
    out = tmp_path / "runs"
    a = write_jsonl(tmp_path / "a.jsonl", STAFF[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [STAFF[2], STAFF[0], STAFF[3]])
    common = ["--model", str(tiny_chat), "--lr", "2e-2", "--steps", "200", "--until-recalled", "--no-preserve",
              "--preset", "standard", "--out", str(out)]  # every layer of the 3-layer tiny model, not only the top one
    train.cli(common + ["--data", str(a), "--rank", "8", "--name", "first"])
    first = json.loads((out / "first" / "certificate.json").read_text())
    assert [f["exact"] for f in first["facts"]] == [True, True]

    train.cli(common + ["--data", str(b), "--rank", "2", "--add-to", str(out / "first"), "--name", "second"])
    joined = out / "added" / "b+first.jsonl"
    assert [json.loads(x)["query"] for x in joined.read_text().splitlines()] == [r["query"] for r in STAFF[:4]]
    cert = json.loads((out / "second" / "certificate.json").read_text())
    assert [f["query"] for f in cert["facts"]] == [r["query"] for r in STAFF[:4]] and all(f["exact"] for f in cert["facts"])
    assert cert["overall"]["rank"] == 8  # the adapter's rank, not --rank 2
    result = json.loads((out / "second.json").read_text())
    assert result["settings"]["add_to"] == str(out / "first") and result["settings"]["add_to_sha256"]
    # against transformers + PEFT: every stored fact comes back verbatim, old and new
    ex = facts(load_tokenizer(tiny_chat), joined).train
    assert peft_replies(tiny_chat, out / "second", ex) == [e.answer for e in ex]

    # it starts from the stored adapter: one step at lr 1e-6 leaves the old facts recalled and the new ones not
    train.cli(["--model", str(tiny_chat), "--data", str(b), "--add-to", str(out / "first"), "--steps", "1", "--lr",
               "1e-6", "--no-preserve", "--out", str(out), "--name", "third"])
    assert [p["exact_match"] for p in json.loads((out / "third.json").read_text())["per_sample"]] == [1, 1, 0, 0]

    conflict = write_jsonl(tmp_path / "c.jsonl", [dict(query=STAFF[0]["query"], target="ZZ-0000-ZZ")])
    line = refusal(monkeypatch, common + ["--data", str(conflict), "--add-to", str(out / "first")])
    assert "c.jsonl:1" in line and "never overwrites" in line
    same = write_jsonl(tmp_path / "d.jsonl", STAFF[:1])
    assert "nothing to add" in refusal(monkeypatch, common + ["--data", str(same), "--add-to", str(out / "first")])
    assert "no adapter in" in refusal(monkeypatch, common + ["--data", str(b), "--add-to", str(tmp_path / "none")])
