"""Monitor: what ``monitor()`` writes for one window (verdict, report, Prometheus text), and only for it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from monitor_traffic import T0, log_records, write_log

from components.core.data import REFERENCE_FILE
from components.core.features import FEATURE_COLUMNS, image_features
from components.monitor.monitor import monitor
from components.monitor.traffic import EXCLUDED_SOURCES
from pipelines.config import MonitorConfig

MONITOR = MonitorConfig()  # the run's default monitor settings


def test_monitor_writes_verdict_and_report_for_its_window_only(tmp_path, reference, held_out):
    reference_csv = tmp_path / REFERENCE_FILE
    reference.to_csv(reference_csv, index=False)
    logs = tmp_path / "requests"
    inverted = image_features(1.0 - held_out[:200])
    # Clean v1 traffic in the window; inverted traffic before it, from another model version
    # and from the smoke test inside it: none of that may leak into the verdict.
    write_log(logs / "old.jsonl", log_records(inverted.iloc[:100], T0 - timedelta(hours=1)))
    clean = log_records(image_features(held_out[:150]), T0, step_s=0.5)
    for record in clean[:30]:
        record["edge_strength"] = None  # some NaN: reported, and the test runs on the other rows
    write_log(logs / "live.jsonl",
              clean
              + log_records(inverted.iloc[100:150], T0, model_version="2")
              + log_records(inverted.iloc[150:], T0, source=EXCLUDED_SOURCES[0]),
              tail='{"timestamp": "2025-01-01T12:')
    out = tmp_path / "out"
    result = monitor(reference_csv, logs, out, MONITOR, since=T0, until=T0 + timedelta(hours=1), model_version="1")
    assert result["status"] == "ok", result["message"]
    assert result["current_rows"] == 150 and result["log"]["rows_in_window"] == 250
    assert result["log"]["rows_of_version"] == 200 and result["log"]["rows_selected"] == 150
    assert result["log"]["partial_lines"] == 1 and result["log"]["bad_lines"] == 0
    assert result["nan_share"]["edge_strength"] == {"reference": 0.0, "current": 0.2}
    assert result["features"]["edge_strength"]["current_rows"] == 120
    assert result["features"]["pixel_mean"]["current_rows"] == 150
    assert result["sampling"]["sampled"] is False and result["sampling"]["rows"] == 150
    # No model reference: image features only, and the verdict says so.
    assert result["checks"] == ["image_features"] and result["model_reference"]["found"] is False
    assert "image features only" in result["message"]
    saved = json.loads(Path(result["verdict_json"]).read_text())
    assert saved == {k: v for k, v in result.items() if k not in ("report_html", "verdict_json", "metrics_prom")}
    report = Path(result["report_html"]).read_text()
    assert Path(result["report_html"]) == out / "drift_report.html"
    assert "Dataset Drift" in report and all(c in report for c in FEATURE_COLUMNS)  # Evidently's report
    assert "Drift verdict: ok" in report  # our summary on top
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files

    # An empty window: the guard's verdict and a small page that explains it, no Evidently run.
    empty = monitor(reference_csv, logs, out, MONITOR, since=T0 + timedelta(days=1))
    assert empty["status"] == "insufficient_data" and empty["current_rows"] == 0
    page = Path(empty["report_html"]).read_text()
    assert "No requests in the window" in page and "insufficient data" in page
    other = monitor(reference_csv, logs, out, MONITOR, since=T0, until=T0 + timedelta(hours=1), model_version="9")
    assert other["status"] == "insufficient_data" and "250 other requests in the time window" in other["message"]
    assert json.loads(Path(empty["verdict_json"]).read_text())["status"] == "insufficient_data"
    assert 'kfp_mlops_drift_status{model_version="9",status="insufficient_data"} 1' in Path(
        other["metrics_prom"]).read_text()  # the last run into `out`


def test_monitor_missing_reference_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="written by ingest"):
        monitor(tmp_path / "reference.csv", tmp_path, tmp_path / "out", MONITOR)
