"""Multi-node pretraining as a Kubeflow Trainer v2 ``TrainJob``.

When pretraining needs more than one node, the pretrain step does not train
itself: it creates a ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``; the v1
PyTorchJob operator is deprecated) that runs the SAME entry point as the
single-node step on every node, waits for it with the kubernetes client, and
fetches the encoder the job wrote to its output URI.

How the job is launched (from the upstream Torch plugin, ``pkg/runtime/
framework/plugins/torch/torch.go``): the ``torch-distributed``
ClusterTrainingRuntime does not wrap our command in ``torchrun``. It only
injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` into the ``node`` container, and
rejects a TrainJob that sets any of them itself. ``torchrun`` reads exactly
those variables as the defaults of its flags, so our command is
``torchrun --module components.pretrain.pretrain`` and the arguments are the pretrain
CLI's; torchrun then starts ``numProcPerNode`` ranks per node with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` set for DDP.

Terminal state comes from ``status.conditions``: the controller copies the
JobSet's ``Completed``/``Failed`` conditions as ``Complete``/``Failed``
(reasons such as ``AllJobsCompleted``, ``FailedJobs``, ``DeadlineExceeded``).
``Suspended`` (e.g. queued by Kueue) and anything else are not terminal.
"""

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"

SCHEMA_FILE = Path(__file__).with_name("trainjob_schema.json")

# Our own annotation/label keys (the collect step reads the output URI back from the object).
ANNOTATION_OUTPUT_URI = "kfp-mlops.io/output-uri"
ANNOTATION_DATASET_URI = "kfp-mlops.io/dataset-uri"
ANNOTATION_SPEC_HASH = "kfp-mlops.io/spec-sha256"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# JobSet labels every pod with the JobSet name, which the controller sets to the TrainJob name.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"

# Set by the Torch plugin of the runtime; a TrainJob that sets them is rejected by the webhook.
TORCHRUN_RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK",
                                   "PET_MASTER_ADDR", "PET_MASTER_PORT"})
# Env names that must come from a Secret, never as a literal in the object (visible to anyone who can get it).
_CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ARG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# HTTP statuses worth retrying: 0 = no HTTP answer (connection/TLS error), 429 throttled, 5xx server side.
TRANSIENT_STATUS = frozenset({0, 429, 500, 502, 503, 504})

COMPLETE = "Complete"
FAILED = "Failed"
SUSPENDED = "Suspended"


class TrainJobError(RuntimeError):
    """The TrainJob could not be created, watched or collected."""


class TrainJobFailed(TrainJobError):
    """The TrainJob reached the ``Failed`` condition."""

    def __init__(self, message: str, reason: str = "", condition_message: str = ""):
        super().__init__(message)
        self.reason = reason
        self.condition_message = condition_message


class TrainJobTimeout(TrainJobError, TimeoutError):
    """The TrainJob did not finish within the wait's timeout."""


@dataclass
class TrainJobSpec:
    """Everything the rendered TrainJob depends on. Credentials only as Secret names."""

    name: str  # RFC 1035 label, <= 63 chars; see trainjob_name() for a deterministic one
    namespace: str
    image: str  # the project image (the CUDA build for GPU nodes); it must contain torchrun
    dataset_uri: str  # s3:// URI of the ingest dataset every node reads
    output_uri: str  # s3:// URI rank 0 writes the encoder artifact to
    num_nodes: int = 2
    gpus_per_node: int = 1
    num_proc_per_node: int | None = None  # None: one process per GPU (one per node on CPU)
    cpu_per_node: str = "8"
    memory_per_node: str = "32Gi"
    runtime_name: str = "torch-distributed"
    runtime_kind: str = "ClusterTrainingRuntime"
    gpu_resource: str = "nvidia.com/gpu"
    entry_module: str = "components.pretrain.pretrain"
    # Pretrain hyperparameters, rendered as --kebab-case flags after --dataset/--out (True -> bare flag, False -> omitted).
    entry_args: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings, e.g. AWS_ENDPOINT_URL, AWS_REGION
    s3_secret_name: str = ""  # Secret in `namespace` whose keys below become env vars of the same name
    s3_secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    labels: dict[str, str] = field(default_factory=dict)
    queue_name: str = ""  # Kueue LocalQueue; empty when the cluster does not use Kueue

    @property
    def procs_per_node(self) -> int:
        if self.num_proc_per_node is not None:
            return self.num_proc_per_node
        return max(1, self.gpus_per_node)


