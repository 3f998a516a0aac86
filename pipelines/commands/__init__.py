"""The ``mlops`` sub-commands, one module per command group; ``pipelines/cli.py`` assembles them.

What every command shares lives here: ``--config`` and the generated settings flags (with a short ``--help`` and
``--help-all``), ``--runs-dir``, ``--json`` and the rule that goes with it: with ``--json`` the result is one JSON
document on stdout and every human line goes to stderr, so ``mlops ... --json | jq`` always works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from pipelines import config as config_mod

KFP_HOST_ENV = "KFP_HOST"  # the KFP API URL when --kfp-host is not given (flag, then this, then cluster.kfp_host)
MORE_SETTINGS = "{count} more {area} settings: --help-all lists them, 'mlops config show --area {area}' shows their values"


def add_config_args(parser: argparse.ArgumentParser, areas: tuple[str, ...], *,
                    shown: frozenset[str] | None = None, only: frozenset[str] | None = None) -> None:
    """``--config FILE`` and a flag per config field of ``areas``; with ``shown``, ``--help`` lists only those
    fields' flags (the rest still parse) and ``--help-all`` lists every one."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML config (sections: data, pretrain, finetune, gates, serving, rollout, monitor, "
                             "cluster); flags override it")
    if shown is not None:
        parser.add_argument("--help-all", action=HelpAll, help="show every settings flag, then exit")
    config_mod.add_flags(parser, areas, shown=shown, only=only, more=MORE_SETTINGS)


class HelpAll(argparse.Action):
    """``--help-all``: the help with every settings flag that ``--help`` leaves out."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        for action in parser._actions:
            if hasattr(action, "full_help"):
                action.help = action.full_help
        for group in parser._action_groups:
            if hasattr(group, "full_description"):
                group.description = group.full_description
        parser.print_help()
        parser.exit()


def load_config(args: argparse.Namespace, target: str = config_mod.LOCAL) -> config_mod.Config:
    """The config file (or the defaults) with the flags applied, validated for ``target``."""
    cfg = config_mod.apply_flags(config_mod.load(args.config, target), args, target)
    if getattr(args, "cluster_kfp_host", None) is None and os.environ.get(KFP_HOST_ENV):
        cfg.cluster.kfp_host = os.environ[KFP_HOST_ENV]
    return cfg


def add_runs_dir(parser: argparse.ArgumentParser, what: str = "run directories") -> None:
    parser.add_argument("--runs-dir", default="runs", metavar="DIR", help=f"where {what} are (default: runs)")


def add_json(parser: argparse.ArgumentParser, what: str = "the result", compact: bool = False) -> None:
    """``--json``; with it, ``main`` sends all the command prints to stderr but what ``emit_json`` prints."""
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as JSON{' on one line' if compact else ''} on stdout; progress and "
                             "messages go to stderr")
    parser.set_defaults(json_result=True)


def human(args: argparse.Namespace) -> TextIO:
    """Where human-readable lines go: stdout, or stderr when the command prints JSON."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def say(args: argparse.Namespace):
    """A print for human lines (``out=`` of the library functions that report progress)."""
    def out(line: str = "") -> None:
        print(line, file=human(args), flush=True)
    return out


def emit_json(args: argparse.Namespace, data: Any, compact: bool = False) -> None:
    """The command's result on stdout (``args.stdout``: main sends everything else a --json command prints, its
    libraries' too, to stderr): indented, or on one line (``compact``: a log line)."""
    text = json.dumps(data, default=str) if compact else json.dumps(data, indent=2, default=str)
    print(text, file=getattr(args, "stdout", None) or sys.stdout, flush=True)
