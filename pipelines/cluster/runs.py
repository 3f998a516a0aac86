"""Pipeline runs on a Kubeflow Pipelines cluster: compile, upload, submit, wait.

    result = submit(cfg, conn, wait=True)        # compile, upload (or a new version), run, stream states
    start_cluster_run(cfg, host, reason)         # what retrain-on-drift calls; the reason goes on the run

What a run is sent:

* the pipeline, compiled from ``ClusterConfig`` (image, Kubernetes settings); a
  pipeline of that name gets a new *version*, named by the compiled YAML's sha256,
  so submitting the same compile twice reuses its version;
* the run parameters: ``run_parameters(cfg)``, the run form's boxes and, in ``other_settings``,
  the fields that differ from the compiled values (never credentials: those come from
  the Secret named in ``ClusterConfig``, see ``pipelines/pod_settings.py``);
* the ServiceAccount on the run (``ClusterConfig.service_account``), not per task.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.cluster.connection import (
    ClusterError,
    Connection,
    api_call,
    connect,
    equals_filter,
    request_namespace,
    resolve_connection,
)
from pipelines.config import ClusterConfig, Config

# Exit codes of `mlops submit --wait`: 0 succeeded, 1 failed/canceled/skipped, 124 still going at --timeout.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "CANCELED": 1, "SKIPPED": 1}
TIMEOUT_EXIT_CODE = 124
BLOCKED_EXIT_CODE = 3  # the run succeeded but a gate kept the model from deploy (as `mlops run` locally)
GATE_STEPS = ("evaluate", "privacy", "robustness")
RELEASE_STEP = "deploy"
TERMINAL_STATES = tuple(EXIT_CODES)


@dataclass
class SubmitResult:
    run_id: str
    pipeline_id: str
    version_id: str
    version_name: str
    new_pipeline: bool
    new_version: bool
    experiment_id: str
    state: str | None = None  # the last state seen (when waited)
    exit_code: int | None = None



def compile_to(path: Path, cluster: ClusterConfig) -> str:
    """Compile the pipeline to ``path``; return the sha256 of the YAML."""
    from pipelines.pipeline import compile_pipeline

    compile_pipeline(str(path), cluster)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_pipeline_version(client, conn: Connection, package: Path, digest: str, pipeline_name: str,
                            description: str) -> tuple[str, str, str, bool, bool]:
    """Upload the pipeline, or a new version of it; reuse a version with the same content.

    Returns (pipeline_id, version_id, version_name, new_pipeline, new_version).
    """
    where = conn.describe()
    listed = api_call(where, "list pipelines", client.list_pipelines,
                      filter=equals_filter("display_name", pipeline_name), namespace=request_namespace(conn),
                      page_size=10)
    pipelines = listed.pipelines or []
    if len(pipelines) > 1:
        raise ClusterError(f"{len(pipelines)} pipelines are named {pipeline_name!r}; pass --pipeline-name to pick another")
    if not pipelines:
        pipeline = api_call(where, "upload pipeline", client.upload_pipeline, str(package), pipeline_name=pipeline_name,
                            description=description, namespace=request_namespace(conn))
        versions = api_call(where, "list pipeline versions", client.list_pipeline_versions, pipeline.pipeline_id,
                            page_size=1, sort_by="created_at desc").pipeline_versions or []
        if not versions:
            raise ClusterError(f"uploaded pipeline {pipeline.pipeline_id} but the server lists no version of it")
        return pipeline.pipeline_id, versions[0].pipeline_version_id, versions[0].display_name, True, False

    pipeline_id = pipelines[0].pipeline_id
    version_name = f"{pipeline_name}-{digest[:12]}"  # content-addressed: same compile, same version
    existing = api_call(where, "list pipeline versions", client.list_pipeline_versions, pipeline_id,
                        filter=equals_filter("display_name", version_name), page_size=1).pipeline_versions or []
    if existing:
        return pipeline_id, existing[0].pipeline_version_id, version_name, False, False
    version = api_call(where, "upload pipeline version", client.upload_pipeline_version, str(package), version_name,
                       pipeline_id=pipeline_id, description=description)
    return pipeline_id, version.pipeline_version_id, version_name, False, True


def ensure_experiment(client, conn: Connection, name: str) -> str:
    experiment = api_call(conn.describe(), "create experiment", client.create_experiment, name,
                          description="Runs of the kfp-mlops pipeline (mlops submit / mlops schedule).",
                          namespace=request_namespace(conn))
    return experiment.experiment_id


def compile_and_upload(cfg: Config, client, conn: Connection, pipeline_name: str, out: Callable[[str], None]):
    """Compile for ``cfg.cluster`` and upload (or reuse) its version; return ``ensure_pipeline_version``'s tuple."""
    with tempfile.TemporaryDirectory(prefix="mlops-submit-") as tmp:
        package = Path(tmp) / "pipeline.yaml"
        digest = compile_to(package, cfg.cluster)
        description = f"kfp-mlops pipeline, image {cfg.cluster.image}, sha256 {digest[:12]} (uploaded by mlops)"
        pipeline_id, version_id, version_name, new_pipeline, new_version = ensure_pipeline_version(
            client, conn, package, digest, pipeline_name, description)
    what = ("uploaded new pipeline" if new_pipeline else "uploaded new version" if new_version
            else "reusing the identical version")
    out(f"Pipeline {pipeline_name!r}: {what} {version_name} (pipeline {pipeline_id}, version {version_id})")
    return pipeline_id, version_id, version_name, new_pipeline, new_version


