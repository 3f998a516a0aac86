"""Storage: one API for local paths and ``s3://bucket/key`` URIs.

Every function takes either a local path or an S3 URI and behaves the same for
both: writes become visible all at once (local: temp file, fsync, rename, fsync
of the directory, see ``atomic_write_file``; S3: a PUT or a completed multipart
upload is atomic), reads never leave a partial file. Uploads of a directory
(``put_dir``, ``publish``) refuse symbolic links and special files, so nothing
outside the directory (a credentials file a link points to) is ever uploaded.

Plain functions (they build a :class:`Storage` from the environment on each call;
the boto3 client is cached):

* ``put_file(local, uri)``, ``get_file(uri, local)``: one file.
* ``put_dir(local_dir, uri_prefix)``, ``get_dir(uri_prefix, local_dir)``: every file
  under a prefix, relative paths kept (copies; nothing is deleted on the other side).
* ``exists(uri)``, ``list_uris(uri_prefix)`` (``Storage.list``), ``read_bytes(uri)``,
  ``write_bytes(uri, data)``.
* ``publish(local_dir_or_file, base_uri) -> manifest`` and
  ``fetch(base_uri, local_dir, version="latest") -> manifest``: content-addressed
  releases, laid out under ``base_uri`` as::

      objects/sha256/<2 hex>/<sha256>   the file contents, keyed by their hash
      manifests/<version>.json          file list with sizes and sha256; version = sha256 of this JSON
      latest                            pointer {"version", "manifest", "published_at", "previous"}

  ``publish`` stores every file, then the manifest, and only then moves ``latest``.
  An object already stored is checked, not trusted: on S3 by the sha256 the server
  kept at upload (HEAD with ``ChecksumMode``), else by reading it back and hashing;
  locally by hashing the file. One that does not match is stored again, so
  publishing the same files repairs a damaged release. ``latest`` moves
  with a conditional write (``IfMatch`` the pointer's ETag as read before the upload
  began, or ``IfNoneMatch="*"`` for the first release). A server that answers
  ``NotImplemented`` gets a compare-then-write instead (re-read, compare, write: a
  small race window, see ``S3_CONDITIONAL_WRITES``). A pointer moved by someone
  else meanwhile raises :class:`PointerConflictError`; the new version stays complete
  and fetchable by its id. A damaged pointer (not a valid pointer JSON, e.g. torn by a
  crash) makes ``fetch`` raise :class:`PointerDamagedError`; ``publish`` replaces it,
  with the same conditional write against its ETag. ``fetch`` resolves pointer ->
  manifest -> files, checks every size and sha256, and renames the finished
  directory into place: a corrupt or missing object raises and leaves no partial
  directory.

Configuration comes from the environment (never from parameters, so no secret
reaches a pipeline parameter or a log line):

* ``S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``): the
  server, e.g. ``http://seaweedfs.kubeflow:8333`` or ``http://minio:9000``; unset = AWS.
* ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), default ``us-east-1``.
* ``S3_ADDRESSING_STYLE``: ``path``, ``virtual`` or ``auto``; default ``path`` with a
  custom endpoint (SeaweedFS/MinIO have no wildcard DNS), ``auto`` on AWS.
* ``S3_MULTIPART_THRESHOLD_MB`` / ``S3_MULTIPART_CHUNKSIZE_MB`` (default 8 / 8 MiB;
  parts must be >= 5 MiB), ``S3_MAX_CONCURRENCY`` (default 8), ``AWS_MAX_ATTEMPTS``
  (default 3; botocore's ``standard`` retry mode with backoff).
* ``S3_CONDITIONAL_WRITES``: ``auto`` (default: try, fall back on NotImplemented),
  ``on`` (never fall back) or ``off`` (always compare-then-write).
* ``AWS_REQUEST_CHECKSUM_CALCULATION``: default ``when_required``; newer botocore's
  default (CRC trailers on every upload) breaks many S3-compatible servers, and
  ``fetch`` verifies sha256 end to end anyway. ``publish`` sends the sha256 it
  computed as a plain ``x-amz-checksum-sha256`` header (no trailer) on objects below
  the multipart threshold, so the server checks the body and keeps the checksum.
* Credentials: the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
  / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, web identity, instance metadata).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator, Mapping

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's smallest allowed multipart part (except the last)
OBJECTS_DIR = "objects/sha256"
MANIFESTS_DIR = "manifests"
POINTER_NAME = "latest"
MANIFEST_FORMAT = "kfp-mlops/manifest-v1"
_HASH_CHUNK = 1 * MiB
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

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


class ChecksumMismatchError(StorageError):
    """A fetched file's size or sha256 differs from its manifest."""


