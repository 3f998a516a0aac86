"""The serving request log: one JSON line per answered request, written off the request path.

The handler hands each answered batch to :class:`RequestLogger` with
:meth:`RequestLogger.submit`, which only appends a reference to a bounded
hand-over deque: it takes no lock, wakes no thread, computes nothing and never
touches a file. When ``queue_batches`` batches are already waiting, the batch is
dropped and counted (``stats()["dropped"]``) rather than slowing an answer down.
A daemon thread collects what piled up every ``poll_s`` (0.2 s), computes the
monitoring features of the whole block at once
(``components.core.features.image_features`` and ``embedding_projection``) and
appends the lines to a :class:`RotatingJsonl` file, keeping the same rows as columns: closing
a file also writes its columnar copy beside it (``serving.request_columns``), which the
monitor reads instead of the lines.

Files are ``requests-<host>-<pid>-<UTC start>-<seq>.jsonl`` and are rotated when
they reach ``max_bytes`` or are ``max_age_s`` old (5 minutes by default; checked
at least once a second, traffic or not). A block of lines is appended whole or
not at all: a short write or a full disk truncates the file back to its last
complete line, so a reader never finds half a line followed by more lines. The
destination is a local directory (files are written there directly; the
monitor reads every ``*.jsonl`` in it) or an ``s3://`` prefix: then files are
written to a local spool directory and uploaded once closed
(``serving.request_spool``: its locks, uploads and the drain).

Shutting down: the serving pod's preStop hook runs ``python -m serving.request_log
drain`` (``serving.request_spool.main``) before SIGTERM. In-process, on SIGTERM and
at interpreter exit (:func:`close_on_shutdown`), the worker writes, closes and
uploads within ``DEFAULT_SHUTDOWN_S``, from inside the signal handler, while its
connection to the frontend is still open.

One line (numbers with 6 significant digits)::

    {"timestamp": "2026-01-01T12:00:00.123+00:00", "model_version": "3", "source": "client",
     "predicted_class": 7, "predicted_label": "7", "confidence": 0.98,
     "pixel_mean": ..., ... (FEATURE_COLUMNS), "emb_0": ..., ... "emb_7": ...}
"""

from __future__ import annotations

import atexit
import errno
import functools
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from components.core.names import REQUEST_LOG_MAX_AGE_ENV as MAX_AGE_ENV
from components.core.names import REQUEST_LOG_MAX_BYTES_ENV as MAX_BYTES_ENV
from components.core.names import REQUEST_LOG_QUEUE_ENV as QUEUE_ENV
from serving.request_columns import COLUMNAR_SUFFIX, ColumnBuffer, round_significant, write_columns
from serving.request_spool import (
    REQUEST_LOG_ENV,
    SPOOL_ENV,
    SpoolUploads,
    WriterPresence,
    host_tag,
    spool_dir_for,
    try_lock,
)

logger = logging.getLogger(__name__)


DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# A file reaches s3:// when it is closed: the rotation age bounds what a lost pod can take with it, and how
# long the monitor waits (--settle) before a window is complete.
DEFAULT_MAX_AGE_S = 300.0
DEFAULT_QUEUE_BATCHES = 1024  # handler batches (not requests) waiting for the writer thread
DEFAULT_SHUTDOWN_S = 10.0  # on SIGTERM or exit: write, close and upload within this, then let the process end


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
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)


