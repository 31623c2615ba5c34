"""docs/capacity.py's bisection, against a case worked by hand: a fake train.py whose runs recall an
answer exactly up to a known length per seed; and the report's capacity table on a probe under way."""

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))  # capacity.py imports convergence.py beside it


def load_docs(name: str):
    """docs/<name>.py as a module (docs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(out: Path, rank: int, length: int, seed: int, exact: bool, method: str = "sft") -> None:
    data = "" if seed == 0 else "-d0"  # train.py's names: the data seed shows when it differs
    run = {"seed": seed, "data_seed": 0, "budget": 2000, "exact_match": 1.0 if exact else 0.5}
    (out / f"longctx-n1-L{length}-r{rank}-{method}-const-s{seed}{data}.json").write_text(json.dumps(run))


def load_into(tmp_path: Path, monkeypatch):
    """docs/capacity.py with its grid folder and its probes' folder under tmp_path: (module, grid, probes)."""
    capacity = load_docs("capacity")
    grid, probes = tmp_path / "grid", tmp_path / "grid" / "capacity"
    probes.mkdir(parents=True)
    monkeypatch.setattr(capacity, "GRID", grid)
    monkeypatch.setattr(capacity, "OUT", probes)
    monkeypatch.setattr(capacity, "BOUNDARY", grid / "boundary")
    return capacity, grid, probes


def test_bisects_and_skips_the_seeds_after_a_failure(tmp_path, monkeypatch):
    capacity, grid, probes = load_into(tmp_path, monkeypatch)
    longest = {0: 44, 1: 47}  # each seed recalls answers up to this length: the rank's capacity is 44
    calls = []

    def fake_train(cmd: list[str], check: bool, cwd: Path) -> None:
        arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        length, rank, seed = int(arg["--length"]), int(arg["--rank"]), int(arg["--seed"])
        calls.append((length, seed))
        write_run(Path(arg["--out"]), rank, length, seed, length <= longest[seed])

    monkeypatch.setattr(capacity.subprocess, "run", fake_train)
    for seed in (0, 1):  # the grid: ℓ = 25 held by both seeds, ℓ = 100 lost by both
        write_run(grid, 2, 25, seed, True)
        write_run(grid, 2, 100, seed, False)

    assert capacity.bisect(2, [0, 1], tolerance=0.1, python="python", max_length=1600) == (42, 46)
    # By hand: ℓ = √(25·100) = 50 is lost by seed 0, so seed 1 never runs; 35 and 42 are held by both;
    # √(42·50) ≈ 46 is lost by seed 0; 46/42 − 1 < 0.1 stops.
    assert calls == [(50, 0), (35, 0), (35, 1), (42, 0), (42, 1), (46, 0)]
    # the probes went to their own folder, the grid's folder holds the grid alone
    assert len(list(probes.glob("*.json"))) == 6 and len(list(grid.glob("*.json"))) == 4


def test_a_memft_method_starts_from_sfts_bracket_and_bisects_its_own_runs(tmp_path, monkeypatch):
    capacity, grid, probes = load_into(tmp_path, monkeypatch)
    calls = []

    def fake_train(cmd: list[str], check: bool, cwd: Path) -> None:
        arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        length, rank, seed, method = int(arg["--length"]), int(arg["--rank"]), int(arg["--seed"]), arg["--method"]
        calls.append((length, seed, method))
        write_run(Path(arg["--out"]), rank, length, seed, length <= 30, method)  # SW holds up to 30 on both seeds

    monkeypatch.setattr(capacity.subprocess, "run", fake_train)
    for seed in (0, 1):  # SFT's grid: 25 held, 100 lost; SW has no run yet
        write_run(grid, 2, 25, seed, True)
        write_run(grid, 2, 100, seed, False)
    assert capacity.bisect(2, [0, 1], tolerance=0.1, python="python", max_length=1600, method="sw") == (30, 32)
    # By hand: SW first probes SFT's held 25 (held); doubling gives 50 (lost by seed 0); √(25·50) ≈ 35 lost;
    # √(25·35) ≈ 30 held by both; √(30·35) ≈ 32 lost; 32/30 − 1 < 0.1 stops. SFT's runs never count for SW.
    assert calls == [(25, 0, "sw"), (25, 1, "sw"), (50, 0, "sw"), (35, 0, "sw"), (30, 0, "sw"), (30, 1, "sw"),
                     (32, 0, "sw")]


def test_a_failure_decides_before_every_seed_has_run(tmp_path, monkeypatch):
    capacity, grid, probes = load_into(tmp_path, monkeypatch)
    write_run(probes, 4, 120, 1, True)
    assert capacity.held(4, 120, [0, 1]) is None  # seed 0 has not run: undecided
    write_run(probes, 4, 120, 0, False)
    assert capacity.held(4, 120, [0, 1]) is False
    write_run(grid, 4, 60, 0, False)
    assert capacity.held(4, 60, [0, 1]) is False  # one failed seed is enough
    assert capacity.bounds(4, [0, 1]) == (None, 60)


def test_report_counts_a_length_only_when_every_seed_has_decided_it():
    """docs/convergence.py's capacity table, by hand: ℓ = 50 run by one seed of two (exactly) is undecided,
    even when that seed's run is found twice (in the grid's folder and stage 10's), and ℓ = 100 is lost by its
    one failed seed."""
    convergence = load_docs("convergence")

    def run(length: int, seed: int, exact: bool, loss_final: float) -> dict:
        return dict(rank=2, params=2304, length=length, seed=seed, exact_match=1.0 if exact else 0.5,
                    loss_final=loss_final)

    runs = [run(25, 0, True, 0.1), run(25, 1, True, 0.2), run(50, 0, True, 0.1), run(50, 0, True, 0.1),
            run(100, 0, False, 9.0)]
    [row] = convergence.capacity_rows(runs)
    ln_v = math.log(49152)
    # Morris: the most ℓ·(ln V − L_final)/ln 2 over the runs is ℓ = 50 at L_final 0.1 (25 at 0.1 is half)
    morris = max(50 * (ln_v - 0.1), 100 * (ln_v - 9.0)) / math.log(2) / 2304
    assert row == [2, 2304, 2, 25, 100, 25 * math.log2(49152) / 2304, morris]


def test_capacity_table_marks_the_bits_of_an_unbracketed_rank_as_a_lower_bound():
    """A rank that held every length it was given may hold more: its bits read "≥", a bracketed rank's do not."""
    convergence = load_docs("convergence")
    rows = [[4, 4608, 2, 141, 168, 0.4769, 0.6431], [16, 18432, 2, 200, None, 0.1691, 0.1686]]
    lines = convergence.capacity_table(rows).splitlines()
    assert lines[2] == "| 4 | 4608 | 2 | 141 | 168 | 0.4769 | 0.6431 |"
    assert lines[3] == "| 16 | 18432 | 2 | 200 | – | ≥ 0.1691 | ≥ 0.1686 |"
