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
* Tokens of ``--source-token-file`` (same rules) pass too and may also set
  ``X-Request-Source`` (``smoke-test``, ``replay``: how the drift monitor tells the
  pipeline's own traffic from the clients'). From every other token that header is dropped.
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
* With ``--rollout-file``, a challenger (another auth proxy, in front of another model) gets a share of the
  predictions, answering them (canary) or as mirrored copies (shadow), and ``GET /rollout`` answers the
  evidence to a source token (``serving/rollout_router.py``).
* With ``--unbatched-model MODEL=TWIN``, a prediction that finds no request in flight goes to the same model
  registered with batches of one, so it does not wait for a batch (``serving/unbatched_route.py``); clients
  cannot name the twin (404).
* ``GET /healthz`` answers without a token and says nothing about the model: it is for
  the kubelet's probes of this container (TorchServe has its own readiness probe).
* Requests are parsed by llhttp with checks of the proxy's own on top
  (``serving/http_framing.py``) and written anew for TorchServe from the checked parts,
  so its lenient frontend never gets bytes it could read as a second request.
  docs/serving-proxy.md lists what is refused, and why.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` (constant time)
and never logged. One asyncio event loop on one thread, each client connection with a
keep-alive connection of its own to TorchServe::

    python -m serving.auth_proxy --listen 0.0.0.0:8080 --upstream http://127.0.0.1:8079 \\
        --key-file /var/run/torchserve/key_file.json --token-file /etc/kfp-mlops/serving-token/token
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from components.core import names
from serving.http_framing import (
    READ_SIZE,
    FramingError,
    Request,
    RequestStream,
    Response,
    Upstream,
    encode_request,
    encode_response,
    forwardable_fields,
    no_delay,
)
from serving.proxy_files import MIN_TOKEN_CHARS, ClientTokens, PodKey  # noqa: F401 - MIN_TOKEN_CHARS: re-exported
from serving.rollout_router import ROLLOUT_PATH, RolloutRouter, json_response
from serving.unbatched_route import PredictionRoutes, parse_route

# (method, path pattern) pairs that reach TorchServe; everything else is refused here.
ROUTES = (
    ("GET", re.compile(r"/ping")),
    ("POST", re.compile(r"/predictions/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")),
    ("POST", re.compile(r"/explanations/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")),
)
# Content types TorchServe's frontend decodes as a form itself (Netty's HttpPostRequestDecoder), before
# the handler: a body it cannot decode gets a 500 there. Matched anywhere in the header value, any case.
FORM_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
# The request fields TorchServe or the handler read, or that trace a request (lower-case name -> as
# forwarded). Every other field a client sends stays here.
FORWARDED_FIELDS = {"content-type": "Content-Type", "accept": "Accept", "user-agent": "User-Agent",
                    "x-request-id": "X-Request-Id", "traceparent": "traceparent", "tracestate": "tracestate",
                    "x-top-k": "X-Top-K", "x-target": "X-Target"}
SOURCE_FIELD = "x-request-source"
SOURCE_VALUE = re.compile(r"[a-z0-9-]{1,32}")
_NOT_RELAYED = frozenset({"content-length", "server", "date", "host", "authorization", "expect"})  # the proxy's own
LINGER_S = 2.0  # after a closing answer, how long what the client still sends is read and dropped
DEFAULT_MAX_CONNECTIONS = 512
# What runs the event loop: the standard library's (uvloop gave no clear gain and failed a rollout test);
# benchmarks/serving_bench/proxy.py swaps it to compare loops.
run_event_loop = asyncio.run


def is_form_content_type(content_type: str) -> bool:
    """Whether TorchServe's frontend would decode a body of this ``Content-Type`` as a form (or might)."""
    lowered = content_type.lower()
    return any(form in lowered for form in FORM_CONTENT_TYPES)


@dataclass
class ProxyConfig:
    upstream: str  # TorchServe's inference API on loopback, e.g. http://127.0.0.1:8079
    key_file: str
    token_file: str
    max_request_bytes: int = 10 * 1024 * 1024  # TorchServe's max_request_size in the ConfigMap
    upstream_timeout_s: float = 60.0  # TorchServe's default_response_timeout
    # A client connection is cut off when it stays this long idle, in one request head or body, or not
    # taking its answers (a client that sends requests and never reads).
    idle_timeout_s: float = 60.0
    source_token_file: str | None = None  # tokens that may also set X-Request-Source
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # client connections at once; more get a 503
    rollout_file: str | None = None  # names a challenger (serving/rollout_router.py); None: never one
    unbatched_models: dict[str, str] = field(default_factory=dict)  # model -> its batch-1 twin (unbatched_route.py)


class _Clock:
    """One client connection as the watchdog and a graceful stop see it: what it waits for, since when."""

    __slots__ = ("phase", "since", "writer", "upstream", "task")

    def __init__(self, writer: asyncio.StreamWriter, upstream: Upstream, task: asyncio.Task):
        self.phase, self.since, self.writer, self.upstream, self.task = "client", time.monotonic(), writer, upstream, task

    def waiting(self, phase: str) -> None:
        """``client`` (the next request), ``body`` (the rest of one), ``upstream`` (TorchServe), ``send`` (the
        client to take an answer), ``linger`` (the client to close after a closing answer) or ``busy``."""
        self.phase, self.since = phase, time.monotonic()


class _Reply(Exception):
    """An answer from the proxy itself (refusals, errors), raised from deep in a request's handling."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


def _connections_within_open_files(max_connections: int) -> int:
    """``max_connections``, or fewer when the open-file limit cannot be raised far enough (said on stdout)."""
    per_connection, spare = 3, 64  # a client and a TorchServe connection each, and refusals of the surplus
    needed = per_connection * max_connections + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target >= needed:
        return max_connections
    fitting = max(1, (target - spare) // per_connection)
    print(f"[auth-proxy] --max-connections {max_connections} needs {needed} open files but the limit is {hard}: "
          f"serving at most {fitting} connections at once (raise the limit, ulimit -n, for more)", flush=True)
    return fitting


class AuthProxyServer:
    """The proxy: one asyncio event loop on one thread, one keep-alive upstream connection per client connection.

    One thread and no locks; time-outs come from one watchdog rather than a timer per read. The listening
    socket is bound here, so a taken port fails at construction; ``serve_forever`` / ``shutdown`` /
    ``server_close`` behave as ``socketserver``'s.
    """

    def __init__(self, listen: tuple[str, int], config: ProxyConfig):
        upstream = urlsplit(config.upstream)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"--upstream must be http://HOST:PORT (TorchServe on loopback), got {config.upstream!r}")
        if config.max_connections < 1:
            raise ValueError(f"--max-connections must be at least 1, got {config.max_connections}")
        self.config = config
        self.upstream_host, self.upstream_port = upstream.hostname, upstream.port or 80
        self.tokens = ClientTokens(config.token_file)
        self.source_tokens = None if config.source_token_file is None else ClientTokens(
            config.source_token_file, what="source token file", secret=names.SERVING_SOURCE_TOKEN_SECRET)
        self.pod_key = PodKey(config.key_file)
        self.rollout = None if config.rollout_file is None else RolloutRouter(config.rollout_file,
                                                                             config.upstream_timeout_s)
        self.routes = PredictionRoutes(config.unbatched_models)
        self.max_connections = _connections_within_open_files(config.max_connections)
        self.socket = socket.create_server(listen, backlog=128, reuse_port=False)
        self.server_port = self.socket.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running, self._finished, self._shutdown_requested = threading.Event(), threading.Event(), threading.Event()
        self._grace_s = 10.0
        self._clocks: set[_Clock] = set()  # one per open client connection
        self._refusing = 0  # connections over the cap being answered 503
        self._busy_logged_at = 0.0

    # -- lifecycle (socketserver's names, so callers and tests treat it like one)
    def serve_forever(self, poll_interval: float = 0.5) -> None:  # poll_interval: socketserver's; unused
        self._finished.clear()
        self._running.set()
        try:
            run_event_loop(self._serve())
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
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=READ_SIZE)
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._stop.wait()
        finally:
            watchdog.cancel()
            server.close()  # no new connections
            if self.rollout is not None:
                await self.rollout.close()  # mirrored copies still queued are dropped
            deadline = time.monotonic() + self._grace_s
            while any(c.phase not in ("client", "linger") for c in self._clocks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # requests in flight finish; idle connections are not waited for
            tasks = [c.task for c in self._clocks]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop = None

    async def _watchdog(self) -> None:
        """Time-outs for every connection from one loop: cheaper than a timer per read on the request path.

        A client idle, sending one head or body, or not taking its answer longer than ``idle_timeout_s``
        is disconnected, as is one still sending ``LINGER_S`` after a closing answer; an answer from
        TorchServe that takes longer than ``upstream_timeout_s`` is given up (the client gets a 502).
        """
        config = self.config
        period = min(1.0, config.idle_timeout_s / 4, config.upstream_timeout_s / 4, LINGER_S / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for clock in list(self._clocks):
                waited, phase = now - clock.since, clock.phase
                if phase == "upstream":
                    if waited > config.upstream_timeout_s:
                        clock.upstream.abort_slow_answer()
                elif phase in ("client", "body", "send") and waited > config.idle_timeout_s or \
                        phase == "linger" and waited > LINGER_S:
                    clock.writer.transport.abort()  # not close(): that would wait for unread answers forever

    # -- one client connection: requests one after the other (HTTP/1.1 keep-alive, pipelining)
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clocks) >= self.max_connections:
            await self._refuse_busy(reader, writer)
            return
        no_delay(writer)
        upstream = Upstream(self.upstream_host, self.upstream_port)
        clock = _Clock(writer, upstream, asyncio.current_task())
        self._clocks.add(clock)
        stream = RequestStream()
        try:
            while not self._stop.is_set():
                clock.waiting("client")
                while not stream.ready:  # requests already parsed (pipelined) are served first
                    data = await reader.read(READ_SIZE)
                    if not data:
                        return  # the client closed the connection, or the watchdog did
                    stream.feed(data)
                item = stream.ready.popleft()
                clock.waiting("busy")
                if isinstance(item, FramingError):
                    writer.write(self._response(item.status, item.message, close=True, what="a request"))
                    keep_open = False
                else:
                    keep_open = await self._request(item, stream, reader, writer, clock)
                if writer.transport.get_write_buffer_size():
                    clock.waiting("send")  # blocks while the client does not read; the watchdog ends that
                    await writer.drain()
                if not keep_open:
                    await self._close_gently(reader, writer, clock)
                    return
        except (ConnectionError, TimeoutError):
            pass  # the client went away mid-request: nobody to answer
        except asyncio.CancelledError:
            pass  # a shutdown ending an idle connection: the task ends here, quietly
        finally:
            upstream.close()
            writer.close()
            self._clocks.discard(clock)

    async def _close_gently(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, clock: _Clock) -> None:
        """After a closing answer: end the sending side, then read and drop what the client still sends until
        it closes (or ``LINGER_S`` passes), so its unread bytes do not make the kernel reset the connection
        before the client has read the answer."""
        clock.waiting("linger")
        if writer.can_write_eof():
            writer.write_eof()
        while await reader.read(READ_SIZE):
            pass

    async def _refuse_busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection over ``max_connections``: a 503 at once and a gentle close (at most ``LINGER_S``)."""
        self._refusing += 1
        try:
            now = time.monotonic()
            log = now - self._busy_logged_at > 1.0  # a line a second at most, whatever the flood
            if log:
                self._busy_logged_at = now
            limit = self.max_connections
            writer.write(self._response(503, f"the proxy serves at most {limit} connections at once (--max-connections): "
                                             "retry, or reuse a kept-alive connection", {"Retry-After": "1"},
                                        close=True, what="a connection" if log else ""))
            if self._refusing > limit:  # a flood: no time for lingering
                return
            writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await reader.read(READ_SIZE):
                    pass
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass  # the client is gone, is slow to close, or the proxy stops
        finally:
            self._refusing -= 1
            writer.transport.abort()

    async def _request(self, request: Request, stream: RequestStream, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, clock: _Clock) -> bool:
        """Answer one request; whether the connection may carry another."""
        keep_alive = request.keep_alive
        head_only = request.method == "HEAD"
        what = f"{request.method} {request.path[:200]}"
        try:
            answer = await self._answer(request, stream, reader, writer, clock)
        except _Reply as reply:
            keep_alive = keep_alive and not reply.close and not self._stop.is_set()
            writer.write(self._response(reply.status, reply.message, reply.headers, close=not keep_alive,
                                        head_only=head_only, keep_alive_1_0=request.version == "1.0", what=what))
            return keep_alive
        except (ConnectionError, TimeoutError):
            raise  # the client went away: nobody to answer
        except Exception:  # a bug here: the client still gets an answer, the log gets the traceback
            traceback.print_exc()
            writer.write(self._response(500, "the auth proxy failed on this request; its log has the details",
                                        close=True, head_only=head_only, what=what))
            return False
        keep_alive = keep_alive and not self._stop.is_set()
        writer.write(encode_response(answer.status, http.client.responses.get(answer.status, ""),
                                     answer.relayable_headers(_NOT_RELAYED), answer.body, close=not keep_alive,
                                     head_only=head_only, keep_alive_1_0=request.version == "1.0"))
        return keep_alive

    async def _answer(self, request: Request, stream: RequestStream, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, clock: _Clock) -> Response:
        config = self.config
        if request.method == "GET" and request.target == "/healthz":
            raise _Reply(200, "auth proxy up")
        length = request.content_length
        # Refuse before reading the body: unauthenticated or oversized requests cost nothing. A refusal
        # with a body unread closes the connection, so the body is never taken for a request.
        may_tag = self._authenticate(request, close=length > 0)
        if request.path == ROLLOUT_PATH:
            return self._rollout_evidence(request, may_tag)
        if (not any(request.method == method and pattern.fullmatch(request.path) for method, pattern in ROUTES)
                or self.routes.is_internal(request.path)):
            raise _Reply(404, f"{request.method} {request.path[:200]} is not served here: only GET /ping, "
                              "POST /predictions/<model> and POST /explanations/<model>", close=length > 0)
        if length > config.max_request_bytes:
            raise _Reply(413, f"request body of {length} bytes exceeds the limit of {config.max_request_bytes} bytes",
                         close=True)
        fields = forwardable_fields(request, FORWARDED_FIELDS)
        source = self._request_source(request, may_tag, close=length > 0)
        if source is not None:
            fields.append(("X-Request-Source", source))
        if request.expect_continue and length and not request.complete:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # checks passed: now the client may send the body
        if not request.complete:
            clock.waiting("body")  # a client that stops sending mid-body is cut off like an idle one
            while not request.complete:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ConnectionError("the client closed the connection mid-body")
                stream.feed(data)
            clock.waiting("busy")
        body = b"".join(request.body)
        if request.method == "POST" and any(is_form_content_type(v) for v in request.get_all("content-type")):
            # Authenticated and within the size limit: the body was read past, so the connection stays usable.
            raise _Reply(415, "form bodies (application/x-www-form-urlencoded, multipart/form-data) are not accepted: "
                              "send the image bytes (Content-Type image/png or image/jpeg) or JSON (application/json)")
        key = self.pod_key.get()
        if key is None:
            raise _Reply(503, "TorchServe has not written its key file yet (still starting)", {"Retry-After": "5"})
        if self.rollout is not None and request.method == "POST" and request.path.startswith("/predictions/"):
            answer = await self.rollout.answer(request.method, request.target, fields, body,
                                               lambda: self._forward(request, fields, body, key, clock))
        else:
            answer = await self._forward(request, fields, body, key, clock)
        if may_tag and answer.upstream_ms is not None:  # the pipeline's requests learn TorchServe's own time
            answer.headers.append(("Server-Timing", f"upstream;dur={answer.upstream_ms:.3f}"))
            answer.names.append("server-timing")
        return answer

    def _rollout_evidence(self, request: Request, may_tag: bool) -> Response:
        """``GET /rollout``: the challenger's evidence, for the pipeline's source token only."""
        close = request.content_length > 0
        if request.method != "GET":
            raise _Reply(405, f"{ROLLOUT_PATH} only answers GET", {"Allow": "GET"}, close=close)
        if not may_tag:
            raise _Reply(403, f"{ROLLOUT_PATH} needs the pipeline's source token "
                              f"(the Secret {names.SERVING_SOURCE_TOKEN_SECRET})", close=close)
        if self.rollout is None:
            raise _Reply(404, "this proxy was started without --rollout-file: it routes to no challenger",
                         close=close)
        if close:  # never leave a body unread on a kept-alive connection
            raise _Reply(400, f"GET {ROLLOUT_PATH} takes no body", close=True)
        return json_response(200, self.rollout.evidence())

    def _authenticate(self, request: Request, close: bool) -> bool:
        """Whether the request's token is a source token (may set X-Request-Source); a 401 or 400 when it has none."""
        values = request.get_all("authorization")
        if len(values) > 1:  # which one counts is where two parsers could disagree: nothing more from this client
            raise _Reply(400, f"{len(values)} Authorization headers: send one", close=True)
        header = values[0] if values else ""
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        if scheme.lower() == "bearer" and presented:
            client = self.tokens.accepts(presented)
            source = self.source_tokens is not None and self.source_tokens.accepts(presented)
            if client or source:
                return source
        why = "missing" if not header else "invalid"
        raise _Reply(401, f"{why} bearer token: send 'Authorization: Bearer <token>' with a token from the "
                          f"Secret {names.SERVING_TOKEN_SECRET}", {"WWW-Authenticate": 'Bearer realm="kfp-mlops"'},
                     close=close)

    @staticmethod
    def _request_source(request: Request, may_tag: bool, close: bool) -> str | None:
        """The X-Request-Source to forward: a source token's, checked; never a client token's (dropped)."""
        values = request.get_all(SOURCE_FIELD)
        if not may_tag or not values or SOURCE_FIELD in request.connection_tokens():
            return None
        if len(values) > 1 or not SOURCE_VALUE.fullmatch(values[0]):
            raise _Reply(400, f"X-Request-Source must be one short name of a-z, 0-9 and '-' (e.g. 'replay'), got "
                              f"{', '.join(values)[:60]!r}", close=close)
        return values[0]

    async def _forward(self, request: Request, fields: list[tuple[str, str]], body: bytes, key: str,
                       clock: _Clock) -> Response:
        upstream, timeout_s, routes = clock.upstream, self.config.upstream_timeout_s, self.routes
        target = routes.target(request.method, request.path, request.target)

        def encoded(pod_key: str, target: str = target) -> bytes:
            return encode_request(request.method, target, upstream.host_field,
                                  [*fields, ("Authorization", f"Bearer {pod_key}")], body)

        clock.waiting("upstream")
        started = time.perf_counter()
        routes.in_flight += 1
        try:
            answer = await upstream.exchange(encoded(key), timeout_s)
            if answer.status in (400, 401, 403) and b"Token Auth" in answer.body:
                # TorchServe refused the pod key (it answers 400 "Token Authorization failed ..."): the
                # readiness probe renewed it since it was read. Re-read the key file and try once more.
                fresh = self.pod_key.get(force=True)
                if fresh is not None and fresh != key:
                    key = fresh
                    answer = await upstream.exchange(encoded(fresh), timeout_s)
            if answer.status in (404, 503) and target != request.target:
                # The twin is not registered or has no worker now (TorchServe restarts a dead one): the batched
                # model answers instead; the request reached no handler, so it is logged once.
                answer = await upstream.exchange(encoded(key, request.target), timeout_s)
        except (OSError, httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            upstream.close()
            raise _Reply(502, f"TorchServe did not answer on loopback ({type(err).__name__}: {err}); "
                              "the pod is restarting it or it is overloaded") from None
        finally:
            routes.in_flight -= 1
            clock.waiting("busy")
        answer.upstream_ms = (time.perf_counter() - started) * 1000
        return answer

    @staticmethod
    def _response(status: int, message: str, headers: dict[str, str] | None = None, close: bool = False,
                  head_only: bool = False, keep_alive_1_0: bool = False, what: str = "") -> bytes:
        if status >= 400 and what:  # only failures; never headers (they hold tokens)
            print(f"[auth-proxy] {what} -> {status}: {message[:120]}", flush=True)
        reason = http.client.responses.get(status, "")
        body = json.dumps({"code": status, "type": reason, "message": message}).encode()
        fields = [*(headers or {}).items(), ("Content-Type", "application/json")]
        return encode_response(status, reason, fields, body, close=close, head_only=head_only,
                               keep_alive_1_0=keep_alive_1_0)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.auth_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, default=("0.0.0.0", 8080), help="HOST:PORT to serve clients on")
    parser.add_argument("--upstream", default="http://127.0.0.1:8079", help="TorchServe's inference API (loopback)")
    parser.add_argument("--key-file", default=names.TORCHSERVE_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--token-file", default=names.PROXY_TOKEN_FILE,
                        help="accepted client tokens, one per line (a mounted Secret)")
    parser.add_argument("--source-token-file", default=None,
                        help="tokens that are accepted and may also set X-Request-Source (the pipeline's smoke test "
                             "and replay), one per line; without it, X-Request-Source is dropped from every request")
    parser.add_argument("--max-request-bytes", type=int, default=ProxyConfig.max_request_bytes,
                        help="larger bodies get a 413 before they are read (TorchServe's max_request_size)")
    parser.add_argument("--upstream-timeout-s", type=float, default=ProxyConfig.upstream_timeout_s,
                        help="give up on an answer from TorchServe after this long (the client gets a 502)")
    parser.add_argument("--idle-timeout-s", type=float, default=ProxyConfig.idle_timeout_s,
                        help="cut off a client idle, sending one request, or not reading its answers this long")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="client connections served at once; one more gets a 503 and is closed")
    parser.add_argument("--rollout-file", default=None,
                        help="a JSON file naming a challenger for shadow or canary traffic, re-read when it changes "
                             "(absent or {} = none; serving/rollout_router.py); GET /rollout then answers the "
                             "evidence, for a source token")
    parser.add_argument("--unbatched-model", action="append", default=[], metavar="MODEL=TWIN",
                        help="a prediction for MODEL that finds no request in flight goes to TWIN, the same model "
                             "registered with batches of one (serving/unbatched_route.py); repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        unbatched = dict(parse_route(text) for text in args.unbatched_model)
    except ValueError as err:
        parser.error(str(err))
    config = ProxyConfig(upstream=args.upstream, key_file=args.key_file, token_file=args.token_file,
                         max_request_bytes=args.max_request_bytes, upstream_timeout_s=args.upstream_timeout_s,
                         idle_timeout_s=args.idle_timeout_s, source_token_file=args.source_token_file,
                         max_connections=args.max_connections, rollout_file=args.rollout_file,
                         unbatched_models=unbatched)
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
