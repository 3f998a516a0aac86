"""Deploy step on Kubernetes: release a model to the serving Deployment, watch it, roll back on failure.

What one release does (``deploy_kubernetes``), in order; nothing on the cluster changes
before step 4, and every failure after it ends in a known state:

1. Check the inputs (model artifact, test images, the clients' token file) and read the
   live serving Deployment (installed once with ``kubectl apply -k manifests/overlays/<env>``;
   this step changes only the release fields of it, never sizes, placement or security).
2. Pack the model into ``<model>.mar`` and publish it to the model store with
   ``components.core.storage.publish``: a content-addressed release whose id (a sha256) the
   pods' init container fetches, so a revision always means the same bytes.
3. Render the release: a server-side-apply configuration holding only the release
   fields (``render_release``): the init container's ``KFP_MLOPS_MODEL_URI`` and
   ``KFP_MLOPS_MODEL_VERSION`` (the release id), the ``kfp-mlops.io/model-version`` and
   ``app.kubernetes.io/version`` labels, the ``kubernetes.io/change-cause`` annotation
   (what ``kubectl rollout history`` lists), the release id as a pod annotation, and the
   image when one is given. Everything else stays with whoever applied the manifests.
4. Server-side apply it (field manager ``kfp-mlops``, conflicts forced: the release
   fields are this step's), then wait for the rollout the way ``kubectl rollout status``
   does (observedGeneration, updated/available replicas, the Progressing condition's
   ProgressDeadlineExceeded), failing early when a new pod crash-loops or cannot pull.
5. Smoke-test through the Service (its cluster DNS name, with the clients' bearer
   token: the pods' auth proxy checks it), expecting the new model version to answer.
6. On any failure in 4-5: roll back to the revision that served before, exactly as
   ``kubectl rollout undo`` does (the previous ReplicaSet's pod template, patched in),
   and wait for that rollout too; the step then fails with both outcomes in its message.
   With no earlier release to return to (the first release), scale the Deployment to 0
   instead, so the failed model serves nothing. A rollback that fails too is an error
   naming both failures and the kubectl commands to finish by hand.

The Kubernetes calls go through ``KubernetesApi`` (the official client's ``ApiClient``,
plain JSON in and out); the tests point a real ``ApiClient`` at a local HTTP server that
replays recorded API objects (tests/data/k8s/) and authorizes every call against the
pipeline's Role, as the API server would.

Every call, and what it needs in manifests/base/pipeline-role.yaml (all in the namespace):

* GET the Deployment (read it; the rollout wait polls it): ``get`` on that name.
* PATCH it: the server-side apply of the release fields, the rollback's and the scale
  to/from zero's JSON patches: ``patch`` on that name. The apply only ever updates the
  Deployment the manifests created: the step never creates one (no ``create`` is granted,
  so an apply that would create it is refused, and the step says to apply the manifests).
* LIST ReplicaSets and Pods by label (the previous revision; the new pods' problems):
  ``list``, which RBAC cannot narrow to names (theirs are generated).
* GET the Service and the storage ConfigMap: ``get`` on those names.
"""

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEPLOYMENT_NAME = "kfp-mlops-serving"
FIELD_MANAGER = "kfp-mlops"  # server-side apply of the release fields
ROLLBACK_FIELD_MANAGER = "kfp-mlops-rollback"  # JSON patches: rollback, scale to/from zero
FETCH_CONTAINER = "fetch-model"  # the init container that fetches the release
SERVER_CONTAINER = "torchserve"
MODEL_URI_ENV = "KFP_MLOPS_MODEL_URI"
MODEL_VERSION_ENV = "KFP_MLOPS_MODEL_VERSION"  # the release id in the model store
REQUEST_LOG_ENV = "KFP_MLOPS_REQUEST_LOG_DIR"
MODEL_VERSION_LABEL = "kfp-mlops.io/model-version"
APP_VERSION_LABEL = "app.kubernetes.io/version"
RELEASE_ANNOTATION = "kfp-mlops.io/model-release"
CHANGE_CAUSE = "kubernetes.io/change-cause"
REVISION = "deployment.kubernetes.io/revision"
UNRELEASED = "unreleased"  # the base manifests' model-version: nothing released yet
# The pipeline's own bearer token for the pods' auth proxy: accepted like a client token, and its
# requests may set X-Request-Source (the smoke test's are marked as such in the request log).
TOKEN_SECRET = "kfp-mlops-serving-source-token"
TOKEN_FILE = "/var/run/secrets/kfp-mlops/serving-source-token/token"  # where the pipeline mounts that Secret
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_NAMESPACE = "kfp-mlops"
# Waiting reasons that no amount of waiting fixes (CrashLoopBackOff counts after some restarts).
HOPELESS_WAITING = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                    "CreateContainerError")


