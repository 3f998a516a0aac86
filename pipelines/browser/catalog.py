"""What the run browser shows, read from disk into plain dicts: runs, one run, a comparison, the release ledger
and the monitoring windows. Nothing here writes; every reader tolerates old or partial files (a summary without
newer keys, a failed or unfinished run, an unreadable file: it is listed with the problem, never dropped).

Sources:

* ``<runs>/<run-id>/summary.json`` and ``config.json`` (pipelines/local.py); a directory with ``config.json`` but
  no summary is a run that is still going or was interrupted (status ``unfinished``).
* The serving state ``<serving home>/state.json`` (which model the local server serves, and its run), else the
  release ledger's ``in_production`` (components/core/ledger.py).
* Monitoring windows: ``mlops monitor``'s results (``<runs>/monitor/<version>/<since>--<until>/verdict.json``),
  each run's own window (``reports/drift_verdict.json``, the pipeline's monitor step) and the ledger's ``drift``
  records, merged on (model version, window).

The keys of ``run_row``, ``run_detail``, ``compare_runs``, ``release_events`` and ``monitoring_windows`` are the
``--json`` output of ``mlops runs`` and are documented in docs/browser.md; add keys, never rename them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from pipelines.local import GATES, STEP_NAMES, SUMMARY_FILE

SCHEMA = "kfp-mlops/runs-v1"
GATE_NAMES = tuple(GATES.values())  # evaluation, privacy, robustness
CONFIG_FILE = "config.json"
MONITOR_DIR = "monitor"  # mlops monitor's default results root under the runs directory
VERDICT_FILE, REPORT_FILE = "verdict.json", "drift_report.html"  # components/monitor/report.py's names
COST_SUMS = ("wall_seconds", "cpu_seconds", "gpu_seconds")
# The pipeline's step graph (pipelines/pipeline.py): each step and the steps it waits for.
STEP_PARENTS: dict[str, tuple[str, ...]] = {
    "ingest": (), "pretrain": ("ingest",), "finetune": ("pretrain", "ingest"),
    "evaluate": ("finetune", "ingest"), "privacy": ("finetune", "ingest"), "robustness": ("finetune", "ingest"),
    "record": ("evaluate", "privacy", "robustness"), "deploy": ("evaluate", "privacy", "robustness"),
    "monitor": ("deploy",),
}
REPORT_KINDS = {".md": "markdown", ".html": "html", ".htm": "html", ".json": "json"}


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _read_json(path: Path) -> tuple[Any, str | None]:
    """(the parsed file, None) or (None, what is wrong with it)."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path}: {exc}"


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


# -- runs


def run_dirs(runs_dir: str | Path) -> list[Path]:
    """Directories of ``runs_dir`` that hold a run (a summary, or the config a run writes first), by name."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / SUMMARY_FILE).is_file() or (p / CONFIG_FILE).is_file()))


def _summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary; a stand-in saying what is wrong when there is none or it cannot be read."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return {"run_id": run_dir.name, "status": "unfinished",
                "problem": f"no {SUMMARY_FILE} yet: the run is still going or was interrupted (see pipeline.log)"}
    summary, problem = _read_json(path)
    if not isinstance(summary, dict):
        return {"run_id": run_dir.name, "status": "unreadable", "problem": problem or f"{path} is not a JSON object"}
    return summary


def _started_at(summary: dict[str, Any], run_dir: Path) -> str | None:
    if summary.get("started_at"):
        return str(summary["started_at"])
    for name in (CONFIG_FILE, SUMMARY_FILE):  # config.json is written as the run starts
        if (run_dir / name).is_file():
            return _iso((run_dir / name).stat().st_mtime)
    return None


def _model_version(summary: dict[str, Any]) -> str | None:
    if summary.get("model_version"):
        return str(summary["model_version"])
    deployment = summary.get("deployment")
    if isinstance(deployment, dict) and deployment.get("model_version"):
        return str(deployment["model_version"])
    model = (summary.get("artifacts") or {}).get("model")
    if model:
        metadata, _ = _read_json(Path(model) / "metadata.json")
        if isinstance(metadata, dict) and metadata.get("model_version"):
            return str(metadata["model_version"])
    return None


def _steps(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps = summary.get("steps")
    return {k: v for k, v in steps.items() if isinstance(v, dict)} if isinstance(steps, dict) else {}


def _cost(summary: dict[str, Any]) -> dict[str, float]:
    """The run's cost: the steps' wall, CPU and GPU seconds summed, their peak memory's maximum."""
    total = {key: 0.0 for key in COST_SUMS}
    peak = 0.0
    for step in _steps(summary).values():
        cost = step.get("cost") if isinstance(step.get("cost"), dict) else {}
        for key in COST_SUMS:
            total[key] += _number(cost.get(key)) or 0.0
        peak = max(peak, _number(cost.get("peak_rss_mb")) or 0.0)
    return {**{k: round(v, 2) for k, v in total.items()}, "peak_rss_mb": round(peak, 1)}