class PointerConflictError(StorageError):
    """The ``latest`` pointer moved while publishing (another publisher)."""


class PointerDamagedError(StorageError):
    """The ``latest`` pointer is not a valid pointer (torn by a crash or a full disk, or overwritten)."""


class UnsafeSourceError(StorageError):
    """What was to be uploaded holds a symbolic link or a special file."""


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


def _safe_relative(rel: str, where: str) -> PurePosixPath:
    """Refuse paths that would escape the target directory (``..``, absolute paths)."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts:
        raise StorageError(f"{where} names the unsafe path {rel!r}; refusing to write outside the target directory")
    return path


# ---------------------------------------------------------------------------
# Settings and the cached boto3 client
# ---------------------------------------------------------------------------


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class S3Settings:
    """How to reach the S3 server; see the module docstring for the variables."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = "auto"
    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    max_concurrency: int = 8
    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    conditional_writes: str = "auto"
    checksum_calculation: str = "when_required"

    def __post_init__(self) -> None:
        if self.addressing_style not in ("path", "virtual", "auto"):
            raise ValueError(f"S3_ADDRESSING_STYLE must be path, virtual or auto, got {self.addressing_style!r}")
        if self.conditional_writes not in ("auto", "on", "off"):
            raise ValueError(f"S3_CONDITIONAL_WRITES must be auto, on or off, got {self.conditional_writes!r}")
        if self.multipart_chunksize < MIN_PART_SIZE:
            raise ValueError(
                f"S3_MULTIPART_CHUNKSIZE_MB must be >= 5 (S3's smallest part), got {self.multipart_chunksize / MiB:g}"
            )
        if self.multipart_threshold < 1 or self.max_concurrency < 1 or self.max_attempts < 1:
            raise ValueError("S3_MULTIPART_THRESHOLD_MB, S3_MAX_CONCURRENCY and AWS_MAX_ATTEMPTS must be positive")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"S3_ENDPOINT_URL must start with http:// or https://, got {self.endpoint_url!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "S3Settings":
        env = os.environ if environ is None else environ
        endpoint = (
            env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
        ).strip() or None
        style = env.get("S3_ADDRESSING_STYLE", "").strip().lower() or ("path" if endpoint else "auto")
        return cls(
            endpoint_url=endpoint,
            region=(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1").strip(),
            addressing_style=style,
            multipart_threshold=int(_env_float(env, "S3_MULTIPART_THRESHOLD_MB", 8) * MiB),
            multipart_chunksize=int(_env_float(env, "S3_MULTIPART_CHUNKSIZE_MB", 8) * MiB),
            max_concurrency=int(_env_float(env, "S3_MAX_CONCURRENCY", 8)),
            max_attempts=int(_env_float(env, "AWS_MAX_ATTEMPTS", 3)),
            conditional_writes=env.get("S3_CONDITIONAL_WRITES", "auto").strip().lower() or "auto",
            checksum_calculation=env.get("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required").strip().lower(),
        )

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _client_for(settings: S3Settings):
    """One boto3 S3 client per settings and credential environment (clients are thread-safe)."""
    # Hash the credential variables: a changed key gets a new client, the cache holds no secret.
    creds = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_ENV).encode()).hexdigest()
    cache_key = (settings, creds)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                region_name=settings.region,
                retries={"mode": "standard", "max_attempts": settings.max_attempts},
                s3={"addressing_style": settings.addressing_style},
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                request_checksum_calculation=settings.checksum_calculation,
                response_checksum_validation="when_required",
                max_pool_connections=max(10, settings.max_concurrency + 2),
            )
            client = boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)
            _clients[cache_key] = client
        return client


