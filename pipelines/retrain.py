"""Retrain on drift: the monitor's verdict starts the training pipeline, once per drifted window, and says why.

``mlops monitor --retrain-on-drift`` calls :func:`retrain_on_drift` when a window drifted:

* **on a cluster** (``--kfp-host``, ``cluster.kfp_host`` in the config, or inside a pod):
  ``pipelines.cluster.runs.start_cluster_run`` uploads the pipeline and starts a KFP run whose
  description is the reason (groups and features that drifted, model version, window);
* **locally**: ``python -m pipelines.retrain`` runs ``pipelines.local.run_local`` in a
  background process (a local retrain takes minutes; the monitor does not wait unless
  asked), with its output in ``<runs>/retrain/<run-id>.log``. When the run ends, the
  reason is added to its ``summary.json`` (``trigger``) and written to ``trigger.json``
  in the run directory.

Why it retrained is recorded before anything starts, in ``retrain.json`` next to the
verdict (the results directory of that model version and window), and copied into the
verdict as ``retrain``. That file is also the guard against duplicates: a rerun of the
monitor for the same window finds it and starts nothing. Once the run has started (before
it trains), a ``retrain_started`` record goes into the release ledger the verdict names,
its parent the verdict's ``drift`` record; the run's own ``trained`` record then follows
from it, so a drift verdict leads forward to the retrain and the release after it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from components.core.localfiles import atomic_write_json
from pipelines.config import Config, load, to_dict

RETRAIN_MARKER = "retrain.json"  # next to verdict.json: the retrain of this window, and why
TRIGGER_FILE = "trigger.json"  # in the retrain run's directory


def drift_reason(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the verdict says about why to retrain, in the form every record of it uses."""
    return {
        "trigger": "drift",
        "status": verdict.get("status"),
        "message": verdict.get("message"),
        "drifted_features": list(verdict.get("drifted_features", [])),
        "drifted_groups": [g for g, info in verdict.get("groups", {}).items() if info.get("drifted")],
        "model_version": verdict.get("model_version"),
        "window": verdict.get("window", {}),
        "verdict_json": verdict.get("verdict_json"),
        "ledger": verdict.get("ledger"),
        "drift_record": verdict.get("ledger_record"),
    }


def reason_text(reason: dict[str, Any]) -> str:
    """One line for a run description or a log."""
    window = reason.get("window") or {}
    groups = ", ".join(reason.get("drifted_groups") or []) or "unknown checks"
    features = ", ".join(reason.get("drifted_features") or []) or "none named"
    return (f"drift in {groups} (features: {features}) for model version {reason.get('model_version') or 'any'}, "
            f"requests {window.get('since') or 'start'} to {window.get('until') or 'now'}; "
            f"verdict {reason.get('verdict_json') or '(not saved)'}")


def retrain_target(cfg: Config, kfp_host: str | None = None) -> tuple[str, str | None]:
    """("cluster", host) when a KFP host is configured or this runs in a pod (host None: in-cluster), else ("local", None)."""
    host = kfp_host or cfg.cluster.kfp_host or None
    if host:
        return "cluster", host
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "cluster", None
    return "local", None


def retrain_run_id(reason: dict[str, Any]) -> str:
    """A run id named after the drifted model version and window end: one retrain per window."""
    until = (reason.get("window") or {}).get("until")
    stamp = (datetime.fromisoformat(until) if until else datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    version = re.sub(r"[^A-Za-z0-9_.-]", "_", str(reason.get("model_version") or "all"))[:40]
    return f"retrain-{version}-{stamp}"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:  # an interrupted claim: someone else may be starting; do not start twice
        return {"status": "unknown", "note": f"{path} is unreadable; delete it to allow a retrain of this window"}


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, default=str)


