"""The recall planner (planner.plan_recall, fitlaw.py --plan-recall, train.py --rank auto): it inverts a known
capacity law exactly, refuses lengths and ranks beyond those measured and ranks above the modules' width,
uses only runs of the same adapter, and train.py --rank auto starts where it says."""

import json

import pytest
from conftest import run_script

import facts
import planner
import train

K, GAMMA = 16.0, 0.5  # the law the runs below are drawn from: held tokens = 16·√r
LAW_RANKS = (1, 4, 16, 64)  # 16·√r is a whole number of tokens at each


def run(rank: int, tokens: int, held: bool, **over) -> dict:
    """One results file's worth of fields: an SFT run of `tokens` answer tokens at `rank`, memorised or not."""
    return dict(model="default", task="longctx", method="sft", noise=1.0, schedule="constant", budget=2000,
                targets=["mlp"], layers=[20], preset="paper", rank=rank, length=tokens, answer_tokens=tokens,
                delta_loss=1.0, exact_match=1.0 if held else 0.0, stubborn=0 if held else tokens // 2) | over


def law_runs(k: float = K, gamma: float = GAMMA, ranks=LAW_RANKS, **over) -> list[dict]:
    """At each rank two seeds hold K·r^γ tokens and lose twice that."""
    out = []
    for r in ranks:
        cap = round(k * r**gamma)
        out += [run(r, cap, True, seed=s, **over) for s in (0, 1)] + [run(r, 2 * cap, False, seed=s, **over)
                                                                       for s in (0, 1)]
    return out


def write(tmp_path, runs: list[dict]) -> list[str]:
    paths = []
    for i, r in enumerate(runs):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(r))
        paths.append(str(p))
    return paths


