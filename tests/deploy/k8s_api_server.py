"""A Kubernetes API server on loopback for the deploy step's tests, without a cluster.

It replays API objects in tests/data/k8s/: Deployments, ReplicaSets, Pods, a Service,
a ConfigMap, the status sequence of each rollout and error Status bodies. They were
written in the exact shape the API server returns for these manifests (server
defaults, managedFields, controller annotations, conditions) and are checked against
the Kubernetes schemas (``validate_strict``, as the manifests policy does); no cluster
was available to capture them from. It speaks to the real ``kubernetes`` client (so
ApiExceptions, content types and query parameters are real), and between the recorded
objects it does what the API server and the Deployment controller would: authorize
every call with RBAC against the Roles the rendered manifests bind to the pipeline's
ServiceAccount (403 in the API server's words when they do not allow it), merge a
server-side apply, apply a JSON patch (with its test operations), bump the generation,
and create or reuse ReplicaSets with revision numbers and change-causes.
"""

import copy
import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from test_manifests import KUBERNETES_VERSIONS, render

from components.deploy.kubernetes.release import CHANGE_CAUSE, MODEL_VERSION_LABEL, REVISION

DATA = Path(__file__).resolve().parents[1] / "data" / "k8s"
NS, NAME = "kfp-mlops", "kfp-mlops-serving"
NEW_VERSION = "c0ffee123456"  # the model released in these tests (the recorded pods carry it)
NEW_RELEASE = "7a1f3c5e9b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a"
OLD_VERSION = "5e1f0c2a9b7d"  # what deployment-serving.json serves (revision 4)
STORE = "s3://kfp-mlops/models/digits"
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


def without_pod_hash(template: dict) -> dict:
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
        if without_pod_hash(after["spec"]["template"]) != without_pod_hash(before["spec"]["template"]):
            template = without_pod_hash(after["spec"]["template"])
            revision = 1 + max(int(rs["metadata"]["annotations"][REVISION]) for rs in self.replicasets)
            match = next((rs for rs in self.replicasets if without_pod_hash(rs["spec"]["template"]) == template), None)
            if match is None:  # a new ReplicaSet for a new template
                pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:9]
                match = {"metadata": {"name": f"{NAME}-{pod_hash}", "namespace": NS, "annotations": {},
                                      "labels": {**template["metadata"]["labels"], "pod-template-hash": pod_hash},
                                      "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME,
                                                           "uid": after["metadata"]["uid"], "controller": True}]},
                         "spec": {"replicas": 0, "template": copy.deepcopy(after["spec"]["template"])}}
                match["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] = pod_hash
                self.replicasets.append(match)
            match["metadata"]["annotations"][REVISION] = str(revision)  # a reused one moves to the top
            after["metadata"]["annotations"][REVISION] = str(revision)
        current = after["metadata"]["annotations"][REVISION]
        for rs in self.replicasets:  # the controller copies the change-cause to the current ReplicaSet
            if rs["metadata"]["annotations"].get(REVISION) == current:
                rs["metadata"]["annotations"][CHANGE_CAUSE] = after["metadata"]["annotations"][CHANGE_CAUSE]
        return after

    def serving_version(self) -> str:
        return self.deployment["spec"]["template"]["metadata"]["labels"][MODEL_VERSION_LABEL]

    def history(self) -> list[tuple[int, str]]:
        """What `kubectl rollout history` lists: (revision, change-cause), oldest first."""
        return sorted((int(rs["metadata"]["annotations"][REVISION]),
                       rs["metadata"]["annotations"].get(CHANGE_CAUSE, "<none>")) for rs in self.replicasets)

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


class ApiHandler(BaseHTTPRequestHandler):
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


def validate_strict(obj: dict) -> None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)