def trainjob_name(prefix: str, *keys: str) -> str:
    """A short, deterministic TrainJob name: ``<prefix>-<12 hex of the keys>``.

    Deterministic on purpose: a retried pipeline step (same run, same output URI)
    renders the same name and adopts the job it already started instead of
    launching a second one. Short because JobSet derives pod hostnames from it.
    """
    digest = hashlib.sha256("\x00".join(keys).encode()).hexdigest()[:12]
    prefix = re.sub(r"[^a-z0-9-]", "-", prefix.lower()).strip("-")[:30] or "trainjob"
    if not prefix[0].isalpha():
        prefix = "tj-" + prefix
    return f"{prefix}-{digest}"


def entry_point(spec: TrainJobSpec) -> tuple[list[str], list[str]]:
    """The node container's command and args: ``torchrun --module <entry>`` + the pretrain CLI flags."""
    command = ["torchrun", "--module", spec.entry_module]
    args = ["--dataset", spec.dataset_uri, "--out", spec.output_uri]
    for key, value in spec.entry_args.items():
        if not _ARG_NAME.match(key):
            raise ValueError(f"entry_args key {key!r} is not a flag name; use letters, digits and underscores")
        flag = "--" + key.replace("_", "-")
        if flag in ("--dataset", "--out"):
            raise ValueError(f"entry_args must not set {flag}: set TrainJobSpec.dataset_uri / output_uri instead")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        elif isinstance(value, (int, float, str)):
            args += [flag, str(value)]
        else:
            raise ValueError(f"entry_args[{key!r}] is a {type(value).__name__}; only str, int, float and bool "
                             "can become a command-line flag")
    return command, args


def _check_spec(spec: TrainJobSpec) -> None:
    problems = []
    if not _DNS_LABEL.match(spec.name) or len(spec.name) > 63:
        problems.append(f"name {spec.name!r} must be a lowercase RFC 1035 label of at most 63 characters "
                        "(use trainjob_name())")
    if spec.num_nodes < 1:
        problems.append(f"num_nodes must be >= 1, got {spec.num_nodes}")
    if spec.gpus_per_node < 0:
        problems.append(f"gpus_per_node must be >= 0, got {spec.gpus_per_node}")
    if spec.procs_per_node < 1:
        problems.append(f"num_proc_per_node must be >= 1, got {spec.procs_per_node}")
    if spec.gpus_per_node and spec.procs_per_node > spec.gpus_per_node:
        problems.append(f"num_proc_per_node={spec.procs_per_node} exceeds gpus_per_node={spec.gpus_per_node}: "
                        "ranks would share a GPU")
    for what, uri in (("dataset_uri", spec.dataset_uri), ("output_uri", spec.output_uri)):
        if "://" not in uri:
            problems.append(f"{what} {uri!r} must be a URI every node can reach (s3://bucket/prefix), "
                            "not a local path of the pipeline pod")
    for name in spec.env:
        if name in TORCHRUN_RESERVED_ENV:
            problems.append(f"env {name} is set by the Trainer's Torch plugin and must not be set by the TrainJob")
        if _CREDENTIAL_NAME.search(name):
            problems.append(f"env {name} looks like a credential: never put it inline, store it in a Secret "
                            "and name the Secret in s3_secret_name")
    if spec.s3_secret_name and not spec.s3_secret_keys:
        problems.append("s3_secret_name is set but s3_secret_keys is empty")
    if problems:
        raise ValueError("invalid TrainJobSpec: " + "; ".join(problems))


