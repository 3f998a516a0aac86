"""The KFP entry of the monitor step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from typing import Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def monitor_component(
    dataset: Input[Dataset],
    deployment: Input[Artifact],
    cfg: Settings,
    drift_report: Output[HTML],
    verdict: Output[Artifact],
    metrics: Output[Metrics],
    model: Optional[Input[Model]] = None,
):
    """Replay the test split to the deployed endpoint, then check the logged traffic for drift.

    The window's verdict is appended to the release ledger the deployment record names (a ``drift`` record whose
    parent is the served model's ``released`` record); the verdict then carries its id (``ledger_record``).

    Args:
        dataset: Dataset artifact from ingest (splits.npz and the reference.csv of training features).
        deployment: Deployment record JSON from deploy (endpoint, token files, request_log_dir, model_version).
        cfg: The run's ``monitor`` settings (drift share, replay size, sampling bound).
        drift_report: Output HTML: Evidently's drift report, or a page saying why no test ran.
        verdict: Output JSON with status, drifted features, per-feature test results and the drift record's id.
        metrics: Output metrics: drift_detected, drift_share, row counts, replayed requests and cost.
        model: Optional model artifact from finetune; its reference_model.csv adds prediction and embedding drift.
    """
    import json
    import os
    import shutil
    import tempfile
    from datetime import datetime, timedelta, timezone
    from pathlib import Path

    from components.core.cost import log_metrics, measure
    from components.core.data import REFERENCE_FILE, load_splits
    from components.core.features import MODEL_REFERENCE_FILE
    from components.monitor.monitor import monitor
    from components.monitor.replay import replay, wait_for_log
    from components.monitor.traffic import REPLAY_SOURCE

    cfg = cfg.monitor
    with measure() as cost:
        record_path = Path(deployment.path)
        if not record_path.is_file():
            raise FileNotFoundError(f"deployment record {record_path} not found: the deploy step writes it")
        record = json.loads(record_path.read_text())
        missing = [k for k in ("endpoint", "token_file", "request_log_dir", "model_version") if k not in record]
        if missing:
            raise KeyError(f"deployment record {record_path} lacks {missing}; re-run deploy")
        splits = load_splits(dataset.path)
        model_reference = str(Path(model.path) / MODEL_REFERENCE_FILE) if model is not None else None

        # The window is this replay's own requests: from just before it (1 s of slack for clock
        # granularity), of the deployed model version, tagged with the replay source, so neither
        # the smoke test nor earlier replays or clients mix in.
        since = datetime.now(timezone.utc) - timedelta(seconds=1)
        # The pipeline's own token: its requests may say they are a replay (clients' tokens may not).
        token_file = record.get("source_token_file") or record["token_file"]
        sent = replay(record["endpoint"], token_file, splits.test_x, limit=cfg.replay_limit, source=REPLAY_SOURCE)
        logged = wait_for_log(record["request_log_dir"], since, sent, model_version=record["model_version"],
                              source=REPLAY_SOURCE)
        if logged < sent:
            print(f"[monitor] only {logged} of {sent} replayed requests reached the log", flush=True)
        until = datetime.now(timezone.utc) + timedelta(seconds=1)

        with tempfile.TemporaryDirectory() as tmp:
            result = monitor(Path(dataset.path) / REFERENCE_FILE, record["request_log_dir"], tmp, cfg,
                             since=since, until=until, model_version=record["model_version"], source=REPLAY_SOURCE,
                             model_reference_csv=model_reference)
            for src, dst in ((result["report_html"], drift_report.path), (result["verdict_json"], verdict.path)):
                os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
                shutil.copyfile(src, dst)
        # The window's drift record in the release ledger (parent: the served model's released record); the
        # verdict carries its id, so a retrain it causes can name it.
        if record.get("ledger"):
            from components.core.ledger import Ledger
            from components.core.localfiles import atomic_write_json
            from components.monitor.ledger import record_drift

            drift = record_drift(Ledger(record["ledger"]), result, released_record=record.get("released_record", ""),
                                 report=drift_report.uri, verdict_uri=verdict.uri)
            findings = json.loads(Path(verdict.path).read_text())
            findings.update(ledger=record["ledger"], ledger_record=drift.id)
            atomic_write_json(verdict.path, findings, default=str)
            verdict.metadata.update(ledger=record["ledger"], ledger_record=drift.id)
            print(f"[monitor] ledger {record['ledger']}: drift {drift.id}", flush=True)
        else:
            print(f"[monitor] the deployment record {record_path} names no ledger: the window is not recorded there",
                  flush=True)

    log_metrics(metrics, {
        "drift_detected": result["drift_detected"],
        "drift_alert": result["alert"],
        "drift_share": result["drift_share"],
        "drift_share_threshold": cfg.drift_share,
        "drifted_features": len(result["drifted_features"]),
        "checks": len(result["checks"]),
        **{f"{group}_drifted": info["drifted"] for group, info in result["groups"].items()},
        "current_rows": result["current_rows"],
        "reference_rows": result["reference_rows"],
        "requests_replayed": sent,
        "requests_logged": logged,
        "log_bad_lines": result["log"]["bad_lines"],
        **cost.as_metrics(),
    })
    print(f"[monitor] verdict {result['status']} written to {verdict.path}", flush=True)
