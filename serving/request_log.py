"""The serving request log: one JSON line per answered request, written off the request path.

The handler hands each answered batch to :class:`RequestLogger` with
:meth:`RequestLogger.submit`, which only appends a reference to a bounded
hand-over deque: it takes no lock, wakes no thread, computes nothing and never
touches a file. When ``queue_batches`` batches are already waiting, the batch is
dropped and counted (``stats()["dropped"]``) rather than slowing an answer down.
A daemon thread collects what piled up every ``poll_s`` (0.2 s), computes the
monitoring features of the whole block at once
(``components.core.features.image_features`` and ``embedding_projection``) and
appends the lines to a :class:`RotatingJsonl` file.

Files are ``requests-<host>-<pid>-<UTC start>-<seq>.jsonl`` and are rotated when
they reach ``max_bytes`` or are ``max_age_s`` old (5 minutes by default; checked
at least once a second, traffic or not). A block of lines is appended whole or
not at all: a short write or a full disk truncates the file back to its last
complete line, so a reader never finds half a line followed by more lines. The
destination is a local directory (files are written there directly; the
monitor reads every ``*.jsonl`` in it) or an ``s3://`` prefix: then files are
written to a local spool directory and each closed file is uploaded with
``components.core.storage.put_file`` and removed. A failed upload is retried every 30 s.

Which process owns a spooled file is told by an advisory lock (``flock``) that
its writer holds while the file is open, and that an uploader holds while it
sends it: the kernel drops a lock when its process dies, so the spooled files of
a worker that was killed (SIGKILL, OOM) are recognised and uploaded by the next
worker of this host that starts on the same spool directory, even when the dead
worker's pid now belongs to another process.

Shutting down (see ``docs/request-log.md``): TorchServe's frontend never signals
its Python worker; it SIGKILLs it as soon as the worker's connection closes, and
in the serving pod SIGTERM ends the whole container at once. So nothing after
SIGTERM can be relied on, and the log is flushed *before* it: ``python -m
serving.request_log drain`` (the pod's preStop hook) asks every writer of this
host to write what it holds, close its file and upload every closed file, waits
for their answers and uploads what is left, within a deadline. In-process, on
SIGTERM and at interpreter exit (:func:`close_on_shutdown`), the worker does the
same within ``DEFAULT_SHUTDOWN_S``, from inside the signal handler, while its
connection to the frontend is still open.

One line (numbers with 6 significant digits)::

    {"timestamp": "2026-01-01T12:00:00.123+00:00", "model_version": "3", "source": "client",
     "predicted_class": 7, "predicted_label": "7", "confidence": 0.98,
     "pixel_mean": ..., ... (FEATURE_COLUMNS), "emb_0": ..., ... "emb_7": ...}
"""

from __future__ import annotations

import argparse
import atexit
import errno
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)

REQUEST_LOG_ENV = "KFP_MLOPS_REQUEST_LOG_DIR"  # a local directory or an s3:// prefix; unset = no request log
MAX_BYTES_ENV = "KFP_MLOPS_REQUEST_LOG_MAX_BYTES"
MAX_AGE_ENV = "KFP_MLOPS_REQUEST_LOG_MAX_AGE_S"
QUEUE_ENV = "KFP_MLOPS_REQUEST_LOG_QUEUE"
SPOOL_ENV = "KFP_MLOPS_REQUEST_LOG_SPOOL"  # where s3:// logs are written before upload (default: the temp dir)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# A file reaches s3:// when it is closed: the rotation age bounds what a lost pod can take with it, and how
# long the monitor waits (--settle) before a window is complete.
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_QUEUE_BATCHES = 1024  # handler batches (not requests) waiting for the writer thread
DEFAULT_SHUTDOWN_S = 10.0  # on SIGTERM or exit: write, close and upload within this, then let the process end
DEFAULT_DRAIN_TIMEOUT_S = 40.0
MAX_SPOOLED_FILES = 200  # s3 destination unreachable for long: keep this many closed files, drop the oldest
UPLOAD_RETRY_S = 30.0
SINGLE_PUT_MAX_BYTES = 64 * 1024 * 1024
FILE_PATTERN = re.compile(r"requests-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<seq>\d+)\.jsonl")
# Beside the log files (dot files, never *.jsonl, never uploaded): one per live writer, locked while it runs and
# holding the last drain request it answered; and the drain request of this host.
WRITER_PREFIX = ".writer-"
DRAIN_PREFIX = ".drain-"


