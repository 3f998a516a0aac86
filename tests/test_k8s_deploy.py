"""Deploy step on Kubernetes (components/deploy/kubernetes.py), without a cluster.

The rendering is checked against the kustomize output of every overlay, with
``kubernetes-validate --strict`` like the manifests policy. The rollout and rollback
decisions run against a fake API server on loopback that speaks to the real
``kubernetes`` client (so ApiExceptions, content types and query parameters are real)
and replays API objects in tests/data/k8s/: Deployments, ReplicaSets, Pods, a Service,
a ConfigMap, the status sequence of each rollout and error Status bodies. They were
written in the exact shape the API server returns for these manifests (server
defaults, managedFields, controller annotations, conditions) and are themselves
checked against the Kubernetes schemas below; no cluster was available to capture
them from. Between the recorded objects the fake does what the API server and the
Deployment controller would: authorize every call with RBAC against the Roles the
rendered manifests bind to the pipeline's ServiceAccount (403 in the API server's words
when they do not allow it), merge a server-side apply, apply a JSON patch (with its test
operations), bump the generation, and create or reuse ReplicaSets with revision numbers
and change-causes.
"""

import copy
import hashlib
import io
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import yaml
from conftest import settings_of
from kfp.dsl import Artifact, Dataset, Metrics, Model
from PIL import Image

from components.core.data import Splits, save_splits
from components.deploy import kubernetes as k8s_deploy
from components.deploy.kubernetes import (
    DeployError,
    KubernetesApi,
    Release,
    ReleaseRolledBack,
    RollbackFailed,
    deploy_kubernetes,
    label_value,
    pod_problems,
    render_release,
    rollout_state,
)
from pipelines.config import ServingConfig

try:  # tests/ is on sys.path under pytest's default import mode
    from test_manifests import KUBERNETES_VERSIONS, TARGETS, find, render
except ImportError:  # tests/ made a package
    from tests.test_manifests import KUBERNETES_VERSIONS, TARGETS, find, render

DATA = Path(__file__).parent / "data" / "k8s"
ROOT = Path(__file__).resolve().parent.parent
NS, NAME = "kfp-mlops", "kfp-mlops-serving"
NEW_VERSION = "c0ffee123456"  # the model released in these tests (the recorded pods carry it)
NEW_RELEASE = "7a1f3c5e9b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"
OLD_VERSION = "5e1f0c2a9b7d"  # what deployment-serving.json serves (revision 4)
STORE = "s3://kfp-mlops/models/digits"
TOKEN = "client-token-for-the-smoke-test-0123"
ENDPOINT = f"http://{NAME}.{NS}.svc.cluster.local:8080/predictions/digits"
CLASS_NAMES = [str(i) for i in range(10)]
PIPELINE_ACCOUNT = "kfp-mlops-pipeline"
BEARER = "Bearer service-account-token"  # the pipeline's token, as the fake API server authenticates it


def load(name: str):
    return json.loads((DATA / name).read_text())


# ---------------------------------------------------------------- what the API server does between recordings

def ssa_merge(live: dict, config: dict) -> dict:
    """Server-side apply of a partial configuration: maps merge, lists of named items merge by name
    (containers, env, ...: their merge key), everything else is replaced. Fields not in the
    configuration keep their values (they belong to other field managers)."""
    out = copy.deepcopy(live)

    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            elif (isinstance(value, list) and isinstance(dst.get(key), list)
                  and all(isinstance(i, dict) and "name" in i for i in value + dst[key])):
                for item in value:
                    match = next((d for d in dst[key] if d["name"] == item["name"]), None)
                    if match is None:
                        dst[key].append(copy.deepcopy(item))
                    else:
                        merge(match, item)
            else:
                dst[key] = copy.deepcopy(value)

    merge(out, config)
    return out


class PatchTestFailed(Exception):
    pass


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 on objects (the operations the deploy step sends: test, add, replace)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            if part not in parent:
                raise PatchTestFailed(f"path {op['path']} does not exist")
            parent = parent[part]
        key = parts[-1]
        if op["op"] == "test":
            if parent.get(key) != op["value"]:
                raise PatchTestFailed(f"test of {op['path']} failed: {parent.get(key)!r} != {op['value']!r}")
        elif op["op"] == "replace" and key not in parent:
            raise PatchTestFailed(f"replace of missing {op['path']}")
        elif op["op"] in ("add", "replace"):
            parent[key] = copy.deepcopy(op["value"])
        else:
            raise PatchTestFailed(f"unsupported op {op['op']}")
    return doc


def _without_hash(template: dict) -> dict:
    template = copy.deepcopy(template)
    template["metadata"].get("labels", {}).pop("pod-template-hash", None)
    return template


# ---------------------------------------------------------------- RBAC, as the API server applies it

@dataclass(frozen=True)
class Attributes:
    """What RBAC authorizes: the request's verb, API group, resource and object name ("" = none)."""

    verb: str
    group: str
    resource: str
    name: str