def _rows(batches: LogBatch | list[LogBatch]) -> tuple[list[str], list[tuple], dict]:
    """The float column names; per request in time order, ``(timestamp, meta..., [floats], all finite)``;
    and the same requests as columns (``serving.request_columns``), floats rounded as the lines print them.

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
    stamps: dict[float, tuple[str, int]] = {}  # a batch shares one answer time: format it once
    rows, matrices = [], []
    for group in by_shape.values():
        features = image_features(np.concatenate([b.images for b in group]))[FEATURE_COLUMNS].to_numpy()
        projected = embedding_projection(np.concatenate([b.embeddings for b in group]))
        confidences = np.concatenate([np.asarray(b.confidences, dtype=np.float64) for b in group])
        matrix = round_significant(np.column_stack([confidences, features, projected]))
        matrices.append(matrix)
        values, finite = matrix.tolist(), np.isfinite(matrix).all(axis=1).tolist()
        i = 0
        for b in group:
            for j in range(len(b.predicted)):
                t = b.timestamps[j]
                if t not in stamps:
                    when = datetime.fromtimestamp(t, timezone.utc)
                    stamps[t] = (when.isoformat(timespec="milliseconds"), (when - _EPOCH) // _MS)
                rows.append((t, stamps[t], b.model_version, b.sources[j], int(b.predicted[j]), b.labels[j], values[i],
                             finite[i], len(matrices) - 1, i))
                i += 1
    if len(by_shape) > 1:
        rows.sort(key=lambda r: r[0])  # one file in time order even when two models shared a block
    if len(by_shape) > 1:  # (the embedding projection has the same columns for every embedding width)
        values = np.stack([matrices[r[8]][r[9]] for r in rows])
    else:
        values = matrices[0] if matrices else np.zeros((0, len(float_columns)))
    columns = {"float_columns": float_columns, "timestamp_ms": np.array([r[1][1] for r in rows], np.int64),
               "values": values,
               "predicted_class": np.array([r[4] for r in rows], np.int64),
               "model_version": [r[2] for r in rows], "source": [r[3] for r in rows],
               "predicted_label": [r[5] for r in rows]}
    return float_columns, [(r[1][0], *r[2:8]) for r in rows], columns


def build_records(batches: LogBatch | list[LogBatch]) -> list[dict]:
    """The records of one or more batches as dicts (what each JSON line holds)."""
    float_columns, rows, _ = _rows(batches)
    return [{**dict(zip(META_COLUMNS, row[:5])), **dict(zip(float_columns, row[5]))} for row in rows]


def format_lines(batches: LogBatch | list[LogBatch]) -> list[bytes]:
    """The JSON lines of one or more batches, floats with 6 significant digits (see ``format_block``)."""
    return format_block(batches)[0]


def format_block(batches: LogBatch | list[LogBatch]) -> tuple[list[bytes], dict]:
    """The JSON lines of one or more batches, floats with 6 significant digits, and the same rows as columns.

    Formatted with one ``%`` per line from a template: about four times cheaper than
    ``json.dumps`` of a dict (float repr dominates it), which is most of what
    logging costs per request. A row with a non-finite number falls back to
    ``json.dumps`` (``NaN``/``Infinity``, as Python's json reads them).
    """
    float_columns, rows, columns = _rows(batches)
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
    return lines, columns


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
    will not be written again; a file left empty is deleted instead. When every
    block of a file came with its columns (``write(lines, columns)``), closing it
    also writes its columnar copy beside it (``serving.request_columns``), which
    ``on_closed`` gets too.
    """

    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 on_closed: Callable[[Path], None] | None = None, clock: Callable[[], float] = time.time):
        if max_bytes < 1 or max_age_s <= 0:
            raise ValueError(f"request log rotation needs max_bytes >= 1 and max_age_s > 0, got {max_bytes}, {max_age_s}")
        self.directory = Path(directory)
        self.max_bytes, self.max_age_s = int(max_bytes), float(max_age_s)
        self.on_closed, self.clock = on_closed, clock
        self.host, self.pid = host_tag(), os.getpid()
        self.path: Path | None = None
        self.lines_written = 0  # every line that is in a file, whole
        self._fd: int | None = None
        self._opened_at = 0.0
        self._size = 0
        self._seq = 0
        self._columns: ColumnBuffer | None = None  # the open file's rows as columns; None: lines only
        self._file_lines = 0

    def write(self, lines: list[bytes], columns: dict | None = None) -> None:
        """Append whole lines, starting a new file first if the current one is old, and whenever
        the next line would take it past ``max_bytes`` (a single longer line gets a file of its own).
        On an error (a full disk) the lines of the failed block are not in any file, and no part of them is.
        ``columns``: the same rows as columns (``format_block``), kept for the file's columnar copy."""
        self.maybe_rotate()
        chunk: list[bytes] = []
        size = self._size if self._fd is not None else 0
        start = 0
        for i, line in enumerate(lines):
            if size and size + len(line) > self.max_bytes:
                self._append(chunk, columns, start)
                chunk, size, start = [], 0, i
                self.close()
            chunk.append(line)
            size += len(line)
        self._append(chunk, columns, start)

    def _append(self, lines: list[bytes], columns: dict | None = None, start: int = 0) -> None:
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
        self._file_lines += len(lines)
        if self._columns is not None and (columns is None or not self._columns.add(columns, start, start + len(lines))):
            self._columns = None  # a block without (matching) columns: this file keeps its lines only

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
        columns, file_lines = self._columns, self._file_lines
        self._fd, self.path, self._columns = None, None, None
        if empty and closed is not None:
            closed.unlink(missing_ok=True)  # while still locked: nobody else takes an empty file for an orphan
        copy = None
        if not empty and closed is not None and columns is not None and columns.rows == file_lines:
            try:  # while the lines are still locked: a drain or an orphan scan never sends one without the other
                copy = write_columns(closed.with_suffix(COLUMNAR_SUFFIX), columns.arrays())
            except (OSError, ValueError) as err:  # the lines are whole and kept: the monitor reads them instead
                logger.error("request log: no columnar copy of %s (%s); its lines are kept", closed, err)
        os.close(fd)
        if self.on_closed is not None and closed is not None and not empty:
            self.on_closed(closed)
            if copy is not None:
                self.on_closed(copy)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = self.clock()
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self._seq += 1
        path = self.directory / f"requests-{self.host}-{self.pid}-{stamp}-{self._seq:04d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if try_lock(fd) is False:  # a name is unique per process: only a stray copy of this process could hold it
            os.close(fd)
            raise OSError(errno.EBUSY, f"{path} is being written by another process")
        self.path, self._fd = path, fd
        self._opened_at, self._size = now, os.fstat(fd).st_size
        self._file_lines = 0
        self._columns = ColumnBuffer() if self._size == 0 else None  # lines of unknown rows before: lines only


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
        self.host = host_tag()
        self._pending: deque[LogBatch] = deque()
        self._uploads = SpoolUploads(self.prefix, self.local_dir, self.host)
        self._files = RotatingJsonl(self.local_dir, max_bytes, max_age_s,
                                    on_closed=self._uploads.add if self.is_s3 else None, clock=clock)
        # request path only
        self._submitted_batches = self._submitted = self._dropped = 0
        # writer thread only
        self._done_batches = self._written = self._failed = 0
        self._last_drop_report = 0.0
        self._last_tick = 0.0
        self._presence = WriterPresence(self.local_dir, self.host, next(self._ids))
        self._stop = threading.Event()
        self._stop_deadline = 0.0
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
                "failed": self._failed, "uploaded_files": self._uploads.sent,
                "upload_failures": self._uploads.failures, "lost_files": self._uploads.lost,
                "queued_batches": len(self._pending), "pending_uploads": len(self._uploads.pending)}

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
            self._uploads.one_request = at_exit
            self._stop.set()
        self._thread.join(max(0.0, self._stop_deadline - time.monotonic()))
        if self._thread.is_alive():
            return False
        self._presence.leave()
        return not self._uploads.pending

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        # (No lower CPU priority for this thread: descheduled while it holds the GIL, it would stall the
        # request thread for as long as the scheduler keeps it waiting. It yields the GIL often instead.)
        self._presence.announce()
        if self.is_s3:
            self._uploads.prepare()
            self._uploads.adopt_orphans()
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
            blocks, chunk, size = [], [], 0
            for batch in batches:  # chunks of ~512 requests: the features' fixed cost stays small per request,
                chunk.append(batch)  # and the request thread gets the GIL back between chunks
                size += len(batch.predicted)
                if size >= 512 or batch is batches[-1]:
                    blocks.append(format_block(chunk))
                    chunk, size = [], 0
                    time.sleep(0)
            for lines, columns in blocks:
                self._files.write(lines, columns)
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
        self._uploads.upload()
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
            self._uploads.adopt_orphans()
            self._uploads.upload(force=True, deadline=deadline)

    def _answer_drain_request(self) -> None:
        """A drain (``python -m serving.request_log drain``) asked this host's writers to hand over."""
        request = self._presence.drain_request()
        if request is not None:
            self._hand_over()
            self._presence.answer(request)


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


if __name__ == "__main__":  # the serving pods' preStop hook: python -m serving.request_log drain
    from serving.request_spool import main

    sys.exit(main())
