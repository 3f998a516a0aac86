"""Fake run directories for the run browser's tests: small summaries in the shapes pipelines/local.py writes (and
older ones), built in tmp_path; the make_run fixture is registered in conftest.py."""

import json
from pathlib import Path

import pytest

STEPS = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "record", "deploy", "monitor")


def _step(status, seconds=1.0, **extra):
    cost = {"wall_seconds": seconds, "cpu_seconds": seconds * 2, "gpu_seconds": 0.0, "peak_rss_mb": 300.0}
    return {"status": status, "seconds": seconds if status == "succeeded" else None,
            **({"cost": cost} if status == "succeeded" else {}), **extra}


def summary(run_id, status="succeeded", accuracy=0.95, reports=None, **extra):
    """A summary as pipelines/local.py writes it, for one of three outcomes."""
    gates_passed = {"evaluation": True, "privacy": True, "robustness": True}
    if status == "blocked":
        gates_passed["evaluation"] = False
    steps = {name: _step("succeeded", 1.0 + i) for i, name in enumerate(STEPS)}
    if status == "blocked":
        steps["deploy"] = _step("skipped", reason="gate(s) not passed: evaluation")
        steps["monitor"] = _step("skipped", reason="gate(s) not passed: evaluation")
    if status == "failed":
        steps = {name: _step("skipped", reason="an earlier step failed: ingest") for name in STEPS}
        steps["ingest"] = _step("failed")
    gates = {} if status == "failed" else {
        name: {"passed": ok, "test_accuracy": accuracy, "min_test_accuracy": 0.9} for name, ok in gates_passed.items()}
    out = {"run_id": run_id, "runner": "subprocess", "status": status, "seconds": 30.0, "steps": steps,
           "metrics": {} if status == "failed" else {"test_accuracy": accuracy, "macro_f1": accuracy - 0.01},
           "gates": gates, "endpoint": None, "token_file": None, "reports": reports or {}, "artifacts": {},
           "run_dir": "unused"}
    if status == "failed":
        out["failed_step"] = "ingest"
    out.update(extra)
    return out


@pytest.fixture
def make_run(tmp_path):
    """make_run(run_id, status=..., config=..., reports={name: (suffix, text)}, summary=dict or str or None)."""
    runs = tmp_path / "runs"

    def make(run_id, status="succeeded", config=None, reports=None, raw=None, accuracy=0.95, mtime=None, **extra):
        run_dir = runs / run_id
        run_dir.mkdir(parents=True)
        paths = {}
        for name, (suffix, text) in (reports or {}).items():
            (run_dir / "reports").mkdir(exist_ok=True)
            path = run_dir / "reports" / f"{name}{suffix}"
            path.write_text(text)
            paths[name] = str(path)
        config = config or {"pretrain": {"epochs": 3}, "finetune": {"epochs": 10}}
        (run_dir / "config.json").write_text(json.dumps(config))
        if raw is not None:
            (run_dir / "summary.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
        elif status != "unfinished":
            (run_dir / "summary.json").write_text(json.dumps(summary(run_id, status, accuracy, paths, **extra)))
        if mtime is not None:
            import os

            for path in run_dir.iterdir():
                os.utime(path, (mtime, mtime))
        return run_dir

    make.runs = runs
    return make


def write_verdict(directory: Path, model_version, since, until, status="ok", share=0.0, drifted=(), **extra):
    directory.mkdir(parents=True, exist_ok=True)
    verdict = {"status": status, "message": f"{status} window", "reference_rows": 100, "current_rows": 50,
               "drift_detected": status == "drift", "drifted_features": list(drifted), "drift_share": share,
               "drift_share_threshold": 0.5, "alert": status == "drift", "model_version": model_version,
               "window": {"since": since, "until": until}, **extra}
    (directory / "verdict.json").write_text(json.dumps(verdict))
    (directory / "drift_report.html").write_text("<html><body>evidently</body></html>")
    return verdict