def request_attributes(method: str, path: str, query: dict[str, str]) -> Attributes:
    """The API server's request info for a namespaced resource path (its verb and name rules)."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces", f"not a namespaced resource path: {path}"
    resource, name = rest[2], rest[3] if len(rest) > 3 else ""
    if method == "GET" and not name:
        verb = "watch" if query.get("watch") in ("true", "1") else "list"
        # A list or watch names one object only through a field selector on metadata.name.
        selector = query.get("fieldSelector", "")
        if "," not in selector and selector.startswith(("metadata.name=", "metadata.name==")):
            name = selector.split("=")[-1]
    else:
        verb = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create",
                "DELETE": "delete" if name else "deletecollection"}[method]
    return Attributes(verb, group, resource, name)


def rbac_allows(rules: list[dict], a: Attributes) -> bool:
    """Kubernetes RBAC: some rule covers the group, resource and verb, and names the object if it lists names."""
    return any((a.group in rule["apiGroups"] or "*" in rule["apiGroups"])
               and (a.resource in rule["resources"] or "*" in rule["resources"])
               and (a.verb in rule["verbs"] or "*" in rule["verbs"])
               and (not rule.get("resourceNames") or a.name in rule["resourceNames"])
               for rule in rules)


def bound_rules(account: str = PIPELINE_ACCOUNT, target: str = "base", role: str | None = None) -> list[dict]:
    """The rules of the Roles that ``target``'s RoleBindings grant ``account`` (only ``role``'s if given)."""
    objects = render(target)
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    rules = []
    for binding in objects:
        if (binding["kind"] == "RoleBinding" and binding["roleRef"]["kind"] == "Role"
                and role in (None, binding["roleRef"]["name"])
                and {"kind": "ServiceAccount", "name": account, "namespace": NS} in binding["subjects"]):
            rules += roles[binding["roleRef"]["name"]]["rules"]
    return rules


def forbidden(a: Attributes, user: str) -> dict:
    """The Status the API server answers when RBAC denies ``a`` (the wording of status-403-*.json)."""
    qualified = f"{a.resource}.{a.group}" if a.group else a.resource
    subject = f'{qualified} "{a.name}"' if a.name else qualified
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f'{subject} is forbidden: User "{user}" cannot {a.verb} resource "{a.resource}" in API group '
                       f'"{a.group}" in the namespace "{NS}"',
            "reason": "Forbidden", "details": {"name": a.name, "group": a.group, "kind": a.resource}, "code": 403}


class FakeCluster:
    """State of one namespace as the API server holds it, plus the Deployment controller's bookkeeping."""

    def __init__(self, deployment: str, replicasets: str, statuses: dict[int, str], pods: str | None = None):
        self.deployment = load(deployment)
        self.replicasets = load(replicasets)["items"]
        self.scripts = {gen: load(name) for gen, name in statuses.items()}  # generation -> status sequence
        self.pods = load(pods)["items"] if pods else []
        self.service, self.configmap = load("service-serving.json"), load("configmap-storage.json")
        self.requests: list[dict] = []
        self.errors: list[tuple] = []  # (predicate(request) -> bool, Status file)
        self.rules = bound_rules()  # what the pipeline's ServiceAccount may do here
        self.authorized: list[Attributes] = []
        self.reads_before_deletion: int | None = None  # the Deployment is deleted after this many GETs
        self.lock = threading.Lock()

    def authorize(self, a: Attributes, authorization: str) -> dict | None:
        """None when RBAC allows ``a`` for the pipeline's token, else the 403 Status."""
        if authorization != BEARER:
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
        if not rbac_allows(self.rules, a):
            return forbidden(a, f"system:serviceaccount:{NS}:{PIPELINE_ACCOUNT}")
        self.authorized.append(a)
        return None

    # -- the Deployment controller, reduced to what the deploy step can observe
    def _changed(self, before: dict, after: dict) -> dict:
        if after["spec"] != before["spec"]:
            after["metadata"]["generation"] += 1
        if _without_hash(after["spec"]["template"]) != _without_hash(before["spec"]["template"]):
            template = _without_hash(after["spec"]["template"])
            revision = 1 + max(int(rs["metadata"]["annotations"][k8s_deploy.REVISION]) for rs in self.replicasets)
            match = next((rs for rs in self.replicasets if _without_hash(rs["spec"]["template"]) == template), None)
            if match is None:  # a new ReplicaSet for a new template
                pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:9]
                match = {"metadata": {"name": f"{NAME}-{pod_hash}", "namespace": NS, "annotations": {},
                                      "labels": {**template["metadata"]["labels"], "pod-template-hash": pod_hash},
                                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME,
                                                           "uid": after["metadata"]["uid"], "controller": True}]},
                         "spec": {"replicas": 0, "template": copy.deepcopy(after["spec"]["template"])}}
                match["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] = pod_hash
                self.replicasets.append(match)
            match["metadata"]["annotations"][k8s_deploy.REVISION] = str(revision)  # a reused one moves to the top
            after["metadata"]["annotations"][k8s_deploy.REVISION] = str(revision)
        current = after["metadata"]["annotations"][k8s_deploy.REVISION]
        for rs in self.replicasets:  # the controller copies the change-cause to the current ReplicaSet
            if rs["metadata"]["annotations"].get(k8s_deploy.REVISION) == current:
                rs["metadata"]["annotations"][k8s_deploy.CHANGE_CAUSE] = after["metadata"]["annotations"][k8s_deploy.CHANGE_CAUSE]
        return after

    def serving_version(self) -> str:
        return self.deployment["spec"]["template"]["metadata"]["labels"][k8s_deploy.MODEL_VERSION_LABEL]

    def history(self) -> list[tuple[int, str]]:
        """What `kubectl rollout history` lists: (revision, change-cause), oldest first."""
        return sorted((int(rs["metadata"]["annotations"][k8s_deploy.REVISION]),
                       rs["metadata"]["annotations"].get(k8s_deploy.CHANGE_CAUSE, "<none>")) for rs in self.replicasets)

    # -- HTTP
    def handle(self, method: str, url: str, content_type: str, body: bytes, authorization: str) -> tuple[int, dict]:
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        request = {"method": method, "path": parts.path, "query": query, "content_type": content_type,
                   "body": json.loads(body) if body else None, "authorization": authorization}
        self.requests.append(request)
        attributes = request_attributes(method, parts.path, query)
        denied = self.authorize(attributes, authorization)
        if denied:
            return denied["code"], denied
        for predicate, status_file in self.errors:
            if predicate(request):
                status = load(status_file)
                return status["code"], status
        deployment_path = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
        if parts.path == deployment_path and self.deployment is None:
            if method == "PATCH" and content_type == "application/apply-patch+yaml":
                # An apply to a missing object creates it: the API server authorizes "create" too.
                denied = self.authorize(Attributes("create", "apps", "deployments", NAME), authorization)
                if denied:
                    return denied["code"], denied
                pytest.fail("the pipeline's Role let a server-side apply create the serving Deployment")
            status = load("status-404-deployment-not-found.json")
            return status["code"], status
        if parts.path == deployment_path and method == "GET":
            script = self.scripts.get(self.deployment["metadata"]["generation"])
            if script:
                self.deployment["status"] = script.pop(0) if len(script) > 1 else script[0]
            served = self.deployment
            if self.reads_before_deletion is not None:
                self.reads_before_deletion -= 1
                if self.reads_before_deletion == 0:
                    self.deployment = None  # someone deletes it right after this read
            return 200, served
        if parts.path == deployment_path and method == "PATCH":
            if content_type == "application/apply-patch+yaml":
                after = ssa_merge(self.deployment, request["body"])
            elif content_type == "application/json-patch+json":
                try:
                    after = json_patch(self.deployment, request["body"])
                except PatchTestFailed as err:
                    return 422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
                                 "reason": "Invalid", "message": str(err)}
            else:
                return 415, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 415,
                             "message": f"unsupported patch type {content_type}"}
            self.deployment = self._changed(self.deployment, after)
            return 200, self.deployment
        selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
        matches = lambda obj: selector.items() <= obj["metadata"].get("labels", {}).items()  # noqa: E731
        if parts.path == f"/apis/apps/v1/namespaces/{NS}/replicasets" and method == "GET":
            return 200, {"kind": "ReplicaSetList", "apiVersion": "apps/v1", "items": [r for r in self.replicasets if matches(r)]}
        if parts.path == f"/api/v1/namespaces/{NS}/pods" and method == "GET":
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": [p for p in self.pods if matches(p)]}
        if parts.path == f"/api/v1/namespaces/{NS}/services/{NAME}" and method == "GET":
            return 200, self.service
        if parts.path == f"/api/v1/namespaces/{NS}/configmaps/kfp-mlops-storage" and method == "GET":
            return 200, self.configmap
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound",
                     "message": f"the server could not find the requested resource ({method} {parts.path})"}


