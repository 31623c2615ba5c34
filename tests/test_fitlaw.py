"""Tests for fitlaw.py: recover a known law, invert it, refuse undetermined fits, test the bootstrap and
the lack-of-fit test on laws of known form, and drive the CLI end to end (figures and their names included).

    python -m pytest -q tests/test_fitlaw.py
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import least_squares
from scipy.stats import f as f_dist
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fitlaw  # noqa: E402
from fitlaw import law  # noqa: E402
import studies  # noqa: E402

FITLAW = str(Path(__file__).resolve().parents[1] / "fitlaw.py")
TRUE = dict(C=5.0, alpha=0.4, beta=0.6, b=0.05)
RANKS, LENGTHS = [1, 2, 4, 8, 16, 32], [50, 100, 200, 400, 800]


def grid_points(noise=0.01, seed=0, **p):
    """ΔL on the rank × length grid from a known law, with multiplicative Gaussian noise."""
    p = {**TRUE, **p}
    r, l = (a.ravel().astype(float) for a in np.meshgrid(RANKS, LENGTHS))
    dl = fitlaw.law(r, l, p["C"], p["alpha"], p["beta"], p["b"])
    return r, l, dl * (1 + noise * np.random.default_rng(seed).standard_normal(r.size))


def write_runs(dirpath, r, l, dl, model="m", task="pb", method="sft", noise=None, start=0, seeds=None, **extra):
    """One results file per point, with the schema's keys; extra keys (schedule=..., ...) go into every run."""
    paths = []
    for i, (ri, li, di) in enumerate(zip(r, l, dl)):
        run = dict(schema=1, model=model, task=task, method=method, rank=int(ri), params=int(ri) * 1000,
                   length=int(li), noise=noise, seed=0 if seeds is None else int(seeds[i]), steps=10,
                   loss_init=3.0, loss_final=3.0 - di, delta_loss=float(di), token_acc=0.5, exact_match=0.0,
                   stubborn=1, earliest_stubborn=i % 7, first_failure=(i % 7) + (i % 2), time_s=1.0,
                   sufficient_violations=0)
        run.update(extra)
        path = Path(dirpath) / f"{model}_{method}_{noise}_{start + i}.json"
        path.write_text(json.dumps(run))
        paths.append(str(path))
    return paths


def cli(*args):
    return subprocess.run([sys.executable, FITLAW, *map(str, args)], capture_output=True, text=True, timeout=120)


def groups_of(capsys, paths, **kw):
    """fitlaw.main in this process (no interpreter start-up) with --json: (exit status, groups, stderr)."""
    rc = fitlaw.main(paths, as_json=True, **{"n_boot": 0, **kw})
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


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
    rho, n = studies.spearman([1, 2, None, 3, 4], [10, 30, 0, 20, 40])
    assert n == 4 and rho == pytest.approx(0.8)
    rng = np.random.default_rng(1)
    e = rng.integers(0, 50, 40).tolist()
    f = [x + int(d) for x, d in zip(e, rng.integers(-10, 10, 40))]
    e_none = [None if i % 5 == 0 else x for i, x in enumerate(e)]
    rho, n = studies.spearman(e_none, f)
    keep = [i for i in range(40) if i % 5]
    assert n == 32
    assert rho == pytest.approx(spearmanr([e[i] for i in keep], [f[i] for i in keep]).statistic, abs=1e-12)


@pytest.mark.slow
def test_cli_json(tmp_path):
    r, l, dl = grid_points(noise=0.01, seed=0)
    paths = write_runs(tmp_path, r, l, dl)
    p = cli(*paths, "--json")
    assert p.returncode == 0, p.stderr
    (g,) = json.loads(p.stdout)
    keys = ("model task method noise preset budget schedule C alpha beta b r2 mape n points x objective cond ci95 "
            "bootstrap_n bootstrap_ok replicated_points max_replicates seed_sd seed_cv seed_df lof_F lof_df lof_p "
            "spearman_rho spearman_n sample_spearman_rho sample_spearman_n sample_spearman_rho_no00 "
            "sample_spearman_n_no00")
    for k in keys.split():
        assert k in g, k
    assert g["schedule"] == "linear" and g["budget"] == 10 and g["bootstrap_n"] == 1000 and g["lof_p"] is None
    assert g["n"] == 30 and g["r2"] > 0.99 and abs(g["alpha"] - 0.4) < 0.02
    # same pairs as write_runs: earliest_stubborn = i % 7, first_failure = i % 7 + i % 2
    expect = spearmanr([i % 7 for i in range(30)], [i % 7 + i % 2 for i in range(30)]).statistic
    assert g["spearman_rho"] == pytest.approx(expect) and g["spearman_n"] == 30

    text = cli(*paths)
    assert text.returncode == 0 and "alpha" in text.stdout
    assert f"rho = {expect:.3f}, n = 30" in text.stdout
    assert "sufficient-condition violations: 0 over 30 runs" in text.stdout


