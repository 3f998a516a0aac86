"""Run the whole pipeline on one machine with ``kfp.local`` and write ``summary.json``.

The embedded default: no cluster, CPU, local files. Two runners (``mlops run --runner``):

* ``subprocess`` (the default): every step is a subprocess of this Python
  (``SubprocessRunner(use_venv=False)``), running this checkout's code, started as a fork of a pre-imported
  parent rather than a fresh Python (``pipelines.warm_start``; ``warm_start=False``: fresh Pythons).
* ``docker``: every step is a container of the pipeline image (``cluster.image``, ``make image``), through
  ``kfp.local.DockerRunner``, as on a cluster; the deploy step serves from containers of the serving image
  (``components.deploy.containers``). See ``DockerSteps`` for how the containers run.

Afterwards the task outputs under ``runs/<run-id>/kfp`` are read back into one summary a person (and CI) can
read, with the runner, each step's image and how long kfp.local took for each step around the step's own time.
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
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from components.core.cost import typed_metrics
from components.core.localfiles import atomic_write_json
from pipelines.config import LOCAL, Config, to_dict
from pipelines.docker_steps import DockerSteps
from pipelines.warm_parents import WarmParents, warm_started

SUMMARY_FILE = "summary.json"
SUBPROCESS, DOCKER = "subprocess", "docker"
RUNNERS = (SUBPROCESS, DOCKER)
# The serving Deployment the docker runner serves from: rendered with kubectl kustomize when deploy runs.
SERVING_MANIFESTS = Path(__file__).resolve().parent.parent / "manifests" / "overlays" / "dev"
SETTINGS_PREFIX = "[settings] "  # the line each step prints with its settings (pipelines/kfp_steps.py)
STEP_NAMES = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "record", "deploy", "monitor")
GATES = {"evaluate": "evaluation", "privacy": "privacy", "robustness": "robustness"}
# Artifact outputs that are reports a person opens: (step, output name) -> (report name, file suffix).
# KFP stores each artifact as a bare file; the run directory gets a copy with a suffix a browser understands.
REPORTS = {
    ("ingest", "data_card"): ("data_card", ".md"),
    ("evaluate", "report"): ("evaluation", ".html"),
    ("privacy", "report"): ("privacy", ".html"),
    ("robustness", "report"): ("robustness", ".html"),
    ("monitor", "drift_report"): ("drift", ".html"),
    ("monitor", "verdict"): ("drift_verdict", ".json"),
}


class ConsoleFilter(io.TextIOBase):
    """Stand-in for stdout during a run: everything goes to the run's log file, and the console
    gets the step transitions plus everything the steps themselves print (progress, verdicts,
    errors), without kfp.local's executor-input and output dumps (``verbose``: everything).
    ``task_seconds`` collects how long kfp.local took for each task, start to finish."""

    _KFP_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - (INFO|WARNING|ERROR) - (.*)$")
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _TASK_START = re.compile(r"Executing task '([^']+)'")
    _TASK_END = re.compile(r"Task '([^']+)' finished with status")

    def __init__(self, log_file, console, verbose: bool = False):
        self.log_file, self.console, self.verbose = log_file, console, verbose
        # "block": kfp's task-output listing, until its next line; "json-start"/"json": the executor
        # input, a json.dumps(indent=4) object whose closing brace is the only unindented "}" line.
        self.buffer_, self.skipping = "", False
        self.task_seconds: dict[str, float] = {}
        self._task_started: dict[str, float] = {}
        self.first_task_started: float | None = None  # time.time() of kfp.local's first task start, last task end
        self.last_task_ended: float | None = None
        self._lock = threading.Lock()  # the serving broker prints from its own thread

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self.log_file.write(text)
            self.buffer_ += text
            *lines, self.buffer_ = self.buffer_.split("\n")
            for line in lines:
                shown = self.filter(self._ANSI.sub("", line))
                if self.verbose:
                    self.console.write(line + "\n")
                elif shown is not None:
                    self.console.write(shown + "\n")
        return len(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.console.flush()

    def _time_task(self, message: str) -> None:
        started, ended = self._TASK_START.search(message), self._TASK_END.search(message)
        if started:
            self._task_started[started.group(1)] = time.monotonic()
            self.first_task_started = self.first_task_started or time.time()
        elif ended and ended.group(1) in self._task_started:
            self.task_seconds[ended.group(1)] = time.monotonic() - self._task_started.pop(ended.group(1))
            self.last_task_ended = time.time()

    def filter(self, line: str) -> str | None:
        match = self._KFP_LINE.match(line)
        if match:
            level, message = match.groups()
            self._time_task(message)
            self.skipping = "block" if " outputs:" in message else False
            started, ended = self._TASK_START.search(message), self._TASK_END.search(message)
            if started:
                return f"[{time.strftime('%H:%M:%S')}] {step_position(started.group(1))} started"
            if ended:
                status = message.rsplit("finished with status", 1)[1].strip(" .")
                status = {"SUCCESS": "succeeded", "FAILURE": "FAILED"}.get(status, status.lower())
                took = self.task_seconds.get(ended.group(1))
                took = f" in {took:.1f} s" if took is not None else ""
                return f"[{time.strftime('%H:%M:%S')}] {step_position(ended.group(1))} {status}{took}"
            if level == "ERROR" or "finished with status" in message:  # the pipeline's own end
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
        if body.startswith("Found image '"):  # DockerRunner's, once per step; the summary names the image
            return None
        if body.startswith("[KFP Executor"):
            if "Got executor_input:" in body:
                self.skipping = "json-start"
            return None
        return "    " + body


def step_position(task: str) -> str:
    """``3/9 finetune``: a task's place in the pipeline's order, for the console."""
    name = task.split("-", 1)[0] if task not in STEP_NAMES else task  # kfp names a repeated task "name-2"
    return f"{STEP_NAMES.index(name) + 1}/{len(STEP_NAMES)} {task}" if name in STEP_NAMES else task


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_environment(run_id: str) -> dict[str, str]:
    """What a run sets in its environment for its steps (and its warm parents, which must match them)."""
    from components.core.ledger import RUN_ID_ENV

    return {"DO_NOT_TRACK": os.environ.get("DO_NOT_TRACK", "1"),  # Evidently telemetry off in every step
            RUN_ID_ENV: run_id}  # the record step names the run in the ledger by it


def process_started() -> float:
    """When this process started (``time.time()``), where a person's wait for ``mlops run`` starts; now if unknown.
    Read from /proc: psutil's ``create_time`` adds the boot time in whole seconds, up to 1 s off."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
    return time.time() - age if 0 <= age < 3600 else time.time()


