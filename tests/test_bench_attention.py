"""benchmarks/attention.py keeps what it measured: results flushed after every (workload,
implementation) pair, ours first; the budget turns the rest into 'skipped' rows."""

from __future__ import annotations

import json

import benchmarks.attention as ba


def _fake_time_one(name, impl, f, inputs, do, lens, window, shapes, device):
    return [dict(workload=name, impl=impl, mode=m, ms=1.0, tflops=0.0) for m in ("fwd", "fwd+bwd")]


def test_flush_after_every_pair_ours_first(monkeypatch):
    monkeypatch.setattr(ba, "time_one", _fake_time_one)
    seen = []
    rows = ba.bench_all(True, budget_s=1e9, flush=lambda r: seen.append([dict(x) for x in r]))
    pairs = {(r["workload"], r["impl"]) for r in rows}
    assert len(seen) == len(pairs) >= 6  # one flush per pair, each growing by that pair's 2 rows
    assert [len(s) for s in seen] == list(range(2, 2 * len(pairs) + 1, 2))
    first_impls = [{r["impl"] for r in s} for s in seen[:3]]
    assert first_impls == [{"ours"}] * 3  # every workload's ours row is saved before any peer


def test_budget_spent_gives_skipped_rows(monkeypatch):
    monkeypatch.setattr(ba, "time_one", _fake_time_one)
    rows = ba.bench_all(True, budget_s=0.0)
    assert rows and all(r["error"].startswith("skipped:") for r in rows)


def test_main_writes_complete_results(monkeypatch, tmp_path):
    monkeypatch.setattr(ba, "time_one", _fake_time_one)
    monkeypatch.setenv("R7B_RESULTS_DIR", str(tmp_path))
    assert ba.main(["--smoke"]) == 0
    payload = json.loads((tmp_path / "attention.json").read_text())
    assert payload["complete"] is True and len(payload["rows"]) >= 12
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_bwd_schedule_switches_and_restores():
    from r7b_fast.kernels import attention_bwd

    before = attention_bwd.SCHEDULE
    with ba.bwd_schedule("ours_atomic"):
        assert attention_bwd.SCHEDULE == "atomic"
    with ba.bwd_schedule("flex"):  # a peer: untouched
        assert attention_bwd.SCHEDULE == before
    assert attention_bwd.SCHEDULE == before
