"""HTTP/1.1 for the auth proxy (``serving/auth_proxy.py``): requests parsed and checked, answers encoded,
and the keep-alive connection to TorchServe.

llhttp (the parser of Node.js, through ``httptools``) frames every request the proxy reads and every
answer TorchServe sends back, in its strict mode. It refuses bare LF or CR, obsolete line folding,
control characters other than HTAB in field values, field names that are not tokens (a space before
the colon included), Transfer-Encoding together with Content-Length, an empty or unknown
Transfer-Encoding, a Content-Length that is repeated, signed, non-ASCII or over 2**64, unknown
methods, and control characters, spaces or 8-bit bytes in the request target.

What llhttp lets pass and the proxy refuses on top (``RequestStream``): versions other than 1.0 and
1.1 (llhttp reads ``GET /`` as HTTP/0.9 and accepts ``HTTP/2.0``), request targets that are not a
plain path (absolute URI, ``*``, authority, a fragment), HTAB and non-ASCII bytes in field values,
a missing (HTTP/1.1) or repeated Host, any Transfer-Encoding, protocol upgrades, and heads over
``MAX_HEAD_BYTES`` or ``MAX_HEADERS`` (llhttp has no size limit of its own).

No head a client sent is forwarded as it came: ``encode_request`` writes a canonical request from the
checked parts (only the body passes as it came), and ``encode_response`` does the same for the answers.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate

import httptools

MAX_HEAD_BYTES = 64 * 1024  # request line plus header fields; more is a 431
MAX_HEADERS = 100
READ_SIZE = 64 * 1024  # bytes per read from a socket
SERVER_NAME = "kfp-mlops-auth-proxy"

# A field value as forwarded: visible ASCII and spaces only. RFC 9110 also allows HTAB and obs-text
# (bytes >= 0x80) inside values and llhttp passes both; TorchServe's Netty and the handler need neither.
_NOT_PLAIN_VALUE = re.compile(rb"[^\x20-\x7e]")
_NOT_PLAIN_VALUES = re.compile(rb"[^\x20-\x7e\n]")  # values joined by LF (which llhttp never lets into a value)
# origin-form (RFC 9112 3.2.1): an absolute path of RFC 3986 pchars, then an optional query.
_ORIGIN_FORM = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*(\?[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*)?")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade"})


class FramingError(Exception):
    """A request the proxy cannot take apart safely: it is answered ``status`` and the connection closes."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True, eq=False)