# ---------------------------------------------------------------------------
# Local helpers: temp file in the target directory, fsync, rename, fsync the directory.
# ---------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return _hash_stream(f)[1]


def _hash_stream(stream: BinaryIO) -> tuple[int, str]:
    """(size, sha256 hex) of what is left to read in ``stream``."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_HASH_CHUNK):
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


def _fsync_directory(directory: Path) -> None:
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
    _fsync_directory(dest.parent)
    return dest


def _atomic_write_local(dest: Path, data: bytes) -> None:
    atomic_write_file(dest, lambda tmp: tmp.write_bytes(data))


def _atomic_copy_local(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise ObjectNotFoundError(f"cannot read {src}: no such file")
    atomic_write_file(dest, lambda tmp: shutil.copyfile(src, tmp))


def _copy_stream_to(stream: BinaryIO, tmp: Path) -> None:
    with open(tmp, "wb") as out:
        shutil.copyfileobj(stream, out, _HASH_CHUNK)


def _files_under(root: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file below ``root``, sorted."""
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def _regular_files(source: Path, action: str) -> list[tuple[str, Path]]:
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


# ---------------------------------------------------------------------------
# The storage
# ---------------------------------------------------------------------------


_AUTH_HINTS = {
    "InvalidAccessKeyId": "the server does not know this access key: check AWS_ACCESS_KEY_ID",
    "InvalidClientTokenId": "the server does not know this access key: check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY "
                             "(and AWS_REGION, which is part of the signature)",
    "AccessDenied": "the credentials are valid but lack the permission: check the key's policy on this bucket",
    "AllAccessDisabled": "all access to this bucket is disabled: check the bucket's settings",
    "ExpiredToken": "the session token has expired: refresh AWS_SESSION_TOKEN (or the role's credentials)",
    "InvalidToken": "the session token is malformed or invalid: check AWS_SESSION_TOKEN",
    "403": "the server answered 403 Forbidden without a reason (a HEAD request): check AWS_ACCESS_KEY_ID, "
           "AWS_SECRET_ACCESS_KEY and the key's permissions on this bucket",
}
_CREDENTIAL_SOURCES = ("credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (on Kubernetes: the "
                       "Secret mounted as env), AWS_PROFILE, or the pod's role")


