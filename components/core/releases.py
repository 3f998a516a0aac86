"""Releases: content-addressed, checksum-verified copies of a file or directory in blob storage.

``publish(local_dir_or_file, base_uri) -> manifest`` and
``fetch(base_uri, local_dir, version="latest") -> manifest`` lay a release out under
``base_uri`` (a local path or an ``s3://`` URI) as::

    objects/sha256/<2 hex>/<sha256>   the file contents, keyed by their hash
    manifests/<version>.json          file list with sizes and sha256; version = sha256 of this JSON
    latest                            pointer {"version", "manifest", "published_at", "previous"}

``publish`` stores every file, then the manifest, and only then moves ``latest``.
An object already stored is checked, not trusted: on S3 by the sha256 the server
kept at upload (HEAD with ``ChecksumMode``), else by reading it back and hashing;
locally by hashing the file. One that does not match is stored again, so
publishing the same files repairs a damaged release. ``latest`` moves with a
conditional write against the pointer as read before the upload began
(``Storage.write_if_unchanged``). A pointer moved by someone else meanwhile raises
:class:`PointerConflictError`; the new version stays complete and fetchable by its
id. A damaged pointer (not a valid pointer JSON, e.g. torn by a crash) makes
``fetch`` raise :class:`PointerDamagedError`; ``publish`` replaces it, with the
same conditional write. ``fetch`` resolves pointer -> manifest -> files, checks
every size and sha256, and renames the finished directory into place: a corrupt or
missing object raises and leaves no partial directory.

The serving pods' init container fetches the release to serve with
``python -m components.core.releases fetch BASE_URI LOCAL_DIR --version VERSION``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from components.core.blobs import (
    ObjectNotFoundError,
    Storage,
    StorageError,
    UnsafeSourceError,
    WriteConflictError,
    join,
    regular_files,
    safe_relative,
)
from components.core.localfiles import fsync_directory, hash_stream, sha256_file

OBJECTS_DIR = "objects/sha256"
MANIFESTS_DIR = "manifests"
POINTER_NAME = "latest"
MANIFEST_FORMAT = "kfp-mlops/manifest-v1"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ChecksumMismatchError(StorageError):
    """A fetched file's size or sha256 differs from its manifest."""


class PointerConflictError(WriteConflictError):
    """The ``latest`` pointer moved while publishing (another publisher)."""


class PointerDamagedError(StorageError):
    """The ``latest`` pointer is not a valid pointer (torn by a crash or a full disk, or overwritten)."""


def object_key(sha256_hex: str) -> str:
    """Where content with this sha256 lives below a publish base."""
    return f"{OBJECTS_DIR}/{sha256_hex[:2]}/{sha256_hex}"