def _body_hash(body: dict) -> str:
    """sha256 of a rendered spec body: tells our own earlier job from a different one of the same name."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _render_spec_body(spec: TrainJobSpec) -> dict:
    command, args = entry_point(spec)
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += [{"name": k, "value": str(v)} for k, v in spec.env.items() if k != "PYTHONUNBUFFERED"]
    if spec.s3_secret_name:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret_name, "key": key}}}
                for key in spec.s3_secret_keys]
    requests: dict[str, str] = {"cpu": spec.cpu_per_node, "memory": spec.memory_per_node}
    limits: dict[str, str] = {"memory": spec.memory_per_node}
    if spec.gpus_per_node:
        # Extended resources are set as limits; Kubernetes copies them to requests.
        limits[spec.gpu_resource] = str(spec.gpus_per_node)
    return {
        "runtimeRef": {"name": spec.runtime_name, "apiGroup": GROUP, "kind": spec.runtime_kind},
        "trainer": {
            "image": spec.image,
            "command": command,
            "args": args,
            "env": env,
            "numNodes": spec.num_nodes,
            "numProcPerNode": spec.procs_per_node,
            "resourcesPerNode": {"requests": requests, "limits": limits},
        },
    }


def render_trainjob(spec: TrainJobSpec) -> dict:
    """The TrainJob custom object for ``spec`` (a plain dict for CustomObjectsApi)."""
    _check_spec(spec)
    body = _render_spec_body(spec)
    labels = {"app.kubernetes.io/part-of": "kfp-mlops", "app.kubernetes.io/component": "pretrain", **spec.labels}
    if spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": {
                ANNOTATION_OUTPUT_URI: spec.output_uri,
                ANNOTATION_DATASET_URI: spec.dataset_uri,
                ANNOTATION_SPEC_HASH: _body_hash(body),
            },
        },
        "spec": body,
    }


def load_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate_trainjob(obj: dict) -> None:
    """Check a rendered TrainJob against the vendored schema; raise ValueError listing every problem."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
        raise ValueError("TrainJob does not match the TrainJob schema:\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------- status


def conditions(obj: dict) -> dict[str, dict]:
    """``status.conditions`` by type."""
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions") or []}


def trainjob_state(obj: dict) -> str:
    """One word for the job's state: Complete, Failed, Suspended, Running or Pending."""
    conds = conditions(obj)
    for terminal in (FAILED, COMPLETE):
        if conds.get(terminal, {}).get("status") == "True":
            return terminal
    if conds.get(SUSPENDED, {}).get("status") == "True":
        return SUSPENDED
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    if any((j.get("ready") or 0) > 0 for j in jobs):
        return "Running"
    return "Pending"


def describe_status(obj: dict | None) -> str:
    """A one-line summary of a TrainJob's status for logs and errors."""
    if obj is None:
        return "never seen (every GET failed)"
    status = obj.get("status") or {}
    parts = [f"state={trainjob_state(obj)}"]
    for c in status.get("conditions") or []:
        text = f"{c.get('type')}={c.get('status')}"
        if c.get("reason"):
            text += f" ({c['reason']}"
            text += f": {c['message']})" if c.get("message") else ")"
        parts.append(text)
    for j in status.get("jobsStatus") or []:
        counts = " ".join(f"{k}={j.get(k, 0)}" for k in ("active", "ready", "succeeded", "failed", "suspended"))
        parts.append(f"job {j.get('name')}: {counts}")
    if not status:
        parts.append("no status yet (controller has not reconciled it)")
    return "; ".join(parts)


def _logs_hint(namespace: str, name: str) -> str:
    return (f"see `kubectl -n {namespace} describe trainjob {name}` and "
            f"`kubectl -n {namespace} logs -l {JOBSET_NAME_LABEL}={name} --prefix --tail=100`")


# ---------------------------------------------------------------- API calls


def _api_status(exc: BaseException) -> int | None:
    """HTTP status of a kubernetes ApiException (0 for no answer), None for other exceptions."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return int(exc.status or 0)
    return None


def _is_transport_error(exc: BaseException) -> bool:
    import urllib3

    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _explain(exc: BaseException) -> str:
    status = _api_status(exc)
    if status is None:
        return f"{type(exc).__name__}: {exc}"
    body = getattr(exc, "body", None)
    message = ""
    if body:
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:300]
    return f"HTTP {status} {getattr(exc, 'reason', '')}" + (f": {message}" if message else "")


_HINTS = {
    401: "the pipeline pod's credentials were rejected; check its ServiceAccount token",
    403: f"the pipeline's ServiceAccount needs a Role allowing create/get/delete on {PLURAL}.{GROUP}",
    404: f"the TrainJob CRD ({PLURAL}.{GROUP}/{VERSION}) is not installed, or the namespace does not exist; "
         "install Kubeflow Trainer v2",
    422: "the API server rejected the object; check the runtime exists and the fields are valid",
}


def submit_trainjob(api, obj: dict, *, retries: int = 3, sleep: Callable[[float], None] = time.sleep,
                    backoff_s: float = 2.0) -> str:
    """Create the TrainJob and return its name.

    Idempotent for retried pipeline steps: if a TrainJob of that name already
    exists and carries the same spec hash, it is adopted (returned) instead of
    failing; a different job of that name is an error. Transient API errors
    (5xx, 429, connection errors) are retried ``retries`` times.
    """
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    attempt = 0
    while True:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
            return name
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised when not an API/transport error
            status = _api_status(exc)
            transient = status in TRANSIENT_STATUS or (status is None and _is_transport_error(exc))
            if status == 409:
                return _adopt_existing(api, obj)
            if transient and attempt < retries:
                sleep(backoff_s * 2 ** attempt)
                attempt += 1
                continue
            if status is None and not transient:
                raise
            hint = _HINTS.get(status, "") if status is not None else ""
            raise TrainJobError(f"could not create TrainJob {namespace}/{name} after {attempt + 1} attempt(s): "
                                f"{_explain(exc)}" + (f" — {hint}" if hint else "")) from exc


def _adopt_existing(api, obj: dict) -> str:
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    ours = obj["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if theirs != ours:
        raise TrainJobError(f"a different TrainJob named {namespace}/{name} already exists (spec hash "
                            f"{theirs or 'missing'} != {ours[:12]}…); delete it or choose another name")
    return name


def wait_for_trainjob(api, namespace: str, name: str, timeout_s: float = 6 * 3600, poll_s: float = 15.0, *,
                      not_found_grace_s: float = 60.0, max_consecutive_errors: int = 10,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      log: Callable[[str], None] = print) -> dict:
    """Poll the TrainJob until it is Complete (returned) or Failed / timed out (raised).

    A 404 within ``not_found_grace_s`` of the start, before the object was ever
    seen, is the API cache catching up after the create and is retried; a 404
    after the object was seen means it was deleted. Transient errors (5xx, 429,
    connection errors) are retried up to ``max_consecutive_errors`` in a row.
    """
    start = clock()
    deadline = start + timeout_s
    last: dict | None = None
    last_line = ""
    errors_in_a_row = 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:  # noqa: BLE001 - classified below
            status = _api_status(exc)
            if status == 404:
                if last is not None:
                    raise TrainJobError(f"TrainJob {namespace}/{name} disappeared while running (deleted?); "
                                        f"last status: {describe_status(last)}") from exc
                if clock() - start > not_found_grace_s:
                    raise TrainJobError(f"TrainJob {namespace}/{name} not found {not_found_grace_s:.0f}s after "
                                        "creation; was it created in this namespace?") from exc
            elif status in TRANSIENT_STATUS or (status is None and _is_transport_error(exc)):
                errors_in_a_row += 1
                if errors_in_a_row > max_consecutive_errors:
                    raise TrainJobError(f"giving up on TrainJob {namespace}/{name} after {errors_in_a_row} failed "
                                        f"GETs in a row, last: {_explain(exc)}; the job may still be running: "
                                        f"{_logs_hint(namespace, name)}") from exc
                log(f"[trainjob] GET {name} failed ({_explain(exc)}), retrying")
            elif status is not None:
                hint = _HINTS.get(status, "")
                raise TrainJobError(f"cannot read TrainJob {namespace}/{name}: {_explain(exc)}"
                                    + (f" — {hint}" if hint else "")) from exc
            else:
                raise
        else:
            errors_in_a_row = 0
            last = obj
            state = trainjob_state(obj)
            if state == COMPLETE:
                log(f"[trainjob] {name} complete after {clock() - start:.0f}s")
                return obj
            if state == FAILED:
                cond = conditions(obj)[FAILED]
                reason, message = cond.get("reason", ""), cond.get("message", "")
                raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {reason}: {message}; "
                                     f"{describe_status(obj)}; {_logs_hint(namespace, name)}",
                                     reason=reason, condition_message=message)
            line = describe_status(obj)
            if line != last_line:  # log changes only, not every poll
                log(f"[trainjob] {name}: {line}")
                last_line = line
        now = clock()
        if now >= deadline:
            raise TrainJobTimeout(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s; "
                                  f"last status: {describe_status(last)}; {_logs_hint(namespace, name)}")
        sleep(min(poll_s, deadline - now))


def delete_trainjob(api, namespace: str, name: str) -> bool:
    """Delete the TrainJob (and, through owner references, its JobSet and pods). False if it was gone."""
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            propagation_policy="Foreground")
        return True
    except Exception as exc:  # noqa: BLE001
        if _api_status(exc) == 404:
            return False
        raise


def collect_output(obj: dict, storage_fetch: Callable[[str, str], Any], dest_dir: str | Path | None = None,
                   required_files: tuple[str, ...] = ("encoder.safetensors", "metadata.json")) -> Path:
    """Fetch what a Complete TrainJob wrote to its output URI into a local directory and return it.

    ``storage_fetch(uri, local_dir)`` copies the object(s) under ``uri`` into
    ``local_dir`` (the storage module's download, passed in so this code does
    not depend on it). The output URI is read back from the object's
    annotation, so the object alone says where its result is.
    """
    name = obj.get("metadata", {}).get("name", "?")
    if trainjob_state(obj) != COMPLETE:
        raise TrainJobError(f"TrainJob {name} is not Complete ({describe_status(obj)}); nothing to collect")
    uri = (obj.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_OUTPUT_URI)
    if not uri:
        raise TrainJobError(f"TrainJob {name} has no {ANNOTATION_OUTPUT_URI} annotation; "
                            "it was not created by render_trainjob()")
    dest = Path(dest_dir) if dest_dir is not None else Path(tempfile.mkdtemp(prefix=f"{name}-"))
    dest.mkdir(parents=True, exist_ok=True)
    storage_fetch(uri, str(dest))
    missing = [f for f in required_files if not (dest / f).is_file()]
    if missing:
        raise TrainJobError(f"TrainJob {name} completed but {uri} lacks {', '.join(missing)} after fetching to "
                            f"{dest}; did rank 0 of the entry point upload its output to --out?")
    return dest


# ---------------------------------------------------------------- glue


def load_custom_objects_api():
    """A CustomObjectsApi from the in-cluster ServiceAccount, else from ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, FileNotFoundError, OSError) as exc:
            raise TrainJobError("no Kubernetes credentials: not running in a pod and no kubeconfig "
                                f"({exc}); multi-node pretraining needs a cluster with Kubeflow Trainer v2") from exc
    return client.CustomObjectsApi()


