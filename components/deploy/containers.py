"""Deploy under ``mlops run --runner docker``: the serving pod of the manifests, run as containers on this machine.

Two halves, on either side of the Docker engine:

* In the deploy step's container, ``deploy_containers`` packs the model into the .mar, asks the run's serving
  broker (``components.deploy.broker``: a Unix socket of the ``mlops run`` process) to serve it, then
  smoke-tests the endpoint exactly as the local deploy does. The step never reaches the Docker engine.
* In ``mlops run`` itself, ``serve_release`` does what the cluster's deploy step and kubelet do: it publishes
  the .mar as a release to the local model store (``<serving.home>/releases/<model>``), renders the manifests
  (``kubectl kustomize``, from this checkout, at that moment: nothing is restated here, so nothing can drift),
  applies the release fields the Kubernetes deploy applies (``kubernetes.release.render_release``) and runs the
  serving Deployment's pod with ``components.deploy.pods``: the init container fetches the release,
  TorchServe and the auth proxy start from the serving image with the Deployment's commands, environment,
  volumes, security settings, limits and probes. What a cluster supplies comes from the serving home: the
  Secrets are its ``token`` (clients) and ``source-token`` (the pipeline), the storage ConfigMap points the
  model store and the request log at local directories (mounted at the same path, so every path in the
  deployment record means the same file inside and outside), and the auth proxy's port is published on
  ``serving.host:serving.inference_port``, TorchServe's metrics on ``127.0.0.1:serving.metrics_port``.

``ContainerServing(home)`` is the status and stop of a home served this way (``serving_status``,
``stop_serving``); ``served_from(home)`` picks it or ``serving.server.LocalTorchServe`` by the home's
``state.json``, so ``mlops serve status|stop`` and every deploy work on both kinds.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from components.core.names import (
    MODEL_STORE_ENV,
    REQUEST_LOG_ENV,
    SERVING_DEPLOYMENT,
    SERVING_SOURCE_TOKEN_SECRET,
    SERVING_TOKEN_SECRET,
    STORAGE_CONFIG_MAP,
)
from components.deploy.checks import SmokeTest, archive_settings, model_version_of
from components.deploy.kubernetes.release import (
    FETCH_CONTAINER,
    SERVER_CONTAINER,
    Release,
    find_named,
    render_release,
)
from components.deploy.pods.manifests import upsert_env

RUNNER = "docker"  # state.json's "runner" when the home is served by the serving pod's containers
RELEASES_DIR = "releases"  # under the serving home: the local model store, one release store per model
LOGS_DIR = "logs"
SERVING_CONFIG_MAP = "kfp-mlops-serving-config"
PROXY_CONTAINER = "auth-proxy"
INFERENCE_PORT = "inference"  # the auth proxy's port name in the Deployment
METRICS_PORT = "metrics"  # TorchServe's
KEY_FILE = "key_file.json"  # TorchServe writes it into its working directory
# Asks TorchServe's management API, inside its container, how many workers are READY (for `mlops serve status`).
_WORKERS_READY = """import json, sys, urllib.request
config, key_file, model = sys.argv[1:4]
settings = dict(line.split("=", 1) for line in open(config) if "=" in line and not line.lstrip().startswith("#"))
address = settings.get("management_address", "http://127.0.0.1:8081").strip()
keys = json.load(open(key_file))
request = urllib.request.Request(address + "/models/" + model,
                                 headers={"Authorization": "Bearer " + keys["management"]["key"]})
