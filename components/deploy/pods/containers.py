"""One container of a pod spec as Docker create arguments: command and args (``$(VAR)`` expanded), environment,
user and groups, security context, resources, mounts and restart policy. Pure: the engine calls it.

What Kubernetes does and how it maps here (docs/cluster.md, "The manifests, run locally"):

* ``command``/``args`` are Docker's entrypoint/cmd; ``command`` alone drops the image's CMD, as in Kubernetes.
* ``runAsUser``/``runAsGroup`` (container over pod) are the user; ``fsGroup`` and ``supplementalGroups`` are
  supplementary groups; ``runAsNonRoot`` is checked against the user that would run, the image's included.
* ``readOnlyRootFilesystem``, ``capabilities``, ``privileged``, ``allowPrivilegeEscalation: false``
  (no_new_privs) map one to one; seccomp ``RuntimeDefault`` is the engine's default profile, ``Unconfined`` none.
* CPU limit is a CFS quota, CPU request the cgroup's shares (the kubelet's formula), memory limit the cgroup's
  limit with no extra swap, memory request its soft limit.
"""

from __future__ import annotations

from typing import Any, Mapping

from components.deploy.pods.manifests import PodError, cpu_cores, expand, memory_bytes

# Security-context fields the runner honours; any other field set in a manifest stops the pod.
POD_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "fsGroupChangePolicy",
                       "supplementalGroups", "seccompProfile"}
CONTAINER_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem", "capabilities",
                             "privileged", "allowPrivilegeEscalation", "seccompProfile"}
RESTART_POLICIES = {"Always": {"Name": "always"}, "OnFailure": {"Name": "on-failure"}, "Never": {"Name": "no"}}
# What the kubelet gives a container as its CPU shares for a request (pkg/kubelet/cm: MilliCPUToShares).
MIN_SHARES, SHARES_PER_CPU = 2, 1024


def _unsupported(context: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(context) - allowed)
    if extra:
        raise PodError(f"{where}: securityContext fields {extra} cannot be honoured by the local runner")


def image_uid(image_user: str) -> int | None:
    """The UID an image's USER runs as, when the image says it by number ("10001", "10001:10001"); else None."""
    user = (image_user or "0").split(":", 1)[0]
    return int(user) if user.isdigit() else (0 if user == "root" else None)


