"""``mlops``: run the pipeline locally, compile it for Kubeflow, manage the local server, check drift.

Examples:
    mlops doctor                                    # can this machine run it? (mlops run checks the same first)
    mlops run                                       # the whole pipeline on this machine, in runs/<run-id>/
    mlops run --config examples/quick.yaml --pretrain-epochs 5
    mlops predict --digit 3                         # ask the served model about a built-in handwritten 3
    mlops serve status                              # the local endpoint (start, stop: the same way)
    mlops monitor --last 1h                         # drift of the last whole hour of served traffic
    mlops releases show 3f2a9c                      # a released model's lineage: run, data, gates, drift, retrain
    mlops config show --area pretrain               # every setting of an area: value, default, flag, meaning
    mlops compile -o pipeline.yaml --cluster-image registry.example.com/kfp-mlops:0.1.0
    mlops submit --kfp-host http://localhost:8888 --wait
    mlops schedule create --cron "0 3 * * *" --kfp-host http://localhost:8888

Every command that reports something takes --json: the result as JSON on stdout, messages on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import sys

from pipelines import config as config_mod
from pipelines import releases as releases_mod
from pipelines.browser import cli as browser_cli
from pipelines.cluster.connection import ClusterError
from pipelines.commands import cluster, doctor, monitor, run, serve

PACKAGE = "kfp-mlops"


def version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


class MlopsParser(argparse.ArgumentParser):
    """``mlops``'s parser; it reads ``mlops schedule --cron ...`` (no action, or the action after the connection
    flags) as the ``mlops schedule create|list|...`` it means."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] == "schedule":
            args = ["schedule", *schedule_argv(args[1:], self._schedule_create)]
        return super().parse_known_args(args, namespace)


def schedule_argv(argv: list[str], create: argparse.ArgumentParser) -> list[str]:
    """``argv`` after ``schedule`` with its action first: the first bare word that names one, else ``create``."""
    if not argv or argv[0] in cluster.SCHEDULE_ACTIONS or argv[0] in ("-h", "--help"):
        return argv
    takes_value = {o for a in create._actions for o in a.option_strings if a.nargs != 0}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--" or not word.startswith("-"):
            if word in cluster.SCHEDULE_ACTIONS:
                return [word, *argv[:i], *argv[i + 1:]]
            break
        if "=" not in word and word in takes_value:
            i += 1  # the option's value, not an action
        i += 1
    return ["create", *argv]


def build_parser() -> argparse.ArgumentParser:
    parser = MlopsParser(prog="mlops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parsers(sub)
    serve.add_parsers(sub)
    monitor.add_parsers(sub)
    releases_mod.add_parser(sub)
    browser_cli.add_parsers(sub)
    parser._schedule_create = cluster.add_parsers(sub)
    doctor.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # nothing asked: the help, and a usage error's exit code so a script that forgot the command fails
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    args.stdout = sys.stdout  # the result of a --json command; all else it prints goes to stderr
    try:
        json_only = getattr(args, "json", False) and getattr(args, "json_result", False)
        with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
            return args.func(args)
    except config_mod.ConfigError as exc:  # before anything ran: a usage error
        print(f"mlops {args.command}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, ClusterError) as exc:
        print(f"mlops {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
