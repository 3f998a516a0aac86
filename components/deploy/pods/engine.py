"""A pod on the local Docker engine, built the way the kubelet builds one.

* **Sandbox.** A small container holds the pod's network and IPC namespaces and its volumes, as the kubelet's
  pause container does: the pod's containers join it (one IP, ``localhost`` shared), the volumes stay mounted
  while init containers come and go, and ports are published only on it.
* **Volumes.** ``emptyDir`` is a tmpfs volume of the engine's ``local`` driver, its ``sizeLimit`` the tmpfs size,
  owned by group ``fsGroup`` with the setgid bit as the kubelet leaves it; ConfigMap and Secret volumes are tmpfs
  volumes filled through the engine's archive API with each key as a file (``items``, ``defaultMode``, ``mode``
  and ``fsGroup`` honoured: the kubelet also keeps them on tmpfs), always mounted read-only.
  ``hostPath`` (Directory or DirectoryOrCreate) is a bind mount of this machine's directory, as on a one-node
  cluster; the docker runner uses it for the local model store and request log (components/deploy/containers.py).
* **Containers.** Init containers run one after the other and must exit 0; then the containers start in order.
  Each container's arguments come from its spec (``containers.create_args``), its env from
  ``manifests.container_env``. Images are never pulled: they must be on the engine (``make image``).
* **Stop** as a pod deletion: every container's ``preStop`` hook at once, SIGTERM to each when its hook ends,
  SIGKILL at ``terminationGracePeriodSeconds``; then containers, sandbox and volumes are removed.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import components.deploy.pods.containers as container_args
import components.deploy.pods.probes as probes
from components.deploy.pods.manifests import PodError, as_bytes, container_env, memory_bytes, pod_template

DEFAULT_NETWORK = "kfp-mlops-pods"  # one bridge network for every local pod: they reach each other by IP and name
LABEL_POD = "kfp-mlops.io/pod"
LABEL_NAMESPACE = "kfp-mlops.io/pod-namespace"
LABEL_CONTAINER = "kfp-mlops.io/container"  # the container's name in the spec; SANDBOX for the sandbox
LABEL_SPEC = "kfp-mlops.io/pod-spec"  # the pod's metadata and spec (references only, never Secret data), as JSON
SANDBOX = "POD"
SANDBOX_USER = "65535:65535"  # nobody, as the pause container runs
VOLUME_ROOT = "/.kfp-mlops-pod/volumes"  # where the sandbox holds each volume mounted
DEFAULT_GRACE_S = 30  # terminationGracePeriodSeconds' default
DEFAULT_FILE_MODE = 0o644  # ConfigMap and Secret volumes' defaultMode default
LOG_TAIL_LINES = 40
UNSUPPORTED_POD_FIELDS = ("hostNetwork", "hostPID", "hostIPC", "ephemeralContainers")


def docker_client():
    """A client of the engine the environment points at (DOCKER_HOST, else the local socket)."""
    try:
        import docker
    except ImportError:
        raise PodError("the Docker SDK for Python is needed to run pods locally: pip install 'docker>=7'") from None
    try:
        client = docker.from_env()
        client.ping()
    except Exception as err:  # noqa: BLE001 - any failure to reach the engine means the same thing here
        raise PodError(f"no container engine answers ({err}); start Docker (dockerd) or point DOCKER_HOST at one")
    return client


def ensure_network(name: str = DEFAULT_NETWORK, client=None) -> str:
    """Create the pods' bridge network if missing; return its gateway: the host's address as the pods see it
    (bind a server there for pods to reach it)."""
    client = client or docker_client()
    network = None
    for _ in range(2):  # another process may create it between our look and our create
        found = [n for n in client.networks.list(names=[name]) if n.name == name]
        if found:
            network = found[0]
            break
        try:
            # check_duplicate: Docker before 25 would otherwise make a second network of the same name.
            network = client.networks.create(name, driver="bridge", labels={LABEL_POD: ""}, check_duplicate=True)
            break
        except Exception:  # noqa: BLE001,S110 - docker.errors.APIError 409: it exists now; look again
            pass
    if network is None:
        raise PodError(f"cannot create or find the network {name}")
    network.reload()
    configs = network.attrs.get("IPAM", {}).get("Config") or []
    gateway = next((c.get("Gateway") for c in configs if c.get("Gateway")), None)
    if not gateway:
        raise PodError(f"network {name} has no gateway address; remove it (docker network rm {name}) to recreate")
    return gateway


@dataclass
class ExecResult:
    exit_code: int | None  # None when it timed out
    output: str
    timed_out: bool = False


class Pod:
    """A running local pod: its containers, probes, exec, logs and stop. Start one with ``start_pod``."""

    def __init__(self, client, metadata: dict, spec: dict, network: str):
        self.client, self.metadata, self.spec, self.network = client, metadata, spec, network
        self.name, self.namespace = metadata["name"], metadata.get("namespace", "default")
        self.sandbox = None
        self.containers: dict[str, Any] = {}  # the spec's containers by name, then its init containers
        self.init_containers: dict[str, Any] = {}
        self.volumes: list[str] = []
        self.ip: str | None = None
        self.host_ip: str | None = None
        self.started_at: dict[str, float] = {}  # monotonic start of each app container, for probe delays
        self.probe_results: list[probes.ProbeResult] = []
        self.hook_results: dict[str, probes.ProbeResult] = {}  # preStop hooks run by stop()

    # ------------------------------------------------------------ reading the pod

    def spec_of(self, container: str) -> dict:
        for c in self.spec.get("containers", []) + self.spec.get("initContainers", []):
            if c["name"] == container:
                return c
        raise PodError(f"pod {self.name} has no container {container!r}")

    def container(self, name: str):
        found = self.containers.get(name) or self.init_containers.get(name)
        if found is None:
            raise PodError(f"pod {self.name} has no started container {name!r}")
        return found

    def inspect(self, name: str) -> dict:
        """The engine's view of one container (``docker inspect``), fresh."""
        c = self.container(name)
        c.reload()
        return c.attrs

    def port(self, ref: int | str) -> int:
        """A port by number or by a container port's name (as a Service's targetPort names one)."""
        if isinstance(ref, int) or str(ref).isdigit():
            return int(ref)
        for c in self.spec.get("containers", []):
            for p in c.get("ports") or []:
                if p.get("name") == ref:
                    return int(p["containerPort"])
        raise PodError(f"pod {self.name} has no container port named {ref!r}")

    def url(self, port: int | str, path: str = "/") -> str:
        """``http://<pod IP>:<port><path>``: where a Service would send traffic (reachable from this host)."""
        return f"http://{self.ip}:{self.port(port)}{path}"

    def published(self, port: int | str) -> tuple[str, int]:
        """The host address a container port is published on (``start_pod(publish=...)``)."""
        self.sandbox.reload()
        bound = (self.sandbox.attrs["NetworkSettings"]["Ports"] or {}).get(f"{self.port(port)}/tcp") or []
        if not bound:
            raise PodError(f"port {port} of pod {self.name} is not published")
        return bound[0]["HostIp"], int(bound[0]["HostPort"])

    def state(self) -> dict[str, dict[str, Any]]:
        """Each container's state: running, exit code, restarts, started (ISO time)."""
        out = {}
        for name, c in {**self.init_containers, **self.containers}.items():
            c.reload()
            s = c.attrs["State"]
            out[name] = {"running": s["Running"], "exit_code": None if s["Running"] else s["ExitCode"],
                         "restarts": c.attrs.get("RestartCount", 0), "started_at": s.get("StartedAt"),
                         "init": name in self.init_containers}
        return out

    def logs(self, container: str, tail: int | None = None, stderr: bool = True) -> str:
        """The container's output: stdout and stderr merged as the runtime read them, or stdout alone."""
        return self.container(container).logs(tail=tail if tail is not None else "all", stdout=True,
                                              stderr=stderr).decode(errors="replace")

    def exec(self, container: str, command: list[str], timeout_s: float | None = None, user: str = "") -> ExecResult:
        """Run ``command`` in a running container (its env, user and namespaces), as ``kubectl exec`` does."""
        api = self.client.api
        exec_id = api.exec_create(self.container(container).id, [str(a) for a in command], user=user)["Id"]
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["output"] = api.exec_start(exec_id)
            except Exception as err:  # noqa: BLE001 - reported as the exec's output
                result["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            return ExecResult(None, f"timed out after {timeout_s} s", timed_out=True)
        if "error" in result:
            return ExecResult(None, f"exec failed: {result['error']}")
        return ExecResult(api.exec_inspect(exec_id)["ExitCode"], result["output"].decode(errors="replace"))

    # ------------------------------------------------------------ waiting

    def update_config_map(self, name: str, data: Mapping[str, str | bytes]) -> list[str]:
        """ConfigMap ``name`` now holds ``data``: rewrite the files of every volume of this pod that shows it, as the
        kubelet does at its next sync (a file is replaced, not written in place; environment variables taken from a
        ConfigMap keep their values, as on a cluster). Returns the volumes rewritten."""
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        values = as_bytes({name: data})[name]
        updated = []
        for volume in self.spec.get("volumes") or []:
            source = volume.get("configMap")
            if source and source["name"] == name:
                files = _volume_files(volume["name"], "ConfigMap", name, source, values)
                self.sandbox.put_archive(f"{VOLUME_ROOT}/{volume['name']}", _tar(files, fs_group))
                updated.append(volume["name"])
        return updated

    def wait_ready(self, timeout_s: float = 300, max_restarts: int = 2) -> list[probes.ProbeResult]:
        """Run the containers' startup, readiness and liveness probes as the kubelet does until every container
        is ready; raise ``PodNotReady`` (with the probes' last answers and the logs) when that does not happen."""
        return probes.wait_ready(self, timeout_s, max_restarts)

    def probe(self) -> list[probes.ProbeResult]:
        """One round of every container's readiness and liveness probes, now."""
        return probes.probe_once(self)

    def wait_completed(self, timeout_s: float = 600) -> dict[str, int]:
        """Wait until every container exited (a Job's pod); their exit codes. Raises on timeout, with logs."""
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, c in self.containers.items():
            try:
                codes[name] = c.wait(timeout=max(1.0, deadline - time.monotonic()))["StatusCode"]
            except Exception as err:  # noqa: BLE001 - the engine's read timeout
                raise PodError(f"container {name} of pod {self.name} still runs after {timeout_s:.0f} s ({err}); "
                               f"last lines:\n{self.logs(name, LOG_TAIL_LINES)}") from None
        return codes

    # ------------------------------------------------------------ stopping

    def stop(self, grace_period_s: float | None = None, remove: bool = True) -> dict[str, probes.ProbeResult]:
        """Delete the pod as the kubelet does: each running container's preStop hook (all at once), SIGTERM when
        its hook ends, SIGKILL when the grace period is over; then remove it all. Returns the hooks' results."""
        grace = self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S) if grace_period_s is None \
            else grace_period_s
        deadline = time.monotonic() + grace
        running = []
        for name, c in self.containers.items():
            try:
                c.update(restart_policy={"Name": "no"})  # a stopped container stays stopped
                c.reload()
                if c.attrs["State"]["Running"]:
                    running.append(name)
            except Exception:  # noqa: BLE001,S110 - already gone: nothing to stop
                pass
        threads = [threading.Thread(target=self._terminate, args=(name, deadline), daemon=True) for name in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)
        for name in running:
            c = self.containers[name]
            try:
                c.wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - still running at the deadline
                self._signal(c, "SIGKILL")
        if remove:
            self.remove()
        return self.hook_results

    def _terminate(self, name: str, deadline: float) -> None:
        hook = ((self.spec_of(name).get("lifecycle") or {}).get("preStop"))
        if hook:
            self.hook_results[name] = probes.run_handler(self, self.spec_of(name), hook,
                                                         max(1.0, deadline - time.monotonic()), "preStop")
        self._signal(self.containers[name], "SIGTERM")

    @staticmethod
    def _signal(container, signal: str) -> None:
        try:
            container.kill(signal=signal)
        except Exception:  # noqa: BLE001,S110 - it exited meanwhile
            pass

    def remove(self) -> None:
        """Remove the containers, the sandbox and the volumes (no hooks, no grace: ``stop`` first)."""
        for c in [*self.containers.values(), *self.init_containers.values(), self.sandbox]:
            if c is not None:
                try:
                    c.remove(force=True)
                except Exception:  # noqa: BLE001,S110 - already removed
                    pass
        for volume in self.volumes:
            try:
                self.client.volumes.get(volume).remove(force=True)
            except Exception:  # noqa: BLE001,S110 - already removed
                pass

    # ------------------------------------------------------------ building it (start_pod)

    def _labels(self, container: str) -> dict[str, str]:
        return {LABEL_POD: self.name, LABEL_NAMESPACE: self.namespace, LABEL_CONTAINER: container}

    def _docker_name(self, container: str) -> str:
        return f"k8s_{container}_{self.name}_{self.namespace}"

    def _create_volumes(self, configmaps: Mapping[str, Any], secrets: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        sources = {}
        for volume in self.spec.get("volumes") or []:
            kind = next((k for k in ("emptyDir", "configMap", "secret", "hostPath") if k in volume), None)
            if kind is None:
                other = sorted(set(volume) - {"name"})
                raise PodError(f"volume {volume['name']!r} is {other}; the local runner has emptyDir, configMap, "
                               "secret and hostPath volumes")
            if kind == "hostPath":  # a bind mount of this machine's directory, as on a one-node cluster (kind)
                sources[volume["name"]] = (_host_directory(volume), False)
                continue
            options = {"type": "tmpfs", "device": "tmpfs"}
            mount_options = [f"uid=0,gid={fs_group if fs_group is not None else 0}"]
            if kind == "emptyDir":
                # The kubelet makes an emptyDir world-writable, then gives it to fsGroup with the setgid bit.
                mount_options.append("mode=2777" if fs_group is not None else "mode=0777")
                if (volume["emptyDir"] or {}).get("sizeLimit"):
                    mount_options.append(f"size={memory_bytes(volume['emptyDir']['sizeLimit'])}")
            else:
                mount_options.append("mode=0755")
            options["o"] = ",".join(mount_options)
            docker_name = f"{self.name}_{volume['name']}"
            self.client.volumes.create(docker_name, driver="local", driver_opts=options,
                                       labels=self._labels(volume["name"]))
            self.volumes.append(docker_name)
            sources[volume["name"]] = (docker_name, kind != "emptyDir")
        return sources

    def _start_sandbox(self, image: str, volume_sources: Mapping[str, tuple[str, bool]],
                       publish: Mapping[int, int | tuple[str, int]] | None) -> None:
        import docker

        hostname = self.spec.get("hostname") or self.name[:63]
        aliases = [hostname] + ([f"{hostname}.{self.spec['subdomain']}"] if self.spec.get("subdomain") else [])
        ports = {f"{port}/tcp": (bind if isinstance(bind, tuple) else ("127.0.0.1", bind))
                 for port, bind in (publish or {}).items()}
        record = json.dumps({"metadata": self.metadata, "spec": self.spec, "network": self.network})
        self.sandbox = self.client.containers.run(
            image, entrypoint=["sleep"], command=["infinity"], name=self._docker_name(SANDBOX), hostname=hostname,
            detach=True, init=True, read_only=True, user=SANDBOX_USER, cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"], ipc_mode="shareable", network=self.network,
            networking_config={self.network: self.client.api.create_endpoint_config(aliases=aliases)},
            ports=ports, labels={**self._labels(SANDBOX), LABEL_SPEC: record},
            mounts=[docker.types.Mount(f"{VOLUME_ROOT}/{name}", source, type="volume", no_copy=True)
                    for name, (source, _) in volume_sources.items() if not is_host_path(source)],
        )
        self.sandbox.reload()
        settings = self.sandbox.attrs["NetworkSettings"]["Networks"][self.network]
        self.ip, self.host_ip = settings["IPAddress"], settings["Gateway"]

    def _fill_volumes(self, configmaps: Mapping[str, Mapping[str, bytes]],
                      secrets: Mapping[str, Mapping[str, bytes]]) -> None:
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for volume in self.spec.get("volumes") or []:
            if "configMap" in volume:
                kind, source, store, name = "ConfigMap", volume["configMap"], configmaps, volume["configMap"]["name"]
            elif "secret" in volume:
                kind, source, store, name = "Secret", volume["secret"], secrets, volume["secret"]["secretName"]
            else:
                continue
            if name not in store:
                if source.get("optional", False):
                    continue
                raise PodError(f"volume {volume['name']!r} needs {kind} {name}, which does not exist (the pod would "
                               f"wait in ContainerCreating); create it"
                               + (" (kubectl create secret generic ...), here: secrets={...}" if kind == "Secret"
                                  else ""))
            files = _volume_files(volume["name"], kind, name, source, store[name])
            self.sandbox.put_archive(f"{VOLUME_ROOT}/{volume['name']}", _tar(files, fs_group))

    def _run_init(self, spec: dict, image_user: str, env: dict[str, str], volume_sources, timeout_s: float) -> None:
        c = self._create(spec, image_user, env, volume_sources, init=True)
        self.init_containers[spec["name"]] = c
        c.start()
        try:
            code = c.wait(timeout=timeout_s)["StatusCode"]
        except Exception:  # noqa: BLE001 - the engine's read timeout
            raise PodError(f"init container {spec['name']} of pod {self.name} did not finish within {timeout_s:.0f} s; "
                           f"last lines:\n{self.logs(spec['name'], LOG_TAIL_LINES)}") from None
        if code != 0:
            raise PodError(f"init container {spec['name']} of pod {self.name} exited with {code} (the kubelet "
                           "would retry it with back-off; a local run stops here); last lines:\n"
                           f"{self.logs(spec['name'], LOG_TAIL_LINES)}")

    def _start_app(self, spec: dict, image_user: str, env: dict[str, str], volume_sources) -> None:
        c = self._create(spec, image_user, env, volume_sources, init=False)
        self.containers[spec["name"]] = c
        c.start()
        self.started_at[spec["name"]] = time.monotonic()
        hook = (spec.get("lifecycle") or {}).get("postStart")
        if hook:
            result = probes.run_handler(self, spec, hook, DEFAULT_GRACE_S, "postStart")
            if not result.success:
                raise PodError(f"postStart hook of container {spec['name']} failed: {result.action} -> {result.detail}")

    def _create(self, spec: dict, image_user: str, env: dict[str, str], volume_sources, *, init: bool):
        import docker

        args = container_args.create_args(spec, self.spec, env, image_user, volume_sources, restart=not init)
        mounts = [docker.types.Mount(m["target"], m["source"], type="bind", read_only=m["read_only"])
                  if is_host_path(m["source"]) else
                  docker.types.Mount(m["target"], m["source"], type="volume", read_only=m["read_only"], no_copy=True)
                  for m in args.pop("mounts")]
        sandbox = f"container:{self.sandbox.id}"
        return self.client.containers.create(
            spec["image"], name=self._docker_name(spec["name"]), labels=self._labels(spec["name"]), mounts=mounts,
            network_mode=sandbox, ipc_mode=sandbox,
            pid_mode=sandbox if self.spec.get("shareProcessNamespace") else None, **args)


def is_host_path(source: str) -> bool:
    """A volume source that is a directory of this machine (hostPath), not an engine volume (never absolute)."""
    return source.startswith("/")


def _host_directory(volume: dict) -> str:
    """The directory of a hostPath volume, checked (``type``: Directory or DirectoryOrCreate, absolute, no ..)."""
    source = volume["hostPath"]
    path, kind = str(source.get("path", "")), source.get("type", "")
    if not path.startswith("/") or ".." in path.split("/"):
        raise PodError(f"hostPath volume {volume['name']!r}: {path!r} is not an absolute path without '..'")
    if kind == "DirectoryOrCreate":
        Path(path).mkdir(parents=True, exist_ok=True)
    elif kind not in ("", "Directory"):
        raise PodError(f"hostPath volume {volume['name']!r}: type {kind!r} is not supported locally "
                       "(Directory or DirectoryOrCreate)")
    if not Path(path).is_dir():
        raise PodError(f"hostPath volume {volume['name']!r}: {path} is not a directory on this machine")
    return path


def _volume_files(volume: str, kind: str, name: str, source: Mapping[str, Any],
                  data: Mapping[str, bytes]) -> list[tuple[str, bytes, int]]:
    """(path, bytes, mode) of each file a ConfigMap or Secret volume shows."""
    default_mode = source.get("defaultMode", DEFAULT_FILE_MODE)
    if not source.get("items"):
        return [(key, value, default_mode) for key, value in sorted(data.items())]
    files = []
    for item in source["items"]:
        if item["key"] not in data:
            if source.get("optional", False):
                continue
            raise PodError(f"volume {volume!r}: {kind} {name} has no key {item['key']!r}")
        files.append((item["path"], data[item["key"]], item.get("mode", default_mode)))
    return files


def _tar(files: list[tuple[str, bytes, int]], fs_group: int | None) -> bytes:
    """A tar of the files owned by root and ``fs_group``, as the kubelet leaves them (group-readable under it)."""
    buffer, now, dirs = io.BytesIO(), time.time(), set()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data, mode in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                directory = "/".join(parts[:i])
                if directory not in dirs:
                    dirs.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime, info.gid = tarfile.DIRTYPE, 0o755, now, fs_group or 0
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.uid, info.gid = len(data), now, 0, fs_group or 0
            info.mode = (mode | 0o440) if fs_group is not None else mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def start_pod(workload: dict, *, name: str | None = None, configmaps: Mapping[str, Mapping[str, Any]] | None = None,
              secrets: Mapping[str, Mapping[str, Any]] | None = None, network: str = DEFAULT_NETWORK,
              publish: Mapping[int, int | tuple[str, int]] | None = None, client=None,
              init_timeout_s: float = 600) -> Pod:
    """Start the pods a rendered workload (Pod, Deployment, Job, CronJob, ...) runs, one of them, here.

    ``configmaps`` and ``secrets``: ``{name: {key: str or bytes}}``, what the cluster would hold (e.g.
    ``config_maps(render(...))`` with a local endpoint put in, and the Secrets you would create with kubectl).
    ``publish``: container port -> host port (or ``(host address, port)``), bound on 127.0.0.1 by default; the pod
    is reachable on its own IP from this host anyway (``Pod.url``). Returns once every container started; call
    ``wait_ready`` for the probes. Whatever started is removed again when a step fails.
    """
    template = pod_template(workload)
    metadata, spec = dict(template["metadata"]), template["spec"]
    name = name or metadata.get("name") or f"{workload['metadata']['name']}-{uuid.uuid4().hex[:5]}"
    metadata.update(name=name, uid=str(uuid.uuid4()))
    bad = [f for f in UNSUPPORTED_POD_FIELDS if spec.get(f)]
    if bad:
        raise PodError(f"pod {name}: {bad} cannot be run locally")
    client = client or docker_client()
    if client.containers.list(all=True, filters={"label": f"{LABEL_POD}={name}"}):
        raise PodError(f"a pod named {name} already exists here; stop it first (pods.attach({name!r}).stop())")
    users = {}
    for c in spec.get("initContainers", []) + spec["containers"]:
        try:
            users[c["name"]] = client.images.get(c["image"]).attrs["Config"].get("User") or ""
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound and friends
            raise PodError(f"image {c['image']} (container {c['name']!r}) is not on this engine and a local run "
                           "never pulls: build it (make image) or tag yours with that name") from None
    configmaps, secrets = as_bytes(configmaps or {}), as_bytes(secrets or {})
    pod = Pod(client, metadata, spec, network)
    try:
        ensure_network(network, client)
        sources = pod._create_volumes(configmaps, secrets)
        pod._start_sandbox(spec["containers"][0]["image"], sources, publish)
        pod._fill_volumes(configmaps, secrets)
        fields = {"metadata": metadata, "spec": spec, "podIP": pod.ip, "hostIP": pod.host_ip,
                  "nodeName": client.info().get("Name")}
        envs = {c["name"]: container_env(c, fields, configmaps, secrets)
                for c in spec.get("initContainers", []) + spec["containers"]}
        for c in spec.get("initContainers", []):
            pod._run_init(c, users[c["name"]], envs[c["name"]], sources, init_timeout_s)
        for c in spec["containers"]:
            pod._start_app(c, users[c["name"]], envs[c["name"]], sources)
    except BaseException:
        pod.stop(grace_period_s=0)
        raise
    return pod


def attach(name: str, client=None) -> Pod:
    """The pod ``name`` started earlier, maybe by another process (to probe, exec, read logs or stop it)."""
    client = client or docker_client()
    found = client.containers.list(all=True, filters={"label": f"{LABEL_POD}={name}"})
    sandbox = next((c for c in found if c.labels.get(LABEL_CONTAINER) == SANDBOX), None)
    if sandbox is None:
        raise PodError(f"no pod named {name} runs here")
    record = json.loads(sandbox.labels[LABEL_SPEC])
    pod = Pod(client, record["metadata"], record["spec"], record["network"])
    pod.sandbox = sandbox
    settings = sandbox.attrs["NetworkSettings"]["Networks"].get(pod.network) or {}
    pod.ip, pod.host_ip = settings.get("IPAddress"), settings.get("Gateway")
    init_names = {c["name"] for c in pod.spec.get("initContainers", [])}
    for c in found:
        role = c.labels.get(LABEL_CONTAINER)
        if role and role != SANDBOX:
            (pod.init_containers if role in init_names else pod.containers)[role] = c
            pod.started_at[role] = time.monotonic()
    pod.volumes = [v.name for v in client.volumes.list(filters={"label": f"{LABEL_POD}={name}"})]
    return pod


def list_pods(client=None) -> list[str]:
    """The names of the local pods on this engine."""
    client = client or docker_client()
    return sorted(c.labels[LABEL_POD] for c in client.containers.list(all=True, filters={"label": LABEL_POD})
                  if c.labels.get(LABEL_CONTAINER) == SANDBOX)
