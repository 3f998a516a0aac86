"""One release of a model into the serving Deployment, and the patches that apply, undo or park it.

``render_release`` is the server-side-apply configuration of a release (only the release fields);
``rollback_patch`` restores the previous revision as ``kubectl rollout undo`` does;
``scale_to_zero_patch`` parks a failed first release; ``scale_up_patch`` wakes it for the next one.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from components.core.names import MODEL_URI_ENV, MODEL_VERSION_ENV, MODEL_VERSION_LABEL, RELEASE_ANNOTATION
from components.core.names import SERVING_DEPLOYMENT as DEPLOYMENT_NAME

DEFAULT_NAMESPACE = "kfp-mlops"
FETCH_CONTAINER = "fetch-model"  # the init container that fetches the release
SERVER_CONTAINER = "torchserve"
APP_VERSION_LABEL = "app.kubernetes.io/version"
CHANGE_CAUSE = "kubernetes.io/change-cause"
REVISION = "deployment.kubernetes.io/revision"
UNRELEASED = "unreleased"  # the base manifests' model-version: nothing released yet


class DeployError(RuntimeError):
    """The release failed; ``report`` holds what was done (JSON-serialisable)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


class ReleaseRolledBack(DeployError):
    """The new release failed and the previous one serves again (or, first release, nothing serves)."""


class RollbackFailed(DeployError):
    """The new release failed and so did the way back: the message names both; act by hand."""


def label_value(text: str) -> str:
    """``text`` as a valid label value: [A-Za-z0-9._-], alphanumeric at both ends, at most 63 characters."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text))[:63]
    value = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)
    return value or "unknown"


def label_selector(match_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


@dataclass(frozen=True)
class Release:
    """One model release: what the pods fetch, how the revision is labelled, and where it goes.

    The first six fields are the release itself (all ``render_release`` needs); ``release_id`` is
    "" until the archive is published. The rest is what the preflight read from the cluster: the
    Deployment the release changes and the revision it replaces.
    """

    model_name: str
    model_version: str  # the model's own version (finetune: a hash of its weights)
    release_id: str  # the version id ``components.core.releases.publish`` returned (sha256 of the manifest)
    model_uri: str  # the model store (``base_uri`` of the release)
    image: str = ""  # set every container's image; "" keeps what the Deployment runs (overlays differ: CPU/CUDA)
    run_id: str = ""  # the pipeline run that released it, for the change-cause
    namespace: str = DEFAULT_NAMESPACE
    deployment_name: str = DEPLOYMENT_NAME
    service_name: str = DEPLOYMENT_NAME
    live: dict = field(default_factory=dict, repr=False)  # the Deployment as read before the release
    previous: dict | None = field(default=None, repr=False)  # the ReplicaSet serving before; None: first release
    mar_file: str = ""  # the archive the server loads (its --models NAME=FILE)
    endpoint: str = ""  # the prediction URL through the Service
    request_log_dir: str = ""  # where the serving pods log requests

    def change_cause(self) -> str:
        cause = f"model {self.model_name} v{self.model_version} (release {self.release_id[:12]})"
        cause += f" from run {self.run_id}" if self.run_id else ""
        return cause + (f", image {self.image}" if self.image else "")

    @property
    def deployment(self) -> str:
        return f"{self.namespace}/{self.deployment_name}"

    @property
    def selector(self) -> str:
        """The label selector of the Deployment's pods and ReplicaSets."""
        return label_selector(self.live["spec"]["selector"]["matchLabels"])

    @property
    def pods_selector(self) -> str:
        """The pods of this release only."""
        return f"{self.selector},{MODEL_VERSION_LABEL}={label_value(self.model_version)}"

    @property
    def previous_revision(self) -> str | None:
        return self.live["metadata"].get("annotations", {}).get(REVISION)

    @property
    def previous_model_version(self) -> str | None:
        template = (self.previous or {}).get("spec", {}).get("template", {})
        return template.get("metadata", {}).get("labels", {}).get(MODEL_VERSION_LABEL)

    def undo_command(self) -> str:
        """How to roll back by hand."""
        to_revision = f" --to-revision={self.previous_revision}" if self.previous is not None else ""
        return f"kubectl -n {self.namespace} rollout undo deployment/{self.deployment_name}{to_revision}"


def find_named(items: list[dict], name: str, what: str) -> dict:
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
    find_named(pod.get("initContainers", []), FETCH_CONTAINER, "init container")
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


def _still_serving(failed: Release) -> dict:
    """The guard of every recovery patch: the Deployment must still run the failed release, so a newer
    release someone made meanwhile is never rolled back over or scaled down (the API refuses the patch)."""
    return {"op": "test", "path": _pointer("spec", "template", "metadata", "annotations", RELEASE_ANNOTATION),
            "value": failed.release_id}


def _change_cause_op(text: str) -> dict:
    return {"op": "add", "path": _pointer("metadata", "annotations", CHANGE_CAUSE), "value": text[:1000]}


def rollback_patch(previous: dict, failed: Release, reason: str) -> list[dict]:
    """JSON patch that restores ``previous`` (a ReplicaSet)'s pod template, as ``kubectl rollout undo`` does."""
    template = copy.deepcopy(previous["spec"]["template"])
    template["metadata"].get("labels", {}).pop("pod-template-hash", None)  # the controller's, not ours
    labels = template["metadata"].get("labels", {})
    annotations = previous["metadata"].get("annotations", {})
    back_to = f"revision {annotations.get(REVISION, '?')}: {annotations.get(CHANGE_CAUSE, 'no change-cause')}"
    ops = [
        _still_serving(failed),
        {"op": "replace", "path": "/spec/template", "value": template},
        _change_cause_op(f"rollback to {back_to} (release of model v{failed.model_version} failed: {reason})"),
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
        _still_serving(failed),
        {"op": "add", "path": "/spec/replicas", "value": 0},
        _change_cause_op(f"{failed.change_cause()} FAILED: {reason}; scaled to 0 (no earlier release to roll back to)"),
    ]


def scale_up_patch(replicas: int) -> list[dict]:
    return [{"op": "test", "path": "/spec/replicas", "value": 0}, {"op": "add", "path": "/spec/replicas", "value": replicas}]
