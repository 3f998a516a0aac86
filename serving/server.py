"""Run the model behind a local TorchServe and the auth proxy: start, stop, status.

Everything the rest of the project needs from a model server is the small
``ServingBackend`` protocol below, so another server (KServe, a FastAPI app)
could replace TorchServe without touching the deploy and monitor steps.

``LocalTorchServe(home)`` keeps one server per home directory: the model
store, logs, the rendered config, the clients' bearer token (``token``), the
pipeline's own token (``source-token``: its requests may tag themselves with
``X-Request-Source``), TorchServe's ``key_file.json`` (its internal keys, read
only by the proxy and the health check) and ``state.json``, the deployment
record the monitor reads.

Clients never reach TorchServe directly, as on Kubernetes: ``serving/auth_proxy.py``
listens on the public ``host:inference_port``, checks the client's token, refuses
oversized bodies with a 413 before reading them and forwards the rest with
TorchServe's inference key. TorchServe binds every one of its ports to loopback.
Both processes run in sessions of their own, so they keep serving after the
process that started them (``mlops run``) has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests

from components.core.localfiles import atomic_write_json
from serving.archive import archive_workers
from serving.client import read_token
from serving.processes import LOOPBACK, command_line, descendants, free_ports, pid_alive, port_in_use, terminate
from serving.request_log import MAX_AGE_ENV, MAX_BYTES_ENV
from serving.request_spool import REQUEST_LOG_ENV, SPOOL_ENV, drain
from serving.torchserve_config import (
    DEFAULT_JOB_QUEUE_SIZE,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_NETTY_CLIENT_THREADS,
    DEFAULT_NETTY_THREADS,
    DEFAULT_TOKEN_EXPIRATION_MIN,
    DEFAULT_VMARGS,
    render_config,
)
from serving.unbatched_route import UNBATCHED_SUFFIX, unbatched_name, write_unbatched_archive

LOG_CONFIG = Path(__file__).with_name("log4j2.xml")  # TorchServe's own logs, trimmed (see the file)
KEY_FILE = "key_file.json"  # TorchServe writes it into its working directory
TOKEN_FILE = "token"  # the clients' bearer token, plain text
SOURCE_TOKEN_FILE = "source-token"  # the pipeline's smoke test and replay: may set X-Request-Source
STATE_FILE = "state.json"
ROLLOUT_FILE = "rollout.json"  # the proxy's challenger (serving/rollout_router.py); absent = none
CHALLENGER_DIR = "challenger"  # the home of a challenger's server during a shadow or canary rollout
PROXY_MODULE = "serving.auth_proxy"
PROXY_LOG = "auth_proxy.out"
# TorchServe's own body limit sits above the proxy's, so only the proxy ever refuses a size: it answers 413
# before reading the body, where TorchServe's Netty frontend may drop the connection without an answer.
TORCHSERVE_REQUEST_HEADROOM = 1024 * 1024
PID_FILE = ".model_server.pid"  # TorchServe's launcher keeps the frontend's pid here, in its temp dir
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"


class ServingBackend(Protocol):
    """What the deploy and monitor steps need from a model server."""

    def start(self, mar_path: Path, model_name: str, host: str, inference_port: int, management_port: int,
              metrics_port: int, workers: int, request_log_dir: str | Path | None, timeout_s: float) -> dict[str, Any]:
        """Serve the model; return the deployment record once it answers."""
        ...

    def stop(self) -> dict[str, Any]:
        """Stop serving (a no-op if nothing runs)."""
        ...

    def status(self) -> dict[str, Any]:
        """Whether it serves, and where."""
        ...


def curl_example(record: dict[str, Any]) -> str:
    """A shell line that sends digit.png to the endpoint with the client token read from the token file."""
    token_file = shlex.quote(str(record["token_file"]))
    return (f"curl -H \"Authorization: Bearer $(cat {token_file})\" -H \"Content-Type: image/png\" "
            f"--data-binary @digit.png {record['endpoint']}")


def ensure_token_file(path: Path) -> Path:
    """``path`` holding one random bearer token, owner-only: made once, then kept so clients keep working."""
    if path.is_file() and path.read_text().strip():
        os.chmod(path, 0o600)
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    os.replace(partial, path)  # a reader never sees a half-written token
    return path


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _is_torchserve(pid: int | None, home: Path | None = None) -> bool:
    """The pid is alive and is a TorchServe frontend (running in ``home``), not a recycled pid of something else."""
    cmdline = command_line(pid)
    if cmdline is None or JAVA_MAIN_CLASS.encode() not in cmdline or not pid_alive(pid):
        return False
    try:
        return home is None or os.readlink(f"/proc/{pid}/cwd") == str(home)
    except OSError:
        return False


def _is_auth_proxy(pid: int | None, home: Path) -> bool:
    """The pid is alive and is the auth proxy of ``home`` (its --key-file is home's), not a recycled pid."""
    cmdline = command_line(pid)
    return (cmdline is not None and PROXY_MODULE.encode() in cmdline and str(home / KEY_FILE).encode() in cmdline
            and pid_alive(pid))


# Proxies started by this process, so stop() can reap them (a dead child stays a zombie until waited for).
_started_proxies: dict[int, subprocess.Popen] = {}


def _reap(pid: int | None) -> None:
    """Collect the exit status of a proxy this process started, once it has ended (never waits)."""
    process = _started_proxies.get(pid) if pid else None
    if process is not None and process.poll() is not None:
        del _started_proxies[pid]


class LocalTorchServe:
    """One TorchServe behind its auth proxy on this machine, owned by the directory ``home``."""

    def __init__(self, home: str | Path):
        self.home = Path(home).resolve()
        self.model_store = self.home / "model-store"
        self.logs = self.home / "logs"
        self.config_file = self.home / "config.properties"
        self.key_file = self.home / KEY_FILE
        self.token_file = self.home / TOKEN_FILE
        self.source_token_file = self.home / SOURCE_TOKEN_FILE
        self.state_file = self.home / STATE_FILE
        self.rollout_file = self.home / ROLLOUT_FILE
        self.request_log_spool = self.home / "request-log-spool"

    @property
    def temp_dir(self) -> Path:
        """Per-home temp dir for TorchServe's pid file, unpacked models and worker sockets.

        Separate per home so two servers never share ``/tmp/.ts.sock.9000`` or
        the launcher's pid file; short because Unix socket paths are limited
        to ~100 bytes, so it lives in the system temp dir, not under home.
        """
        base = tempfile.gettempdir()
        if len(base) > 40:
            base = "/tmp"
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path(base) / f"kfp-mlops-ts-{os.getuid()}-{digest}"

    def _make_temp_dir(self) -> Path:
        path = self.temp_dir
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()  # refuse a directory someone else planted in the shared /tmp
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise RuntimeError(f"{path} is not a private directory of this user; remove it and start again")
        return path

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, state: dict[str, Any]) -> tuple[bool, bool]:
        """Whether this home's TorchServe and its auth proxy (per ``state``) run."""
        return _is_torchserve(state.get("pid"), self.home), _is_auth_proxy(state.get("proxy_pid"), self.home)

    def status(self) -> dict[str, Any]:
        """``running`` (either process is up), ``healthy`` (both up, the proxy answers, TorchServe pings Healthy
        through it and has READY workers), each process's pid, and the deployment record fields."""
        state = self._read_state() or {}
        torchserve, proxy = self._alive(state)
        if torchserve and proxy:
            health = self.health(state)
        else:
            gone = "TorchServe" if not torchserve else "the auth proxy"
            log = self.logs / ("torchserve.out" if not torchserve else PROXY_LOG)
            problem = ("not running" if not (torchserve or proxy) else
                       f"{gone} is not running (see {log}); 'mlops serve start' replaces what is left")
            health = {"healthy": False, "workers_ready": 0, "problem": problem}
        return {
            "running": torchserve or proxy,
            "torchserve_running": torchserve,
            "proxy_running": proxy,
            **health,
            "home": str(self.home),
            "endpoint": state.get("endpoint"),
            "pid": state.get("pid") if torchserve else None,
            "proxy_pid": state.get("proxy_pid") if proxy else None,
            "model": state.get("model_name"),
            **{k: state.get(k) for k in ("model_version", "model_dir", "dataset_dir", "model_reference",
                                         "request_log_dir")},
            "token_file": state.get("token_file", str(self.token_file)),
            "source_token_file": state.get("source_token_file", str(self.source_token_file)),
            "log": str(self.logs / "torchserve.out"),
            "proxy_log": str(self.logs / PROXY_LOG),
        }

    def health(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ask the running server: the proxy's /healthz, /ping through the proxy with the client token, and the
        workers' states from TorchServe's management API."""
        record = record or self._read_state() or {}
        try:
            base = record["endpoint"].rsplit("/predictions/", 1)[0]
            proxy = requests.get(f"{base}/healthz", timeout=5)
            ping = requests.get(f"{base}/ping", timeout=5,
                                headers={"Authorization": f"Bearer {read_token(record['token_file'])}"})
            management_key = json.loads(self.key_file.read_text())["management"]["key"]
            described = requests.get(f"{record['management_endpoint']}/models/{record['model_name']}", timeout=5,
                                     headers={"Authorization": f"Bearer {management_key}"})
            workers = described.json()[0].get("workers", []) if described.status_code == 200 else []
        except (OSError, KeyError, ValueError, IndexError, TypeError, requests.RequestException) as err:
            return {"healthy": False, "workers_ready": 0, "problem": f"{type(err).__name__}: {err}"[:300]}
        ready = sum(w.get("status") == "READY" for w in workers)
        if proxy.status_code != 200:
            problem = f"the auth proxy answered /healthz with HTTP {proxy.status_code}: {proxy.text[:100]}"
        elif ping.status_code != 200 or "Healthy" not in ping.text:
            problem = f"/ping through the auth proxy answered HTTP {ping.status_code}: {ping.text[:100]}"
        elif not ready:
            problem = f"no READY worker ({[w.get('status') for w in workers]})"
        else:
            problem = None
        return {"healthy": problem is None, "workers_ready": ready, "problem": problem}

    def start(
        self,
        mar_path: str | Path,
        model_name: str,
        host: str = "127.0.0.1",
        inference_port: int = 8080,
        management_port: int = 8081,
        metrics_port: int = 8082,
        workers: int = 1,
        request_log_dir: str | Path | None = None,
        timeout_s: float = 120,
        model_version: str | None = None,
        grpc_inference_port: int | None = None,
        grpc_management_port: int | None = None,
        token_expiration_min: int = DEFAULT_TOKEN_EXPIRATION_MIN,
        request_log_max_bytes: int | None = None,
        request_log_max_age_s: float | None = None,
        netty_threads: int = DEFAULT_NETTY_THREADS,
        netty_client_threads: int = DEFAULT_NETTY_CLIENT_THREADS,
        job_queue_size: int = DEFAULT_JOB_QUEUE_SIZE,
        max_request_size: int = DEFAULT_MAX_REQUEST_BYTES,
        log_config: str | Path | None = LOG_CONFIG,
        vmargs: str = DEFAULT_VMARGS,
        model_dir: str | Path | None = None,
        dataset_dir: str | Path | None = None,
        unbatched_route: bool = True,
    ) -> dict[str, Any]:
        """Start TorchServe with one model behind the auth proxy; wait until all its workers are ready.

        Returns the deployment record (also written to ``home/state.json``). The auth proxy
        serves ``host:inference_port``; TorchServe's inference API gets a free loopback port of
        its own, and its management, metrics and gRPC ports (gRPC: free ones unless given)
        bind to loopback too. ``max_request_size``: bodies over this many bytes get a 413
        from the proxy. What is left of a crashed server of this home is stopped first.
        The worker count and batching come from the archive's model config
        (``serving.archive.build_mar``); ``workers`` only applies to an archive without one.
        ``request_log_dir`` is a local directory or an ``s3://`` prefix; its files
        rotate at ``request_log_max_bytes`` / ``request_log_max_age_s`` (handler defaults when None).
        ``log_config``: TorchServe's log4j2 configuration (None: TorchServe's built-in one, which logs
        every request several times at DEBUG; for comparisons only). ``model_dir`` and
        ``dataset_dir`` (the served model's artifact and its dataset) only go into the record.
        ``unbatched_route``: also register the model with batches of one, for the proxy's lone requests.
        """
        self._stop_leftovers()
        mar_path = Path(mar_path).resolve()
        if not mar_path.is_file():
            raise FileNotFoundError(f"model archive {mar_path} not found: build it with serving.archive.build_mar")
        chosen = {inference_port, management_port, metrics_port, grpc_inference_port, grpc_management_port}
        torchserve_port, *free = free_ports(3, chosen)
        ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port,
                 "gRPC inference": grpc_inference_port or free[0], "gRPC management": grpc_management_port or free[1]}
        self._check_ports(host, ports)
        self.rollout_file.unlink(missing_ok=True)  # a new server starts without a challenger
        print(f"[serve] starting TorchServe for model '{model_name}' on {host}:{inference_port} behind the auth proxy "
              f"(home {self.home})", flush=True)
        record, env, workers = self._launch(
            mar_path, model_name, host, ports, torchserve_port, workers, request_log_dir, timeout_s,
            dict(token_expiration_min=token_expiration_min, netty_threads=netty_threads,
                 netty_client_threads=netty_client_threads, job_queue_size=job_queue_size, vmargs=vmargs),
            request_log_max_bytes, request_log_max_age_s, max_request_size, log_config,
            {"model_version": model_version, "model_dir": model_dir, "dataset_dir": dataset_dir,
             "unbatched": unbatched_route})
        try:
            record["proxy_pid"] = self._launch_proxy(env, host, inference_port, torchserve_port, max_request_size,
                                                     record["unbatched_model"])
            atomic_write_json(self.state_file, record)
            self._wait_ready(record, workers, timeout_s)
        except BaseException:
            self.stop(quiet=True)
            raise
        print(f"[serve] TorchServe is up (pid {record['pid']}) behind the auth proxy (pid {record['proxy_pid']}): "
              f"{record['endpoint']}", flush=True)
        print(f"[serve] clients send the bearer token in {self.token_file} (owner-only); bodies over "
              f"{max_request_size} bytes get HTTP 413.", flush=True)
        print(f"[serve] try:  {curl_example(record)}", flush=True)
        return record

    def _launch(self, mar_path: Path, model_name: str, host: str, ports: dict[str, int], torchserve_port: int,
                workers: int, request_log_dir: str | Path | None, timeout_s: float, tuning: dict[str, Any],
                request_log_max_bytes: int | None, request_log_max_age_s: float | None, max_request_size: int,
                log_config: str | Path | None, about: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], int]:
        """Start TorchServe (not the proxy) with the model of ``mar_path``; (the record, written to state.json;
        the environment; the worker count). ``about``: the model's version and directories for the record, and
        for a proxy that runs on, its ``proxy_pid`` and ``endpoint``."""
        workers = archive_workers(mar_path) or workers
        for d in (self.model_store, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        workflow_store = self.home / "workflow-store"
        workflow_store.mkdir(mode=0o700, exist_ok=True)
        if any(workflow_store.iterdir()):
            raise RuntimeError(f"{workflow_store} must stay empty (workflow archives are code); remove what is in it")
        ensure_token_file(self.token_file)
        ensure_token_file(self.source_token_file)
        temp_dir = self._make_temp_dir()
        (temp_dir / PID_FILE).unlink(missing_ok=True)
        stored_mar = self.model_store / f"{model_name}.mar"
        if stored_mar != mar_path:
            shutil.copy2(mar_path, stored_mar)
        models = {model_name: stored_mar}
        if about.get("unbatched"):  # the same model, batches of one: see serving/unbatched_route.py
            twin = unbatched_name(model_name)
            models[twin] = write_unbatched_archive(stored_mar, self.model_store / f"{twin}.mar")
        load_models = ",".join(f"{name}={mar.name}" for name, mar in models.items())
        self.config_file.write_text(render_config(
            self.model_store, load_models, LOOPBACK, torchserve_port, ports["management"],
            ports["metrics"], ports["gRPC inference"], ports["gRPC management"], workers,
            tuning["token_expiration_min"], max_request_size=max_request_size + TORCHSERVE_REQUEST_HEADROOM,
            startup_timeout_s=max(1, int(timeout_s)), netty_threads=tuning["netty_threads"],
            netty_client_threads=tuning["netty_client_threads"], job_queue_size=tuning["job_queue_size"],
            vmargs=tuning["vmargs"],
        ))
        self.key_file.unlink(missing_ok=True)  # old keys are dead; wait for the new file
        log_dir: str | None = None
        if request_log_dir and str(request_log_dir).startswith("s3://"):
            log_dir = str(request_log_dir).rstrip("/")
        elif request_log_dir:
            Path(request_log_dir).resolve().mkdir(parents=True, exist_ok=True)
            log_dir = str(Path(request_log_dir).resolve())

        env = self._environment(temp_dir, log_dir, request_log_max_bytes, request_log_max_age_s)
        pid = self._launch_torchserve(env, log_config)
        from components.core.features import MODEL_REFERENCE_FILE  # imports pandas: only once a server starts

        model_dir, dataset_dir = about["model_dir"], about["dataset_dir"]
        model_reference = Path(model_dir).resolve() / MODEL_REFERENCE_FILE if model_dir else None
        record = {
            "endpoint": about.get("endpoint") or
            f"http://{_url_host(host)}:{ports['inference']}/predictions/{model_name}",
            "management_endpoint": f"http://{LOOPBACK}:{ports['management']}",
            "metrics_endpoint": f"http://{LOOPBACK}:{ports['metrics']}/metrics",
            "torchserve_endpoint": f"http://{LOOPBACK}:{torchserve_port}/predictions/{model_name}",
            "token_file": str(self.token_file),
            "source_token_file": str(self.source_token_file),
            "key_file": str(self.key_file),
            "rollout_file": str(self.rollout_file),
            "max_request_bytes": int(max_request_size),
            "request_log_dir": log_dir,
            "model_name": model_name,
            "unbatched_model": next(iter(models.keys() - {model_name}), None),
            "model_version": about["model_version"],
            "model_dir": str(Path(model_dir).resolve()) if model_dir else None,
            "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir else None,
            "model_reference": str(model_reference) if model_reference and model_reference.is_file() else None,
            "home": str(self.home),
            "pid": pid,
            "proxy_pid": about.get("proxy_pid"),  # replace_model: the proxy that runs on
            "grpc_inference_port": ports["gRPC inference"],
            "grpc_management_port": ports["gRPC management"],
            "log": str(self.logs / "torchserve.out"),
            "proxy_log": str(self.logs / PROXY_LOG),
        }
        atomic_write_json(self.state_file, record)  # written now, so stop() can find the pid even if startup fails
        return record, env, workers

    def replace_model(self, mar_path: str | Path, *, model_version: str | None, model_dir: str | Path | None,
                      dataset_dir: str | Path | None, timeout_s: float = 120,
                      request_log_max_bytes: int | None = None, request_log_max_age_s: float | None = None,
                      ) -> dict[str, Any]:
        """Serve another model behind the auth proxy that runs: stop this home's TorchServe, start one with
        ``mar_path`` on the same loopback ports, wait until it is ready. The proxy keeps its port, its clients'
        connections and its rollout file (so a challenger it routes to can answer while TorchServe restarts);
        it re-reads the new ``key_file.json`` by itself. Returns the new record (also in state.json)."""
        state = self._read_state() or {}
        torchserve, proxy = self._alive(state)
        if not proxy or not state.get("torchserve_endpoint"):
            raise RuntimeError(f"no auth proxy runs from {self.home}: start a server first ('mlops serve start')")
        mar_path = Path(mar_path).resolve()
        if not mar_path.is_file():
            raise FileNotFoundError(f"model archive {mar_path} not found: build it with serving.archive.build_mar")
        endpoint, torchserve_port = urlsplit(state["endpoint"]), urlsplit(state["torchserve_endpoint"]).port
        ports = {"inference": endpoint.port, "management": urlsplit(state["management_endpoint"]).port,
                 "metrics": urlsplit(state["metrics_endpoint"]).port,
                 "gRPC inference": state["grpc_inference_port"], "gRPC management": state["grpc_management_port"]}
        if torchserve:
            self._stop_torchserve(state)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # unpacked models and worker sockets, as stop() does
        print(f"[serve] replacing the model behind the auth proxy of {self.home} with {mar_path.name} "
              f"(version {model_version})", flush=True)
        record, _, workers = self._launch(
            mar_path, state["model_name"], endpoint.hostname, ports, torchserve_port, 1, state.get("request_log_dir"),
            timeout_s, dict(token_expiration_min=DEFAULT_TOKEN_EXPIRATION_MIN, netty_threads=DEFAULT_NETTY_THREADS,
                            netty_client_threads=DEFAULT_NETTY_CLIENT_THREADS, job_queue_size=DEFAULT_JOB_QUEUE_SIZE,
                            vmargs=DEFAULT_VMARGS),
            request_log_max_bytes, request_log_max_age_s, state.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
            LOG_CONFIG, {"model_version": model_version, "model_dir": model_dir, "dataset_dir": dataset_dir,
                         "endpoint": state["endpoint"], "proxy_pid": state["proxy_pid"],
                         "unbatched": bool(state.get("unbatched_model"))})
        self._wait_ready(record, workers, timeout_s)  # raises with the logs; stop() then cleans up
        print(f"[serve] TorchServe is up again (pid {record['pid']}) with model version {model_version}", flush=True)
        return record

    def _stop_leftovers(self) -> None:
        """Refuse to start over a running server; stop the surviving half of a crashed one."""
        state = self._read_state() or {}
        torchserve, proxy = self._alive(state)
        if torchserve and proxy:
            raise RuntimeError(f"TorchServe from {self.home} is already running (pid {state['pid']}, auth proxy pid "
                               f"{state['proxy_pid']}); stop it first ('mlops serve stop')")
        if torchserve or proxy:
            survivor = "TorchServe" if torchserve else "the auth proxy"
            print(f"[serve] {survivor} of a crashed server from {self.home} is still running: stopping it", flush=True)
            self.stop(quiet=True)

    @staticmethod
    def _check_ports(host: str, ports: dict[str, int]) -> None:
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"the ports must be distinct, got {ports}")
        taken = [f"{role} port {port}" for role, port in ports.items()
                 if port_in_use(host if role == "inference" else LOOPBACK, port)]
        if taken:
            raise RuntimeError(
                f"cannot start serving on {host}: {', '.join(taken)} already in use. Stop what listens there "
                f"(another server: 'mlops serve stop', or its home's LocalTorchServe.stop()) or choose other ports."
            )

    def _environment(self, temp_dir: Path, log_dir: str | None, max_bytes: int | None,
                     max_age_s: float | None) -> dict[str, str]:
        """The environment of TorchServe (and its workers) and of the proxy."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}  # TS_CONFIG_FILE would replace our config
        project_root = str(Path(__file__).resolve().parent.parent)  # workers and the proxy import from this checkout
        env.update(LOG_LOCATION=str(self.logs), METRICS_LOCATION=str(self.logs), TEMP=str(temp_dir), TMPDIR=str(temp_dir),
                   PYTHONPATH=os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p))
        for name in (REQUEST_LOG_ENV, MAX_BYTES_ENV, MAX_AGE_ENV, SPOOL_ENV):
            env.pop(name, None)
        if log_dir:
            env[REQUEST_LOG_ENV] = log_dir
            # In the home, not the temp dir: stop() removes that, and an s3:// log spools here until uploaded.
            env[SPOOL_ENV] = str(self.request_log_spool)
            if max_bytes is not None:
                env[MAX_BYTES_ENV] = str(int(max_bytes))
            if max_age_s is not None:
                env[MAX_AGE_ENV] = str(float(max_age_s))
        return env

    def _launch_torchserve(self, env: dict[str, str], log_config: str | Path | None) -> int:
        """Start the frontend through TorchServe's launcher; the frontend's pid."""
        out_log = self.logs / "torchserve.out"
        cmd = [sys.executable, "-m", "ts.model_server", "--start", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.model_store)]
        if log_config is not None:
            cmd += ["--log-config", str(Path(log_config).resolve())]
        with open(out_log, "ab") as out:
            # The launcher spawns the Java frontend and exits; a new session keeps the server alive
            # (and out of reach of Ctrl-C) after the calling process ends.
            launcher = subprocess.run(cmd, cwd=self.home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, timeout=60)
        pid_file = self.temp_dir / PID_FILE
        pid = int(pid_file.read_text().strip()) if pid_file.is_file() else None
        if launcher.returncode != 0 or pid is None:
            raise RuntimeError(f"TorchServe did not start (launcher exit {launcher.returncode}). Log {out_log}:\n{_tail(out_log)}")
        return pid

    def _launch_proxy(self, env: dict[str, str], host: str, port: int, torchserve_port: int,
                      max_request_size: int, unbatched_model: str | None) -> int:
        """Start the auth proxy in front of TorchServe's loopback inference port; its pid."""
        cmd = [sys.executable, "-m", PROXY_MODULE, "--listen", f"{host}:{port}",
               "--upstream", f"http://{LOOPBACK}:{torchserve_port}", "--key-file", str(self.key_file),
               "--token-file", str(self.token_file), "--source-token-file", str(self.source_token_file),
               "--max-request-bytes", str(int(max_request_size)), "--rollout-file", str(self.rollout_file)]
        if unbatched_model:
            cmd += ["--unbatched-model", f"{unbatched_model.removesuffix(UNBATCHED_SUFFIX)}={unbatched_model}"]
        with open(self.logs / PROXY_LOG, "ab") as out:
            process = subprocess.Popen(cmd, cwd=self.home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        _started_proxies[process.pid] = process
        return process.pid

    def _wait_ready(self, record: dict[str, Any], workers: int, timeout_s: float) -> None:
        """Poll until all workers of the model (and of its unbatched twin) are READY and the endpoint is healthy (or
        fail with the log tails)."""
        twin = record.get("unbatched_model")
        models = {record["model_name"]: workers, **({twin: 1} if twin else {})}
        out_log, proxy_log = Path(record["log"]), Path(record["proxy_log"])
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not _is_torchserve(record["pid"], self.home):
                raise RuntimeError(f"TorchServe (pid {record['pid']}) exited during startup. Log {out_log}:\n{_tail(out_log)}")
            if not _is_auth_proxy(record["proxy_pid"], self.home):
                raise RuntimeError(f"the auth proxy (pid {record['proxy_pid']}) exited during startup. "
                                   f"Log {proxy_log}:\n{_tail(proxy_log)}")
            if self.key_file.is_file():
                try:
                    token = json.loads(self.key_file.read_text())["management"]["key"]
                    waiting = []
                    for model, wanted in models.items():
                        response = requests.get(f"{record['management_endpoint']}/models/{model}", timeout=5,
                                                headers={"Authorization": f"Bearer {token}"})
                        described = response.json()[0] if response.status_code == 200 else {}
                        ready = [w for w in described.get("workers", []) if w.get("status") == "READY"]
                        if len(ready) < wanted:
                            waiting.append(f"{model}: {len(ready)}/{wanted} workers ready (HTTP {response.status_code})")
                    health = {"healthy": False} if waiting else self.health(record)
                    if health["healthy"]:
                        return
                    last = "; ".join(waiting) or health.get("problem") or "not healthy yet"
                except (requests.RequestException, ValueError, KeyError, IndexError) as err:
                    last = str(err)
            time.sleep(0.5)
        raise TimeoutError(
            f"TorchServe did not become ready within {timeout_s:.0f} s ({last}); it was stopped. "
            f"Log {out_log}:\n{_tail(out_log)}\nModel log:\n{_tail(self.logs / 'model_log.log', 20)}\n"
            f"Auth proxy log {proxy_log}:\n{_tail(proxy_log, 10)}"
        )

    def _stop_torchserve(self, state: dict[str, Any]) -> None:
        """Drain the request log, then stop TorchServe and its workers (the proxy is not touched)."""
        pid = state["pid"]
        if state.get("request_log_dir"):
            # The frontend kills its workers without a signal: they flush their request log first.
            drained = drain(state["request_log_dir"], self.request_log_spool)
            if drained["unanswered"] or drained["left"] or drained["errors"]:
                print(f"[serve] the request log was not fully flushed ({drained}); spooled files stay in "
                      f"{self.request_log_spool} and are uploaded by the next server from this home", flush=True)
        workers = descendants(pid)  # collected first: once the frontend is gone they are orphans
        terminate([pid], timeout_s=30)
        terminate([w for w in workers if pid_alive(w)], timeout_s=10)

    def stop(self, quiet: bool = False) -> dict[str, Any]:
        """Stop the auth proxy and TorchServe (with its workers) of this home; a no-op (with a message) when
        neither runs. A pid in state.json that now belongs to another process is left alone."""
        self.rollout_file.unlink(missing_ok=True)
        challenger = self.home / CHALLENGER_DIR
        if (challenger / STATE_FILE).is_file():  # what a rollout left running (a crashed deploy step)
            LocalTorchServe(challenger).stop(quiet=True)
        state = self._read_state() or {}
        pid, proxy_pid = state.get("pid"), state.get("proxy_pid")
        torchserve, proxy = self._alive(state)
        _reap(proxy_pid)  # a crashed proxy this process started
        if not (torchserve or proxy):
            if not quiet:
                print(f"[serve] no TorchServe is running from {self.home}; nothing to stop.", flush=True)
            return {"stopped": False, "home": str(self.home)}
        if proxy:  # first, so no client reaches a TorchServe that is going away
            terminate([proxy_pid], timeout_s=15)  # the proxy finishes the requests in flight on SIGTERM
            _reap(proxy_pid)
        if torchserve:
            self._stop_torchserve(state)
        self.key_file.unlink(missing_ok=True)  # its keys died with the server
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        atomic_write_json(self.state_file, {**state, "pid": None, "proxy_pid": None,
                                            "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        stopped = {"stopped": True, "pid": pid if torchserve else None, "proxy_pid": proxy_pid if proxy else None,
                   "home": str(self.home)}
        if not quiet:
            print(f"[serve] stopped TorchServe (pid {stopped['pid']}) and its auth proxy (pid {stopped['proxy_pid']}) "
                  f"from {self.home}.", flush=True)
        return stopped