@dataclass
class LogBatch:
    """What the request path hands over: references to arrays it already has, nothing computed."""

    images: np.ndarray  # [n, C, H, W] float32 in [0, 1], as the model saw them
    embeddings: np.ndarray  # [n, D] the encoder's output, model.embed(x)
    predicted: list[int]
    labels: list[str]
    confidences: list[float]
    sources: list[str]
    timestamps: list[float]  # time.time() when each answer was made
    model_version: str


META_COLUMNS = ["timestamp", "model_version", "source", "predicted_class", "predicted_label"]


def _rows(batches: LogBatch | list[LogBatch]) -> tuple[list[str], list[tuple]]:
    """The float column names and, per request in time order, ``(timestamp, meta..., [floats], all finite)``.

    All batches of a block share one ``image_features`` and one ``embedding_projection``
    call: their fixed cost (a DataFrame, the projection matrix) is paid once per block.
    Batches whose images or embeddings differ in shape (two models in one block) are computed apart.
    """
    from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, embedding_projection, image_features

    batches = [batches] if isinstance(batches, LogBatch) else [b for b in batches if len(b.predicted)]
    float_columns = ["confidence", *FEATURE_COLUMNS, *EMBEDDING_COLUMNS]
    by_shape: dict[tuple, list[LogBatch]] = {}
    for b in batches:
        by_shape.setdefault((b.images.shape[1:], b.embeddings.shape[1]), []).append(b)
    stamps: dict[float, str] = {}  # a batch shares one answer time: format it once
    rows = []
    for group in by_shape.values():
        features = image_features(np.concatenate([b.images for b in group]))[FEATURE_COLUMNS].to_numpy()
        projected = embedding_projection(np.concatenate([b.embeddings for b in group]))
        confidences = np.concatenate([np.asarray(b.confidences, dtype=np.float64) for b in group])
        matrix = np.column_stack([confidences, features, projected])
        values, finite = matrix.tolist(), np.isfinite(matrix).all(axis=1).tolist()
        i = 0
        for b in group:
            for j in range(len(b.predicted)):
                t = b.timestamps[j]
                if t not in stamps:
                    stamps[t] = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
                rows.append((t, stamps[t], b.model_version, b.sources[j], int(b.predicted[j]), b.labels[j], values[i],
                             finite[i]))
                i += 1
    if len(by_shape) > 1:
        rows.sort(key=lambda r: r[0])  # one file in time order even when two models shared a block
    return float_columns, [r[1:] for r in rows]


def build_records(batches: LogBatch | list[LogBatch]) -> list[dict]:
    """The records of one or more batches as dicts (what each JSON line holds)."""
    float_columns, rows = _rows(batches)
    return [{**dict(zip(META_COLUMNS, row[:5])), **dict(zip(float_columns, row[5]))} for row in rows]


def format_lines(batches: LogBatch | list[LogBatch]) -> list[bytes]:
    """The JSON lines of one or more batches, floats with 6 significant digits.

    Formatted with one ``%`` per line from a template: about four times cheaper than
    ``json.dumps`` of a dict (float repr dominates it), which is most of what
    logging costs per request. A row with a non-finite number falls back to
    ``json.dumps`` (``NaN``/``Infinity``, as Python's json reads them).
    """
    float_columns, rows = _rows(batches)
    template = "{" + ",".join(f'"{k}":%s' for k in META_COLUMNS[:3]) + f',"{META_COLUMNS[3]}":%d,"{META_COLUMNS[4]}":%s,'
    template += ",".join(f'"{k}":%.6g' for k in float_columns) + "}\n"
    quoted: dict[str, str] = {}

    def q(text: str) -> str:
        if text not in quoted:
            quoted[text] = json.dumps(text)
        return quoted[text]

    lines = []
    for stamp, version, source, predicted, label, values, finite in rows:
        if finite:
            lines.append((template % (q(stamp), q(version), q(source), predicted, q(label), *values)).encode())
        else:
            record = {**dict(zip(META_COLUMNS, (stamp, version, source, predicted, label))), **dict(zip(float_columns, values))}
            lines.append((json.dumps(record, separators=(",", ":")) + "\n").encode())
    return lines