def _gates(summary: dict[str, Any]) -> dict[str, bool | None]:
    gates = summary.get("gates") if isinstance(summary.get("gates"), dict) else {}
    return {name: (bool(gates[name].get("passed")) if isinstance(gates.get(name), dict) else None)
            for name in (*GATE_NAMES, *(g for g in gates if g not in GATE_NAMES))}


def run_row(run_dir: Path, summary: dict[str, Any] | None = None,
            production: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the runs page and of ``mlops runs list --json``."""
    summary = _summary(run_dir) if summary is None else summary
    gates = _gates(summary)
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    blocked = summary.get("blocked_by")
    return {
        "run_id": str(summary.get("run_id") or run_dir.name),
        "status": str(summary.get("status") or "unknown"),
        "started_at": _started_at(summary, run_dir),
        "seconds": _number(summary.get("seconds")),
        "model_version": _model_version(summary),
        "test_accuracy": _number(metrics.get("test_accuracy")),
        "gates": gates,
        "blocked_by": list(blocked) if isinstance(blocked, list) else [g for g, ok in gates.items() if ok is False],
        "failed_step": summary.get("failed_step"),
        "cost": _cost(summary),
        "runner": summary.get("runner"),
        "in_production": bool(production and production.get("run_id") == run_dir.name),
        "problem": summary.get("problem"),
        "run_dir": str(run_dir),
    }


def list_runs(runs_dir: str | Path, production: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every run, newest first (by start time, then name)."""
    rows = [run_row(d, production=production) for d in run_dirs(runs_dir)]
    return sorted(rows, key=lambda r: (r["started_at"] or "", r["run_id"]), reverse=True)


def find_run(runs_dir: str | Path, run_id: str | None = None) -> Path:
    """A run's directory by its id (None: the newest run); a clear error naming the runs there otherwise."""
    dirs = {d.name: d for d in run_dirs(runs_dir)}
    if not dirs:
        raise FileNotFoundError(f"no run under {runs_dir}/: make one with 'mlops run' "
                                "(or 'mlops run --config examples/quick.yaml' for a short one)")
    if run_id is None:
        return Path(list_runs(runs_dir)[0]["run_dir"])
    if run_id not in dirs:
        known = ", ".join(sorted(dirs)[-8:])
        raise FileNotFoundError(f"no run {run_id!r} under {runs_dir}/ (runs there: {known})")
    return dirs[run_id]


def _report(name: str, path: Any) -> dict[str, Any]:
    location = Path(str(path))
    return {"name": str(name), "path": str(path), "kind": REPORT_KINDS.get(location.suffix.lower(), "other"),
            "exists": location.is_file()}


def step_list(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each step (the pipeline's order, then any other the summary names): status, time, cost, why skipped."""
    steps = _steps(summary)
    names = [s for s in STEP_NAMES if s in steps] + [s for s in steps if s not in STEP_NAMES]
    names = sorted(names, key=lambda s: (_number(steps[s].get("index")) is None, _number(steps[s].get("index")) or 0,
                                         names.index(s)))
    out = []
    for name in names:
        info = steps[name]
        cost = info.get("cost") if isinstance(info.get("cost"), dict) else {}
        out.append({"name": name, "status": str(info.get("status") or "unknown"),
                    "seconds": _number(info.get("seconds")), "index": info.get("index"),
                    "cost": {k: v for k, v in cost.items() if _number(v) is not None},
                    "reason": info.get("reason"), "parents": list(STEP_PARENTS.get(name, ())),
                    "image": info.get("image")})
    return out


def gate_list(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate: passed (None: never ran), its reason when the summary has one, and its numbers."""
    gates = summary.get("gates") if isinstance(summary.get("gates"), dict) else {}
    out = []
    for name, passed in _gates(summary).items():
        gate = gates.get(name) if isinstance(gates.get(name), dict) else {}
        out.append({"name": name, "passed": passed, "reason": gate.get("reason"),
                    "overridden": bool(gate.get("overridden")),
                    "numbers": {k: v for k, v in gate.items() if _number(v) is not None}})
    return out


def run_detail(run_dir: Path, production: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run: its row plus steps, gates, metrics, reports, config, drift and the orchestration block."""
    summary = _summary(run_dir)
    config, problem = _read_json(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else (None, None)
    reports = summary.get("reports") if isinstance(summary.get("reports"), dict) else {}
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), dict) else {}
    return {
        **run_row(run_dir, summary, production),
        "steps": step_list(summary),
        "gates_detail": gate_list(summary),
        "metrics": {k: v for k, v in metrics.items() if _number(v) is not None or isinstance(v, str)},
        "reports": [_report(name, path) for name, path in reports.items()],
        "config": config if isinstance(config, dict) else {},
        "config_problem": problem,
        "drift": summary.get("drift") if isinstance(summary.get("drift"), dict) else None,
        "orchestration": summary.get("orchestration"),
        "rollout": summary.get("rollout"),
        "endpoint": summary.get("endpoint"),
        "overridden_gates": summary.get("overridden_gates") or [],
        "log": summary.get("log"),
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``a.b.c`` keys; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compare_values(detail: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What ``compare`` sets side by side for one run, by section: run, metrics, gates, config."""
    gates: dict[str, Any] = {}
    for gate in detail["gates_detail"]:
        gates[f"{gate['name']}.passed"] = gate["passed"]
        gates.update({f"{gate['name']}.{k}": v for k, v in gate["numbers"].items()})
    run = {"status": detail["status"], "started_at": detail["started_at"], "seconds": detail["seconds"],
           "model_version": detail["model_version"], "in_production": detail["in_production"],
           **{f"cost.{k}": v for k, v in detail["cost"].items()}}
    return {"run": run, "metrics": dict(detail["metrics"]), "gates": gates, "config": flatten(detail["config"])}


def compare_runs(details: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs side by side: one row per (section, key) any of them has, its value in each run, whether they differ."""
    if len(details) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(details)}")
    values = [compare_values(d) for d in details]
    rows = []
    for section in ("run", "metrics", "gates", "config"):
        keys = list(dict.fromkeys(k for v in values for k in v[section]))
        for key in keys:
            cells = [v[section].get(key) for v in values]
            rows.append({"section": section, "key": key, "values": cells,
                         "differs": any(json.dumps(c, sort_keys=True) != json.dumps(cells[0], sort_keys=True)
                                        for c in cells[1:])})
    return {"schema": SCHEMA, "runs": [d["run_id"] for d in details], "rows": rows}


# -- production, ledger, monitoring


def open_ledger(ledger_uri: str | None):
    """(the ledger, None) or (None, why it cannot be read); no ledger given is no problem."""
    if not ledger_uri:
        return None, None
    from components.core.ledger import Ledger

    if "://" not in str(ledger_uri) and not Path(ledger_uri).is_dir():
        return None, None  # nothing released yet
    ledger = Ledger(ledger_uri)
    try:
        with ledger.pinned():
            ledger.records()
    except Exception as exc:  # noqa: BLE001 - LedgerError, StorageError, OSError: show it, list the runs anyway
        return None, f"release ledger {ledger_uri} cannot be read: {exc}"
    return ledger, None


def _trained_run(ledger, record) -> str | None:
    """The run that trained a record's model: its ``trained`` record's (``mlops run``'s run id), else its own
    ``run_id`` (which for a step's record may be the KFP run's name)."""
    trained = ledger.run_of(record)
    if trained is not None and trained.data.get("run_id"):
        return str(trained.data["run_id"])
    return str(record.data["run_id"]) if record.data.get("run_id") else None


def production(serving_home: str | Path | None, ledger=None,
               runs: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The model in production: the local server's serving state when there is one, else the ledger's view."""
    state_file = Path(serving_home) / "state.json" if serving_home else None
    state, _ = _read_json(state_file) if state_file is not None and state_file.is_file() else (None, None)
    if isinstance(state, dict) and state.get("model_version"):
        candidates = []  # the ledger's lineage of the served release, the state's own word, the served model's run
        if ledger is not None and state.get("released_record"):
            try:
                candidates.append(_trained_run(ledger, ledger.get(state["released_record"])))
            except Exception:  # noqa: BLE001 - a record the state names but the ledger lacks
                pass
        candidates.append(state.get("run_id"))
        if state.get("model_dir"):
            candidates.append(next((r["run_id"] for r in runs or () if _model_dir(r) == str(state["model_dir"])),
                                   None))
        known = {r["run_id"] for r in runs or ()}
        named = [c for c in candidates if c]
        run_id = next((c for c in named if c in known), named[0] if named else None)
        running = bool(state.get("pid") or state.get("proxy_pid")) and not state.get("stopped_at")
        return {"model_version": str(state["model_version"]), "run_id": run_id, "source": str(state_file),
                "record": state.get("released_record"), "endpoint": state.get("endpoint"),
                "serving": "running" if running else "stopped", "stopped_at": state.get("stopped_at")}
    if ledger is not None:
        record = ledger.in_production()
        if record is not None:
            return {"model_version": record.data.get("model_version"), "run_id": _trained_run(ledger, record),
                    "source": ledger.base, "record": record.id, "endpoint": record.data.get("endpoint"),
                    "serving": "unknown", "stopped_at": None}
    return None


def _model_dir(row: dict[str, Any]) -> str | None:
    summary, _ = _read_json(Path(row["run_dir"]) / SUMMARY_FILE)
    return ((summary or {}).get("artifacts") or {}).get("model") if isinstance(summary, dict) else None


def _describe(record) -> str:
    d = record.data
    if record.type == "trained":
        return f"trained by run {d.get('run_id')}"
    if record.type == "gated":
        return "gates passed" if d.get("passed") else f"blocked by {', '.join(d.get('blocked_by') or []) or 'a gate'}"
    if record.type == "released":
        text = f"{d.get('strategy')} to {d.get('target')} at {d.get('endpoint')}"
        text += f": {d['reason']}" if d.get("reason") else ""
        override = d.get("override")
        return text + (f" (override: {override.get('reason')})" if isinstance(override, dict) else "")
    if record.type in ("promoted", "rolled_back"):
        return str(d.get("reason") or "")
    if record.type == "drift":
        share = _number(d.get("drift_share"))
        drifted = ", ".join(map(str, d.get("drifted_features") or [])) or "none"
        return f"{d.get('status')}: drift share {share if share is not None else '?'}, drifted {drifted}"
    if record.type == "retrain_started":
        return f"retrain run {d.get('run')} on {d.get('target')}"
    return ""


def release_events(ledger) -> list[dict[str, Any]]:
    """Every ledger record as a timeline event, newest first, with the run it comes from."""
    if ledger is None:
        return []
    events = []
    with ledger.pinned():
        for record in reversed(ledger.records()):
            d = record.data
            report = d.get("report") if record.type == "drift" else None
            events.append({"id": record.id, "type": record.type, "at": record.at, "actor": record.actor,
                           "model_version": d.get("model_version"), "run_id": _trained_run(ledger, record),
                           "parents": list(record.parents), "summary": _describe(record),
                           "drift_detected": d.get("drift_detected") if record.type == "drift" else None,
                           "report": report if report and Path(str(report)).is_file() else None})
    return events


def _window_row(verdict: dict[str, Any], verdict_path: str | None, report: str | None, source: str,
                run_id: str | None = None) -> dict[str, Any]:
    window = verdict.get("window") if isinstance(verdict.get("window"), dict) else {}
    drifted = verdict.get("drifted_features") if isinstance(verdict.get("drifted_features"), list) else []
    return {"model_version": verdict.get("model_version"), "since": window.get("since"), "until": window.get("until"),
            "status": verdict.get("status"), "drift_detected": verdict.get("drift_detected"),
            "alert": verdict.get("alert"), "drift_share": _number(verdict.get("drift_share")),
            "drift_share_threshold": _number(verdict.get("drift_share_threshold")),
            "drifted_features": [str(f) for f in drifted], "n_drifted": len(drifted),
            "current_rows": _number(verdict.get("current_rows")), "message": verdict.get("message"),
            "report": report if report and Path(report).is_file() else None, "verdict": verdict_path,
            "run_id": run_id, "ledger_record": verdict.get("ledger_record"), "source": source}


def monitoring_windows(runs_dir: str | Path, ledger=None, runs: list[dict[str, Any]] | None = None,
                       problems: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per judged window, oldest first, merged on (model version, since, until)."""
    problems = [] if problems is None else problems
    found: dict[tuple, dict[str, Any]] = {}

    def add(row: dict[str, Any]) -> None:
        key = (row["model_version"], row["since"], row["until"])
        if key in found:  # the same window from another source: fill what the first one lacked
            found[key].update({k: v for k, v in row.items() if found[key].get(k) in (None, [], "") and v})
        else:
            found[key] = row

    root = Path(runs_dir) / MONITOR_DIR
    for path in sorted(root.glob(f"*/*/{VERDICT_FILE}")) if root.is_dir() else []:
        verdict, problem = _read_json(path)
        if isinstance(verdict, dict):
            add(_window_row(verdict, str(path), str(path.parent / REPORT_FILE), "mlops monitor"))
        else:
            problems.append(problem or f"{path} is not a verdict")
    for row in runs if runs is not None else list_runs(runs_dir):
        summary, _ = _read_json(Path(row["run_dir"]) / SUMMARY_FILE)
        reports = (summary or {}).get("reports") if isinstance(summary, dict) else None
        if isinstance(reports, dict) and reports.get("drift_verdict"):
            verdict, problem = _read_json(Path(reports["drift_verdict"]))
            if isinstance(verdict, dict):
                add(_window_row(verdict, reports["drift_verdict"], reports.get("drift"), "run", row["run_id"]))
            else:
                problems.append(problem or f"{reports['drift_verdict']} is not a verdict")
    if ledger is not None:
        with ledger.pinned():
            for record in ledger.find("drift"):
                data = {**record.data, "ledger_record": record.id}
                verdict = data.get("verdict")
                add(_window_row(data, str(verdict) if verdict else None, data.get("report"), "ledger",
                                _trained_run(ledger, record)))
    return sorted(found.values(), key=lambda r: (r["until"] or r["since"] or "", r["since"] or ""))


def catalog(runs_dir: str | Path, serving_home: str | Path | None = None,
            ledger_uri: str | None = None) -> dict[str, Any]:
    """Everything the site shows, read once."""
    problems: list[str] = []
    ledger, problem = open_ledger(ledger_uri)
    if problem:
        problems.append(problem)
    rows = list_runs(runs_dir)
    prod = production(serving_home, ledger, rows)
    rows = list_runs(runs_dir, prod) if prod else rows
    details = {r["run_id"]: run_detail(Path(r["run_dir"]), prod) for r in rows}
    problems += [f"run {r['run_id']}: {r['problem']}" for r in rows if r["problem"] and r["status"] == "unreadable"]
    return {"schema": SCHEMA, "runs_dir": str(runs_dir), "runs": rows, "details": details, "production": prod,
            "releases": release_events(ledger), "ledger": ledger.base if ledger is not None else ledger_uri,
            "windows": monitoring_windows(runs_dir, ledger, rows, problems), "problems": problems}
