"""Bearer-token gate in front of TorchServe's inference API: the serving pods' sidecar.

Why it exists: TorchServe 0.12 makes up random keys at every start (``key_file.json``
in its working directory) and has no setting for a key of your choosing, so clients
behind a Kubernetes Service, where each pod has different keys, could never hold a
valid one. With token authorization switched off instead, anyone the NetworkPolicy
lets in could call the model. So each serving pod runs this proxy next to TorchServe:

* TorchServe's inference API listens on the pod's loopback only; this proxy listens on
  the pod's network port (the one the Service targets).
* A request passes only with ``Authorization: Bearer <token>`` where the token is one
  of the lines of ``--token-file``, a file mounted from a Kubernetes Secret. Several
  lines = several valid tokens, so a token is rotated without downtime: add the new
  line, move the clients, drop the old line. The file is re-read when it changes (the
  kubelet updates mounted Secrets in place), so no restart is needed.
* Accepted requests go to TorchServe with the pod's own inference key in place of the
  client's token (re-read when ``key_file.json`` changes: the readiness probe renews
  the key; TorchServe refusing the key makes the proxy re-read it and retry once).
* Only the inference routes pass: ``GET /ping``, ``POST /predictions/<model>[/<version>]``
  and ``POST /explanations/<model>[/<version>]``; bodies larger than
  ``--max-request-bytes`` are refused before they are read.
* Form bodies (``application/x-www-form-urlencoded``, ``multipart/form-data``, in any
  ``Content-Type`` header of the request) get a 415 and never reach TorchServe (the body
  is read past, within the size limit, so the connection stays usable): TorchServe's Java
  frontend decodes forms itself, before the handler, and answers one Netty cannot decode
  (``a=%zz``) with a 500; the handler takes image bytes or JSON only, so no valid request
  is a form.
* ``GET /healthz`` answers without a token and says nothing about the model: it is for
  the kubelet's probes of this container (TorchServe has its own readiness probe).

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` (constant time)
and never logged. Standard library only (the image's Python; no extra dependency,
starts in ~50 ms)::

    python -m serving.auth_proxy --listen 0.0.0.0:8080 --upstream http://127.0.0.1:8079 \\
        --key-file /var/run/torchserve/key_file.json --token-file /etc/kfp-mlops/serving-token/token
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

MIN_TOKEN_CHARS = 16  # a guessable client token would make the whole gate pointless
# (method, path pattern) pairs that reach TorchServe; everything else is refused here.
ROUTES = (
    ("GET", re.compile(r"/ping")),
    ("POST", re.compile(r"/predictions/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")),
    ("POST", re.compile(r"/explanations/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")),
)
# Content types TorchServe's frontend decodes as a form itself (Netty's HttpPostRequestDecoder), before
# the handler: a body it cannot decode gets a 500 there. Matched anywhere in the header value, any case.
FORM_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def is_form_content_type(content_type: str) -> bool:
    """Whether TorchServe's frontend would decode a body of this ``Content-Type`` as a form (or might)."""
    lowered = content_type.lower()
    return any(form in lowered for form in FORM_CONTENT_TYPES)


# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself.
_NOT_FORWARDED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


