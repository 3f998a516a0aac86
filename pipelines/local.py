"""Run the whole pipeline on one machine with ``kfp.local`` and write ``summary.json``.

The embedded default: no cluster, CPU, local files. Every step runs as a
subprocess of this Python (``SubprocessRunner(use_venv=False)``), exactly the
component code a cluster runs. Afterwards the task outputs under
``runs/<run-id>/kfp`` are read back into one summary a person (and CI) can read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from components.core.localfiles import atomic_write_json
from pipelines.config import LOCAL, Config, to_dict

SUMMARY_FILE = "summary.json"
SETTINGS_PREFIX = "[settings] "  # the line each step prints with its settings (pipelines/kfp_steps.py)
STEP_NAMES = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "deploy", "monitor")
GATES = {"evaluate": "evaluation", "privacy": "privacy", "robustness": "robustness"}
# Artifact outputs that are reports a person opens: (step, output name) -> (report name, file suffix).
# KFP stores each artifact as a bare file; the run directory gets a copy with a suffix a browser understands.
REPORTS = {
    ("ingest", "data_card"): ("data_card", ".md"),
    ("evaluate", "report"): ("evaluation", ".html"),
    ("privacy", "report"): ("privacy", ".md"),
    ("robustness", "report"): ("robustness", ".md"),
    ("monitor", "drift_report"): ("drift", ".html"),
    ("monitor", "verdict"): ("drift_verdict", ".json"),
}


class ConsoleFilter(io.TextIOBase):
    """Stand-in for stdout during a run: everything goes to the run's log file, and the console
    gets the step transitions plus everything the steps themselves print (progress, verdicts,
    errors), without kfp.local's executor-input and output dumps."""

    _KFP_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - (INFO|WARNING|ERROR) - (.*)$")
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, log_file, console):
        self.log_file, self.console = log_file, console
        # "block": kfp's task-output listing, until its next line; "json-start"/"json": the executor
        # input, a json.dumps(indent=4) object whose closing brace is the only unindented "}" line.
        self.buffer_, self.skipping = "", False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log_file.write(text)
        self.buffer_ += text
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            shown = self.filter(self._ANSI.sub("", line))
            if shown is not None:
                self.console.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.console.flush()

    def filter(self, line: str) -> str | None:
        match = self._KFP_LINE.match(line)
        if match:
            level, message = match.groups()
            self.skipping = "block" if " outputs:" in message else False
            if "Executing task" in message:
                return f"[{time.strftime('%H:%M:%S')}] {message.replace('Executing task', 'step')}"
            if "finished with status" in message or level == "ERROR":
                return f"[{time.strftime('%H:%M:%S')}] {message}"
            return None
        if self.skipping == "block":
            return None
        body = line[4:] if line.startswith("    ") else line
        if self.skipping == "json-start":
            self.skipping = "json" if body == "{" else False
            if self.skipping:
                return None
        elif self.skipping == "json":
            if body == "}":
                self.skipping = False
            return None
        stripped = body.strip()
        if not stripped or set(stripped) <= {"-"}:
            return None
        if body.startswith(SETTINGS_PREFIX):  # what the step ran with: in the log, too long for the console
            return None
        if body.startswith("[KFP Executor"):
            if "Got executor_input:" in body:
                self.skipping = "json-start"
            return None
        return "    " + body


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_local(cfg: Config, runs_dir: str | Path = "runs", run_id: str | None = None, serve_after: bool = True,
              quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run every step through kfp.local; return (and write) the run summary.

    The full kfp.local log goes to ``runs/<run-id>/pipeline.log``; the console shows the
    steps and their own output (``verbose`` shows everything).
    """
    from kfp import local

    from pipelines.pipeline import build_pipeline, run_parameters

    run_id = run_id or new_run_id()
    run_dir = (Path(runs_dir) / run_id).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists; pick another --run-id")
    pipeline_root = run_dir / "kfp"
    pipeline_root.mkdir(parents=True)
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    serving_home = Path(cfg.serving.home).resolve()  # steps run in subprocesses
    params = run_parameters(dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, home=str(serving_home))),
                            LOCAL)

    print(f"kfp-mlops run {run_id}: artifacts under {run_dir}", flush=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=False)
    started = time.time()
    pipeline = build_pipeline(cfg.cluster, target=LOCAL)
    env_before = os.environ.get("DO_NOT_TRACK")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently telemetry off in every step
    log_path = run_dir / "pipeline.log"
    stdout = sys.stdout
    with open(log_path, "w") as log_file, warnings.catch_warnings():
        # kfp.local says, rightly, that pod resources and GPU requests do nothing on one machine.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*You may be attemping to run a task that uses.*")
        if not verbose:
            sys.stdout = ConsoleFilter(log_file, stdout)
        try:
            pipeline(**params)
        finally:
            sys.stdout = stdout
            if env_before is None:
                os.environ.pop("DO_NOT_TRACK", None)
    summary = collect_summary(run_id, run_dir, pipeline_root, time.time() - started)
    summary["log"] = str(log_path)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if not serve_after and summary["steps"]["deploy"]["status"] == "succeeded":
        from serving.server import LocalTorchServe

        LocalTorchServe(serving_home).stop()
        summary["serving"] = "stopped (--no-serve-after)"
        atomic_write_json(run_dir / SUMMARY_FILE, summary)
    if not quiet:
        print(format_summary(summary), flush=True)
    return summary


def _task_outputs(task_dir: Path) -> dict[str, Any] | None:
    """The executor output of a finished task, or None if it never finished."""
    path = task_dir / "executor_output.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _artifact(outputs: dict[str, Any], name: str) -> dict[str, Any] | None:
    items = outputs.get("artifacts", {}).get(name, {}).get("artifacts", [])
    return items[0] if items else None


def collect_summary(run_id: str, run_dir: Path, pipeline_root: Path, seconds: float) -> dict[str, Any]:
    """Read every task's executor output back into the run summary."""
    runs = sorted(p for p in pipeline_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    kfp_run = runs[-1] if runs else pipeline_root
    steps: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    failed = None
    for step in STEP_NAMES:
        task_dir = kfp_run / step
        out = _task_outputs(task_dir)
        if out is not None:
            outputs[step] = out
            metrics = (_artifact(out, "metrics") or {}).get("metadata", {})
            steps[step] = {
                "status": "succeeded",
                "seconds": round(metrics.get("cost_wall_seconds", 0.0), 2),
                "cost": {k.removeprefix("cost_"): v for k, v in metrics.items() if k.startswith("cost_")},
            }
        elif task_dir.exists():
            steps[step] = {"status": "failed", "seconds": None}
            failed = failed or step
        else:
            steps[step] = {"status": "skipped", "seconds": None}

    gates = {}
    for step, gate in GATES.items():
        if step not in outputs:
            continue
        metrics = (_artifact(outputs[step], "metrics") or {}).get("metadata", {})
        numbers = {k: v for k, v in metrics.items() if not k.startswith("cost_")}
        gates[gate] = {**numbers, "passed": bool(outputs[step].get("parameterValues", {}).get("Output"))}
    blocked_by = [g for g, v in gates.items() if not v["passed"]]
    # A gate released by an explicit override still failed its checks: say so at the top level.
    overridden = [g for g, v in gates.items() if v.get("overridden")]
    for step in ("deploy", "monitor"):
        if steps[step]["status"] == "skipped":
            steps[step]["reason"] = (f"gate(s) not passed: {', '.join(blocked_by)}" if blocked_by
                                     else f"an earlier step failed: {failed}" if failed else "not reached")

    evaluation = (_artifact(outputs.get("evaluate", {}), "metrics") or {}).get("metadata", {})
    summary: dict[str, Any] = {
        "run_id": run_id,
        "status": "failed" if failed else ("blocked" if blocked_by else "succeeded"),
        "seconds": round(seconds, 1),
        "steps": steps,
        "metrics": {k: v for k, v in evaluation.items() if not k.startswith("cost_")},
        "gates": gates,
        "endpoint": None,
        "management_endpoint": None,
        "token_file": None,
        "reports": {},
        "artifacts": {},
        "run_dir": str(run_dir),
    }
    if failed:
        summary["failed_step"] = failed
    if overridden:
        summary["overridden_gates"] = overridden
    reports_dir = run_dir / "reports"
    for (step, name), (report, suffix) in REPORTS.items():
        art = _artifact(outputs.get(step, {}), name)
        if art and Path(art["uri"]).is_file():
            reports_dir.mkdir(exist_ok=True)
            copy = reports_dir / f"{report}{suffix}"
            shutil.copyfile(art["uri"], copy)
            summary["reports"][report] = str(copy)
    for step, name in (("ingest", "dataset"), ("pretrain", "encoder"), ("finetune", "model"), ("deploy", "deployment")):
        art = _artifact(outputs.get(step, {}), name)
        if art:
            summary["artifacts"][name] = art["uri"]
    if "deployment" in summary["artifacts"]:
        record = json.loads(Path(summary["artifacts"]["deployment"]).read_text())
        summary["endpoint"] = record.get("endpoint")
        summary["management_endpoint"] = record.get("management_endpoint")
        summary["token_file"] = record.get("token_file")
        summary["deployment"] = record
    if "drift_verdict" in summary["reports"]:
        verdict = json.loads(Path(summary["reports"]["drift_verdict"]).read_text())
        summary["drift"] = {k: verdict.get(k) for k in ("status", "drift_detected", "drift_share", "drifted_features")}
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """A short human summary of a run."""
    lines = ["", f"Run {s['run_id']}: {s['status'].upper()} in {s['seconds']} s"]
    for step, info in s["steps"].items():
        secs = f"{info['seconds']:.1f} s" if info.get("seconds") is not None else ""
        extra = f"  ({info['reason']})" if info.get("reason") else ""
        lines.append(f"  {step:<11} {info['status']:<10} {secs:>8}{extra}")
    m = s.get("metrics", {})
    if "test_accuracy" in m:
        lines.append(f"Test accuracy {m['test_accuracy']:.4f}" + (f", macro-F1 {m['macro_f1']:.4f}" if "macro_f1" in m else ""))
    for gate, g in s.get("gates", {}).items():
        lines.append(f"Gate {gate:<11} {'passed' if g['passed'] else 'BLOCKED'}")
    if s.get("drift"):
        d = s["drift"]
        lines.append(f"Drift: {d.get('status')} (drift share {d.get('drift_share')})")
    if s.get("endpoint"):
        lines.append(f"Serving: {s['endpoint']}  (token: {s['token_file']})")
        from serving.server import curl_example

        lines.append(f"  {curl_example(s)}")
    for name, path in s.get("reports", {}).items():
        lines.append(f"Report {name:<14} {path}")
    if s.get("log"):
        lines.append(f"Full log: {s['log']}")
    lines.append(f"Summary: {Path(s['run_dir']) / SUMMARY_FILE}")
    return "\n".join(lines)


def _runs_newest_first(runs_dir: str | Path) -> list[Path]:
    return [p.parent for p in sorted(Path(runs_dir).glob(f"*/{SUMMARY_FILE}"), key=lambda p: p.stat().st_mtime,
                                     reverse=True)]


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The newest run directory that has a summary."""
    runs = _runs_newest_first(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished run under {runs_dir}/: run 'mlops run' first")
    return runs[0]


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {SUMMARY_FILE}: not a finished run of 'mlops run'")
    return json.loads(path.read_text())


def release_problem(summary: dict[str, Any]) -> str | None:
    """Why a run's model may not be served (None: it was released: every gate passed or was overridden)."""
    if "model" not in summary.get("artifacts", {}):
        return f"run {summary['run_id']} produced no model (status {summary['status']})"
    gates = summary.get("gates", {})
    missing = [g for g in GATES.values() if g not in gates]
    if missing:
        return f"run {summary['run_id']} never finished its {', '.join(missing)} gate(s) (status {summary['status']})"
    blocked = [g for g, v in gates.items() if not v.get("passed")]
    if blocked:
        return f"run {summary['run_id']} was blocked by its {', '.join(blocked)} gate(s)"
    return None


def latest_released_run(runs_dir: str | Path = "runs") -> Path:
    """The newest run whose model passed its gates (or had them overridden)."""
    runs = _runs_newest_first(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished run under {runs_dir}/: run 'mlops run' first")
    for run in runs:
        if release_problem(read_summary(run)) is None:
            return run
    raise FileNotFoundError(f"no run under {runs_dir}/ released a model ({release_problem(read_summary(runs[0]))}); "
                            "fix what blocked it and run again, or serve a blocked run's model with --run-id ID "
                            "--gates-override --gates-override-reason '...'")

