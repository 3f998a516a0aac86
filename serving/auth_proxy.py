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
starts in ~50 ms): one asyncio event loop on one thread, each client connection with a
keep-alive connection of its own to TorchServe (README "Serving, measured": about a quarter of the
CPU per request of the first version, a thread per connection)::

    python -m serving.auth_proxy --listen 0.0.0.0:8080 --upstream http://127.0.0.1:8079 \\
        --key-file /var/run/torchserve/key_file.json --token-file /etc/kfp-mlops/serving-token/token
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import http.client
import json
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
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
                  "transfer-encoding", "upgrade", "host", "content-length", "authorization", "expect"}
_NOT_RELAYED = _NOT_FORWARDED | {"server", "date"}  # TorchServe's answer gets the proxy's own
SERVER_NAME = "kfp-mlops-auth-proxy"
MAX_HEAD_BYTES = 64 * 1024  # request line plus header fields; more is a 431
MAX_HEADERS = 100


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


class BadRequestHead(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]  # in arrival order, names as sent
    fields: dict[str, list[str]]  # lower-case name -> values in arrival order

    def get_all(self, name: str) -> list[str]:
        return self.fields.get(name.lower(), [])

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for value in self.get_all("Connection") for t in value.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_request_head(head: bytes) -> _Request:
    """The request line and header fields of one HTTP/1.x request (``head`` ends with the empty line)."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # empty lines before a request line are allowed (RFC 9112 2.2)
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not _TOKEN_CHARS.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequestHead(400, f"bad request line {(lines[0] if lines else '')[:100]!r}: expected 'METHOD /path HTTP/1.1'")
    headers: list[tuple[str, str]] = []
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_CHARS.fullmatch(name):  # also refuses obsolete line folding (a leading space)
            raise BadRequestHead(400, f"bad header line {line[:100]!r}")
        value = value.strip(" \t")
        headers.append((name, value))
        fields.setdefault(name.lower(), []).append(value)
    if len(headers) > MAX_HEADERS:
        raise BadRequestHead(431, f"{len(headers)} header fields; at most {MAX_HEADERS} are accepted")
    return _Request(parts[0], parts[1], parts[2], headers, fields)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # Each response goes out in one write, but without TCP_NODELAY a request or response that
    # follows a small one can wait for the peer's delayed ACK (~40 ms on Linux).
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _UpstreamClosed(ConnectionError):
    pass


class _Upstream:
    """One keep-alive HTTP/1.1 connection to TorchServe, owned by one client connection (no sharing, no lock)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.timed_out = False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def abort_slow_answer(self) -> None:
        """Called by the proxy's watchdog: the answer took too long; the waiting exchange raises TimeoutError."""
        self.timed_out = True
        self.close()

    async def exchange(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                       timeout_s: float) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """``(status, reason, headers, body)`` of TorchServe's answer; a kept-alive connection that
        TorchServe had closed is retried once on a fresh one. OSError (incl. timeouts) when it cannot."""
        head = "".join([f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n",
                        *(f"{name}: {value}\r\n" for name, value in headers),
                        f"Content-Length: {len(body)}\r\n\r\n"]).encode("latin-1")
        self.timed_out = False
        for attempt in (1, 2):
            reused = self._writer is not None
            try:
                if self._writer is None:
                    async with asyncio.timeout(timeout_s):  # once per client connection, not per request
                        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                    _no_delay(self._writer)
                return await self._once(head + body)
            except (ConnectionError, asyncio.IncompleteReadError) as err:
                self.close()
                if self.timed_out:
                    raise TimeoutError(f"no answer within {timeout_s:g} s") from None
                if reused and attempt == 1:
                    continue  # TorchServe had closed the idle connection: once more on a fresh one
                raise _UpstreamClosed(f"connection closed ({type(err).__name__})") from None
            except BaseException:
                self.close()  # a half-read answer must not be taken for the next one
                raise
        raise AssertionError("unreachable")

    async def _once(self, request: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        reader, writer = self._reader, self._writer
        writer.write(request)
        await writer.drain()
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ValueError("TorchServe's answer has an oversized head") from None
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"TorchServe answered with a bad status line {lines[0][:100]!r}")
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:] if line)]
        fields = {n.lower(): v for n, v in headers}
        will_close = version == "HTTP/1.0" or "close" in fields.get("connection", "").lower()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            parts = []
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await reader.readexactly(size + 2))
                parts[-1] = parts[-1][:-2]
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailer fields
            data = b"".join(parts)
        elif int(code) in (204, 304) or code.startswith("1"):
            data = b""  # no body, whatever the fields say (RFC 9112 6.3)
        elif "content-length" in fields:
            data = await reader.readexactly(int(fields["content-length"]))
        else:
            data, will_close = await reader.read(), True  # the body ends when the connection does
        if will_close:
            self.close()
        return int(code), reason, headers, data


