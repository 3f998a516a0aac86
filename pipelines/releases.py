"""``mlops releases``: the release ledger (components.core.ledger) from the command line.

``list`` shows one line per released model version (when, where, how, its status now, the run that trained it);
``show`` walks a version's lineage back to its run, data and gates and forward to the drift, retrain and release
that followed; ``diff`` compares two versions' metrics, gates and config; ``rollback`` and ``promote`` serve a
released model again and record who asked and why (pipelines/release_actions.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from components.core.ledger import Ledger, LedgerError, Record, location
from pipelines import config as config_mod
from pipelines.commands import add_json, emit_json

SHORT = 12  # characters of a model version or hash shown in text output


def _short(value: Any) -> str:
    return str(value)[:SHORT] if value else "-"


def _when(record: Record) -> str:
    return record.at.replace("T", " ")[:19]


# -- views


def release_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """One row per released model version, oldest first: its newest release, status now, and run."""
    rows = []
    for version in ledger.released_versions():
        released = ledger.released(version)
        trained = ledger.run_of(released)
        rows.append({"version": version, "released_at": released.at, "record": released.id,
                     "target": released.data.get("target"), "strategy": released.data.get("strategy"),
                     "endpoint": released.data.get("endpoint"), "status": ledger.status(version),
                     "run": trained.data["run_id"] if trained else released.data.get("run_id") or None})
    return rows


def format_rows(rows: list[dict[str, Any]], where: str) -> str:
    if not rows:
        return f"No release recorded in {where} yet."
    head = f"{'VERSION':<{SHORT}}  {'RELEASED (UTC)':<19}  {'TARGET':<10}  {'STRATEGY':<8}  {'STATUS':<11}  RUN"
    lines = [head] + [f"{_short(r['version']):<{SHORT}}  {r['released_at'].replace('T', ' ')[:19]:<19}  "
                      f"{r['target'] or '-':<10}  {r['strategy'] or '-':<8}  {r['status']:<11}  {r['run'] or '-'}"
                      for r in rows]
    return "\n".join(lines)


def describe(record: Record) -> list[str]:
    """A record in a line or a few, for ``show``."""
    d = record.data
    head = f"{record.type:<15} {record.id}  {_when(record)}  {record.actor}"
    if record.type == "trained":
        code = d.get("code") or {}
        ran = code.get("image_id") or code.get("image") or f"package {code.get('package_version', '?')}"
        total = ((d.get("cost") or {}).get("total") or {}).get("wall_seconds")
        return [f"{head}  run {d['run_id']}, model v{_short(d['model_version'])}",
                f"    config sha256 {_short(d['config_sha256'])}, data {d.get('data_source')} (card sha256 "
                f"{_short(d.get('data_card_sha256'))}), code {_short(ran) if ran.startswith('sha256:') else ran}"
                + (f", {total:.0f} s of steps" if isinstance(total, (int, float)) else "")]
    if record.type == "gated":
        lines = [f"{head}  {'PASSED' if d['passed'] else 'BLOCKED by ' + ', '.join(d.get('blocked_by', []))}"
                 + (f" (overridden: {', '.join(d['overridden'])})" if d.get("overridden") else "")]
        for name, gate in d.get("gates", {}).items():
            word = "overridden" if gate.get("overridden") else ("passed" if gate.get("passed_checks") else "failed")
            override = f"; override: {gate['override_reason']}" if gate.get("overridden") else ""
            lines.append(f"    {name:<11} {word}: {gate.get('reason', '')}{override}")
        return lines
    if record.type == "released":
        extra = f"; {d['reason']}" if d.get("reason") else ""
        extra += f"; OVERRIDE: {d['override']['reason']}" if isinstance(d.get("override"), dict) else ""
        return [f"{head}  v{_short(d['model_version'])} {d['strategy']} to {d['target']} at {d.get('endpoint')}"
                + (f" (run {d['run_id']})" if d.get("run_id") else "") + extra]
    if record.type in ("promoted", "rolled_back"):
        challenger = ((d.get("evidence") or {}).get("challenger") or {}).get("requests")
        how = "automatic" if d.get("automatic") else "by hand"
        evidence = f", challenger saw {challenger} requests" if challenger is not None else ""
        return [f"{head}  v{_short(d['model_version'])} ({how}{evidence}): {d['reason']}"]
    if record.type == "drift":
        window = d.get("window") or {}
        verdict = "DRIFT" if d.get("drift_detected") else d.get("status", "no drift")
        return [f"{head}  v{_short(d.get('model_version'))} {window.get('since') or 'start'} to "
                f"{window.get('until') or 'now'}: {verdict}", f"    report {d.get('report')}"]
    if record.type == "retrain_started":
        return [f"{head}  run {d['run']} ({d.get('target', '?')}), because of drift {d.get('drift_record') or '?'}"]
    return [head]


def show(ledger: Ledger, version: str) -> dict[str, Any]:
    """A version's lineage: back from its newest release to its run, data and gates; forward from its releases."""
    version = ledger.resolve_version(version)
    released = ledger.find("released", model_version=version)
    back = ledger.lineage(released[-1])
    forward: dict[str, Record] = {}
    for r in released:
        forward.update({d.id: d for d in ledger.descendants(r) if d.id not in {x.id for x in released}})
    return {"version": version, "status": ledger.status(version), "back": back,
            "forward": sorted(forward.values(), key=lambda r: r.seq)}