class Releases:
    """Publish and fetch releases in one :class:`Storage` (the environment's by default)."""

    def __init__(self, store: Storage | None = None):
        self.store = store or Storage()

    def publish(self, source: str | Path, base_uri: str) -> dict:
        """Publish a file or directory under ``base_uri``; move ``latest`` only once all is stored.

        Every object already stored is verified against its sha256 and rewritten if it does
        not match, so publishing the same files again repairs a damaged release. Symbolic
        links and special files are refused (:class:`UnsafeSourceError`) before anything
        is uploaded. Returns the manifest plus ``version`` (sha256 of the manifest JSON) and
        ``uri``. Raises :class:`PointerConflictError` if ``latest`` moved during the upload.
        """
        source = Path(source)
        files = regular_files(source, "publish")
        if not files:
            raise StorageError(f"cannot publish {source}: the directory holds no files")
        kind = "dir" if source.is_dir() else "file"

        # Read the pointer first: the final conditional write fails if anyone moves it meanwhile.
        previous, expected_tag = self._read_pointer(base_uri, replacing=True)
        entries = []
        for rel, path in files:
            # One open file for hashing and uploading: the bytes stored are the bytes hashed.
            with _open_regular_file(path, source) as stream:
                size, digest = hash_stream(stream)
                entries.append({"path": rel, "size": size, "sha256": digest})
                stream.seek(0)
                self._store_verified(stream, size, digest, join(base_uri, object_key(digest)))
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": kind,
            "files": entries,
            "file_count": len(entries),
            "total_bytes": sum(e["size"] for e in entries),
        }
        body = _manifest_bytes(manifest)
        version = hashlib.sha256(body).hexdigest()
        manifest_uri = join(base_uri, MANIFESTS_DIR, f"{version}.json")
        self._store_verified(io.BytesIO(body), len(body), version, manifest_uri)
        pointer = {
            "version": version,
            "manifest": f"{MANIFESTS_DIR}/{version}.json",
            "published_at": _now(),
            "previous": previous["version"] if previous else None,
        }
        self.update_pointer(base_uri, pointer, expected_tag)
        return {**manifest, "version": version, "uri": str(base_uri)}

    def fetch(self, base_uri: str, local_dir: str | Path, version: str = "latest") -> dict:
        """Download a published version into ``local_dir`` (replaced as a whole), verifying every checksum.

        Returns the manifest plus ``version`` and ``uri``. On any error nothing is left behind
        and an existing ``local_dir`` is untouched.
        """
        if version == "latest":
            pointer, _ = self._read_pointer(base_uri)
            if pointer is None:
                raise ObjectNotFoundError(
                    f"nothing published at {base_uri}: no '{POINTER_NAME}' pointer (publish first, or check the URI)"
                )
            version = pointer["version"]
        manifest_uri = join(base_uri, MANIFESTS_DIR, f"{version}.json")
        try:
            body = self.store.read_bytes(manifest_uri)
        except ObjectNotFoundError:
            raise ObjectNotFoundError(f"version {version} is not published at {base_uri} ({manifest_uri} is missing)") from None
        if hashlib.sha256(body).hexdigest() != version:
            raise ChecksumMismatchError(f"manifest {manifest_uri} is corrupt: its sha256 is not its version id {version}; "
                                        "publish the same files again to repair it")
        manifest = json.loads(body)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise StorageError(f"{manifest_uri} is not a {MANIFEST_FORMAT} manifest (format {manifest.get('format')!r})")

        dest = Path(local_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.fetch-", dir=dest.parent))
        try:
            for entry in manifest["files"]:
                rel = safe_relative(entry["path"], f"manifest {manifest_uri}")
                object_uri = join(base_uri, object_key(entry["sha256"]))
                try:
                    target = self.store.get_file(object_uri, staging / rel)
                except ObjectNotFoundError:
                    raise ObjectNotFoundError(f"{object_uri} ({entry['path']} of version {version}) is missing "
                                              "from the store; publish the same files again to repair it") from None
                size, digest = target.stat().st_size, sha256_file(target)
                if (size, digest) != (entry["size"], entry["sha256"]):
                    raise ChecksumMismatchError(
                        f"{object_uri} ({entry['path']} of version {version}) is corrupt: expected "
                        f"{entry['size']} bytes with sha256 {entry['sha256']}, got {size} bytes with sha256 {digest}; "
                        "the stored copy is damaged: publish the same files again to repair it"
                    )
            _swap_into_place(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_directory(dest.parent)
        return {**manifest, "version": version, "uri": str(base_uri)}

    def read_pointer(self, base_uri: str) -> dict | None:
        """The ``latest`` pointer of ``base_uri`` (None before the first publish)."""
        return self._read_pointer(base_uri)[0]

    def update_pointer(self, base_uri: str, pointer: dict, expected_tag: str | None) -> None:
        """Write ``latest`` only if it is still what was read (``expected_tag``; None = absent)."""
        body = json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"
        uri = join(base_uri, POINTER_NAME)
        try:
            self.store.write_if_unchanged(uri, body, expected_tag)
        except WriteConflictError:
            raise PointerConflictError(
                f"{uri} moved while publishing version {pointer['version']} (another publisher?); "
                f"that version is complete and can be fetched by its id; publish again to make it latest"
            ) from None

    def _read_pointer(self, base_uri: str, replacing: bool = False) -> tuple[dict | None, str | None]:
        """(pointer, tag for the conditional write); (None, None) when there is none.

        A damaged pointer raises :class:`PointerDamagedError`, unless ``replacing``: then it
        reads as (None, its tag), so a publish replaces it only if nobody else did first.
        """
        uri = join(base_uri, POINTER_NAME)
        data, tag = self.store.read_tagged(uri)
        if data is None:
            return None, None
        problem = _pointer_problem(data)
        if problem is None:
            return json.loads(data), tag
        if not replacing:
            raise PointerDamagedError(
                f"{uri} is damaged: {problem} (a crash or a full disk while it was written, or something else "
                f"wrote it). Publish a release again to replace it, or fetch a version by its id: the published "
                f"versions are the file names under {join(base_uri, MANIFESTS_DIR)}"
            )
        print(f"storage: {uri} is damaged ({problem}); this publish replaces it", flush=True)
        return None, tag

    def _store_verified(self, stream: BinaryIO, size: int, sha256_hex: str, uri: str) -> None:
        """Store ``stream`` at ``uri`` unless an intact copy (same size and sha256) is already there."""
        state = self.store.stored_state(uri, size, sha256_hex)
        if state == "intact":
            return
        if state == "damaged":
            print(f"storage: {uri} does not match its sha256 {sha256_hex}; storing it again", flush=True)
        self.store.put_stream(stream, uri, size, sha256_hex)


def _pointer_problem(data: bytes) -> str | None:
    """What makes ``data`` an invalid ``latest`` pointer, or None if it is a valid one."""
    if not data.strip():
        return "it is empty"
    try:
        pointer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"it is not valid JSON ({e})"
    version = pointer.get("version") if isinstance(pointer, dict) else None
    if not isinstance(version, str) or not _SHA256_HEX.fullmatch(version):
        return "it names no version (a sha256 in hex)"
    return None


def _manifest_bytes(manifest: dict) -> bytes:
    # Deterministic bytes: the same files give the same version id.
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


@contextlib.contextmanager
def _open_regular_file(path: Path, source: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading, refusing a symbolic link swapped in after the directory was listed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeSourceError(f"cannot publish {source}: {path} became a symbolic link; "
                                    "links are never followed") from None
        raise ObjectNotFoundError(f"cannot publish {source}: cannot read {path} ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafeSourceError(f"cannot publish {source}: {path} is not a regular file")
        yield f


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _swap_into_place(staging: Path, dest: Path) -> None:
    """Rename the finished ``staging`` dir to ``dest``; an old ``dest`` is moved aside first, then removed."""
    if dest.exists() and not dest.is_dir():
        raise StorageError(f"cannot fetch into {dest}: it exists and is not a directory")
    if not dest.exists():
        staging.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    dest.rename(old)
    try:
        staging.rename(dest)
    except BaseException:
        old.rename(dest)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish(source: str | Path, base_uri: str) -> dict:
    return Releases().publish(source, base_uri)


def fetch(base_uri: str, local_dir: str | Path, version: str = "latest") -> dict:
    return Releases().fetch(base_uri, local_dir, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.core.releases",
        description="Fetch a published release into a directory, replaced as a whole once every file's size and "
                    "sha256 match the manifest. Storage settings and credentials come from the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download and verify one version of a release")
    fetch_cmd.add_argument("base_uri", help="where the release is published: a local directory or s3://BUCKET/PREFIX")
    fetch_cmd.add_argument("local_dir", help="the directory to fill (replaced as a whole)")
    fetch_cmd.add_argument("--version", default="latest",
                           help="a version id (the sha256 of its manifest) or 'latest' (default)")
    args = parser.parse_args(argv)
    try:
        manifest = fetch(args.base_uri, args.local_dir, args.version)
    except (StorageError, ValueError) as e:  # ValueError: a malformed URI or storage setting
        print(f"fetch: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"fetch: version {manifest['version']} of {args.base_uri} ({manifest['file_count']} files, "
          f"{manifest['total_bytes']} bytes) is in {args.local_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
