"""The serving request log: rotation, whole lines on a full disk, orphaned spool files, and flushing on shutdown.

Unit tests run the writer in this process (or in a small child process for signals). The slow tests start a
real TorchServe the way the serving container does (``torchserve --start --foreground`` with this checkout's
handler, in a session of its own) and stop it the ways it gets stopped. What they pin down about TorchServe
0.12: its frontend never signals the Python worker, it SIGKILLs it (``kill -9``) about 2 s after its own
SIGTERM, or within milliseconds once the worker's connection closes; in the pod (``tini -g`` as PID 1),
SIGTERM ends the whole container at once. So the log is flushed before SIGTERM by the drain (the pod's
preStop hook), and a worker that does get SIGTERM flushes inside its signal handler, connection still open.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import requests

from components.monitor.sampling import list_log_files, read_window
from serving import request_spool
from serving.processes import pid_alive
from serving.request_log import DEFAULT_MAX_AGE_S, LogBatch, RequestLogger, RotatingJsonl, format_lines
from serving.request_spool import FILE_PATTERN, REQUEST_LOG_ENV, SPOOL_ENV, drain

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DEAD_PID = 2**22 + 1  # above the kernel's pid_max: never a live process
SERVER_PROGRAMS = (b"tini", b"torchserve", b"org.pytorch.serve", b"model_service_worker")


def _batch(n: int, t: float = T0, version: str = "v") -> LogBatch:
    rng = np.random.default_rng(n)
    return LogBatch(images=rng.random((n, 1, 8, 8), dtype=np.float32), embeddings=rng.random((n, 16), dtype=np.float32),
                    predicted=[1] * n, labels=["1"] * n, confidences=[0.5] * n, sources=["client"] * n,
                    timestamps=[t] * n, model_version=version)


def _parse_whole_lines(data: bytes, where: str) -> list[dict]:
    """Every line of a log file as a record; fails on a torn line (unparseable, or no final newline)."""
    assert not data or data.endswith(b"\n"), f"{where} ends in the middle of a line"
    return [json.loads(line) for line in data.splitlines()]


def _local_lines(directory: Path) -> list[dict]:
    return [r for f in sorted(directory.glob("requests-*.jsonl")) for r in _parse_whole_lines(f.read_bytes(), f.name)]


def _s3_lines(prefix: str) -> list[dict]:
    from components.core import blobs

    uris = [u for u in blobs.list_uris(prefix + "/") if u.endswith(".jsonl")]
    return [r for u in uris for r in _parse_whole_lines(blobs.read_bytes(u), u)]


def _held_files(directory: Path) -> list[str]:
    """Log files a writer still has open (it holds their lock)."""
    held = []
    for path in directory.glob("requests-*.jsonl"):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path.name)
        finally:
            os.close(fd)
    return held


class _LockHolder:
    """Another live process that holds the lock of ``path`` (a writer of another worker) until it is killed."""

    def __init__(self, path: Path):
        code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)\n")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_prefix(moto_server, monkeypatch, request) -> str:
    """An empty bucket on the moto server, and this process's environment pointed at it."""
    from s3server import s3_env

    from components.core import blobs

    for name, value in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid()}"
    blobs.Storage().client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/requests/digits"


# ---------------------------------------------------------------- rotation


def test_files_rotate_within_minutes_and_the_monitor_still_finds_every_request(tmp_path):
    """A file reaches s3:// only when closed: the default rotation is minutes, not hours, and the monitor's
    file pruning (names and last writes, components/monitor/sampling.py) still finds every request."""
    assert DEFAULT_MAX_AGE_S <= 600
    now = [T0]
    files = RotatingJsonl(tmp_path, clock=lambda: now[0])  # the default size and age
    stamps = []
    for k in range(0, 3 * 3600, 20):  # a request every 20 s for 3 h, written 0.7 s after its answer
        now[0] = T0 + k + 0.7
        files.maybe_rotate()  # the writer's once-a-second tick
        files.write(format_lines(_batch(1, t=T0 + k)))
        stamps.append(T0 + k)
    files.close()
    assert len(list(tmp_path.glob("*.jsonl"))) == 3 * 3600 // DEFAULT_MAX_AGE_S
    for path in tmp_path.glob("*.jsonl"):  # on the simulated clock, each file was last written with its last line
        last = json.loads(path.read_text().splitlines()[-1])["timestamp"]
        written = datetime.fromisoformat(last).timestamp() + 0.7
        os.utime(path, (written, written))
    for start, length in ((3600, 3600), (1234, 900), (0, 60), (3 * 3600 - 300, 600)):
        since = datetime.fromtimestamp(T0 + start, timezone.utc)
        until = datetime.fromtimestamp(T0 + start + length, timezone.utc)
        window = read_window(tmp_path, since, until, epsilon=None, max_file_age_s=DEFAULT_MAX_AGE_S)
        assert window.rows_in_window == sum(T0 + start <= t < T0 + start + length for t in stamps), (start, length)
        if length < 3600:  # the window's files and their neighbours, not all 3 hours of them
            assert len(list_log_files(tmp_path, since, until, max_file_age_s=DEFAULT_MAX_AGE_S)) < 36


