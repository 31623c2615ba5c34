"""docs/review.py's power of a paired t test, against a simulation of that test; and its seed count."""

import sys

import numpy as np
from conftest import ROOT
from scipy.stats import ttest_1samp

sys.path.insert(0, str(ROOT / "docs"))  # review.py imports convergence.py beside it
import review  # noqa: E402


def test_power_against_simulated_paired_t_tests():
    rng = np.random.default_rng(0)
    for effect, sd, n in ((0.05, 0.04, 5), (0.013, 0.078, 5), (0.3, 1.0, 20)):
        d = rng.normal(effect, sd, (20000, n))  # 20,000 studies of n paired differences
        simulated = np.mean(ttest_1samp(d, 0, axis=1).pvalue < 0.05)
        assert abs(review.power(effect, sd, n) - simulated) < 0.012, (effect, sd, n)
    assert abs(review.power(0.0, 1.0, 5) - 0.05) < 1e-12  # no effect: the test's size


def test_seeds_needed_is_the_first_n_with_80_percent_power():
    n = review.seeds_needed(0.062, 0.095)
    assert review.power(0.062, 0.095, n) >= 0.8 > review.power(0.062, 0.095, n - 1)
    assert review.seeds_needed(1e-6, 1.0) is None  # past the cap


def test_clopper_pearson_by_hand():
    lo, hi = review.clopper_pearson(0, 10)
    assert lo == 0 and abs(hi - (1 - 0.025 ** (1 / 10))) < 1e-12  # k = 0: 1 − (α/2)^(1/n)
    lo, hi = review.clopper_pearson(10, 10)
    assert hi == 1 and abs(lo - 0.025 ** (1 / 10)) < 1e-12


def test_boundary_counts_pairs_by_hand(tmp_path):
    """Four pairs at rank 1, ℓ = 30: SFT recalls in pairs 0 and 1, OT in 0, 2 and 3 (so OT recalls where SFT
    did not twice, and the reverse once); both recall in pair 0, OT at step 200 against SFT's 400."""
    import json

    (tmp_path / "boundary").mkdir()
    recalls = {"sft": [True, True, False, False], "ot": [True, False, True, True]}
    for m, flags in recalls.items():
        for i, ok in enumerate(flags):
            greedy = ok or (m, i) == ("sft", 2)  # SFT's pair 2: greedy exact, but a token at p <= 0.5
            run = dict(rank=1, length=30, method=m, seed=i % 2, data_seed=i // 2, exact_match=1.0 if greedy else 0.5,
                       stubborn=0 if ok else 3, token_acc=1.0 if ok else 0.9, stopped_at=(200 if m == "ot" else 400)
                       if ok else None, history=[dict(reweighted=0.1)], n_samples=1, answer_tokens=31)
            (tmp_path / "boundary" / f"{m}-{i}.json").write_text(json.dumps(run))
    lines = review.boundary(tmp_path)
    assert "| 1 | 30 | SFT | 2 of 4 | [0.07, 0.93] | 3 of 4 |" in "\n".join(lines)
    assert "| 1 | 30 | OT | 3 of 4 | [0.19, 0.99] | 3 of 4 |" in "\n".join(lines)
    (test,) = [x for x in lines if x.startswith("- rank 1, ℓ = 30, OT")]
    assert "recalled where SFT did not 2, the reverse 1" in test and "1 pairs that both recalled: 0.50" in test
    # pooled: OT 3 of 4 against SFT 2 of 4, discordant 2 and 1 (sign test over 3: p = 1), difference +1/4, and
    # the interval from the exact upper bounds on 1 of 4 (only SFT) and 2 of 4 (only OT)
    (pool,) = [x for x in lines if x.startswith("- OT against SFT, recalled")]
    lo, hi = review.clopper_pearson(1, 4)[1], review.clopper_pearson(2, 4)[1]
    assert f"3 of 4 against 2 of 4; only OT 2, only SFT 1, sign test p = 1; difference in rate +0.25, 95% interval " \
           f"[{-lo:+.2f}, {hi:+.2f}]" in pool
    (pool,) = [x for x in lines if x.startswith("- OT against SFT, greedy exact")]
    assert "3 of 4 against 3 of 4; only OT 1, only SFT 1" in pool  # SFT's pair 2 is greedy exact
    # the figure's points: ℓ over the rank's capacity (25 held), the share recalled and its exact interval
    cells = {(1, 30): {m: {i: json.loads((tmp_path / "boundary" / f"{m}-{i}.json").read_text()) for i in range(4)}
                       for m in recalls}, (2, 71): {"sft": {}}}
    points = review.recall_points(cells, {1: 25})
    assert [p[:2] for p in points["sft"]] == [(1.2, 0.5)] and [p[:2] for p in points["ot"]] == [(1.2, 0.75)]
    assert points["ot"][0][2:] == review.clopper_pearson(3, 4)
    assert review.boundary_figure(points, tmp_path).endswith("(boundary.png)") and (tmp_path / "boundary.png").stat().st_size


def test_method_capacity_by_hand(tmp_path):
    """SFT holds ℓ = 25 (both seeds) and loses 30; SW holds 25 (steps 100, 200), has run 27 with one seed only
    (neither held nor lost) and loses 30 in the boundary folder; a data-seed-1 loss at 25 does not count."""
    import json

    for sub in ("capacity", "boundary"):
        (tmp_path / sub).mkdir()

    def run(sub, m, L, seed, exact, step=None, data_seed=0):
        r = dict(task="longctx", noise=1.0, data_seed=data_seed, budget=2000, schedule="constant", rank=1, length=L,
                 method=m, seed=seed, exact_match=1.0 if exact else 0.9, stopped_at=step, steps=step or 2000)
        (tmp_path / sub / f"{m}-{L}-{seed}-{data_seed}.json").write_text(json.dumps(r))

    for seed in (0, 1):
        run("", "sft", 25, seed, True, 300)
        run("capacity", "sw", 25, seed, True, 100 * (seed + 1))
    run("", "sft", 30, 0, False)
    run("capacity", "sw", 27, 0, True, 500)
    run("boundary", "sw", 30, 1, False)
    run("boundary", "sw", 25, 0, False, data_seed=1)
    lines = "\n".join(review.method_capacity(tmp_path))
    assert "| 1 | SFT | 25 | 30 | 300, 300 | 25, 30 |" in lines
    assert "| 1 | SW | 25 | 30 | 100, 200 | 25, 27, 30 |" in lines
    only = tmp_path / "one"  # SW at one length only (stage 10's runs, no probe yet) brackets nothing
    only.mkdir()
    (only / "sw.json").write_text((tmp_path / "boundary" / "sw-30-1-0.json").read_text())
    assert review.method_capacity(only) == []
