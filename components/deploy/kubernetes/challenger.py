"""The challenger of a shadow or canary rollout, as objects: its Deployment derived from the stable one, the
patches that scale it, and the rollout file the stable pods' auth proxies read.

* ``render_challenger``: the server-side-apply configuration of the challenger Deployment: the **live** stable
  Deployment's pod spec (so whatever overlay or hand edit the stable pods run with, the challenger runs with
  too), the new release's fields (as ``release.render_release`` sets them on the stable one), the challenger's
  own labels, and its auth proxy pointed at its own, always empty, rollout file.
* ``rollout_document`` / ``route_patch`` / ``clear_patch``: the auth proxy's rollout file (the contract in
  docs/releases.md) in the ConfigMap ``kfp-mlops-serving-rollout``, written with JSON patches whose ``test``
  operation makes each one conditional on what the ConfigMap held, so two rollouts never overwrite each other.
* ``scale_patch``: the challenger to N replicas, only while it still runs the release this rollout applied.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from components.core.names import (
    CHALLENGER_ROLLOUT_CONFIG_MAP,
    MODEL_URI_ENV,
    MODEL_VERSION_ENV,
    PROXY_SOURCE_TOKEN_FILE,
    RELEASE_ANNOTATION,
    ROLLOUT_CONFIG_MAP,
    ROLLOUT_FILE_KEY,
)
from components.deploy.kubernetes.release import (
    APP_VERSION_LABEL,
    CHANGE_CAUSE,
    FETCH_CONTAINER,
    MODEL_VERSION_LABEL,
    DeployError,
    Release,
    _pointer,
    find_named,
    label_value,
)
from components.deploy.pods.manifests import upsert_env

PROXY_CONTAINER = "auth-proxy"
ROLLOUT_FLAG = "--rollout-file"
PROXY_PORT_NAME = "inference"
EMPTY_ROLLOUT = "{}"
MODES = ("shadow", "canary")


def _args(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def rollout_volume(pod_spec: dict) -> dict:
    """The auth proxy's rollout-file volume in a serving pod spec: the ConfigMap volume mounted where its
    ``--rollout-file`` points. Raises ``DeployError`` (saying to apply the manifests) when it has none."""
    proxy = find_named(pod_spec["containers"], PROXY_CONTAINER, "container")
    args = _args(proxy)
    stale = ("the serving Deployment's auth proxy {what}: it predates shadow and canary rollouts. Apply the "
             "manifests of this version (kubectl apply -k manifests/overlays/<env>), which mount the ConfigMap "
             f"{ROLLOUT_CONFIG_MAP} there, and rebuild the serving image if it is older too")
    if ROLLOUT_FLAG not in args or args.index(ROLLOUT_FLAG) + 1 >= len(args):
        raise DeployError(stale.format(what=f"has no {ROLLOUT_FLAG} argument"))
    path = args[args.index(ROLLOUT_FLAG) + 1]
    directory, _, key = path.rpartition("/")
    mount = next((m for m in proxy.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory), None)
    volume = next((v for v in pod_spec.get("volumes", []) if mount and v["name"] == mount["name"]), None)
    if volume is None or "configMap" not in volume or key != ROLLOUT_FILE_KEY:
        raise DeployError(stale.format(what=f"reads {path}, which is not the key {ROLLOUT_FILE_KEY} of a "
                                            "ConfigMap volume"))
    return volume


def proxy_port(pod_spec: dict) -> int:
    """The auth proxy's port on the pod's IP (where ``GET /rollout`` is answered)."""
    proxy = find_named(pod_spec["containers"], PROXY_CONTAINER, "container")
    port = next((p for p in proxy.get("ports", []) if p.get("name") == PROXY_PORT_NAME), None)
    if port is None:
        raise DeployError(f"the auth-proxy container has no port named {PROXY_PORT_NAME!r}; the serving Deployment "
                          "does not look like manifests/base/serving-deployment.yaml")
    return int(port["containerPort"])


def render_challenger(stable: dict, challenger: dict, release: Release, replicas: int) -> dict:
    """The server-side-apply configuration that makes the challenger Deployment run ``release`` on ``replicas``
    pods, with the stable Deployment's pod spec.

    ``stable`` and ``challenger`` are the two Deployments as the API returns them (or as kustomize renders them):
    the stable one gives the pod spec and pod annotations, the challenger its names, selector and labels.
    """
    pod = copy.deepcopy(stable["spec"]["template"]["spec"])
    stable_selector = stable["spec"]["selector"]["matchLabels"]
    selector = challenger["spec"]["selector"]["matchLabels"]
    if selector == stable_selector:
        raise DeployError(f"the challenger Deployment {challenger['metadata']['name']} selects the stable pods "
                          f"({selector}): its pods would join the stable Service; apply the manifests of this version")
    # The release, as render_release sets it on the stable Deployment.
    fetch = find_named(pod.get("initContainers", []), FETCH_CONTAINER, "init container")
    fetch["env"] = upsert_env(fetch.get("env") or [], [{"name": MODEL_URI_ENV, "value": release.model_uri},
                                                      {"name": MODEL_VERSION_ENV, "value": release.release_id}])
    if release.image:
        for container in pod.get("initContainers", []) + pod["containers"]:
            container["image"] = release.image
    # Its own pods where the stable spec names the stable ones; its own, empty, rollout file.
    for constraint in pod.get("topologySpreadConstraints", []):
        if (constraint.get("labelSelector") or {}).get("matchLabels") == stable_selector:
            constraint["labelSelector"]["matchLabels"] = dict(selector)
    volume = rollout_volume(pod)
    volume["configMap"]["name"] = CHALLENGER_ROLLOUT_CONFIG_MAP
    version = label_value(release.model_version)
    labels = {**challenger["spec"]["template"]["metadata"].get("labels", {}), **selector,
              MODEL_VERSION_LABEL: version, APP_VERSION_LABEL: version}
    annotations = {**(stable["spec"]["template"]["metadata"].get("annotations") or {}),
                   RELEASE_ANNOTATION: release.release_id}
    meta = challenger["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                     "labels": {MODEL_VERSION_LABEL: version, APP_VERSION_LABEL: version},
                     "annotations": {CHANGE_CAUSE: f"challenger: {release.change_cause()}"}},
        "spec": {
            "replicas": replicas,
            "selector": copy.deepcopy(challenger["spec"]["selector"]),
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
        },
    }


def scale_patch(release: Release, replicas: int) -> list[dict]:
    """JSON patch: the challenger to ``replicas``, only while it runs ``release`` (a later rollout's challenger is
    never scaled by this one)."""
    return [{"op": "test", "path": _pointer("spec", "template", "metadata", "annotations", RELEASE_ANNOTATION),
             "value": release.release_id},
            {"op": "add", "path": "/spec/replicas", "value": replicas}]


def rollout_document(release: Release, mode: str, share: float, upstream: str,
                     token_file: str = PROXY_SOURCE_TOKEN_FILE) -> dict[str, Any]:
    """The auth proxy's rollout file naming the challenger (docs/releases.md: the proxy's rollout interface).
    ``token_file`` is the pipeline's source token as mounted in the stable pods' auth-proxy container: the proxy
    sends it to the challenger's proxy, which takes the same Secret's tokens as sources."""
    if mode not in MODES:
        raise ValueError(f"rollout mode must be one of {MODES}, got {mode!r}")
    if not 0 < share <= 1:
        raise ValueError(f"rollout share must be in (0, 1], got {share}")
    return {"challenger": {"version": release.model_version, "mode": mode, "share": share, "upstream": upstream,
                           "token_file": token_file}}


def encode(document: dict) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def routed_version(text: str | None) -> str | None:
    """The challenger version a rollout file's text names; None when it names none (absent, empty or ``{}``).
    Raises ``DeployError`` when it is not the JSON the proxy reads."""
    if text is None or not text.strip():
        return None
    try:
        document = json.loads(text)
    except ValueError:
        raise DeployError(f"the ConfigMap {ROLLOUT_CONFIG_MAP} holds no JSON in {ROLLOUT_FILE_KEY} ({text[:200]!r}): "
                          "set it to {} (kubectl apply -k the manifests)") from None
    challenger = document.get("challenger") if isinstance(document, dict) else None
    if not challenger:
        return None
    return str(challenger.get("version") or "?")


def _data_path() -> str:
    return _pointer("data", ROLLOUT_FILE_KEY)


def route_patch(current: str, document: dict) -> list[dict]:
    """JSON patch: the rollout file names the challenger, only if it still holds ``current`` (read before)."""
    return [{"op": "test", "path": _data_path(), "value": current},
            {"op": "replace", "path": _data_path(), "value": encode(document)}]


def clear_patch(document: dict) -> list[dict]:
    """JSON patch: the rollout file names no challenger, only if it still names this rollout's."""
    return [{"op": "test", "path": _data_path(), "value": encode(document)},
            {"op": "replace", "path": _data_path(), "value": EMPTY_ROLLOUT}]


def clear_command(namespace: str) -> str:
    """How to clear the rollout file by hand."""
    return (f"kubectl -n {namespace} patch configmap {ROLLOUT_CONFIG_MAP} --type merge "
            f"-p '{{\"data\":{{\"{ROLLOUT_FILE_KEY}\":\"{{}}\"}}}}'")
