"""Blob storage: one API for local paths and ``s3://bucket/key`` URIs.

Every function takes either a local path or an S3 URI and behaves the same for
both: writes become visible all at once (local: see :mod:`components.core.localfiles`;
S3: a PUT or a completed multipart upload is atomic), reads never leave a partial
file. ``put_dir`` refuses symbolic links and special files, so nothing outside the
directory (a credentials file a link points to) is ever uploaded. The S3 settings
come from the environment (:mod:`components.core.s3_client`).

Plain functions (they build a :class:`Storage` from the environment on each call;
the boto3 client is cached):

* ``put_file(local, uri)``, ``get_file(uri, local)``: one file.
* ``put_dir(local_dir, uri_prefix)``, ``get_dir(uri_prefix, local_dir)``: every file
  under a prefix, relative paths kept (copies; nothing is deleted on the other side).
* ``exists(uri)``, ``list_uris(uri_prefix)`` (``Storage.list``), ``read_bytes(uri)``,
  ``write_bytes(uri, data)``.

``Storage`` also offers what a publisher of content-addressed objects needs: a
conditional write (``read_tagged``, then ``write_if_unchanged``), and storing or
checking an object by its sha256 (``put_stream``, ``stored_state``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from components.core.localfiles import HASH_CHUNK, atomic_write_bytes, atomic_write_file, hash_stream
from components.core.s3_client import (
    AUTH_HINTS,
    CREDENTIAL_SOURCES,
    S3Settings,
    client_for,
    sha256_base64,
    transfer_config,
)

# ---------------------------------------------------------------------------
# Errors: each says what is wrong and what to check.
# ---------------------------------------------------------------------------


class StorageError(Exception):
    """A storage operation failed; the message says what to check."""


class StorageAuthError(StorageError, PermissionError):
    """The server refused the credentials or the permission."""


class BucketNotFoundError(StorageError, FileNotFoundError):
    """The bucket does not exist on the configured endpoint."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The key (or local path) does not exist."""


class EndpointUnreachableError(StorageError, ConnectionError):
    """The S3 endpoint did not answer (or dropped the connection)."""



class UnsafeSourceError(StorageError):
    """What was to be uploaded holds a symbolic link or a special file."""


class WriteConflictError(StorageError):
    """A conditional write found the object changed since it was read."""


class InvalidURIError(ValueError):
    """The URI cannot be parsed."""


# ---------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise InvalidURIError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise InvalidURIError(f"{uri!r} has no bucket name: write s3://BUCKET/KEY")
    if any(c in bucket for c in " \\?#"):
        raise InvalidURIError(f"{uri!r}: bucket name {bucket!r} has characters S3 does not allow")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join a local path or an S3 URI with relative parts (always ``/`` for S3)."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for part in parts:
            out += "/" + part.strip("/")
        return out
    return str(Path(base).joinpath(*parts))


