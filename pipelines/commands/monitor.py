"""``mlops monitor``: drift of one window of served traffic against the served model's training references."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from components.core.localfiles import atomic_write_json
from pipelines import config as config_mod
from pipelines.commands import add_config_args, add_json, add_runs_dir, emit_json, human, load_config, say
from pipelines.commands.serve import released_ledger

# What monitor uses of the serving area (where the server, its request log and the ledger are); --help-all: the rest.
SERVING_SETTINGS = frozenset({"serving_home", "serving_request_log_dir", "serving_request_log_max_age_s",
                              "serving_ledger_uri"})


def _parse_time(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"not an ISO time: {value!r} (example: 2026-11-30T12:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def served_references(served: dict, state_file: Path) -> tuple[str, str | None]:
    """The monitoring references of the model a local server serves: (image features, model reference or None)."""
    from components.core.data import REFERENCE_FILE
    from components.core.features import MODEL_REFERENCE_FILE

    if not served:
        raise FileNotFoundError(f"no serving state at {state_file}: pass --reference (the training reference of the "
                                "served model), or start serving with 'mlops serve start'")
    dataset_dir = served.get("dataset_dir")
    if not dataset_dir or not (Path(dataset_dir) / REFERENCE_FILE).is_file():
        raise FileNotFoundError(f"the serving state {state_file} does not say where the served model's training "
                                f"reference is (dataset_dir {dataset_dir!r}); pass --reference, or serve it again "
                                "with 'mlops serve start'")
    model_reference = served.get("model_reference")
    if not model_reference and served.get("model_dir"):
        candidate = Path(served["model_dir"]) / MODEL_REFERENCE_FILE
        model_reference = str(candidate) if candidate.is_file() else None
    return str(Path(dataset_dir) / REFERENCE_FILE), model_reference


VERDICT_FILES = ("report_html", "verdict_json", "metrics_prom")  # the verdict's entries that name its own files


def _findings(verdict: dict) -> dict:
    """The verdict without the paths of its own files: what verdict.json holds and a retrain records."""
    return {k: v for k, v in verdict.items() if k not in VERDICT_FILES}


def _monitor_window(args: argparse.Namespace) -> tuple[dt.datetime | None, dt.datetime]:
    """The window of requests to judge: --last, or --since/--until; it ends now when no end is given."""
    from components.monitor.windows import last_window, parse_duration

    since, until = _parse_time(args.since), _parse_time(args.until)
    if args.last:
        if since or until:
            raise ValueError("--last sets the window itself: give --last, or --since/--until, not both")
        since, until = last_window(parse_duration(args.last), parse_duration(args.settle) if args.settle else dt.timedelta(0))
    elif args.settle:
        raise ValueError("--settle only applies to --last")
    if until is None:  # close the window now: its results are then reproducible (and keyed by it)
        now = dt.datetime.now(dt.timezone.utc)
        until = now.replace(microsecond=now.microsecond // 1000 * 1000)
    return since, until


def _monitor_sources(args: argparse.Namespace, cfg: config_mod.Config) -> tuple[str, str | None, str, str | None]:
    """(feature reference, model reference or None, request log, model version or None): from the flags, else
    the model the local server serves."""
    from components.core.features import MODEL_REFERENCE_FILE
    from components.monitor.monitor import location_exists

    state_file = Path(cfg.serving.home).resolve() / "state.json"
    served = json.loads(state_file.read_text()) if state_file.is_file() else {}
    reference, model_reference = args.reference, args.model_reference
    if reference is None:  # the served model's own references, never another run's
        reference, served_model_reference = served_references(served, state_file)
        model_reference = model_reference or served_model_reference
    if model_reference is None:  # published next to the feature reference (e.g. one s3:// monitoring prefix)
        sibling = str(reference).rsplit("/", 1)[0] + "/" + MODEL_REFERENCE_FILE if "/" in str(reference) else MODEL_REFERENCE_FILE
        model_reference = sibling if location_exists(sibling) else None
    log_dir, model_version = args.log_dir, args.model_version
    if log_dir is None and served:  # the running server's log and version
        log_dir, model_version = served["request_log_dir"], model_version or served.get("model_version")
    log_dir = log_dir or cfg.serving.request_log_dir or None
    if log_dir is None:
        raise SystemExit(f"no serving state at {state_file}: pass --log-dir (or serving.request_log_dir), or start "
                         "serving with 'mlops serve start'")
    return reference, model_reference, log_dir, model_version


def cmd_monitor(args: argparse.Namespace) -> int:
    """Judge the window; with --json the verdict is the only line on stdout (the steps' own lines go to stderr)."""
    import contextlib

    with contextlib.redirect_stdout(human(args)):
        code, verdict = _judge_window(args)
    if args.json:  # one line: a log line of the monitor's CronJob
        emit_json(args, verdict, compact=True)
    return code


def _judge_window(args: argparse.Namespace) -> tuple[int, dict]:
    import tempfile

    from components.monitor.monitor import monitor
    from components.monitor.report import VERDICT_FILE
    from components.monitor.windows import result_dir

    cfg = load_config(args)
    since, until = _monitor_window(args)
    reference, model_reference, log_dir, model_version = _monitor_sources(args, cfg)
    out_root = args.out or (str(reference).rsplit("/", 1)[0] + "/verdicts" if str(reference).startswith("s3://")
                            else str(Path(args.runs_dir) / "monitor"))
    target = result_dir(out_root, model_version, since, until)
    remote = target.startswith("s3://")
    staging = tempfile.TemporaryDirectory(prefix="mlops-monitor-") if remote else None
    out_dir = Path(staging.name) if staging else Path(target)
    from pipelines.retrain import RETRAIN_MARKER

    if remote:  # a retrain already recorded for this window must be seen before deciding to start one
        from components.core import blobs

        if blobs.exists(f"{target}/{RETRAIN_MARKER}"):
            blobs.get_file(f"{target}/{RETRAIN_MARKER}", out_dir / RETRAIN_MARKER)
    verdict = monitor(reference, log_dir, out_dir, cfg=cfg.monitor, since=since, until=until,
                      model_version=model_version, model_reference_csv=model_reference,
                      log_file_max_age_s=cfg.serving.request_log_max_age_s)
    exit_code = 2 if verdict.get("alert", verdict.get("drift_detected")) else 0
    if not _record_drift(cfg, verdict, target, _monitor_served(cfg)):
        exit_code = 1
    if args.retrain_on_drift and verdict["drift_detected"]:
        from pipelines.retrain import retrain_on_drift, retrain_target

        # A cluster run starts from the cluster's defaults (deploy to Kubernetes, the champion from the model
        # store), not from this command's local ones.
        retrain_cfg = (load_config(args, config_mod.CLUSTER) if retrain_target(cfg, args.kfp_host)[0] == "cluster"
                       else cfg)
        try:
            retrain_on_drift({**_findings(verdict), "verdict_json": f"{target}/{VERDICT_FILE}"}, retrain_cfg, out_dir,
                             runs_dir=args.runs_dir, kfp_host=args.kfp_host, wait=args.retrain_wait,
                             out=say(args))
        except Exception as exc:  # the verdict stands; a rerun of this window tries the retrain again
            print(f"mlops monitor: drift detected but the retrain did not start: {exc}", file=sys.stderr)
            exit_code = 1
    if (out_dir / RETRAIN_MARKER).is_file():  # part of this window's verdict, on every rerun
        verdict["retrain"] = json.loads((out_dir / RETRAIN_MARKER).read_text())
    if "retrain" in verdict or "ledger_record" in verdict:
        atomic_write_json(out_dir / VERDICT_FILE, _findings(verdict), default=str)
    if remote:
        blobs.put_dir(out_dir, target)
        verdict.update({k: f"{target}/{Path(verdict[k]).name}" for k in VERDICT_FILES})
        staging.cleanup()
    if not args.json:  # with --json the verdict says all this, and is the log's last line (stderr written just
        # before it could reach a merged log after it: the runtime reads the two pipes apart)
        print(f"{verdict['status']}: {verdict.get('message', '')}")
        print(f"Report: {verdict.get('report_html', target)}")
        if verdict.get("retrain"):
            print(f"Retraining: {verdict['retrain'].get('target')} run {verdict['retrain'].get('run_id')}")
    return exit_code, verdict


def _monitor_served(cfg: config_mod.Config) -> dict:
    state_file = Path(cfg.serving.home).resolve() / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def _record_drift(cfg: config_mod.Config, verdict: dict, target: str, served: dict) -> bool:
    """The window's drift record in the release ledger (parent: the served model's released record); the verdict
    gets its id (``ledger_record``). False, with the reason on stderr, when it could not be recorded."""
    from components.core.blobs import StorageError
    from components.core.ledger import Ledger, LedgerError
    from components.monitor.ledger import record_drift
    from components.monitor.report import REPORT_FILE, VERDICT_FILE

    try:
        ledger = Ledger(served.get("ledger") or released_ledger(cfg))
        drift = record_drift(ledger, verdict, released_record=served.get("released_record", "")
                             if served.get("model_version") == verdict.get("model_version") else "",
                             report=f"{target}/{Path(verdict.get('report_html') or REPORT_FILE).name}",
                             verdict_uri=f"{target}/{VERDICT_FILE}")
    except (LedgerError, StorageError, OSError) as exc:
        print(f"mlops monitor: the verdict was not recorded in the release ledger: {exc}", file=sys.stderr)
        return False
    verdict.update(ledger=ledger.base, ledger_record=drift.id)
    return True




def add_parsers(sub) -> None:
    p = sub.add_parser("monitor", help="drift report of served traffic against the training reference",
                       description="Compare one window of the serving request log (local or s3://) with the "
                                   "references recorded at training time (Evidently): image features, predictions, "
                                   "embedding. Writes drift_report.html, verdict.json and drift.prom into "
                                   "<out>/<model version>/<window>; a rerun of a window rewrites the same files. "
                                   "Exit code 0 = no drift, 2 = drift or schema drift.")
    add_runs_dir(p, "local runs (results and local retrain runs)")
    p.add_argument("--reference", help="image-feature reference CSV, path or s3:// (default: the served model's, "
                                       "from the local serving state)")
    p.add_argument("--model-reference", help="model reference CSV (reference_model.csv: predictions, embedding); "
                                              "default: the served model's, else next to --reference; "
                                              "missing = image features only")
    p.add_argument("--log-dir", help="request log directory or s3:// prefix (default: the running server's)")
    p.add_argument("--model-version", help="only requests of this model version (default: the running server's; "
                                           "with --log-dir: all versions)")
    p.add_argument("--since", help="ISO time: only requests at or after it")
    p.add_argument("--until", help="ISO time: only requests before it (default: now)")
    p.add_argument("--last", metavar="DURATION", help="the last whole period instead of --since/--until, aligned "
                                                       "to UTC: '1h' at 11:17 checks 10:00-11:00")
    p.add_argument("--settle", metavar="DURATION", help="with --last: only periods that ended this long ago (log "
                                                         "files reach s3:// when rotated)")
    p.add_argument("--out", help="results root, path or s3:// (default: verdicts/ next to an s3:// --reference, "
                                 "else runs/monitor)")
    add_json(p, "the verdict", compact=True)
    retrain = p.add_argument_group("retraining on drift")
    retrain.add_argument("--retrain-on-drift", action="store_true",
                         help="start the training pipeline when the window drifted (once per window): on the "
                              "cluster with --kfp-host or inside a pod, else locally in the background")
    retrain.add_argument("--kfp-host", metavar="URL",
                         help="Kubeflow Pipelines API URL for --retrain-on-drift (default: $KFP_HOST, else "
                              "cluster.kfp_host)")
    retrain.add_argument("--retrain-wait", action="store_true", help="wait for a local retrain to finish")
    add_config_args(p, ("serving", "monitor"), shown=SERVING_SETTINGS | frozenset(
        q.key for q in config_mod.parameters(("monitor",))))
    p.set_defaults(func=cmd_monitor)
