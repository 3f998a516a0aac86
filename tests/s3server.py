"""Test helpers: a real S3-compatible HTTP server (moto's standalone server) on loopback,
and a forwarding proxy in front of it that can drop connections like a dying server.

``tests/conftest.py`` starts one per test process as the ``moto_server`` fixture (and ``bucket``:
a fresh bucket with the environment pointing at it). Direct use (``tests/`` is on ``sys.path``)::

    from s3server import MotoServer, s3_env

    with MotoServer() as server:
        env = s3_env(server.endpoint)
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` as a subprocess on a free loopback port (or on ``host``: e.g. the gateway of the
    local pods' network, for containers to reach)."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 60, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self.endpoint = f"http://{host}:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "MotoServer":
        env = {**os.environ, "MOTO_PORT": str(self.port)}
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # auth off until a test turns it on
        # The request log goes to a file: an unread pipe fills up and blocks the server.
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with _no_proxy_opener().open(f"{self.endpoint}/moto-api/", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {self.startup_timeout_s} s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log:
            self._log.close()

    def log_tail(self, chars: int = 2000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def set_auth(self, enabled: bool) -> None:
        """Turn moto's IAM authentication on (every request is checked from now) or off."""
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=(b"0" if enabled else b"inf"), method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with _no_proxy_opener().open(request, timeout=10) as r:
            assert r.status == 200


def _no_proxy_opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    """Environment for components.core.blobs and releases against ``endpoint``, isolated from any real AWS config."""
    return {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "S3_ADDRESSING_STYLE": "path",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **extra,
    }


NOT_IMPLEMENTED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
    b"<Message>A header you provided implies functionality that is not implemented</Message></Error>"
)


class FailingProxy:
    """An HTTP proxy in front of ``upstream`` that forwards every request, except where
    ``rule(method, path, headers)`` says otherwise:

    * ``"drop"``: read the request in full, then close the connection without an answer,
      as a server that dies mid-upload does;
    * ``"not-implemented"``: answer 501 NotImplemented, as a server without the feature does.
    """

    def __init__(self, upstream: str, rule: Callable[[str, str, dict], str | None]):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.rule = rule
        self.requests: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FailingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue like a real server

            def log_message(self, *args) -> None:
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._read_body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    action = proxy.rule(self.command, self.path, dict(self.headers.items()))
                    if action:
                        proxy.refused.append((action, self.command, self.path))
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # no answer at all
                    return
                if action == "not-implemented":
                    self.send_response(501, "Not Implemented")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(NOT_IMPLEMENTED_XML)))
                    self.end_headers()
                    self.wfile.write(NOT_IMPLEMENTED_XML)
                    return
                assert action is None, f"unknown proxy action {action!r}"
                skip = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() in ("connection", "transfer-encoding", "content-length", "server", "date"):
                            continue
                        self.send_header(name, value)
                    # A HEAD answer carries the length of the body it does not send.
                    length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