def run_multinode_pretrain(spec: TrainJobSpec, dest_dir: str | Path, storage_fetch: Callable[[str, str], Any], *,
                           api=None, timeout_s: float = 6 * 3600, poll_s: float = 15.0,
                           delete_on_timeout: bool = True, clock: Callable[[], float] = time.monotonic,
                           sleep: Callable[[float], None] = time.sleep,
                           log: Callable[[str], None] = print) -> dict:
    """Render, validate, submit and wait for the pretrain TrainJob, then fetch its encoder into ``dest_dir``.

    Returns a summary: trainjob, namespace, output_uri, local_dir, num_nodes,
    procs_per_node, gpus_per_node, seconds. On timeout the job is deleted (its
    GPUs freed) unless ``delete_on_timeout`` is False; a Failed job is kept for
    inspection.
    """
    obj = render_trainjob(spec)
    validate_trainjob(obj)
    api = api if api is not None else load_custom_objects_api()
    t0 = clock()
    name = submit_trainjob(api, obj, sleep=sleep)
    log(f"[trainjob] submitted {spec.namespace}/{name}: {spec.num_nodes} nodes x {spec.procs_per_node} procs, "
        f"{spec.gpus_per_node} {spec.gpu_resource} per node, runtime {spec.runtime_name}")
    try:
        final = wait_for_trainjob(api, spec.namespace, name, timeout_s, poll_s, clock=clock, sleep=sleep, log=log)
    except TrainJobTimeout:
        if delete_on_timeout and delete_trainjob(api, spec.namespace, name):
            log(f"[trainjob] deleted {name} after the timeout to free its nodes")
        raise
    local = collect_output(final, storage_fetch, dest_dir)
    return {
        "trainjob": name,
        "namespace": spec.namespace,
        "output_uri": spec.output_uri,
        "local_dir": os.fspath(local),
        "num_nodes": spec.num_nodes,
        "procs_per_node": spec.procs_per_node,
        "gpus_per_node": spec.gpus_per_node,
        "seconds": clock() - t0,
    }