class _Watched:
    """A file re-read when its identity (inode, size, mtime) changes, at most once per ``check_every_s``."""

    def __init__(self, path: str | Path, check_every_s: float):
        self.path, self.check_every_s = Path(path), check_every_s
        self._stamp: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    def changed(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._checked_at < self.check_every_s:
            return False
        with self._lock:
            self._checked_at = now
            try:
                st = self.path.stat()  # follows the kubelet's ..data symlink: a swapped Secret is a new inode
            except OSError:
                return False  # gone for a moment (a swap in progress): keep what was read
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            return True


class ClientTokens:
    """The accepted client tokens: one per non-empty line of a file mounted from a Secret."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0):
        self._file = _Watched(path, check_every_s)
        self._digests = self._read()  # fail at start when the file is missing or weak
        self._file.changed(force=True)

    def _read(self) -> list[bytes]:
        path = self._file.path
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ValueError(f"cannot read the client token file {path}: {err}; mount the Secret "
                             "(kubectl create secret generic kfp-mlops-serving-token --from-literal=token=...)") from None
        tokens = [line.strip() for line in lines if line.strip()]
        if not tokens:
            raise ValueError(f"the client token file {path} holds no token (one per line)")
        weak = [i + 1 for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
        if weak:
            raise ValueError(f"token(s) on line(s) {weak} of {path} are shorter than {MIN_TOKEN_CHARS} characters; "
                             "use e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return [hashlib.sha256(t.encode()).digest() for t in tokens]

    def accepts(self, presented: str) -> bool:
        if self._file.changed():
            try:
                self._digests = self._read()
            except ValueError as err:  # a broken update must not lock everyone out, nor let everyone in
                print(f"[auth-proxy] keeping the previous tokens: {err}", flush=True)
        digest = hashlib.sha256(presented.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time taken does not tell which line matched
            matched |= hmac.compare_digest(digest, known)
        return matched


class PodKey:
    """TorchServe's inference key from its ``key_file.json``, re-read when the file changes."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0):
        self._file = _Watched(path, check_every_s)
        self._key: str | None = None

    def get(self, force: bool = False) -> str | None:
        if self._file.changed(force=force) or self._key is None:
            try:
                self._key = json.loads(self._file.path.read_text())["inference"]["key"]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # TorchServe not started yet, or writing the file: keep the last key (or None)
        return self._key


@dataclass
class ProxyConfig:
    upstream: str  # TorchServe's inference API on loopback, e.g. http://127.0.0.1:8079
    key_file: str
    token_file: str
    max_request_bytes: int = 10 * 1024 * 1024  # TorchServe's max_request_size in the ConfigMap
    upstream_timeout_s: float = 60.0  # TorchServe's default_response_timeout
    idle_timeout_s: float = 60.0  # a client connection idle this long is closed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive to clients
    # Headers and body go out as two writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per response on Linux). TCP_NODELAY sends both at once.
    disable_nagle_algorithm = True
    server_version = "kfp-mlops-auth-proxy"
    sys_version = ""

    # -- plumbing
    def setup(self) -> None:
        self.timeout = self.server.config.idle_timeout_s
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None  # one keep-alive connection per client connection

    def finish(self) -> None:
        super().finish()
        if self._upstream is not None:
            self._upstream.close()

    def log_request(self, code="-", size="-") -> None:  # only failures; never headers (they hold tokens)
        if isinstance(code, int) and code >= 400:
            print(f"[auth-proxy] {self.command} {self.path.split('?')[0][:200]} -> {code}", flush=True)

    def log_error(self, *args) -> None:
        pass  # log_request reports the status line; the default would also print to stderr

    def _reply(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"code": status, "type": http.client.responses.get(status, ""), "message": message}).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:  # tell the client, so it does not send its next request on this connection
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- routes
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, "auth proxy up")
            return
        self._proxy()

    def do_POST(self) -> None:
        self._proxy()

    def do_PUT(self) -> None:
        self._proxy()

    def do_DELETE(self) -> None:
        self._proxy()

    def do_OPTIONS(self) -> None:  # TorchServe answers OPTIONS with its API description: not for clients
        self._proxy()

    def _proxy(self) -> None:
        config: ProxyConfig = self.server.config
        path = urlsplit(self.path).path
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # an unread chunked body would be taken for the next request
            self._reply(411, "send the body with a Content-Length (chunked uploads are not accepted)")
            return
        try:
            length = int(length_text or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._reply(400, f"invalid Content-Length {length_text!r}")
            return

        # Refuse before reading the body: unauthenticated or oversized requests cost nothing.
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip() or not self.server.tokens.accepts(presented.strip()):
            self.close_connection = length > 0  # the unread body must not be parsed as a request
            why = "missing" if not header else "invalid"
            self._reply(401, f"{why} bearer token: send 'Authorization: Bearer <token>' with a token from the "
                             "Secret kfp-mlops-serving-token", {"WWW-Authenticate": 'Bearer realm="kfp-mlops"'})
            return
        if not any(self.command == method and pattern.fullmatch(path) for method, pattern in ROUTES):
            self.close_connection = length > 0
            self._reply(404, f"{self.command} {path[:200]} is not served here: only GET /ping, "
                             "POST /predictions/<model> and POST /explanations/<model>")
            return
        if length > config.max_request_bytes:
            self.close_connection = True
            self._reply(413, f"request body of {length} bytes exceeds the limit of {config.max_request_bytes} bytes")
            return
        if self.command == "POST" and any(is_form_content_type(v) for v in self.headers.get_all("Content-Type", [])):
            # Authenticated and within the size limit: read the body past, so the connection stays usable.
            if len(self.rfile.read(length) if length else b"") != length:
                self.close_connection = True
                return  # the client went away mid-body
            self._reply(415, "form bodies (application/x-www-form-urlencoded, multipart/form-data) are not accepted: "
                             "send the image bytes (Content-Type image/png or image/jpeg) or JSON (application/json)")
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return  # the client went away mid-body

        key = self.server.pod_key.get()
        if key is None:
            self._reply(503, "TorchServe has not written its key file yet (still starting)", {"Retry-After": "5"})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _NOT_FORWARDED}
        try:
            status, reason, response_headers, data = self._forward(body, headers, key)
            if status in (400, 401, 403) and b"Token Auth" in data:
                # TorchServe refused the pod key (it answers 400 "Token Authorization failed ..."): the
                # readiness probe renewed it since it was read. Re-read the key file and try once more.
                fresh = self.server.pod_key.get(force=True)
                if fresh is not None and fresh != key:
                    status, reason, response_headers, data = self._forward(body, headers, fresh)
        except (OSError, http.client.HTTPException) as err:
            self._reply(502, f"TorchServe did not answer on loopback ({type(err).__name__}: {err}); "
                             "the pod is restarting it or it is overloaded")
            return
        self.send_response(status, reason)
        for name, value in response_headers:
            if name.lower() not in _NOT_FORWARDED:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self, body: bytes, headers: dict[str, str], key: str):
        config: ProxyConfig = self.server.config
        headers = {**headers, "Authorization": f"Bearer {key}", "Content-Length": str(len(body))}
        for attempt in (1, 2):
            reused = self._upstream is not None
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                                            timeout=config.upstream_timeout_s)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                response = self._upstream.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self._upstream.close()
                self._upstream = None
                if reused and attempt == 1:
                    continue  # a kept-alive connection the upstream had closed: once more on a fresh one
                raise
            if response.will_close:
                self._upstream.close()
                self._upstream = None
            return response.status, response.reason, response.getheaders(), data
        raise AssertionError("unreachable")


class AuthProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, listen: tuple[str, int], config: ProxyConfig):
        upstream = urlsplit(config.upstream)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"--upstream must be http://HOST:PORT (TorchServe on loopback), got {config.upstream!r}")
        self.config = config
        self.upstream_host, self.upstream_port = upstream.hostname, upstream.port or 80
        self.tokens = ClientTokens(config.token_file)
        self.pod_key = PodKey(config.key_file)
        super().__init__(listen, _Handler)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.auth_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, default=("0.0.0.0", 8080), help="HOST:PORT to serve clients on")
    parser.add_argument("--upstream", default="http://127.0.0.1:8079", help="TorchServe's inference API (loopback)")
    parser.add_argument("--key-file", default="/var/run/torchserve/key_file.json", help="TorchServe's key_file.json")
    parser.add_argument("--token-file", default="/etc/kfp-mlops/serving-token/token",
                        help="accepted client tokens, one per line (a mounted Secret)")
    parser.add_argument("--max-request-bytes", type=int, default=ProxyConfig.max_request_bytes)
    parser.add_argument("--upstream-timeout-s", type=float, default=ProxyConfig.upstream_timeout_s)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ProxyConfig(upstream=args.upstream, key_file=args.key_file, token_file=args.token_file,
                         max_request_bytes=args.max_request_bytes, upstream_timeout_s=args.upstream_timeout_s)
    try:
        server = AuthProxyServer(args.listen, config)
    except (ValueError, OSError) as err:
        print(f"[auth-proxy] cannot start: {err}", file=sys.stderr, flush=True)
        return 2
    # SIGTERM (pod shutdown): stop accepting, let requests in flight finish (daemon threads end with us).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"[auth-proxy] listening on {args.listen[0]}:{server.server_port}, forwarding to {config.upstream}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