class DeployError(RuntimeError):
    """The release failed; ``report`` holds what was done (JSON-serialisable)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


class ReleaseRolledBack(DeployError):
    """The new release failed and the previous one serves again (or, first release, nothing serves)."""


class RollbackFailed(DeployError):
    """The new release failed and so did the way back: the message names both; act by hand."""


# ---------------------------------------------------------------- rendering


def label_value(text: str) -> str:
    """``text`` as a valid label value: [A-Za-z0-9._-], alphanumeric at both ends, at most 63 characters."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))[:63]
    value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)
    return value or "unknown"


@dataclass(frozen=True)
class Release:
    """One model release: what the pods fetch and how the revision is labelled."""

    model_name: str
    model_version: str  # the model's own version (finetune: a hash of its weights)
    release_id: str  # the version id ``components.core.storage.publish`` returned (sha256 of the manifest)
    model_uri: str  # the model store (``base_uri`` of the release)
    image: str = ""  # set every container's image; "" keeps what the Deployment runs (overlays differ: CPU/CUDA)
    run_id: str = ""  # the pipeline run that released it, for the change-cause

    def change_cause(self) -> str:
        cause = f"model {self.model_name} v{self.model_version} (release {self.release_id[:12]})"
        cause += f" from run {self.run_id}" if self.run_id else ""
        return cause + (f", image {self.image}" if self.image else "")


def _find(items: list[dict], name: str, what: str) -> dict:
    for item in items:
        if item.get("name") == name:
            return item
    raise DeployError(f"{what} {name!r} not found (have: {[i.get('name') for i in items]}); "
                      "the serving Deployment does not look like manifests/base/serving-deployment.yaml")


def render_release(deployment: dict, release: Release) -> dict:
    """The server-side-apply configuration that makes ``deployment`` serve ``release``.

    ``deployment`` is the serving Deployment as ``kubectl kustomize manifests/...`` renders
    it or as the cluster returns it; only its names and selector are used. The result holds
    the release fields alone, so applying it with field manager ``kfp-mlops`` leaves every
    other field (resources, GPU placement, security, replicas: the HPA's) to its owner.
    """
    meta, spec = deployment["metadata"], deployment["spec"]
    pod = spec["template"]["spec"]
    init_names = [c["name"] for c in pod.get("initContainers", [])]
    _find(pod.get("initContainers", []), FETCH_CONTAINER, "init container")
    version = label_value(release.model_version)
    labels = {MODEL_VERSION_LABEL: version, APP_VERSION_LABEL: version}

    def container(name: str) -> dict:
        return {"name": name, "image": release.image} if release.image else {"name": name}

    fetch = container(FETCH_CONTAINER)
    fetch["env"] = [{"name": MODEL_URI_ENV, "value": release.model_uri},
                    {"name": MODEL_VERSION_ENV, "value": release.release_id}]
    init_containers = [fetch if name == FETCH_CONTAINER else container(name)
                       for name in init_names if name == FETCH_CONTAINER or release.image]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": {CHANGE_CAUSE: release.change_cause()},
        },
        "spec": {
            "selector": copy.deepcopy(spec["selector"]),  # immutable; the same values, so no conflict
            "template": {
                "metadata": {"labels": labels, "annotations": {RELEASE_ANNOTATION: release.release_id}},
                "spec": {"initContainers": init_containers,
                         "containers": [container(c["name"]) for c in pod["containers"]]},
            },
        },
    }