print(sum(w.get("status") == "READY" for w in json.load(urllib.request.urlopen(request, timeout=5))[0]["workers"]))
"""


# ---------------------------------------------------------------- the deploy step's side


def deploy_containers(model_dir: str | Path, dataset_dir: str | Path, serving, broker_socket: str,
                      work_dir: str | Path, *, smoke_images: int = 16, min_smoke_accuracy: float = 0.5) -> dict[str, Any]:
    """Pack ``model_dir`` into ``work_dir``, have the run's serving broker serve it from containers, smoke-test it.

    Returns the deployment record (as ``deploy_local``'s, plus ``runner``, the serving image and containers).
    Raises, after asking the broker to stop the new pod, when the smoke test fails.
    """
    from components.deploy.broker import request
    from serving.archive import build_mar

    version = model_version_of(model_dir)
    smoke = SmokeTest.of_dataset(dataset_dir, smoke_images, min_smoke_accuracy)
    model_config = archive_settings(serving)
    mar = build_mar(model_dir, work_dir, serving.model_name, version, **model_config)
    print(f"[deploy] asking the run's serving broker to serve {mar.name} (model v{version}) from containers",
          flush=True)
    record = request(broker_socket, {"op": "serve", "archive": str(mar), "model_version": version,
                                     "model_dir": str(model_dir), "dataset_dir": str(dataset_dir)},
                     timeout_s=serving.startup_timeout_s + 300)
    print(f"[deploy] smoke test: {smoke.count} test images to {record['endpoint']}", flush=True)
    result = smoke.run(record["endpoint"], version, token_file=record["source_token_file"])
    if result["failed"]:
        request(broker_socket, {"op": "stop"}, timeout_s=300)
        details = "\n  ".join(result["problems"][:10]) or "(all answered)"
        raise RuntimeError(f"smoke test of {record['endpoint']} failed, serving containers stopped: "
                           f"{result['summary']}. Problems:\n  {details}\nLogs: {record['logs']}")
    print(f"[deploy] smoke test passed: accuracy {result['accuracy']:.2f} on {smoke.count} images, "
          f"{result['latency_ms_mean']:.1f} ms per request", flush=True)
    return {**record, "model_config": model_config, "smoke_test_images": smoke.count,
            "smoke_test_accuracy": result["accuracy"], "smoke_test_latency_ms_mean": result["latency_ms_mean"]}


# ---------------------------------------------------------------- mlops run's side


def apply_release(deployment: dict, configuration: dict) -> dict:
    """``deployment`` with a release configuration (``render_release``) merged in, as the API server's
    server-side apply does: labels and annotations by key, containers by name, env by name, images."""
    out = copy.deepcopy(deployment)
    for part in ("metadata", "template"):
        source = configuration["metadata"] if part == "metadata" else configuration["spec"]["template"]["metadata"]
        target = out["metadata"] if part == "metadata" else out["spec"]["template"]["metadata"]
        for key in ("labels", "annotations"):
            target.setdefault(key, {}).update(source.get(key, {}))
    pod = out["spec"]["template"]["spec"]
    for group in ("initContainers", "containers"):
        for patch in configuration["spec"]["template"]["spec"].get(group, []):
            target = next(c for c in pod[group] if c["name"] == patch["name"])
            if "image" in patch:
                target["image"] = patch["image"]
            target["env"] = upsert_env(target.get("env") or [], patch.get("env", []))
    return out


def local_pod_spec(deployment: dict, *, store: Path, log_dir: Path, extra_env: dict[str, str]) -> dict:
    """The serving Deployment as one machine runs it, patched as a one-node cluster's overlay would patch it:
    the model store and the request-log directory are this machine's directories (hostPath volumes, mounted at
    their own paths, so every path in the records means the same file inside and out), and the containers
    run as this user when it is not root (``pods.local_identity``: a non-root user cannot hand files to
    another uid)."""
    out = copy.deepcopy(deployment)
    spec = out["spec"]["template"]["spec"]
    spec["volumes"] = [*spec.get("volumes", []),
                       {"name": "local-model-store", "hostPath": {"path": str(store), "type": "Directory"}},
                       {"name": "local-request-log", "hostPath": {"path": str(log_dir), "type": "Directory"}}]
    fetch = find_named(spec["initContainers"], FETCH_CONTAINER, "init container")
    fetch.setdefault("volumeMounts", []).append({"name": "local-model-store", "mountPath": str(store),
                                                 "readOnly": True})
    server = find_named(spec["containers"], SERVER_CONTAINER, "container")
    server.setdefault("volumeMounts", []).append({"name": "local-request-log", "mountPath": str(log_dir)})
    server["env"] = upsert_env(server.get("env") or [], [{"name": k, "value": v} for k, v in extra_env.items()])
    uid, gid = local_identity()
    if uid is not None:
        spec.setdefault("securityContext", {}).update(runAsUser=uid, runAsGroup=gid, fsGroup=gid)
        for container in spec["initContainers"] + spec["containers"]:
            context = container.setdefault("securityContext", {})
            context.update({k: v for k, v in (("runAsUser", uid), ("runAsGroup", gid)) if k in context})
    return out


def local_identity() -> tuple[int | None, int | None]:
    """Who the pod's containers run as here: None (the manifests' runAsUser and runAsGroup) when this process is
    root, which hands the host directories to that uid; else this user's uid and gid, who owns them."""
    return (None, None) if os.getuid() == 0 else (os.getuid(), os.getgid())


