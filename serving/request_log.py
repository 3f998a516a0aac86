"""The serving request log: one JSON line per answered request, written off the request path.

The handler hands each answered batch to :class:`RequestLogger` with
:meth:`RequestLogger.submit`, which only appends a reference to a bounded
hand-over deque: it takes no lock, wakes no thread, computes nothing and never
touches a file. When ``queue_batches`` batches are already waiting, the batch is
dropped and counted (``stats()["dropped"]``) rather than slowing an answer down.
A daemon thread collects what piled up every ``poll_s`` (0.2 s), computes the
monitoring features of the whole block at once
(``components.features.image_features`` and ``embedding_projection``) and
appends the lines to a :class:`RotatingJsonl` file.

Files are ``requests-<host>-<pid>-<UTC start>-<seq>.jsonl`` and are rotated when
they reach ``max_bytes`` or are ``max_age_s`` old (checked at least once a second,
traffic or not), so each file is small and covers a bounded time window. The
destination is a local directory (files are written there directly; the
monitor reads every ``*.jsonl`` in it) or an ``s3://`` prefix: then files are
written to a local spool directory and each closed file is uploaded with
``components.storage.put_file`` and removed. A failed upload is retried at the
next rotation tick; spooled files of a worker that died (SIGKILL, OOM) are
uploaded by the next worker that starts with the same spool directory.

One line (numbers with 6 significant digits)::

    {"timestamp": "2026-01-01T12:00:00.123+00:00", "model_version": "3", "source": "client",
     "predicted_class": 7, "predicted_label": "7", "confidence": 0.98,
     "pixel_mean": ..., ... (FEATURE_COLUMNS), "emb_0": ..., ... "emb_7": ...}
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
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
DEFAULT_MAX_AGE_S = 3600.0
DEFAULT_QUEUE_BATCHES = 1024  # handler batches (not requests) waiting for the writer thread
MAX_SPOOLED_FILES = 200  # s3 destination unreachable for long: keep this many closed files, drop the oldest
FILE_PATTERN = re.compile(r"requests-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<seq>\d+)\.jsonl")


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
    from components.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, embedding_projection, image_features

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


class RotatingJsonl:
    """Appends JSON lines to files in ``directory``, starting a new file by size and by age.

    Not thread-safe: only the writer thread uses it. A file is opened lazily on
    the first write, so quiet periods leave no empty files. ``on_closed(path)``
    is called with every file that will not be written again.
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
        self._fd: int | None = None
        self._opened_at = 0.0
        self._size = 0
        self._seq = 0

    def write(self, lines: list[bytes]) -> None:
        """Append whole lines, starting a new file first if the current one is old, and whenever
        the next line would take it past ``max_bytes`` (a single longer line gets a file of its own)."""
        self.maybe_rotate()
        chunk: list[bytes] = []
        size = self._size if self._fd is not None else 0
        for line in lines:
            if size and size + len(line) > self.max_bytes:
                self._append(b"".join(chunk))
                chunk, size = [], 0
                self.close()
            chunk.append(line)
            size += len(line)
        self._append(b"".join(chunk))

    def _append(self, data: bytes) -> None:
        if not data:
            return
        if self._fd is None:
            self._open()
        # O_APPEND and one write per block: a reader never sees half a line from us.
        os.write(self._fd, data)
        self._size += len(data)

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
        os.close(self._fd)
        closed, self._fd, self.path = self.path, None, None
        if self.on_closed is not None and closed is not None:
            self.on_closed(closed)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self._seq += 1
        self.path = self.directory / f"requests-{self.host}-{self.pid}-{stamp}-{self._seq:04d}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._opened_at, self._size = now, os.fstat(self._fd).st_size


