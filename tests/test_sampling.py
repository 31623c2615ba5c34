"""docs/sampling.py: rows drawn with the shared sampler seed 0 are drawn again with each run's own seed and
replaced; rows that already have their own seed, and Π p rows (K = 0), are kept."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import sampling  # noqa: E402


def test_shared_seed_rows_are_redrawn_and_replaced(tmp_path, monkeypatch):
    run = dict(name="longctx-n1-L25-r1-sft-const-s0", task="longctx", exact_match=1.0, length=25, rank=1, seed=0)
    other = run | dict(name="longctx-n1-L25-r2-sft-const-s0", rank=2)
    for r in (run, other):
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
        (tmp_path / r["name"]).mkdir()
        (tmp_path / r["name"] / "adapter.json").write_text("{}")
    row = lambda r, t, seed: dict(name=r["name"], temperature=t, k=100, sampled=0.5, sampler_seed=seed)  # noqa: E731
    out = tmp_path / "sampling.json"
    out.write_text(json.dumps(dict(rows=[row(run, 0.5, None), row(run, 1.0, None), row(other, 0.5, 7), row(other, 1.0, 8)])))
    calls = []

    def measure(r, adapter, k, temps):
        calls.append((r["name"], k, temps))
        return [row(r, t, sampling.sampler_seed(r["name"], t)) for t in temps]

    monkeypatch.setattr(sampling, "OUT", out)
    monkeypatch.setattr(sampling, "measure", measure)
    sampling.main(100, [0.5, 1.0], tmp_path, {0})
    assert calls == [(run["name"], 100, [0.5, 1.0])]  # only the shared-seed run is drawn again
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["sampler_seed"] is not None for r in rows)
    mine = {r["temperature"]: r["sampler_seed"] for r in rows if r["name"] == run["name"]}
    assert mine[0.5] != mine[1.0]  # a seed per run and temperature
    assert {r["sampler_seed"] for r in rows if r["name"] == other["name"]} == {7, 8}  # kept as they were
    sampling.main(100, [0.5, 1.0], tmp_path, {0})
    assert len(calls) == 1  # nothing left to draw


def test_a_retrained_adapter_is_kept_only_where_the_run_ended_as_recorded(tmp_path, monkeypatch):
    """By hand: the same stop step and a final loss 2e-4 off (the drift measured between retrains) keeps the
    adapter; 2e-3 off, or another stop step, does not."""
    import train

    run = dict(name="longctx-n1-L200-r16-sft-const-s0", stopped_at=200, loss_final=0.069106,
               settings=dict(task="longctx", length=200, rank=16))

    def fake(stopped_at, loss_final):
        def main(cfg):
            (tmp_path / ".retrain" / run["name"]).mkdir(parents=True, exist_ok=True)
            return dict(stopped_at=stopped_at, loss_final=loss_final)
        return main

    for stopped_at, loss, kept in ((200, 0.069106 * (1 + 2e-3), False), (190, 0.069106, False),
                                   (200, 0.0691204, True)):
        monkeypatch.setattr(train, "main", fake(stopped_at, loss))
        assert sampling.retrain(run, tmp_path) is kept
        assert (tmp_path / run["name"] / "RETRAINED").is_file() is kept