class Request:
    """One request as parsed and checked; ``target`` is the normalised path (and query) that is checked and forwarded."""

    method: str
    target: str
    path: str
    version: str  # "1.1" or "1.0"
    fields: dict[str, list[str]]  # lower-case name -> values in arrival order, stripped, plain ASCII
    content_length: int
    keep_alive: bool
    expect_continue: bool
    body: list[bytes]
    complete: bool = False  # the whole body has arrived

    def get_all(self, name: str) -> list[str]:
        return self.fields.get(name, ())

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for value in self.fields.get("connection", ()) for t in value.split(",")}


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: ``/a/./b/../c`` -> ``/a/c``; never climbs above ``/``."""
    if "." not in path:
        return path
    segments, kept = path.split("/")[1:], []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    trailing = "/" if segments[-1] in (".", "..") and kept else ""
    return "/" + "/".join(kept) + trailing


class RequestStream:
    """Bytes from one client connection in, ``Request`` objects (or one ``FramingError``) out, in order.

    Pipelined requests are parsed as their bytes arrive: ``ready`` holds what was parsed and not yet
    taken, and a request's body keeps filling in after its head was taken. After the first framing
    error nothing more is parsed: the connection is answered and closed at that point.
    """

    def __init__(self):
        self._parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request | FramingError] = deque()
        self.broken = False
        self._current: Request | None = None
        self._url = b""
        self._raw_fields: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_bytes_read = 0  # an upper bound on the bytes of a head still arriving

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        head_was_open = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            context = err.__context__
            self._fail(context if isinstance(context, FramingError) else FramingError(400, f"malformed request ({err})"))
            return
        except httptools.HttpParserError as err:
            self._fail(self._parse_error(err))
            return
        except httptools.HttpParserUpgrade:  # refused at the head already; never switch protocols
            self._fail(FramingError(400, "protocol upgrades are not supported: send plain HTTP/1.1 requests"))
            return
        if self._in_head:  # llhttp buffers a field until it ends: bound what an endless head can take
            self._head_bytes_read = self._head_bytes_read + len(data) if head_was_open else len(data)
            if self._head_bytes_read > MAX_HEAD_BYTES + READ_SIZE:
                self._fail(FramingError(431, f"request head over {MAX_HEAD_BYTES} bytes"))

    def _parse_error(self, err: Exception) -> FramingError:
        if self._parser.get_method() == b"PRI":  # "PRI * HTTP/2.0": the HTTP/2 connection preface
            return FramingError(505, "HTTP/2 is not spoken here: send HTTP/1.1")
        if "Content-Length" in str(err):
            return FramingError(400, f"invalid Content-Length ({err}): send one, in ASCII digits")
        return FramingError(400, f"malformed request ({err}): send 'METHOD /path HTTP/1.1', then 'Name: value' "
                                 "header lines, each line ending in CRLF")

    def _fail(self, error: FramingError) -> None:
        self.broken, self._in_head = True, False
        self.ready.append(error)

    # -- llhttp's callbacks: as little as possible per field; the checks run once per head
    def on_message_begin(self) -> None:
        self._url, self._raw_fields, self._in_head = b"", [], True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        request = self._checked_head()
        self._current = request
        self.ready.append(request)

    def on_body(self, data: bytes) -> None:
        self._current.body.append(data)

    def on_message_complete(self) -> None:
        self._current.complete = True

    def _checked_fields(self) -> dict[str, list[str]]:
        raw = self._raw_fields
        if len(raw) > MAX_HEADERS:
            raise FramingError(431, f"more than {MAX_HEADERS} header fields: at most {MAX_HEADERS} are accepted")
        names = b"\n".join([name for name, _ in raw])  # llhttp passes neither CR nor LF in names or values
        values = b"\n".join([value.strip(b" \t") for _, value in raw])
        if len(self._url) + len(names) + len(values) + 3 * len(raw) > MAX_HEAD_BYTES:
            raise FramingError(431, f"request head over {MAX_HEAD_BYTES} bytes")
        if not raw:
            return {}
        if _NOT_PLAIN_VALUES.search(values):
            name = next(name for name, value in raw if _NOT_PLAIN_VALUE.search(value.strip(b" \t")))
            raise FramingError(400, f"header field {name.decode('ascii')[:60]!r} holds a control or non-ASCII character")
        fields: dict[str, list[str]] = {}
        for name, value in zip(names.decode("ascii").lower().split("\n"), values.decode("ascii").split("\n")):
            if name in fields:
                fields[name].append(value)
            else:
                fields[name] = [value]
        return fields

    def _checked_head(self) -> Request:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise FramingError(505, f"HTTP/{version} is not supported: send HTTP/1.1")
        if parser.should_upgrade():  # Upgrade (h2c, websocket) or CONNECT: the bytes after it are not HTTP/1.1
            raise FramingError(400, "protocol upgrades and CONNECT are not supported: send plain HTTP/1.1 requests")
        fields = self._checked_fields()
        target = self._url.decode("ascii")  # llhttp refuses 8-bit bytes in the target
        if not _ORIGIN_FORM.fullmatch(target) or ("%" in target and _BAD_PERCENT.search(target)):
            raise FramingError(400, f"request target {target[:100]!r} is not a plain path: send e.g. "
                                    "'POST /predictions/<model>' (no scheme or host, no fragment)")
        hosts = fields.get("host", ())
        if len(hosts) != 1 and (hosts or version == "1.1"):
            raise FramingError(400, f"an HTTP/1.1 request needs exactly one Host header, got {len(hosts)}")
        if "transfer-encoding" in fields:  # the proxy would have to re-frame the body; TorchServe takes lengths
            raise FramingError(411, "send the body with a Content-Length (chunked uploads are not accepted)")
        length = 0
        if "content-length" in fields:
            text = fields["content-length"][0]  # llhttp refuses a repeated one
            if not (text.isdigit() and len(text.lstrip("0")) <= 18):  # ASCII already; llhttp checked it too
                raise FramingError(400, f"invalid Content-Length {text[:40]!r}")
            length = int(text)
        path, mark, query = target.partition("?")
        path = remove_dot_segments(path)
        if "connection" in fields:
            tokens = {t.strip().lower() for value in fields["connection"] for t in value.split(",")}
            keep_alive = "keep-alive" in tokens if version == "1.0" else "close" not in tokens
        else:
            keep_alive = version == "1.1"
        expect_continue = version == "1.1" and "expect" in fields and any(v.lower() == "100-continue"
                                                                          for v in fields["expect"])  # never to 1.0
        return Request(parser.get_method().decode("ascii"), path + mark + query, path, version, fields, length,
                       keep_alive, expect_continue, [])


def forwardable_fields(request: Request, allowed: dict[str, str]) -> list[tuple[str, str]]:
    """``(canonical name, last value)`` of the fields in ``allowed`` (lower-case -> canonical), less
    any the client named in ``Connection`` (hop-by-hop for this connection only, RFC 9110 7.6.1)."""
    named = request.connection_tokens() if "connection" in request.fields else ()
    return [(canonical, request.fields[name][-1]) for name, canonical in allowed.items()
            if name in request.fields and name not in named]


def encode_request(method: str, target: str, host: str, fields: list[tuple[str, str]], body: bytes) -> bytes:
    """A canonical HTTP/1.1 request: one Host, ``fields`` (already checked), the proxy's Content-Length."""
    head = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n", *(f"{name}: {value}\r\n" for name, value in fields),
            f"Content-Length: {len(body)}\r\n\r\n"]
    return "".join(head).encode("ascii") + body