def pod_name(home: Path) -> str:
    """One serving pod per serving home, as one server per home locally."""
    return f"{SERVING_DEPLOYMENT}-{hashlib.sha256(str(home).encode()).hexdigest()[:8]}"


def give_to(path: Path, uid: int | None, gid: int | None, *, recursive: bool = False) -> None:
    """Root only: hand a host directory the pod or the steps write to the uid they run as (local_identity)."""
    if os.getuid() != 0 or uid is None:
        return
    for item in [path, *(path.rglob("*") if recursive else [])]:
        os.chown(item, uid, gid if gid is not None else -1, follow_symlinks=False)


def request_log_dir_of(serving, home: Path) -> Path:
    """The local request-log directory of a containers deploy (``serving.request_log_dir``, "" = home/requests)."""
    if str(serving.request_log_dir).startswith("s3://"):
        raise ValueError("serving.request_log_dir is an s3:// prefix, which the serving containers cannot reach "
                         "from this machine's loopback: leave it empty (<serving.home>/requests) or give a directory "
                         "for --runner docker")
    return Path(serving.request_log_dir).resolve() if serving.request_log_dir else home / "requests"


def prepare_home(serving, home: Path, step_uid: int | None, step_gid: int | None) -> dict[str, Path]:
    """Before the run: the serving home, its tokens and the request-log directory exist (the step containers
    mount them), and the steps' uid may read the pipeline's own token."""
    from serving.server import SOURCE_TOKEN_FILE, TOKEN_FILE, ensure_token_file

    home.mkdir(parents=True, exist_ok=True)
    ensure_token_file(home / TOKEN_FILE)
    source_token = ensure_token_file(home / SOURCE_TOKEN_FILE)
    give_to(source_token, step_uid, step_gid)  # the deploy and monitor steps send it, as on the cluster
    log_dir = request_log_dir_of(serving, home)
    log_dir.mkdir(parents=True, exist_ok=True)
    return {"home": home, "request_log_dir": log_dir}


def _pod_user(spec: dict, container: str) -> tuple[int | None, int | None]:
    chosen = find_named(spec["containers"] + spec["initContainers"], container, "container")
    pick = lambda key: (chosen.get("securityContext") or {}).get(key, (spec.get("securityContext") or {}).get(key))  # noqa: E731
    return pick("runAsUser"), pick("runAsGroup")