def run_local(cfg: Config, runs_dir: str | Path = "runs", run_id: str | None = None, serve_after: bool = True,
              quiet: bool = False, verbose: bool = False, runner: str = SUBPROCESS,
              manifests: str | Path = SERVING_MANIFESTS, warm_start: bool = True,
              warm_parents: WarmParents | None = None, started: float | None = None) -> dict[str, Any]:
    """Run every step through kfp.local; return (and write) the run summary.

    The full kfp.local log goes to ``runs/<run-id>/pipeline.log``; the console shows the
    steps and their own output (``verbose`` shows everything). ``runner``: ``subprocess``
    (steps are subprocesses of this Python) or ``docker`` (steps are containers of
    ``cfg.cluster.image``; deploy serves from the serving Deployment of ``manifests``, a
    kustomize directory, as containers of ``cfg.cluster.serving_image``). ``warm_start``: the subprocess
    runner's tasks start as forks of a pre-imported parent (``pipelines.warm_start``), not as fresh Pythons;
    ``warm_parents``: those parents, started already (with ``run_environment(run_id)``). ``started``: when the wait
    for this run began (``time.time()``; default: now), where the summary's ``seconds`` start.
    """
    started = time.time() if started is None else started
    from kfp import local

    from pipelines.pipeline import build_pipeline, run_parameters

    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    run_id = run_id or new_run_id()
    run_dir = (Path(runs_dir) / run_id).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already exists; pick another --run-id")
    serving_home = Path(cfg.serving.home).resolve()  # steps run in subprocesses or containers
    ledger_uri = cfg.serving.ledger_uri  # a relative directory, too, means the same place to every step
    ledger_uri = str(Path(ledger_uri).resolve()) if ledger_uri and "://" not in ledger_uri else ledger_uri
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(cfg.serving, home=str(serving_home),
                                                               ledger_uri=ledger_uri))
    docker = DockerSteps(cfg, run_id, manifests).check() if runner == DOCKER else None  # before anything is written
    pipeline_root = run_dir / "kfp"
    pipeline_root.mkdir(parents=True)
    atomic_write_json(run_dir / "config.json", to_dict(cfg))
    params = run_parameters(cfg, LOCAL)

    print(f"kfp-mlops run {run_id} ({runner} runner): artifacts under {run_dir}", flush=True)
    run_env = run_environment(run_id)
    env_before = {name: os.environ.get(name) for name in run_env}
    os.environ.update(run_env)
    log_path = run_dir / "pipeline.log"
    stdout = sys.stdout
    with open(log_path, "w") as log_file, warnings.catch_warnings():
        # kfp.local says, rightly, that pod resources and GPU requests do nothing on one machine.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*You may be attemping to run a task that uses.*")
        console = sys.stdout = ConsoleFilter(log_file, stdout, verbose=verbose)
        warm = None
        try:
            if docker is not None:
                with docker.started(pipeline_root) as (kfp_runner, image):
                    local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=False)
                    build_pipeline(dataclasses.replace(cfg.cluster, image=image), target=LOCAL)(**params)
            else:
                local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                           raise_on_error=False)
                with warm_started(run_dir, enabled=warm_start, parents=warm_parents) as warm:
                    build_pipeline(cfg.cluster, target=LOCAL)(**params)
        finally:
            sys.stdout = stdout
            for name, value in env_before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    ended = time.time()  # the warm parents' stop counts as orchestration
    summary = collect_summary(run_id, run_dir, pipeline_root, ended - started, runner=runner,
                              image=docker.image if docker else None, task_seconds=console.task_seconds)
    if console.first_task_started and console.last_task_ended:
        summary["orchestration"].update(
            before_first_task=round(console.first_task_started - started, 2),
            after_last_task=round(ended - console.last_task_ended, 2),
            around_steps=round(sum(console.task_seconds.values()) - summary["orchestration"]["steps_seconds"], 2))
    if warm is not None:
        summary["warm_start"] = warm.as_summary()
    summary["log"] = str(log_path)
    atomic_write_json(run_dir / SUMMARY_FILE, summary, sort_keys=False)
    if not serve_after and summary["steps"]["deploy"]["status"] == "succeeded":
        from components.deploy.containers import served_from

        served_from(serving_home).stop()
        summary["serving"] = "stopped (--no-serve-after)"
        atomic_write_json(run_dir / SUMMARY_FILE, summary, sort_keys=False)
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