def test_inverts_a_known_capacity_law_exactly(tmp_path):
    paths = write(tmp_path, law_runs())
    plan = planner.plan_recall(paths, 32)
    assert plan["K"] == pytest.approx(K, rel=1e-12) and plan["gamma"] == pytest.approx(GAMMA, rel=1e-12)
    assert plan["rank"] == 4 and plan["measured_rank"] == 4  # 16·√4 = 32 exactly: no rounding up
    for tokens in (16, 17, 33, 50, 100, 128):  # r = (tokens / 16)², rounded up, never below the smallest rank
        want = max(1, -(-(tokens**2) // 256))
        assert planner.plan_recall(paths, tokens)["rank"] == want, tokens
    assert planner.plan_recall(paths, 5)["rank"] == 1  # fewer tokens than rank 1 holds: the smallest rank measured
    assert sorted(plan["runs"]) == sorted(paths)


def test_refuses_to_extrapolate_or_exceed_the_width(tmp_path):
    paths = write(tmp_path, law_runs())
    with pytest.raises(planner.PlanError, match=r"more than the longest answer memorised in these runs \(128\)"):
        planner.plan_recall(paths, 129)
    with pytest.raises(planner.PlanError, match="above the adapted modules' width 32"):
        planner.plan_recall(paths, 100, width=32)  # the fit says 40
    # ranks 1 and 2 bracketed (10·r tokens), rank 3 held 60 with nothing longer tried: 50 tokens needs rank 5
    few = law_runs(10.0, 1.0, (1, 2)) + [run(3, 60, True)]
    with pytest.raises(planner.PlanError, match=r"rank 5 for 50 tokens, above the largest rank measured \(3\)"):
        planner.plan_recall(write(tmp_path, few), 50)


def test_needs_two_bracketed_ranks_and_growth(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    one = law_runs(ranks=(4,)) + [run(16, 64, True)]  # rank 16 held all it was given: a bound, not a capacity
    with pytest.raises(planner.PlanError, match=r"bracketed .* at 1 rank\(s\) of 2; the fit needs 2 or more"):
        planner.plan_recall(write(tmp_path / "a", one), 20)
    shrinking = [run(1, 40, True), run(1, 80, False), run(4, 20, True), run(4, 40, False)]
    with pytest.raises(planner.PlanError, match="does not grow with rank"):
        planner.plan_recall(write(tmp_path / "b", shrinking), 20)


def test_equal_capacity_at_two_ranks_refuses_and_a_failed_rank_is_never_the_plan(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    # ranks 4 and 8 both hold 88 and lose 176 (as 8-number PhoneBooks did): γ = 0 up to rounding, no plan;
    # rank 1 lost 88, so "rank 1" (what (84/88)^(1/γ) rounds to) would have been a plan it was seen to fail
    flat = [run(r, n, n == 88, seed=s) for r in (4, 8) for n in (88, 176) for s in (0, 1)] + [run(1, 88, False)]
    with pytest.raises(planner.PlanError, match="does not grow with rank"):
        planner.plan_recall(write(tmp_path / "a", flat), 84)
    # the law 16·√r plans rank 1 for 16 tokens; a rank-1 run that lost 12 tokens lifts the plan to rank 2
    lost = law_runs() + [run(1, 12, False, seed=2)]
    assert planner.plan_recall(write(tmp_path / "b", lost), 16)["rank"] == 2
    (tmp_path / "c").mkdir()  # the largest rank lost 16 tokens: no measured rank is left to plan
    with pytest.raises(planner.PlanError, match=r"rank 64, the largest measured, lost 16 answer tokens or fewer"):
        planner.plan_recall(write(tmp_path / "c", law_runs() + [run(64, 16, False, seed=2)]), 16)


def test_a_length_counts_as_held_only_when_every_run_of_it_recalled_every_token(tmp_path):
    runs = law_runs()
    runs[0] = dict(runs[0], stubborn=1)  # rank 1, 16 tokens, seed 0: decoded right, but one token at p ≤ 0.5
    points = planner.capacity_points(runs)
    assert [p[0] for p in points] == [4, 16, 64]  # rank 1 now holds no length in every run: it drops out
    assert points[0] == (4, 32, 64)


def test_a_length_that_only_some_seeds_have_run_is_neither_held_nor_lost():
    """A capacity probe under way: seed 0 memorised 48 tokens at rank 4, seed 1 has not run it yet."""
    runs = law_runs() + [run(4, 48, True, seed=0)]  # between rank 4's held 32 and lost 64
    assert planner.capacity_points(runs)[1] == (4, 32, 64)  # not (4, 48, 64): seed 1 may still lose it
    runs.append(run(4, 48, True, seed=1))  # seed 1 holds it too
    assert planner.capacity_points(runs)[1] == (4, 48, 64)
    runs[-1] = run(4, 48, False, seed=1)  # or loses it: lost as soon as one seed fails
    assert planner.capacity_points(runs)[1] == (4, 32, 48)


def test_only_sft_runs_of_the_same_adapter_count(tmp_path):
    """Another adapter's (targets) or another method's runs are left out; the largest budget answers."""
    mine = law_runs()
    other = law_runs(4.0, 1.0, targets=["q_proj", "v_proj"], layers=list(range(30)))
    memft = law_runs(100.0, 0.5, method="sw")  # would plan rank 1 for everything
    short = law_runs(8.0, 0.5, budget=100)  # a shorter budget: half the capacity
    paths = write(tmp_path, mine + other + memft + short)
    plan = planner.plan_recall(paths, 32, targets=("mlp",), layers=[20], model="default")
    assert plan["rank"] == 4 and "budget=2000" in plan["group"] and "targets=mlp" in plan["group"]
    assert len(plan["runs"]) == len(mine)
    qv = planner.plan_recall(paths, 32, targets=("q_proj", "v_proj"), layers=list(range(30)))
    assert qv["rank"] == 8  # 4·r = 32
    with pytest.raises(planner.PlanError, match="no finished SFT runs with model default, targets k_proj"):
        planner.plan_recall(paths, 32, targets=["k_proj"], model="default")


@pytest.mark.slow
def test_cli_prints_the_plan_and_refuses_in_one_line(tmp_path):
    paths = write(tmp_path, law_runs() + [dict(not_a_run=True)])
    r = run_script("fitlaw.py", "--plan-recall", "--tokens", "33", *paths, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "held tokens = 16·r^0.5 over ranks 1, 4, 16, 64: rank 5 (r = 4.25)" in r.stdout
    assert "planned rank 5" in r.stdout and "1 other files skipped" in r.stdout
    for args, words in ((["--tokens", "500"], "no group can plan"), ([], "--plan-recall needs --tokens N"),
                        (["--tokens", "20", "--width", "0"], "--width 0")):
        r = run_script("fitlaw.py", "--plan-recall", *args, *paths, timeout=120)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_rank_auto_starts_at_the_planned_rank(tiny_chat, tmp_path):
    """train.py asks the planner with the run's own model, modules and layers (facts: q_proj, v_proj, all)."""
    from model import ModelArgs, read_config

    n_layers = ModelArgs.from_config(read_config(tiny_chat)).n_layers
    same = dict(model=str(tiny_chat), targets=["q_proj", "v_proj"], layers=list(range(n_layers)))
    write(tmp_path, law_runs(4.0, 1.0, (1, 2, 4), **same) + law_runs(100.0, 1.0, (1, 2), targets=["mlp"]))
    cfg = train.Config(model=str(tiny_chat), preset="standard", rank="auto", until_recalled=True,
                       plan_from=str(tmp_path / "*.json"))
    plan = facts.planned_rank(cfg, tokens=12, width=32)
    assert plan["rank"] == plan["planned"] == 3 and len(plan["runs"]) == 12  # 4·r = 12
    assert facts.plan_line(plan, 12).startswith("the planner gives rank 3 for 12 answer tokens (held tokens = 4·r^1")


def test_layer_lists_print_as_spans():
    assert planner.spans([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10" and planner.spans([20]) == "20"
    assert planner.spans(["q_proj", "v_proj"]) == "q_proj,v_proj"
