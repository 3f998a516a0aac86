"""``mlops submit`` and ``mlops schedule create|list|pause|resume|delete``: the pipeline on a Kubeflow Pipelines
cluster. The connection is spelled the same everywhere: ``--kfp-host`` ($KFP_HOST, cluster.kfp_host), ``--token``
($KFP_TOKEN), ``--kube-context``, ``--namespace`` (cluster.namespace)."""

from __future__ import annotations

import argparse
import dataclasses

from pipelines import config as config_mod
from pipelines.cluster.connection import Connection, resolve_connection
from pipelines.commands import add_config_args, add_json, emit_json, human, load_config, say
from pipelines.commands.run import FIRST_SETTINGS

CONNECTION = frozenset({"cluster_kfp_host", "cluster_namespace"})
# What a run on the cluster is created with, besides its run parameters.
SUBMIT_SETTINGS = CONNECTION | {"cluster_experiment", "cluster_pipeline_name", "cluster_service_account",
                                "cluster_image", "cluster_serving_image"}


def add_connection_args(parser: argparse.ArgumentParser, **config_args) -> None:
    """--config and the settings flags (``config_args``), then how to reach KFP: token and kubeconfig context."""
    add_config_args(parser, **config_args)
    group = parser.add_argument_group("reaching Kubeflow Pipelines (the host: --kfp-host, else $KFP_HOST, else "
                                      "cluster.kfp_host; in a pod: the in-cluster service)")
    group.add_argument("--token", help="bearer token (prefer the KFP_TOKEN environment variable: flags show in ps); "
                                       "in a pod the token file in $KF_PIPELINES_SA_TOKEN_PATH or the ServiceAccount's "
                                       "is used")
    group.add_argument("--kube-context", metavar="NAME",
                       help="no --kfp-host: reach KFP through the Kubernetes API server with this kubeconfig context")
    group.add_argument("--host", dest="cluster_kfp_host", default=None, help=argparse.SUPPRESS)  # the old spelling


def _connection(args: argparse.Namespace, cfg: config_mod.Config) -> Connection:
    # The host and namespace are in cfg.cluster already (flag, $KFP_HOST, config file, in that order).
    if args.cluster_kfp_host and args.kube_context:
        raise ValueError("pass either --kfp-host or --kube-context, not both")
    return resolve_connection(cfg.cluster, token=args.token, kube_context=args.kube_context)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.cluster.runs import submit

    cfg = load_config(args, config_mod.CLUSTER)
    conn = _connection(args, cfg)
    result = submit(cfg, conn, run_name=args.run_name, wait=args.wait, timeout_s=args.timeout, poll_s=args.poll_s,
                    out=say(args))
    if args.wait:
        print(f"run {result.run_id}: {result.state or 'still running'} (exit code {result.exit_code})",
              file=human(args))
    if args.json:
        emit_json(args, {**dataclasses.asdict(result), "url": run_url(conn, result.run_id)})
    return result.exit_code if args.wait else 0


def run_url(conn: Connection, run_id: str) -> str | None:
    """The run's page in the KFP UI, where the host is the UI's (a port-forward of ml-pipeline-ui or the gateway)."""
    if not conn.host:
        return None
    return f"{conn.host}/#/runs/details/{run_id}"


def cmd_schedule_create(args: argparse.Namespace) -> int:
    from pipelines.cluster import schedules

    cfg = load_config(args, config_mod.CLUSTER)
    if args.target:
        raise ValueError(f"unexpected {args.target!r}: use --name for the schedule's name")
    if not args.cron:
        raise ValueError(f"mlops schedule create needs --cron: {schedules.CRON_HELP}")
    schedules.kfp_cron(args.cron)  # a bad cron fails before any connection
    schedule = schedules.create_schedule(cfg, _connection(args, cfg), cron=args.cron, name=args.name,
                                         max_concurrency=args.max_concurrency, out=say(args))
    if args.json:
        emit_json(args, dataclasses.asdict(schedule))
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
    from pipelines.cluster import schedules

    cfg = load_config(args, config_mod.CLUSTER)
    found = schedules.list_schedules(_connection(args, cfg))
    if args.json:
        emit_json(args, [dataclasses.asdict(s) for s in found])
    else:
        print(schedules.format_schedules(found))
    return 0


