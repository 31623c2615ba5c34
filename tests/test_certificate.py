"""Train until recalled, with a certificate. On the built-in model, ten facts end to end: the certificate
says exact for all, and our decoder, PEFT's generate and the merged folder in transformers each give back
every target; the certificate's probabilities, margins, perplexities and general answers equal what
transformers computes; eval.py --certify passes on it and fails once the facts file changes. On a tiny
model: --rank auto grows the rank while the budget runs out, up to the modules' width, and a rerun
reuses the finished attempts. Bad options are refused before anything loads."""

import json
import math
import time

import pytest
import torch
from conftest import hf_model, run_script
from test_facts import STAFF, refusal, write_jsonl

import convert
import eval as ev
import facts
import settings
import train
from data import PROSE, load_tokenizer, read_facts
from data import facts as facts_task

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- refused before loading

REFUSED = {
    "auto without until-recalled": (["--rank", "auto"], "--rank auto grows the rank until every fact is recalled; "
                                                        "add --until-recalled"),
    "max-rank without auto": (["--until-recalled", "--max-rank", "16"], "--max-rank applies to --rank auto only"),
    "plan-from without auto": (["--until-recalled", "--plan-from", "r/*.json"], "--plan-from applies to --rank auto"),
    "max-rank 0": (["--until-recalled", "--rank", "auto", "--max-rank", "0"], "--max-rank must be a positive integer"),
    "empty plan-from": (["--until-recalled", "--rank", "auto", "--plan-from", " "], "--plan-from takes a glob"),
    "no decoder": (["--until-recalled", "--no-decode"], "drop --no-decode"),
    "not facts": (["--until-recalled", "--data", "{book}"], "--until-recalled certifies your own facts"),
    "sweep": (["--until-recalled", "--ranks", "2,4"], "drop the sweep lists"),
    "auto in a sweep": (["--rank", "auto", "--until-recalled", "--seeds", "0,1"], "drop the sweep lists"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_bad_options_are_one_line_before_loading(case, tiny_chat, tmp_path, monkeypatch):
    args, words = REFUSED[case]
    f = write_jsonl(tmp_path / "facts.jsonl", STAFF[:2])
    book = write_jsonl(tmp_path / "book.jsonl", [dict(query="A:", target="1", target_len=1)])
    args = [a.format(book=book) for a in args]
    data = [] if "--data" in args else ["--data", str(f)]
    msg = refusal(monkeypatch, ["--model", str(tiny_chat), "--out", str(tmp_path / "out"), *data, *args])
    assert msg.startswith("error:") and words in msg, msg
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_rank_must_be_a_number_or_auto(capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse(["--rank", "big"], train.__doc__)
    assert e.value.code == 2 and "expected an integer or auto, got 'big'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --rank auto on a tiny model


def test_width_is_the_narrowest_side_of_the_adapted_modules(tiny_chat):
    """Read from config.json alone, checked against transformers' own modules."""
    layer = hf_model(tiny_chat).model.layers[0]
    shape = {t: getattr(layer.self_attn if t in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, t).weight.shape
             for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    for targets in (("q_proj", "v_proj"), ("q_proj", "o_proj"), ("gate_proj", "down_proj")):
        assert facts.module_width(str(tiny_chat), targets) == min(min(shape[t]) for t in targets)
    assert facts.module_width(str(tiny_chat), ("mlp",)) == layer.mlp.down_proj.weight.shape[0]  # the hidden width


def test_rank_ladder_doubles_up_to_the_cap():
    assert facts.rank_ladder(1, 8) == [1, 2, 4, 8]
    assert facts.rank_ladder(3, 64) == [3, 6, 12, 24, 48, 64]  # the last step lands on the cap
    assert facts.rank_ladder(100, 32) == [32] and facts.rank_ladder(32, 32) == [32]


def test_no_plan_starts_from_rank_4(tiny_chat, tmp_path):
    """No results to plan from: the planner refuses, and --rank auto says why."""
    cfg = train.Config(model=str(tiny_chat), rank="auto", until_recalled=True,
                       plan_from=str(tmp_path / "none" / "*.json"))
    plan = facts.planned_rank(cfg, tokens=74, width=192)
    assert plan["rank"] == facts.FIRST_RANK == 4 and plan["planned"] is None and plan["reason"]
    line = facts.plan_line(plan, 74)
    assert line.startswith("the planner cannot plan (") and line.endswith("starting from rank 4")


def planner_at(rank: int):
    """A stand-in for planner.plan_recall that always plans `rank` (the growth, not the planner, is under test)."""
    return lambda paths, tokens, width, **which: dict(rank=rank, fit="stand-in", group="stand-in", runs=[])


def auto_argv(tiny_chat, data, out, *more):  # every layer of the 3-layer tiny model (the facts preset adapts only the top one)
    return ["--model", str(tiny_chat), "--data", str(data), "--rank", "auto", "--until-recalled", "--lr", "5e-2",
            "--schedule", "constant", "--eval-every", "1", "--preset", "standard", "--out", str(out), *more]


@pytest.mark.slow
def test_rank_auto_grows_until_recalled(tiny_chat, tmp_path, monkeypatch, capsys):
    """Rank 1 cannot store three facts in 60 steps; the rank doubles until an attempt recalls them all."""
    import planner

    monkeypatch.setattr(planner, "plan_recall", planner_at(1), raising=False)
    # The growth is under test, not locality's KL term: on this random tiny model the term holds the adapter back
    # (rank 8 then recalls 1 of 3 in 60 steps), so --no-preserve leaves it out here.
    f = write_jsonl(tmp_path / "three.jsonl", STAFF[:3])
    argv = auto_argv(tiny_chat, f, tmp_path / "runs", "--steps", "60", "--max-rank", "8", "--no-preserve")
    cfg = settings.parse(argv, train.__doc__)[0]
    cert = facts.until_recalled(cfg, train.main)
    out = capsys.readouterr().out
    tries = cert["overall"]["attempts"]
    assert [a["rank"] for a in tries] == [1, 2, 4, 8][: len(tries)] and len(tries) >= 2, out
    assert all(a["facts_recalled"] < 3 for a in tries[:-1])  # rank 1 among them
    assert tries[-1]["facts_recalled"] == 3 and cert["overall"]["rank"] == tries[-1]["rank"]
    assert all(x["exact"] for x in cert["facts"]) and cert["plan"]["fit"] == "stand-in"
    for i, a in enumerate(tries, 1):  # each attempt reported, and each one a run of its own
        assert f"attempt {i}: rank {a['rank']}, {a['steps']} of 60 steps, {a['facts_recalled']}/3 facts recalled" in out
        assert (tmp_path / "runs" / f"{a['name']}.json").is_file() and f"-r{a['rank']}-" in a["name"]
        run = json.loads((tmp_path / "runs" / f"{a['name']}.json").read_text())
        assert run["preserve"] is None and "kl" not in run["history"][0] and run["settings"]["preserve"] == 0.0
    adapter = tmp_path / "runs" / tries[-1]["name"]
    assert json.loads((adapter / facts.CERTIFICATE).read_text()) == cert


@pytest.mark.slow
def test_rank_auto_stops_at_the_width_and_a_rerun_reuses_the_attempts(tiny_chat, tmp_path, monkeypatch, capsys):
    """One step is too little at any rank: the ladder ends at the modules' width (32 here, v_proj's output),
    not at --max-rank, the run fails with one line, and its certificate still records every attempt."""
    import planner

    monkeypatch.setattr(planner, "plan_recall", planner_at(16), raising=False)
    f = write_jsonl(tmp_path / "three.jsonl", STAFF[:3])
    argv = auto_argv(tiny_chat, f, tmp_path / "runs", "--steps", "1", "--max-rank", "1000", "--name", "mine")
    for run in ("first", "again"):
        with pytest.raises(SystemExit) as e:
            train.cli(argv)
        out = capsys.readouterr().out
        want = "error: 0/3 facts recalled after 2 attempts (the last at rank 32, 1 of 1 steps)"
        assert e.value.code.startswith(want), e.value.code
        assert "ranks to try 16, 32 (cap: --max-rank 1000, width 32)" in out and "doubling the rank to 32" in out
        assert out.count("run already done") == (2 if run == "again" else 0)  # finished attempts are reused
        cert = json.loads((tmp_path / "runs" / "mine-r32" / facts.CERTIFICATE).read_text())
        assert [a["rank"] for a in cert["overall"]["attempts"]] == [16, 32]
        assert cert["overall"]["facts_stored"] == 0 and not any(x["exact"] for x in cert["facts"])


def test_batched_certificate_numbers_equal_one_fact_at_a_time(tiny_chat, tmp_path):
    """fact_reports decodes and measures facts of equal length together; the plain path is generate() and
    token_margins() per fact. Replies, exactness, min p and margins agree (random weights: any replies)."""
    from model import load_model

    f = write_jsonl(tmp_path / "staff.jsonl", STAFF)
    tok = load_tokenizer(str(tiny_chat))
    ex = facts_task(tok, f).train
    assert len({(len(e.prompt), len(e.answer)) for e in ex}) < len(ex)  # some facts do share a batch
    model = load_model(str(tiny_chat))
    model.eval()
    got = facts.fact_reports(model, tok, ex, read_facts(f))
    for e, g in zip(ex, got):
        reply = ev.generate(model, e.prompt, len(e.answer) + 8, eos_id=tok.eos_id)
        p, margin = facts.token_margins(model, e)
        assert g["reply"] == tok.decode(reply, skip_special_tokens=True) and g["exact"] == (reply == e.answer)
        assert g["min_prob"] == pytest.approx(float(p.min()), abs=1e-5)
        assert g["margin"] == pytest.approx(float(margin.min()), abs=1e-5)
        assert (g["min_prob_position"], g["margin_position"]) == (int(p.argmin()), int(margin.argmin()))


# ----------------------------------------------------------------------------- built-in model, end to end


@pytest.fixture(scope="module")
def staff_run(tmp_path_factory):
    """Ten facts trained until recalled on the built-in model (the facts preset, rank 8), with --merge-to. It stops
    at recall (--no-settle): settling is tested in test_train, and stopping halves this fixture's steps."""
    try:
        convert.find_gguf()
    except convert.ConvertError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("staff")
    f = write_jsonl(tmp / "staff.jsonl", STAFF)
    t0 = time.perf_counter()
    train.cli(["--data", str(f), "--rank", "8", "--lr", "2e-2", "--steps", "60", "--until-recalled",
               "--no-settle", "--eval-every", "5", "--out", str(tmp / "runs"), "--merge-to", str(tmp / "merged")])
    print(f"trained and certified in {time.perf_counter() - t0:.1f}s")
    name = train.Config(data=str(f), rank=8).run_name()
    res = json.loads((tmp / "runs" / f"{name}.json").read_text())
    cert = json.loads((tmp / "runs" / name / facts.CERTIFICATE).read_text())
    targets = [str(r["target"]) for r in STAFF]
    return dict(res=res, cert=cert, adapter=tmp / "runs" / name, merged=tmp / "merged", data=f, targets=targets,
                ex=facts_task(load_tokenizer("default"), f).train)


@pytest.mark.slow
def test_certificate_says_every_fact_is_exact(staff_run):
    res, cert = staff_run["res"], staff_run["cert"]
    assert res["stop_reason"] == "memorized" and res["steps"] == res["stopped_at"] < 60  # inside the budget
    assert res["exact_match"] == 1.0
    assert [(x["query"], x["target"], x["exact"], x["reply"]) for x in cert["facts"]] == \
        [(r["query"], t, True, t) for r, t in zip(STAFF, staff_run["targets"])]
    assert all(x["min_prob"] > 0.5 and x["margin"] > 0 for x in cert["facts"])
    o = cert["overall"]
    assert (o["facts_stored"], o["facts"], o["rank"], o["params"]) == (10, 10, 8, res["params"])
    assert o["answer_tokens_stored"] == o["answer_tokens"] == res["length"]  # ℓ: targets' tokens, no end-of-turn
    assert o[facts.BITS] == pytest.approx(res["length"] * math.log2(49152) / res["params"], abs=1e-6)
    assert o["steps"] == res["steps"] and o["attempts"] == [dict(rank=8, name=res["name"], steps=res["steps"],
                                                                 budget=60, facts_recalled=10, facts=10)]
    assert cert["data"]["sha256"] == res["settings"]["data_sha256"] and "margin" in cert["definitions"]


@pytest.mark.slow
def test_certificate_numbers_match_transformers(staff_run):
    """Min p and margin from the merged folder's logits, prose perplexity and the general answers from
    transformers with the base model and with the merged one."""
    tf = pytest.importorskip("transformers")
    cert, ex = staff_run["cert"], staff_run["ex"]
    merged = hf_model(staff_run["merged"])
    for x, e in zip(cert["facts"], ex):
        with torch.no_grad():
            p = torch.softmax(merged(torch.tensor([e.prompt + e.answer[:-1]])).logits[0, len(e.prompt) - 1 :], -1)
        target = p[torch.arange(len(e.answer)), e.answer]
        other = p.clone()
        other[torch.arange(len(e.answer)), e.answer] = 0
        assert x["min_prob"] == pytest.approx(float(target.min()), abs=1e-4)
        assert x["margin"] == pytest.approx(float((target - other.max(-1).values).min()), abs=1e-4)
    base = hf_model(convert.builtin_model_dir())
    tok = tf.AutoTokenizer.from_pretrained(staff_run["merged"])
    s = cert["side_effects"]
    ids = tok(PROSE.read_text(), return_tensors="pt").input_ids[:, : s["prose"]["tokens"]]
    for model, key in ((base, "perplexity_without_adapter"), (merged, "perplexity_with_adapter")):
        with torch.no_grad():
            assert s["prose"][key] == pytest.approx(math.exp(float(model(ids, labels=ids).loss)), rel=1e-4)
    for row in s["prompts"]:
        x = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
        for model, key in ((base, "without_adapter"), (merged, "with_adapter")):
            out = model.generate(**x, max_new_tokens=16, do_sample=False, pad_token_id=2)
            assert tok.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True) == row[key]
        assert row["same"] == (row["with_adapter"] == row["without_adapter"])
    assert s["prompts"][0]["without_adapter"] == "The capital of France is Paris."


@pytest.mark.slow
def test_eval_certify_passes_then_refuses_a_changed_or_missing_file(staff_run):
    adapter, data = staff_run["adapter"], staff_run["data"]
    r = run_script("eval.py", "--adapter", adapter, "--certify")
    assert r.returncode == 0, r.stderr
    assert "stored: 10/10 facts" in r.stdout and "the stored certificate.json agrees" in r.stdout
    original = data.read_text()
    try:
        data.write_text(original.replace("AX-7731-QK", "AX-7731-QX"))
        r = run_script("eval.py", "--adapter", adapter, "--certify")
        assert r.returncode == 1 and r.stderr.strip().startswith(f"error: {data} changed since training"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout
        data.unlink()
        r = run_script("eval.py", "--adapter", adapter, "--certify")
        assert r.returncode == 1 and "the facts file this adapter was trained on is missing" in r.stderr, r.stderr
    finally:
        data.write_text(original)


@pytest.mark.slow
def test_recall_through_eval_uses_the_training_prompt(staff_run, monkeypatch, capsys):
    """Our KV-cached decoder, through eval.py's reply with no --system: every target back."""
    seen = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda m, ids, *a, **k: seen.append(list(ids)) or real(m, ids, *a, **k))
    for row, target, e in zip(STAFF, staff_run["targets"], staff_run["ex"]):
        assert ev.reply(None, row["query"], 32, adapter=staff_run["adapter"]) == target  # no --system
        assert seen[-1] == e.prompt  # the very prompt it was trained on: same system turn, same template
    assert capsys.readouterr().out.splitlines() == staff_run["targets"]  # what the command prints
    # eval.py's metrics mode reads the run's facts file back; with every answer recalled it says so, rather than
    # printing the shortest answer's length as a "first failure"
    res = ev.main(None, str(staff_run["adapter"]))
    assert res["exact_match"] == 1.0 and res["first_failure"] == min(len(e.answer) for e in staff_run["ex"])
    assert "first_failure: none: every answer recalled exactly" in capsys.readouterr().out


@pytest.mark.slow
def test_peft_auto_model_loads_the_adapter_offline_and_recalls(staff_run, monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = json.loads((staff_run["adapter"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(convert.builtin_model_dir().resolve())
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(str(staff_run["adapter"]), dtype=torch.float32).eval()
    assert_generates_targets(pm, staff_run["ex"])


@pytest.mark.slow
def test_merged_folder_loads_in_transformers_and_recalls(staff_run):
    pytest.importorskip("transformers")
    assert_generates_targets(hf_model(staff_run["merged"]), staff_run["ex"])


def assert_generates_targets(hf, examples):
    """transformers' greedy generate from each training prompt gives the answer tokens, end-of-turn included."""
    for e in examples:
        with torch.no_grad():
            out = hf.generate(torch.tensor([e.prompt]), max_new_tokens=len(e.answer) + 4, do_sample=False,
                              pad_token_id=2)
        assert out[0, len(e.prompt):].tolist() == e.answer
