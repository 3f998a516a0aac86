"""Crafted requests against the serving pods' auth proxy (serving/auth_proxy.py), as raw bytes over a socket.

For every row of ``ROWS``:

* the client gets complete HTTP answers with the expected statuses, and never a reset;
* nothing reaches TorchServe in a form a strict HTTP/1.1 parser would refuse. The upstream here
  records the raw bytes of each of its connections and frames requests as leniently as TorchServe's
  Netty 4.1 does (a bare LF ends a line), so a smuggled second request shows up as one. Each recorded
  stream is then read by ``strict_requests`` (RFC 9112, written for this test, stricter than the RFC
  where the proxy promises more) and by h11, and the requests both find must be the ones the row
  expects, in order.

Then the abusive clients: one that sends requests and never reads the answers, and one connection
too many.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import h11
import pytest
import requests

from serving.auth_proxy import AuthProxyServer, ProxyConfig

TOKEN = b"client-token-0123456789abcdef"
SOURCE_TOKEN = b"source-token-0123456789abcdef"
POD_KEY = "pod-key-1"
MAX_BODY = 4096

HOST = b"Host: serving.example\r\n"
AUTH = b"Authorization: Bearer " + TOKEN + b"\r\n"
SOURCE_AUTH = b"Authorization: Bearer " + SOURCE_TOKEN + b"\r\n"
SMUGGLED = b"GET /api-description HTTP/1.1\r\nHost: x\r\n\r\n"
# What may reach TorchServe: the proxy's own fields and the allow-listed end-to-end ones.
FORWARDABLE = {"host", "content-length", "authorization", "content-type", "accept", "user-agent", "x-request-id",
               "traceparent", "tracestate", "x-top-k", "x-target", "x-request-source"}


def post(target: bytes = b"/predictions/digits", extra: bytes = b"", body: bytes = b"abc", auth: bytes = AUTH,
         version: bytes = b"HTTP/1.1", length: bool = True) -> bytes:
    content_length = b"Content-Length: %d\r\n" % len(body) if length else b""
    return b"POST " + target + b" " + version + b"\r\n" + HOST + auth + extra + content_length + b"\r\n" + body


def get(target: bytes = b"/ping", extra: bytes = b"", auth: bytes = AUTH, version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + HOST + auth + extra + b"\r\n"


@dataclass
class Row:
    id: str
    parts: list[bytes | float]  # written one by one; a float is a pause in seconds
    statuses: list[int]  # every answer the client must get, interim ones included, in order
    forwarded: list[str] = field(default_factory=list)  # request targets TorchServe must get, in order
    source: str | None = None  # the X-Request-Source TorchServe may get (a source token's)
    absent: tuple[str, ...] = ()  # fields that must not reach TorchServe although allow-listed


P, PRED = "/ping", "/predictions/digits"
ROWS = [
    # -- smuggling through header values: llhttp refuses bare LF/CR and control characters, the proxy HTAB and 8-bit
    Row("lf-in-value-smuggles-a-second-request",
        [b"GET /ping HTTP/1.1\r\n" + HOST + AUTH + b"X-A: a\nContent-Length: 0\n\n" + SMUGGLED], [400]),
    Row("lf-in-value-of-a-post", [post(extra=b"X-A: a\nContent-Length: 0\n\nGET /api-description HTTP/1.1\r\n")], [400]),
    Row("cr-in-value", [get(extra=b"X-A: a\rContent-Length: 5\r\n")], [400]),
    Row("crcr-at-line-end", [get(extra=b"X-A: a\r\r\n")], [400]),
    Row("lf-only-line-ends", [b"GET /ping HTTP/1.1\nHost: x\n" + AUTH.replace(b"\r\n", b"\n") + b"\n"], [400]),
    Row("nul-in-value", [get(extra=b"X-A: a\x00b\r\n")], [400]),
    Row("vt-in-value", [get(extra=b"X-A: a\x0bb\r\n")], [400]),
    Row("ff-in-value", [get(extra=b"X-A: a\x0cb\r\n")], [400]),
    Row("tab-inside-value", [get(extra=b"Content-Type: image/png\tx\r\n")], [400]),
    Row("del-in-value", [get(extra=b"X-A: a\x7fb\r\n")], [400]),
    Row("esc-in-value", [get(extra=b"X-A: \x1b[31m\r\n")], [400]),
    Row("non-ascii-in-value", [get(extra=b"X-A: caf\xc3\xa9\r\n")], [400]),
    Row("nul-in-name", [get(extra=b"X-\x00A: a\r\n")], [400]),
    Row("tab-in-name", [get(extra=b"X\tA: a\r\n")], [400]),
    Row("space-before-colon", [post(extra=b"Content-Length : 50\r\n")], [400]),
    Row("te-with-space-before-colon", [post(extra=b"Transfer-Encoding : chunked\r\n")], [400]),
    Row("empty-field-name", [get(extra=b": a\r\n")], [400]),
    Row("line-without-colon", [get(extra=b"GET /api-description HTTP/1.1\r\n")], [400]),
    Row("obs-fold", [get(extra=b"X-A: a\r\n b\r\n")], [400]),
    Row("obs-fold-continuing-content-length", [post(extra=b"X-A: 1\r\n Content-Length: 40\r\n")], [400]),
    Row("space-before-first-field", [b"GET /ping HTTP/1.1\r\n " + HOST + AUTH + b"\r\n"], [400]),
    # -- Transfer-Encoding: refused whatever its form (411), or by llhttp when malformed (400)
    Row("cl-te", [post(extra=b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\nG")], [400]),
    Row("te-cl", [b"POST /predictions/digits HTTP/1.1\r\n" + HOST + AUTH +
                  b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"], [400]),
    Row("te-chunked", [post(extra=b"Transfer-Encoding: chunked\r\n", body=b"3\r\nabc\r\n0\r\n\r\n", length=False)],
        [411]),
    Row("te-empty-then-chunked", [post(extra=b"Transfer-Encoding: \r\nTransfer-Encoding: chunked\r\n",
                                       body=b"0\r\n\r\n", length=False)], [400]),
    Row("te-chunked-identity", [post(extra=b"Transfer-Encoding: chunked, identity\r\n", length=False)], [400]),
    Row("te-identity", [post(extra=b"Transfer-Encoding: identity\r\n", length=False)], [411]),
    Row("te-xchunked", [post(extra=b"Transfer-Encoding: xchunked\r\n", length=False)], [411]),
    Row("te-upper-case", [post(extra=b"Transfer-Encoding: CHUNKED\r\n", body=b"0\r\n\r\n", length=False)], [411]),
    Row("te-tab-before-value", [post(extra=b"Transfer-Encoding:\tchunked\r\n", body=b"0\r\n\r\n", length=False)],
        [411]),
    Row("te-twice", [post(extra=b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", body=b"0\r\n\r\n",
                          length=False)], [400]),
    Row("te-in-http-1.0", [post(extra=b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\n", length=False,
                                version=b"HTTP/1.0")], [411]),
    Row("te-look-alike-is-dropped", [post(extra=b"Transfer_Encoding: chunked\r\n")], [200], [PRED]),
    # -- Content-Length
    Row("cl-superscript-two", [post(length=False, extra="Content-Length: ²\r\n".encode(), body=b"ab")], [400]),
    Row("cl-superscript-two-latin-1", [post(length=False, extra=b"Content-Length: \xb2\r\n", body=b"ab")], [400]),
    Row("cl-arabic-indic-digit", [post(length=False, extra="Content-Length: ٣\r\n".encode())], [400]),
    Row("cl-fullwidth-digit", [post(length=False, extra="Content-Length: ３\r\n".encode())], [400]),
    Row("cl-5000-digits", [post(length=False, extra=b"Content-Length: " + b"9" * 5000 + b"\r\n")], [400]),
    Row("cl-20-digits", [post(length=False, extra=b"Content-Length: 99999999999999999999\r\n")], [400]),
    Row("cl-negative", [post(length=False, extra=b"Content-Length: -3\r\n")], [400]),
    Row("cl-plus-sign", [post(length=False, extra=b"Content-Length: +3\r\n")], [400]),
    Row("cl-hex", [post(length=False, extra=b"Content-Length: 0x3\r\n")], [400]),
    Row("cl-two-different", [post(extra=b"Content-Length: 0\r\n")], [400]),
    Row("cl-two-equal", [post(extra=b"Content-Length: 3\r\n")], [400]),
    Row("cl-list", [post(length=False, extra=b"Content-Length: 3, 3\r\n")], [400]),
    Row("cl-leading-zeros", [post(length=False, extra=b"Content-Length: 0003\r\n")], [200], [PRED]),
    Row("cl-trailing-space", [post(length=False, extra=b"Content-Length: 3 \r\n")], [200], [PRED]),
    Row("cl-over-the-limit", [post(length=False, extra=b"Content-Length: %d\r\n" % (MAX_BODY + 1), body=b"")], [413]),
    Row("cl-huge", [post(length=False, extra=b"Content-Length: 999999999999999\r\n", body=b"x" * 100)], [413]),
    # -- Host
    Row("host-missing", [b"GET /ping HTTP/1.1\r\n" + AUTH + b"\r\n"], [400]),
    Row("host-twice", [get(extra=b"Host: evil.example\r\n")], [400]),
    Row("host-missing-in-http-1.0", [b"GET /ping HTTP/1.0\r\n" + AUTH + b"\r\n"], [200], [P]),
    # -- request targets: origin-form only; dot segments removed before the route check, on what is forwarded
    Row("target-nul", [get(b"/predictions/digits\x00")], [400]),
    Row("target-dot-dot", [post(b"/predictions/../api-description")], [404]),
    Row("target-dot-dot-twice", [post(b"/predictions/digits/../../models")], [404]),
    Row("target-encoded-dot-dot", [post(b"/%2e%2e/api-description")], [404]),
    Row("target-encoded-dot-dot-in-model", [post(b"/predictions/%2e%2e/models")], [404]),
    Row("target-bad-percent", [post(b"/predictions/digits%zz")], [400]),
    Row("target-dot-segment", [post(b"/predictions/./digits")], [200], [PRED]),
    Row("target-query-kept", [get(b"/ping?x=1")], [200], ["/ping?x=1"]),
    Row("target-absolute-form", [post(b"http://evil.example/predictions/digits")], [400]),
    Row("target-asterisk", [b"OPTIONS * HTTP/1.1\r\n" + HOST + AUTH + b"\r\n"], [400]),
    Row("target-fragment", [post(b"/predictions/digits#frag")], [400]),
    Row("target-tab", [post(b"/predictions/digits\t")], [400]),
    Row("target-8-bit", [post(b"/predictions/d\xc3\xafgits")], [400]),
    Row("target-backslash", [post(b"/predictions\\..\\models")], [400]),
    Row("target-double-slash", [post(b"//predictions/digits")], [404]),
    Row("target-connect-authority", [b"CONNECT 127.0.0.1:8079 HTTP/1.1\r\n" + HOST + AUTH + b"\r\n"], [400]),
    # -- versions and methods
    Row("http-0.9", [b"GET /ping\r\n\r\n"], [505]),  # llhttp waits for the empty line before it knows
    Row("http-2-preface", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], [505]),
    Row("http-2.0-request-line", [get(version=b"HTTP/2.0")], [505]),
    Row("http-1.2", [get(version=b"HTTP/1.2")], [400]),
    Row("lower-case-method", [b"get /ping HTTP/1.1\r\n" + HOST + AUTH + b"\r\n"], [400]),
    Row("unknown-method", [b"FOO /ping HTTP/1.1\r\n" + HOST + AUTH + b"\r\n"], [400]),
    Row("two-spaces-in-request-line", [b"GET  /ping HTTP/1.1\r\n" + HOST + AUTH + b"\r\n"], [200], [P]),
    Row("upgrade-websocket", [get(extra=b"Connection: Upgrade\r\nUpgrade: websocket\r\n")], [400]),
    Row("upgrade-without-connection-is-dropped", [get(extra=b"Upgrade: h2c\r\n")], [200], [P]),
    # -- fields: hop-by-hop ones and those named in Connection dropped, the rest allow-listed
    Row("connection-names-a-field", [post(extra=b"Connection: X-Top-K\r\nX-Top-K: 3\r\n")], [200], [PRED],
        absent=("x-top-k",)),
    Row("hop-by-hop-fields", [post(extra=b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X\r\nProxy-Connection: "
                                         b"x\r\nProxy-Authorization: Basic eA==\r\n")], [200], [PRED]),
    Row("other-fields-dropped", [post(extra=b"Cookie: a=b\r\nX-Forwarded-For: 1.2.3.4\r\nexplain: True\r\n")],
        [200], [PRED]),
    Row("client-request-source-dropped", [post(extra=b"X-Request-Source: replay\r\n")], [200], [PRED]),
    Row("source-token-request-source", [post(extra=b"X-Request-Source: replay\r\n", auth=SOURCE_AUTH)], [200], [PRED],
        source="replay"),
    Row("source-token-bad-request-source", [post(extra=b"X-Request-Source: Replay!\r\n", auth=SOURCE_AUTH)], [400]),
    Row("source-token-two-request-sources",
        [post(extra=b"X-Request-Source: replay\r\nX-Request-Source: smoke-test\r\n", auth=SOURCE_AUTH)], [400]),
    Row("source-named-in-connection", [post(extra=b"Connection: X-Request-Source\r\nX-Request-Source: replay\r\n",
                                            auth=SOURCE_AUTH)], [200], [PRED]),
    Row("authorization-twice", [post(extra=b"Authorization: Bearer wrong-token-0123456789\r\n")], [400]),
    Row("authorization-twice-same", [get(extra=AUTH)], [400]),
    Row("too-many-fields", [get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(101)))], [431]),
    Row("huge-field", [get(extra=b"X-Big: " + b"a" * 70_000 + b"\r\n")], [431]),
    Row("leading-empty-line", [b"\r\n" + get()], [200], [P]),
    Row("get-with-a-body", [b"GET /ping HTTP/1.1\r\n" + HOST + AUTH + b"Content-Length: 3\r\n\r\nabc"], [200], [P]),
    # -- connections: pipelining, split writes, 100-continue, HTTP/1.0
    Row("pipelined-two", [get() + get()], [200, 200], [P, P]),
    Row("pipelined-mixed", [get() + post(body=b"12345") + get(b"/ping?n=3")], [200, 200, 200], [P, PRED, "/ping?n=3"]),
    Row("pipelined-then-smuggle", [get() + b"GET /ping HTTP/1.1\r\n" + HOST + AUTH + b"X-A: a\nX: b\r\n\r\n"],
        [200, 400], [P]),
    Row("pipelined-unauthenticated-first", [get(auth=b"") + get()], [401, 200], [P]),
    Row("pipelined-after-oversize", [post(length=False, extra=b"Content-Length: 5000\r\n", body=b"") + get()], [413]),
    Row("pipelined-form-then-valid", [post(extra=b"Content-Type: application/x-www-form-urlencoded\r\n") + post()],
        [415, 200], [PRED]),
    Row("one-byte-writes", [bytes([b]) for b in post(body=b"hello")], [200], [PRED]),
    Row("split-inside-crlf", [get()[:20], 0.05, get()[20:]], [200], [P]),
    Row("split-between-head-and-body", [post(body=b"x" * 1000)[:-1000], 0.1, b"x" * 1000], [200], [PRED]),
    Row("expect-100-continue", [post(extra=b"Expect: 100-continue\r\n", body=b"abcd")[:-4], 0.3, b"abcd"], [100, 200],
        [PRED]),
    Row("expect-100-continue-unauthenticated", [post(extra=b"Expect: 100-continue\r\n", auth=b"")[:-3]], [401]),
    Row("expect-100-continue-oversize", [post(length=False, body=b"",
                                              extra=b"Expect: 100-continue\r\nContent-Length: 9999\r\n")], [413]),
    Row("http-1.0-keep-alive", [get(version=b"HTTP/1.0", extra=b"Connection: keep-alive\r\n") * 2], [200, 200], [P, P]),
    Row("http-1.0-closes", [get(version=b"HTTP/1.0") + get()], [200], [P]),
    Row("connection-close-then-more", [get(extra=b"Connection: close\r\n") + SMUGGLED], [200], [P]),
]


# ----------------------------------------------------------------------------- the recording upstream

class RecordingUpstream:
    """A stand-in for TorchServe's frontend: records every byte of every connection, frames requests leniently."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.streams: list[bytearray] = []  # one per connection, in the order they were opened
        self.lenient_targets: list[bytes] = []  # what a lenient server took for requests
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            stream = bytearray()
            self.streams.append(stream)
            thread = threading.Thread(target=self._serve, args=(conn, stream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, stream: bytearray) -> None:
        buffer = b""
        with conn:
            while True:
                while not (end := re.search(rb"\r?\n\r?\n", buffer)):  # a bare LF ends a line here, as in Netty
                    data = conn.recv(65536)
                    if not data:
                        return
                    stream.extend(data)
                    buffer += data
                head, buffer = buffer[:end.start()], buffer[end.end():]
                lines = re.split(rb"\r?\n", head)
                fields = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    fields[name.strip().lower()] = value.strip()
                length = int(fields.get(b"content-length", b"0")) if fields.get(b"content-length", b"0").isdigit() else 0
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    stream.extend(data)
                    buffer += data
                body, buffer = buffer[:length], buffer[length:]
                target = (lines[0].split(b" ") + [b"", b""])[1]
                self.lenient_targets.append(target)
                answer = json.dumps({"path": target.decode("latin-1"), "bytes": len(body)}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))

    def close(self) -> None:
        self._listener.close()


