"""Submit and schedule the pipeline on a Kubeflow Pipelines cluster (``kfp.Client``, API v2beta1).

    conn = resolve_connection(cfg.cluster, host="http://localhost:8888")   # --host/--token/--namespace
    result = submit(cfg, conn, wait=True)        # compile, upload (or a new version), run, stream states
    create_schedule(cfg, conn, cron="0 3 * * *") # a recurring run: catch-up off, max concurrency 1
    start_cluster_run(cfg, host, reason)         # what retrain-on-drift calls; the reason goes on the run

Every call goes through ``kfp.Client`` and ``kfp_server_api``; their errors become
a :class:`ClusterError` whose message says what is wrong and what to do (wrong
host, rejected token, missing namespace, a bad cron). What each command sends:

* the pipeline, compiled from ``ClusterConfig`` (image, Kubernetes settings); a
  pipeline of that name gets a new *version*, named by the compiled YAML's sha256,
  so submitting the same compile twice reuses its version;
* the run parameters: ``run_parameters(cfg)`` (never credentials: those come from
  the Secret named in ``ClusterConfig``, see ``pipelines/pipeline.py``);
* the ServiceAccount on the run (``ClusterConfig.service_account``), not per task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.config import ClusterConfig, Config

IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
KFP_SYSTEM_NAMESPACE = "kubeflow"  # where KFP itself runs: the kubeconfig route goes to its service
TOKEN_ENV = "KFP_TOKEN"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # the variable kfp's own in-cluster credentials read
# In a pod: KFP's audience-bound projected token (multi-user Kubeflow), else the pod's ServiceAccount token.
IN_CLUSTER_TOKEN_FILES = ("/var/run/secrets/kubeflow/pipelines/token",
                          "/var/run/secrets/kubernetes.io/serviceaccount/token")
KUBE_PROXY_PATH = f"api/v1/namespaces/{KFP_SYSTEM_NAMESPACE}/services/ml-pipeline:http/proxy"
# Exit codes of `mlops submit --wait`: 0 succeeded, 1 failed/canceled/skipped, 124 still going at --timeout.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "CANCELED": 1, "SKIPPED": 1}
TIMEOUT_EXIT_CODE = 124
BLOCKED_EXIT_CODE = 3  # the run succeeded but a gate kept the model from deploy (as `mlops run` locally)
GATE_STEPS = ("evaluate", "privacy", "robustness")
RELEASE_STEP = "deploy"
TERMINAL_STATES = tuple(EXIT_CODES)
REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds for the first request; kfp's own default waits forever


class ClusterError(RuntimeError):
    """A cluster call failed; the message says what to do. ``status``: the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Connection: host, token, namespace
# ---------------------------------------------------------------------------

@dataclass
class Connection:
    """Where the KFP API is and how to authenticate (no secret is printed by ``describe``)."""

    host: str | None  # None = through the Kubernetes API server with the kubeconfig (kube_context)
    namespace: str  # user/profile namespace; dropped on single-user KFP
    token: str | None = None
    token_file: str | None = None  # re-read on every request: projected tokens rotate
    kube_context: str | None = None
    multi_user: bool | None = None  # learnt from the healthz answer on connect

    def describe(self) -> str:
        where = self.host or f"the Kubernetes API server of kube context {self.kube_context or '(current)'}"
        auth = ("token from --token/KFP_TOKEN" if self.token else f"token file {self.token_file}" if self.token_file
                else "kubeconfig credentials" if self.host is None else "no token")
        return f"{where} ({auth})"


