"""``mlops runs list|show|compare`` and ``mlops ui``, registered on ``mlops``'s sub-parsers by ``add_parsers``.

``--json`` prints one JSON object (keys in docs/browser.md, stable: new keys may be added, none renamed):
``list``: ``{"schema", "runs_dir", "production", "runs": [run_row, ...]}``; ``show``: ``{"schema", "production",
"run": run_detail}``; ``compare``: ``{"schema", "runs", "rows": [{"section", "key", "values", "differs"}]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines import config as config_mod
from pipelines.browser import catalog

DEFAULT_PORT = 8765


def _sources(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(runs directory, serving home, ledger) from the flags and the config's serving area."""
    from components.core.ledger import location

    cfg = config_mod.load(args.config)
    ledger = args.ledger or location(cfg.serving)
    return Path(args.runs_dir), Path(cfg.serving.home), ledger


def _read(args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None]:
    """(runs directory, the model in production or None); a ledger that cannot be read is said on stderr."""
    runs_dir, home, ledger_uri = _sources(args)
    ledger, problem = catalog.open_ledger(ledger_uri)
    if problem:
        print(f"mlops {args.command}: {problem}", file=sys.stderr)
    return runs_dir, catalog.production(home, ledger, catalog.list_runs(runs_dir))


def _emit(args: argparse.Namespace, text: str) -> None:
    """The --json result, on the stdout ``mlops`` keeps for results (``args.stdout``) when it sets one."""
    print(text, file=getattr(args, "stdout", None) or sys.stdout, flush=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _gate_marks(gates: dict[str, bool | None]) -> str:
    return " ".join(f"{name[:4]}:{'ok' if ok else '-' if ok is None else 'NO'}" for name, ok in gates.items())


def cmd_runs(args: argparse.Namespace) -> int:
    runs_dir, prod = _read(args)
    if args.action == "list":
        rows = catalog.list_runs(runs_dir, prod)
        if args.json:
            _emit(args, json.dumps({"schema": catalog.SCHEMA, "runs_dir": str(runs_dir), "production": prod,
                                    "runs": rows}, default=str))
        elif not rows:
            print(f"No runs under {runs_dir}/ yet: make one with 'mlops run --config examples/quick.yaml'.")
        else:
            print(f"{'RUN':<20} {'STATUS':<10} {'STARTED (UTC)':<20} {'SECONDS':>8} {'MODEL':<13} {'TEST ACC':>8}  "
                  f"{'GATES':<30} {'CPU S':>7}  PROD")
            for r in rows:
                print(f"{r['run_id']:<20} {r['status']:<10} {(r['started_at'] or '-'):<20} {_fmt(r['seconds'], 1):>8} "
                      f"{(r['model_version'] or '-')[:12]:<13} {_fmt(r['test_accuracy']):>8}  "
                      f"{_gate_marks(r['gates']):<30} {_fmt(r['cost']['cpu_seconds'], 1):>7}  "
                      f"{'*' if r['in_production'] else ''}")
        return 0
    if args.action == "show":
        detail = catalog.run_detail(catalog.find_run(runs_dir, args.run_id), prod)
        if args.json:
            _emit(args, json.dumps({"schema": catalog.SCHEMA, "production": prod, "run": detail}, default=str))
        else:
            print(format_detail(detail))
        return 0
    if len(args.run_ids) < 2:
        print(f"mlops runs compare: needs at least two run ids, got {len(args.run_ids)}: "
              "mlops runs compare A B [C ...]",
              file=sys.stderr)
        return 2
    details = [catalog.run_detail(catalog.find_run(runs_dir, run_id), prod) for run_id in args.run_ids]
    table = catalog.compare_runs(details)
    if args.json:
        _emit(args, json.dumps(table, default=str))
    else:
        print(format_compare(table, everything=args.all))
    return 0


def format_detail(d: dict[str, Any]) -> str:
    blocked = f" (blocked by {', '.join(d['blocked_by'])})" if d["blocked_by"] else ""
    failed = f" (step {d['failed_step']} failed)" if d["failed_step"] else ""
    lines = [f"Run {d['run_id']}: {d['status'].upper()}{blocked}{failed}"
             + ("  [in production]" if d["in_production"] else ""),
             f"  started {d['started_at'] or '-'}, {_fmt(d['seconds'], 1)} s, model {d['model_version'] or '-'}, "
             f"test accuracy {_fmt(d['test_accuracy'])}",
             f"  cost: {_fmt(d['cost']['wall_seconds'], 1)} s wall, {_fmt(d['cost']['cpu_seconds'], 1)} s CPU, "
             f"{_fmt(d['cost']['gpu_seconds'], 1)} s GPU, peak {_fmt(d['cost']['peak_rss_mb'], 0)} MB"]
    if d["problem"]:
        lines.append(f"  {d['problem']}")
    lines.append("Steps:")
    for s in d["steps"]:
        lines.append(f"  {s['name']:<11} {s['status']:<10} {_fmt(s['seconds'], 2):>8} s"
                     + (f"  ({s['reason']})" if s["reason"] else ""))
    lines.append("Gates:")
    for g in d["gates_detail"]:
        word = "did not run" if g["passed"] is None else ("passed" if g["passed"] else "BLOCKED")
        lines.append(f"  {g['name']:<11} {word}" + (f": {g['reason']}" if g["reason"] else "")
                     + (" (overridden)" if g["overridden"] else ""))
    for r in d["reports"]:
        lines.append(f"Report {r['name']:<14} {r['path']}" + ("" if r["exists"] else "  (missing)"))
    return "\n".join(lines)


def format_compare(table: dict[str, Any], everything: bool = False) -> str:
    rows = [r for r in table["rows"] if everything or r["differs"] or r["section"] in ("run", "metrics")
            or r["key"].endswith(".passed")]
    width = max([len(f"{r['section']}.{r['key']}") for r in rows] + [10])
    head = f"  {'':<{width}}  " + "  ".join(f"{run_id[:18]:>18}" for run_id in table["runs"])
    lines = [head]
    for r in rows:
        mark = "*" if r["differs"] else " "
        lines.append(f"{mark} {r['section'] + '.' + r['key']:<{width}}  "
                     + "  ".join(f"{_fmt(v)[:18]:>18}" for v in r["values"]))
    same = sum(1 for r in table["rows"] if r["section"] == "config" and not r["differs"])
    if not everything:
        lines.append(f"(* differs; {same} config settings are the same in every run: --all shows them)")
    return "\n".join(lines)


def cmd_ui(args: argparse.Namespace) -> int:
    from pipelines.browser.server import Site, UIServer
    from pipelines.browser.site import build_site

    runs_dir, home, ledger = _sources(args)
    if args.build_only:
        index = build_site(runs_dir, args.out, serving_home=home, ledger_uri=ledger)
        print(f"Wrote the run browser to {index.parent}/: open {index.resolve().as_uri()}")
        return 0
    if args.out:
        raise ValueError("--out goes with --build-only; 'mlops ui' serves <runs-dir>/ui")
    try:
        server = UIServer(Site(runs_dir, home, ledger), args.host, args.port, allow_remote=args.allow_remote,
                          verbose=args.verbose)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"mlops ui: cannot listen on {args.host}:{args.port} ({exc.strerror or exc}): pass another --port "
              "(0: any free one)", file=sys.stderr)
        return 1
    print(f"Run browser at {server.url} (read-only; also on disk at {(runs_dir / 'ui' / 'index.html').resolve()}). "
          "Ctrl-C stops it.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="where the run directories are (default: runs)")
    parser.add_argument("--config", metavar="FILE", help="YAML config; its serving section says where the serving "
                                                         "state and the release ledger are")
    parser.add_argument("--ledger", metavar="URI", help="the release ledger: a directory or s3:// prefix (default: "
                                                        "from the config, as 'mlops releases' finds it)")


def add_parsers(sub) -> None:
    """``mlops runs`` and ``mlops ui``, on ``mlops``'s sub-parsers."""
    p = sub.add_parser("runs", help="local runs: list, show one, compare several",
                       description="Browse the runs under --runs-dir: status, duration, model version, test "
                                   "accuracy, gates, cost and which one is in production (docs/browser.md).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="one line per run, newest first")
    _common(a)
    a.add_argument("--json", action="store_true", help="print the runs as one JSON object")
    a = actions.add_parser("show", help="one run: steps, gates, reports (default: the newest run)")
    a.add_argument("run_id", nargs="?", metavar="RUN_ID")
    _common(a)
    a.add_argument("--json", action="store_true", help="print the run as one JSON object")
    a = actions.add_parser("compare", help="two or more runs side by side: metrics, gates, config differences")
    a.add_argument("run_ids", nargs="+", metavar="RUN_ID")
    _common(a)
    a.add_argument("--all", action="store_true", help="also the settings and gate numbers that do not differ")
    a.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("ui", help="the run browser: a read-only local web page of runs, releases and monitoring",
                       description="Build the static run browser under <runs-dir>/ui (it opens from disk) and serve it "
                                   "read-only on loopback, rebuilding it when runs, the ledger or monitoring windows "
                                   "change. Pages: runs, a run, compare, releases, monitoring.")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; others need "
                                                        "--allow-remote)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host: anyone who reaches it can read the runs")
    p.add_argument("--build-only", action="store_true", help="write the static site and exit")
    p.add_argument("--out", metavar="DIR", help="with --build-only: where to write it (default: <runs-dir>/ui)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_ui)