# ----------------------------------------------------------------------------- the two judges of what arrived

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.1")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"):[ ]?([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?[ ]?")


def strict_requests(stream: bytes, source: str | None) -> list[tuple[str, dict[str, list[str]], bytes]]:
    """``(target, fields, body)`` of each request in ``stream`` as RFC 9112 frames them; an AssertionError at
    the first thing a strict parser would refuse, or that the proxy promises never to forward."""
    found, position = [], 0
    while position < len(stream):
        end = stream.find(b"\r\n\r\n", position)
        assert end >= 0, f"a head without its end: {bytes(stream[position:position + 200])!r}"
        lines = bytes(stream[position:end]).split(b"\r\n")
        assert all(b"\r" not in line and b"\n" not in line for line in lines), f"bare CR or LF in {lines!r}"
        request_line = _REQUEST_LINE.fullmatch(lines[0])
        assert request_line, f"not 'token /origin-form HTTP/1.1': {lines[0]!r}"
        target = request_line.group(2).decode()
        assert "#" not in target and "/../" not in target + "/" and "/./" not in target + "/", target
        fields: dict[str, list[str]] = {}
        for line in lines[1:]:
            assert line[:1] not in (b" ", b"\t"), f"obsolete line folding: {line!r}"
            matched = _FIELD_LINE.fullmatch(line)
            assert matched, f"a field line a strict parser refuses: {line!r}"
            fields.setdefault(matched.group(1).decode().lower(), []).append((matched.group(2) or b"").decode())
        assert len(fields.get("host", [])) == 1, f"Host fields: {fields.get('host')}"
        assert "transfer-encoding" not in fields
        assert set(fields) <= FORWARDABLE, f"fields beyond the allow-list: {set(fields) - FORWARDABLE}"
        assert fields.get("authorization") == [f"Bearer {POD_KEY}"], "the pod's key, and only it"
        assert fields.get("x-request-source", [source])[0] == source and len(fields.get("x-request-source", [])) <= 1
        (length,) = fields["content-length"]
        assert length.isascii() and length.isdigit(), length
        body_start = end + 4
        body = bytes(stream[body_start:body_start + int(length)])
        assert len(body) == int(length), "the stream ends inside a body"
        found.append((target, fields, body))
        position = body_start + int(length)
    return found


def h11_requests(stream: bytes) -> list[tuple[str, bytes]]:
    """``(target, body)`` of each request in ``stream`` as h11 (a strict, independent parser) reads them."""
    connection, found, current = h11.Connection(h11.SERVER), [], None
    connection.receive_data(bytes(stream))
    connection.receive_data(b"")  # the end of the stream: h11 raises on a request cut short
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            current = [event.target.decode(), b""]
        elif isinstance(event, h11.Data):
            current[1] += event.data
        elif isinstance(event, h11.EndOfMessage):
            found.append(tuple(current))
            connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            connection.send(h11.EndOfMessage())
            connection.start_next_cycle()
        else:
            assert event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed), event
            return found


# ----------------------------------------------------------------------------- the client side

def read_answers(sock: socket.socket, count: int) -> tuple[list[tuple[int, dict[bytes, bytes], bytes]], bool]:
    """``count`` answers (interim ones included) from ``sock``, and whether the proxy then closed the connection.
    A reset fails the test: every refusal must reach the client as an answer."""
    answers, buffer = [], b""

    def receive() -> bytes:
        try:
            return sock.recv(65536)
        except ConnectionResetError:
            pytest.fail(f"connection reset after {len(answers)} answer(s): {answers}")

    while len(answers) < count:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            data = receive()
            assert data, f"the proxy closed after {len(answers)} of {count} answers: {answers} {buffer[:300]!r}"
            buffer += data
            continue
        lines = buffer[:end].split(b"\r\n")
        version, status, _ = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1", lines[0]
        fields = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines[1:])}
        length = 0 if int(status) < 200 else int(fields[b"content-length"])
        while len(buffer) < end + 4 + length:
            data = receive()
            assert data, "the proxy closed inside an answer"
            buffer += data
        answers.append((int(status), fields, buffer[end + 4:end + 4 + length]))
        buffer = buffer[end + 4 + length:]
    assert buffer == b"", f"more than {count} answers: {buffer[:300]!r}"
    closed = answers[-1][1].get(b"connection", b"").lower() == b"close"
    if closed:
        assert receive() == b"", "Connection: close, then more bytes"
    return answers, closed


