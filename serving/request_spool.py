"""The request log's spool: locks, uploads to ``s3://``, and the drain that flushes every writer of a host.

For an ``s3://`` destination the writers (``serving.request_log``) write their files to a local
spool directory, and each closed file is uploaded with ``components.core.blobs.put_file`` and
removed (:class:`SpoolUploads`). A failed upload is retried every 30 s.

Which process owns a spooled file is told by an advisory lock (``flock``) that its writer holds
while the file is open, and that an uploader holds while it sends it: the kernel drops a lock
when its process dies, so the spooled files of a worker that was killed (SIGKILL, OOM) are
recognised and uploaded by the next worker of this host that starts on the same spool
directory, even when the dead worker's pid now belongs to another process.

Shutting down (``docs/serving.md``, "Shutdown and drain"): TorchServe's frontend never signals its Python
worker; it SIGKILLs it as soon as the worker's connection closes, and in the serving pod
SIGTERM ends the whole container at once. So the log is flushed *before* SIGTERM: ``python -m
serving.request_log drain`` (the pod's preStop hook; :func:`main`) asks every writer of this
host to write what it holds, close its file and upload every closed file, waits for their
answers (:class:`WriterPresence`) and uploads what is left, within a deadline.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from components.core.names import REQUEST_LOG_ENV
from components.core.names import REQUEST_LOG_SPOOL_ENV as SPOOL_ENV
from serving.processes import pid_alive

logger = logging.getLogger("serving.request_log")  # one logger for the whole request log


DEFAULT_DRAIN_TIMEOUT_S = 40.0
MAX_SPOOLED_FILES = 200  # s3 destination unreachable for long: keep this many closed files, drop the oldest
UPLOAD_RETRY_S = 30.0
SINGLE_PUT_MAX_BYTES = 64 * 1024 * 1024
# A rotated file's lines (.jsonl) and its columnar copy (.npz, written whole under a dot name, then renamed)
FILE_PATTERN = re.compile(
    r"requests-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)-(?P<stamp>\d{8}T\d{6}Z)-(?P<seq>\d+)\.(?:jsonl|npz)")
SPOOLED_FILES = ("requests-*.jsonl", "requests-*.npz")
# Beside the log files (dot files, never *.jsonl, never uploaded): one per live writer, locked while it runs and
# holding the last drain request it answered; and the drain request of this host.
WRITER_PREFIX = ".writer-"
DRAIN_PREFIX = ".drain-"


def host_tag() -> str:
    """This machine's (or pod's) name, safe for a file name: pods writing one s3 prefix must not collide."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


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


def try_lock(fd: int) -> bool | None:
    """Take the advisory lock of an open file without waiting: True when taken, False when another open file
    holds it, None when this file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def orphaned(path: Path, pid: int) -> bool:
    """Whether no live process writes or sends ``path``. The lock tells even when the writer's ``pid`` has been
    reused by another process; only a file system without locks falls back on the pid."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        taken = try_lock(fd)
    finally:
        os.close(fd)  # drops the probe's own lock
    return not pid_alive(pid) if taken is None else taken


def _orphan_of(path: Path, host: str) -> bool:
    """A spooled file of ``host``'s writers that no live process writes or sends."""
    match = FILE_PATTERN.fullmatch(path.name)
    return bool(match) and match["host"] == host and orphaned(path, int(match["pid"]))


def _spooled(directory: Path) -> list[Path]:
    """The closed (or orphaned) log files in a spool directory. A columnar copy is never locked: an upload of
    one whose writer is about to send it too is safe, since every upload holds the file's lock and the second
    finds it gone."""
    return sorted(path for pattern in SPOOLED_FILES for path in directory.glob(pattern))


def upload_spooled(path: Path, prefix: str, one_request: bool = False) -> str:
    """Send one closed spool file to ``prefix`` and delete it, holding its lock so no other process sends it too.

    "sent"; "gone" (sent by another process meanwhile, or empty: deleted); "busy" (its writer or another uploader
    holds it now). Raises what the upload raised; the file is then kept. ``one_request``: a single PUT, no
    transfer threads (during interpreter exit no new thread may start; files up to ``SINGLE_PUT_MAX_BYTES``).
    """
    from components.core import blobs

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return "gone"
    try:
        if try_lock(fd) is False:
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
            blobs.write_bytes(f"{prefix}/{path.name}", os.pread(fd, size, 0))
        else:
            blobs.put_file(path, f"{prefix}/{path.name}")
        path.unlink(missing_ok=True)
        return "sent"
    finally:
        os.close(fd)