def security(pod_spec: Mapping[str, Any], container: Mapping[str, Any], image_user: str) -> dict[str, Any]:
    """The container's identity and confinement as Docker create arguments (raises where a rule is broken)."""
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    name = container["name"]
    _unsupported(pod_sc, POD_SECURITY_FIELDS, "pod")
    _unsupported(sc, CONTAINER_SECURITY_FIELDS, f"container {name!r}")
    pick = lambda key: sc.get(key, pod_sc.get(key))  # noqa: E731 - container over pod, as Kubernetes resolves it
    args: dict[str, Any] = {}
    uid, gid = pick("runAsUser"), pick("runAsGroup")
    if uid is not None:
        args["user"] = f"{uid}:{gid}" if gid is not None else str(uid)
    elif gid is not None:
        raise PodError(f"container {name!r}: runAsGroup without runAsUser; set runAsUser too")
    if pick("runAsNonRoot"):
        effective = uid if uid is not None else image_uid(image_user)
        if effective is None:  # the kubelet's refusal, word for word in substance
            raise PodError(f"container {name!r} has runAsNonRoot and its image has a non-numeric user "
                           f"({image_user}): cannot verify the user is non-root; set runAsUser")
        if effective == 0:
            raise PodError(f"container {name!r} has runAsNonRoot and would run as root (UID 0); set runAsUser")
    groups = [str(g) for g in [pod_sc.get("fsGroup")] + list(pod_sc.get("supplementalGroups") or []) if g is not None]
    if groups:
        args["group_add"] = groups
    args["read_only"] = bool(sc.get("readOnlyRootFilesystem", False))
    caps = sc.get("capabilities") or {}
    if caps.get("drop"):
        args["cap_drop"] = list(caps["drop"])
    if caps.get("add"):
        args["cap_add"] = list(caps["add"])
    args["privileged"] = bool(sc.get("privileged", False))
    options = []
    if sc.get("allowPrivilegeEscalation") is False:
        if args["privileged"] or "SYS_ADMIN" in (caps.get("add") or []):
            raise PodError(f"container {name!r}: allowPrivilegeEscalation false with privileged or CAP_SYS_ADMIN "
                           "is refused by the API server")
        options.append("no-new-privileges:true")
    seccomp = (pick("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        options.append("seccomp=unconfined")
    elif seccomp != "RuntimeDefault":
        raise PodError(f"container {name!r}: seccomp profile {seccomp} is not supported locally "
                       "(RuntimeDefault or Unconfined)")
    if options:
        args["security_opt"] = options
    return args


def resources(container: Mapping[str, Any]) -> dict[str, Any]:
    res = container.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    unknown = sorted((set(limits) | set(requests)) - {"cpu", "memory", "ephemeral-storage"})
    if unknown:
        raise PodError(f"container {container['name']!r} asks for {unknown}, which this machine's engine cannot "
                       "give a container")
    args: dict[str, Any] = {}
    if "cpu" in limits:
        args["nano_cpus"] = int(cpu_cores(limits["cpu"]) * 1e9)
    cpu_request = requests.get("cpu", limits.get("cpu"))  # Kubernetes defaults a request to the limit
    if cpu_request is not None:
        args["cpu_shares"] = max(MIN_SHARES, int(cpu_cores(cpu_request) * SHARES_PER_CPU))
    if "memory" in limits:
        args["mem_limit"] = args["memswap_limit"] = memory_bytes(limits["memory"])
    memory_request = requests.get("memory", limits.get("memory"))
    if memory_request is not None:
        args["mem_reservation"] = memory_bytes(memory_request)
    return args


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Kubernetes' command/args over the image's ENTRYPOINT/CMD, each expanded against the container's env."""
    args: dict[str, Any] = {}
    if "command" in container:
        args["entrypoint"] = [expand(str(a), env) for a in container["command"]]
        args["command"] = [expand(str(a), env) for a in container.get("args") or []]
    elif "args" in container:
        args["command"] = [expand(str(a), env) for a in container["args"]]
    return args


def mounts(container: Mapping[str, Any], volume_sources: Mapping[str, tuple[str, bool]]) -> list[dict[str, Any]]:
    """``volumeMounts`` as Docker volume mounts; ``volume_sources``: pod volume -> (Docker volume, read-only
    always, as ConfigMap and Secret volumes are)."""
    out = []
    for mount in container.get("volumeMounts") or []:
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise PodError(f"container {container['name']!r}: subPath mounts are not supported locally")
        if mount["name"] not in volume_sources:
            raise PodError(f"container {container['name']!r} mounts volume {mount['name']!r}, which the pod lacks")
        source, always_read_only = volume_sources[mount["name"]]
        out.append({"target": mount["mountPath"], "source": source,
                    "read_only": bool(mount.get("readOnly", False) or always_read_only)})
    return out


def create_args(container: Mapping[str, Any], pod_spec: Mapping[str, Any], env: Mapping[str, str], image_user: str,
                volume_sources: Mapping[str, tuple[str, bool]], *, restart: bool) -> dict[str, Any]:
    """Everything Docker needs to create this container except its name, labels, image and namespaces."""
    args: dict[str, Any] = {
        **command_line(container, env),
        "environment": dict(env),
        **security(pod_spec, container, image_user),
        **resources(container),
        "mounts": mounts(container, volume_sources),
    }
    if container.get("workingDir"):
        args["working_dir"] = container["workingDir"]
    if container.get("stdin") or container.get("tty"):
        raise PodError(f"container {container['name']!r}: stdin/tty containers are not supported locally")
    policy = pod_spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        raise PodError(f"restartPolicy {policy!r} is not one of {sorted(RESTART_POLICIES)}")
    args["restart_policy"] = RESTART_POLICIES[policy] if restart else RESTART_POLICIES["Never"]
    return args