def format_show(view: dict[str, Any]) -> str:
    lines = [f"Model v{view['version']}: {view['status']}", "", "Lineage (newest first):"]
    lines += ["  " + line for record in view["back"] for line in describe(record)]
    lines += ["", "What followed:" if view["forward"] else "Nothing has followed yet."]
    lines += ["  " + line for record in view["forward"] for line in describe(record)]
    return "\n".join(lines)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"area.field": value}``."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _pairs(a: dict[str, Any], b: dict[str, Any], changed_only: bool) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if not changed_only or a.get(k) != b.get(k)}


def diff(ledger: Ledger, a: str, b: str) -> dict[str, Any]:
    """Two released versions side by side: metrics (training and gate numbers), gate verdicts, config changes,
    and where data or code differ."""
    sides = []
    for prefix in (a, b):
        version = ledger.resolve_version(prefix)
        lineage = ledger.lineage(ledger.released(version))
        trained = next((r for r in lineage if r.type == "trained"), None)
        gated = next((r for r in lineage if r.type == "gated"), None)
        sides.append((version, trained, gated))
    (va, ta, ga), (vb, tb, gb) = sides

    def metrics(trained: Record | None, gated: Record | None) -> dict[str, Any]:
        out = {f"{step}.{k}": v for step, numbers in ((trained.data.get("training") or {}) if trained else {}).items()
               for k, v in numbers.items()}
        for name, gate in ((gated.data.get("gates") or {}) if gated else {}).items():
            out.update({f"{name}.{k}": v for k, v in (gate.get("numbers") or {}).items()})
        return out

    def verdicts(gated: Record | None) -> dict[str, Any]:
        return {name: ("overridden" if g.get("overridden") else "passed" if g.get("passed_checks") else "failed")
                for name, g in ((gated.data.get("gates") or {}) if gated else {}).items()}

    def facts(trained: Record | None) -> dict[str, Any]:
        if trained is None:
            return {}
        d = trained.data
        return {"run": d["run_id"], "data card sha256": d.get("data_card_sha256"), "data source": d.get("data_source"),
                "config sha256": d["config_sha256"], **{f"code.{k}": v for k, v in (d.get("code") or {}).items()}}

    return {"a": va, "b": vb, "metrics": _pairs(metrics(ta, ga), metrics(tb, gb), False),
            "gates": _pairs(verdicts(ga), verdicts(gb), False),
            "config": _pairs(_flat(ta.data["config"]) if ta else {}, _flat(tb.data["config"]) if tb else {}, True),
            "facts": _pairs(facts(ta), facts(tb), False)}