def collect_summary(run_id: str, run_dir: Path, pipeline_root: Path, seconds: float, runner: str = SUBPROCESS,
                    image: dict[str, Any] | None = None, task_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Read every task's executor output back into the run summary.

    Each step that ran also gets its ``runner``, under ``docker`` the image it ran in (``image``: name,
    ``image_id``, ``image_repo_digests``), and, from ``task_seconds`` (kfp.local's start to finish of each
    task), ``task_seconds`` and ``overhead_seconds`` (that minus the step's own ``seconds``). ``orchestration``:
    the run's seconds outside the steps' own (``orchestration_block``)."""
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
            metrics = typed_metrics((_artifact(out, "metrics") or {}).get("metadata", {}))
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
        if steps[step]["status"] != "skipped":
            steps[step].update({"runner": runner, **(image or {})})
            if task_seconds and step in task_seconds:
                steps[step]["task_seconds"] = round(task_seconds[step], 2)
                if steps[step]["seconds"] is not None:
                    steps[step]["overhead_seconds"] = round(task_seconds[step] - steps[step]["seconds"], 2)

    gates = {}
    for step, gate in GATES.items():
        if step not in outputs:
            continue
        metrics = typed_metrics((_artifact(outputs[step], "metrics") or {}).get("metadata", {}))
        numbers = {k: v for k, v in metrics.items() if not k.startswith(("cost_", "blocked_by_"))}
        gates[gate] = {**numbers, "passed": bool(outputs[step].get("parameterValues", {}).get("Output")),
                       "reason": str(metrics.get("reason", "")),
                       "blocked_by": sorted(k.removeprefix("blocked_by_") for k, v in metrics.items()
                                            if k.startswith("blocked_by_") and v)}
    blocked_by = [g for g, v in gates.items() if not v["passed"]]
    # A gate released by an explicit override still failed its checks: say so at the top level.
    overridden = [g for g, v in gates.items() if v.get("overridden")]
    for step in ("deploy", "monitor"):
        if steps[step]["status"] == "skipped":
            steps[step]["reason"] = (f"gate(s) not passed: {', '.join(blocked_by)}" if blocked_by
                                     else f"an earlier step failed: {failed}" if failed else "not reached")

    evaluation = typed_metrics((_artifact(outputs.get("evaluate", {}), "metrics") or {}).get("metadata", {}))
    summary: dict[str, Any] = {
        "run_id": run_id,
        "runner": runner,
        "status": "failed" if failed else ("blocked" if blocked_by else "succeeded"),
        "seconds": round(seconds, 1),
        "orchestration": orchestration_block(seconds, steps),
        "steps": steps,
        "metrics": {k: v for k, v in evaluation.items() if not k.startswith("cost_")},
        "gates": gates,
        "blocked_by": blocked_by,
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
        if record.get("rollout"):  # a shadow or canary rollout decided (components/deploy/rollout)
            summary["rollout"] = record["rollout"]
    if "drift_verdict" in summary["reports"]:
        verdict = json.loads(Path(summary["reports"]["drift_verdict"]).read_text())
        summary["drift"] = {k: verdict.get(k) for k in ("status", "drift_detected", "drift_share", "drifted_features")}
    return summary


def orchestration_block(seconds: float, steps: dict[str, dict[str, Any]]) -> dict[str, float]:
    """How much of the run's ``seconds`` was spent outside the steps' own ``seconds`` (the command's own start, the
    preflight checks and compile, starting tasks, imports before a step's first measured line, what a step does
    after its clock stops, kfp.local's work between tasks), and its share of the run. ``run_local`` adds where:
    ``before_first_task``, ``around_steps`` (inside the tasks, outside the steps' clocks) and ``after_last_task``;
    the rest is kfp.local's between tasks."""
    inside = sum(info["seconds"] for info in steps.values() if info.get("seconds") is not None)
    outside = seconds - inside
    return {"steps_seconds": round(inside, 2), "seconds": round(outside, 2),
            "share": round(outside / seconds, 3) if seconds > 0 else 0.0}


def format_summary(s: dict[str, Any]) -> str:
    """A short human summary of a run."""
    lines = ["", f"Run {s['run_id']}: {s['status'].upper()} in {s['seconds']} s"]
    if s.get("orchestration"):
        o = s["orchestration"]
        lines.append(f"Orchestration: {o['seconds']:.1f} s outside the steps ({o['share']:.0%} of the run; the "
                     f"steps {o['steps_seconds']:.1f} s)")
    for step, info in s["steps"].items():
        secs = f"{info['seconds']:.1f} s" if info.get("seconds") is not None else ""
        extra = f"  ({info['reason']})" if info.get("reason") else ""
        lines.append(f"  {step:<11} {info['status']:<10} {secs:>8}{extra}")
    m = s.get("metrics", {})
    if "test_accuracy" in m:
        lines.append(f"Test accuracy {m['test_accuracy']:.4f}" + (f", macro-F1 {m['macro_f1']:.4f}" if "macro_f1" in m else ""))
    for gate, g in s.get("gates", {}).items():
        lines.append(gate_line(gate, g))
    if s.get("rollout"):
        r = s["rollout"]
        lines.append(f"Rollout {r['strategy']}: {r['decision'].upper()} {r['challenger_version']} (champion "
                     f"{r['champion_version']}) after {r['seconds_to_decision']} s: {r['reason']}")
    if s.get("drift"):
        d = s["drift"]
        lines.append(f"Drift: {d.get('status')} (drift share {d.get('drift_share')})")
    if s.get("endpoint"):
        lines.append(f"Serving: {s['endpoint']}  (token: {s['token_file']})")
        from serving.server import curl_example

        lines.append(f"  {curl_example(s)}")
    if (s.get("deployment") or {}).get("ledger"):
        lines.append(f"Ledger: {s['deployment']['ledger']}  (mlops releases show {s['deployment']['model_version'][:12]})")
    for name, path in s.get("reports", {}).items():
        lines.append(f"Report {name:<14} {path}")
    if s.get("log"):
        lines.append(f"Full log: {s['log']}")
    lines.append(f"Summary: {Path(s['run_dir']) / SUMMARY_FILE}")
    return "\n".join(lines)


def gate_line(gate: str, g: dict[str, Any]) -> str:
    """One gate of a summary in words: passed, or BLOCKED with the failing numbers and what to try."""
    reason = f": {g['reason']}" if g.get("reason") else ""
    if g.get("overridden"):
        return f"Gate {gate:<11} OVERRIDDEN{reason} (released anyway: {g.get('override_reason', '')})"
    if g.get("passed"):
        return f"Gate {gate:<11} passed"
    remedy = f" ({g['remedy']})" if g.get("remedy") else ""
    return f"Gate {gate:<11} BLOCKED{reason}{remedy}"


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