def safe_relative(rel: str, where: str) -> PurePosixPath:
    """Refuse paths that would escape the target directory (``..``, absolute paths)."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts:
        raise StorageError(f"{where} names the unsafe path {rel!r}; refusing to write outside the target directory")
    return path


# Local files: whole-file copies, and listings that never follow a symbolic link.


def _atomic_copy_local(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise ObjectNotFoundError(f"cannot read {src}: no such file")
    atomic_write_file(dest, lambda tmp: shutil.copyfile(src, tmp))


def _copy_stream_to(stream: BinaryIO, tmp: Path) -> None:
    with open(tmp, "wb") as out:
        shutil.copyfileobj(stream, out, HASH_CHUNK)


def _files_under(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file below ``root``, sorted."""
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def regular_files(source: Path, action: str) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file of ``source`` (a file or a directory), sorted.

    Refuses symbolic links and special files anywhere, ``source`` included: what a link
    points to (a credentials file, a directory outside) must never be uploaded.
    """
    if source.is_symlink():
        raise UnsafeSourceError(
            f"cannot {action} {source}: it is a symbolic link (to {os.readlink(source)}); "
            "links are never followed, so give the path of the real file or directory"
        )
    if source.is_file():
        return [(source.name, source)]
    if source.exists() and not source.is_dir():
        raise UnsafeSourceError(f"cannot {action} {source}: it is not a regular file (a pipe, socket or device)")
    if not source.is_dir():
        raise ObjectNotFoundError(f"cannot {action} {source}: no such file or directory")

    def unreadable(error: OSError) -> None:
        raise StorageError(f"cannot {action} {source}: {error}; every file must be readable") from error

    files = []
    for directory, dirnames, filenames in os.walk(source, onerror=unreadable):
        for name in sorted(dirnames + filenames):
            path = Path(directory, name)
            rel = path.relative_to(source).as_posix()
            if path.is_symlink():
                raise UnsafeSourceError(
                    f"cannot {action} {source}: {rel} is a symbolic link (to {os.readlink(path)}); links are "
                    "never followed, so nothing outside the directory is uploaded: replace the link by a copy "
                    "of what it points to, or remove it"
                )
            if name in filenames:
                if not path.is_file():
                    raise UnsafeSourceError(f"cannot {action} {source}: {rel} is not a regular file "
                                            "(a pipe, socket or device); remove it")
                files.append((rel, path))
    return sorted(files)


# ---------------------------------------------------------------------------
# The storage
# ---------------------------------------------------------------------------


class Storage:
    """Local paths and ``s3://`` URIs behind one set of methods (see the module docstring)."""

    def __init__(self, settings: S3Settings | None = None):
        self.settings = settings or S3Settings.from_env()
        self._conditional_supported: bool | None = None  # learned on the first conditional write

    @property
    def client(self):
        """The boto3 S3 client (for what this module does not cover, e.g. creating buckets)."""
        return client_for(self.settings)

    # -- error translation ---------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, uri: str, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as e:  # botocore / s3transfer / boto3 wrap their errors in several layers
            translated = self._translate(e, uri, action)
            if translated is None:
                raise
            raise translated from e

    def _translate(self, error: Exception, uri: str, action: str) -> StorageError | None:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        # Find the botocore error under boto3's wrappers (S3UploadFailedError and friends).
        cause: BaseException | None = error
        seen = 0
        while cause is not None and seen < 8:
            if isinstance(cause, (ClientError, NoCredentialsError, PartialCredentialsError,
                                  EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
                                  ConnectionClosedError)):
                break
            cause = cause.__cause__ or cause.__context__
            seen += 1
        else:
            cause = None
        if cause is None:
            return None
        where = f"{action} {uri} (endpoint: {self.settings.endpoint_name})"
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return StorageAuthError(f"cannot {where}: no usable S3 credentials found ({cause}); {CREDENTIAL_SOURCES}")
        if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
            return EndpointUnreachableError(
                f"cannot {where}: the S3 endpoint is unreachable or dropped the connection "
                f"after {self.settings.max_attempts} attempts ({cause}); check S3_ENDPOINT_URL (or AWS_ENDPOINT_URL), "
                "that the server runs, and that the network path (proxy, NetworkPolicy) allows it"
            )
        assert isinstance(cause, ClientError)
        err = cause.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message") or ""
        if code in AUTH_HINTS:
            return StorageAuthError(f"cannot {where}: access refused ({code}): {AUTH_HINTS[code]}; {CREDENTIAL_SOURCES}")
        bucket = split_s3(uri)[0] if is_s3(uri) else ""
        if code == "NoSuchBucket":
            return self._no_bucket(bucket, where)
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            # A HEAD answers a bare 404 for a missing key and for a missing bucket alike: ask which.
            if bucket and not self._bucket_exists(bucket):
                return self._no_bucket(bucket, where)
            return ObjectNotFoundError(f"cannot {where}: no such object; check the URI (list the prefix to see what exists)")
        return StorageError(f"cannot {where}: the server answered {status} {code}: {message}")

    def _no_bucket(self, bucket: str, where: str) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"cannot {where}: bucket {bucket!r} does not exist on this endpoint; create it "
            "(e.g. `aws s3 mb s3://" + bucket + "`) or fix the bucket name / S3_ENDPOINT_URL"
        )

    def _bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
            return True
        except ClientError as e:
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404
        except Exception:
            return True  # cannot tell: report the object as missing

    # -- single objects -------------------------------------------------------

    def put_file(self, local: str | Path, uri: str) -> str:
        """Copy a local file to ``uri`` (multipart above the threshold); visible only when complete."""
        local = Path(local)
        if not local.is_file():
            raise ObjectNotFoundError(f"cannot upload {local}: no such file")
        if not is_s3(uri):
            _atomic_copy_local(local, Path(uri))
            return str(uri)
        bucket, key = split_s3(uri)
        with self._errors(uri, "upload to"):
            self.client.upload_file(str(local), bucket, key, Config=transfer_config(self.settings))
        return uri

    def get_file(self, uri: str, local: str | Path) -> Path:
        """Copy ``uri`` to a local file; the file appears only when complete."""
        dest = Path(local)
        if not is_s3(uri):
            _atomic_copy_local(Path(uri), dest)
            return dest
        bucket, key = split_s3(uri)
        with self._errors(uri, "download"):
            atomic_write_file(dest, lambda tmp: self.client.download_file(
                bucket, key, str(tmp), Config=transfer_config(self.settings)))
        return dest

    def read_bytes(self, uri: str) -> bytes:
        """The whole content of a (small) object."""
        if not is_s3(uri):
            path = Path(uri)
            if not path.is_file():
                raise ObjectNotFoundError(f"cannot read {uri}: no such file")
            return path.read_bytes()
        bucket, key = split_s3(uri)
        with self._errors(uri, "read"):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_bytes(self, uri: str, data: bytes) -> str:
        """Write a (small) object in one request (atomic)."""
        if not is_s3(uri):
            atomic_write_bytes(Path(uri), data)
            return str(uri)
        bucket, key = split_s3(uri)
        with self._errors(uri, "write"):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return uri

    def exists(self, uri: str) -> bool:
        """Whether the object (or local file/dir) exists; a missing bucket raises."""
        if not is_s3(uri):
            return Path(uri).exists()
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            with self._errors(uri, "look up"):
                try:
                    self.client.head_object(Bucket=bucket, Key=key)
                    return True
                except ClientError as e:
                    if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                        raise
                    if not self._bucket_exists(bucket):
                        raise self._no_bucket(bucket, f"look up {uri} (endpoint: {self.settings.endpoint_name})") from None
                    return False
        except ObjectNotFoundError:
            return False

    def list(self, uri_prefix: str) -> list[str]:
        """Every object at or below ``uri_prefix`` taken as a directory, sorted.

        ``s3://b/data`` lists ``data`` itself and ``data/...``, never ``data2/...`` (like a local path).
        """
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            if root.is_file():
                return [str(root)]
            return [str(p) for _, p in _files_under(root)] if root.is_dir() else []
        return [uri for uri, _ in self.list_modified(uri_prefix)]

    def list_modified(self, uri_prefix: str) -> list[tuple[str, _dt.datetime]]:
        """``list`` with each object's last modification (a local file's mtime, an object's upload time)."""
        if not is_s3(uri_prefix):
            return [(uri, _dt.datetime.fromtimestamp(Path(uri).stat().st_mtime, _dt.timezone.utc))
                    for uri in self.list(uri_prefix)]
        bucket, prefix = split_s3(uri_prefix)
        found = []
        with self._errors(uri_prefix, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found += [(f"s3://{bucket}/{obj['Key']}", obj["LastModified"]) for obj in page.get("Contents", [])
                          if not prefix or obj["Key"] == prefix or obj["Key"].startswith(prefix.rstrip("/") + "/")]
        return sorted(found)

    # -- prefixes -----------------------------------------------------------

    def put_dir(self, local_dir: str | Path, uri_prefix: str) -> list[str]:
        """Copy every file below ``local_dir`` to ``uri_prefix/<relative path>``; returns the URIs.

        A symbolic link or special file anywhere below ``local_dir`` is refused before anything is copied.
        """
        root = Path(local_dir)
        files = regular_files(root, "upload")
        if not root.is_dir():
            raise ObjectNotFoundError(f"cannot upload {root}: not a directory")
        return [self.put_file(path, join(uri_prefix, rel)) for rel, path in files]

    def get_dir(self, uri_prefix: str, local_dir: str | Path) -> list[Path]:
        """Copy every object below ``uri_prefix/`` to ``local_dir/<relative key>``; returns the paths.

        Each file appears atomically; for an all-or-nothing directory use a release's ``fetch``.
        """
        dest = Path(local_dir)
        if not is_s3(uri_prefix):
            root = Path(uri_prefix)
            if not root.is_dir():
                raise ObjectNotFoundError(f"cannot copy {root}: not a directory")
            return [self.get_file(str(path), dest / rel) for rel, path in _files_under(root)]
        base = str(uri_prefix).rstrip("/") + "/"  # "data" must not match "data2/..."
        if split_s3(base)[1] == "/":
            base = base[:-1]  # the whole bucket
        uris = [u for u in self.list(base) if not u.endswith("/")]  # skip "folder" marker objects
        if not uris:
            raise ObjectNotFoundError(
                f"no objects under {base} (endpoint: {self.settings.endpoint_name}); check the prefix"
            )
        paths = []
        for uri in uris:
            rel = safe_relative(uri[len(base):], f"object {uri}")
            paths.append(self.get_file(uri, dest / rel))
        return paths

    # -- conditional writes ----------------------------------------------------

    def read_tagged(self, uri: str) -> tuple[bytes | None, str | None]:
        """(content, tag for ``write_if_unchanged``); (None, None) when there is no such object.

        The tag is the ETag on S3, the sha256 of the content locally.
        """
        if not is_s3(uri):
            path = Path(uri)
            if not path.is_file():
                return None, None
            data = path.read_bytes()
            return data, hashlib.sha256(data).hexdigest()
        bucket, key = split_s3(uri)
        try:
            with self._errors(uri, "read"):
                response = self.client.get_object(Bucket=bucket, Key=key)
                return response["Body"].read(), response["ETag"]
        except ObjectNotFoundError:
            return None, None

    def write_if_unchanged(self, uri: str, data: bytes, expected_tag: str | None) -> None:
        """Write ``uri`` only if it still holds what was read (``expected_tag``; None = absent).

        S3: conditional PUT (``IfMatch`` / ``IfNoneMatch``); on a server without them
        (NotImplemented, or ``S3_CONDITIONAL_WRITES=off``) compare-then-write. Local: the
        compare and the atomic rename happen under an exclusive ``flock`` on ``.<name>.lock``.
        Raises :class:`WriteConflictError` when someone else changed it meanwhile.
        """
        conflict = WriteConflictError(f"{uri} changed since it was read")
        if not is_s3(uri):
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(f".{path.name}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                if current != expected_tag:
                    raise conflict
                atomic_write_bytes(path, data)
            return

        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        mode = self.settings.conditional_writes
        if mode == "on" or (mode == "auto" and self._conditional_supported is not False):
            condition = {"IfMatch": expected_tag} if expected_tag else {"IfNoneMatch": "*"}
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
                self._conditional_supported = True
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 412: the precondition failed; 409: a concurrent conditional write won (AWS).
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    raise conflict from None
                if expected_tag and (code == "NoSuchKey" or status == 404):
                    raise conflict from None  # deleted meanwhile
                if not (mode == "auto" and (code == "NotImplemented" or status == 501)):
                    raise self._translate(e, uri, "update") from e  # a ClientError always translates
                self._conditional_supported = False
                print(f"storage: {self.settings.endpoint_name} has no conditional writes; "
                      f"updating {uri} with compare-then-write", flush=True)
            except Exception as e:
                translated = self._translate(e, uri, "update")
                if translated is None:
                    raise
                raise translated from e
        # Compare-then-write: a small race window remains between the read and the write.
        if self.read_tagged(uri)[1] != expected_tag:
            raise conflict
        self.write_bytes(uri, data)

    # -- objects checked by their sha256 --------------------------------------

    def put_stream(self, stream: BinaryIO, uri: str, size: int, sha256_hex: str) -> None:
        """Store what is left to read in ``stream`` (``size`` bytes with this sha256) at ``uri``."""
        if not is_s3(uri):
            atomic_write_file(uri, lambda tmp: _copy_stream_to(stream, tmp))
            return
        bucket, key = split_s3(uri)
        with self._errors(uri, "upload to"):
            if size < self.settings.multipart_threshold:
                # The server checks the body against this sha256 and keeps it, so ``stored_state``
                # verifies the object later with a HEAD instead of reading it back.
                self.client.put_object(Bucket=bucket, Key=key, Body=stream, ChecksumAlgorithm="SHA256",
                                       ChecksumSHA256=sha256_base64(sha256_hex))
            else:
                self.client.upload_fileobj(stream, bucket, key, Config=transfer_config(self.settings))

    def stored_state(self, uri: str, size: int, sha256_hex: str) -> str:
        """``"intact"``, ``"damaged"`` (other bytes) or ``"missing"``: what is stored at ``uri``."""
        if not is_s3(uri):
            try:
                # A link in the store is never trusted (nor followed): it reads as damaged and is replaced.
                fd = os.open(uri, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                return "missing"
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return "damaged"
                raise
            with os.fdopen(fd, "rb") as stored:
                if not stat.S_ISREG(os.fstat(stored.fileno()).st_mode):
                    return "damaged"
                return "intact" if hash_stream(stored) == (size, sha256_hex) else "damaged"

        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            with self._errors(uri, "verify"):
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                except ClientError as e:
                    if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                        return "missing"
                    raise
                if head["ContentLength"] != size:
                    return "damaged"
                stored = head.get("ChecksumSHA256")
                if stored and "-" not in stored:  # a whole-object sha256, not a multipart composite
                    return "intact" if stored == sha256_base64(sha256_hex) else "damaged"
                # No sha256 kept by the server (a multipart upload, or written without one): read and hash.
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                try:
                    return "intact" if hash_stream(body) == (size, sha256_hex) else "damaged"
                finally:
                    body.close()
        except ObjectNotFoundError:
            return "missing"


# ---------------------------------------------------------------------------
# Plain functions (settings from the environment on every call)
# ---------------------------------------------------------------------------


def put_file(local: str | Path, uri: str) -> str:
    return Storage().put_file(local, uri)


def get_file(uri: str, local: str | Path) -> Path:
    return Storage().get_file(uri, local)


def put_dir(local_dir: str | Path, uri_prefix: str) -> list[str]:
    return Storage().put_dir(local_dir, uri_prefix)


def get_dir(uri_prefix: str, local_dir: str | Path) -> list[Path]:
    return Storage().get_dir(uri_prefix, local_dir)


def exists(uri: str) -> bool:
    return Storage().exists(uri)


def list_uris(uri_prefix: str) -> list[str]:
    """``Storage.list`` (named so the builtin ``list`` stays usable in this module)."""
    return Storage().list(uri_prefix)


def read_bytes(uri: str) -> bytes:
    return Storage().read_bytes(uri)


def write_bytes(uri: str, data: bytes) -> str:
    return Storage().write_bytes(uri, data)


def with_settings(**changes) -> Storage:
    """A Storage with some settings changed from the environment's, e.g. ``with_settings(max_attempts=1)``."""
    return Storage(replace(S3Settings.from_env(), **changes))