def format_diff(view: dict[str, Any]) -> str:
    def number(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    a, b = _short(view["a"]), _short(view["b"])
    lines = [f"{'':<40}  {a:>14}  {b:>14}"]
    for section in ("facts", "gates", "metrics"):
        lines.append(f"{section}:")
        for key, (x, y) in view[section].items():
            if section == "metrics" and isinstance(x, (int, float)) and isinstance(y, (int, float)) and x != y:
                change = f"  ({y - x:+.4g})"
            else:
                change = "" if x == y else "  (differs)"
            lines.append(f"  {key:<38}  {number(x)[:14]:>14}  {number(y)[:14]:>14}{change}")
    lines.append("config (changed fields):" if view["config"] else "config: the same")
    lines += [f"  {key:<38}  {json.dumps(x)[:14]:>14}  {json.dumps(y)[:14]:>14}" for key, (x, y) in view["config"].items()]
    return "\n".join(lines)


# -- the command


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.apply_flags(config_mod.load(args.config), args)


def open_ledger(args: argparse.Namespace, cfg: config_mod.Config) -> Ledger:
    return Ledger(args.ledger or location(cfg.serving))


def _as_json(record: Record) -> dict[str, Any]:
    return record.as_dict()


def cmd_releases(args: argparse.Namespace) -> int:
    from components.core.blobs import StorageError

    cfg = _config(args)
    try:
        ledger = open_ledger(args, cfg)
        with ledger.pinned():  # one listing of the ledger for the whole command
            return ACTIONS[args.action](args, cfg, ledger)
    except (LedgerError, StorageError) as exc:
        print(f"mlops releases {args.action}: {exc}", file=sys.stderr)
        return 1


def _list(args, cfg, ledger: Ledger) -> int:
    rows = release_rows(ledger)
    if args.json:
        emit_json(args, rows)
    else:
        print(format_rows(rows, ledger.base))
    return 0


def _show(args, cfg, ledger: Ledger) -> int:
    view = show(ledger, args.version)
    if args.json:
        emit_json(args, {**view, "back": [_as_json(r) for r in view["back"]],
                         "forward": [_as_json(r) for r in view["forward"]]})
    else:
        print(format_show(view))
    return 0


def _diff(args, cfg, ledger: Ledger) -> int:
    view = diff(ledger, args.a, args.b)
    if args.json:
        emit_json(args, view)
    else:
        print(format_diff(view))
    return 0


def _target(args) -> Any:
    from pipelines.release_actions import KubernetesTarget

    return KubernetesTarget(namespace=args.namespace or "", token_file=args.token_file or "", dataset=args.dataset or "")


def _acted(action: str, cfg: config_mod.Config, ledger: Ledger, records: tuple[Record, Record]) -> int:
    from pathlib import Path

    from pipelines.release_actions import note_served

    released = next(r for r in records if r.type == "released")
    if cfg.serving.deploy_target == "local":
        note_served(Path(cfg.serving.home).resolve(), ledger, released)
    print(f"{action}: model v{released.data['model_version']} serves at {released.data.get('endpoint')} "
          f"({released.data['target']}); recorded in {ledger.base} as "
          + ", ".join(f"{r.type} {r.id}" for r in records) + f" by {released.actor}")
    return 0


def _serving_failed(action: str, exc: Exception) -> int:
    print(f"mlops releases {action}: {exc}", file=sys.stderr)
    return 1


def _rollback(args, cfg, ledger: Ledger) -> int:
    from pipelines.release_actions import rollback

    try:
        records = rollback(ledger, cfg.serving, args.reason, to=args.to, k8s=_target(args))
    except (RuntimeError, TimeoutError) as exc:  # the model did not serve: nothing recorded
        if isinstance(exc, LedgerError):
            raise
        return _serving_failed("rollback", exc)
    return _acted("rolled back", cfg, ledger, records)


def _promote(args, cfg, ledger: Ledger) -> int:
    from pipelines.release_actions import promote

    try:
        records = promote(ledger, cfg.serving, args.version, args.reason, k8s=_target(args))
    except (RuntimeError, TimeoutError) as exc:
        if isinstance(exc, LedgerError):
            raise
        return _serving_failed("promote", exc)
    return _acted("promoted", cfg, ledger, records)


ACTIONS = {"list": _list, "show": _show, "diff": _diff, "rollback": _rollback, "promote": _promote}


def add_parser(sub) -> None:
    """``mlops releases`` and its sub-commands, on ``mlops``'s sub-parsers."""
    p = sub.add_parser("releases", help="the release ledger: list, show, diff, rollback, promote",
                       description="What was trained, gated, released, rolled back and seen drifting, from the "
                                   "release ledger (serving.ledger_uri, else KFP_MLOPS_LEDGER, else "
                                   "<serving.home>/ledger). VERSION: a model version or a unique start of one.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, description: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, description=description)
        a.add_argument("--config", metavar="FILE", help="YAML config; its serving section says where the ledger "
                                                        "and the server are")
        a.add_argument("--ledger", metavar="URI", help="the ledger: a directory or s3:// prefix (default: from the "
                                                       "config, as above)")
        a.set_defaults(func=cmd_releases)
        return a

    a = action("list", "one line per released model version",
               "Each released version: when, target, strategy, status (production, rolled back, superseded, "
               "in rollout) and the run that trained it.")
    add_json(a, "the rows")
    a = action("show", "a version's lineage, back to its run and forward to what followed",
               "Back: the release, its gates, the run (config and data card hashes, code) and what caused it "
               "(a retrain, the drift before it). Forward: promotion or rollback, drift, retrain, the next release.")
    a.add_argument("version", metavar="VERSION")
    add_json(a, "the records")
    a = action("diff", "two versions' metrics, gates and config side by side",
               "Training and gate numbers (with the change), each gate's verdict, data and code, and every config "
               "field that differs.")
    a.add_argument("a", metavar="A")
    a.add_argument("b", metavar="B")
    add_json(a, "the comparison")
    for name, help, description in (
            ("rollback", "serve the version before the one in production again",
             "Take the model in production out and serve the one that served before it (or --to VERSION) on "
             "serving.deploy_target: the local server, or the serving Deployment (applied and smoke-tested, rolled "
             "back on failure). Recorded with who and why."),
            ("promote", "serve a released version in production",
             "Serve a released VERSION (e.g. a challenger a rollout rolled back) on serving.deploy_target, as "
             "rollback does. Recorded with who and why.")):
        a = action(name, help, description)
        if name == "rollback":
            a.add_argument("--to", metavar="VERSION", help="the version to serve (default: what served before)")
        else:
            a.add_argument("version", metavar="VERSION")
        a.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded with who asked)")
        config_mod.add_flags(a, ("serving",))
        k8s = a.add_argument_group("on Kubernetes (serving.deploy_target kubernetes)")
        k8s.add_argument("--namespace", help="of the serving Deployment (default: the pod's own, else kfp-mlops)")
        k8s.add_argument("--token-file", metavar="FILE", help="a token the serving pods accept, for the smoke test "
                                                              "(default: the pipeline's mounted source token)")
        k8s.add_argument("--dataset", metavar="DIR", help="dataset whose test split smoke-tests the release "
                                                          "(default: the released record's)")