class Storage:
    """Local paths and ``s3://`` URIs behind one set of methods (see the module docstring)."""

    def __init__(self, settings: S3Settings | None = None):
        self.settings = settings or S3Settings.from_env()
        self._conditional_supported: bool | None = None  # learned on the first pointer write

    @property
    def client(self):
        """The boto3 S3 client (for what this module does not cover, e.g. creating buckets)."""
        return _client_for(self.settings)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunksize,
            max_concurrency=self.settings.max_concurrency,
            use_threads=True,
        )

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
            return StorageAuthError(f"cannot {where}: no usable S3 credentials found ({cause}); {_CREDENTIAL_SOURCES}")
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
        if code in _AUTH_HINTS:
            return StorageAuthError(f"cannot {where}: access refused ({code}): {_AUTH_HINTS[code]}; {_CREDENTIAL_SOURCES}")
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
            self.client.upload_file(str(local), bucket, key, Config=self._transfer_config())
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
                bucket, key, str(tmp), Config=self._transfer_config()))
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
            _atomic_write_local(Path(uri), data)
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
        files = _regular_files(root, "upload")
        if not root.is_dir():
            raise ObjectNotFoundError(f"cannot upload {root}: not a directory")
        return [self.put_file(path, join(uri_prefix, rel)) for rel, path in files]

    def get_dir(self, uri_prefix: str, local_dir: str | Path) -> list[Path]:
        """Copy every object below ``uri_prefix/`` to ``local_dir/<relative key>``; returns the paths.

        Each file appears atomically; for an all-or-nothing directory use ``fetch``.
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
            rel = _safe_relative(uri[len(base):], f"object {uri}")
            paths.append(self.get_file(uri, dest / rel))
        return paths

    # -- content-addressed releases ------------------------------------------

    def publish(self, source: str | Path, base_uri: str) -> dict:
        """Publish a file or directory under ``base_uri``; move ``latest`` only once all is stored.

        Every object already stored is verified against its sha256 and rewritten if it does
        not match, so publishing the same files again repairs a damaged release. Symbolic
        links and special files are refused (:class:`UnsafeSourceError`) before anything
        is uploaded. Returns the manifest plus ``version`` (sha256 of the manifest JSON) and
        ``uri``. Raises :class:`PointerConflictError` if ``latest`` moved during the upload.
        """
        source = Path(source)
        files = _regular_files(source, "publish")
        if not files:
            raise StorageError(f"cannot publish {source}: the directory holds no files")
        kind = "dir" if source.is_dir() else "file"

        # Read the pointer first: the final conditional write fails if anyone moves it meanwhile.
        previous, expected_etag = self._read_pointer(base_uri, replacing=True)
        entries = []
        for rel, path in files:
            # One open file for hashing and uploading: the bytes stored are the bytes hashed.
            with _open_regular_file(path, source) as stream:
                size, digest = _hash_stream(stream)
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
        self.update_pointer(base_uri, pointer, expected_etag)
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
            body = self.read_bytes(manifest_uri)
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
                rel = _safe_relative(entry["path"], f"manifest {manifest_uri}")
                object_uri = join(base_uri, object_key(entry["sha256"]))
                try:
                    target = self.get_file(object_uri, staging / rel)
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
        _fsync_directory(dest.parent)
        return {**manifest, "version": version, "uri": str(base_uri)}

    def read_pointer(self, base_uri: str) -> dict | None:
        """The ``latest`` pointer of ``base_uri`` (None before the first publish)."""
        return self._read_pointer(base_uri)[0]

    def update_pointer(self, base_uri: str, pointer: dict, expected_etag: str | None) -> None:
        """Write ``latest`` only if it is still what was read (``expected_etag``; None = absent).

        S3: conditional PUT (``IfMatch`` / ``IfNoneMatch``); on a server without them
        (NotImplemented, or ``S3_CONDITIONAL_WRITES=off``) compare-then-write. Local: the
        compare and the atomic rename happen under an exclusive ``flock``.
        """
        body = json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"
        uri = join(base_uri, POINTER_NAME)
        conflict = PointerConflictError(
            f"{uri} moved while publishing version {pointer['version']} (another publisher?); "
            f"that version is complete and can be fetched by its id; publish again to make it latest"
        )
        if not is_s3(uri):
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(f".{POINTER_NAME}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                if current != expected_etag:
                    raise conflict
                _atomic_write_local(path, body)
            return

        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        mode = self.settings.conditional_writes
        if mode == "on" or (mode == "auto" and self._conditional_supported is not False):
            condition = {"IfMatch": expected_etag} if expected_etag else {"IfNoneMatch": "*"}
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=body, **condition)
                self._conditional_supported = True
                return
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 412: the precondition failed; 409: a concurrent conditional write won (AWS).
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    raise conflict from None
                if expected_etag and (code == "NoSuchKey" or status == 404):
                    raise conflict from None  # the pointer was deleted meanwhile
                if not (mode == "auto" and (code == "NotImplemented" or status == 501)):
                    raise self._translate(e, uri, "update") from e  # a ClientError always translates
                self._conditional_supported = False
                print(f"storage: {self.settings.endpoint_name} has no conditional writes; "
                      "updating the pointer with compare-then-write", flush=True)
            except Exception as e:
                translated = self._translate(e, uri, "update")
                if translated is None:
                    raise
                raise translated from e
        # Compare-then-write: a small race window remains between the read and the write.
        _, current = self._read_pointer(base_uri, replacing=True)
        if current != expected_etag:
            raise conflict
        self.write_bytes(uri, body)

    def _read_pointer(self, base_uri: str, replacing: bool = False) -> tuple[dict | None, str | None]:
        """(pointer, tag for the conditional write); (None, None) when there is none.

        A damaged pointer raises :class:`PointerDamagedError`, unless ``replacing``: then it
        reads as (None, its tag), so a publish replaces it only if nobody else did first.
        """
        uri = join(base_uri, POINTER_NAME)
        if not is_s3(uri):
            path = Path(uri)
            if not path.is_file():
                return None, None
            data = path.read_bytes()
            tag = hashlib.sha256(data).hexdigest()
        else:
            bucket, key = split_s3(uri)
            try:
                with self._errors(uri, "read"):
                    response = self.client.get_object(Bucket=bucket, Key=key)
                    data, tag = response["Body"].read(), response["ETag"]
            except ObjectNotFoundError:
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
        state = self._stored_state(uri, size, sha256_hex)
        if state == "intact":
            return
        if state == "damaged":
            print(f"storage: {uri} does not match its sha256 {sha256_hex}; storing it again", flush=True)
        if not is_s3(uri):
            atomic_write_file(uri, lambda tmp: _copy_stream_to(stream, tmp))
            return
        bucket, key = split_s3(uri)
        with self._errors(uri, "upload to"):
            if size < self.settings.multipart_threshold:
                # The server checks the body against this sha256 and keeps it, so a later
                # publish verifies the object with a HEAD instead of reading it back.
                self.client.put_object(Bucket=bucket, Key=key, Body=stream, ChecksumAlgorithm="SHA256",
                                       ChecksumSHA256=_sha256_base64(sha256_hex))
            else:
                self.client.upload_fileobj(stream, bucket, key, Config=self._transfer_config())

    def _stored_state(self, uri: str, size: int, sha256_hex: str) -> str:
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
                return "intact" if _hash_stream(stored) == (size, sha256_hex) else "damaged"

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
                    return "intact" if stored == _sha256_base64(sha256_hex) else "damaged"
                # No sha256 kept by the server (a multipart upload, or written without one): read and hash.
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                try:
                    return "intact" if _hash_stream(body) == (size, sha256_hex) else "damaged"
                finally:
                    body.close()
        except ObjectNotFoundError:
            return "missing"


def _sha256_base64(sha256_hex: str) -> str:
    """The sha256 as S3 writes it (``x-amz-checksum-sha256``: base64 of the raw digest)."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


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


def object_key(sha256_hex: str) -> str:
    """Where content with this sha256 lives below a publish base."""
    return f"{OBJECTS_DIR}/{sha256_hex[:2]}/{sha256_hex}"


def _manifest_bytes(manifest: dict) -> bytes:
    # Deterministic bytes: the same files give the same version id.
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


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


def publish(source: str | Path, base_uri: str) -> dict:
    return Storage().publish(source, base_uri)


def fetch(base_uri: str, local_dir: str | Path, version: str = "latest") -> dict:
    return Storage().fetch(base_uri, local_dir, version)


def with_settings(**changes) -> Storage:
    """A Storage with some settings changed from the environment's, e.g. ``with_settings(max_attempts=1)``."""
    return Storage(replace(S3Settings.from_env(), **changes))
