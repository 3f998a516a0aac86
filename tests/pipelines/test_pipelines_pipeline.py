"""The whole pipeline through kfp.local on tiny settings: artifacts, metrics, served model, drift report."""

import json
from pathlib import Path

import pytest
from conftest import free_ports

from pipelines import config
from pipelines.local import run_local

pytestmark = pytest.mark.slow


def tiny_config(tmp_path) -> config.Config:
    cfg = config.load(Path(__file__).resolve().parents[2] / "examples" / "quick.yaml")
    inference, management, metrics = free_ports(3)
    cfg.serving.inference_port, cfg.serving.management_port, cfg.serving.metrics_port = inference, management, metrics
    cfg.serving.home = str(tmp_path / "serving")
    cfg.monitor.replay_limit = 60
    return cfg


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(tmp_path)
    summary = run_local(cfg, runs_dir=tmp_path / "runs", run_id="e2e", serve_after=False)
    return summary, tmp_path


def test_run_succeeds_with_every_step(released_run):
    summary, tmp_path = released_run
    assert summary["status"] == "succeeded", json.dumps(summary, indent=1)
    for step, info in summary["steps"].items():
        assert info["status"] == "succeeded", step
        assert info["seconds"] > 0, step
    on_disk = json.loads((tmp_path / "runs" / "e2e" / "summary.json").read_text())
    assert on_disk["run_id"] == "e2e"
    assert list(on_disk["steps"]) == ["ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness",
                                      "record", "deploy", "monitor"], "steps in pipeline order"


def test_summary_types_mean_what_they_say(released_run):
    """Booleans are booleans and counts integers in summary.json (KFP keeps every metric as a float)."""
    summary, _ = released_run
    assert summary["blocked_by"] == []
    for name, gate in summary["gates"].items():
        assert gate["passed"] is True and gate["passed_checks"] is True and gate["overridden"] is False, name
        assert gate["blocked_by"] == [] and gate["reason"], name
        assert type(gate["n_test"] if "n_test" in gate else gate["n_per_side"]) is int, name
    assert type(summary["gates"]["privacy"]["n_leaks"]) is int and type(summary["gates"]["privacy"]["dp_trained"]) is bool
    assert type(summary["metrics"]["test_accuracy"]) is float and type(summary["metrics"]["n_test"]) is int


def test_accuracy_well_above_chance(released_run):
    summary, _ = released_run
    assert summary["metrics"]["test_accuracy"] >= 0.8  # chance is 0.1 on ten digits
    assert set(summary["gates"]) == {"evaluation", "privacy", "robustness"}
    assert all(g["passed"] for g in summary["gates"].values())


def test_served_and_monitored(released_run):
    summary, _ = released_run
    assert summary["endpoint"].startswith("http://127.0.0.1:") and summary["endpoint"].endswith("/predictions/digits")
    assert summary["management_endpoint"].startswith("http://127.0.0.1:")
    assert summary["token_file"].endswith("/token")  # the clients' token: kept for the next start
    for name in ("data_card", "evaluation", "privacy", "robustness", "drift", "drift_verdict"):
        assert Path(summary["reports"][name]).is_file(), name
    verdict = json.loads(Path(summary["reports"]["drift_verdict"]).read_text())
    # the replay is the clean test split, drawn like the reference: no drift
    assert verdict["drift_detected"] is False, verdict
    assert summary["serving"].startswith("stopped")