def resolve_connection(cluster: ClusterConfig, *, host: str | None = None, token: str | None = None,
                       namespace: str | None = None, kube_context: str | None = None,
                       environ: dict[str, str] | None = None) -> Connection:
    """Pick host, token and namespace from flags, then config, then the environment.

    Host: ``host``, else the kubeconfig route when ``kube_context`` is given, else
    ``cluster.kfp_host``, else the in-cluster service when running in a pod
    (``KUBERNETES_SERVICE_HOST`` set). Token: ``token``, else ``$KFP_TOKEN``, else the
    file in ``$KF_PIPELINES_SA_TOKEN_PATH``, else (in a pod) KFP's projected token or
    the ServiceAccount token.
    """
    env = os.environ if environ is None else environ
    in_cluster = bool(env.get("KUBERNETES_SERVICE_HOST"))
    if host and kube_context:
        raise ClusterError("pass either --host or --kube-context, not both")
    host = host or (None if kube_context else cluster.kfp_host) or None  # an explicit --kube-context beats the config
    if host is None and kube_context is None:
        if not in_cluster:
            raise ClusterError(
                "no Kubeflow Pipelines host: pass --host URL (e.g. http://localhost:8888 after "
                "'kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888'), set cluster.kfp_host in the config, "
                "or pass --kube-context NAME to go through the Kubernetes API server with your kubeconfig; "
                f"inside the cluster the default is {IN_CLUSTER_HOST}")
        host = IN_CLUSTER_HOST
    if host is not None:
        if not re.match(r"^https?://[^/\s]+", host):
            raise ClusterError(f"--host {host!r} must be an http:// or https:// URL, e.g. http://localhost:8888")
        host = host.rstrip("/")

    token = token or env.get(TOKEN_ENV) or None
    token_file = None
    if token is None and kube_context is None:
        if env.get(TOKEN_PATH_ENV):
            token_file = env[TOKEN_PATH_ENV]
            if not Path(token_file).is_file():
                raise ClusterError(f"{TOKEN_PATH_ENV}={token_file} but that file does not exist; "
                                   "mount the projected ServiceAccount token there or unset the variable")
        elif in_cluster:
            token_file = next((f for f in IN_CLUSTER_TOKEN_FILES if Path(f).is_file()), None)
    ns = cluster.namespace if namespace is None else namespace
    return Connection(host=host, namespace=ns, token=token, token_file=token_file, kube_context=kube_context)


class KubeconfigCredentials:
    """The bearer token of a kubeconfig context, for the route through the Kubernetes API server.

    A ``kfp.client.TokenCredentialsBase`` (registered below): kfp calls the hook before
    each request, and the kubernetes loader behind it re-runs an exec plugin (EKS, GKE,
    OIDC) only when its token expired. Not kfp's own kubeconfig route: its token
    refresh resets the host and drops the service-proxy path.
    """

    def __init__(self, kube_context: str | None):
        import kfp_server_api
        from kubernetes import config as k8s_config

        self.kube_context = kube_context
        self._loaded = kfp_server_api.Configuration()
        try:
            k8s_config.load_kube_config(context=kube_context, client_configuration=self._loaded)
        except Exception as exc:  # the kubernetes loader raises many kinds; all mean "fix the kubeconfig"
            raise ClusterError(f"cannot use the kubeconfig (context {kube_context or 'current'}): {exc}; "
                               "check KUBECONFIG / ~/.kube/config, or pass --host instead") from None
        if self._loaded.cert_file or not self._loaded.api_key.get("authorization"):
            raise ClusterError(f"kube context {kube_context or '(current)'} authenticates with a client certificate, "
                               "which this route does not support; use 'kubectl -n kubeflow port-forward "
                               "svc/ml-pipeline 8888:8888' and --host http://localhost:8888")
        self.api_server = self._loaded.host.rstrip("/")
        self.ssl_ca_cert = self._loaded.ssl_ca_cert
        self.verify_ssl = self._loaded.verify_ssl

    @property
    def proxied_host(self) -> str:
        return f"{self.api_server}/{KUBE_PROXY_PATH}"

    def token(self) -> str:
        if self._loaded.refresh_api_key_hook is not None:
            self._loaded.refresh_api_key_hook(self._loaded)  # reloads only an expired token
        value = self._loaded.api_key["authorization"]
        return value[len("Bearer "):] if value.startswith("Bearer ") else value

    def refresh_api_key_hook(self, config) -> None:
        config.api_key["authorization"] = self.token()


def _register_credentials() -> None:
    from kfp.client.token_credentials_base import TokenCredentialsBase

    TokenCredentialsBase.register(KubeconfigCredentials)


def _api_configuration(conn: Connection, kube: KubeconfigCredentials | None):
    """A kfp_server_api Configuration for a first, bounded request (healthz)."""
    import kfp_server_api

    config = kfp_server_api.Configuration()
    config.api_key_prefix["authorization"] = "Bearer"
    if kube is not None:
        config.host = kube.proxied_host
        config.ssl_ca_cert, config.verify_ssl = kube.ssl_ca_cert, kube.verify_ssl
        config.api_key["authorization"] = kube.token()
    else:
        config.host = conn.host
        token = conn.token or (Path(conn.token_file).read_text().strip() if conn.token_file else None)
        if token:
            config.api_key["authorization"] = token
    config.retries = 1  # one quick reconnect, not urllib3's three
    return config