def cmd_schedule_change(args: argparse.Namespace) -> int:
    from pipelines.cluster import schedules

    if not args.target:
        raise ValueError(f"mlops schedule {args.action} needs the schedule's NAME or ID (see mlops schedule list)")
    cfg = load_config(args, config_mod.CLUSTER)
    conn = _connection(args, cfg)
    if args.action == "delete":
        s = schedules.delete_schedule(conn, args.target)
        text = f"Schedule {s.name!r} ({s.recurring_run_id}) deleted; runs it started are kept."
    else:
        s = schedules.set_schedule_enabled(conn, args.target, args.action == "resume")
        text = f"Schedule {s.name!r} ({s.recurring_run_id}) {'resumed' if s.enabled else 'paused'}."
    print(text, file=human(args))
    if args.json:
        emit_json(args, {**dataclasses.asdict(s), "deleted": args.action == "delete"})
    return 0


SCHEDULE_ACTIONS = ("create", "list", "pause", "resume", "delete")


def add_parsers(sub) -> argparse.ArgumentParser:
    """``submit`` and ``schedule``; returns the parser of ``schedule create``."""
    from pipelines.cluster.schedules import DEFAULT_SCHEDULE_NAME

    run_settings = dict(areas=config_mod.PARAMETER_AREAS + ("cluster",), shown=FIRST_SETTINGS | SUBMIT_SETTINGS)
    p = sub.add_parser("submit", help="compile, upload and run the pipeline on a Kubeflow Pipelines cluster",
                       description="Compile the pipeline, upload it (or a new version of the pipeline of that name; "
                                   "an identical compile reuses its version), and create a run in the experiment with "
                                   "the config's run parameters and the pipeline ServiceAccount. With --wait, print "
                                   "each state change; exit code 0 = SUCCEEDED and deployed, 3 = SUCCEEDED but a gate "
                                   "blocked deploy, 1 = FAILED/CANCELED/SKIPPED, 124 = still running at --timeout.")
    p.add_argument("--run-name", help="run name (default: '<pipeline> <UTC time>')")
    p.add_argument("--wait", action="store_true", help="wait for the run to end and stream its states")
    p.add_argument("--timeout", type=float, metavar="S", help="with --wait: stop waiting after S seconds (the run goes on)")
    p.add_argument("--poll-s", type=float, default=10.0, metavar="S",
                   help="with --wait: seconds between status checks (default: 10)")
    add_json(p, "the run id, its URL and, with --wait, its final state")
    add_connection_args(p, **run_settings)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="recurring retraining runs on the cluster: create, list, pause, resume, delete",
                       description="Recurring runs of the pipeline on Kubeflow Pipelines. 'mlops schedule --cron "
                                   "EXPR' is 'mlops schedule create --cron EXPR'.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("create", help="a recurring run of the pipeline (uploaded as by submit)",
                           description="Create a KFP recurring run of the pipeline (uploaded as by submit) with "
                                       "catch-up off. Cron: 5 fields (converted to KFP's 6-field form with seconds "
                                       "first) or 6 fields or @daily/@weekly/...; times are in the KFP scheduler's "
                                       "time zone (usually UTC).")
    a.add_argument("target", nargs="?", help=argparse.SUPPRESS)  # a stray name: told to use --name
    a.add_argument("--cron", help="when to run: '0 3 * * *' = 03:00 every day")
    a.add_argument("--name", default=DEFAULT_SCHEDULE_NAME, help=f"schedule name (default: {DEFAULT_SCHEDULE_NAME})")
    a.add_argument("--max-concurrency", type=int, default=1, metavar="N",
                   help="runs of this schedule at once, 1-10 (default: 1: a slow run delays the next)")
    add_json(a, "the schedule")
    add_connection_args(a, **run_settings)
    a.set_defaults(func=cmd_schedule_create)
    create = a

    a = actions.add_parser("list", help="every schedule: name, id, cron, enabled",
                           description="The recurring runs in the namespace.")
    add_json(a, "the schedules")
    add_connection_args(a, areas=("cluster",), only=CONNECTION)
    a.set_defaults(func=cmd_schedule_list)
    for name, help in (("pause", "stop starting runs (runs in progress go on)"), ("resume", "start runs again"),
                       ("delete", "delete the schedule; the runs it started are kept")):
        a = actions.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.")
        a.add_argument("target", nargs="?", metavar="NAME|ID", help="the schedule (see mlops schedule list)")
        add_json(a, "the schedule")
        add_connection_args(a, areas=("cluster",), only=CONNECTION)
        a.set_defaults(func=cmd_schedule_change)
    return create