class RequestLogger:
    """Bounded hand-over + writer thread + rotating JSONL files in a directory or under an ``s3://`` prefix.

    The hand-over is a ``collections.deque`` the writer polls every ``poll_s``
    seconds: appending to it is atomic under the GIL, so the request path takes
    no lock and wakes no thread (a ``queue.Queue`` notifies its consumer on every
    put, and the woken writer then competes with the request for the GIL).
    Each counter has exactly one writing thread, so none needs a lock.
    """

    def __init__(self, destination: str, max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 queue_batches: int = DEFAULT_QUEUE_BATCHES, spool_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float = 0.2):
        self.destination = str(destination)
        self.is_s3 = self.destination.startswith("s3://")
        if self.is_s3:
            self.prefix = self.destination.rstrip("/")
            import hashlib

            digest = hashlib.sha256(self.prefix.encode()).hexdigest()[:12]
            local = Path(spool_dir) if spool_dir else Path(tempfile.gettempdir()) / f"kfp-mlops-request-log-{digest}"
        else:
            local = Path(self.destination)
        self.local_dir = local
        self.max_batches = max(1, int(queue_batches))
        self.poll_s = float(poll_s)
        self._pending: deque[LogBatch] = deque()
        self._files = RotatingJsonl(local, max_bytes, max_age_s, on_closed=self._closed if self.is_s3 else None, clock=clock)
        # request path only
        self._submitted_batches = self._submitted = self._dropped = 0
        # writer thread only
        self._done_batches = self._written = self._failed = 0
        self._uploaded_files = self._upload_failures = self._lost_files = 0
        self._pending_uploads: list[Path] = []
        self._next_upload_try = 0.0
        self._last_drop_report = 0.0
        self._last_tick = 0.0
        self._stop = threading.Event()
        if self.is_s3:
            self._adopt_orphans()
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

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is waiting, close the current file, upload closed files (s3); idempotent."""
        if self._stop.is_set():
            return
        self.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout_s)

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        # (No lower CPU priority for this thread: descheduled while it holds the GIL, it would stall the
        # request thread for as long as the scheduler keeps it waiting. It yields the GIL often instead.)
        while not self._stop.wait(self.poll_s):
            self._write_pending()
            if time.monotonic() - self._last_tick >= 1.0:
                self._tick()
        self._write_pending()
        try:
            self._files.close()
        except OSError as err:
            logger.error("request log: closing %s failed: %s", self._files.path, err)
        self._upload_pending(force=True)

    def _write_pending(self) -> None:
        batches = []
        while self._pending:
            batches.append(self._pending.popleft())
        if batches:
            self._write(batches)
            self._done_batches += len(batches)

    def _write(self, batches: list[LogBatch]) -> None:
        n = sum(len(b.predicted) for b in batches)
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
            self._failed += n
            logger.error("request log: %d record(s) not written to %s: %s", n, self._files.directory, err)
            return
        self._written += n

    def _tick(self) -> None:
        """Once a second: time-based rotation, upload retries, a warning when records were dropped."""
        self._last_tick = time.monotonic()
        try:
            self._files.maybe_rotate()
        except OSError as err:
            logger.error("request log: rotating %s failed: %s", self._files.path, err)
        self._upload_pending()
        if self._dropped and self._last_tick - self._last_drop_report > 60:
            self._last_drop_report = self._last_tick
            logger.warning("request log: %d record(s) dropped so far because the writer fell behind", self._dropped)

    # -- s3 ------------------------------------------------------------------------

    def _closed(self, path: Path) -> None:
        self._pending_uploads.append(path)
        self._next_upload_try = 0.0
        self._upload_pending()

    def _adopt_orphans(self) -> None:
        """Spooled files of workers that are gone (killed before uploading) are uploaded by this one."""
        if not self.local_dir.is_dir():
            return
        for path in sorted(self.local_dir.glob("requests-*.jsonl")):
            match = FILE_PATTERN.fullmatch(path.name)
            if match and match["host"] == _host_tag() and not pid_alive(int(match["pid"])):
                self._pending_uploads.append(path)

    def _upload_pending(self, force: bool = False) -> None:
        if not self._pending_uploads or (not force and time.monotonic() < self._next_upload_try):
            return
        from components import storage

        remaining = []
        for path in self._pending_uploads:
            try:
                storage.put_file(path, f"{self.prefix}/{path.name}")
            except Exception as err:  # noqa: BLE001 - keep the file, try again later
                remaining.append(path)
                self._upload_failures += 1
                logger.error("request log: upload of %s to %s failed (will retry): %s", path.name, self.prefix, err)
                continue
            path.unlink(missing_ok=True)
            self._uploaded_files += 1
        if len(remaining) > MAX_SPOOLED_FILES:  # the destination is down for long: bound the local disk use
            lost, remaining = remaining[:-MAX_SPOOLED_FILES], remaining[-MAX_SPOOLED_FILES:]
            for path in lost:
                path.unlink(missing_ok=True)
            self._lost_files += len(lost)
            logger.error("request log: %d spooled file(s) deleted unsent; %s unreachable", len(lost), self.prefix)
        self._pending_uploads = remaining
        if remaining:
            self._next_upload_try = time.monotonic() + 30.0