def _pointer(*parts: str) -> str:
    """A JSON pointer (RFC 6901) from raw keys: '/' in label names becomes '~1'."""
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def rollback_patch(previous: dict, failed: Release, reason: str) -> list[dict]:
    """JSON patch that restores ``previous`` (a ReplicaSet)'s pod template, as ``kubectl rollout undo`` does.

    The first operation is a test: the Deployment must still run the failed release, so a
    newer release someone made meanwhile is never rolled back over (the API refuses the patch).
    """
    template = copy.deepcopy(previous["spec"]["template"])
    template["metadata"].get("labels", {}).pop("pod-template-hash", None)  # the controller's, not ours
    labels = template["metadata"].get("labels", {})
    annotations = previous["metadata"].get("annotations", {})
    back_to = f"revision {annotations.get(REVISION, '?')}: {annotations.get(CHANGE_CAUSE, 'no change-cause')}"
    ops = [
        {"op": "test", "path": _pointer("spec", "template", "metadata", "annotations", RELEASE_ANNOTATION),
         "value": failed.release_id},
        {"op": "replace", "path": "/spec/template", "value": template},
        {"op": "add", "path": _pointer("metadata", "annotations", CHANGE_CAUSE),
         "value": f"rollback to {back_to} (release of model v{failed.model_version} failed: {reason})"[:1000]},
    ]
    for label in (MODEL_VERSION_LABEL, APP_VERSION_LABEL):
        if label in labels:
            ops.append({"op": "add", "path": _pointer("metadata", "labels", label), "value": labels[label]})
    return ops


def scale_to_zero_patch(failed: Release, reason: str) -> list[dict]:
    """JSON patch for a failed first release: no pods, so the failed model serves nothing.

    The HPA leaves a Deployment at 0 replicas alone (scaling is disabled at zero) until
    the next release scales it back up (``scale_up_patch``).
    """
    return [
        {"op": "test", "path": _pointer("spec", "template", "metadata", "annotations", RELEASE_ANNOTATION),
         "value": failed.release_id},
        {"op": "add", "path": "/spec/replicas", "value": 0},
        {"op": "add", "path": _pointer("metadata", "annotations", CHANGE_CAUSE),
         "value": f"{failed.change_cause()} FAILED: {reason}; scaled to 0 (no earlier release to roll back to)"[:1000]},
    ]


def scale_up_patch(replicas: int) -> list[dict]:
    return [{"op": "test", "path": "/spec/replicas", "value": 0}, {"op": "add", "path": "/spec/replicas", "value": replicas}]


# ---------------------------------------------------------------- the Kubernetes API