def submit(cfg: Config, conn: Connection, *, experiment: str | None = None, pipeline_name: str | None = None,
           run_name: str | None = None, description: str = "", wait: bool = False, timeout_s: float | None = None,
           poll_s: float = 5.0, out: Callable[[str], None] = print, client=None) -> SubmitResult:
    """Compile, upload (or add a version), create a run; optionally wait for its end."""
    cluster = cfg.cluster
    experiment = experiment or cluster.experiment
    pipeline_name = pipeline_name or cluster.pipeline_name
    client = client or connect(conn)
    pipeline_id, version_id, version_name, new_pipeline, new_version = compile_and_upload(
        cfg, client, conn, pipeline_name, out)
    experiment_id = ensure_experiment(client, conn, experiment)

    import kfp_server_api

    from pipelines.pipeline import run_parameters

    run_name = run_name or f"{pipeline_name} {_utc_now():%Y-%m-%d %H:%M:%S} UTC"
    body = kfp_server_api.V2beta1Run(
        experiment_id=experiment_id,
        display_name=run_name,
        description=description or None,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=run_parameters(cfg)),
        service_account=cluster.service_account or None,
    )
    # The generated API rather than client.run_pipeline: only it can set the description.
    run = api_call(conn.describe(), "create run", client.runs.run_service_create_run, run=body)
    out(f"Run {run.run_id} ({run_name!r}) created in experiment {experiment!r} "
        f"as ServiceAccount {cluster.service_account or '(namespace default)'}")
    result = SubmitResult(run.run_id, pipeline_id, version_id, version_name, new_pipeline, new_version, experiment_id)
    if wait:
        result.state = wait_for_run(client, conn, run.run_id, timeout_s=timeout_s, poll_s=poll_s, out=out)
        result.exit_code = EXIT_CODES.get(result.state, TIMEOUT_EXIT_CODE) if result.state else TIMEOUT_EXIT_CODE
        if result.state == "SUCCEEDED":
            finished = api_call(conn.describe(), "get run", client.get_run, run.run_id)
            result.exit_code, lines = release_outcome(finished)
            if result.exit_code == BLOCKED_EXIT_CODE:
                lines += blocked_gate_lines(cfg.serving, run.run_id)
            for line in lines:
                out(line)
    return result


def blocked_gate_lines(serving, kfp_run_id: str) -> list[str]:
    """The gates that blocked a cluster run, with their failing numbers and what to try, from the run's ``gated``
    record in the release ledger (the record step appends it before the gates' branch), when the ledger is
    readable from here; otherwise one line saying what would make it so."""
    from components.core.gates import console_line
    from components.core.ledger import Ledger, LedgerError, location

    try:
        where = location(serving)
    except LedgerError:
        return ["  (set serving.ledger_uri or KFP_MLOPS_LEDGER to the cluster's release ledger to see here which "
                "limits failed)"]
    try:
        ledger = Ledger(where)
        trained = [r.id for r in ledger.find("trained") if r.data.get("kfp_run_id") == kfp_run_id]
        gated = next((r for r in reversed(ledger.find("gated")) if set(r.parents) & set(trained)), None)
    except Exception as exc:  # storage, credentials, a damaged record: the exit code stands, the detail is missing
        return [f"  (the release ledger at {where} could not be read from here: {type(exc).__name__}: {exc})"]
    if gated is None:
        return [f"  (the release ledger at {where} has no gated record of run {kfp_run_id}: did its record step "
                "run?)"]
    return [f"  {console_line(name, gate)}" for name, gate in gated.data.get("gates", {}).items()
            if not gate.get("passed")]


