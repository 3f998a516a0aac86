"""``mlops``: run the pipeline locally, compile it for Kubeflow, manage the local server, check drift.

Examples:
    mlops run                                       # the whole pipeline on this machine, in runs/<run-id>/
    mlops run --config examples/quick.yaml --pretrain-epochs 5
    mlops serve status                              # the local endpoint (start, stop: the same way)
    mlops monitor --last 1h                         # drift of the last whole hour of served traffic
    mlops releases show 3f2a9c                      # a released model's lineage: run, data, gates, drift, retrain
    mlops compile -o pipeline.yaml --cluster-image registry.example.com/kfp-mlops:0.1.0
    mlops submit --host http://localhost:8888 --wait
    mlops schedule --cron "0 3 * * *" --host http://localhost:8888
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from components.core.localfiles import atomic_write_json
from pipelines import config as config_mod
from pipelines import releases as releases_mod
from pipelines.cluster.connection import ClusterError, Connection, resolve_connection
from pipelines.cluster.schedules import DEFAULT_SCHEDULE_NAME


def _add_config_args(parser: argparse.ArgumentParser, areas: tuple[str, ...]) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (sections: data, pretrain, finetune, gates, serving, monitor, cluster); flags override it")
    config_mod.add_flags(parser, areas)


def _load_config(args: argparse.Namespace, target: str = config_mod.LOCAL) -> config_mod.Config:
    return config_mod.apply_flags(config_mod.load(args.config, target), args, target)


def cmd_run(args: argparse.Namespace) -> int:
    from components.deploy.pods import PodError
    from pipelines.local import run_local

    try:
        summary = run_local(_load_config(args), runs_dir=args.runs_dir, run_id=args.run_id,
                            serve_after=args.serve_after, verbose=args.verbose, runner=args.runner)
    except PodError as exc:  # --runner docker without an engine, images or manifests: nothing ran
        print(f"mlops run: {exc}", file=sys.stderr)
        return 1
    return 0 if summary["status"] == "succeeded" else (3 if summary["status"] == "blocked" else 1)


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import compile_pipeline

    cfg = _load_config(args, config_mod.CLUSTER)
    path = compile_pipeline(args.output, cfg.cluster, defaults=cfg)
    print(f"Compiled the pipeline for image {cfg.cluster.image} to {path}.")
    print("Upload it in the KFP UI (Pipelines > Upload pipeline) and start a run from its page.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from components.deploy.containers import served_from
    from serving.server import curl_example

    cfg = _load_config(args)
    home = Path(cfg.serving.home).resolve()
    if args.action == "stop":
        served_from(home).stop()  # the local processes, or the serving containers of mlops run --runner docker
        return 0
    if args.action == "status":
        status = served_from(home).status()
        if args.json:
            print(json.dumps(status, indent=2))
        elif not status["running"]:
            print(f"No TorchServe is running from {home}. Start one with 'mlops serve start' (serves the latest run's model).")
        else:
            state = "healthy" if status["healthy"] else f"NOT healthy: {status['problem']}"
            print(f"TorchServe (pid {status['pid']}) serves '{status['model']}' version {status['model_version']}: {state}, "
                  f"{status['workers_ready']} worker(s) ready.")
            print(f"  endpoint:    {status['endpoint']}  (also /explanations/{status['model']})")
            print(f"  token:       {status['token_file']}")
            print(f"  request log: {status['request_log_dir']}")
            print(f"  logs:        {Path(status['log']).parent}")
            print(f"  try:         {curl_example(status)}")
        return 0 if status["running"] and status["healthy"] else 1
    # start: serve a released model (the latest, or the named run's)
    from components.deploy.local import deploy_local
    from pipelines.local import latest_released_run, read_summary, release_problem

    run_dir = Path(args.runs_dir) / args.run_id if args.run_id else latest_released_run(args.runs_dir)
    summary = read_summary(run_dir)
    problem = release_problem(summary)
    override = None
    if problem:
        if "model" not in summary.get("artifacts", {}) or not summary.get("gates"):
            print(f"mlops serve start: {problem}; nothing to serve", file=sys.stderr)
            return 1
        if not cfg.gates.override:
            print(f"mlops serve start: {problem}, so its model was not released. To serve it anyway, say who "
                  "accepts the risk and why: --gates-override --gates-override-reason '...'", file=sys.stderr)
            return 3
        override = {"reason": cfg.gates.override_reason, "problem": problem}
    artifacts = summary["artifacts"]
    s = cfg.serving
    try:
        record = deploy_local(artifacts["model"], artifacts["dataset"], s)
    except (RuntimeError, TimeoutError) as err:  # port taken, server died at startup, smoke test failed
        print(f"mlops serve start: {err}", file=sys.stderr)
        return 1
    released = _record_served_run(cfg, home, summary["run_id"], record, override)
    if override:
        print(f"WARNING: serving a model its gates did not release ({problem}); override recorded by "
              f"{released.actor} in the release ledger {released_ledger(cfg)} (released {released.id}): "
              f"{override['reason']}")
    print(f"Serving the model of run {summary['run_id']} at {record['endpoint']} (token in "
          f"{record['token_file']}). 'mlops serve status' checks it, 'mlops serve stop' stops it.")
    print(f"  try: {curl_example(record)}")
    return 0


def released_ledger(cfg: config_mod.Config) -> str:
    from components.core.ledger import location

    return location(cfg.serving)


def _record_served_run(cfg: config_mod.Config, home: Path, run_id: str, record: dict, override: dict | None):
    """The model served by hand, in the release ledger: a ``released`` record (parent: the run's gated record; an
    override with its reason and who gave it), pointed to by the serving state."""
    from components.core.ledger import Ledger
    from components.deploy.ledger import record_release
    from pipelines.release_actions import note_served

    ledger = Ledger(released_ledger(cfg))
    version = record["model_version"]
    gated = ledger.latest("gated", run_id=run_id, model_version=version)
    released, _ = record_release(ledger, record, model_name=cfg.serving.model_name, model_version=version,
                                 target="local", gated_record=gated.id if gated else "", run_id=run_id,
                                 reason="mlops serve start", **({"override": override} if override else {}))
    note_served(home, ledger, released)
    return released


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
    import tempfile

    from components.monitor.monitor import monitor
    from components.monitor.report import VERDICT_FILE
    from components.monitor.windows import result_dir

    cfg = _load_config(args)
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
        from pipelines.retrain import retrain_on_drift

        try:
            retrain_on_drift({**_findings(verdict), "verdict_json": f"{target}/{VERDICT_FILE}"}, cfg, out_dir,
                             runs_dir=args.runs_dir, kfp_host=args.kfp_host, wait=args.retrain_wait,
                             out=lambda line: print(line, flush=True))
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
    if args.json:
        print(json.dumps(verdict, default=str))
    else:
        print(f"{verdict['status']}: {verdict.get('message', '')}")
        print(f"Report: {verdict.get('report_html', target)}")
        if verdict.get("retrain"):
            print(f"Retraining: {verdict['retrain'].get('target')} run {verdict['retrain'].get('run_id')}")
    return exit_code


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


def _add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """The settings of a command that talks to a KFP cluster: the config with its cluster area, and the connection."""
    _add_config_args(parser, config_mod.PARAMETER_AREAS + ("cluster",))
    group = parser.add_argument_group("Kubeflow Pipelines connection")
    group.add_argument("--host", help="KFP API URL, e.g. http://localhost:8888 after 'kubectl -n kubeflow port-forward "
                                      "svc/ml-pipeline 8888:8888' (default: cluster.kfp_host; in a pod: the in-cluster service)")
    group.add_argument("--token", help="bearer token (prefer the KFP_TOKEN environment variable: flags show in ps); "
                                       "in a pod the token file in $KF_PIPELINES_SA_TOKEN_PATH or the ServiceAccount's is used")
    group.add_argument("--kube-context", metavar="NAME",
                       help="no --host: reach KFP through the Kubernetes API server with this kubeconfig context")
    group.add_argument("--namespace", help="namespace (KFP profile) on multi-user KFP (default: cluster.namespace)")
    group.add_argument("--experiment", help="experiment name, created if missing (default: cluster.experiment)")
    group.add_argument("--pipeline-name", help="pipeline name to upload under (default: cluster.pipeline_name)")
    group.add_argument("--service-account", help="ServiceAccount the run's pods use (default: cluster.service_account)")


def _load_cluster_config(args: argparse.Namespace) -> config_mod.Config:
    cfg = _load_config(args, config_mod.CLUSTER)
    if args.service_account is not None:
        cfg.cluster.service_account = args.service_account
    return cfg


def _connection(args: argparse.Namespace, cfg: config_mod.Config) -> Connection:
    return resolve_connection(cfg.cluster, host=args.host, token=args.token, namespace=args.namespace,
                              kube_context=args.kube_context)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.cluster.runs import submit

    cfg = _load_cluster_config(args)
    result = submit(cfg, _connection(args, cfg), experiment=args.experiment, pipeline_name=args.pipeline_name,
                    run_name=args.run_name, wait=args.wait, timeout_s=args.timeout, poll_s=args.poll_s)
    if not args.wait:
        return 0
    print(f"run {result.run_id}: {result.state or 'still running'} (exit code {result.exit_code})")
    return result.exit_code


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.cluster import schedules

    cfg = _load_cluster_config(args)
    action = args.action
    if action == "create" and args.target:
        raise ValueError(f"unexpected {args.target!r}: use --name for the schedule's name")
    if action in ("pause", "resume", "delete") and not args.target:
        raise ValueError(f"mlops schedule {action} needs the schedule's NAME or ID (see mlops schedule list)")
    if action == "create" and not args.cron:
        raise ValueError(f"mlops schedule needs --cron: {schedules.CRON_HELP}")
    if action == "create":
        schedules.kfp_cron(args.cron)  # a bad cron fails before any connection
    conn = _connection(args, cfg)
    if action == "create":
        schedules.create_schedule(cfg, conn, cron=args.cron, name=args.name, max_concurrency=args.max_concurrency,
                                  experiment=args.experiment, pipeline_name=args.pipeline_name)
    elif action == "list":
        print(schedules.format_schedules(schedules.list_schedules(conn)))
    elif action in ("pause", "resume"):
        s = schedules.set_schedule_enabled(conn, args.target, action == "resume")
        print(f"Schedule {s.name!r} ({s.recurring_run_id}) {'resumed' if s.enabled else 'paused'}.")
    else:
        s = schedules.delete_schedule(conn, args.target)
        print(f"Schedule {s.name!r} ({s.recurring_run_id}) deleted; runs it started are kept.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline on this machine (kfp.local)",
                       description="Run ingest → pretrain → finetune → evaluate → privacy → robustness → deploy → monitor "
                                   "through kfp.local. Writes runs/<run-id>/summary.json. Exit code 0 = released, "
                                   "3 = a gate blocked the release, 1 = a step failed.")
    _add_config_args(p, config_mod.PARAMETER_AREAS)
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    p.add_argument("--run-id", help="name of the run directory (default: a timestamp)")
    p.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                   help="how the steps run: 'subprocess' (default: processes of this Python, this checkout's code) "
                        "or 'docker' (containers of cluster.image, served from containers of cluster.serving_image "
                        "as the manifests' serving Deployment; needs a Docker engine and 'make image')")
    p.add_argument("--serve-after", default=True, action=argparse.BooleanOptionalAction,
                   help="keep TorchServe running after the run (default); --no-serve-after stops it")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print kfp.local's full output (always written to runs/<run-id>/pipeline.log)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile the pipeline to KFP v2 YAML for a cluster",
                       description="Compile the pipeline for Kubeflow Pipelines. Run parameters keep their defaults "
                                   "from the config and are editable in the KFP UI; cluster settings are baked in.")
    _add_config_args(p, ("cluster",))
    p.add_argument("-o", "--output", default="pipeline.yaml", help="output file (default: pipeline.yaml)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("serve", help="start, stop or inspect the local TorchServe",
                       description="Manage the local TorchServe (loopback, token auth on, model-management API off). "
                                   "'start' serves the newest run whose model its gates released; a blocked run's "
                                   "model only with --gates-override and a reason, which is recorded. Exit code 3 = "
                                   "the run's gates did not release its model.")
    p.add_argument("action", choices=["start", "stop", "status"])
    _add_config_args(p, ("serving",))
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--run-id", help="serve this run's model instead of the newest released one")
    override = p.add_argument_group("serving a model its gates blocked")
    override.add_argument("--gates-override", dest="gates_override", default=None, action="store_true",
                          help="serve the --run-id run's model although a gate blocked it (needs a reason)")
    override.add_argument("--gates-override-reason", dest="gates_override_reason", default=None, metavar="TEXT",
                          help="who accepts the risk and why (recorded in the serving state and overrides.jsonl)")
    p.add_argument("--json", action="store_true", help="status: print the status as JSON")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("monitor", help="drift report of served traffic against the training reference",
                       description="Compare one window of the serving request log (local or s3://) with the "
                                   "references recorded at training time (Evidently): image features, predictions, "
                                   "embedding. Writes drift_report.html, verdict.json and drift.prom into "
                                   "<out>/<model version>/<window>; a rerun of a window rewrites the same files. "
                                   "Exit code 0 = no drift, 2 = drift or schema drift.")
    _add_config_args(p, ("serving", "monitor"))
    p.add_argument("--runs-dir", default="runs", help="local runs (default: runs): results and local retrain runs")
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
    p.add_argument("--json", action="store_true", help="print the verdict as JSON on the last line")
    p.add_argument("--retrain-on-drift", action="store_true",
                   help="start the training pipeline when the window drifted (once per window): on the cluster "
                        "with --kfp-host / cluster.kfp_host or inside a pod, else locally in the background")
    p.add_argument("--kfp-host", help="KFP API URL for --retrain-on-drift (default: cluster.kfp_host)")
    p.add_argument("--retrain-wait", action="store_true", help="wait for a local retrain to finish")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("submit", help="compile, upload and run the pipeline on a Kubeflow Pipelines cluster",
                       description="Compile the pipeline, upload it (or a new version of the pipeline of that name; "
                                   "an identical compile reuses its version), and create a run in the experiment with "
                                   "the config's run parameters and the pipeline ServiceAccount. With --wait, print "
                                   "each state change; exit code 0 = SUCCEEDED and deployed, 3 = SUCCEEDED but a gate "
                                   "blocked deploy, 1 = FAILED/CANCELED/SKIPPED, 124 = still running at --timeout.")
    _add_cluster_args(p)
    p.add_argument("--run-name", help="run name (default: '<pipeline> <UTC time>')")
    p.add_argument("--wait", action="store_true", help="wait for the run to end and stream its states")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: stop waiting after S seconds (the run goes on)")
    p.add_argument("--poll-s", type=float, default=10.0, help="with --wait: seconds between status checks (default: 10)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="recurring retraining runs on the cluster: create, list, pause, resume, delete",
                       description="mlops schedule --cron EXPR creates a KFP recurring run of the pipeline (uploaded "
                                   "as by submit) with catch-up off. Cron: 5 fields (converted to KFP's 6-field form "
                                   "with seconds first) or 6 fields or @daily/@weekly/...; times are in the KFP "
                                   "scheduler's time zone (usually UTC). mlops schedule list | pause NAME|ID | "
                                   "resume NAME|ID | delete NAME|ID manage them.")
    p.add_argument("action", nargs="?", default="create", choices=["create", "list", "pause", "resume", "delete"],
                   help="what to do (default: create)")
    p.add_argument("target", nargs="?", metavar="NAME|ID", help="the schedule to pause, resume or delete")
    p.add_argument("--cron", help="when to run: '0 3 * * *' = 03:00 every day")
    p.add_argument("--name", default=DEFAULT_SCHEDULE_NAME, help=f"schedule name (default: {DEFAULT_SCHEDULE_NAME})")
    p.add_argument("--max-concurrency", type=int, default=1,
                   help="runs of this schedule at once, 1-10 (default: 1: a slow run delays the next)")
    _add_cluster_args(p)
    p.set_defaults(func=cmd_schedule)

    releases_mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_mod.ConfigError as exc:  # before anything ran: a usage error
        print(f"mlops {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, ClusterError) as exc:
        print(f"mlops {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