class SpoolUploads:
    """One writer's closed files on their way to an ``s3://`` prefix, retried until sent; used by its writer
    thread alone. ``one_request``: uploads avoid starting threads (set while the interpreter exits)."""

    def __init__(self, prefix: str, directory: Path, host: str):
        self.prefix, self.directory, self.host = prefix, directory, host
        self.pending: list[Path] = []
        self.sent = self.failures = self.lost = 0
        self.one_request = False
        self._next_try = 0.0

    def prepare(self) -> None:
        """Create the S3 client now: during interpreter exit importing boto3 fails (it registers an exit hook)."""
        from components.core import blobs

        try:
            blobs.Storage().client
        except Exception as err:  # noqa: BLE001 - the uploads report it again, with the file
            logger.error("request log: no S3 client for %s yet (%s); uploads will retry", self.prefix, err)

    def add(self, path: Path) -> None:
        self.pending.append(path)
        self._next_try = 0.0

    def adopt_orphans(self) -> None:
        """Take over this host's spooled files that no live process writes or sends (killed before uploading)."""
        try:
            candidates = _spooled(self.directory)
        except OSError:
            return
        known = set(self.pending)
        self.pending += [path for path in candidates if path not in known and _orphan_of(path, self.host)]

    def upload(self, force: bool = False, deadline: float | None = None) -> None:
        """Send the pending files (when a retry is due, or ``force``) until ``deadline`` (monotonic)."""
        if not self.pending or (not force and time.monotonic() < self._next_try):
            return
        remaining = []
        for i, path in enumerate(self.pending):
            if deadline is not None and time.monotonic() >= deadline:
                remaining += self.pending[i:]
                break
            try:
                outcome = upload_spooled(path, self.prefix, self.one_request)
            except Exception as err:  # noqa: BLE001 - keep the file, try again later
                remaining.append(path)
                self.failures += 1
                logger.error("request log: upload of %s to %s failed (will retry): %s", path.name, self.prefix, err)
                continue
            if outcome == "busy":
                remaining.append(path)
            self.sent += outcome == "sent"
        if len(remaining) > MAX_SPOOLED_FILES:  # the destination is down for long: bound the local disk use
            lost, remaining = remaining[:-MAX_SPOOLED_FILES], remaining[-MAX_SPOOLED_FILES:]
            for path in lost:
                path.unlink(missing_ok=True)
            self.lost += len(lost)
            logger.error("request log: %d spooled file(s) deleted unsent; %s unreachable", len(lost), self.prefix)
        self.pending = remaining
        if remaining:
            self._next_try = time.monotonic() + UPLOAD_RETRY_S


class WriterPresence:
    """A writer's presence file beside its log files: locked while the writer lives, so a drain waits for it,
    and holding the last drain request the writer answered."""

    def __init__(self, directory: Path, host: str, writer_id: int):
        self.directory, self.host = directory, host
        self.path = directory / f"{WRITER_PREFIX}{host}-{os.getpid()}-{writer_id}"
        self._fd: int | None = None
        self._answered = ""

    def announce(self) -> None:
        """Create and lock the presence file."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as err:
            logger.error("request log: cannot create %s (%s): a drain will not wait for this writer", self.path, err)
            return
        try_lock(fd)
        self._fd = fd
        live_writers(self.directory, self.host)  # sweeps the presence files of writers that died

    def leave(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def drain_request(self) -> str | None:
        """The drain request of this host that the writer has not answered yet, if there is one."""
        try:
            request = (self.directory / f"{DRAIN_PREFIX}{self.host}").read_text()
        except OSError:
            return None
        return request if request and request != self._answered else None

    def answer(self, request: str) -> None:
        """Tell the drain that everything the writer held is written (and, for s3, sent)."""
        self._answered = request
        if self._fd is not None:
            try:
                os.pwrite(self._fd, request.encode(), 0)
                os.ftruncate(self._fd, len(request.encode()))
            except OSError as err:
                logger.error("request log: cannot answer the drain request in %s: %s", self.path, err)


# -- flushing from outside the worker: the pod's preStop hook ------------------------------


def live_writers(directory: Path, host: str) -> dict[str, str]:
    """The presence files of ``host``'s live writers in ``directory``, with the drain request each last answered.
    A presence file nobody holds is left from a writer that died: it is removed."""
    answers = {}
    for path in sorted(directory.glob(f"{WRITER_PREFIX}{host}-*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            taken = try_lock(fd)
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
    directory, host = spool_dir_for(destination, spool_dir), host_tag()
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
            answers = live_writers(directory, host)
            result["writers"], result["unanswered"] = len(answers), [w for w, a in answers.items() if a != request]
            if not result["unanswered"] or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
    finally:
        request_path.unlink(missing_ok=True)
    if str(destination).startswith("s3://"):  # (a directory destination has every written line already)
        _upload_orphans(directory, host, str(destination).rstrip("/"), deadline, result)
        result["left"] = sorted(p.name for p in _spooled(directory))
    return result


def _upload_orphans(directory: Path, host: str, prefix: str, deadline: float, result: dict) -> None:
    """Upload the closed spool files nobody owns, in a thread: a hung upload must not outlast the deadline."""
    def send_all() -> None:
        for path in _spooled(directory):
            if time.monotonic() >= deadline:
                return
            if not _orphan_of(path, host):
                continue
            try:
                result["uploaded"] += upload_spooled(path, prefix) == "sent"
            except Exception as err:  # noqa: BLE001 - reported, the file stays for the next writer
                result["errors"].append(f"{path.name}: {type(err).__name__}: {err}"[:300])

    sender = threading.Thread(target=send_all, name="request-log-drain", daemon=True)
    sender.start()
    sender.join(max(0.0, deadline - time.monotonic()))


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
    """``python -m serving.request_log drain``: the serving pods' preStop hook."""
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
