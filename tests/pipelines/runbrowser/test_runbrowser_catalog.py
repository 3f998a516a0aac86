"""The run browser's catalog on fake run directories: every outcome and old summaries, production, the ledger as a
timeline, monitoring windows merged from their three sources, comparisons."""

import json

import pytest
from runbrowser_support import summary, write_verdict

from components.core.ledger import Ledger
from pipelines.browser import catalog


def test_rows_for_every_outcome_old_summaries_and_broken_files(make_run):
    make_run("a-ok", mtime=1_700_000_000)
    make_run("b-blocked", "blocked", mtime=1_700_000_100, accuracy=0.5)
    make_run("c-failed", "failed", mtime=1_700_000_200)
    make_run("d-old", raw={"run_id": "d-old", "status": "succeeded", "steps": {"ingest": {"status": "succeeded"}}},
             mtime=1_700_000_300)
    make_run("e-broken", raw="{not json", mtime=1_700_000_400)
    make_run("f-going", "unfinished", mtime=1_700_000_500)
    (make_run.runs / "serving").mkdir()  # not a run: no summary, no config
    rows = catalog.list_runs(make_run.runs)
    assert [r["run_id"] for r in rows] == ["f-going", "e-broken", "d-old", "c-failed", "b-blocked", "a-ok"]
    by_id = {r["run_id"]: r for r in rows}
    assert by_id["a-ok"]["gates"] == {"evaluation": True, "privacy": True, "robustness": True}
    assert by_id["a-ok"]["test_accuracy"] == 0.95 and by_id["a-ok"]["started_at"] == "2023-11-14T22:13:20Z"
    assert by_id["a-ok"]["cost"]["wall_seconds"] == sum(1.0 + i for i in range(9))
    assert by_id["b-blocked"]["blocked_by"] == ["evaluation"] and by_id["b-blocked"]["gates"]["evaluation"] is False
    assert by_id["c-failed"]["failed_step"] == "ingest" and by_id["c-failed"]["gates"]["evaluation"] is None
    assert by_id["d-old"]["test_accuracy"] is None and by_id["d-old"]["model_version"] is None
    assert by_id["e-broken"]["status"] == "unreadable" and "summary.json" in by_id["e-broken"]["problem"]
    assert by_id["f-going"]["status"] == "unfinished"
    for run_dir in catalog.run_dirs(make_run.runs):  # the run page's data, for each of them, without a KeyError
        detail = catalog.run_detail(run_dir)
        assert detail["run_id"] == run_dir.name and isinstance(detail["steps"], list)


def test_new_summary_keys_are_used_when_present(make_run):
    gates = summary("x", "blocked")["gates"]
    gates["evaluation"]["reason"] = "test accuracy 0.50 < 0.90"
    steps = summary("x", "blocked")["steps"]
    steps["pretrain"]["index"], steps["ingest"]["index"] = 0, 1  # the order the summary gives wins
    make_run("x", "blocked", gates=gates, steps=steps, blocked_by=["evaluation"], orchestration={"runner": "kfp"})
    detail = catalog.run_detail(make_run.runs / "x")
    assert detail["blocked_by"] == ["evaluation"] and detail["orchestration"] == {"runner": "kfp"}
    assert detail["gates_detail"][0] == {"name": "evaluation", "passed": False, "reason": "test accuracy 0.50 < 0.90",
                                         "overridden": False,
                                         "numbers": {"test_accuracy": 0.95, "min_test_accuracy": 0.9}}
    assert [s["name"] for s in detail["steps"]][:2] == ["pretrain", "ingest"]
    deploy = next(s for s in detail["steps"] if s["name"] == "deploy")
    assert deploy["status"] == "skipped" and "evaluation" in deploy["reason"]
    assert deploy["parents"] == ["evaluate", "privacy", "robustness"]


def test_find_run_and_the_newest(make_run):
    with pytest.raises(FileNotFoundError, match="mlops run"):
        catalog.find_run(make_run.runs)
    make_run("old", mtime=1_700_000_000)
    make_run("new", mtime=1_700_000_999)
    assert catalog.find_run(make_run.runs).name == "new"
    with pytest.raises(FileNotFoundError, match="runs there: new, old"):
        catalog.find_run(make_run.runs, "../serving")


def test_production_from_the_serving_state_then_the_ledger(make_run, tmp_path):
    make_run("r1")
    make_run("r2")
    home = tmp_path / "serving"
    ledger = Ledger(home / "ledger")
    trained = ledger.append("trained", {"run_id": "r1", "model_version": "v1", "config": {}, "config_sha256": "x"})
    gated = ledger.append("gated", {"run_id": "r1", "model_version": "v1", "gates": {}, "passed": True},
                          parents=[trained])
    ledger.append("released", {"model_name": "digits", "model_version": "v1", "target": "local", "endpoint": "e",
                               "strategy": "replace"}, parents=[gated])
    prod = catalog.production(home, ledger)
    assert prod["run_id"] == "r1" and prod["model_version"] == "v1" and prod["serving"] == "unknown"
    assert [r["run_id"] for r in catalog.list_runs(make_run.runs, prod) if r["in_production"]] == ["r1"]
    # The local server's state says what serves now, even when it is not the ledger's latest release.
    home.mkdir(exist_ok=True)
    (home / "state.json").write_text(json.dumps({"model_version": "v2", "run_id": "r2", "pid": 123}))
    prod = catalog.production(home, ledger)
    assert prod["run_id"] == "r2" and prod["serving"] == "running"
    assert catalog.production(tmp_path / "nowhere", None) is None