def serve_release(archive: str | Path, model_version: str, serving, home: str | Path, *, overlay: str | Path,
                  serving_image: str, model_dir: str | Path | None = None, dataset_dir: str | Path | None = None,
                  run_id: str = "") -> dict[str, Any]:
    """Serve the .mar ``archive`` from the serving pod of the manifests on the local Docker engine; return the
    deployment record once every probe passes (also written to ``home/state.json``). What runs from ``home``
    already (processes or containers) is stopped first."""
    from components.core.localfiles import atomic_write_json
    from components.core.releases import publish
    from components.deploy import pods
    from components.deploy.kubernetes.deploy import _served_model
    from serving.processes import LOOPBACK, port_in_use
    from serving.request_log import MAX_AGE_ENV, MAX_BYTES_ENV
    from serving.server import SOURCE_TOKEN_FILE, STATE_FILE, TOKEN_FILE, _url_host

    home = Path(home).resolve()
    archive = Path(archive)
    running = served_from(home)
    if running.status()["running"]:
        print(f"[serve] replacing the server running from {home}", flush=True)
        running.stop(quiet=True)
    for role, address, port in (("inference", serving.host, serving.inference_port),
                                ("metrics", LOOPBACK, serving.metrics_port)):
        if port_in_use(address, port):
            raise RuntimeError(f"cannot serve on {address}:{port} ({role}): something listens there. Stop it "
                               "('mlops serve stop' for a server of another home) or choose another port.")

    objects = pods.render(overlay)  # the release below sets serving_image on every container
    deployment = pods.find(objects, "Deployment", SERVING_DEPLOYMENT)
    served_name, mar_file = _served_model(find_named(pods.pod_template(deployment)["spec"]["containers"],
                                                     SERVER_CONTAINER, "container"))
    if served_name != serving.model_name or archive.name != mar_file:
        raise RuntimeError(f"the serving Deployment loads {served_name}={mar_file}, not {serving.model_name}="
                           f"{archive.name}: set serving.model_name to {served_name!r} or change the manifests")

    # The release, as the Kubernetes deploy publishes it: the pod's init container fetches exactly these bytes.
    store = home / RELEASES_DIR / serving.model_name
    with _staged(archive) as release_dir:
        manifest = publish(release_dir, str(store))
    model_store = home / "model-store"  # the served archive, where the evaluate step looks for the champion
    model_store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, model_store / archive.name)
    release = Release(serving.model_name, model_version, manifest["version"], str(store), image=serving_image,
                      run_id=run_id)
    log_dir = request_log_dir_of(serving, home)
    log_dir.mkdir(parents=True, exist_ok=True)
    deployment = local_pod_spec(
        apply_release(deployment, render_release(deployment, release)), store=store, log_dir=log_dir,
        extra_env={MAX_BYTES_ENV: str(int(serving.request_log_max_mb * 2**20)),
                   MAX_AGE_ENV: str(float(serving.request_log_max_age_s))})
    pod_spec = deployment["spec"]["template"]["spec"]
    give_to(log_dir, *_pod_user(pod_spec, SERVER_CONTAINER), recursive=True)
    give_to(store, *_pod_user(pod_spec, FETCH_CONTAINER), recursive=True)

    configmaps = pods.config_maps(objects)
    configmaps[STORAGE_CONFIG_MAP].update({REQUEST_LOG_ENV: str(log_dir).encode(), MODEL_STORE_ENV: str(store).encode()})
    secrets = {secret: {"token": (home / file).read_bytes()} for secret, file in
               {SERVING_TOKEN_SECRET: TOKEN_FILE, SERVING_SOURCE_TOKEN_SECRET: SOURCE_TOKEN_FILE}.items()}
    ports = {p.get("name"): p["containerPort"] for c in pod_spec["containers"] for p in c.get("ports", [])}
    publish_ports = {ports[INFERENCE_PORT]: (serving.host, serving.inference_port),
                     ports[METRICS_PORT]: (LOOPBACK, serving.metrics_port)}
    print(f"[serve] starting the serving pod {pod_name(home)} from {serving_image} (release "
          f"{release.release_id[:12]} of model v{model_version}) on {serving.host}:{serving.inference_port}",
          flush=True)
    pod = pods.start_pod(deployment, name=pod_name(home), configmaps=configmaps, secrets=secrets,
                         publish=publish_ports, init_timeout_s=serving.startup_timeout_s)
    try:
        pod.wait_ready(timeout_s=serving.startup_timeout_s)
    except BaseException:
        _save_logs(pod, home / LOGS_DIR)
        pod.stop(grace_period_s=0)
        raise
    from components.core.features import MODEL_REFERENCE_FILE  # imports pandas: only once a pod serves

    model_reference = Path(model_dir) / MODEL_REFERENCE_FILE if model_dir else None
    record = {
        "runner": RUNNER,
        "endpoint": f"http://{_url_host(serving.host)}:{serving.inference_port}/predictions/{serving.model_name}",
        "management_endpoint": None,  # inside the pod only, as on the cluster
        "metrics_endpoint": f"http://{LOOPBACK}:{serving.metrics_port}/metrics",
        "token_file": str(home / TOKEN_FILE),
        "source_token_file": str(home / SOURCE_TOKEN_FILE),
        "max_request_bytes": _proxy_limit(pod_spec),
        "request_log_dir": str(log_dir),
        "model_name": serving.model_name,
        "model_version": model_version,
        "model_dir": str(model_dir) if model_dir else None,
        "dataset_dir": str(dataset_dir) if dataset_dir else None,
        "model_reference": str(model_reference) if model_reference and model_reference.is_file() else None,
        "home": str(home),
        "release": {"store": str(store), "version": release.release_id},
        "manifests": str(overlay),
        "pod": pod.name,
        "serving_image": serving_image,
        "serving_image_id": pod.client.images.get(serving_image).id,
        "containers": {name: pod.inspect(name)["Id"] for name in pod.containers},
        "pid": pod.inspect(SERVER_CONTAINER)["State"].get("Pid"),
        "proxy_pid": pod.inspect(PROXY_CONTAINER)["State"].get("Pid"),
        "logs": str(home / LOGS_DIR),
        "log": str(home / LOGS_DIR / f"{SERVER_CONTAINER}.log"),
        "proxy_log": str(home / LOGS_DIR / f"{PROXY_CONTAINER}.log"),
    }
    atomic_write_json(home / STATE_FILE, record)
    print(f"[serve] the serving pod is ready: {record['endpoint']} (containers {', '.join(pod.containers)})",
          flush=True)
    return record