# ---------------------------------------------------------------- a full disk never tears a line


def _misbehave_on(directory: Path, monkeypatch, behaviour):
    """Route os.write for files under ``directory`` through ``behaviour(real_write, fd, data)``."""
    real_write = os.write

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(directory)):
            return behaviour(real_write, fd, data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_short_write_then_a_full_disk_leaves_only_whole_lines(tmp_path, monkeypatch):
    files = RotatingJsonl(tmp_path)
    before = format_lines(_batch(3, t=T0))
    files.write(before)
    path = files.path
    calls = []

    def half_then_full(real_write, fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # the disk takes half of the block ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then nothing more

    with monkeypatch.context() as patch:
        _misbehave_on(tmp_path, patch, half_then_full)
        with pytest.raises(OSError, match="No space left"):
            files.write(format_lines(_batch(4, t=T0 + 1)))
    assert len(calls) == 2 and path.read_bytes() == b"".join(before)  # cut back to the last whole line
    after = format_lines(_batch(2, t=T0 + 2))
    files.write(after)  # room again: the next block lands after the last whole line
    files.close()
    assert path.read_bytes() == b"".join(before + after)
    window = read_window(tmp_path, epsilon=None)
    assert window.rows_in_window == 5 and window.bad_lines == 0 and window.partial_lines == 0


def test_short_writes_are_completed(tmp_path, monkeypatch):
    files = RotatingJsonl(tmp_path)
    lines = format_lines(_batch(5, t=T0))
    _misbehave_on(tmp_path, monkeypatch, lambda real_write, fd, data: real_write(fd, bytes(data[:100])))
    files.write(lines)
    files.write(lines[:1])
    files.close()
    monkeypatch.undo()
    assert len(_local_lines(tmp_path)) == 6


def test_a_full_disk_loses_only_the_failed_block_and_the_log_goes_on(tmp_path, monkeypatch):
    log = RequestLogger(str(tmp_path), poll_s=0.02)
    disk_full = [False]

    def maybe_full(real_write, fd, data):
        if disk_full[0]:
            real_write(fd, bytes(data[:37]))  # part of a line reaches the file before the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    _misbehave_on(tmp_path, monkeypatch, maybe_full)
    log.submit(_batch(3, t=T0))
    assert log.flush(10)
    disk_full[0] = True
    log.submit(_batch(2, t=T0 + 1))
    assert log.flush(10)
    disk_full[0] = False
    log.submit(_batch(4, t=T0 + 2))
    closed = log.close()
    assert len(_local_lines(tmp_path)) == 7
    window = read_window(tmp_path, epsilon=None)
    assert window.bad_lines == 0 and window.partial_lines == 0
    stats = log.stats()
    assert (stats["written"], stats["failed"]) == (7, 2) and closed


def test_a_file_left_empty_is_not_published(tmp_path, monkeypatch):
    closed = []
    files = RotatingJsonl(tmp_path, on_closed=closed.append)

    def full(real_write, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    _misbehave_on(tmp_path, monkeypatch, full)
    with pytest.raises(OSError):
        files.write(format_lines(_batch(1)))
    files.close()
    assert closed == [] and list(tmp_path.glob("*.jsonl")) == []


# ---------------------------------------------------------------- orphaned spool files


def _spooled(spool: Path, pid: int, stamp: str = "20260101T000000Z", lines: int = 2) -> Path:
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / f"requests-{request_spool.host_tag()}-{pid}-{stamp}-0001.jsonl"
    path.write_bytes(b"".join(format_lines(_batch(lines))))
    return path


def _record_uploads(monkeypatch) -> list[str]:
    sent = []

    def put_file(local, uri):
        sent.append(uri.rsplit("/", 1)[-1])
        return uri

    monkeypatch.setattr("components.core.blobs.put_file", put_file)
    return sent


def test_a_dead_workers_file_is_adopted_even_when_its_pid_now_runs_another_process(tmp_path, monkeypatch):
    sent = _record_uploads(monkeypatch)
    stranger = subprocess.Popen(["sleep", "60"])  # a process that reuses the dead worker's pid
    try:
        assert pid_alive(stranger.pid)
        orphan = _spooled(tmp_path, stranger.pid)
        log = RequestLogger("s3://logs/digits", spool_dir=tmp_path)
        closed = log.close()
    finally:
        stranger.kill()
        stranger.wait()
    assert sent == [orphan.name] and not orphan.exists() and closed


def test_a_file_another_live_writer_holds_is_left_alone_until_it_dies(tmp_path, monkeypatch):
    sent = _record_uploads(monkeypatch)
    busy = _spooled(tmp_path, DEAD_PID)  # the name says dead, the lock says someone writes it
    holder = _LockHolder(busy)
    try:
        log = RequestLogger("s3://logs/digits", spool_dir=tmp_path)
        log.submit(_batch(1))
        log.close()
        assert busy.exists() and busy.name not in sent and len(sent) == 2  # only its own file (and its copy)
    finally:
        holder.kill()
    log = RequestLogger("s3://logs/digits", spool_dir=tmp_path)  # the next worker, once the writer is gone
    log.close()
    assert busy.name in sent and not busy.exists()


# ---------------------------------------------------------------- drain (the preStop hook)


def test_drain_writes_what_is_queued_and_closes_the_files_of_a_directory(tmp_path):
    log = RequestLogger(str(tmp_path), poll_s=0.5)
    log.submit(_batch(3, t=T0))
    assert log.flush(10) and _held_files(tmp_path)  # written, the file still open
    log.submit(_batch(2, t=T0 + 1))  # still queued when the drain starts
    result = drain(str(tmp_path), timeout_s=10)
    assert result["writers"] == 1 and result["unanswered"] == [] and result["left"] == []
    assert len(_local_lines(tmp_path)) == 5 and _held_files(tmp_path) == []
    log.submit(_batch(1, t=T0 + 2))  # the writer goes on, in a new file
    log.close()
    assert len(_local_lines(tmp_path)) == 6 and len(list(tmp_path.glob("requests-*.jsonl"))) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not FILE_PATTERN.fullmatch(p.name)) == []


@pytest.mark.slow
def test_drain_uploads_every_line_to_s3_and_the_spool_ends_empty(s3_prefix, tmp_path):
    spool = tmp_path / "spool"
    orphan = _spooled(spool, DEAD_PID, lines=3)
    log = RequestLogger(s3_prefix, spool_dir=spool, poll_s=0.05)
    log.submit(_batch(4, t=T0))
    assert log.flush(10)
    result = drain(s3_prefix, spool_dir=spool, timeout_s=20)
    assert result["writers"] == 1 and result["unanswered"] == [] and result["left"] == [], result
    assert len(_s3_lines(s3_prefix)) == 3 + 4 and not orphan.exists()
    assert log.close() and list(spool.glob("requests-*.jsonl")) == []


def test_drain_names_the_writers_that_did_not_answer(tmp_path, capsys):
    host = request_spool.host_tag()
    silent = tmp_path / f".writer-{host}-{os.getpid()}-999"  # alive (locked) but never answers
    holder = _LockHolder(silent)
    stale = tmp_path / f".writer-{host}-{DEAD_PID}-1"  # left by a writer that died: not waited for
    stale.write_text("")
    try:
        started = time.monotonic()
        result = drain(str(tmp_path), timeout_s=1.5)
        assert 1.5 <= time.monotonic() - started < 5
        assert result["writers"] == 1 and result["unanswered"] == [silent.name] and not stale.exists()
        assert request_spool.main(["drain", "--destination", str(tmp_path), "--timeout", "0.5"]) == 1
        assert f"no answer from ['{silent.name}']" in capsys.readouterr().err
    finally:
        holder.kill()
    assert request_spool.main(["drain", "--destination", str(tmp_path), "--timeout", "5"]) == 0
    assert "everything reached the destination" in capsys.readouterr().out


def test_drain_without_a_request_log_does_nothing(monkeypatch, capsys):
    monkeypatch.delenv(REQUEST_LOG_ENV, raising=False)
    assert request_spool.main(["drain"]) == 0
    assert "nothing to drain" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        request_spool.main(["drain", "--destination", "/x", "--timeout", "0"])


# ---------------------------------------------------------------- SIGTERM and exit, in a process of its own

_CHILD = textwrap.dedent("""
    import socket, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from serving.request_log import LogBatch, RequestLogger, close_on_shutdown

    def serve(frontend):  # like TorchServe's worker: the connection lives in this frame
        log = RequestLogger(sys.argv[1], spool_dir=sys.argv[2], poll_s=0.05)
        close_on_shutdown(log)
        for i in range(5):
            log.submit(LogBatch(images=np.full((2, 1, 8, 8), 0.5, np.float32), embeddings=np.ones((2, 16), np.float32),
                                predicted=[1, 2], labels=["1", "2"], confidences=[0.9, 0.8], sources=["client"] * 2,
                                timestamps=[1_767_225_600.0 + i] * 2, model_version="v"))
        assert log.flush(10)
        frontend.sendall(b"ready")
        frontend.recv(1)  # blocked here, like the worker waiting for the next batch

    serve(socket.create_connection(("127.0.0.1", int(sys.argv[3]))))
""")


@pytest.mark.slow
@pytest.mark.parametrize("end", ["sigterm", "exit"])
def test_worker_flushes_before_it_ends(s3_prefix, tmp_path, end):
    """``sigterm``: what the frontend does to a worker whose connection closes (measured above) is SIGKILL, at
    once; a worker told to end by SIGTERM must have written, closed and uploaded before its connection closes.
    ``exit``: the connection ends, the interpreter exits normally, atexit flushes."""
    spool = tmp_path / "spool"
    with socket.create_server(("127.0.0.1", 0)) as server:
        child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(PROJECT_ROOT)), s3_prefix, str(spool),
                                  str(server.getsockname()[1])], env=os.environ.copy())
        server.settimeout(60)
        connection, _ = server.accept()
        with connection:
            connection.settimeout(60)
            assert connection.recv(5) == b"ready"
            assert len(_local_lines(spool)) == 10 and _s3_lines(s3_prefix) == []  # written, not sent yet
            if end == "sigterm":
                child.send_signal(signal.SIGTERM)
                assert connection.recv(1) == b""  # the connection closed ...
                child.kill()  # ... and the frontend kills the worker at once
            else:
                connection.shutdown(socket.SHUT_RDWR)
    assert child.wait(30) in (0, -signal.SIGKILL)
    assert len(_s3_lines(s3_prefix)) == 10
    assert list(spool.glob("requests-*.jsonl")) == [] and list(spool.glob(".writer-*")) == []