class _ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _serve(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.cluster.lock:
            status, payload = self.server.cluster.handle(self.command, self.path, self.headers.get("Content-Type", ""),
                                                         body, self.headers.get("Authorization", ""))
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = _serve


@pytest.fixture
def serve_cluster():
    """serve_cluster(FakeCluster) -> KubernetesApi whose real ApiClient talks to it over loopback."""
    from kubernetes import client

    started = []

    def start(cluster: FakeCluster) -> KubernetesApi:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _ApiHandler)  # the client's pool may open several connections
        server.daemon_threads = True
        server.cluster = cluster
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        configuration.api_key = {"authorization": BEARER}
        api_client = client.ApiClient(configuration)
        started.append((server, api_client))
        return KubernetesApi(api_client)

    yield start
    for server, api_client in started:
        api_client.close()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the step's other collaborators

@dataclass
class Inputs:
    model: Path
    dataset: Path
    token: Path


@pytest.fixture
def inputs(tmp_path) -> Inputs:
    """A model artifact (metadata only: the archive builder is a fake, except in the end-to-end test),
    eight test images whose pixel value tells their label, and the clients' token file."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "metadata.json").write_text(json.dumps({"model_version": NEW_VERSION, "class_names": CLASS_NAMES}))
    labels = np.arange(8) % 10
    images = (labels[:, None, None, None] * 20 / 255.0 * np.ones((1, 1, 8, 8))).astype(np.float32)
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=empty, val_y=np.zeros(0, np.int64),
                       test_x=images, test_y=labels.astype(np.int64), pool_x=empty, class_names=CLASS_NAMES),
                tmp_path / "dataset")
    (tmp_path / "token").write_text(TOKEN + "\n")
    return Inputs(tmp_path / "model", tmp_path / "dataset", tmp_path / "token")


class FakeService:
    """The Service in front of the serving pods: answers as the handler does, with the version that is live."""

    def __init__(self, cluster: FakeCluster, broken: tuple[str, ...] = ()):
        self.cluster, self.broken, self.calls = cluster, broken, []

    def __call__(self, endpoint, body, token, source=None, **_):
        assert endpoint == ENDPOINT and token == TOKEN and source == "smoke-test"
        version = self.cluster.serving_version()
        self.calls.append(version)
        label = int(np.asarray(Image.open(io.BytesIO(body)))[0, 0]) // 20
        if version in self.broken:
            label = (label + 1) % 10  # a model that answers, wrongly
        p = {name: (0.9 if i == label else 0.01) for i, name in enumerate(CLASS_NAMES)}
        return {"label": CLASS_NAMES[label], "class_index": label, "confidence": 0.9, "probabilities": p,
                "model_version": version}


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


BUILT: list[dict] = []  # the model-config settings each fake_build call was given


def fake_build(model_dir, release_dir, model_name, version, **settings):
    BUILT.append(settings)
    Path(release_dir).mkdir(parents=True)
    mar = Path(release_dir) / f"{model_name}.mar"
    mar.write_bytes(b"PK\x03\x04 model archive of " + version.encode())
    return mar


class FakeStore:
    def __init__(self):
        self.published = []

    def __call__(self, release_dir, uri):
        self.published.append((sorted(p.name for p in Path(release_dir).iterdir()), uri))
        return {"version": NEW_RELEASE, "uri": uri, "files": [{"path": "digits.mar"}]}


def run(api, cluster, inputs, *, broken=(), store=None, **overrides):
    store = store or FakeStore()
    service = FakeService(cluster, broken)
    time_ = FakeTime()
    kwargs = dict(namespace=NS, token_file=inputs.token, run_id="kfp-mlops-r8n2v", api=api, publish=store,
                  build_archive=fake_build, send=service, sleep=time_.sleep, clock=time_.clock, poll_s=5,
                  rollout_timeout_s=900)
    kwargs.update(overrides)
    return deploy_kubernetes(inputs.model, inputs.dataset, **kwargs), service, store


def patches(cluster: FakeCluster, content_type: str) -> list[dict]:
    return [r["body"] for r in cluster.requests if r["method"] == "PATCH" and r["content_type"] == content_type]


def validate_strict(obj: dict) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def assert_allowed_by_the_pipeline_role(cluster: FakeCluster) -> None:
    """Every call the step made was authorized by the pipeline's Roles (the fake refuses the others)."""
    assert cluster.requests and len(cluster.authorized) == len(cluster.requests), \
        [r["path"] for r in cluster.requests]
    assert {a.verb for a in cluster.authorized} <= {"get", "list", "patch"}, "the step never creates or deletes"