@pytest.fixture
def front(tmp_path):
    """(proxy address, recording upstream): the proxy with a client and a source token, in front of the recorder."""
    key_file, token_file, source_file = tmp_path / "key_file.json", tmp_path / "token", tmp_path / "source-token"
    key_file.write_text(json.dumps({"inference": {"key": POD_KEY}}))
    token_file.write_bytes(TOKEN + b"\n")
    source_file.write_bytes(SOURCE_TOKEN + b"\n")
    upstream = RecordingUpstream()
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.port}", key_file=str(key_file), token_file=str(token_file),
        source_token_file=str(source_file), max_request_bytes=MAX_BODY, idle_timeout_s=5))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield ("127.0.0.1", proxy.server_port), upstream, proxy
    proxy.shutdown()
    proxy.server_close()
    upstream.close()


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_crafted_requests_get_answers_and_only_strict_http_reaches_torchserve(front, row):
    address, upstream, _ = front
    with socket.create_connection(address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in row.parts:
            if isinstance(part, float):
                time.sleep(part)
            else:
                sock.sendall(part)
        answers, closed = read_answers(sock, len(row.statuses))

    # What reached TorchServe first: a smuggled request shows up there even when the client's answer looks right.
    strict, second_opinion = [], []
    for stream in list(upstream.streams):
        strict += strict_requests(stream, row.source)
        second_opinion += h11_requests(stream)
    assert [target for target, _, _ in strict] == row.forwarded
    assert [(target, body) for target, _, body in strict] == second_opinion
    assert [t.decode("latin-1") for t in upstream.lenient_targets] == row.forwarded, "a lenient server saw the same"
    for name in row.absent:
        assert all(name not in fields for _, fields, _ in strict), f"{name} reached TorchServe"

    statuses = [status for status, _, _ in answers]
    assert statuses == row.statuses, [(status, body[:200]) for status, _, body in answers]
    for status, fields, body in answers:
        if status >= 400:
            assert json.loads(body)["code"] == status, body
        if status in (400, 411, 413, 431, 505):  # the framing is in doubt: nothing more is read as a request
            assert fields.get(b"connection", b"").lower() == b"close"
    if answers[-1][0] in (400, 411, 413, 431, 505):
        assert closed


def test_the_table_covers_enough_crafted_requests():
    assert len(ROWS) >= 50 and len({row.id for row in ROWS}) == len(ROWS)


# ----------------------------------------------------------------------------- abusive clients

def _proxy(front, **config) -> AuthProxyServer:
    _, upstream, base = front
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.port}", key_file=base.config.key_file,
        token_file=base.config.token_file, **config))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def test_a_client_that_sends_requests_and_never_reads_the_answers_is_cut_off(front):
    """Pipelined requests with the answers left unread: once the answers back up, the proxy waits at most
    ``idle_timeout_s`` for the client to take them, then drops the connection (even an unauthenticated one)."""
    proxy = _proxy(front, idle_timeout_s=1.0)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
        sock.connect(("127.0.0.1", proxy.server_port))
        sock.settimeout(0.5)
        request = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n" * 64  # unauthenticated: 401s, never read
        started, cut_off = time.monotonic(), None
        while time.monotonic() - started < 20:
            try:
                sock.sendall(request)
            except (ConnectionResetError, BrokenPipeError):
                cut_off = time.monotonic() - started
                break
            except TimeoutError:
                continue  # the proxy stopped reading: its answers are backed up
        sock.close()
        assert cut_off is not None, "the proxy held a connection that never reads its answers for 20 s"
        assert cut_off < 10
        deadline = time.monotonic() + 5
        while proxy._clocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proxy._clocks, "the connection's task has ended"
        assert requests.get(f"http://127.0.0.1:{proxy.server_port}/healthz", timeout=5).status_code == 200
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_connection_over_the_cap_gets_a_503_and_the_cap_frees_up(front):
    proxy = _proxy(front, max_connections=2)
    url = f"http://127.0.0.1:{proxy.server_port}"
    try:
        held = [socket.create_connection(("127.0.0.1", proxy.server_port), timeout=5) for _ in range(2)]
        deadline = time.monotonic() + 5
        while len(proxy._clocks) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {TOKEN.decode()}"}, timeout=5)
        assert answer.status_code == 503 and "--max-connections" in answer.json()["message"]
        assert answer.headers["Connection"] == "close" and answer.headers["Retry-After"] == "1"
        held.pop().close()
        deadline = time.monotonic() + 5
        while len(proxy._clocks) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {TOKEN.decode()}"}, timeout=5)
        assert answer.status_code == 200, answer.text
        for sock in held:
            sock.close()
    finally:
        proxy.shutdown()
        proxy.server_close()


