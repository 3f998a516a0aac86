"""Run the model behind a local TorchServe: start, stop, status.

Everything the rest of the project needs from a model server is the small
``ServingBackend`` protocol below, so another server (KServe, a FastAPI app)
could replace TorchServe without touching the deploy and monitor steps.

``LocalTorchServe(home)`` keeps one server per home directory: the model
store, logs, the rendered config, TorchServe's ``key_file.json`` (bearer
tokens) and ``state.json``, the deployment record the monitor reads.
The server is started in its own session, so it keeps serving after the
process that started it (``mlops run``) has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from string import Template
from typing import Any, Protocol

import requests

from components.models import atomic_write_json
from serving.request_log import MAX_AGE_ENV, MAX_BYTES_ENV, REQUEST_LOG_ENV, pid_alive

CONFIG_TEMPLATE = Path(__file__).with_name("config.properties")
LOG_CONFIG = Path(__file__).with_name("log4j2.xml")  # TorchServe's own logs, trimmed (see the file)
KEY_FILE = "key_file.json"  # TorchServe writes it into its working directory
STATE_FILE = "state.json"
PID_FILE = ".model_server.pid"  # TorchServe's launcher keeps the frontend's pid here, in its temp dir
JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"
DEFAULT_TOKEN_EXPIRATION_MIN = 7 * 24 * 60  # see the comment in config.properties
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 1 * 1024 * 1024
# Frontend threads, measured with benchmarks/serving.py on 2 cores (README "Serving"): Netty's event loops
# for client connections (0 = one per core, TorchServe's default) and for talking to the workers.
DEFAULT_NETTY_THREADS = 0
DEFAULT_NETTY_CLIENT_THREADS = 0
# JVM options of the frontend (TorchServe's vmargs). C1 only (no C2): on 2 cores the C2 compiler thread was still
# taking 1-2 s of CPU per 8 s of load after 10-30 s of warm-up, and the Python worker waited for a core meanwhile;
# without it p99/p50 at concurrency 32 was lower in 11 of 14 interleaved rounds of two A/B runs on a shared machine
# (medians 5.6 -> 4.1 and 4.9 -> 4.6), for ~0.05 ms more frontend CPU per request (C1 code is slower than C2's).
# A/B: python benchmarks/serving.py --skip peer nolog defaults inprocess --variant 'c2={"vmargs": ""}'
DEFAULT_VMARGS = "-XX:TieredStopAtLevel=1"
DEFAULT_JOB_QUEUE_SIZE = 1000  # requests waiting per model before the frontend answers 503; bounded memory


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


def _properties_value(value: Any) -> str:
    """A value as java.util.Properties reads it back unchanged (backslashes are escapes there)."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"config value {text!r} may not contain line breaks")
    return text.replace("\\", "\\\\")


