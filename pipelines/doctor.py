"""``mlops doctor``: can this machine run the pipeline? Checked before any training starts (``mlops run`` runs
``preflight`` first), each check a line ``ok|warn|FAIL  what  (how to fix)``.

Plain functions: the ports, the disk and the commands they ask are parameters, so tests give their own.
Every check is cheap (torch is found, not imported; one ``java -version``), so ``mlops run`` can afford them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.config import Config

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_PYTHON = (3, 11)
MIN_JAVA = 17  # TorchServe 0.12's frontend needs Java 17
# Free disk below which a run stops before training: a default run writes ~10 MiB, but checkpoints, bigger
# datasets and encoders, the model archive and the serving logs grow with the settings, and a disk that fills half
# way through a run loses the run; below the warning level a long run may not fit.
MIN_FREE_BYTES = 1 << 30
WARN_FREE_BYTES = 5 << 30


@dataclass(frozen=True)
class Check:
    status: str  # ok, warn or FAIL
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.what}" + (f"  ({self.fix})" if self.fix else "")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def python_version(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check(OK, f"Python {text}")
    return Check(FAIL, f"Python {text} is older than {'.'.join(map(str, MIN_PYTHON))}",
                 "install Python 3.11+ and reinstall: make run")


def torch_installed(gpu_driver: Path = Path("/proc/driver/nvidia/version")) -> Check:
    """torch is installed (found, not imported: an import takes seconds) and whether a GPU driver is there."""
    if importlib.util.find_spec("torch") is None:
        return Check(FAIL, "torch is not installed", "install the project: make run (or pip install -e .)")
    version = importlib.metadata.version("torch")
    cuda = any(r.startswith("nvidia-") for r in importlib.metadata.requires("torch") or [])
    if "+cpu" in version or not cuda:
        return Check(OK, f"torch {version}, CPU build" + (" (this machine has an NVIDIA driver)" if gpu_driver.exists()
                                                            else ""))
    if gpu_driver.exists():
        return Check(OK, f"torch {version}, CUDA build, NVIDIA driver present")
    return Check(OK, f"torch {version}, CUDA build, no NVIDIA driver: the steps run on the CPU")


def java_version(run: Callable[..., Any] = subprocess.run) -> Check:
    """``java -version`` is 17 or newer (TorchServe's frontend)."""
    fix = "install Java 17+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or put it on PATH"
    try:
        proc = run(["java", "-version"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return Check(FAIL, "java not found: TorchServe needs Java 17+ to serve locally", fix)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(FAIL, f"java -version did not answer: {exc}", fix)
    text = (proc.stderr or "") + (proc.stdout or "")
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if proc.returncode != 0 or not match:
        return Check(FAIL, f"java -version failed: {text.strip()[:120]}", fix)
    major = int(match.group(1)) if match.group(1) != "1" else int(match.group(2) or 0)  # "1.8.0" is Java 8
    if major < MIN_JAVA:
        return Check(FAIL, f"Java {major} is older than {MIN_JAVA}: TorchServe will not start", fix)
    return Check(OK, f"Java {major}")


def serving_ports(cfg: Config, in_use: Callable[[str, int], bool] | None = None,
                  ours: Callable[[], set[int] | None] | None = None,
                  listeners: Callable[[int], set[int] | None] | None = None) -> list[Check]:
    """The local serving ports are free, or held by this serving home's own server (a run replaces it).

    ``ours`` gives that server's process ids (None: no server of ours runs; empty: it runs in containers,
    whose processes this machine's process table does not name), ``listeners`` the ids of the processes
    listening on a port (None: the system would not say). A busy port counts as ours only when one of our
    processes is among its listeners, or, where either side cannot be named, when our server runs.
    """
    from serving.processes import LOOPBACK, port_in_use

    s = cfg.serving
    in_use = in_use or port_in_use
    ours = ours or (lambda: _our_server_pids(s.home))
    listeners = listeners or _listening_pids
    unknown = object()
    our_pids: Any = unknown  # looked up once, at the first busy port
    out = []
    for name, host, port in (("inference", s.host, s.inference_port), ("management", LOOPBACK, s.management_port),
                             ("metrics", LOOPBACK, s.metrics_port)):
        what = f"port {port} (serving.{name}_port) on {host}"
        if not in_use(host, port):
            out.append(Check(OK, f"{what} is free"))
            continue
        if our_pids is unknown:
            our_pids = ours()
        holders = listeners(port) if our_pids else None
        if our_pids is not None and (holders is None or not our_pids or holders & our_pids):
            out.append(Check(OK, f"{what} is held by the server of {s.home}, which a new release replaces"))
        else:
            flag = f"--serving-{name}-port"
            out.append(Check(FAIL, f"{what} is in use by another program",
                             f"stop it (ss -ltnp 'sport = :{port}' names it) or pick a free port: {flag} N"))
    return out


def _our_server_pids(home: str) -> set[int] | None:
    """The process ids of the server serving from ``home`` and their children; None when none runs."""
    import psutil

    from components.deploy.containers import served_from

    try:
        status = served_from(Path(home).resolve()).status()
    except Exception:  # noqa: BLE001 - an unreadable state means no server of ours holds the port
        return None
    if not status.get("running"):
        return None
    pids = set()
    for pid in (status.get("pid"), status.get("proxy_pid")):
        if not pid:
            continue
        try:
            process = psutil.Process(int(pid))
            pids |= {process.pid, *(child.pid for child in process.children(recursive=True))}
        except psutil.Error:
            continue
    return pids


def _listening_pids(port: int) -> set[int] | None:
    """The ids of the processes listening on TCP ``port``; None when the system does not say."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    found = {c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port}
    return None if None in found else found


def free_disk(paths: dict[str, str | Path], usage: Callable[[str], Any] = shutil.disk_usage) -> list[Check]:
    """Free space on the file system of each path (named by what it holds; one line per file system)."""
    out, seen = [], {}
    for what, path in paths.items():
        existing = Path(path).resolve()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            device = os.stat(existing).st_dev
        except OSError:
            device = str(existing)
        if device in seen:
            continue
        seen[device] = what
        free = usage(str(existing)).free
        text = f"{free / (1 << 30):.1f} GiB free under {path} ({what})"
        if free < MIN_FREE_BYTES:
            out.append(Check(FAIL, text, f"free at least {MIN_FREE_BYTES >> 30} GiB there, or point {what} at "
                                         "another disk"))
        elif free < WARN_FREE_BYTES:
            out.append(Check(WARN, text, f"a long run may need more than {WARN_FREE_BYTES >> 30} GiB"))
        else:
            out.append(Check(OK, text))
    return out


def writable(path: str | Path, what: str) -> Check:
    """``path`` exists or can be made, and a file can be written in it (the check leaves no file behind)."""
    path = Path(path)
    try:
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a directory")
        if parent == path:
            with tempfile.TemporaryFile(dir=path):
                pass
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create {path}: {parent} is not writable")
    except OSError as exc:
        return Check(FAIL, f"{what} {path} is not writable: {exc}", f"fix its permissions or pick another {what}")
    return Check(OK, f"{what} {path} is writable")


def docker_engine(cfg: Config) -> list[Check]:
    """The Docker engine answers and has both images (``--runner docker``)."""
    from components.deploy.pods import PodError, docker_client

    try:
        client = docker_client()
    except PodError as exc:
        return [Check(FAIL, f"no Docker engine: {exc}", "start Docker, or run without --runner docker")]
    out = [Check(OK, "Docker engine answers")]
    for image in (cfg.cluster.image, cfg.cluster.serving_image):
        try:
            client.images.get(image)
            out.append(Check(OK, f"image {image} is on the engine"))
        except Exception:  # noqa: BLE001 - docker's NotFound and API errors both mean: build it
            out.append(Check(FAIL, f"image {image} is not on the engine", "build it: make image"))
    return out


def preflight(cfg: Config, runs_dir: str | Path, runner: str = "subprocess") -> list[Check]:
    """Every check a local run needs before it trains; Java and ports only where TorchServe runs on this machine."""
    checks = [python_version(), torch_installed(), writable(runs_dir, "runs dir"),
              writable(cfg.serving.home, "serving home")]
    checks += free_disk({"runs dir": runs_dir, "serving home": cfg.serving.home})
    if runner == "docker":
        checks += docker_engine(cfg)
    elif cfg.serving.deploy_target == "local":
        checks.append(java_version())
    if cfg.serving.deploy_target == "local":
        checks += serving_ports(cfg)
    return checks