def _host_tag() -> str:
    """This machine's (or pod's) name, safe for a file name: pods writing one s3 prefix must not collide."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): the signal said it exists
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False  # gone since the signal
    return "zombie" not in next((line for line in status.splitlines() if line.startswith("State:")), "")


def spool_dir_for(destination: str, spool_dir: str | Path | None = None) -> Path:
    """Where the files of ``destination`` are written: the directory itself, or for ``s3://`` the spool directory
    (``spool_dir``, else one per prefix in the temp dir, so every worker of a host with that prefix shares it)."""
    destination = str(destination)
    if not destination.startswith("s3://"):
        return Path(destination)
    if spool_dir:
        return Path(spool_dir)
    digest = hashlib.sha256(destination.rstrip("/").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"kfp-mlops-request-log-{digest}"


def _try_lock(fd: int) -> bool | None:
    """Take the advisory lock of an open file without waiting: True when taken, False when another open file
    holds it, None when this file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _orphaned(path: Path, pid: int) -> bool:
    """Whether no live process writes or sends ``path``. The lock tells even when the writer's ``pid`` has been
    reused by another process; only a file system without locks falls back on the pid."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        taken = _try_lock(fd)
    finally:
        os.close(fd)  # drops the probe's own lock
    return not pid_alive(pid) if taken is None else taken


def _upload_spooled(path: Path, prefix: str, one_request: bool = False) -> str:
    """Send one closed spool file to ``prefix`` and delete it, holding its lock so no other process sends it too.

    "sent"; "gone" (sent by another process meanwhile, or empty: deleted); "busy" (its writer or another uploader
    holds it now). Raises what the upload raised; the file is then kept. ``one_request``: a single PUT, no
    transfer threads (during interpreter exit no new thread may start; files up to ``SINGLE_PUT_MAX_BYTES``).
    """
    from components.core import storage

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "gone"
    try:
        if _try_lock(fd) is False:
            return "busy"
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return "gone"
        except FileNotFoundError:
            return "gone"
        size = os.fstat(fd).st_size
        if size == 0:  # opened, then nothing could be written: nothing to send
            path.unlink(missing_ok=True)
            return "gone"
        if one_request and size <= SINGLE_PUT_MAX_BYTES:
            storage.write_bytes(f"{prefix}/{path.name}", os.pread(fd, size, 0))
        else:
            storage.put_file(path, f"{prefix}/{path.name}")
        path.unlink(missing_ok=True)
        return "sent"
    finally:
        os.close(fd)


def _write_whole(fd: int, data: bytes) -> None:
    """Write all of ``data``: ``os.write`` may write only part of it (a full disk, a signal)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