def render_config(
    model_store: str | Path,
    load_models: str,
    host: str = "127.0.0.1",
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int = 8082,
    grpc_inference_port: int = 7070,
    grpc_management_port: int = 7071,
    workers: int = 1,
    token_expiration_min: int = DEFAULT_TOKEN_EXPIRATION_MIN,
    max_request_size: int = DEFAULT_MAX_REQUEST_BYTES,
    max_response_size: int = DEFAULT_MAX_RESPONSE_BYTES,
    response_timeout_s: int = 60,
    startup_timeout_s: int = 120,
    netty_threads: int = DEFAULT_NETTY_THREADS,
    netty_client_threads: int = DEFAULT_NETTY_CLIENT_THREADS,
    job_queue_size: int = DEFAULT_JOB_QUEUE_SIZE,
    workflow_store: str | Path | None = None,
    vmargs: str = DEFAULT_VMARGS,
) -> str:
    """Fill in ``serving/config.properties``: the TorchServe config for one model on ``host``.

    ``load_models`` is TorchServe's ``name=file.mar`` list. Token authorization
    stays on and the model API off whatever the arguments. ``workflow_store``
    (default: ``workflow-store`` next to the model store) must be an empty
    directory: TorchServe has no switch to turn the workflow API off.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if token_expiration_min < 1:
        raise ValueError(f"token_expiration_min must be at least 1 minute, got {token_expiration_min}")
    if netty_threads < 0 or netty_client_threads < 0 or job_queue_size < 1:
        raise ValueError(f"netty threads must be >= 0 (0 = one per core) and job_queue_size >= 1, got "
                         f"{netty_threads}, {netty_client_threads}, {job_queue_size}")
    if max_request_size < 1024:
        raise ValueError(f"max_request_size must be at least 1024 bytes, got {max_request_size}")
    ports = [inference_port, management_port, metrics_port, grpc_inference_port, grpc_management_port]
    if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"the five TorchServe ports must be distinct and in 1..65535, got {ports}")
    store = Path(model_store).resolve()
    workflows = Path(workflow_store).resolve() if workflow_store else store.parent / "workflow-store"
    if workflows == store:
        raise ValueError("workflow_store must not be the model store: the workflow API would load archives from it")
    # Java regex of the only place models may come from; re.escape never escapes letters, which Java accepts.
    allowed_urls = f"file://{re.escape(str(store))}/.*"
    values = {
        "host": host, "inference_port": inference_port, "management_port": management_port,
        "metrics_port": metrics_port, "grpc_inference_port": grpc_inference_port,
        "grpc_management_port": grpc_management_port, "token_expiration_min": int(token_expiration_min),
        "model_store": store, "workflow_store": workflows, "load_models": load_models, "workers": int(workers),
        "allowed_urls": allowed_urls, "max_request_size": int(max_request_size),
        "max_response_size": int(max_response_size), "response_timeout_s": int(response_timeout_s),
        "startup_timeout_s": int(startup_timeout_s), "netty_threads": int(netty_threads),
        "netty_client_threads": int(netty_client_threads), "job_queue_size": int(job_queue_size),
        "vmargs": vmargs,
    }
    return Template(CONFIG_TEMPLATE.read_text()).substitute({k: _properties_value(v) for k, v in values.items()})


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (a bind with SO_REUSEADDR fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on host right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def archive_workers(mar_path: str | Path) -> int | None:
    """``minWorkers`` from the .mar's model config (what TorchServe will start), or None if it has none."""
    import zipfile

    try:
        with zipfile.ZipFile(mar_path) as z:
            config_file = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"].get("configFile")
            text = z.read(config_file).decode() if config_file else ""
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    match = re.search(r"^minWorkers:\s*(\d+)\s*$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def curl_example(record: dict[str, Any]) -> str:
    """A shell line that sends digit.png to the endpoint with the inference key read from the key file."""
    key = f"$(python3 -c \"import json;print(json.load(open('{record['token_file']}'))['inference']['key'])\")"
    return (f"curl -H \"Authorization: Bearer {key}\" -H \"Content-Type: image/png\" --data-binary @digit.png "
            f"{record['endpoint']}")


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _is_torchserve(pid: int | None, home: Path | None = None) -> bool:
    """The pid is alive and is a TorchServe frontend (running in ``home``), not a recycled pid of something else."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(f"/proc/{pid}/cwd") if home is not None else None
    except OSError:
        return False
    return JAVA_MAIN_CLASS.encode() in cmdline and pid_alive(pid) and (home is None or cwd == str(home))


def _children(pid: int) -> list[int]:
    """All descendants of pid (the Python workers of the frontend), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _terminate(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return


class LocalTorchServe:
    """One TorchServe on this machine, owned by the directory ``home``."""

    def __init__(self, home: str | Path):
        self.home = Path(home).resolve()
        self.model_store = self.home / "model-store"
        self.logs = self.home / "logs"
        self.config_file = self.home / "config.properties"
        self.key_file = self.home / KEY_FILE
        self.state_file = self.home / STATE_FILE

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

    def status(self) -> dict[str, Any]:
        """``running``, ``healthy`` (it answers /ping and its workers are READY) and the deployment record fields."""
        state = self._read_state() or {}
        running = _is_torchserve(state.get("pid"), self.home)
        health = self.health(state) if running else {"healthy": False, "workers_ready": 0, "problem": "not running"}
        return {
            "running": running,
            **health,
            "home": str(self.home),
            "endpoint": state.get("endpoint"),
            "pid": state.get("pid") if running else None,
            "model": state.get("model_name"),
            "model_version": state.get("model_version"),
            "token_file": state.get("token_file", str(self.key_file)),
            "request_log_dir": state.get("request_log_dir"),
            "log": str(self.logs / "torchserve.out"),
        }

    def health(self, record: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ask the running server: /ping with the inference key, and its workers' states from the management API."""
        record = record or self._read_state() or {}
        try:
            keys = json.loads(self.key_file.read_text())
            base = record["endpoint"].rsplit("/predictions/", 1)[0]
            ping = requests.get(f"{base}/ping", headers={"Authorization": f"Bearer {keys['inference']['key']}"}, timeout=5)
            described = requests.get(f"{record['management_endpoint']}/models/{record['model_name']}", timeout=5,
                                     headers={"Authorization": f"Bearer {keys['management']['key']}"})
            workers = described.json()[0].get("workers", []) if described.status_code == 200 else []
        except (OSError, KeyError, ValueError, IndexError, TypeError, requests.RequestException) as err:
            return {"healthy": False, "workers_ready": 0, "problem": f"{type(err).__name__}: {err}"[:300]}
        ready = sum(w.get("status") == "READY" for w in workers)
        pinged = ping.status_code == 200 and "Healthy" in ping.text
        problem = None if pinged and ready else (f"/ping answered HTTP {ping.status_code}: {ping.text[:100]}" if not pinged
                                                 else f"no READY worker ({[w.get('status') for w in workers]})")
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
    ) -> dict[str, Any]:
        """Start TorchServe with one model and wait until all its workers are ready.

        Returns the deployment record (also written to ``home/state.json``).
        gRPC ports (TorchServe always opens them) are picked free ones unless given.
        The worker count and batching come from the archive's model config
        (``serving.archive.build_mar``); ``workers`` only applies to an archive without one.
        ``request_log_dir`` is a local directory or an ``s3://`` prefix; its files
        rotate at ``request_log_max_bytes`` / ``request_log_max_age_s`` (handler defaults when None).
        ``log_config``: TorchServe's log4j2 configuration (None: TorchServe's built-in one, which logs
        every request several times at DEBUG; for comparisons only).
        """
        if self.status()["running"]:
            raise RuntimeError(f"TorchServe from {self.home} is already running (pid {self.status()['pid']}); stop it first")
        mar_path = Path(mar_path).resolve()
        if not mar_path.is_file():
            raise FileNotFoundError(f"model archive {mar_path} not found: build it with serving.archive.build_mar")
        workers = archive_workers(mar_path) or workers
        grpc_inference_port = grpc_inference_port or free_port(host)
        grpc_management_port = grpc_management_port or free_port(host)
        ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port,
                 "gRPC inference": grpc_inference_port, "gRPC management": grpc_management_port}
        taken = [f"{role} port {port}" for role, port in ports.items() if port_in_use(host, port)]
        if taken:
            raise RuntimeError(
                f"cannot start TorchServe on {host}: {', '.join(taken)} already in use. Stop what listens there "
                f"(another server: 'mlops serve stop', or its home's LocalTorchServe.stop()) or choose other ports."
            )

        for d in (self.model_store, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        workflow_store = self.home / "workflow-store"
        workflow_store.mkdir(mode=0o700, exist_ok=True)
        if any(workflow_store.iterdir()):
            raise RuntimeError(f"{workflow_store} must stay empty (workflow archives are code); remove what is in it")
        temp_dir = self._make_temp_dir()
        (temp_dir / PID_FILE).unlink(missing_ok=True)
        stored_mar = self.model_store / f"{model_name}.mar"
        if stored_mar != mar_path:
            shutil.copy2(mar_path, stored_mar)
        self.config_file.write_text(render_config(
            self.model_store, f"{model_name}={stored_mar.name}", host, inference_port, management_port, metrics_port,
            grpc_inference_port, grpc_management_port, workers, token_expiration_min, max_request_size=max_request_size,
            startup_timeout_s=max(1, int(timeout_s)), netty_threads=netty_threads,
            netty_client_threads=netty_client_threads, job_queue_size=job_queue_size, vmargs=vmargs,
        ))
        self.key_file.unlink(missing_ok=True)  # old keys are dead; wait for the new file
        log_dir: str | None = None
        if request_log_dir and str(request_log_dir).startswith("s3://"):
            log_dir = str(request_log_dir).rstrip("/")
        elif request_log_dir:
            Path(request_log_dir).resolve().mkdir(parents=True, exist_ok=True)
            log_dir = str(Path(request_log_dir).resolve())

        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}  # TS_CONFIG_FILE would replace our config
        project_root = str(Path(__file__).resolve().parent.parent)  # workers import components.* from this checkout
        env.update(LOG_LOCATION=str(self.logs), METRICS_LOCATION=str(self.logs), TEMP=str(temp_dir), TMPDIR=str(temp_dir),
                   PYTHONPATH=os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p))
        for name in (REQUEST_LOG_ENV, MAX_BYTES_ENV, MAX_AGE_ENV):
            env.pop(name, None)
        if log_dir:
            env[REQUEST_LOG_ENV] = log_dir
            if request_log_max_bytes is not None:
                env[MAX_BYTES_ENV] = str(int(request_log_max_bytes))
            if request_log_max_age_s is not None:
                env[MAX_AGE_ENV] = str(float(request_log_max_age_s))
        out_log = self.logs / "torchserve.out"
        cmd = [sys.executable, "-m", "ts.model_server", "--start", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.model_store)]
        if log_config is not None:
            cmd += ["--log-config", str(Path(log_config).resolve())]
        print(f"[serve] starting TorchServe for model '{model_name}' on {host}:{inference_port} (home {self.home})", flush=True)
        with open(out_log, "ab") as out:
            # The launcher spawns the Java frontend and exits; a new session keeps the server alive
            # (and out of reach of Ctrl-C) after the calling process ends.
            launcher = subprocess.run(cmd, cwd=self.home, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True, timeout=60)
        pid_file = temp_dir / PID_FILE
        pid = int(pid_file.read_text().strip()) if pid_file.is_file() else None
        if launcher.returncode != 0 or pid is None:
            raise RuntimeError(f"TorchServe did not start (launcher exit {launcher.returncode}). Log {out_log}:\n{_tail(out_log)}")

        base = f"http://{host}:{inference_port}"
        record = {
            "endpoint": f"{base}/predictions/{model_name}",
            "management_endpoint": f"http://{host}:{management_port}",
            "metrics_endpoint": f"http://{host}:{metrics_port}/metrics",
            "token_file": str(self.key_file),
            "request_log_dir": log_dir,
            "model_name": model_name,
            "model_version": model_version,
            "home": str(self.home),
            "pid": pid,
            "grpc_inference_port": grpc_inference_port,
            "grpc_management_port": grpc_management_port,
            "log": str(out_log),
        }
        atomic_write_json(self.state_file, record)  # written now, so stop() can find the pid even if startup fails
        try:
            self._wait_ready(record, workers, timeout_s, out_log)
        except BaseException:
            self.stop(quiet=True)
            raise
        print(f"[serve] TorchServe is up (pid {pid}): {record['endpoint']}", flush=True)
        print(f"[serve] bearer tokens are in {self.key_file} (owner-only); the inference key is under 'inference'.", flush=True)
        print(f"[serve] try:  {curl_example(record)}", flush=True)
        return record

    def _wait_ready(self, record: dict[str, Any], workers: int, timeout_s: float, out_log: Path) -> None:
        """Poll until all workers of the model are READY and /ping answers Healthy (or fail with the log tail)."""
        url = f"{record['management_endpoint']}/models/{record['model_name']}"
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not _is_torchserve(record["pid"], self.home):
                raise RuntimeError(f"TorchServe (pid {record['pid']}) exited during startup. Log {out_log}:\n{_tail(out_log)}")
            if self.key_file.is_file():
                try:
                    token = json.loads(self.key_file.read_text())["management"]["key"]
                    response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
                    if response.status_code == 200:
                        ready = [w for w in response.json()[0].get("workers", []) if w.get("status") == "READY"]
                        if len(ready) >= workers and self.health(record)["healthy"]:
                            return
                        last = f"{len(ready)}/{workers} workers ready"
                    else:
                        last = f"HTTP {response.status_code}: {response.text[:200]}"
                except (requests.RequestException, ValueError, KeyError, IndexError) as err:
                    last = str(err)
            time.sleep(0.5)
        raise TimeoutError(
            f"TorchServe did not become ready within {timeout_s:.0f} s ({last}); it was stopped. "
            f"Log {out_log}:\n{_tail(out_log)}\nModel log:\n{_tail(self.logs / 'model_log.log', 20)}"
        )

    def stop(self, quiet: bool = False) -> dict[str, Any]:
        """Stop the server of this home with its workers; a no-op (with a message) when none runs."""
        state = self._read_state() or {}
        pid = state.get("pid")
        if not _is_torchserve(pid, self.home):
            if not quiet:
                print(f"[serve] no TorchServe is running from {self.home}; nothing to stop.", flush=True)
            return {"stopped": False, "home": str(self.home)}
        workers = _children(pid)  # collected first: once the frontend is gone they are orphans
        _terminate([pid], timeout_s=30)
        _terminate([w for w in workers if pid_alive(w)], timeout_s=10)
        self.key_file.unlink(missing_ok=True)  # its keys died with the server
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        atomic_write_json(self.state_file, {**state, "pid": None, "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if not quiet:
            print(f"[serve] stopped TorchServe (pid {pid}) from {self.home}.", flush=True)
        return {"stopped": True, "pid": pid, "home": str(self.home)}
