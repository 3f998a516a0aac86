"""Durable local files: a file is created or replaced all at once, and survives a crash once written.

``atomic_write_file`` (and its ``_bytes``, ``_text`` and ``_json`` forms) fills a
temporary sibling (``.<name>.tmp-<random>``), fsyncs it, renames it over the target
and fsyncs the directory, so the rename itself is durable. A reader sees the old
file or the new one, never a partial one; if anything fails, the old file stays and
the temporary file is removed. Also: the sha256 of a file or stream.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

HASH_CHUNK = 1024 * 1024


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)[1]


def hash_stream(stream: BinaryIO) -> tuple[int, str]:
    """(size, sha256 hex) of what is left to read in ``stream``."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _temp_sibling(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (the entry lives in the directory, not in the file)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a directory that cannot be opened cannot be synced; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (network, FUSE) cannot sync a directory at all; any other error is real.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_file(dest: str | Path, write: Callable[[Path], object]) -> Path:
    """Create or replace ``dest`` all at once and durably.

    ``write(temp_path)`` fills a temporary sibling, which is fsynced and renamed over
    ``dest``; then the directory is fsynced so the rename survives a crash. If anything
    fails, ``dest`` keeps its old content and the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(dest)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)
    return dest


def atomic_write_bytes(dest: str | Path, data: bytes) -> Path:
    return atomic_write_file(dest, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(dest: str | Path, text: str) -> Path:
    """``atomic_write_file`` for a text file (UTF-8)."""
    return atomic_write_file(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(dest: str | Path, obj: Any, *, default: Callable[[Any], Any] | None = None,
                      sort_keys: bool = True) -> Path:
    """``atomic_write_file`` for JSON: indented, keys sorted (stable diffs; ``sort_keys=False`` keeps an order
    that means something, e.g. steps in pipeline order), one final newline."""
    return atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n")