class _Clock:
    """One client connection as the watchdog and a graceful stop see it: what it waits for, since when."""

    __slots__ = ("phase", "since", "writer", "upstream", "task")

    def __init__(self, writer: asyncio.StreamWriter, upstream: _Upstream, task: asyncio.Task):
        self.phase, self.since, self.writer, self.upstream, self.task = "client", time.monotonic(), writer, upstream, task

    def waiting(self, phase: str) -> None:
        """``client`` (the next request), ``body`` (the rest of one), ``upstream`` (TorchServe) or ``busy``."""
        self.phase, self.since = phase, time.monotonic()


class _Reply(Exception):
    """An answer from the proxy itself (refusals, errors), raised from deep in a request's handling."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


class AuthProxyServer:
    """The proxy: one asyncio event loop on one thread, one keep-alive upstream connection per client connection.

    One thread and no locks: the first version (``ThreadingHTTPServer``, a thread per connection,
    ``http.client`` upstream) took 0.77-0.85 ms of CPU per request at 32 connections against
    0.27-0.28 ms on asyncio, in the same interleaved runs; time-outs from one watchdog instead of a
    timer per read took another quarter off (README "Serving, measured"). The listening
    socket is bound here, so a taken port fails at construction; ``serve_forever`` /
    ``shutdown`` / ``server_close`` behave as ``socketserver``'s.
    """

    def __init__(self, listen: tuple[str, int], config: ProxyConfig):
        upstream = urlsplit(config.upstream)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"--upstream must be http://HOST:PORT (TorchServe on loopback), got {config.upstream!r}")
        self.config = config
        self.upstream_host, self.upstream_port = upstream.hostname, upstream.port or 80
        self.tokens = ClientTokens(config.token_file)
        self.pod_key = PodKey(config.key_file)
        self.socket = socket.create_server(listen, backlog=128, reuse_port=False)
        self.server_port = self.socket.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running, self._finished, self._shutdown_requested = threading.Event(), threading.Event(), threading.Event()
        self._grace_s = 10.0
        self._clocks: set[_Clock] = set()  # one per open client connection

    # -- lifecycle (socketserver's names, so callers and tests treat it like one)
    def serve_forever(self, poll_interval: float = 0.5) -> None:  # poll_interval: socketserver's; unused
        self._finished.clear()
        self._running.set()
        try:
            asyncio.run(self._serve())
        finally:
            self._running.clear()
            self._finished.set()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), return when serve_forever has."""
        self._grace_s = grace_s
        self._shutdown_requested.set()  # seen by a serve_forever that has not set up its loop yet
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                return  # the loop has already ended
        if self._running.is_set():
            self._finished.wait()

    def server_close(self) -> None:
        self.socket.close()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if self._shutdown_requested.is_set():
            self._stop.set()
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=MAX_HEAD_BYTES)
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            server.close()  # no new connections
            deadline = time.monotonic() + self._grace_s
            while any(c.phase != "client" for c in self._clocks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # requests in flight finish; idle connections are not waited for
            tasks = [c.task for c in self._clocks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop = None

    async def _watchdog(self) -> None:
        """Time-outs for every connection from one loop: cheaper than a timer per read on the request path.

        A client idle (or sending a body) longer than ``idle_timeout_s`` is disconnected; an answer from
        TorchServe that takes longer than ``upstream_timeout_s`` is given up (the client gets a 502).
        """
        config = self.config
        period = min(1.0, config.idle_timeout_s / 4, config.upstream_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for clock in list(self._clocks):
                if clock.phase in ("client", "body") and now - clock.since > config.idle_timeout_s:
                    clock.writer.close()
                elif clock.phase == "upstream" and now - clock.since > config.upstream_timeout_s:
                    clock.upstream.abort_slow_answer()

    # -- one client connection: requests one after the other (HTTP/1.1 keep-alive)
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _no_delay(writer)
        upstream = _Upstream(self.upstream_host, self.upstream_port)
        clock = _Clock(writer, upstream, asyncio.current_task())
        self._clocks.add(clock)
        try:
            while not self._stop.is_set():
                clock.waiting("client")
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    writer.write(self._response(431, f"request head over {MAX_HEAD_BYTES} bytes", close=True,
                                                what="a request"))
                    break
                except asyncio.IncompleteReadError:
                    break  # the client closed the connection, or the watchdog did (idle too long)
                clock.waiting("busy")
                keep_open = await self._request(head, reader, writer, clock)
                await writer.drain()
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away mid-request: nobody to answer
        finally:
            upstream.close()
            writer.close()
            self._clocks.discard(clock)

    async def _request(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       clock: _Clock) -> bool:
        """Answer one request; whether the connection may carry another."""
        try:
            request = parse_request_head(head)
        except BadRequestHead as err:
            writer.write(self._response(err.status, str(err), close=True, what="a request"))
            return False
        keep_alive = request.keep_alive
        head_only = request.method == "HEAD"
        try:
            status, reason, headers, data = await self._answer(request, reader, writer, clock)
        except _Reply as reply:
            keep_alive = keep_alive and not reply.close
            writer.write(self._response(reply.status, reply.message, reply.headers, close=not keep_alive,
                                        head_only=head_only, what=f"{request.method} {request.target.split('?')[0][:200]}"))
            return keep_alive
        relayed = [(name, value) for name, value in headers if name.lower() not in _NOT_RELAYED]
        writer.write(_encode_response(status, reason, relayed, data, close=not keep_alive, head_only=head_only))
        return keep_alive

    async def _answer(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      clock: _Clock) -> tuple[int, str, list[tuple[str, str]], bytes]:
        config, upstream = self.config, clock.upstream
        if request.method == "GET" and request.target == "/healthz":
            raise _Reply(200, "auth proxy up")
        path = urlsplit(request.target).path
        if request.get("Transfer-Encoding"):  # an unread chunked body would be taken for the next request
            raise _Reply(411, "send the body with a Content-Length (chunked uploads are not accepted)", close=True)
        lengths = request.get_all("Content-Length")
        if len(set(lengths)) > 1 or (lengths and not lengths[0].isdigit()):  # repeated and different: smuggling
            raise _Reply(400, f"invalid Content-Length {', '.join(lengths)[:100]!r}", close=True)
        length = int(lengths[0]) if lengths else 0

        # Refuse before reading the body: unauthenticated or oversized requests cost nothing.
        header = request.get("Authorization") or ""
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip() or not self.tokens.accepts(presented.strip()):
            why = "missing" if not header else "invalid"
            raise _Reply(401, f"{why} bearer token: send 'Authorization: Bearer <token>' with a token from the "
                              "Secret kfp-mlops-serving-token", {"WWW-Authenticate": 'Bearer realm="kfp-mlops"'},
                         close=length > 0)  # the unread body must not be parsed as a request
        if not any(request.method == method and pattern.fullmatch(path) for method, pattern in ROUTES):
            raise _Reply(404, f"{request.method} {path[:200]} is not served here: only GET /ping, "
                              "POST /predictions/<model> and POST /explanations/<model>", close=length > 0)
        if length > config.max_request_bytes:
            raise _Reply(413, f"request body of {length} bytes exceeds the limit of {config.max_request_bytes} bytes",
                         close=True)
        if length and (request.get("Expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # checks passed: now the client may send the body
        body = b""
        if length:
            clock.waiting("body")  # a client that stops sending mid-body is cut off like an idle one
            body = await reader.readexactly(length)
            clock.waiting("busy")
        if request.method == "POST" and any(is_form_content_type(v) for v in request.get_all("Content-Type")):
            # Authenticated and within the size limit: the body was read past, so the connection stays usable.
            raise _Reply(415, "form bodies (application/x-www-form-urlencoded, multipart/form-data) are not accepted: "
                              "send the image bytes (Content-Type image/png or image/jpeg) or JSON (application/json)")

        key = self.pod_key.get()
        if key is None:
            raise _Reply(503, "TorchServe has not written its key file yet (still starting)", {"Retry-After": "5"})
        forwarded = {}
        for name, value in request.headers:  # the last of repeated fields, as TorchServe would take it
            if (lowered := name.lower()) not in _NOT_FORWARDED:
                forwarded[lowered] = (name, value)
        headers = list(forwarded.values())
        clock.waiting("upstream")
        try:
            answer = await upstream.exchange(request.method, request.target, headers + [("Authorization", f"Bearer {key}")],
                                             body, config.upstream_timeout_s)
            if answer[0] in (400, 401, 403) and b"Token Auth" in answer[3]:
                # TorchServe refused the pod key (it answers 400 "Token Authorization failed ..."): the
                # readiness probe renewed it since it was read. Re-read the key file and try once more.
                fresh = self.pod_key.get(force=True)
                if fresh is not None and fresh != key:
                    answer = await upstream.exchange(request.method, request.target,
                                                     headers + [("Authorization", f"Bearer {fresh}")], body,
                                                     config.upstream_timeout_s)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            upstream.close()
            raise _Reply(502, f"TorchServe did not answer on loopback ({type(err).__name__}: {err}); "
                              "the pod is restarting it or it is overloaded") from None
        finally:
            clock.waiting("busy")
        return answer

    @staticmethod
    def _response(status: int, message: str, headers: dict[str, str] | None = None, close: bool = False,
                  head_only: bool = False, what: str = "") -> bytes:
        if status >= 400:  # only failures; never headers (they hold tokens)
            print(f"[auth-proxy] {what} -> {status}: {message[:120]}", flush=True)
        reason = http.client.responses.get(status, "")
        body = json.dumps({"code": status, "type": reason, "message": message}).encode()
        fields = [*(headers or {}).items(), ("Content-Type", "application/json")]
        return _encode_response(status, reason, fields, body, close=close, head_only=head_only)


def _encode_response(status: int, reason: str, fields: list[tuple[str, str]], body: bytes, close: bool,
                     head_only: bool) -> bytes:
    """One HTTP/1.1 response in one buffer (one write): the proxy's Server and Date, ``fields``, the length."""
    lines = [f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nDate: {_http_date()}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in fields]
    if close:  # tell the client, so it does not send its next request on this connection
        lines.append("Connection: close\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("latin-1") + (b"" if head_only else body)


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


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
    # SIGTERM (pod shutdown): stop accepting, let requests in flight finish (up to 10 s), then exit.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"[auth-proxy] listening on {args.listen[0]}:{server.server_port}, forwarding to {config.upstream}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
