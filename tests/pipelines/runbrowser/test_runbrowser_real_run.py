"""The run browser on real runs of the pipeline (kfp.local, examples/quick.yaml with a shorter replay): one
released, one failed at its first step. What the summaries, the ledger and the monitor step really write must all
show."""

import json
from pathlib import Path

import pytest
from conftest import free_ports

from pipelines import config
from pipelines.browser import catalog
from pipelines.browser.site import build_site
from pipelines.local import run_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runbrowser")
    cfg = config.load(Path(__file__).resolve().parents[3] / "examples" / "quick.yaml")
    cfg.serving.inference_port, cfg.serving.management_port, cfg.serving.metrics_port = free_ports(3)
    cfg.serving.home = str(tmp_path / "serving")
    cfg.monitor.replay_limit = 60
    runs = tmp_path / "runs"
    released = run_local(cfg, runs_dir=runs, run_id="released", serve_after=False, quiet=True)
    cfg.data.source = str(tmp_path / "does-not-exist.npz")
    failed = run_local(cfg, runs_dir=runs, run_id="failed", serve_after=False, quiet=True)
    assert released["status"] == "succeeded", json.dumps(released, indent=1, default=str)
    assert failed["status"] == "failed"
    return runs, tmp_path / "serving", released


def test_catalog_of_real_runs(real_runs):
    runs, home, released = real_runs
    cat = catalog.catalog(runs, home, str(home / "ledger"))
    rows = {r["run_id"]: r for r in cat["runs"]}
    row = rows["released"]
    assert row["status"] == "succeeded" and row["gates"] == {"evaluation": True, "privacy": True, "robustness": True}
    assert row["model_version"] == released["deployment"]["model_version"]
    assert row["test_accuracy"] == released["metrics"]["test_accuracy"] and row["cost"]["cpu_seconds"] > 0
    assert row["in_production"] is True and cat["production"]["run_id"] == "released"
    assert rows["failed"]["status"] == "failed" and rows["failed"]["failed_step"] == "ingest"
    assert {"trained", "gated", "released", "drift"} <= {e["type"] for e in cat["releases"]}
    assert {e["run_id"] for e in cat["releases"]} == {"released"}
    [window] = cat["windows"]
    assert window["run_id"] == "released" and window["status"] in ("ok", "drift", "insufficient_data")
    assert window["ledger_record"] and window["report"] and Path(window["report"]).is_file()
    detail = cat["details"]["released"]
    assert [s["status"] for s in detail["steps"]] == ["succeeded"] * 9
    assert {r["name"] for r in detail["reports"]} == set(released["reports"])


def test_site_of_real_runs(real_runs):
    runs, home, released = real_runs
    index = build_site(runs, serving_home=home)
    page = (index.parent / "run" / "released.html").read_text()
    for name, path in released["reports"].items():  # every report the summary lists, rendered by its suffix
        assert f'id="report-{name}"' in page, name
        if path.endswith(".html"):
            assert f'src="../../released/reports/{Path(path).name}"' in page, name
    assert "<h1>" in page.split('id="report-data_card"')[1], "the data card's Markdown is rendered"
    assert 'id="chart-steps"' in page
    assert 'data-run-id="failed"' in index.read_text()
    assert 'id="page-run"' in (index.parent / "run" / "failed.html").read_text()
    monitoring = (index.parent / "monitoring.html").read_text()
    assert 'href="../released/reports/drift.html"' in monitoring