class RotatingJsonl:
    """Appends JSON lines to files in ``directory``, starting a new file by size and by age.

    Not thread-safe: only the writer thread uses it. A file is opened lazily on
    the first write, so quiet periods leave no empty files, and it stays locked
    (``flock``) while open. ``on_closed(path)`` is called with every file that
    will not be written again; a file left empty is deleted instead.
    """

    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 on_closed: Callable[[Path], None] | None = None, clock: Callable[[], float] = time.time):
        if max_bytes < 1 or max_age_s <= 0:
            raise ValueError(f"request log rotation needs max_bytes >= 1 and max_age_s > 0, got {max_bytes}, {max_age_s}")
        self.directory = Path(directory)
        self.max_bytes, self.max_age_s = int(max_bytes), float(max_age_s)
        self.on_closed, self.clock = on_closed, clock
        self.host, self.pid = _host_tag(), os.getpid()
        self.path: Path | None = None
        self.lines_written = 0  # every line that is in a file, whole
        self._fd: int | None = None
        self._opened_at = 0.0
        self._size = 0
        self._seq = 0

    def write(self, lines: list[bytes]) -> None:
        """Append whole lines, starting a new file first if the current one is old, and whenever
        the next line would take it past ``max_bytes`` (a single longer line gets a file of its own).
        On an error (a full disk) the lines of the failed block are not in any file, and no part of them is."""
        self.maybe_rotate()
        chunk: list[bytes] = []
        size = self._size if self._fd is not None else 0
        for line in lines:
            if size and size + len(line) > self.max_bytes:
                self._append(chunk)
                chunk, size = [], 0
                self.close()
            chunk.append(line)
            size += len(line)
        self._append(chunk)

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        if self._fd is None:
            self._open()
        data = b"".join(lines)
        try:
            # O_APPEND, one block at a time: a reader sees at most a last line still being written.
            _write_whole(self._fd, data)
        except OSError:
            self._cut_back(self._size)
            raise
        self._size += len(data)
        self.lines_written += len(lines)

    def _cut_back(self, size: int) -> None:
        """Drop a partly written block: the file ends with its last whole line again."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as err:  # shrinking needs no space; should it fail anyway, never append after a torn line
            logger.error("request log: cannot truncate %s after a failed write (%s); closing it", self.path, err)
            self.close()

    def maybe_rotate(self) -> bool:
        """Close the current file if it reached max_bytes or max_age_s; True if it did."""
        if self._fd is None:
            return False
        if self._size >= self.max_bytes or self.clock() - self._opened_at >= self.max_age_s:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self._fd is None:
            return
        fd, closed, empty = self._fd, self.path, self._size == 0
        self._fd, self.path = None, None
        if empty and closed is not None:
            closed.unlink(missing_ok=True)  # while still locked: nobody else takes an empty file for an orphan
        os.close(fd)
        if self.on_closed is not None and closed is not None and not empty:
            self.on_closed(closed)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self._seq += 1
        path = self.directory / f"requests-{self.host}-{self.pid}-{stamp}-{self._seq:04d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _try_lock(fd) is False:  # a name is unique per process: only a stray copy of this process could hold it
            os.close(fd)
            raise OSError(errno.EBUSY, f"{path} is being written by another process")
        self.path, self._fd = path, fd
        self._opened_at, self._size = now, os.fstat(fd).st_size


class RequestLogger:
    """Bounded hand-over + writer thread + rotating JSONL files in a directory or under an ``s3://`` prefix.

    The hand-over is a ``collections.deque`` the writer polls every ``poll_s``
    seconds: appending to it is atomic under the GIL, so the request path takes
    no lock and wakes no thread (a ``queue.Queue`` notifies its consumer on every
    put, and the woken writer then competes with the request for the GIL).
    Each counter has exactly one writing thread, so none needs a lock.
    """

    _ids = itertools.count(1)

    def __init__(self, destination: str, max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 queue_batches: int = DEFAULT_QUEUE_BATCHES, spool_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float = 0.2):
        self.destination = str(destination)
        self.is_s3 = self.destination.startswith("s3://")
        self.prefix = self.destination.rstrip("/")
        self.local_dir = spool_dir_for(self.destination, spool_dir)
        self.max_batches = max(1, int(queue_batches))
        self.poll_s = float(poll_s)
        self.host = _host_tag()
        self._pending: deque[LogBatch] = deque()
        self._files = RotatingJsonl(self.local_dir, max_bytes, max_age_s,
                                    on_closed=self._closed if self.is_s3 else None, clock=clock)
        # request path only
        self._submitted_batches = self._submitted = self._dropped = 0
        # writer thread only
        self._done_batches = self._written = self._failed = 0
        self._uploaded_files = self._upload_failures = self._lost_files = 0
        self._pending_uploads: list[Path] = []
        self._next_upload_try = 0.0
        self._last_drop_report = 0.0
        self._last_tick = 0.0
        self._presence = self.local_dir / f"{WRITER_PREFIX}{self.host}-{os.getpid()}-{next(self._ids)}"
        self._presence_fd: int | None = None
        self._drain_answered = ""
        self._stop = threading.Event()
        self._stop_deadline = 0.0
        self._one_request_uploads = False
        self._thread = threading.Thread(target=self._run, name="request-log-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RequestLogger | None:
        """A logger configured by the KFP_MLOPS_REQUEST_LOG_* variables, or None when the log is off."""
        env = os.environ if environ is None else environ
        destination = (env.get(REQUEST_LOG_ENV) or "").strip()
        if not destination:
            return None

        def number(name: str, default: float, cast: type) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = cast(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {raw!r}")
            return value

        return cls(destination, max_bytes=number(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, int),
                   max_age_s=number(MAX_AGE_ENV, DEFAULT_MAX_AGE_S, float),
                   queue_batches=number(QUEUE_ENV, DEFAULT_QUEUE_BATCHES, int), spool_dir=env.get(SPOOL_ENV) or None)

    # -- request path ---------------------------------------------------------------

    def submit(self, batch: LogBatch) -> bool:
        """Hand one answered batch to the writer; never blocks, never waits for a lock.

        False (and the batch's requests counted as dropped) when ``queue_batches``
        batches are already waiting: a stuck writer must not grow memory or slow answers.
        """
        n = len(batch.predicted)
        if len(self._pending) >= self.max_batches or self._stop.is_set():
            self._dropped += n
            return False
        self._pending.append(batch)
        self._submitted_batches += 1
        self._submitted += n
        return True

    # -- control --------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {"submitted": self._submitted, "written": self._written, "dropped": self._dropped,
                "failed": self._failed, "uploaded_files": self._uploaded_files,
                "upload_failures": self._upload_failures, "lost_files": self._lost_files,
                "queued_batches": len(self._pending), "pending_uploads": len(self._pending_uploads)}

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (not uploaded); True if it was in time."""
        target = self._submitted_batches
        deadline = time.monotonic() + timeout_s
        while self._done_batches < target:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = DEFAULT_SHUTDOWN_S, at_exit: bool = False) -> bool:
        """Write what is waiting, close the current file and (s3) upload every closed file, all within
        ``timeout_s``; later batches are dropped. True when all of it was done in time; idempotent.
        ``at_exit``: called while the interpreter exits (uploads then avoid starting threads)."""
        if not self._stop.is_set():
            self._stop_deadline = time.monotonic() + timeout_s
            self._one_request_uploads = at_exit
            self._stop.set()
        self._thread.join(max(0.0, self._stop_deadline - time.monotonic()))
        if self._thread.is_alive():
            return False
        self._leave()
        return not self._pending_uploads

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        # (No lower CPU priority for this thread: descheduled while it holds the GIL, it would stall the
        # request thread for as long as the scheduler keeps it waiting. It yields the GIL often instead.)
        self._announce()
        if self.is_s3:
            self._prepare_uploads()
            self._adopt_orphans()
        while not self._stop.wait(self.poll_s):
            self._write_pending()
            if time.monotonic() - self._last_tick >= 1.0:
                self._tick()
        self._hand_over(deadline=self._stop_deadline)

    def _write_pending(self) -> None:
        batches = []
        while self._pending:
            batches.append(self._pending.popleft())
        if batches:
            self._write(batches)
            self._done_batches += len(batches)

    def _write(self, batches: list[LogBatch]) -> None:
        n = sum(len(b.predicted) for b in batches)
        before = self._files.lines_written
        try:
            lines, chunk, size = [], [], 0
            for batch in batches:  # chunks of ~512 requests: the features' fixed cost stays small per request,
                chunk.append(batch)  # and the request thread gets the GIL back between chunks
                size += len(batch.predicted)
                if size >= 512 or batch is batches[-1]:
                    lines += format_lines(chunk)
                    chunk, size = [], 0
                    time.sleep(0)
            self._files.write(lines)
        except Exception as err:  # noqa: BLE001 - a log problem must never reach the answers
            written = self._files.lines_written - before
            self._written += written
            self._failed += n - written
            logger.error("request log: %d record(s) not written to %s: %s", n - written, self._files.directory, err)
            return
        self._written += n

    def _tick(self) -> None:
        """Once a second: time-based rotation, drain requests, upload retries, a warning when records were dropped."""
        self._last_tick = time.monotonic()
        try:
            self._files.maybe_rotate()
        except OSError as err:
            logger.error("request log: rotating %s failed: %s", self._files.path, err)
        self._answer_drain_request()
        self._upload_pending()
        if self._dropped and self._last_tick - self._last_drop_report > 60:
            self._last_drop_report = self._last_tick
            logger.warning("request log: %d record(s) dropped so far because the writer fell behind", self._dropped)

    def _hand_over(self, deadline: float | None = None) -> None:
        """Write what is queued, close the current file, and (s3) upload every closed file of this host's
        writers that nobody else owns, until ``deadline`` (monotonic)."""
        self._write_pending()
        try:
            self._files.close()
        except OSError as err:
            logger.error("request log: closing %s failed: %s", self._files.path, err)
        if self.is_s3:
            self._adopt_orphans()
            self._upload_pending(force=True, deadline=deadline)

    # -- drain requests (python -m serving.request_log drain) --------------------------

    def _announce(self) -> None:
        """Create and lock this writer's presence file, so a drain waits for its answer."""
        try:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._presence, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            logger.error("request log: cannot create %s (%s): a drain will not wait for this writer",
                         self._presence, err)
            return
        _try_lock(fd)
        self._presence_fd = fd
        _live_writers(self.local_dir, self.host)  # sweeps the presence files of writers that died

    def _leave(self) -> None:
        if self._presence_fd is not None:
            self._presence.unlink(missing_ok=True)
            os.close(self._presence_fd)
            self._presence_fd = None

    def _answer_drain_request(self) -> None:
        try:
            request = (self.local_dir / f"{DRAIN_PREFIX}{self.host}").read_text()
        except OSError:
            return
        if not request or request == self._drain_answered:
            return
        self._hand_over()
        self._drain_answered = request
        if self._presence_fd is not None:
            try:
                os.pwrite(self._presence_fd, request.encode(), 0)
                os.ftruncate(self._presence_fd, len(request.encode()))
            except OSError as err:
                logger.error("request log: cannot answer the drain request in %s: %s", self._presence, err)

    # -- s3 ------------------------------------------------------------------------

    def _prepare_uploads(self) -> None:
        """Create the S3 client now: during interpreter exit importing boto3 fails (it registers an exit hook)."""
        from components.core import storage

        try:
            storage.Storage().client
        except Exception as err:  # noqa: BLE001 - the uploads report it again, with the file
            logger.error("request log: no S3 client for %s yet (%s); uploads will retry", self.prefix, err)

    def _closed(self, path: Path) -> None:
        self._pending_uploads.append(path)
        self._next_upload_try = 0.0

    def _adopt_orphans(self) -> None:
        """Take over this host's spooled files that no live process writes or sends (killed before uploading)."""
        try:
            candidates = sorted(self.local_dir.glob("requests-*.jsonl"))
        except OSError:
            return
        known = set(self._pending_uploads)
        for path in candidates:
            match = FILE_PATTERN.fullmatch(path.name)
            if match and match["host"] == self.host and path not in known and _orphaned(path, int(match["pid"])):
                self._pending_uploads.append(path)

    def _upload_pending(self, force: bool = False, deadline: float | None = None) -> None:
        if not self._pending_uploads or (not force and time.monotonic() < self._next_upload_try):
            return
        remaining = []
        for i, path in enumerate(self._pending_uploads):
            if deadline is not None and time.monotonic() >= deadline:
                remaining += self._pending_uploads[i:]
                break
            try:
                outcome = _upload_spooled(path, self.prefix, self._one_request_uploads)
            except Exception as err:  # noqa: BLE001 - keep the file, try again later
                remaining.append(path)
                self._upload_failures += 1
                logger.error("request log: upload of %s to %s failed (will retry): %s", path.name, self.prefix, err)
                continue
            if outcome == "busy":
                remaining.append(path)
            self._uploaded_files += outcome == "sent"
        if len(remaining) > MAX_SPOOLED_FILES:  # the destination is down for long: bound the local disk use
            lost, remaining = remaining[:-MAX_SPOOLED_FILES], remaining[-MAX_SPOOLED_FILES:]
            for path in lost:
                path.unlink(missing_ok=True)
            self._lost_files += len(lost)
            logger.error("request log: %d spooled file(s) deleted unsent; %s unreachable", len(lost), self.prefix)
        self._pending_uploads = remaining
        if remaining:
            self._next_upload_try = time.monotonic() + UPLOAD_RETRY_S