# ---------------------------------------------------------------- a real TorchServe


@pytest.fixture(scope="module")
def digits_mar(tmp_path_factory) -> Path:
    """A small untrained classifier packed like the deploy step packs it, with two workers."""
    import torch

    from components.core.models import Classifier, EncoderSpec, save_classifier
    from serving.archive import build_mar

    root = tmp_path_factory.mktemp("mar")
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(width=8, embed_dim=16), num_classes=10)
    save_classifier(model.eval(), root / "model", {"class_names": [str(d) for d in range(10)], "model_version": "t-1"})
    return build_mar(root / "model", root / "export", "digits", "t-1", workers=2, batch_size=1, max_batch_delay_ms=1)


def _can_emulate_the_pod() -> bool:
    if os.geteuid() != 0 or not shutil.which("tini") or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


class _TorchServe:
    """TorchServe as the serving container runs it: ``torchserve --start --foreground``, in a session of its own;
    ``pod=True`` also puts ``tini -g`` in front as PID 1 of a new PID namespace, as in the container."""

    def __init__(self, root: Path, mar: Path, log_destination: str, spool: Path, pod: bool = False):
        from serving.processes import free_port
        from serving.torchserve_config import render_config

        self.home, self.spool = root / "home", spool
        store = self.home / "model-store"
        store.mkdir(parents=True)
        shutil.copy2(mar, store / "digits.mar")
        (self.home / "logs").mkdir()
        temp = root / "tmp"  # worker sockets: short paths
        temp.mkdir()
        ports = {k: free_port() for k in ("inference_port", "management_port", "metrics_port", "grpc_inference_port",
                                          "grpc_management_port")}
        config = self.home / "config.properties"
        config.write_text(render_config(store, "digits=digits.mar", workflow_store=self.home / "workflow-store", **ports))
        (self.home / "workflow-store").mkdir()
        self.inference = f"http://127.0.0.1:{ports['inference_port']}"
        self.management = f"http://127.0.0.1:{ports['management_port']}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TS_", "KFP_MLOPS_REQUEST_LOG"))}
        self.env.update(PYTHONPATH=str(PROJECT_ROOT), TEMP=str(temp), TMPDIR=str(temp), LOG_LOCATION=str(self.home / "logs"),
                        METRICS_LOCATION=str(self.home / "logs"), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                        **{REQUEST_LOG_ENV: log_destination, SPOOL_ENV: str(spool)})
        command = ["torchserve", "--start", "--foreground", "--ncs", "--model-store", str(store), "--ts-config",
                   str(config), "--models", "digits=digits.mar", "--log-config", str(PROJECT_ROOT / "serving/log4j2.xml")]
        if pod:
            command = ["unshare", "--pid", "--fork", "--mount-proc", "tini", "-g", "--", *command]
        self.out = open(root / "torchserve.out", "wb")
        self.process = subprocess.Popen(command, cwd=self.home, env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.tree: list[int] = []

    def __enter__(self) -> "_TorchServe":
        try:
            self._wait_ready(timeout_s=180)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.home.parent / "torchserve.out").read_text()[-3000:]
            try:
                keys = json.loads((self.home / "key_file.json").read_text())
                self.key = keys["inference"]["key"]
                described = requests.get(f"{self.management}/models/digits", timeout=5,
                                         headers={"Authorization": f"Bearer {keys['management']['key']}"}).json()
                if sum(w["status"] == "READY" for w in described[0]["workers"]) == 2:
                    from serving.processes import descendants

                    self.tree = descendants(self.process.pid)
                    return
            except (OSError, ValueError, KeyError, IndexError, requests.RequestException):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready: {(self.home.parent / 'torchserve.out').read_text()[-3000:]}")

    def predict(self, n: int) -> None:
        from serving.client import encode_png, predict

        png = encode_png(np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8))
        for _ in range(n):
            predict(f"{self.inference}/predictions/digits", png, self.key, source="test")

    def pids(self, marker: bytes) -> list[int]:
        """The server's processes whose command line has ``marker`` (``program`` alone: whose program it is)."""
        return [p for p in self.tree if marker in _cmdline(p)]

    def program(self, name: bytes) -> list[int]:
        return [p for p in self.tree if _cmdline(p).split(b"\0")[0].rsplit(b"/", 1)[-1] == name]

    def wait_gone(self, timeout_s: float = 60) -> float:
        """Seconds until every process of the server has ended."""
        started = time.monotonic()
        while self.process.poll() is None or any(pid_alive(p) for p in self.tree):
            assert time.monotonic() - started < timeout_s, "TorchServe did not stop"
            time.sleep(0.01)
        return time.monotonic() - started

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:  # not reaped: the group id is still ours (pod: tini dies, its namespace with it)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        for pid in self.tree:  # (the pod's processes are in tini's group)
            if pid_alive(pid) and any(m in _cmdline(pid) for m in SERVER_PROGRAMS):
                os.kill(pid, signal.SIGKILL)
        self.out.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_for_lines(directory: Path, n: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(f.read_bytes().count(b"\n") for f in directory.glob("requests-*.jsonl")) < n:
        assert time.monotonic() < deadline, f"fewer than {n} lines in {directory}"
        time.sleep(0.1)


@pytest.mark.slow
def test_torchserve_kills_its_worker_without_a_signal_and_the_next_worker_sends_its_file(digits_mar, s3_prefix,
                                                                                         tmp_path):
    """SIGTERM to the frontend alone (``mlops serve stop``): the worker gets no signal and is SIGKILLed, so
    nothing is uploaded then; what it had written stays spooled and the next writer on the spool sends it."""
    spool = tmp_path / "spool"
    with _TorchServe(tmp_path, digits_mar, s3_prefix, spool) as server:
        server.predict(12)
        _wait_for_lines(spool, 12)
        (frontend,) = server.pids(b"org.pytorch.serve.ModelServer")
        os.kill(frontend, signal.SIGTERM)
        server.wait_gone()
    assert _s3_lines(s3_prefix) == []
    assert len(list(spool.glob(".writer-*"))) == 2  # neither worker got to close its log: killed, not told
    assert len(_local_lines(spool)) == 12
    RequestLogger(s3_prefix, spool_dir=spool).close()  # the next worker on this spool
    assert len(_s3_lines(s3_prefix)) == 12 and list(spool.glob("requests-*.jsonl")) == []


@pytest.mark.slow
def test_sigterm_to_every_process_reaches_s3_before_the_frontend_kills_the_workers(digits_mar, s3_prefix, tmp_path):
    """SIGTERM to the whole process group (systemd, a shell's kill 0): each worker flushes inside its handler
    while its connection is open; the frontend kills it about 2 s later."""
    spool = tmp_path / "spool"
    with _TorchServe(tmp_path, digits_mar, s3_prefix, spool) as server:
        server.predict(12)
        os.killpg(server.process.pid, signal.SIGTERM)
        server.wait_gone()
    assert len(_s3_lines(s3_prefix)) == 12
    assert list(spool.glob("requests-*.jsonl")) == []


@pytest.mark.slow
@pytest.mark.parametrize("destination", ["directory", "s3"])
def test_drain_before_sigterm_leaves_nothing_behind(digits_mar, tmp_path, destination, request):
    """The pod's preStop hook: the drain, as its own process, then SIGTERM; every request reaches the
    destination exactly once."""
    spool = tmp_path / "spool"
    prefix = request.getfixturevalue("s3_prefix") if destination == "s3" else str(tmp_path / "requests")
    with _TorchServe(tmp_path, digits_mar, prefix, spool) as server:
        server.predict(12)
        hook = subprocess.run([sys.executable, "-m", "serving.request_log", "drain", "--timeout", "30"],
                              env=server.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0 and "drained 2 writer(s)" in hook.stdout, hook.stdout + hook.stderr
        if destination == "s3":
            assert len(_s3_lines(prefix)) == 12 and list(spool.glob("requests-*.jsonl")) == []
        else:
            assert len(_local_lines(Path(prefix))) == 12 and _held_files(Path(prefix)) == []
        os.killpg(server.process.pid, signal.SIGTERM)
        server.wait_gone()
    lines = _s3_lines(prefix) if destination == "s3" else _local_lines(Path(prefix))
    assert len(lines) == 12 and {line["source"] for line in lines} == {"test"}


@pytest.mark.slow
@pytest.mark.skipif(not _can_emulate_the_pod(), reason="needs root, unshare and tini to emulate the container")
def test_in_the_pod_sigterm_ends_everything_at_once_so_the_prestop_drain_flushes(digits_mar, s3_prefix, tmp_path):
    spool = tmp_path / "spool"
    with _TorchServe(tmp_path, digits_mar, s3_prefix, spool, pod=True) as server:
        server.predict(12)
        hook = subprocess.run([sys.executable, "-m", "serving.request_log", "drain", "--timeout", "30"],
                              env=server.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        (tini,) = server.program(b"tini")
        os.kill(tini, signal.SIGTERM)  # what the container runtime does once preStop has ended
        # The launcher dies of SIGTERM, tini follows it, and the kernel SIGKILLs the rest of the namespace:
        # no time for the JVM's 2 s shutdown, nor for any flush after SIGTERM.
        assert server.wait_gone() < 1.5
    assert len(_s3_lines(s3_prefix)) == 12 and list(spool.glob("requests-*.jsonl")) == []