@pytest.mark.slow
def test_cli_params_holdout_and_combined(tmp_path):
    r, l, dl = grid_points(noise=0.0)
    paths = write_runs(tmp_path, r[::2], l[::2], dl[::2], noise=0.1)
    paths += write_runs(tmp_path, r[1::2], l[1::2], dl[1::2], noise=0.5, start=100)
    p = cli(*paths, "--json", "--x", "params", "--holdout", "0.2")
    assert p.returncode == 0, p.stderr
    groups = json.loads(p.stdout)
    # the table's fit uses all 15 points; the holdout refit leaves out 3 of them
    assert [g["noise"] for g in groups] == [0.1, 0.5] and all(g["n"] == 15 and g["holdout_n"] == 3 for g in groups)
    # params = 1000·r: α and β are unchanged, C absorbs 1000^−α
    g = groups[0]
    assert g["x"] == "params" and g["alpha"] == pytest.approx(0.4, rel=1e-4)
    assert g["C"] == pytest.approx(5.0 * 1000 ** -0.4, rel=1e-4) and g["holdout_mape"] < 1e-3
    (c,) = json.loads(cli(*paths, "--json", "--combine-noise").stdout)
    assert c["noise"] == "combined" and c["n"] == 30


@pytest.mark.slow
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


@pytest.mark.slow
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

    # A study's other JSON beside its runs (docs/sampling.py's sampling.json) is skipped with a line, not an error.
    other = tmp_path / "sampling.json"
    other.write_text(json.dumps({"temperatures": [0.5, 1.0], "runs": []}))
    p = cli(*good, other)
    assert p.returncode == 0 and "sampling.json: not a results file" in p.stderr and "skipped" in p.stderr

    p = cli()
    assert p.returncode != 0 and "no results files" in p.stderr and "Traceback" not in p.stderr
    p = cli(tmp_path / "missing.json")
    assert p.returncode != 0 and "missing.json" in p.stderr and "Traceback" not in p.stderr


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_plot_and_grid_write_png(tmp_path):
    """Two groups: one figure each, named by what tells them apart (method, and noise where a group has
    one), each named in a 'plot:' line with its settings; nothing is written to fit.png itself."""
    r, l, dl = grid_points(noise=0.01)
    probs = [0.9, 0.95, 0.4, 0.8, 0.3, 0.99]
    sample = dict(id=0, length=6, probs=probs, stubborn_positions=[2, 4], earliest_stubborn=2, first_failure=2)
    paths = write_runs(tmp_path, r, l, dl, noise=1.0, per_sample=[sample, dict(sample, id=1, first_failure=6)])
    paths += write_runs(tmp_path, r, l, dl, method="memft_sw", start=100)
    out = tmp_path / "fit.png"
    grid = tmp_path / "grid.png"
    p = cli(*paths, "--plot", out, "--grid", grid, "--max-runs", 2, "--bootstrap", 0)
    assert p.returncode == 0, p.stderr
    mapping = [line for line in p.stdout.splitlines() if line.startswith("plot: ")]
    assert mapping == [f"plot: {tmp_path / 'fit_memft_sw.png'}  model=m task=pb method=memft_sw budget=10 "
                       f"schedule=linear",
                       f"plot: {tmp_path / 'fit_sft-noise1.0.png'}  model=m task=pb method=sft noise=1.0 budget=10 "
                       f"schedule=linear"]
    figures = {Path(line.split()[1]) for line in mapping}
    assert set(tmp_path.glob("*.png")) == figures | {grid}
    for f in (*figures, grid):
        data = f.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, f