# ---------------------------------------------------------------- recordings and rendering

def test_the_recorded_api_objects_are_valid_kubernetes_objects():
    count = 0
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, list) or data.get("kind") == "Status":
            continue
        items = ([{"apiVersion": data["apiVersion"], "kind": data["kind"][: -len("List")], **i} for i in data["items"]]
                 if data["kind"].endswith("List") else [data])
        for obj in items:
            validate_strict(obj)
            count += 1
    assert count >= 10


@pytest.mark.parametrize("image", ["", "registry.example/kfp-mlops:0.2.0"])
@pytest.mark.parametrize("target", TARGETS)
def test_render_release_touches_only_the_release_fields(target, image):
    deployment = find(target, "Deployment", NAME)
    release = Release("digits", NEW_VERSION, NEW_RELEASE, STORE, image, run_id="kfp-mlops-r8n2v")
    config = render_release(deployment, release)
    validate_strict(config)  # the apply configuration itself is a valid (partial) Deployment
    applied = ssa_merge(deployment, config)
    validate_strict(applied)

    pod = applied["spec"]["template"]
    fetch = next(c for c in pod["spec"]["initContainers"] if c["name"] == "fetch-model")
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["KFP_MLOPS_MODEL_URI"] == STORE and env["KFP_MLOPS_MODEL_VERSION"] == NEW_RELEASE
    for labels in (applied["metadata"]["labels"], pod["metadata"]["labels"]):
        assert labels["kfp-mlops.io/model-version"] == labels["app.kubernetes.io/version"] == NEW_VERSION
    assert pod["metadata"]["annotations"]["kfp-mlops.io/model-release"] == NEW_RELEASE
    assert applied["metadata"]["annotations"]["kubernetes.io/change-cause"] == (
        f"model digits v{NEW_VERSION} (release {NEW_RELEASE[:12]}) from run kfp-mlops-r8n2v"
        + (f", image {image}" if image else ""))
    images = {c["image"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]}
    original = {c["image"] for c in deployment["spec"]["template"]["spec"]["initContainers"]
                + deployment["spec"]["template"]["spec"]["containers"]}
    assert images == ({image} if image else original), "the CUDA overlay keeps its image unless one is given"
    assert applied["spec"]["selector"] == deployment["spec"]["selector"]
    assert "replicas" not in config["spec"], "the HPA owns replicas"

    # Everything else is exactly what the overlay rendered: resources, GPU placement, security, probes.
    def release_fields_dropped(obj):
        obj = copy.deepcopy(obj)
        for labels in (obj["metadata"]["labels"], obj["spec"]["template"]["metadata"]["labels"]):
            labels.pop("kfp-mlops.io/model-version"), labels.pop("app.kubernetes.io/version")
        obj["metadata"]["annotations"].pop("kubernetes.io/change-cause")
        obj["spec"]["template"]["metadata"]["annotations"].pop("kfp-mlops.io/model-release", None)
        for c in obj["spec"]["template"]["spec"]["initContainers"] + obj["spec"]["template"]["spec"]["containers"]:
            c.pop("image")
            c["env"] = [e for e in c.get("env", []) if e["name"] not in ("KFP_MLOPS_MODEL_URI", "KFP_MLOPS_MODEL_VERSION")]
        return obj

    assert release_fields_dropped(applied) == release_fields_dropped(deployment)