class _staged:
    """A private temporary directory holding only ``archive``: a release is a directory's files."""

    def __init__(self, archive: Path):
        self.archive = archive

    def __enter__(self) -> Path:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="kfp-mlops-release-")
        directory = Path(self.tmp.name) / "release"
        directory.mkdir()
        shutil.copy2(self.archive, directory / self.archive.name)
        return directory

    def __exit__(self, *exc) -> None:
        self.tmp.cleanup()


def _proxy_limit(pod_spec: dict) -> int | None:
    command = next(c for c in pod_spec["containers"] if c["name"] == PROXY_CONTAINER).get("command", [])
    return int(command[command.index("--max-request-bytes") + 1]) if "--max-request-bytes" in command else None


def _pod_of(state: dict[str, Any]):
    """The serving pod a state file names, or None when it is gone."""
    from components.deploy import pods

    if not state.get("pod"):
        return None
    try:
        return pods.attach(state["pod"])
    except pods.PodError as err:
        if "no pod named" in str(err):
            return None
        raise


def serving_status(home: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """``LocalTorchServe.status()``'s answer for a home served by containers: each container running, its
    liveness and readiness probes passing, and ``/ping`` answering through the published endpoint with the
    client token. The containers' logs are saved under ``home/logs``."""
    import requests

    from serving.client import read_token

    home = Path(home)
    pod = _pod_of(state)
    base = {"runner": RUNNER, "home": str(home), "endpoint": state.get("endpoint"), "model": state.get("model_name"),
            **{k: state.get(k) for k in ("model_version", "model_dir", "dataset_dir", "model_reference",
                                         "request_log_dir", "token_file", "source_token_file", "pod",
                                         "serving_image", "serving_image_id", "log", "proxy_log")}}
    if pod is None:
        return {**base, "running": False, "torchserve_running": False, "proxy_running": False, "healthy": False,
                "workers_ready": 0, "problem": "not running", "pid": None, "proxy_pid": None, "containers": {}}
    states = {name: s for name, s in pod.state().items() if not s["init"]}
    probes = pod.probe()
    _save_logs(pod, home / LOGS_DIR)
    stopped = [name for name, s in states.items() if not s["running"]]
    failed = [f"{r.container} {r.kind}: {r.detail}" for r in probes if not r.success]
    problem = (f"containers not running: {', '.join(stopped)}" if stopped else
               f"probes failing: {'; '.join(failed)}"[:300] if failed else None)
    workers = _workers_ready(pod, state.get("model_name") or "") if states.get(SERVER_CONTAINER, {}).get("running") else 0
    if problem is None:
        try:
            ping = requests.get(f"{state['endpoint'].rsplit('/predictions/', 1)[0]}/ping", timeout=5,
                                headers={"Authorization": f"Bearer {read_token(state['token_file'])}"})
            if ping.status_code != 200 or "Healthy" not in ping.text:
                problem = f"/ping through the auth proxy answered HTTP {ping.status_code}: {ping.text[:100]}"
        except (OSError, KeyError, requests.RequestException) as err:
            problem = f"/ping through the auth proxy: {type(err).__name__}: {err}"[:300]
    pids = {name: pod.inspect(name)["State"].get("Pid") or None for name in states}
    return {**base, "running": bool(states) and not stopped, "healthy": problem is None and workers > 0,
            "problem": problem if problem or workers else "no READY worker",
            "workers_ready": workers,
            "torchserve_running": states.get(SERVER_CONTAINER, {}).get("running", False),
            "proxy_running": states.get(PROXY_CONTAINER, {}).get("running", False),
            "pid": pids.get(SERVER_CONTAINER), "proxy_pid": pids.get(PROXY_CONTAINER),
            "containers": {name: {"running": s["running"], "restarts": s["restarts"], "exit_code": s["exit_code"],
                                  "probes_passing": not any(not r.success for r in probes if r.container == name)}
                           for name, s in states.items()}}


def _workers_ready(pod, model_name: str) -> int:
    """READY workers of the model, from TorchServe's management API inside its container (its address from
    the config.properties the container was started with, its key from the key file TorchServe writes)."""
    server = pod.spec_of(SERVER_CONTAINER)
    command = server.get("command", []) + server.get("args", [])
    config = command[command.index("--ts-config") + 1] if "--ts-config" in command else ""
    key_file = f"{server.get('workingDir', '/home/model-server')}/{KEY_FILE}"
    result = pod.exec(SERVER_CONTAINER, ["python", "-c", _WORKERS_READY, config, key_file, model_name], timeout_s=15)
    try:
        return int(result.output.strip().splitlines()[-1]) if result.exit_code == 0 else 0
    except (ValueError, IndexError):
        return 0


def _save_logs(pod, log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in [*pod.init_containers, *pod.containers]:
        (log_dir / f"{name}.log").write_text(pod.logs(name, tail=2000))


def stop_serving(home: str | Path, state: dict[str, Any], quiet: bool = False) -> dict[str, Any]:
    """Stop the serving pod of ``home`` as the kubelet would (preStop hooks: the proxy drains, TorchServe's
    request log is flushed; then SIGTERM within the grace period), keep its logs in ``home/logs`` and record
    the stop in ``state.json``."""
    from components.core.localfiles import atomic_write_json
    from serving.server import STATE_FILE

    home = Path(home)
    pod = _pod_of(state)
    if pod is None:
        if not quiet:
            print(f"[serve] no serving containers are running from {home}; nothing to stop.", flush=True)
        return {"stopped": False, "home": str(home)}
    if not quiet:
        print(f"[serve] stopping the serving pod {pod.name} (preStop hooks first: the request log is flushed)",
              flush=True)
    hooks = pod.stop(remove=False)
    _save_logs(pod, home / LOGS_DIR)
    pod.remove()
    atomic_write_json(home / STATE_FILE, {**state, "pid": None, "proxy_pid": None,
                                          "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if not quiet:
        print(f"[serve] stopped the serving containers {', '.join(pod.containers)} of {home}; their logs are "
              f"in {home / LOGS_DIR}.", flush=True)
    return {"stopped": True, "containers": list(pod.containers), "home": str(home),
            "pre_stop": {name: {"success": r.success, "detail": r.detail} for name, r in hooks.items()},
            "pid": state.get("pid"), "proxy_pid": state.get("proxy_pid")}


class ContainerServing:
    """Status and stop of a serving home served by containers (the ``ServingBackend`` calls other than start:
    a pod is started by ``serve_release``)."""

    def __init__(self, home: str | Path):
        self.home = Path(home).resolve()

    def state(self) -> dict[str, Any]:
        import json

        from serving.server import STATE_FILE

        try:
            return json.loads((self.home / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        return serving_status(self.home, self.state())

    def stop(self, quiet: bool = False) -> dict[str, Any]:
        return stop_serving(self.home, self.state(), quiet=quiet)


def served_from(home: str | Path):
    """What serves from ``home`` per its ``state.json``, as something with ``status()`` and ``stop()``: the
    serving pod's containers (``mlops run --runner docker``) or the local processes (``LocalTorchServe``)."""
    from serving.server import LocalTorchServe

    serving = ContainerServing(home)
    return serving if serving.state().get("runner") == RUNNER else LocalTorchServe(home)