def connect(conn: Connection):
    """Check the API answers (bounded, clear errors), then return a ``kfp.Client``.

    Sets ``conn.multi_user`` from the server: multi-user KFP needs a namespace, and
    single-user KFP rejects one on some calls, so the namespace is dropped there.
    """
    import kfp
    import kfp_server_api

    kube = KubeconfigCredentials(conn.kube_context) if conn.host is None else None
    api_client = kfp_server_api.ApiClient(_api_configuration(conn, kube))
    where = conn.describe()
    healthz = _call(where, "health check", kfp_server_api.HealthzServiceApi(api_client).healthz_service_get_healthz,
                    _request_timeout=REQUEST_TIMEOUT)
    conn.multi_user = bool(healthz.multi_user)
    if conn.multi_user and not conn.namespace:
        raise ClusterError(f"Kubeflow Pipelines at {where} is multi-user: pass --namespace (your profile "
                           "namespace) or set cluster.namespace")
    if not conn.multi_user:
        conn.namespace = ""

    # A namespace other than "kubeflow" also keeps kfp.Client from a second health check
    # (with 5 s sleeps between retries) in its constructor.
    kwargs: dict[str, Any] = {"namespace": conn.namespace or KFP_SYSTEM_NAMESPACE}
    if kube is not None:
        _register_credentials()
        kwargs.update(host=kube.proxied_host, credentials=kube, ssl_ca_cert=kube.ssl_ca_cert,
                      verify_ssl=kube.verify_ssl)
    else:
        kwargs["host"] = conn.host
        if conn.token:
            kwargs["existing_token"] = conn.token
        elif conn.token_file:
            from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

            kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(conn.token_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        client = _call(where, "connect", kfp.Client, **kwargs)
    # kfp.Client falls back to the namespace in ~/.config/kfp/context.json; use exactly ours.
    client._context_setting["namespace"] = conn.namespace
    return client


def _call(where: str, what: str, fn: Callable, *args, **kwargs):
    """Run one API call; turn transport and HTTP errors into ClusterError with a hint."""
    import kfp_server_api
    import urllib3

    try:
        return fn(*args, **kwargs)
    except kfp_server_api.ApiException as exc:
        raise ClusterError(_http_error_message(where, what, exc), status=exc.status) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ClusterError(f"cannot reach Kubeflow Pipelines at {where} ({what}): {reason}. Check --host "
                           "(is the port-forward running? is it the ml-pipeline API, port 8888?)") from None


def _http_error_message(where: str, what: str, exc) -> str:
    status = exc.status
    detail = ""
    if exc.body:
        try:
            body = json.loads(exc.body)
            detail = body.get("message") or body.get("error") or ""
        except (ValueError, AttributeError):
            detail = str(exc.body)[:300]
    detail = f": {detail}" if detail else ""
    if status == 401:
        return (f"Kubeflow Pipelines at {where} rejected the credentials ({what}: 401 Unauthorized{detail}). "
                f"The token is missing, expired or wrong: pass a fresh one with --token or ${TOKEN_ENV}.")
    if status == 403:
        return (f"Kubeflow Pipelines at {where} refused {what} (403 Forbidden{detail}). The token is valid but "
                "may not act in this namespace: check --namespace and that you are a contributor of that profile.")
    if status == 404 and what in ("health check", "connect"):
        return (f"no Kubeflow Pipelines API at {where} (404 on /apis/v2beta1/healthz): point --host at the "
                "ml-pipeline service (port 8888) or the UI's /pipeline path.")
    return f"Kubeflow Pipelines at {where}: {what} failed ({status} {exc.reason}{detail})"


# ---------------------------------------------------------------------------
# Pipeline upload, experiment, run
# ---------------------------------------------------------------------------

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


def _ns(conn: Connection) -> str | None:
    return conn.namespace or None


def _equals_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


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
    listed = _call(where, "list pipelines", client.list_pipelines, filter=_equals_filter("display_name", pipeline_name),
                   namespace=_ns(conn), page_size=10)
    pipelines = listed.pipelines or []
    if len(pipelines) > 1:
        raise ClusterError(f"{len(pipelines)} pipelines are named {pipeline_name!r}; pass --pipeline-name to pick another")
    if not pipelines:
        pipeline = _call(where, "upload pipeline", client.upload_pipeline, str(package), pipeline_name=pipeline_name,
                         description=description, namespace=_ns(conn))
        versions = _call(where, "list pipeline versions", client.list_pipeline_versions, pipeline.pipeline_id,
                         page_size=1, sort_by="created_at desc").pipeline_versions or []
        if not versions:
            raise ClusterError(f"uploaded pipeline {pipeline.pipeline_id} but the server lists no version of it")
        return pipeline.pipeline_id, versions[0].pipeline_version_id, versions[0].display_name, True, False

    pipeline_id = pipelines[0].pipeline_id
    version_name = f"{pipeline_name}-{digest[:12]}"  # content-addressed: same compile, same version
    existing = _call(where, "list pipeline versions", client.list_pipeline_versions, pipeline_id,
                     filter=_equals_filter("display_name", version_name), page_size=1).pipeline_versions or []
    if existing:
        return pipeline_id, existing[0].pipeline_version_id, version_name, False, False
    version = _call(where, "upload pipeline version", client.upload_pipeline_version, str(package), version_name,
                    pipeline_id=pipeline_id, description=description)
    return pipeline_id, version.pipeline_version_id, version_name, False, True


def ensure_experiment(client, conn: Connection, name: str) -> str:
    experiment = _call(conn.describe(), "create experiment", client.create_experiment, name,
                       description="Runs of the kfp-mlops pipeline (mlops submit / mlops schedule).",
                       namespace=_ns(conn))
    return experiment.experiment_id


def _upload(cfg: Config, client, conn: Connection, pipeline_name: str, out: Callable[[str], None]):
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


def _run_parameters(cfg: Config) -> dict[str, Any]:
    from pipelines.pipeline import run_parameters

    return run_parameters(cfg)


def submit(cfg: Config, conn: Connection, *, experiment: str | None = None, pipeline_name: str | None = None,
           run_name: str | None = None, description: str = "", wait: bool = False, timeout_s: float | None = None,
           poll_s: float = 5.0, out: Callable[[str], None] = print, client=None) -> SubmitResult:
    """Compile, upload (or add a version), create a run; optionally wait for its end."""
    cluster = cfg.cluster
    experiment = experiment or cluster.experiment
    pipeline_name = pipeline_name or cluster.pipeline_name
    client = client or connect(conn)
    pipeline_id, version_id, version_name, new_pipeline, new_version = _upload(cfg, client, conn, pipeline_name, out)
    experiment_id = ensure_experiment(client, conn, experiment)

    import kfp_server_api

    run_name = run_name or f"{pipeline_name} {_utc_now():%Y-%m-%d %H:%M:%S} UTC"
    body = kfp_server_api.V2beta1Run(
        experiment_id=experiment_id,
        display_name=run_name,
        description=description or None,
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline_id, pipeline_version_id=version_id),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=_run_parameters(cfg)),
        service_account=cluster.service_account or None,
    )
    # The generated API rather than client.run_pipeline: only it can set the description.
    run = _call(conn.describe(), "create run", client.runs.run_service_create_run, run=body)
    out(f"Run {run.run_id} ({run_name!r}) created in experiment {experiment!r} "
        f"as ServiceAccount {cluster.service_account or '(namespace default)'}")
    result = SubmitResult(run.run_id, pipeline_id, version_id, version_name, new_pipeline, new_version, experiment_id)
    if wait:
        result.state = wait_for_run(client, conn, run.run_id, timeout_s=timeout_s, poll_s=poll_s, out=out)
        result.exit_code = EXIT_CODES.get(result.state, TIMEOUT_EXIT_CODE) if result.state else TIMEOUT_EXIT_CODE
        if result.state == "SUCCEEDED":
            finished = _call(conn.describe(), "get run", client.get_run, run.run_id)
            result.exit_code, lines = release_outcome(finished)
            for line in lines:
                out(line)
    return result


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
            run = _call(conn.describe(), "get run", client.get_run, run_id)
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