@pytest.mark.parametrize("text, value", [
    ("c0ffee123456", "c0ffee123456"),
    ("run 7 / best!", "run-7-best"),
    ("--1.0--", "1.0"),
    ("x" * 80, "x" * 63),
    ("", "unknown"),
    ("???", "unknown"),
])
def test_label_value(text, value):
    assert label_value(text) == value


def test_a_rollback_restores_the_previous_template_like_kubectl_rollout_undo():
    live = load("deployment-serving.json")
    previous = next(rs for rs in load("replicasets-serving.json")["items"]
                    if rs["metadata"]["annotations"][k8s_deploy.REVISION] == "4")
    release = Release("digits", NEW_VERSION, NEW_RELEASE, STORE)
    failed = ssa_merge(live, render_release(live, release))
    restored = json_patch(failed, k8s_deploy.rollback_patch(previous, release, "rollout failed: stuck"))
    validate_strict(restored)
    assert restored["spec"]["template"] == _without_hash(previous["spec"]["template"]) == live["spec"]["template"]
    assert restored["metadata"]["labels"]["kfp-mlops.io/model-version"] == OLD_VERSION
    assert restored["metadata"]["annotations"]["kubernetes.io/change-cause"].startswith(
        f"rollback to revision 4: model digits v{OLD_VERSION}")
    # Only while the failed release is live: a newer release made meanwhile is never rolled back over.
    newer = ssa_merge(live, render_release(live, Release("digits", "feed00000000", "f" * 64, STORE)))
    with pytest.raises(PatchTestFailed):
        json_patch(newer, k8s_deploy.rollback_patch(previous, release, "rollout failed: stuck"))


# ---------------------------------------------------------------- rollout decisions on recorded statuses

@pytest.mark.parametrize("recording, index, generation, done, failed, message", [
    ("rollout-complete.json", 0, 8, False, False, "waiting for the controller to see generation 8"),
    ("rollout-complete.json", 1, 8, False, False, "1 of 2 new replicas updated"),
    ("rollout-complete.json", 2, 8, False, False, "1 old replicas pending termination"),
    ("rollout-complete.json", 3, 8, True, False, "2 of 2 replicas available"),
    ("rollout-progress-deadline-exceeded.json", 0, 8, False, False, "1 of 2 new replicas updated"),
    ("rollout-progress-deadline-exceeded.json", 1, 8, False, True, "ProgressDeadlineExceeded: ReplicaSet"),
    ("rollback-complete.json", 1, 9, True, False, "2 of 2 replicas available"),
    ("rollout-first-release-complete.json", 0, 2, False, False, "1 of 2 new replicas updated"),
])
def test_rollout_state_on_recorded_statuses(recording, index, generation, done, failed, message):
    deployment = load("deployment-serving.json")
    deployment["status"] = load(recording)[index]
    state = rollout_state(deployment, generation)
    assert (state.done, state.failed) == (done, failed)
    assert state.message.startswith(message)


def test_pod_problems_on_recorded_pods():
    (problem,) = pod_problems(load("pods-new-release-crashloop.json")["items"])
    assert "container torchserve CrashLoopBackOff after 4 restarts" in problem
    assert "Failed to load model digits" in problem, "the termination message (last log lines) is quoted"
    assert pod_problems(load("pods-new-release-crashloop.json")["items"], crashloop_restarts=5) == []
    assert pod_problems(load("pods-new-release-starting.json")["items"]) == []


# ---------------------------------------------------------------- the step against the fake API server

def test_a_good_release_is_applied_rolled_out_and_smoke_tested(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"},
                          pods="pods-new-release-starting.json")
    record, service, store = run(serve_cluster(cluster), cluster, inputs)

    assert store.published == [(["digits.mar"], STORE)], "the .mar goes to the store the pods fetch from"
    (apply,) = [r for r in cluster.requests if r["method"] == "PATCH"]
    assert apply["query"] == {"fieldManager": "kfp-mlops", "force": "true"}
    assert apply["content_type"] == "application/apply-patch+yaml"
    assert apply["body"] == render_release(load("deployment-serving.json"),
                                           Release("digits", NEW_VERSION, NEW_RELEASE, STORE, run_id="kfp-mlops-r8n2v"))
    validate_strict(cluster.deployment)
    assert cluster.serving_version() == NEW_VERSION
    assert cluster.history()[-1] == (5, f"model digits v{NEW_VERSION} (release {NEW_RELEASE[:12]}) from run kfp-mlops-r8n2v")

    assert record["endpoint"] == ENDPOINT and record["token_file"] == record["source_token_file"] == str(inputs.token)
    assert record["model_version"] == NEW_VERSION and record["release_id"] == NEW_RELEASE
    assert record["revision"] == "5" and record["previous_revision"] == "4"
    assert record["previous_model_version"] == OLD_VERSION
    assert record["request_log_dir"] == "s3://kfp-mlops/request-logs/digits"  # from the storage ConfigMap
    assert record["smoke_test_images"] == 8 and record["smoke_test_accuracy"] == 1.0
    assert record["rollout"]["polls"] == 4 and record["rollout"]["ok"]
    assert set(service.calls) == {NEW_VERSION}
    json.dumps(record)  # the deployment artifact is this record as JSON
    assert_allowed_by_the_pipeline_role(cluster)


