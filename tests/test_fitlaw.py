"""Tests for fitlaw.py: recover a known law, invert it, and drive the CLI end to end.

    python -m pytest -q tests/test_fitlaw.py
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fitlaw  # noqa: E402

FITLAW = str(Path(__file__).resolve().parents[1] / "fitlaw.py")
TRUE = dict(C=5.0, alpha=0.4, beta=0.6, b=0.05)
RANKS, LENGTHS = [1, 2, 4, 8, 16, 32], [50, 100, 200, 400, 800]


def grid_points(noise=0.01, seed=0, **p):
    """ΔL on the rank × length grid from a known law, with multiplicative Gaussian noise."""
    p = {**TRUE, **p}
    r, l = (a.ravel().astype(float) for a in np.meshgrid(RANKS, LENGTHS))
    dl = fitlaw.law(r, l, p["C"], p["alpha"], p["beta"], p["b"])
    return r, l, dl * (1 + noise * np.random.default_rng(seed).standard_normal(r.size))


def write_runs(dirpath, r, l, dl, model="m", task="pb", method="sft", noise=None, start=0, **extra):
    """One results file per point, with the schema's keys."""
    paths = []
    for i, (ri, li, di) in enumerate(zip(r, l, dl)):
        run = dict(schema=1, model=model, task=task, method=method, rank=int(ri), params=int(ri) * 1000,
                   length=int(li), noise=noise, seed=0, steps=10, loss_init=3.0, loss_final=3.0 - di,
                   delta_loss=float(di), token_acc=0.5, exact_match=0.0, stubborn=1,
                   earliest_stubborn=i % 7, first_failure=(i % 7) + (i % 2), time_s=1.0,
                   sufficient_violations=0, **extra)
        path = Path(dirpath) / f"{model}_{method}_{noise}_{start + i}.json"
        path.write_text(json.dumps(run))
        paths.append(str(path))
    return paths