def test_the_ledger_holds_the_run_trained_gated_released_and_its_drift(released_run):
    """The run's records, in order, each following from the one before: from the model in production back to
    its run, config, data and gates; its monitored window after it."""
    from components.core.ledger import Ledger, config_sha256

    summary, tmp_path = released_run
    ledger = Ledger(tmp_path / "serving" / "ledger")
    trained, gated, released, drift = ledger.records()
    assert [r.type for r in (trained, gated, released, drift)] == ["trained", "gated", "released", "drift"]
    assert (gated.parents, released.parents, drift.parents) == ((trained.id,), (gated.id,), (released.id,))
    assert trained.data["run_id"] == "e2e" and trained.data["config_sha256"] == config_sha256(trained.data["config"])
    assert trained.data["config"]["pretrain"]["epochs"] == 3 and trained.data["data_card_sha256"]
    assert trained.data["code"]["package_version"] and "image" not in trained.data["code"], "a subprocess run"
    assert set(trained.data["cost"]["steps"]) == {"ingest", "pretrain", "finetune", "evaluate", "privacy",
                                                  "robustness"}
    version = summary["deployment"]["model_version"]
    assert trained.data["model_version"] == gated.data["model_version"] == released.data["model_version"] == version
    assert gated.data["passed"] and gated.data["gates"]["evaluation"]["numbers"]["test_accuracy"] == \
        summary["metrics"]["test_accuracy"]
    assert gated.data["gates"]["privacy"]["reason"].startswith("membership-inference")
    assert (released.data["strategy"], released.data["target"]) == ("replace", "local")
    assert released.data["endpoint"] == summary["endpoint"] and released.data["run_id"]
    assert summary["deployment"]["released_record"] == released.id and ledger.in_production() == released
    verdict = json.loads(Path(summary["reports"]["drift_verdict"]).read_text())
    assert verdict["ledger_record"] == drift.id and drift.data["drift_detected"] is False
    assert summary["steps"]["record"]["status"] == "succeeded"


def test_blocked_release_skips_deploy(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg.pretrain.epochs = 1
    cfg.finetune.epochs = 2
    cfg.gates.min_test_accuracy = 0.9999  # unreachable on purpose
    summary = run_local(cfg, runs_dir=tmp_path / "runs", run_id="blocked", serve_after=False)
    assert summary["status"] == "blocked" and summary["blocked_by"][0] == "evaluation"  # robustness may block too
    assert summary["blocked_by"] == [g for g, v in summary["gates"].items() if not v["passed"]]
    evaluation = summary["gates"]["evaluation"]
    assert evaluation["passed"] is False and evaluation["blocked_by"] == ["min_test_accuracy"]
    assert "test accuracy" in evaluation["reason"] and "0.9999" in evaluation["reason"]
    assert "finetune.epochs" in evaluation["remedy"]
    console = capsys.readouterr().out
    # the step's own line, as it ran, and the summary's: the number, its limit and what to try
    assert f"evaluate BLOCKED: {evaluation['reason']} ({evaluation['remedy']})" in console
    assert f"Gate evaluation  BLOCKED: {evaluation['reason']} ({evaluation['remedy']})" in console
    assert "] 4/9 evaluate succeeded in " in console and "] 8/9 deploy" not in console
    assert summary["steps"]["deploy"]["status"] == "skipped"
    assert "evaluation" in summary["steps"]["deploy"]["reason"]
    assert summary["endpoint"] is None
    from components.core.ledger import Ledger

    # Recorded all the same (the record step sits outside the gates' conditions): trained, and gated: blocked.
    trained, gated = Ledger(tmp_path / "serving" / "ledger").records()
    assert gated.parents == (trained.id,) and gated.data["passed"] is False
    assert "evaluation" in gated.data["blocked_by"] and "test accuracy" in gated.data["gates"]["evaluation"]["reason"]
    assert gated.data["blocked_by"] == [g for g, v in summary["gates"].items() if not v["passed"]]


def test_failed_step_is_reported(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.source = str(tmp_path / "does-not-exist.npz")
    summary = run_local(cfg, runs_dir=tmp_path / "runs", run_id="failed", serve_after=False, quiet=True)
    assert summary["status"] == "failed"
    assert summary["failed_step"] == "ingest"
    assert summary["steps"]["ingest"]["status"] == "failed"
    assert summary["steps"]["pretrain"]["status"] == "skipped"