# ----------------------------------------------------------------------------- what TorchServe sends back

class ScriptedUpstream:
    """Answers each request (a head without a body) with ``answer(n)``: raw bytes, right or wrong."""

    def __init__(self, answer):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.answer, self.connections = self._listener.getsockname()[1], answer, 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        served = 0
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buffer = b""
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buffer += data
                    if b"\r\n\r\n" not in buffer:
                        break
                    buffer = buffer.split(b"\r\n\r\n", 1)[1]
                    served += 1
                    conn.sendall(self.answer(served))

    def close(self) -> None:
        self._listener.close()


def _pinged_through(front, answer, count: int) -> tuple[list[requests.Response], ScriptedUpstream]:
    upstream = ScriptedUpstream(answer)
    _, _, base = front
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.port}", key_file=base.config.key_file, token_file=base.config.token_file))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with requests.Session() as session:  # one client connection, kept alive
            return [session.get(f"http://127.0.0.1:{proxy.server_port}/ping", timeout=5,
                                headers={"Authorization": f"Bearer {TOKEN.decode()}"}) for _ in range(count)], upstream
    finally:
        proxy.shutdown()
        proxy.server_close()
        upstream.close()


def test_bytes_after_an_answer_never_become_the_next_clients_answer(front):
    """TorchServe out of step (two answers to one request): the second is dropped with its connection."""
    def answer(n: int) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nanswer%d" % n +
                b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")

    answers, upstream = _pinged_through(front, answer, 3)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.text for a in answers] == ["answer1", "answer2", "answer3"]
    assert upstream.connections == 3, "a connection that was out of step is never used again"


def test_a_chunked_answer_is_relayed_with_a_length_and_a_malformed_one_is_a_502(front):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    (answer,), _ = _pinged_through(front, lambda n: chunked, 1)
    assert answer.status_code == 200 and answer.text == "abcde" and answer.headers["X-Kept"] == "yes"
    assert answer.headers["Content-Length"] == "5" and "Transfer-Encoding" not in answer.headers

    bare_lf = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"
    (answer,), _ = _pinged_through(front, lambda n: bare_lf, 1)
    assert answer.status_code == 502 and "did not answer" in answer.json()["message"]