# ---------------------------------------------------------------------------
# Cron: KFP's scheduler uses robfig/cron v1, whose parser takes SIX fields
# (seconds first) and treats the sixth, day-of-week, as optional. A standard
# 5-field "0 3 * * *" would therefore parse as second 0, minute 3, EVERY hour:
# hourly retraining instead of daily. So 5 fields are converted, never passed on.
# ---------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
# name, low, high, names, '?' allowed
_CRON_FIELDS = (
    ("second", 0, 59, {}, False),
    ("minute", 0, 59, {}, False),
    ("hour", 0, 23, {}, False),
    ("day of month", 1, 31, {}, True),
    ("month", 1, 12, _MONTHS, False),
    ("day of week", 0, 6, _DAYS, True),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
CRON_HELP = ("a cron expression: 5 fields 'minute hour day-of-month month day-of-week' (e.g. '0 3 * * *' = "
             "03:00 daily), KFP's 6 fields with seconds first ('0 0 3 * * *'), or @daily/@weekly/@hourly/...")


def kfp_cron(expression: str) -> tuple[str, str | None]:
    """Validate a cron expression and return (KFP's 6-field form, a note when it was converted)."""
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        if expr in _DESCRIPTORS:
            return expr, None
        raise ValueError(f"cron {expression!r}: unknown descriptor; use one of {', '.join(_DESCRIPTORS)} "
                         "(KFP's @every needs a periodic schedule, which mlops schedule does not create)")
    fields = expr.split(" ") if expr else []
    if len(fields) == 5:
        six = ["0"] + fields
        note = (f"converted the 5-field cron {expr!r} to KFP's 6-field form {' '.join(six)!r} "
                "(seconds first; KFP's scheduler would read 5 fields as seconds-minute-hour-...)")
    elif len(fields) == 6:
        six, note = fields, None
    else:
        raise ValueError(f"cron {expression!r} has {len(fields)} fields; expected {CRON_HELP}")
    for value, (name, low, high, names, question) in zip(six, _CRON_FIELDS):
        _check_cron_field(expression, value, name, low, high, names, question)
    return " ".join(six), note


def _check_cron_field(expression: str, value: str, name: str, low: int, high: int, names: dict, question: bool):
    def number(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            raise ValueError(f"cron {expression!r}: {name} field {value!r} has {token!r}, not a number"
                             + (f" or a name ({', '.join(names)})" if names else ""))
        n = int(token)
        if not low <= n <= high:
            hint = " (Sunday is 0)" if name == "day of week" and n == 7 else ""
            raise ValueError(f"cron {expression!r}: {name} {n} is outside {low}-{high}{hint}")
        return n

    if value == "?":
        if not question:
            raise ValueError(f"cron {expression!r}: '?' is only allowed for day of month and day of week")
        return
    for part in value.split(","):
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"cron {expression!r}: {name} step {step!r} must be a positive number")
        if base == "*":
            continue
        start, dash, end = base.partition("-")
        first = number(start)
        if dash and number(end) < first:
            raise ValueError(f"cron {expression!r}: {name} range {base!r} runs backwards")


# ---------------------------------------------------------------------------
# Recurring runs (schedules)
# ---------------------------------------------------------------------------

@dataclass
class Schedule:
    recurring_run_id: str
    name: str
    cron: str
    enabled: bool
    max_concurrency: int
    no_catchup: bool
    experiment_id: str
    pipeline_version_id: str
    created_at: str

    @classmethod
    def from_api(cls, rr) -> "Schedule":
        trigger = rr.trigger
        cron = (trigger.cron_schedule.cron if trigger and trigger.cron_schedule
                else f"every {trigger.periodic_schedule.interval_second}s" if trigger and trigger.periodic_schedule
                else "")
        ref = rr.pipeline_version_reference
        return cls(rr.recurring_run_id, rr.display_name or "", cron, rr.mode == "ENABLE",
                   int(rr.max_concurrency or 0), bool(rr.no_catchup), rr.experiment_id or "",
                   (ref.pipeline_version_id if ref else rr.pipeline_version_id) or "",
                   rr.created_at.isoformat() if rr.created_at else "")


DEFAULT_SCHEDULE_NAME = "kfp-mlops-retrain"


def create_schedule(cfg: Config, conn: Connection, *, cron: str, name: str = DEFAULT_SCHEDULE_NAME,
                    max_concurrency: int = 1, experiment: str | None = None, pipeline_name: str | None = None,
                    out: Callable[[str], None] = print, client=None) -> Schedule:
    """A KFP recurring run of the pipeline: catch-up off (a paused schedule does not
    replay every missed slot when resumed), at most ``max_concurrency`` runs at once."""
    cron6, note = kfp_cron(cron)  # validate before touching the cluster
    if not 1 <= max_concurrency <= 10:
        raise ValueError(f"--max-concurrency must be 1-10 (KFP's limit), got {max_concurrency}")
    if not name.strip():
        raise ValueError("a schedule needs a --name")
    if note:
        out(note)
    cluster = cfg.cluster
    experiment = experiment or cluster.experiment
    pipeline_name = pipeline_name or cluster.pipeline_name
    client = client or connect(conn)
    clash = _schedules_named(client, conn, name)
    if clash:
        raise ClusterError(f"a schedule named {name!r} already exists ({clash[0].recurring_run_id}); "
                           f"delete it first (mlops schedule delete {name}) or pass another --name")
    pipeline_id, version_id, _, _, _ = _upload(cfg, client, conn, pipeline_name, out)
    experiment_id = ensure_experiment(client, conn, experiment)
    rr = _call(conn.describe(), "create recurring run", client.create_recurring_run, experiment_id, name,
               description=f"Scheduled retraining of {pipeline_name} ({cron6}), created by mlops schedule",
               cron_expression=cron6, max_concurrency=max_concurrency, no_catchup=True,
               params=_run_parameters(cfg), pipeline_id=pipeline_id, version_id=version_id, enabled=True,
               service_account=cluster.service_account or None)
    schedule = Schedule.from_api(rr)
    out(f"Schedule {name!r} ({schedule.recurring_run_id}) created: cron {cron6!r} (the KFP scheduler's time zone, "
        f"usually UTC), max {max_concurrency} concurrent run(s), catch-up off, experiment {experiment!r}")
    return schedule


def list_schedules(conn: Connection, *, client=None) -> list[Schedule]:
    client = client or connect(conn)
    schedules, token = [], ""
    while True:
        page = _call(conn.describe(), "list recurring runs", client.list_recurring_runs, page_token=token,
                     page_size=100, namespace=_ns(conn))
        schedules += [Schedule.from_api(rr) for rr in (page.recurring_runs or [])]
        token = page.next_page_token or ""
        if not token:
            return schedules


def _schedules_named(client, conn: Connection, name: str) -> list[Schedule]:
    page = _call(conn.describe(), "list recurring runs", client.list_recurring_runs,
                 filter=_equals_filter("display_name", name), namespace=_ns(conn), page_size=100)
    return [Schedule.from_api(rr) for rr in (page.recurring_runs or [])]


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)