def retrain_on_drift(verdict: dict[str, Any], cfg: Config, result_dir: str | Path, *, runs_dir: str | Path = "runs",
                     kfp_host: str | None = None, wait: bool = False, serve_after: bool = True,
                     timeout_s: float | None = None, out=print) -> dict[str, Any]:
    """Start the training pipeline because ``verdict`` found drift; return (and keep) the record of it.

    ``result_dir`` is the verdict's results directory: ``retrain.json`` there is claimed
    first (exclusive create), so two monitors of one window never start two runs, and a
    rerun gets the first run's record back. ``wait`` (local only) waits for the run and
    adds its status. A start that fails removes the claim and raises, so a rerun may retry.
    """
    if not verdict.get("drift_detected"):
        raise ValueError(f"the verdict found no drift (status {verdict.get('status')!r}): nothing to retrain")
    result = Path(result_dir)
    result.mkdir(parents=True, exist_ok=True)
    marker = result / RETRAIN_MARKER
    existing = _read_marker(marker)
    if existing is not None:
        out(f"[retrain] already started for this window: {existing.get('run_id', existing.get('status'))} ({marker})")
        return existing

    reason = drift_reason(verdict)
    target, host = retrain_target(cfg, kfp_host)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another monitor claimed it between the read and now
        return _read_marker(marker) or {}
    with os.fdopen(fd, "w") as f:
        json.dump({"status": "starting", "target": target, "reason": reason}, f)
    def started(record: dict[str, Any]) -> None:  # the ledger's retrain_started, before the run trains
        try:
            record["ledger_record"] = record_retrain(reason, record).id if reason.get("ledger") else None
        except Exception as exc:  # the run is started: say what was not recorded, and go on
            record["ledger_error"] = str(exc)
            out(f"[retrain] run {record['run_id']} started, but recording it in the ledger {reason['ledger']} "
                f"failed: {exc}")

    try:
        if target == "cluster":
            from pipelines.cluster.runs import start_cluster_run

            run_id = start_cluster_run(cfg, host, reason_text(reason), out=out)
            record = {"target": "cluster", "host": host or "in-cluster", "run_id": run_id, "status": "started",
                      "reason": reason}
            started(record)
        else:
            record = start_local_retrain(cfg, reason, runs_dir, wait=wait, serve_after=serve_after,
                                         timeout_s=timeout_s, on_started=started)
    except BaseException:
        marker.unlink(missing_ok=True)
        raise
    _write_json(marker, record)
    out(f"[retrain] {record['target']} run {record['run_id']} {record['status']}: {reason_text(reason)}")
    return record


def record_retrain(reason: dict[str, Any], record: dict[str, Any]):
    """The ``retrain_started`` record in the ledger the verdict names: which drift record caused it (its parent)
    and the run it started (``run``: the local run id, or the KFP run id on a cluster)."""
    from components.core.ledger import Ledger

    drift = reason.get("drift_record")
    return Ledger(reason["ledger"]).append("retrain_started", {
        "run": record["run_id"], "target": record["target"], "host": record.get("host"), "drift_record": drift,
        "model_version": reason.get("model_version"), "window": reason.get("window") or {},
        "drifted_groups": reason.get("drifted_groups") or []}, parents=[drift] if drift else [])


def start_local_retrain(cfg: Config, reason: dict[str, Any], runs_dir: str | Path, *, run_id: str | None = None,
                        wait: bool = False, serve_after: bool = True, timeout_s: float | None = None,
                        on_started: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the pipeline locally (``python -m pipelines.retrain``) in a background process; optionally wait.
    ``on_started`` gets the record as soon as the process runs (before any waiting)."""
    runs = Path(runs_dir).resolve()
    run_id = run_id or retrain_run_id(reason)
    spec_dir = runs / "retrain"
    spec_dir.mkdir(parents=True, exist_ok=True)
    config_path, reason_path, log_path = (spec_dir / f"{run_id}{suffix}" for suffix in (".config.json", ".reason.json", ".log"))
    _write_json(config_path, to_dict(cfg))  # the exact config the monitor ran with (JSON is YAML)
    _write_json(reason_path, reason)
    command = [sys.executable, "-m", "pipelines.retrain", "--config", str(config_path), "--runs-dir", str(runs),
               "--run-id", run_id, "--reason", str(reason_path), "--serve-after" if serve_after else "--no-serve-after"]
    with open(log_path, "ab") as log:
        # A session of its own: the retrain outlives the monitor (and a Ctrl-C in its terminal).
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "DO_NOT_TRACK": "1"})
    record: dict[str, Any] = {"target": "local", "run_id": run_id, "run_dir": str(runs / run_id), "pid": process.pid,
                              "log": str(log_path), "status": "started", "reason": reason}
    if on_started is not None:
        on_started(record)
    if wait:
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            record["status"] = f"still running after {timeout_s} s"
            return record
        summary_path = runs / run_id / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        record.update(status=summary.get("status", "failed"), exit_code=code)
    return record


def main(argv: list[str] | None = None) -> int:
    """The background process of a local retrain: run the pipeline, then record the reason in the run."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (YAML or JSON) of the run")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--reason", required=True, help="JSON file: why (from the drift verdict)")
    parser.add_argument("--serve-after", default=True, action=argparse.BooleanOptionalAction)
    args = parser.parse_args(argv)

    from pipelines.local import SUMMARY_FILE, run_local

    cfg = load(args.config)
    reason = json.loads(Path(args.reason).read_text())
    print(f"[retrain] run {args.run_id} because of {reason_text(reason)}", flush=True)
    summary = run_local(cfg, runs_dir=args.runs_dir, run_id=args.run_id, serve_after=args.serve_after)
    run_dir = Path(summary["run_dir"])
    _write_json(run_dir / TRIGGER_FILE, reason)
    summary["trigger"] = reason
    _write_json(run_dir / SUMMARY_FILE, summary)
    print(f"[retrain] run {args.run_id} {summary['status']}; reason in {run_dir / TRIGGER_FILE}", flush=True)
    return 0 if summary["status"] == "succeeded" else (3 if summary["status"] == "blocked" else 1)


if __name__ == "__main__":
    sys.exit(main())