@pytest.mark.slow
def test_plot_one_group_writes_exactly_the_path(tmp_path, capsys, monkeypatch):
    """One group: the figure goes to the path asked for, titled with the group's settings (noise, which
    these runs lack, left out) and the fitted law; with --json the mapping goes to stderr."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    paths = write_runs(tmp_path, *grid_points(noise=0.01))
    out = tmp_path / "law.png"
    rc, (g,), err = groups_of(capsys, paths, plot=str(out))
    assert rc == 0 and g["plot"] == str(out)
    assert err.strip() == f"plot: {out}  model=m task=pb method=sft budget=10 schedule=linear"
    assert [f.name for f in tmp_path.glob("*.png")] == ["law.png"] and out.read_bytes()[:8] == PNG_MAGIC
    (fig,) = figures
    assert fig.get_suptitle() == "model=m task=pb method=sft budget=10 schedule=linear"
    assert fig.axes[0].get_title() == studies.law_label(g) and fig.axes[0].get_xlabel() == "LoRA rank r"

    out.unlink()
    assert fitlaw.main(paths, n_boot=0, plot=str(out)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"plot: {out}  model=m task=pb method=sft budget=10 " \
                                                       f"schedule=linear"
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_law_label_shows_the_fitted_parameters():
    # the law recovered exactly from noiseless points, each parameter to 3 figures, ℓ's exponent −β
    fit = fitlaw.fit_law(*grid_points(noise=0.0))
    assert studies.law_label(fit) == "ΔL = 5·r^0.4·ℓ^−0.6 + 0.05 (R² 1.000)"
    fit = fitlaw.fit_law(*grid_points(noise=0.02, seed=4))
    label = studies.law_label(fit, "params")
    for v in (fit["C"], fit["alpha"], -fit["beta"], abs(fit["b"])):
        assert f"{v:.3g}".replace("-", "−") in label, (v, label)
    assert label.startswith(f"ΔL = {fit['C']:.3g}·P^") and label.endswith(f" (R² {fit['r2']:.3f})")
    # negative C and α, β < 0 (ℓ's exponent positive), b < 0: signs written once, as minus signs
    fit = dict(C=-0.0337, alpha=-1.61, beta=-0.874, b=-2.5, r2=0.9163)
    assert studies.law_label(fit) == "ΔL = −0.0337·r^−1.61·ℓ^0.874 − 2.5 (R² 0.916)"
    assert studies.law_label(dict(fit, beta=0.0, b=0.0)) == "ΔL = −0.0337·r^−1.61·ℓ^0 + 0 (R² 0.916)"


def test_group_slugs_name_what_differs():
    a = ("org/Qwen 3:0.6B", "longctx", "sft", 1.0, "paper", 2000, "constant")
    b = ("default", "longctx", "sft", None, "paper", 100, "constant")
    # model, noise and budget differ; b has no noise, so its name has none
    assert studies.group_slugs([a, b]) == ["Qwen_3_0.6B-noise1.0-2000steps", "default-100steps"]
    # different settings, same text: the names stay unique
    c, d = ("m", "pb", "sft", None, None, 10, "linear"), ("m", "pb", "sft", None, "linear", 10, None)
    assert studies.group_slugs([c, d]) == ["linear", "linear-2"]
    assert studies.plot_paths("out/law.png", [a]) == ["out/law.png"]
    assert studies.plot_paths("out/law.png", [a, b]) == ["out/law_Qwen_3_0.6B-noise1.0-2000steps.png",
                                                        "out/law_default-100steps.png"]
    assert studies.plot_paths("run.v2/law", [c, d]) == ["run.v2/law_linear", "run.v2/law_linear-2"]
    assert studies.group_description(b) == "model=default task=longctx method=sft preset=paper budget=100 " \
                                          "schedule=constant"


# ---- identifiability: a parameter the points cannot determine is an error, not a number

def replicated(fn, k=3, sd=0.02, seed=0, ranks=RANKS, lengths=LENGTHS):
    """k replicate 'seeds' per grid point: ΔL = fn(r, ℓ) plus additive Gaussian noise of sd."""
    r, l = (np.repeat(a.ravel().astype(float), k) for a in np.meshgrid(ranks, lengths))
    return r, l, fn(r, l) + sd * np.random.default_rng(seed).standard_normal(r.size)


def true_law(r, l):
    return fitlaw.law(r, l, **TRUE)


@pytest.mark.parametrize("case, match", [
    ("rank", r"all points have rank 4: α cannot be determined; vary the rank"),
    ("length", r"all points have length 100: β cannot be determined; vary the length"),
    ("identical", r"α cannot be determined.*β cannot be determined.*6 points but only 1 distinct"),
    ("four", r"12 points but only 4 distinct \(rank, length\); a fit of 4 parameters needs at least 5"),
])
def test_undetermined_design_raises(case, match):
    r, l, dl = {"rank": replicated(true_law, k=1, ranks=[4]),
                "length": replicated(true_law, k=1, lengths=[100]),
                "identical": replicated(true_law, k=6, ranks=[4], lengths=[100]),
                "four": replicated(true_law, k=3, ranks=[2, 8], lengths=[50, 400])}[case]
    with pytest.raises(ValueError, match=match):
        fitlaw.fit_law(r, l, dl)


def test_singular_jacobian_raises():
    r, l, _ = grid_points()
    # ΔL the same everywhere: nothing depends on r or ℓ, so C·r^α·ℓ^−β and b are one constant
    with pytest.raises(ValueError, match=r"near-singular.*C, b cannot be determined separately"):
        fitlaw.fit_law(r, l, np.full(r.size, 1.5))
    # exactly linear in log r and log ℓ: the best fit is the limit α, β → 0, C → ∞, b → −∞
    with pytest.raises(ValueError, match=r"near-singular \(condition number .* > 1e\+06\)"):
        fitlaw.fit_law(r, l, 2 + 0.3 * np.log(r) - 0.2 * np.log(l))
    # no dependence on r is not undetermined: α = 0 is a value the data pin down
    fit = fitlaw.fit_law(r, l, 3 * l ** -0.5 + 0.1)
    assert abs(fit["alpha"]) < 1e-8 and fit["beta"] == pytest.approx(0.5)


def test_cli_undetermined_group_is_one_line_and_the_others_are_fitted(tmp_path):
    """A group that cannot be fitted gets one line and the rest are fitted (exit 0); exit 1 only when none fits."""
    good = write_runs(tmp_path, *grid_points())
    flat = write_runs(tmp_path, *replicated(true_law, k=1, ranks=[4]), method="memft_sw", start=100)
    p = cli(*good, *flat, "--json", "--bootstrap", 0)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "method=memft_sw" in line and "all points have rank 4: α cannot be determined; vary the rank" in line
    groups = json.loads(p.stdout)
    by_method = {g["method"]: g for g in groups}
    assert "error" in by_method["memft_sw"] and "alpha" not in by_method["memft_sw"]
    assert by_method["sft"]["r2"] > 0.99 and by_method["sft"]["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    p = cli(*flat, "--bootstrap", 0)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "fitlaw: none of the 1 groups could be fitted (reasons above)"


# ---- replicates, bootstrap, lack of fit, objective

def test_lm_batch_matches_scipy():
    r, l, dl = grid_points(noise=0.01, seed=3)
    W = np.random.default_rng(0).integers(0, 3, (8, r.size)).astype(float)  # (8, 30) bootstrap-like weights
    p0 = [4.0, 0.5, 0.5, 0.0]
    p, conv = fitlaw.lm_batch(r, l, dl, W, p0)
    assert conv.all()
    for pk, Wk in zip(p, W):
        ref = least_squares(lambda q: np.sqrt(Wk) * (fitlaw.law(r, l, *q) - dl), p0, method="lm",
                            ftol=1e-14, xtol=1e-14, gtol=1e-14).x
        np.testing.assert_allclose(pk, ref, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_bootstrap_intervals_cover_truth():
    covered, n_sets = np.zeros(4), 20
    for seed in range(n_sets):
        r, l, dl = replicated(true_law, k=3, sd=0.02, seed=seed)
        fit = fitlaw.fit_law(r, l, dl)
        assert fit["n"] == 90 and fit["points"] == 30
        boot = fitlaw.bootstrap(r, l, dl, fit, 300, seed)
        assert boot["bootstrap_ok"] == 300
        ci = boot["ci95"]
        covered += [ci[k][0] <= TRUE[k] <= ci[k][1] for k in fitlaw.NAMES]
        # informative intervals: at this noise α and β are pinned to a few hundredths
        assert ci["alpha"][1] - ci["alpha"][0] < 0.1 and ci["beta"][1] - ci["beta"][0] < 0.15
    assert (covered >= 16).all(), covered  # nominal 95%: 19 of 20 expected


def test_bootstrap_skips_unidentifiable_resamples():
    # 5 distinct points: a resample draws all 5 (so can be fitted) with probability 5!/5^5 ≈ 4%
    r, l = np.array([1, 2, 4, 8, 16.0]), np.array([50, 100, 50, 100, 200.0])
    dl = fitlaw.law(r, l, **TRUE)
    boot = fitlaw.bootstrap(r, l, dl, fitlaw.fit_law(r, l, dl), 500, 0)
    assert 0 < boot["bootstrap_ok"] < 50 and boot["ci95"] is None


def test_lack_of_fit_by_hand():
    # the "fit" predicts 1 everywhere; points (1,1) and (2,1) have two replicates each
    r = [1, 1, 2, 2, 1, 2, 4]
    l = [1, 1, 1, 1, 2, 2, 4]
    y = [1.0, 1.2, 0.9, 1.1, 1.5, 1.0, 0.8]
    lof = fitlaw.lack_of_fit(r, l, y, dict(C=1.0, alpha=0.0, beta=0.0, b=0.0))
    # SS_pe = 4·0.1² = 0.04 on 7 − 5 = 2 df; SS_res = 0.2² + 2·0.1² + 0.5² + 0.2² = 0.35; SS_lof = 0.31 on 1 df
    assert lof["lof_df"] == [1, 2] and lof["lof_F"] == pytest.approx(0.31 / 0.02)
    assert lof["lof_p"] == pytest.approx(f_dist.sf(15.5, 1, 2))
    assert lof["seed_sd"] == pytest.approx(0.02 ** 0.5) and lof["replicated_points"] == 2
    assert fitlaw.lack_of_fit([1, 2, 4, 8, 16], [1] * 5, [1] * 5, dict(C=1, alpha=0, beta=0, b=0))["lof_p"] is None


@pytest.mark.parametrize("form", ["log", "saturating"])
def test_lack_of_fit_rejects_other_forms(form):
    other = {"log": lambda r, l: 25 * np.log1p(r) / l + 0.05,
             "saturating": lambda r, l: 2 * (1 - np.exp(-r / 6)) * (l / 50) ** -0.6 + 0.05}[form]
    for seed in range(3):
        r, l, dl = replicated(other, k=3, sd=0.02, seed=seed)
        assert fitlaw.lack_of_fit(r, l, dl, fitlaw.fit_law(r, l, dl))["lof_p"] < 0.01
        r, l, dl = replicated(true_law, k=3, sd=0.02, seed=seed)
        lof = fitlaw.lack_of_fit(r, l, dl, fitlaw.fit_law(r, l, dl))
        assert lof["lof_p"] > 0.01 and lof["seed_sd"] == pytest.approx(0.02, rel=0.25)


def test_relative_objective():
    r, l, dl = grid_points(noise=0.03, seed=1)
    fa, fr = fitlaw.fit_law(r, l, dl, "abs"), fitlaw.fit_law(r, l, dl, "rel")
    pa, pr = (fitlaw.law(r, l, *(f[k] for k in fitlaw.NAMES)) for f in (fa, fr))
    # each fit is the minimum of its own objective, and the two differ
    assert np.sum(((pr - dl) / dl) ** 2) < np.sum(((pa - dl) / dl) ** 2)
    assert np.sum((pa - dl) ** 2) < np.sum((pr - dl) ** 2)
    assert fr["objective"] == "rel" and abs(fr["alpha"] - TRUE["alpha"]) < 0.05


def test_replicates_are_averaged():
    r, l, dl = replicated(true_law, k=2, sd=0.05, seed=0)
    fit = fitlaw.fit_law(r, l, dl)
    pr, pl, ybar, counts, _ = fitlaw.replicate_means(r, l, dl)
    assert (counts == 2).all() and ybar == pytest.approx((dl[::2] + dl[1::2]) / 2)
    assert fit == {**fitlaw.fit_law(pr, pl, ybar), "n": 60}


# ---- per-sample Spearman, grouping and filters

def test_sample_spearman_by_hand():
    s = lambda e, f: dict(earliest_stubborn=e, first_failure=f)  # noqa: E731
    runs = [dict(per_sample=[s(0, 0), s(0, 0), s(1, 2), s(None, 5)]), dict(per_sample=[s(0, 0), s(2, 1), s(3, 3)]),
            dict(per_sample=None)]
    # all 6 pairs: tied ranks (2, 2, 2, 4, 5, 6) and (2, 2, 2, 5, 4, 6), Pearson on them = 14.5 / 15.5
    # without (0, 0): (1, 2), (2, 1), (3, 3), so d = (1, −1, 0) and ρ = 1 − 6·2 / (3·8) = 0.5
    assert studies.sample_spearman(runs) == dict(sample_spearman_rho=pytest.approx(29 / 31), sample_spearman_n=6,
                                                sample_spearman_rho_no00=pytest.approx(0.5), sample_spearman_n_no00=3)


def test_groups_by_study_and_reports_seeds(tmp_path, capsys):
    r, l, dl = replicated(true_law, k=2, sd=0.02, seed=0)
    seeds = np.tile([0, 1], r.size // 2)
    paths = write_runs(tmp_path, r, l, dl, seeds=seeds)  # no schedule key: the default "linear"
    paths += write_runs(tmp_path, r, l, dl, seeds=seeds, schedule="linear", start=1000)
    paths += write_runs(tmp_path, r, l, dl, seeds=seeds, schedule="constant", start=2000)
    paths += write_runs(tmp_path, r, l, dl, seeds=seeds, preset="fast", start=3000)
    paths += write_runs(tmp_path, r, l, dl, seeds=seeds, steps=20, start=4000)
    rc, groups, err = groups_of(capsys, paths)
    assert rc == 0, err
    groups = {(g["preset"], g["budget"], g["schedule"]): g for g in groups}
    assert set(groups) == {(None, 10, "linear"), (None, 10, "constant"), ("fast", 10, "linear"),
                           (None, 20, "linear")}
    g = groups[(None, 10, "linear")]
    assert g["n"] == 120 and g["points"] == 30 and g["replicated_points"] == 30 and g["max_replicates"] == 4
    assert groups[(None, 10, "constant")]["n"] == 60 and groups[(None, 10, "constant")]["max_replicates"] == 2
    # pooled seed sd by hand for a 2-replicate group: each point adds (y1 − y2)²/2 to SS_pe; df = 60 − 30
    by_hand = np.sqrt(np.sum((dl[::2] - dl[1::2]) ** 2 / 2) / 30)
    assert groups[("fast", 10, "linear")]["seed_sd"] == pytest.approx(by_hand)
    assert groups[("fast", 10, "linear")]["lof_df"] == [26, 30]
    text = cli(*paths[:60], "--bootstrap", 200)
    assert text.returncode == 0, text.stderr
    assert "30 points replicated (up to 2 runs)" in text.stdout and "lack of fit: F(26, 30) = " in text.stdout
    assert "95% CI (bootstrap over points, 200 of 200 resamples fitted): C [" in text.stdout


def test_runs_planned_in_epochs_form_one_study_across_lengths(tmp_path, capsys):
    """PhoneBooks of several sizes trained for the same epochs run different numbers of steps (batch 8:
    ℓ/10 steps per epoch); grouped by steps, each length would be a study of its own and β undetermined."""
    r, l, dl = grid_points(noise=0.0)
    paths = []
    for i, (ri, li, di) in enumerate(zip(r, l, dl)):
        steps = int(li) * 20  # 200 epochs of ℓ/10 steps
        paths += write_runs(tmp_path, [ri], [li], [di], start=i, steps=steps, budget=steps, schedule="constant",
                            settings={"epochs": 200, "steps": None})
    paths += write_runs(tmp_path, r, l, dl, start=100, steps=300, budget=300, schedule="constant",
                        settings={"epochs": 200, "steps": 300})  # --steps overrides --epochs: a step budget
    rc, groups, err = groups_of(capsys, paths)
    assert rc == 0, err
    assert [(g["budget"], g["n"]) for g in groups] == [("200 epochs", 30), (300, 30)]  # sorted as text
    g = groups[0]
    assert g["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-4) and g["beta"] == pytest.approx(TRUE["beta"], rel=1e-4)
    keys = [tuple(g[k] for k in studies.KEY) for g in groups]
    assert studies.group_slugs(keys) == ["200epochs", "300steps"]


def test_pooled_noise_levels_lack_of_fit_is_blind_and_says_so(tmp_path, capsys):
    """--combine-noise pools runs at other noise levels as replicates, so its pure error is the spread
    between the levels: a pooled mean that no law fits still passes, and the output says the test is blind."""
    steep = lambda r, l: fitlaw.law(r, l, C=5.0, alpha=0.9, beta=0.6, b=3.05)  # noqa: E731  another α, offset b
    paths = []
    for i, (noise, fn) in enumerate([(0.1, true_law), (0.5, steep)]):
        r, l, dl = replicated(fn, k=2, sd=0.02, seed=i)
        paths += write_runs(tmp_path, r, l, dl, noise=noise, seeds=np.tile([0, 1], r.size // 2), start=1000 * i)
    rc, groups, _ = groups_of(capsys, paths)
    assert rc == 0 and [g["noise"] for g in groups] == [0.1, 0.5]
    assert all(g["seed_sd"] < 0.03 for g in groups)  # each level's pure error: its seeds (sd 0.02)
    rc, (c,), _ = groups_of(capsys, paths, combine_noise=True)
    assert rc == 0 and c["noise"] == "combined" and c["max_replicates"] == 4
    assert c["seed_sd"] > 1.0 and c["lof_p"] > 0.05  # the levels' difference is taken for noise: no rejection
    # against the seeds' own spread (sd 0.02; the mean of 4 runs has variance 0.02²/4; df 30 per level)
    # the pooled mean is far from any one law
    r, l = (a.ravel().astype(float) for a in np.meshgrid(RANKS, LENGTHS))
    mean = (true_law(r, l) + steep(r, l)) / 2
    fit = fitlaw.fit_law(r, l, mean)
    rss = np.sum((mean - fitlaw.law(r, l, fit["C"], fit["alpha"], fit["beta"], fit["b"])) ** 2)
    assert f_dist.sf(rss / (r.size - 4) / (0.02 ** 2 / 4), r.size - 4, 60) < 1e-6
    fitlaw.main(paths, n_boot=0, combine_noise=True)
    text = capsys.readouterr().out
    assert "replicates: 30 points replicated (up to 4 runs); spread of ΔL over noise levels and seeds" in text
    assert "no evidence that the law fits" in text
    fitlaw.main(paths, n_boot=0)
    text = capsys.readouterr().out
    assert "seeds: 30 points replicated (up to 2 runs); seed-to-seed sd" in text and "no evidence" not in text


@pytest.mark.slow
def test_where_and_exclude_saturated(tmp_path, capsys):
    r, l, dl = grid_points(noise=0.01)
    paths = write_runs(tmp_path, r, l, dl, task="longctx", noise=1.0, lr=0.01)  # seed 0
    paths += write_runs(tmp_path, r, l, dl, task="longctx", noise=1, seeds=[1] * 30, start=100)  # no lr key
    paths += write_runs(tmp_path, r, l, dl, task="phonebook", start=200)

    def n_of(*where):
        rc, groups, _ = groups_of(capsys, paths, where=list(where))
        assert rc == 0
        return {(g["task"], g["noise"]): g["n"] for g in groups}

    assert n_of("seed=0") == {("longctx", 1.0): 30, ("phonebook", None): 30}
    assert n_of("noise=1.0") == {("longctx", 1.0): 60}
    assert n_of("task=longctx", "seed=1") == {("longctx", 1.0): 30}
    assert n_of("noise=null") == {("phonebook", None): 30}
    assert n_of("lr=0.01") == {("longctx", 1.0): 30}  # runs without an lr key do not match
    assert n_of("schedule=linear")[("phonebook", None)] == 30  # the default fills absent schedules
    rc, groups, err = groups_of(capsys, paths, where=["seed=7"])
    assert rc == 1 and groups == [] and "0 of 90 runs match" in err and "no run matches" in err
    p = cli(*paths, "--where", "seed")
    assert p.returncode == 2 and "key=value" in p.stderr
    p = cli(*paths, "--where", "task=phonebook", "--where", "seed=0", "--json", "--bootstrap", 0)
    assert [g["n"] for g in json.loads(p.stdout)] == [30] and "30 of 90 runs match" in p.stderr

    sat = tmp_path / "sat"
    sat.mkdir()
    em = [1.0 if i in (0, 7) else 0.0 for i in range(30)]  # memorised at two points
    paths = [write_runs(sat, r[i:i + 1], l[i:i + 1], dl[i:i + 1], start=i, exact_match=em[i])[0] for i in range(30)]
    # a second seed at point 3 is saturated (ΔL ≥ 0.95·loss_init); the first is not, but the point goes whole
    paths += write_runs(sat, r[3:4], l[3:4], dl[3:4], start=100, seeds=[1], loss_init=dl[3] / 0.96)
    _, (g,), _ = groups_of(capsys, paths, exclude_saturated=True)
    assert g["dropped_points"] == 3 and g["dropped_runs"] == 4 and g["n"] == 27 and g["points"] == 27
    _, (g,), _ = groups_of(capsys, paths)
    assert g["n"] == 31 and g["points"] == 30 and "dropped_points" not in g
    p = cli(*paths, "--exclude-saturated", "--bootstrap", 0)
    assert p.returncode == 0 and "--exclude-saturated dropped 3 points (4 runs)" in p.stdout


def test_at_step_takes_each_runs_snapshot(tmp_path):
    """Runs with snapshots at steps 100 and 300 (ΔL made up by the law at two budgets): --at-step picks
    each run's snapshot, groups them by that budget, and the fit recovers that budget's law."""
    rng = np.random.default_rng(0)
    truth = {100: (2.0, 0.3, 0.5, 0.1), 300: (3.0, 0.4, 0.6, 0.2)}
    paths = []
    for i, (r, l) in enumerate((r, l) for r in (1, 2, 4, 8, 16) for l in (25, 50, 100, 200)):
        snaps = [dict(step=t, delta_loss=float(law(r, l, *p)), token_acc=0.5, exact_match=0.0, per_sample=[])
                 for t, p in truth.items()]
        run = dict(model="m", task="longctx", method="sft", rank=r, length=l, noise=1.0, preset="paper", seed=0,
                   steps=300, budget=300, delta_loss=float(rng.normal()), snapshots=snaps if i else snaps[1:])
        f = tmp_path / f"run{i}.json"
        f.write_text(json.dumps(run))
        paths.append(str(f))
    runs, _, _ = studies.load_runs(paths)
    at100, missing = studies.at_step(runs, 100)
    assert missing == 1 and len(at100) == 19 and all(r["budget"] == 100 for r in at100)
    assert at100[0]["delta_loss"] == pytest.approx(law(1, 50, *truth[100]))
    fit = fitlaw.fit_law([r["rank"] for r in at100], [r["length"] for r in at100], [r["delta_loss"] for r in at100])
    assert [fit[k] for k in ("C", "alpha", "beta", "b")] == pytest.approx(truth[100], rel=1e-4, abs=1e-6)


def test_at_step_carries_a_run_memorised_earlier_forward():
    """A run stopped memorised at step 200 has no snapshot at 300: it enters at its final values. A run
    stopped at 200 for a plateau, or one memorised only at 400, does not."""
    base = dict(model="m", task="longctx", rank=1, length=25, snapshots=[dict(step=100, delta_loss=1.0)])
    runs = [dict(base, delta_loss=5.0, stop_reason="memorized", stopped_at=200),
            dict(base, delta_loss=4.0, stop_reason="plateau", stopped_at=200),
            dict(base, delta_loss=3.0, stop_reason="memorized", stopped_at=400)]
    out, missing = studies.at_step(runs, 300)
    assert missing == 2 and len(out) == 1 and out[0]["delta_loss"] == 5.0 and out[0]["budget"] == 300
    out, missing = studies.at_step(runs, 100)
    assert missing == 0 and [r["delta_loss"] for r in out] == [1.0, 1.0, 1.0]