class KubernetesApi:
    """The few calls the deploy step makes, through the official client's ``ApiClient`` (JSON dicts in and out).

    Raises ``kubernetes.client.exceptions.ApiException`` for every non-2xx answer.
    """

    def __init__(self, api_client=None):
        from kubernetes import client

        self.client = api_client or client.ApiClient()

    @classmethod
    def from_environment(cls) -> "KubernetesApi":
        """In a pod: its service account; elsewhere: the current kubeconfig context."""
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except (config.ConfigException, OSError) as err:
                raise DeployError(f"no Kubernetes credentials: not in a pod with a service account token, and no "
                                  f"usable kubeconfig ({err}). Run the step in the cluster (service account "
                                  "kfp-mlops-pipeline) or set KUBECONFIG.") from None
        return cls()

    def _call(self, method: str, path: str, query: list[tuple[str, str]] | None = None, body: Any = None,
              content_type: str = "application/json") -> dict:
        return self.client.call_api(
            path, method, {}, query or [], {"Accept": "application/json", "Content-Type": content_type},
            body=body, response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
            _preload_content=True, _request_timeout=30,
        )

    def get_deployment(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")

    def apply_deployment(self, namespace: str, name: str, body: dict) -> dict:
        return self._call("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                          [("fieldManager", FIELD_MANAGER), ("force", "true")], body, "application/apply-patch+yaml")

    def json_patch_deployment(self, namespace: str, name: str, ops: list[dict]) -> dict:
        return self._call("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                          [("fieldManager", ROLLBACK_FIELD_MANAGER)], ops, "application/json-patch+json")

    def list_replicasets(self, namespace: str, selector: str) -> list[dict]:
        return self._call("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets",
                          [("labelSelector", selector)])["items"]

    def list_pods(self, namespace: str, selector: str) -> list[dict]:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/pods", [("labelSelector", selector)])["items"]

    def get_service(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/services/{name}")

    def get_configmap(self, namespace: str, name: str) -> dict:
        return self._call("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")


def api_error(err: Exception) -> str:
    """One line from an ApiException: HTTP status and the API server's own message."""
    status = getattr(err, "status", None)
    body = getattr(err, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (ValueError, AttributeError):
        message = None
    text = message or (body.decode(errors="replace") if isinstance(body, bytes) else body) or getattr(err, "reason", "") or str(err)
    return f"HTTP {status}: {str(text).strip()[:500]}" if status else str(text).strip()[:500]


def _api_exception_type():
    from kubernetes.client.exceptions import ApiException

    return ApiException


# ---------------------------------------------------------------- rollout decisions


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(deployment: dict, generation: int) -> RolloutState:
    """Where the rollout of ``generation`` stands, by the rules of ``kubectl rollout status``."""
    status, spec = deployment.get("status", {}), deployment["spec"]
    if status.get("observedGeneration", 0) < generation:
        return RolloutState(False, False, f"waiting for the controller to see generation {generation}")
    progressing = next((c for c in status.get("conditions", []) if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return RolloutState(False, True, f"ProgressDeadlineExceeded: {progressing.get('message', '')}")
    want = spec.get("replicas", 1)
    updated, total = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < want:
        return RolloutState(False, False, f"{updated} of {want} new replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{total - updated} old replicas pending termination")
    if available < updated:
        return RolloutState(False, False, f"{available} of {updated} updated replicas available")
    return RolloutState(True, False, f"{available} of {want} replicas available")


def pod_problems(pods: list[dict], crashloop_restarts: int = 3) -> list[str]:
    """Why pods of a rollout will not become ready however long one waits (empty: keep waiting)."""
    problems = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status", {})
        kinds = [("init container", s) for s in status.get("initContainerStatuses", [])]
        kinds += [("container", s) for s in status.get("containerStatuses", [])]
        for kind, cs in kinds:
            waiting = cs.get("state", {}).get("waiting") or {}
            reason, restarts = waiting.get("reason", ""), cs.get("restartCount", 0)
            hopeless = reason in HOPELESS_WAITING or (reason == "CrashLoopBackOff" and restarts >= crashloop_restarts)
            if not hopeless:
                continue
            last = (cs.get("lastState") or {}).get("terminated") or {}
            detail = waiting.get("message") or ""
            if last:
                detail = f"last exit {last.get('exitCode')} ({last.get('reason', '')}): {last.get('message', '').strip()}"
            problems.append(f"pod {name}: {kind} {cs['name']} {reason} after {restarts} restarts; {detail}"[:600])
    return problems


def _selector(match_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def wait_for_rollout(api: KubernetesApi, namespace: str, name: str, generation: int, pod_selector: str | None,
                     timeout_s: float, poll_s: float, crashloop_restarts: int = 3,
                     sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> dict:
    """Poll until the rollout of ``generation`` is complete, has failed, or ``timeout_s`` passed.

    Returns ``{"ok", "message", "seconds", "polls", "revision"}``. API errors while
    polling are retried until the timeout (the API server may blink during a rollout).
    """
    ApiException = _api_exception_type()
    start, polls, last_message = clock(), 0, None
    while True:
        polls += 1
        try:
            deployment = api.get_deployment(namespace, name)
            state = rollout_state(deployment, generation)
            if not state.done and not state.failed and pod_selector:
                problems = pod_problems(api.list_pods(namespace, pod_selector), crashloop_restarts)
                if problems:
                    state = RolloutState(False, True, "; ".join(problems[:3]))
        except ApiException as err:
            deployment, state = None, RolloutState(False, False, f"API error while watching: {api_error(err)}")
        elapsed = clock() - start
        if state.message != last_message:
            print(f"[deploy] rollout of generation {generation}: {state.message}", flush=True)
            last_message = state.message
        if state.done or state.failed:
            revision = (deployment or {}).get("metadata", {}).get("annotations", {}).get(REVISION)
            return {"ok": state.done, "message": state.message, "seconds": round(elapsed, 1), "polls": polls,
                    "revision": revision}
        if elapsed >= timeout_s:
            return {"ok": False, "message": f"timed out after {timeout_s:.0f} s ({state.message})",
                    "seconds": round(elapsed, 1), "polls": polls, "revision": None}
        sleep(poll_s)


def previous_release(replicasets: list[dict], deployment: dict) -> dict | None:
    """The ReplicaSet of the revision serving now, if it holds a real release (else None: first release)."""
    revision = deployment["metadata"].get("annotations", {}).get(REVISION)
    uid = deployment["metadata"].get("uid")
    for rs in replicasets:
        owners = {o.get("uid") for o in rs["metadata"].get("ownerReferences", []) if o.get("kind") == "Deployment"}
        if uid and uid not in owners:
            continue  # same labels, another owner: not ours
        if revision is not None and rs["metadata"].get("annotations", {}).get(REVISION) == revision:
            labels = rs["spec"]["template"]["metadata"].get("labels", {})
            return None if labels.get(MODEL_VERSION_LABEL, UNRELEASED) == UNRELEASED else rs
    return None


# ---------------------------------------------------------------- the deploy step


def read_bearer_token(token_file: str | Path) -> str:
    """The first token in a file mounted from the Secret kfp-mlops-serving-source-token (one per line)."""
    path = Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"no serving token at {path}: mount the Secret {TOKEN_SECRET} there (the pipeline does it for the "
            f"deploy and monitor steps), created with: kubectl -n <namespace> create secret generic {TOKEN_SECRET} "
            "--from-literal=token=\"$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\" "
            "(docs/cluster.md)")
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"the serving token file {path} is empty: put a token in the Secret {TOKEN_SECRET}")
    return tokens[0]


def default_namespace() -> str:
    """The pod's own namespace when running in the cluster, else kfp-mlops."""
    path = Path(IN_CLUSTER_NAMESPACE_FILE)
    return path.read_text().strip() if path.is_file() else DEFAULT_NAMESPACE


def _not_installed(namespace: str, name: str, what: str) -> str:
    return (f"Deployment {namespace}/{name} {what}: apply the manifests first (kubectl apply -k "
            f"manifests/overlays/<env>, after creating the Secrets docs/cluster.md lists); the deploy step only "
            "releases models into that Deployment and may not create one")


def _refused_create(err: Exception) -> bool:
    """A 403 for ``create``: a server-side apply found no object to update, and the Role grants no create."""
    status = getattr(err, "status", None)
    return status == 403 and "cannot create resource" in api_error(err)


def _env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def _served_model(server: dict) -> tuple[str, str]:
    """(model name, .mar file) from the server's ``--models NAME=FILE.mar`` argument."""
    args = server.get("command", []) + server.get("args", [])
    if "--models" not in args or args.index("--models") + 1 >= len(args):
        raise DeployError("the torchserve container has no '--models NAME=FILE.mar' argument; cannot tell what it loads")
    name, _, mar = args[args.index("--models") + 1].partition("=")
    return name, mar


def _request_log_dir(api: KubernetesApi, namespace: str, server: dict) -> str:
    """Where the serving pods log requests: the server's env, or a ConfigMap it takes env from."""
    value = _env_value(server, REQUEST_LOG_ENV)
    if value:
        return value
    ApiException = _api_exception_type()
    for source in server.get("envFrom", []):
        ref = source.get("configMapRef")
        if not ref:
            continue
        try:
            data = api.get_configmap(namespace, ref["name"]).get("data", {})
        except ApiException as err:
            print(f"[deploy] cannot read ConfigMap {ref['name']} ({api_error(err)}); request_log_dir unknown", flush=True)
            continue
        if data.get(REQUEST_LOG_ENV):
            return data[REQUEST_LOG_ENV]
    return ""


def _service_endpoint(service: dict, model_name: str) -> str:
    ports = service["spec"]["ports"]
    port = next((p for p in ports if p.get("name") == "http-inference"), ports[0])["port"]
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}/predictions/{model_name}"


def deploy_kubernetes(
    model_dir: str | Path,
    dataset_dir: str | Path,
    *,
    namespace: str = "",
    deployment_name: str = DEPLOYMENT_NAME,
    service_name: str = DEPLOYMENT_NAME,
    model_name: str = "digits",
    model_store_uri: str = "",
    image: str = "",
    token_file: str | Path = TOKEN_FILE,
    run_id: str = "",
    rollout_timeout_s: float = 900,
    poll_s: float = 5.0,
    smoke_images: int = 16,
    min_smoke_accuracy: float = 0.5,
    crashloop_restarts: int = 3,
    scale_up_replicas: int = 1,
    workers: int | None = None,
    batch_size: int | None = None,
    max_batch_delay_ms: int | None = None,
    work_dir: str | Path | None = None,
    api: KubernetesApi | None = None,
    publish: Callable[[Path, str], dict] | None = None,
    build_archive: Callable[..., Path] | None = None,
    send: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Release ``model_dir`` to the serving Deployment; roll back when the rollout or smoke test fails.

    ``namespace`` "" = the pod's own; ``model_store_uri`` "" = where the Deployment's init
    container fetches from now; ``image`` "" = keep the images. ``api``, ``publish``
    (``components.core.storage.publish``), ``build_archive`` (``serving.archive.build_mar``) and
    ``send`` (``serving.client.predict``) are injectable for tests. ``workers``, ``batch_size``
    and ``max_batch_delay_ms`` (None = ``serving.archive``'s defaults) go into the .mar's model
    config, which the pods' TorchServe reads when it loads the model (it wins over the ConfigMap).

    Returns the deployment record (endpoint, token_file and source_token_file: both the
    pipeline's source token, request_log_dir, model_version, release_id, revision, ...). Raises ``ReleaseRolledBack`` (previous version serving
    again, or scaled to 0 on a first release) or ``RollbackFailed``; ``DeployError`` when
    it fails before anything changed on the cluster.
    """
    import tempfile

    from components.core.data import load_splits
    from components.core.models import METADATA_FILE
    from serving.client import smoke_test

    ApiException = _api_exception_type()
    sleep, clock = sleep or time.sleep, clock or time.monotonic
    # 1. Inputs first: nothing is published or changed when they are wrong.
    metadata_file = Path(model_dir) / METADATA_FILE
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model artifact: {METADATA_FILE} is missing (run finetune first)")
    metadata = json.loads(metadata_file.read_text())
    model_version = str(metadata.get("model_version") or "1.0")
    splits = load_splits(dataset_dir)
    if len(splits.test_y) == 0:
        raise ValueError(f"dataset {dataset_dir} has an empty test split: nothing to smoke-test the endpoint with")
    token = read_bearer_token(token_file)
    namespace = namespace or default_namespace()
    api = api or KubernetesApi.from_environment()

    try:
        live = api.get_deployment(namespace, deployment_name)
    except ApiException as err:
        if err.status == 404:
            raise DeployError(_not_installed(namespace, deployment_name, "not found")) from None
        raise DeployError(f"cannot read Deployment {namespace}/{deployment_name}: {api_error(err)}") from None
    pod = live["spec"]["template"]["spec"]
    fetch = _find(pod.get("initContainers", []), FETCH_CONTAINER, "init container")
    server = _find(pod["containers"], SERVER_CONTAINER, "container")
    served_name, mar_file = _served_model(server)
    if served_name != model_name:
        raise DeployError(f"the Deployment serves model {served_name!r} (--models {served_name}={mar_file}), "
                          f"not {model_name!r}: set model_name to {served_name!r} or change the manifests")
    model_store_uri = model_store_uri or _env_value(fetch, MODEL_URI_ENV) or ""
    if not model_store_uri:
        raise DeployError(f"no model store: pass model_store_uri or set {MODEL_URI_ENV} on the init container")
    selector = _selector(live["spec"]["selector"]["matchLabels"])
    try:
        previous = previous_release(api.list_replicasets(namespace, selector), live)
        service = api.get_service(namespace, service_name)
    except ApiException as err:
        raise DeployError(f"cannot read the serving objects in {namespace}: {api_error(err)}") from None
    endpoint = _service_endpoint(service, model_name)
    request_log_dir = _request_log_dir(api, namespace, server)

    # 2. Archive and publish: the pods fetch exactly these bytes, by their id.
    from serving import archive

    if build_archive is None:
        build_archive = archive.build_mar
    model_config = {
        "workers": archive.DEFAULT_WORKERS if workers is None else workers,
        "batch_size": archive.DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
        "max_batch_delay_ms": archive.DEFAULT_MAX_BATCH_DELAY_MS if max_batch_delay_ms is None else max_batch_delay_ms,
    }
    archive.model_config_yaml(**model_config)  # bad values fail here, before anything is published
    if publish is None:
        from components.core.storage import publish
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        release_dir = Path(tmp) / "release"
        mar = build_archive(model_dir, release_dir, model_name, model_version, **model_config)
        if Path(mar).name != mar_file:
            raise DeployError(f"the archive is {Path(mar).name} but the Deployment loads {mar_file}")
        manifest = publish(release_dir, model_store_uri)
    release = Release(model_name, model_version, manifest["version"], model_store_uri, image, run_id)
    print(f"[deploy] published {mar_file} of model v{model_version} to {model_store_uri} as release "
          f"{release.release_id[:12]}", flush=True)

    report: dict[str, Any] = {
        "namespace": namespace, "deployment": deployment_name, "model_version": model_version,
        "release_id": release.release_id, "model_uri": model_store_uri, "model_config": model_config,
        "previous_revision": live["metadata"].get("annotations", {}).get(REVISION),
        "previous_model_version": (previous or {}).get("spec", {}).get("template", {}).get("metadata", {})
                                  .get("labels", {}).get(MODEL_VERSION_LABEL),
    }

    # 3-4. Apply the release fields; wake a Deployment a failed first release left at zero.
    try:
        applied = api.apply_deployment(namespace, deployment_name, render_release(live, release))
        if applied["spec"].get("replicas") == 0:
            print(f"[deploy] the Deployment is at 0 replicas (a failed first release?): scaling to "
                  f"{scale_up_replicas}; the HPA takes over from there", flush=True)
            applied = api.json_patch_deployment(namespace, deployment_name, scale_up_patch(scale_up_replicas))
    except ApiException as err:
        if _refused_create(err):
            raise DeployError(_not_installed(namespace, deployment_name, "is gone (deleted after it was read)"),
                              report) from None
        raise DeployError(f"server-side apply of release {release.release_id[:12]} to {namespace}/{deployment_name} "
                          f"was refused, so nothing changed: {api_error(err)}", report) from None
    generation = applied["metadata"]["generation"]
    print(f"[deploy] applied: {release.change_cause()} (generation {generation})", flush=True)
    version_selector = f"{selector},{MODEL_VERSION_LABEL}={label_value(model_version)}"
    rollout = wait_for_rollout(api, namespace, deployment_name, generation, version_selector, rollout_timeout_s,
                               poll_s, crashloop_restarts, sleep, clock)
    report["rollout"] = rollout

    # 5. Smoke test through the Service: the new version must answer.
    failure = None
    if not rollout["ok"]:
        failure = f"rollout failed: {rollout['message']}"
    else:
        smoke = _smoke(smoke_test, endpoint, token, splits, smoke_images, min_smoke_accuracy, model_version, send,
                       sleep, poll_s)
        report["smoke_test"] = smoke
        if smoke["failed"]:
            failure = f"smoke test through {endpoint} failed: {smoke['summary']}"
    if failure is None:
        n = report["smoke_test"]["images"]
        print(f"[deploy] released model v{model_version} as revision {rollout['revision']}: smoke test accuracy "
              f"{report['smoke_test']['accuracy']:.2f} on {n} images", flush=True)
        # The pipeline holds only its source token here: the monitor's replay uses it too.
        return {
            "target": "kubernetes", "endpoint": endpoint, "token_file": str(token_file),
            "source_token_file": str(token_file), "request_log_dir": request_log_dir, "model_name": model_name,
            **report,
            "revision": rollout["revision"], "rollout_seconds": rollout["seconds"],
            "smoke_test_images": n, "smoke_test_accuracy": report["smoke_test"]["accuracy"],
            "smoke_test_latency_ms_mean": report["smoke_test"]["latency_ms_mean"],
        }

    # 6. Back to what served before.
    print(f"[deploy] release of model v{model_version} FAILED: {failure}", flush=True)
    report["failure"] = failure
    undo = (f"kubectl -n {namespace} rollout undo deployment/{deployment_name}"
            + (f" --to-revision={report['previous_revision']}" if previous is not None else ""))
    if previous is None:
        try:
            api.json_patch_deployment(namespace, deployment_name, scale_to_zero_patch(release, failure))
        except ApiException as err:
            report["recovery"] = {"action": "scale to 0", "ok": False, "message": api_error(err)}
            raise RollbackFailed(
                f"first release of model v{model_version} failed ({failure}), and scaling {namespace}/{deployment_name} "
                f"to 0 failed too ({api_error(err)}). Pods of the failed release may be serving: scale it down by hand "
                f"(kubectl -n {namespace} scale deployment/{deployment_name} --replicas=0)", report) from None
        report["recovery"] = {"action": "scale to 0", "ok": True}
        raise ReleaseRolledBack(
            f"first release of model v{model_version} failed: {failure}. There is no earlier release to roll back to, "
            f"so {namespace}/{deployment_name} was scaled to 0 replicas: the failed model serves nothing. Fix the cause "
            "and run the pipeline again (its deploy step scales the Deployment back up).", report)

    back = report["previous_model_version"]
    try:
        patched = api.json_patch_deployment(namespace, deployment_name, rollback_patch(previous, release, failure))
    except ApiException as err:
        report["recovery"] = {"action": "rollback", "ok": False, "message": api_error(err)}
        raise RollbackFailed(
            f"release of model v{model_version} failed ({failure}), and the rollback to revision "
            f"{report['previous_revision']} (model v{back}) failed too: {api_error(err)}. Roll back by hand: {undo}; "
            f"then watch: kubectl -n {namespace} rollout status deployment/{deployment_name}", report) from None
    undo_rollout = wait_for_rollout(api, namespace, deployment_name, patched["metadata"]["generation"], None,
                                    rollout_timeout_s, poll_s, crashloop_restarts, sleep, clock)
    recovery: dict[str, Any] = {"action": "rollback", "to_revision": report["previous_revision"], "rollout": undo_rollout}
    report["recovery"] = recovery
    if undo_rollout["ok"]:
        smoke = _smoke(smoke_test, endpoint, token, splits, smoke_images, min_smoke_accuracy, None, send, sleep, poll_s)
        recovery["smoke_test"] = smoke
        recovery["ok"] = not smoke["failed"]
        outcome = "smoke test passed" if recovery["ok"] else f"but its smoke test failed: {smoke['summary']}"
    else:
        recovery["ok"] = False
        outcome = f"but its rollout failed: {undo_rollout['message']}"
    if not recovery["ok"]:
        raise RollbackFailed(
            f"release of model v{model_version} failed ({failure}); rolled back to revision {report['previous_revision']} "
            f"(model v{back}) {outcome}. Check: kubectl -n {namespace} rollout history deployment/{deployment_name}; "
            f"kubectl -n {namespace} get pods -l {selector}", report)
    raise ReleaseRolledBack(
        f"release of model v{model_version} failed: {failure}. Rolled back to revision {report['previous_revision']} "
        f"(model v{back}), now revision {undo_rollout['revision']}: rollout complete in {undo_rollout['seconds']} s, "
        f"{outcome}.", report)


def _smoke(smoke_test, endpoint, token, splits, smoke_images, min_accuracy, model_version, send, sleep, poll_s) -> dict:
    """Smoke test through the Service; a second try after ``poll_s`` (endpoints may lag the rollout by a moment)."""
    n = min(smoke_images, len(splits.test_y))
    for attempt in (1, 2):
        result = smoke_test(endpoint, None, splits.test_x[:n], splits.test_y[:n], splits.class_names,
                            model_version=model_version, token=token, send=send)
        failed = bool(result["problems"]) or result["answered"] < n or result["accuracy"] < min_accuracy
        result.update({"failed": failed, "attempts": attempt, "summary": (
            f"{result['answered']}/{n} answered, accuracy {result['accuracy']:.2f} (need {min_accuracy:.2f})"
            + (f"; {'; '.join(result['problems'][:3])}" if result["problems"] else ""))})
        if not failed:
            return result
        if attempt == 1:
            print(f"[deploy] smoke test: {result['summary']}; trying once more", flush=True)
            sleep(poll_s)
    return result