def test_release_events_link_every_record_to_its_run(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    trained = ledger.append("trained", {"run_id": "r1", "model_version": "v1", "config": {}, "config_sha256": "x"})
    gated = ledger.append("gated", {"run_id": "r1", "model_version": "v1", "gates": {}, "passed": False,
                                    "blocked_by": ["privacy"]}, parents=[trained])
    released = ledger.append("released", {"model_name": "d", "model_version": "v1", "target": "local",
                                          "endpoint": "http://x", "strategy": "replace",
                                          "override": {"reason": "J. Doe accepts"}}, parents=[gated])
    drift = ledger.append("drift", {"model_version": "v1", "window": {"since": "a", "until": "b"},
                                    "drift_detected": True, "status": "drift", "drift_share": 0.75,
                                    "drifted_features": ["pixel_mean"]}, parents=[released])
    ledger.append("rolled_back", {"model_version": "v1", "reason": "drifted"}, parents=[drift])
    events = catalog.release_events(ledger)
    assert [e["type"] for e in events] == ["rolled_back", "drift", "released", "gated", "trained"]
    assert {e["run_id"] for e in events} == {"r1"}, "each event walks back to the run that trained the model"
    assert "blocked by privacy" in events[3]["summary"] and "J. Doe accepts" in events[2]["summary"]
    assert events[1]["drift_detected"] is True and "pixel_mean" in events[1]["summary"]
    assert catalog.release_events(None) == []


def test_monitoring_windows_merged_from_monitor_runs_and_ledger(make_run, tmp_path):
    monitor = make_run.runs / "monitor" / "v1"
    write_verdict(monitor / "w1", "v1", "2026-01-01T10:00:00+00:00", "2026-01-01T11:00:00+00:00")
    write_verdict(monitor / "w2", "v1", "2026-01-01T11:00:00+00:00", "2026-01-01T12:00:00+00:00", "drift", 0.75,
                  ["pixel_mean", "ink_fraction"])
    (monitor / "w3").mkdir()
    (monitor / "w3" / "verdict.json").write_text("{broken")
    run_verdict = write_verdict(tmp_path / "kfp-artifact", "v1", "2026-01-01T09:00:00+00:00",
                                "2026-01-01T09:01:00+00:00")
    make_run("r1", reports={"drift_verdict": (".json", json.dumps(run_verdict)), "drift": (".html", "<p>x</p>")})
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("drift", {"model_version": "v1", "drift_detected": True, "status": "drift", "drift_share": 0.75,
                            "window": {"since": "2026-01-01T11:00:00+00:00", "until": "2026-01-01T12:00:00+00:00"},
                            "drifted_features": ["pixel_mean", "ink_fraction"], "report": "/gone/drift_report.html"})
    ledger.append("drift", {"model_version": "v1", "drift_detected": False, "status": "ok", "drift_share": 0.0,
                            "window": {"since": "2026-01-02T00:00:00+00:00", "until": "2026-01-02T01:00:00+00:00"}})
    problems = []
    windows = catalog.monitoring_windows(make_run.runs, ledger, problems=problems)
    assert [(w["until"][:16], w["source"]) for w in windows] == [
        ("2026-01-01T09:01", "run"), ("2026-01-01T11:00", "mlops monitor"), ("2026-01-01T12:00", "mlops monitor"),
        ("2026-01-02T01:00", "ledger")]
    drifted = windows[2]
    assert drifted["ledger_record"] == "0000000001", "the ledger's record of the same window is merged in"
    assert drifted["n_drifted"] == 2 and drifted["status"] == "drift"
    assert drifted["report"].endswith("drift_report.html")
    assert windows[0]["run_id"] == "r1" and windows[0]["report"].endswith("drift.html")
    assert windows[3]["report"] is None
    assert len(problems) == 1 and "w3" in problems[0]


def test_compare_marks_what_differs_and_needs_two_runs(make_run):
    make_run("a", config={"pretrain": {"epochs": 3, "width": 16}})
    make_run("b", accuracy=0.9, config={"pretrain": {"epochs": 5, "width": 16}})
    details = [catalog.run_detail(make_run.runs / name) for name in ("a", "b")]
    table = catalog.compare_runs(details)
    rows = {(r["section"], r["key"]): r for r in table["rows"]}
    assert rows[("config", "pretrain.epochs")] == {"section": "config", "key": "pretrain.epochs", "values": [3, 5],
                                                   "differs": True}
    assert rows[("config", "pretrain.width")]["differs"] is False
    assert rows[("metrics", "test_accuracy")]["values"] == [0.95, 0.9]
    assert rows[("gates", "evaluation.passed")]["differs"] is False
    with pytest.raises(ValueError, match="at least two"):
        catalog.compare_runs(details[:1])


def test_catalog_of_an_empty_or_missing_directory(tmp_path):
    cat = catalog.catalog(tmp_path / "none", tmp_path / "serving", str(tmp_path / "serving" / "ledger"))
    assert cat["runs"] == [] and cat["windows"] == [] and cat["releases"] == [] and cat["production"] is None