def encode_response(status: int, reason: str, fields: list[tuple[str, str]], body: bytes, close: bool,
                    head_only: bool = False, keep_alive_1_0: bool = False) -> bytes:
    """One HTTP/1.1 response in one buffer (one write): the proxy's Server and Date, ``fields``, the length."""
    lines = [f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nDate: {_http_date()}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in fields]
    if close:  # tell the client, so it does not send its next request on this connection
        lines.append("Connection: close\r\n")
    elif keep_alive_1_0:  # an HTTP/1.0 client takes the connection as closing unless told otherwise
        lines.append("Connection: keep-alive\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("latin-1") + (b"" if head_only else body)


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class _AfterTheAnswer(Exception):
    """Stops llhttp at bytes that follow a complete answer."""


class Response:
    """TorchServe's answer to one request."""

    __slots__ = ("status", "raw_headers", "headers", "names", "body_parts", "complete", "http_1_1", "trailing_bytes",
                 "upstream_ms")

    def __init__(self):
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: list[tuple[str, str]] = []  # as sent, values stripped
        self.names: list[str] = []  # lower-case, one per header
        self.body_parts: list[bytes] = []
        self.complete = self.http_1_1 = self.trailing_bytes = False
        self.upstream_ms: float | None = None  # how long the proxy waited for it (set by the proxy)

    @property
    def body(self) -> bytes:
        return b"".join(self.body_parts)

    def _connection_tokens(self) -> set[str]:
        return {token.strip().lower() for (_, value), name in zip(self.headers, self.names) if name == "connection"
                for token in value.split(",")}

    @property
    def keep_alive(self) -> bool:
        """Whether the connection may carry the next request."""
        if not self.http_1_1 or self.trailing_bytes:
            return False
        return "connection" not in self.names or "close" not in self._connection_tokens()

    def relayable_headers(self, dropped: frozenset[str]) -> list[tuple[str, str]]:
        """The answer's fields a client may see: no hop-by-hop ones (nor those named in Connection), none in ``dropped``."""
        excluded = _HOP_BY_HOP | dropped
        if "connection" in self.names:
            excluded |= self._connection_tokens()
        return [header for header, name in zip(self.headers, self.names) if name not in excluded]

    def has(self, name: str) -> bool:
        return name in self.names

    def drop(self, name: str) -> list[str]:
        """Remove every field ``name`` (lower-case); their values."""
        values = [value for (_, value), n in zip(self.headers, self.names) if n == name]
        if values:
            kept = [(header, n) for header, n in zip(self.headers, self.names) if n != name]
            self.headers, self.names = [h for h, _ in kept], [n for _, n in kept]
        return values


class ResponseStream:
    """TorchServe's answers on one keep-alive connection, framed by llhttp (Content-Length, chunked, or until
    the connection closes). ``begin`` before each request; 1xx interim answers are skipped."""

    def __init__(self):
        self._parser = httptools.HttpResponseParser(self)
        self.answer = Response()

    def begin(self) -> Response:
        self.answer = Response()
        return self.answer

    def feed(self, data: bytes) -> None:
        """Raises ``httptools.HttpParserError`` on an answer llhttp cannot frame (``HttpParserUpgrade`` on a 101)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:
            if not isinstance(err.__context__, _AfterTheAnswer):
                raise

    def feed_eof(self) -> bool:
        """The connection closed: whether that ended the answer (one framed by the close itself)."""
        answer = self.answer
        if answer.status >= 200 and not answer.complete and answer.status not in (204, 304) \
                and not answer.has("content-length") and not answer.has("transfer-encoding"):
            answer.complete, answer.http_1_1 = True, False
        return answer.complete

    def on_message_begin(self) -> None:
        answer = self.answer
        if answer.complete:  # bytes after the answer: the connection is out of step, never reuse it
            answer.trailing_bytes = True
            raise _AfterTheAnswer
        answer.raw_headers, answer.body_parts = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answer.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser, answer = self._parser, self.answer
        answer.status = parser.get_status_code()
        answer.http_1_1 = parser.get_http_version() == "1.1"
        raw = answer.raw_headers
        if raw:  # decoded in one go: llhttp lets no LF into names or values
            names = b"\n".join([name for name, _ in raw]).decode("latin-1")
            values = b"\n".join([value.strip(b" \t") for _, value in raw]).decode("latin-1")
            answer.headers = list(zip(names.split("\n"), values.split("\n")))
            answer.names = names.lower().split("\n")

    def on_body(self, data: bytes) -> None:
        self.answer.body_parts.append(data)

    def on_message_complete(self) -> None:
        if self.answer.status >= 200:  # an interim 1xx answer: the final one follows
            self.answer.complete = True


def no_delay(writer: asyncio.StreamWriter) -> None:
    # Each response goes out in one write, but without TCP_NODELAY a request or response that
    # follows a small one can wait for the peer's delayed ACK (~40 ms on Linux).
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamClosed(ConnectionError):
    """TorchServe closed the connection before its answer was complete."""


class Upstream:
    """One keep-alive HTTP/1.1 connection to TorchServe, owned by one client connection (no sharing, no lock)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.host_field = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: ResponseStream | None = None
        self.timed_out = False
        self._answer_started = False

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._answers = None

    def abort_slow_answer(self) -> None:
        """Called by the proxy's watchdog: the answer took too long; the waiting exchange raises TimeoutError."""
        self.timed_out = True
        self.close()

    async def exchange(self, request: bytes, timeout_s: float) -> Response:
        """TorchServe's answer to ``request`` (one encoded request); a kept-alive connection that TorchServe
        had closed before answering is retried once on a fresh one. OSError (incl. timeouts) or
        ``httptools.HttpParserError`` when it cannot."""
        self.timed_out = False
        for attempt in (1, 2):
            reused = self._writer is not None
            self._answer_started = False
            try:
                if self._writer is None:
                    async with asyncio.timeout(timeout_s):  # once per client connection, not per request
                        self._reader, self._writer = await asyncio.open_connection(self.host, self.port,
                                                                                    limit=READ_SIZE)
                    no_delay(self._writer)
                    self._answers = ResponseStream()
                return await self._once(request)
            except ConnectionError as err:
                self.close()
                if self.timed_out:
                    raise TimeoutError(f"no answer within {timeout_s:g} s") from None
                if reused and attempt == 1 and not self._answer_started:
                    continue  # TorchServe had closed the idle connection: once more on a fresh one
                raise UpstreamClosed(f"connection closed ({type(err).__name__})") from None
            except BaseException:
                self.close()  # a half-read answer must not be taken for the next one
                raise
        raise AssertionError("unreachable")

    async def _once(self, request: bytes) -> Response:
        reader, writer, answers = self._reader, self._writer, self._answers
        writer.write(request)
        await writer.drain()
        answer = answers.begin()
        while not answer.complete:
            data = await reader.read(READ_SIZE)
            if not data:
                if answers.feed_eof():
                    break
                raise UpstreamClosed("closed before the end of the answer")
            self._answer_started = True
            answers.feed(data)
        if not answer.keep_alive:
            self.close()
        return answer