def cli(*args):
    return subprocess.run([sys.executable, FITLAW, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_fit_recovers_known_law_with_noise():
    r, l, dl = grid_points(noise=0.01, seed=0)
    fit = fitlaw.fit_law(r, l, dl)
    for k in ("C", "alpha", "beta"):
        assert abs(fit[k] - TRUE[k]) / TRUE[k] < 0.05, (k, fit[k])
    # 1% noise on ΔL values up to ~2 pins b (0.05) only to about ±0.007, so check it on the ΔL scale
    assert abs(fit["b"] - TRUE["b"]) < 0.01
    assert fit["r2"] > 0.99 and fit["mape"] < 2 and fit["n"] == 30


def test_fit_is_exact_without_noise():
    r, l, dl = grid_points(noise=0.0)
    fit = fitlaw.fit_law(r, l, dl)
    for k in TRUE:
        assert fit[k] == pytest.approx(TRUE[k], rel=1e-5), k
    assert fit["mape"] < 1e-4


def test_r2_and_mape_by_hand():
    assert fitlaw.r_squared([1, 2, 3], [1, 2, 4]) == pytest.approx(1 - 1 / 2)
    assert fitlaw.mape([1, 2, 4], [1.1, 2, 3]) == pytest.approx((10 + 0 + 25) / 3)


def test_holdout_mape_small():
    r, l, dl = grid_points(noise=0.01, seed=0)
    fit, held = fitlaw.holdout_fit(r, l, dl, 0.2, seed=0)
    assert fit["n"] == 24 and held < 3


def test_too_few_points_raises():
    r, l, dl = grid_points()
    with pytest.raises(ValueError, match="at least 5"):
        fitlaw.fit_law(r[:4], l[:4], dl[:4])


def test_plan_rank_inverts_law():
    p = TRUE
    for length, target in [(1000, 1.0), (50, 0.3), (400, 2.5)]:
        rk = fitlaw.plan_rank(p["C"], p["alpha"], p["beta"], p["b"], length, target)
        assert abs(fitlaw.law(rk, length, p["C"], p["alpha"], p["beta"], p["b"]) - target) < 1e-9
    # rising towards the asymptote b from below: anything at or above b is out of reach
    assert fitlaw.plan_rank(-2.0, -0.5, 0.3, 1.0, 100, 1.2) is None
    rk = fitlaw.plan_rank(-2.0, -0.5, 0.3, 1.0, 100, 0.9)
    assert fitlaw.law(rk, 100, -2.0, -0.5, 0.3, 1.0) == pytest.approx(0.9, abs=1e-9)
    # a law that does not grow with r never reaches a target by adding rank
    assert fitlaw.plan_rank(5.0, -0.2, 0.6, 0.05, 100, 1.0) is None
    assert fitlaw.plan_rank(5.0, 0.0, 0.6, 0.05, 100, 1.0) is None
    # with C, α > 0 the law starts at b, so a target below b is met by any rank
    assert fitlaw.plan_rank(5.0, 0.4, 0.6, 0.05, 100, 0.01) == 0.0


def test_spearman_by_hand_and_against_scipy():
    # ranks differ by d = (0, 1, 1, 0): rho = 1 − 6·2 / (4·15) = 0.8; the None pair must be skipped
    rho, n = fitlaw.spearman([1, 2, None, 3, 4], [10, 30, 0, 20, 40])
    assert n == 4 and rho == pytest.approx(0.8)
    rng = np.random.default_rng(1)
    e = rng.integers(0, 50, 40).tolist()
    f = [x + int(d) for x, d in zip(e, rng.integers(-10, 10, 40))]
    e_none = [None if i % 5 == 0 else x for i, x in enumerate(e)]
    rho, n = fitlaw.spearman(e_none, f)
    keep = [i for i in range(40) if i % 5]
    assert n == 32
    assert rho == pytest.approx(spearmanr([e[i] for i in keep], [f[i] for i in keep]).statistic, abs=1e-12)


def test_cli_json(tmp_path):
    r, l, dl = grid_points(noise=0.01, seed=0)
    paths = write_runs(tmp_path, r, l, dl)
    p = cli(*paths, "--json")
    assert p.returncode == 0, p.stderr
    (g,) = json.loads(p.stdout)
    for k in "model task method noise C alpha beta b r2 mape n x spearman_rho spearman_n".split():
        assert k in g, k
    assert g["n"] == 30 and g["r2"] > 0.99 and abs(g["alpha"] - 0.4) < 0.02
    # same pairs as write_runs: earliest_stubborn = i % 7, first_failure = i % 7 + i % 2
    expect = spearmanr([i % 7 for i in range(30)], [i % 7 + i % 2 for i in range(30)]).statistic
    assert g["spearman_rho"] == pytest.approx(expect) and g["spearman_n"] == 30

    text = cli(*paths)
    assert text.returncode == 0 and "alpha" in text.stdout
    assert f"rho = {expect:.3f}, n = 30" in text.stdout
    assert "sufficient-condition violations: 0 over 30 runs" in text.stdout


def test_cli_params_holdout_and_combined(tmp_path):
    r, l, dl = grid_points(noise=0.0)
    paths = write_runs(tmp_path, r[::2], l[::2], dl[::2], noise=0.1)
    paths += write_runs(tmp_path, r[1::2], l[1::2], dl[1::2], noise=0.5, start=100)
    p = cli(*paths, "--json", "--x", "params", "--holdout", "0.2")
    assert p.returncode == 0, p.stderr
    groups = json.loads(p.stdout)
    assert [g["noise"] for g in groups] == [0.1, 0.5] and all(g["n"] == 12 for g in groups)
    # params = 1000·r: α and β are unchanged, C absorbs 1000^−α
    g = groups[0]
    assert g["x"] == "params" and g["alpha"] == pytest.approx(0.4, rel=1e-4)
    assert g["C"] == pytest.approx(5.0 * 1000 ** -0.4, rel=1e-4) and g["holdout_mape"] < 1e-3
    (c,) = json.loads(cli(*paths, "--json", "--combine-noise").stdout)
    assert c["noise"] == "combined" and c["n"] == 30


def test_cli_plan(tmp_path):
    r, l, dl = grid_points(noise=0.0)
    target = float(fitlaw.law(10.5, 1000, **TRUE))  # exact inverse is r = 10.5, so the plan says 11
    p = cli(*write_runs(tmp_path, r, l, dl), "--plan", "--length", 1000, "--target-delta", target, "--json")
    (g,) = json.loads(p.stdout)
    assert g["plan"] == pytest.approx(10.5, rel=1e-4) and g["plan_int"] == 11

    down = tmp_path / "down"
    down.mkdir()
    r, l, dl = grid_points(noise=0.0, alpha=-0.3)
    p = cli(*write_runs(down, r, l, dl), "--plan", "--length", 1000, "--target-delta", 5.0)
    assert p.returncode == 0 and "unreachable (law does not grow with r)" in p.stdout


def test_cli_bad_files_and_small_group(tmp_path):
    r, l, dl = grid_points(noise=0.01)
    good = write_runs(tmp_path, r, l, dl)
    small = write_runs(tmp_path, r[:3], l[:3], dl[:3], method="memft_ot")
    notjson = tmp_path / "broken.json"
    notjson.write_text("{not json")
    nokey = tmp_path / "nokey.json"
    run = json.loads(Path(good[0]).read_text())
    del run["delta_loss"]
    nokey.write_text(json.dumps(run))

    p = cli(*good, *small, notjson, nokey, "--json")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("broken.json" in s and "JSON" in s for s in lines)
    assert any("nokey.json" in s and "delta_loss" in s for s in lines)
    assert any("method=memft_ot" in s and "3 points" in s for s in lines)
    groups = {g["method"]: g for g in json.loads(p.stdout)}
    assert groups["sft"]["n"] == 30 and groups["sft"]["r2"] > 0.99 and "error" in groups["memft_ot"]

    p = cli()
    assert p.returncode != 0 and "no results files" in p.stderr and "Traceback" not in p.stderr
    p = cli(tmp_path / "missing.json")
    assert p.returncode != 0 and "missing.json" in p.stderr and "Traceback" not in p.stderr


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_and_grid_write_png(tmp_path):
    r, l, dl = grid_points(noise=0.01)
    probs = [0.9, 0.95, 0.4, 0.8, 0.3, 0.99]
    sample = dict(id=0, length=6, probs=probs, stubborn_positions=[2, 4], earliest_stubborn=2, first_failure=2)
    paths = write_runs(tmp_path, r, l, dl, per_sample=[sample, dict(sample, id=1, first_failure=6)])
    paths += write_runs(tmp_path, r, l, dl, method="memft_sw", start=100)
    out = tmp_path / "fit.png"
    grid = tmp_path / "grid.png"
    p = cli(*paths, "--plot", out, "--grid", grid, "--max-runs", 2)
    assert p.returncode == 0, p.stderr
    for f in (tmp_path / "fit_0.png", tmp_path / "fit_1.png", grid):
        data = f.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, f