# -- flushing from outside the worker: the pod's preStop hook ------------------------------


def _live_writers(directory: Path, host: str) -> dict[str, str]:
    """The presence files of ``host``'s live writers in ``directory``, with the drain request each last answered.
    A presence file nobody holds is left from a writer that died: it is removed."""
    answers = {}
    for path in sorted(directory.glob(f"{WRITER_PREFIX}{host}-*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            taken = _try_lock(fd)
            if taken is None:  # no locks here: the pid in the name is all there is
                taken = not pid_alive(int(path.name.rsplit("-", 2)[1]))
            if taken:
                path.unlink(missing_ok=True)
            else:
                answers[path.name] = os.pread(fd, 256, 0).decode(errors="replace")
        finally:
            os.close(fd)
    return answers


def drain(destination: str, spool_dir: str | Path | None = None, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
          poll_s: float = 0.1) -> dict:
    """Flush every request-log writer of this host on ``destination``, from another process, within ``timeout_s``.

    Each writer (at its next once-a-second tick) writes what it holds, closes its current file and, for
    ``s3://``, uploads every closed file, then answers; they keep serving (a later request opens a new file).
    Once all have answered, or at the deadline, closed files that are still spooled are uploaded from here.
    Returns ``writers``, ``unanswered`` (presence files), ``uploaded``, ``left`` (files still spooled or open)
    and ``errors``; everything reached the destination when ``unanswered`` and ``left`` are empty.
    """
    deadline = time.monotonic() + timeout_s
    directory, host = spool_dir_for(destination, spool_dir), _host_tag()
    result: dict = {"directory": str(directory), "writers": 0, "unanswered": [], "uploaded": 0, "left": [],
                    "errors": []}
    if not directory.is_dir():
        return result  # no writer has ever written here
    request_path = directory / f"{DRAIN_PREFIX}{host}"
    request = f"{time.time_ns()}-{os.getpid()}"
    staged = directory / f"{request_path.name}.{os.getpid()}.tmp"
    staged.write_text(request)
    os.replace(staged, request_path)
    try:
        while True:
            answers = _live_writers(directory, host)
            result["writers"], result["unanswered"] = len(answers), [w for w, a in answers.items() if a != request]
            if not result["unanswered"] or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    finally:
        request_path.unlink(missing_ok=True)
    if str(destination).startswith("s3://"):  # (a directory destination has every written line already)
        _upload_orphans(directory, host, str(destination).rstrip("/"), deadline, result)
        result["left"] = sorted(p.name for p in directory.glob("requests-*.jsonl"))
    return result


def _upload_orphans(directory: Path, host: str, prefix: str, deadline: float, result: dict) -> None:
    """Upload the closed spool files nobody owns, in a thread: a hung upload must not outlast the deadline."""
    def send_all() -> None:
        for path in sorted(directory.glob("requests-*.jsonl")):
            match = FILE_PATTERN.fullmatch(path.name)
            if time.monotonic() >= deadline:
                return
            if not match or match["host"] != host or not _orphaned(path, int(match["pid"])):
                continue
            try:
                result["uploaded"] += _upload_spooled(path, prefix) == "sent"
            except Exception as err:  # noqa: BLE001 - reported, the file stays for the next writer
                result["errors"].append(f"{path.name}: {type(err).__name__}: {err}"[:300])

    sender = threading.Thread(target=send_all, name="request-log-drain", daemon=True)
    sender.start()
    sender.join(max(0.0, deadline - time.monotonic()))


# -- flushing from inside the worker: SIGTERM and interpreter exit -------------------------

_closed_on_shutdown: weakref.WeakSet[RequestLogger] = weakref.WeakSet()
_shutdown_hooks = threading.Lock()
_shutdown_installed = False


def close_on_shutdown(log: RequestLogger, timeout_s: float = DEFAULT_SHUTDOWN_S) -> None:
    """Close ``log`` (write, close, upload) within ``timeout_s`` when this process is told to end.

    At interpreter exit (atexit) and on SIGTERM. The SIGTERM handler closes the logs *before* it raises
    ``SystemExit``: TorchServe's frontend SIGKILLs a worker as soon as the worker's connection closes, which
    unwinding the worker would do first. A SIGTERM handler installed earlier runs after it; an ignored SIGTERM
    stays ignored; outside the main thread signals are left alone.
    """
    global _shutdown_installed
    _closed_on_shutdown.add(log)
    with _shutdown_hooks:
        if _shutdown_installed:
            return
        _shutdown_installed = True
    atexit.register(_close_all, timeout_s, True)
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, functools.partial(_close_all_then_exit, timeout_s, previous))
    except ValueError:  # not the main thread (e.g. a test runner's worker thread)
        pass


def _close_all(timeout_s: float, at_exit: bool = False) -> None:
    deadline = time.monotonic() + timeout_s
    for log in list(_closed_on_shutdown):
        log.close(max(0.0, deadline - time.monotonic()), at_exit)


def _close_all_then_exit(timeout_s: float, previous, signum: int, frame) -> None:
    _close_all(timeout_s)
    if callable(previous):
        previous(signum, frame)
    raise SystemExit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.request_log", description="The serving request log.")
    commands = parser.add_subparsers(dest="command", required=True)
    flush = commands.add_parser(
        "drain", help="flush every request-log writer of this host (a preStop hook: before SIGTERM)",
        description="Ask every request-log writer of this host (the TorchServe workers) to write what they hold, "
                    "close their files and upload every closed file to an s3:// destination; wait for their "
                    "answers, then upload what is still spooled. The writers keep serving. Exit status 0 when "
                    "everything reached the destination in time, 1 otherwise (the message says what is left).")
    flush.add_argument("--destination", default=os.environ.get(REQUEST_LOG_ENV, ""),
                       help=f"a directory or s3:// prefix (default ${REQUEST_LOG_ENV}; unset: nothing to do)")
    flush.add_argument("--spool", default=os.environ.get(SPOOL_ENV) or None,
                       help=f"the writers' spool directory for s3:// (default ${SPOOL_ENV}, else the one per "
                            "prefix in the temp dir the writers use)")
    flush.add_argument("--delay", type=float, default=0.0,
                       help="seconds to wait first, while the pod leaves the Service and its last requests finish")
    flush.add_argument("--timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S,
                       help="seconds for the whole drain after the delay; keep delay + timeout + 10 within "
                            "the pod's terminationGracePeriodSeconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.delay < 0 or args.timeout <= 0:
        parser.error("--delay must be >= 0 and --timeout > 0")
    if not args.destination.strip():
        print(f"request log: {REQUEST_LOG_ENV} is not set: the request log is off, nothing to drain")
        return 0
    time.sleep(args.delay)
    result = drain(args.destination.strip(), args.spool, args.timeout)
    summary = (f"request log: drained {result['writers']} writer(s) in {result['directory']}, "
               f"{result['uploaded']} file(s) uploaded from here")
    if not result["unanswered"] and not result["left"]:
        print(summary + "; everything reached the destination")
        return 0
    print(f"{summary}; NOT complete after {args.timeout:g} s: no answer from {result['unanswered'] or 'none'}, "
          f"still spooled or open: {result['left'] or 'none'}; errors: {result['errors'] or 'none'}. Check that "
          f"the destination is reachable with these credentials; whatever stayed spooled is uploaded by the next "
          f"writer that starts on {result['directory']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