@pytest.mark.parametrize("case", ["progress-deadline", "crashloop", "smoke-test"])
def test_a_failed_release_is_rolled_back_to_the_previous_revision(serve_cluster, inputs, case):
    statuses = {8: "rollout-complete.json" if case == "smoke-test" else "rollout-progress-deadline-exceeded.json",
                9: "rollback-complete.json"}
    pods = "pods-new-release-crashloop.json" if case == "crashloop" else "pods-new-release-starting.json"
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", statuses, pods=pods)
    with pytest.raises(ReleaseRolledBack) as caught:
        run(serve_cluster(cluster), cluster, inputs, broken=(NEW_VERSION,) if case == "smoke-test" else ())
    message, report = str(caught.value), caught.value.report

    expected_failure = {
        "progress-deadline": "rollout failed: ProgressDeadlineExceeded",
        "crashloop": "rollout failed: pod kfp-mlops-serving-6d8f7b9c4-w7x2k: container torchserve CrashLoopBackOff",
        "smoke-test": f"smoke test through {ENDPOINT} failed: 8/8 answered, accuracy 0.00",
    }[case]
    assert f"release of model v{NEW_VERSION} failed: {expected_failure}" in message
    assert f"Rolled back to revision 4 (model v{OLD_VERSION}), now revision 6" in message
    assert "rollout complete" in message and "smoke test passed" in message
    if case == "crashloop":
        assert report["rollout"]["polls"] == 1, "a crash-looping pod fails the rollout at once, not at the deadline"
    if case == "smoke-test":
        assert report["smoke_test"]["attempts"] == 2

    # kubectl rollout undo's patch: the previous ReplicaSet's template, guarded by a test of the failed release.
    (undo,) = patches(cluster, "application/json-patch+json")
    assert undo[0] == {"op": "test", "path": "/spec/template/metadata/annotations/kfp-mlops.io~1model-release",
                       "value": NEW_RELEASE}
    assert cluster.deployment["spec"]["template"] == load("deployment-serving.json")["spec"]["template"]
    validate_strict(cluster.deployment)
    assert cluster.serving_version() == OLD_VERSION and report["recovery"]["ok"]
    # History: the failed release keeps its line; the restored revision moved to the top with the reason.
    history = dict(cluster.history())
    assert history[5].startswith(f"model digits v{NEW_VERSION}")
    assert history[6].startswith(f"rollback to revision 4: model digits v{OLD_VERSION}") and expected_failure[:40] in history[6]
    assert 4 not in history, "the restored ReplicaSet is revision 6 now, as after kubectl rollout undo"
    assert_allowed_by_the_pipeline_role(cluster)


def test_a_failing_rollback_is_an_error_naming_both(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json",
                          {8: "rollout-progress-deadline-exceeded.json"}, pods="pods-new-release-starting.json")
    cluster.errors.append((lambda r: r["content_type"] == "application/json-patch+json", "status-500-etcd-timeout.json"))
    with pytest.raises(RollbackFailed) as caught:
        run(serve_cluster(cluster), cluster, inputs)
    message = str(caught.value)
    assert f"release of model v{NEW_VERSION} failed (rollout failed: ProgressDeadlineExceeded" in message
    assert f"the rollback to revision 4 (model v{OLD_VERSION}) failed too: HTTP 500: etcdserver: request timed out" in message
    assert f"kubectl -n {NS} rollout undo deployment/{NAME} --to-revision=4" in message
    assert caught.value.report["recovery"] == {"action": "rollback", "ok": False, "message": "HTTP 500: etcdserver: request timed out"}


@pytest.mark.parametrize("scale_down_fails", [False, True])
def test_a_failed_first_release_scales_the_deployment_to_zero(serve_cluster, inputs, scale_down_fails):
    """Nothing to roll back to (the base manifests' placeholder revision never served): no pods, clear error."""
    cluster = FakeCluster("deployment-unreleased.json", "replicasets-unreleased.json",
                          {2: "rollout-first-release-complete.json"}, pods="pods-new-release-starting.json")
    if scale_down_fails:
        cluster.errors.append((lambda r: r["content_type"] == "application/json-patch+json", "status-403-patch-forbidden.json"))
    with pytest.raises(RollbackFailed if scale_down_fails else ReleaseRolledBack) as caught:
        run(serve_cluster(cluster), cluster, inputs, broken=(NEW_VERSION,))
    message = str(caught.value)
    assert f"first release of model v{NEW_VERSION} failed" in message and "accuracy 0.00" in message
    if scale_down_fails:
        assert "scaling kfp-mlops/kfp-mlops-serving to 0 failed too (HTTP 403: deployments.apps" in message
        assert f"kubectl -n {NS} scale deployment/{NAME} --replicas=0" in message
        assert cluster.deployment["spec"]["replicas"] == 2
    else:
        assert "no earlier release to roll back to" in message and "scaled to 0 replicas" in message
        assert cluster.deployment["spec"]["replicas"] == 0
        validate_strict(cluster.deployment)
        assert cluster.history()[-1][1].endswith("scaled to 0 (no earlier release to roll back to)")
    (scale,) = patches(cluster, "application/json-patch+json")
    assert {"op": "add", "path": "/spec/replicas", "value": 0} in scale