def release_outcome(run) -> tuple[int, list[str]]:
    """Exit code and explanation of a SUCCEEDED run: 0 when deploy ran, 3 when a gate kept the model back.

    KFP marks a run SUCCEEDED when a gate's condition skips deploy, so the
    run state alone cannot tell a release from a blocked one; the task list can.
    """
    tasks = getattr(getattr(run, "run_details", None), "task_details", None) or []
    if not tasks:
        return 0, ["  (the API returned no task details: cannot tell whether deploy ran; check the run in the KFP UI)"]
    states = {}
    for task in tasks:
        states.setdefault(task.display_name, task.state)
    if states.get(RELEASE_STEP) == "SUCCEEDED":
        return 0, [f"  released: {RELEASE_STEP} succeeded"]
    gates = ", ".join(f"{name} {states.get(name, 'not run')}" for name in GATE_STEPS)
    return BLOCKED_EXIT_CODE, [
        f"  NOT released: {RELEASE_STEP} {(states.get(RELEASE_STEP) or 'did not run').lower()} because a gate "
        f"returned false ({gates}); the gates' metrics and reports in the KFP UI say which limit failed and why"]


def wait_for_run(client, conn: Connection, run_id: str, *, timeout_s: float | None = None, poll_s: float = 5.0,
                 out: Callable[[str], None] = print, transient_errors: int = 5) -> str | None:
    """Poll the run and print a line per state change; return the terminal state, None on timeout.

    A few transient failures (5xx, connection reset) in a row are tolerated: a long
    wait outlives an API server restart. Authentication errors are not.
    """
    started = time.monotonic()
    last_state, failures = None, 0
    while True:
        try:
            run = api_call(conn.describe(), "get run", client.get_run, run_id)
            failures = 0
        except ClusterError as exc:
            if exc.status in (400, 401, 403, 404) or failures >= transient_errors:
                raise
            failures += 1
            out(f"  (transient error, retrying: {exc})")
            run = None
        if run is not None:
            state = run.state or "RUNTIME_STATE_UNSPECIFIED"
            if state != last_state:
                out(f"{time.monotonic() - started:7.1f}s  run {run_id}: {state}")
                last_state = state
            if state in TERMINAL_STATES:
                if state != "SUCCEEDED":
                    for line in _failure_lines(run):
                        out(line)
                return state
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            out(f"run {run_id} is still {last_state} after {timeout_s:g}s; it keeps running on the cluster "
                "(watch it in the KFP UI)")
            return None
        time.sleep(poll_s)


def _failure_lines(run) -> list[str]:
    lines = []
    if run.error and (run.error.message or run.error.code):
        lines.append(f"  error: {run.error.message or ''} (code {run.error.code})")
    details = getattr(run, "run_details", None)
    for task in (getattr(details, "task_details", None) or []):
        if task.state in ("FAILED", "CANCELED"):
            message = task.error.message if task.error else ""
            lines.append(f"  task {task.display_name}: {task.state} {message}".rstrip())
    return lines


def start_cluster_run(cfg: Config, host: str | None, reason: str, *, token: str | None = None,
                      namespace: str | None = None, out: Callable[[str], None] = print) -> str:
    """Start a training run on the cluster and record why (retrain-on-drift calls this); return its id.

    ``host`` None uses ``cfg.cluster.kfp_host`` or the in-cluster default. The
    reason goes into the run's description; the run name says it is a retrain.
    """
    if not reason.strip():
        raise ValueError("start_cluster_run needs a reason (it is recorded on the run)")
    conn = resolve_connection(cfg.cluster, host=host, token=token, namespace=namespace)
    run_name = f"{cfg.cluster.pipeline_name} retrain {_utc_now():%Y-%m-%d %H:%M:%S} UTC"
    result = submit(cfg, conn, run_name=run_name, description=f"Retraining started by mlops: {reason.strip()}",
                    out=out)
    return result.run_id


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
