"""How to reach the S3 server: :class:`S3Settings` from the environment, one cached boto3 client, and what
its credential errors mean.

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
  releases verify sha256 end to end anyway. A release's objects below the multipart
  threshold carry the sha256 as a plain ``x-amz-checksum-sha256`` header (no trailer),
  so the server checks the body and keeps the checksum.
* Credentials: the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
  / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, web identity, instance metadata).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Mapping

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's smallest allowed multipart part (except the last)


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


# What an S3 error code means for the credentials, for error messages that say what to check.
AUTH_HINTS = {
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
CREDENTIAL_SOURCES = ("credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (on Kubernetes: the "
                      "Secret mounted as env), AWS_PROFILE, or the pod's role")

_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN")
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client_for(settings: S3Settings):
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


def transfer_config(settings: S3Settings):
    """boto3's multipart settings for uploads and downloads."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_concurrency=settings.max_concurrency,
        use_threads=True,
    )


def sha256_base64(sha256_hex: str) -> str:
    """The sha256 as S3 writes it (``x-amz-checksum-sha256``: base64 of the raw digest)."""
    import base64

    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()