def test_the_next_release_scales_a_zeroed_deployment_back_up(serve_cluster, inputs):
    cluster = FakeCluster("deployment-unreleased.json", "replicasets-unreleased.json",
                          {3: "rollout-scale-up-complete.json"}, pods="pods-new-release-starting.json")
    cluster.deployment["spec"]["replicas"] = 0  # as a failed first release leaves it
    record, _, _ = run(serve_cluster(cluster), cluster, inputs, scale_up_replicas=1)
    (scale_up,) = patches(cluster, "application/json-patch+json")
    assert scale_up == [{"op": "test", "path": "/spec/replicas", "value": 0}, {"op": "add", "path": "/spec/replicas", "value": 1}]
    assert record["smoke_test_accuracy"] == 1.0 and cluster.deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("failing, status_file, message", [
    ("GET", "status-404-deployment-not-found.json", "not found: apply the manifests first (kubectl apply -k manifests/overlays/<env>"),
    ("GET", "status-500-etcd-timeout.json", "cannot read Deployment kfp-mlops/kfp-mlops-serving: HTTP 500: etcdserver"),
    ("PATCH", "status-403-patch-forbidden.json", "was refused, so nothing changed: HTTP 403: deployments.apps \"kfp-mlops-serving\" is forbidden"),
])
def test_api_errors_before_the_rollout_change_nothing(serve_cluster, inputs, failing, status_file, message):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    cluster.errors.append((lambda r: r["method"] == failing and r["path"].endswith(f"/deployments/{NAME}"), status_file))
    store = FakeStore()
    with pytest.raises(DeployError) as caught:
        run(serve_cluster(cluster), cluster, inputs, store=store)
    assert message in str(caught.value)
    assert not isinstance(caught.value, (ReleaseRolledBack, RollbackFailed))
    assert cluster.deployment == load("deployment-serving.json"), "the Deployment is untouched"
    assert store.published == ([] if failing == "GET" else [(["digits.mar"], STORE)])


def test_a_deployment_deleted_after_it_was_read_is_not_recreated(serve_cluster, inputs):
    """The step only updates the Deployment the manifests created: an apply that would create it is
    refused by RBAC (no create), and the step says to apply the manifests instead."""
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    cluster.reads_before_deletion = 1  # gone right after the step read it
    with pytest.raises(DeployError) as caught:
        run(serve_cluster(cluster), cluster, inputs)
    message = str(caught.value)
    assert f"Deployment {NS}/{NAME} is gone (deleted after it was read): apply the manifests first" in message
    assert "kubectl apply -k manifests/overlays/<env>" in message and "may not create one" in message
    assert not isinstance(caught.value, (ReleaseRolledBack, RollbackFailed))
    assert cluster.deployment is None, "nothing was created"
    (apply,) = [r for r in cluster.requests if r["method"] == "PATCH"]
    assert apply["content_type"] == "application/apply-patch+yaml"


def test_the_pipeline_role_grants_exactly_what_the_step_calls(serve_cluster, inputs):
    """A release that is rolled back makes every kind of call the step has; each one is authorized by
    the pipeline Role, and each of the Role's verbs (and names) is used by one of them: no spare grant."""
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json",
                          {8: "rollout-progress-deadline-exceeded.json", 9: "rollback-complete.json"},
                          pods="pods-new-release-starting.json")
    with pytest.raises(ReleaseRolledBack):
        run(serve_cluster(cluster), cluster, inputs)
    assert_allowed_by_the_pipeline_role(cluster)
    used = set(cluster.authorized)
    for rule in bound_rules(role=PIPELINE_ACCOUNT):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        assert Attributes(verb, group, resource, name) in used, \
                            f"the Role grants {verb} on {resource} {name!r} but the step never calls it"


def test_rbac_as_the_fake_api_server_applies_it():
    """Names bind get/patch, and list only with a metadata.name field selector; create never has a name."""
    rules = [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [NAME], "verbs": ["get", "list"]}]
    path = f"/apis/apps/v1/namespaces/{NS}/deployments"
    assert rbac_allows(rules, request_attributes("GET", f"{path}/{NAME}", {}))
    assert not rbac_allows(rules, request_attributes("GET", f"{path}/other", {}))
    assert not rbac_allows(rules, request_attributes("GET", path, {}))
    assert rbac_allows(rules, request_attributes("GET", path, {"fieldSelector": f"metadata.name={NAME}"}))
    assert not rbac_allows(rules, request_attributes("GET", path, {"fieldSelector": f"metadata.name={NAME},a=b"}))
    assert not rbac_allows(rules, request_attributes("GET", path, {"watch": "true", "fieldSelector": f"metadata.name={NAME}"}))
    assert request_attributes("POST", path, {}) == Attributes("create", "apps", "deployments", "")
    assert request_attributes("GET", f"/api/v1/namespaces/{NS}/pods", {"labelSelector": "a=b"}) == \
        Attributes("list", "", "pods", "")
    # The fake's 403 is worded like the recorded one.
    assert forbidden(Attributes("patch", "apps", "deployments", NAME), f"system:serviceaccount:{NS}:default") == \
        load("status-403-patch-forbidden.json")


