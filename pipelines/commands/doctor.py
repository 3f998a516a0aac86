"""``mlops doctor`` (can this machine run the pipeline?) and ``mlops config show`` (every setting, its value)."""

from __future__ import annotations

import argparse

from pipelines import config as config_mod
from pipelines.commands import add_config_args, add_json, add_runs_dir, emit_json, load_config


def cmd_doctor(args: argparse.Namespace) -> int:
    from pipelines import doctor

    checks = doctor.preflight(load_config(args), args.runs_dir, args.runner)
    failed = sum(c.status == doctor.FAIL for c in checks)
    if args.json:
        emit_json(args, {"ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        print("\n".join(c.line() for c in checks))
        print(f"{failed} check(s) failed: 'mlops run' would stop before training." if failed else
              "Ready: 'mlops run' can train and serve here.")
    return 1 if failed else 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args, args.target)
    areas = (args.area,) if args.area else tuple(config_mod.Config.__dataclass_fields__)
    rows = [{"setting": p.dotted, "flag": config_mod.flag_of(p), "value": p.value_in(cfg),
             "default": p.default_for(args.target), "allowed": p.range_text(), "help": p.help}
            for p in config_mod.parameters(areas, args.target)]
    if args.json:
        emit_json(args, rows)
        return 0
    for row in rows:
        changed = "" if row["value"] == row["default"] else f"   (default {row['default']!r})"
        allowed = f"; {row['allowed']}" if row["allowed"] else ""
        print(f"{row['setting']} = {row['value']!r}{changed}\n    {row['flag']}{allowed}: {row['help']}")
    return 0


def add_parsers(sub) -> None:
    from pipelines.local import RUNNERS

    p = sub.add_parser("doctor", help="check this machine before a run: Python, torch, Java, ports, disk, Docker",
                       description="Check what a local run needs, one line each: 'ok|warn|FAIL  what  (how to fix)'. "
                                   "mlops run runs the same checks first and stops before training when one fails. "
                                   "Exit code 0 = no FAIL, 1 = at least one.")
    add_runs_dir(p)
    p.add_argument("--runner", choices=RUNNERS, default="subprocess",
                   help="check for this runner of mlops run: 'docker' adds the engine and images, drops Java")
    add_json(p, "the checks")
    add_config_args(p, ("serving",), only=frozenset({"serving_home", "serving_host", "serving_inference_port",
                                                     "serving_management_port", "serving_metrics_port",
                                                     "serving_deploy_target"}))
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="every setting: its value, default, flag and meaning",
                       description="Settings live in pipelines/config.py, one field each; set them in a --config "
                                   "file (by area) or with their flag. 'mlops config show' lists every one.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("show", help="every setting with its value (the config file and flags applied)",
                           description="Every setting, its value with --config and the flags applied, its default, "
                                       "its flag, what it allows and what it means.")
    a.add_argument("--area", choices=tuple(config_mod.Config.__dataclass_fields__), help="only this area's settings")
    a.add_argument("--target", choices=config_mod.TARGETS, default=config_mod.LOCAL,
                   help="the defaults of a local run or of a cluster (compile, submit)")
    add_json(a, "the settings")
    add_config_args(a, tuple(config_mod.Config.__dataclass_fields__), shown=frozenset())
    a.set_defaults(func=cmd_config_show)