def find_schedule(conn: Connection, name_or_id: str, *, client=None) -> Schedule:
    """The schedule with this id, or the one schedule with this name."""
    client = client or connect(conn)
    if _UUID.match(name_or_id):
        return Schedule.from_api(_call(conn.describe(), "get recurring run", client.get_recurring_run, name_or_id))
    matches = _schedules_named(client, conn, name_or_id)
    if not matches:
        raise ClusterError(f"no schedule named {name_or_id!r}; 'mlops schedule list' shows the names and ids")
    if len(matches) > 1:
        ids = ", ".join(s.recurring_run_id for s in matches)
        raise ClusterError(f"{len(matches)} schedules are named {name_or_id!r} ({ids}); pass the id instead")
    return matches[0]


def set_schedule_enabled(conn: Connection, name_or_id: str, enabled: bool, *, client=None) -> Schedule:
    client = client or connect(conn)
    schedule = find_schedule(conn, name_or_id, client=client)
    if enabled:
        _call(conn.describe(), "enable recurring run", client.enable_recurring_run, schedule.recurring_run_id)
    else:
        _call(conn.describe(), "disable recurring run", client.disable_recurring_run, schedule.recurring_run_id)
    return dataclasses.replace(schedule, enabled=enabled)


def delete_schedule(conn: Connection, name_or_id: str, *, client=None) -> Schedule:
    client = client or connect(conn)
    schedule = find_schedule(conn, name_or_id, client=client)
    _call(conn.describe(), "delete recurring run", client.delete_recurring_run, schedule.recurring_run_id)
    return schedule


def format_schedules(schedules: list[Schedule]) -> str:
    if not schedules:
        return "no schedules"
    rows = [("ID", "NAME", "STATE", "CRON", "MAX", "CATCH-UP", "CREATED")]
    rows += [(s.recurring_run_id, s.name, "enabled" if s.enabled else "paused", s.cron, str(s.max_concurrency),
              "off" if s.no_catchup else "on", s.created_at) for s in schedules]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