def test_the_smoke_test_token_is_the_pipelines_source_token():
    """The step reads the Secret the pipeline mounts for it, and the serving pods' proxy takes that
    Secret as the tokens that may tag traffic (X-Request-Source)."""
    from pipelines import pipeline

    assert k8s_deploy.TOKEN_SECRET == pipeline.SERVING_SOURCE_TOKEN_SECRET == "kfp-mlops-serving-source-token"
    assert k8s_deploy.TOKEN_FILE == f"{pipeline.SERVING_SOURCE_TOKEN_MOUNT}/token"
    spec = find("base", "Deployment", NAME)["spec"]["template"]["spec"]
    proxy = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
    source_file = proxy["command"][proxy["command"].index("--source-token-file") + 1]
    mount = next(m for m in proxy["volumeMounts"] if source_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == k8s_deploy.TOKEN_SECRET


@pytest.mark.parametrize("case, error, message", [
    ("no-model", FileNotFoundError, "metadata.json is missing"),
    ("empty-test-split", ValueError, "empty test split"),
    ("no-token", FileNotFoundError, "mount the Secret kfp-mlops-serving-source-token"),
    ("empty-token", ValueError, "serving token file"),
    ("other-model", DeployError, "the Deployment serves model 'digits' (--models digits=digits.mar), not 'letters'"),
])
def test_bad_inputs_are_refused_before_anything_is_published(serve_cluster, inputs, tmp_path, case, error, message):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    overrides = {}
    if case == "no-model":
        inputs.model = tmp_path / "nothing-here"
    elif case == "empty-test-split":
        empty = np.zeros((0, 1, 8, 8), np.float32)
        save_splits(Splits(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64),
                           empty, CLASS_NAMES), inputs.dataset)
    elif case == "no-token":
        inputs.token.unlink()
    elif case == "empty-token":
        inputs.token.write_text("\n")
    elif case == "other-model":
        overrides["model_name"] = "letters"
    store = FakeStore()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        run(serve_cluster(cluster), cluster, inputs, store=store, **overrides)
    assert store.published == [] and not [r for r in cluster.requests if r["method"] == "PATCH"]


def test_end_to_end_with_the_real_archiver_and_model_store(serve_cluster, inputs, tmp_path):
    """The real .mar builder and components.core.storage.publish into a local model store: the release the
    Deployment now names is fetchable and holds the archive TorchServe loads."""
    import torch

    from components.core import storage
    from components.core.models import Classifier, EncoderSpec, save_classifier

    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), inputs.model,
                    {"class_names": CLASS_NAMES, "model_version": NEW_VERSION})
    store_dir = tmp_path / "store"
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    record, _, _ = run(serve_cluster(cluster), cluster, inputs, publish=storage.publish, build_archive=None,
                       model_store_uri=str(store_dir), workers=2, batch_size=8, max_batch_delay_ms=7)
    fetch = next(c for c in cluster.deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model")
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["KFP_MLOPS_MODEL_URI"] == str(store_dir) and env["KFP_MLOPS_MODEL_VERSION"] == record["release_id"]
    manifest = storage.fetch(env["KFP_MLOPS_MODEL_URI"], tmp_path / "pod-store", version=env["KFP_MLOPS_MODEL_VERSION"])
    assert [f["path"] for f in manifest["files"]] == ["digits.mar"]
    assert (tmp_path / "pod-store" / "digits.mar").stat().st_size > 1000
    # The batching and worker settings (non-default here) travel in the archive the pods load.
    import zipfile

    with zipfile.ZipFile(tmp_path / "pod-store" / "digits.mar") as z:
        config = yaml.safe_load(z.read(json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]))
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"], config["maxBatchDelay"]) == (2, 2, 8, 7)
    assert record["model_config"] == {"workers": 2, "batch_size": 8, "max_batch_delay_ms": 7}


# ---------------------------------------------------------------- the KFP component's cluster path

def test_bad_batching_fails_before_anything_is_published(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    store = FakeStore()
    with pytest.raises(ValueError, match="max_batch_delay_ms must be an integer from 1"):
        run(serve_cluster(cluster), cluster, inputs, store=store, max_batch_delay_ms=0)
    assert store.published == [] and patches(cluster, "application/apply-patch+yaml") == []


def test_deploy_component_on_kubernetes_writes_the_record(serve_cluster, inputs, tmp_path, monkeypatch):
    from components.deploy.component import deploy_component

    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    api = serve_cluster(cluster)
    service = FakeService(cluster)
    monkeypatch.setattr(KubernetesApi, "from_environment", classmethod(lambda cls: api))
    monkeypatch.setattr("components.core.storage.publish", FakeStore())
    monkeypatch.setattr("serving.archive.build_mar", fake_build)
    monkeypatch.setattr("serving.client.predict", service)
    monkeypatch.setattr(k8s_deploy.time, "sleep", lambda s: None)
    deployment = Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    common = dict(model=Model(name="model", uri=str(inputs.model)), dataset=Dataset(name="dataset", uri=str(inputs.dataset)),
                  deployment=deployment, metrics=metrics)
    serving = dict(home="unused", host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3, workers=1,
                   model_name="digits", startup_timeout_s=1)
    with pytest.raises(ValueError, match="deploy_target must be 'local' or 'kubernetes'"):
        deploy_component(**common, cfg=settings_of(serving=ServingConfig(**serving, deploy_target="k8s")))

    BUILT.clear()
    cfg = settings_of(serving=ServingConfig(**serving, deploy_target="kubernetes", batch_size=16, max_batch_delay_ms=3))
    endpoint = deploy_component(**common, cfg=cfg, namespace=NS, pipeline_auth_file=str(inputs.token),
                                run_id="kfp-mlops-r8n2v")
    assert BUILT == [{"workers": 1, "batch_size": 16, "max_batch_delay_ms": 3}], "serving.* settings reach the .mar"
    record = json.loads(Path(deployment.path).read_text())
    assert endpoint == record["endpoint"] == ENDPOINT and record["target"] == "kubernetes"
    assert {"endpoint", "token_file", "request_log_dir", "model_version"} <= set(record), "what the monitor step reads"
    assert metrics.metadata["smoke_test_accuracy"] == 1.0 and "rollout_seconds" in metrics.metadata
    assert not (tmp_path / "unused").exists(), "the local server's settings are not used on the cluster"
