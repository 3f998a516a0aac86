"""The serving pods' auth proxy (serving/auth_proxy.py), over real HTTP on loopback.

Upstream is a stand-in for TorchServe's inference API that behaves like it where the
proxy depends on it: it wants ``Authorization: Bearer <inference key from key_file.json>``
and answers 401 otherwise. Every test checks both sides: what the client got, and what
(if anything) reached the upstream.
"""

import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from serving.auth_proxy import AuthProxyServer, ProxyConfig

TOKEN = "client-token-0123456789abcdef"
SOURCE_TOKEN = "source-token-0123456789abcdef"  # the pipeline's smoke test and replay: may set X-Request-Source
ROOT = Path(__file__).resolve().parents[2]


class FakeTorchServe(ThreadingHTTPServer):
    """Records each request; answers like TorchServe's inference API with token auth on."""

    daemon_threads = True

    def __init__(self, key_file: Path):
        self.key_file, self.seen, self.status, self.delay_s = key_file, [], 200, 0.0
        self.status_by_path: dict[str, int] = {}  # answers other than ``status`` for some paths
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.server.delay_s)
        key = json.loads(self.server.key_file.read_text())["inference"]["key"]
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        if self.headers.get("Authorization") != f"Bearer {key}":
            # TorchServe 0.12's answer to a wrong or expired key (InvalidKeyException -> 400).
            status, payload = 400, {"code": 400, "type": "InvalidKeyException",
                                    "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}
        else:
            status = self.server.status_by_path.get(self.path, self.server.status)
            payload = {"path": self.path, "bytes": len(body), "label": "7"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-request-id", "upstream-id")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_OPTIONS = _handle


def _write_keys(key_file: Path, inference_key: str) -> None:
    # The shape TorchServe 0.12 writes (management and API keys omitted: the proxy never uses them).
    tmp = key_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inference": {"key": inference_key, "expiration time": "2099-01-01T00:00:00.000Z"}}))
    os.replace(tmp, key_file)  # a new inode, as when TorchServe rewrites it


def _serve(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def pod(tmp_path):
    """(proxy URL, upstream, paths): the proxy and the fake TorchServe on loopback, as in one pod."""
    key_file, token_file, source_token_file = tmp_path / "key_file.json", tmp_path / "token", tmp_path / "source-token"
    _write_keys(key_file, "pod-key-1")
    token_file.write_text(TOKEN + "\n")
    source_token_file.write_text(SOURCE_TOKEN + "\n")
    upstream = FakeTorchServe(key_file)
    _serve(upstream)
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.server_port}", key_file=str(key_file), token_file=str(token_file),
        source_token_file=str(source_token_file), max_request_bytes=4096))
    for watched in (proxy.tokens, proxy.source_tokens, proxy.pod_key):
        watched._file.check_every_s = 0.0  # see file changes at once
    _serve(proxy)
    yield f"http://127.0.0.1:{proxy.server_port}", upstream, {"key_file": key_file, "token_file": token_file,
                                                              "source_token_file": source_token_file, "proxy": proxy}
    for server in (proxy, upstream):
        server.shutdown()
        server.server_close()


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def test_a_valid_token_reaches_torchserve_with_the_pod_key_not_the_client_token(pod):
    url, upstream, _ = pod
    answer = requests.post(f"{url}/predictions/digits", data=b"\x89PNG-bytes", timeout=5,
                           headers={**_auth(), "Content-Type": "image/png", "X-Top-K": "3"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"path": "/predictions/digits", "bytes": 10, "label": "7"}
    assert answer.headers["x-request-id"] == "upstream-id"
    (seen,) = upstream.seen
    assert seen["headers"]["Authorization"] == "Bearer pod-key-1"
    assert TOKEN not in json.dumps(seen["headers"]), "the client token never reaches TorchServe"
    assert seen["headers"]["X-Top-K"] == "3" and seen["headers"]["Content-Type"] == "image/png"
    assert seen["headers"]["Host"] == f"127.0.0.1:{upstream.server_port}", "TorchServe's own address, not the client's"
    assert seen["body"] == b"\x89PNG-bytes"
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 200


@pytest.mark.parametrize(
    "method, path, headers, body, status, message",
    [
        ("POST", "/predictions/digits", {}, b"x", 401, "missing bearer token"),
        ("POST", "/predictions/digits", _auth("wrong-token-0123456789abcdef"), b"x", 401, "invalid bearer token"),
        ("POST", "/predictions/digits", {"Authorization": f"Basic {TOKEN}"}, b"x", 401, "invalid bearer token"),
        ("POST", "/predictions/digits", {"Authorization": "Bearer "}, b"x", 401, "invalid bearer token"),
        ("GET", "/ping", _auth(TOKEN[:-1]), b"", 401, "invalid bearer token"),
        # Unauthenticated callers learn nothing about the routes: 401 before 404.
        ("GET", "/models", {}, b"", 401, "missing bearer token"),
        # Authenticated, but not an inference route: TorchServe's other APIs stay unreachable.
        ("GET", "/models", _auth(), b"", 404, "only GET /ping"),
        ("POST", "/models?url=evil.mar", _auth(), b"", 404, "only GET /ping"),
        ("OPTIONS", "/", _auth(), b"", 404, "only GET /ping"),
        ("DELETE", "/predictions/digits", _auth(), b"", 404, "only GET /ping"),
        ("GET", "/predictions/digits", _auth(), b"", 404, "only GET /ping"),
        ("POST", "/predictions/../models", _auth(), b"", 404, "only GET /ping"),
        ("POST", "/predictions/digits", _auth(), b"x" * 4097, 413, "exceeds the limit of 4096 bytes"),
    ],
)
def test_refused_requests_never_reach_torchserve(pod, method, path, headers, body, status, message):
    url, upstream, _ = pod
    answer = requests.request(method, f"{url}{path}", data=body or None, headers=headers, timeout=5)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["message"]
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.seen == []


@pytest.mark.parametrize("path", ["/predictions/digits", "/explanations/digits", "/predictions/digits/2"])
@pytest.mark.parametrize("content_type, body", [
    ("application/x-www-form-urlencoded", b"a=%zz"),  # Netty cannot decode it: TorchServe's frontend answers 500
    ("Application/X-WWW-Form-Urlencoded; charset=utf-8", b"data=%89PNG"),
    ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data; name=data\r\n\r\n"),
    ("MULTIPART/FORM-DATA", b""),
])
def test_form_bodies_are_refused_with_415_before_torchserve(pod, path, content_type, body):
    url, upstream, _ = pod
    answer = requests.post(f"{url}{path}", data=body, headers={**_auth(), "Content-Type": content_type}, timeout=5)
    assert answer.status_code == 415, answer.text
    assert answer.json()["code"] == 415 and "form bodies" in answer.json()["message"]
    assert "image/png" in answer.json()["message"] and "application/json" in answer.json()["message"]
    assert upstream.seen == []


def test_a_form_content_type_hidden_behind_a_second_header_is_refused(pod):
    """Two Content-Type headers: the proxy forwards the last one, so it checks every one of them."""
    url, upstream, _ = pod
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    connection.putrequest("POST", "/predictions/digits")
    for name, value in [("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "image/png"),
                        ("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", "5")]:
        connection.putheader(name, value)
    connection.endheaders(b"a=%zz")
    response = connection.getresponse()
    assert response.status == 415
    response.read()
    connection.close()
    assert upstream.seen == []


def test_form_refusal_keeps_the_connection_in_order_and_other_types_pass(pod):
    url, upstream, _ = pod
    with requests.Session() as session:
        refused = session.post(f"{url}/predictions/digits", data=b"a=%zz", timeout=5,
                               headers={**_auth(), "Content-Type": "application/x-www-form-urlencoded"})
        assert refused.status_code == 415
        for content_type in ("image/png", "image/jpeg", "application/json", "text/plain", ""):
            answer = session.post(f"{url}/predictions/digits", data=b"a=%zz", timeout=5,
                                  headers={**_auth(), "Content-Type": content_type})
            assert answer.status_code == 200, (content_type, answer.text)  # the handler judges those itself
    assert len(upstream.seen) == 5
    # Unauthenticated form posts still get the 401 first: nothing about the API leaks.
    answer = requests.post(f"{url}/predictions/digits", data=b"a=%zz", timeout=5,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 401


def test_only_source_tokens_may_tag_traffic_for_the_drift_monitor(pod):
    """X-Request-Source marks the pipeline's own requests (smoke test, replay) in the request log: a client
    token's is dropped, a source token's passes when it is a short plain name, and the file rotates."""
    url, upstream, paths = pod
    predict = f"{url}/predictions/digits"
    tagged = {"X-Request-Source": "replay", "Content-Type": "image/png"}
    assert requests.post(predict, data=b"x", headers={**_auth(), **tagged}, timeout=5).status_code == 200
    assert "X-Request-Source" not in upstream.seen[-1]["headers"], "a client token cannot hide traffic from the monitor"
    assert requests.post(predict, data=b"x", headers={**_auth(SOURCE_TOKEN), **tagged}, timeout=5).status_code == 200
    assert upstream.seen[-1]["headers"]["X-Request-Source"] == "replay"
    assert upstream.seen[-1]["headers"]["Authorization"] == "Bearer pod-key-1"
    assert SOURCE_TOKEN not in json.dumps(upstream.seen[-1]["headers"])
    assert requests.get(f"{url}/ping", headers=_auth(SOURCE_TOKEN), timeout=5).status_code == 200, "a client token too"
    forwarded = len(upstream.seen)
    for bad in ("Replay", "smoke_test", "replay test", "x" * 33, ""):
        answer = requests.post(predict, data=b"x", headers={**_auth(SOURCE_TOKEN), "X-Request-Source": bad}, timeout=5)
        assert answer.status_code == 400 and "X-Request-Source must be" in answer.json()["message"], (bad, answer.text)
    assert len(upstream.seen) == forwarded

    rotated = "rotated-source-token-0123456789"
    paths["source_token_file"].write_text(rotated + "\n")
    assert requests.get(f"{url}/ping", headers=_auth(SOURCE_TOKEN), timeout=5).status_code == 401
    assert requests.post(predict, data=b"x", headers={**_auth(rotated), **tagged}, timeout=5).status_code == 200
    assert upstream.seen[-1]["headers"]["X-Request-Source"] == "replay"


def test_without_a_source_token_file_no_request_is_tagged(pod):
    url, upstream, paths = pod
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(upstream=f"http://127.0.0.1:{upstream.server_port}",
                                                           key_file=str(paths["key_file"]),
                                                           token_file=str(paths["token_file"])))
    _serve(proxy)
    try:
        predict = f"http://127.0.0.1:{proxy.server_port}/predictions/digits"
        headers = {"X-Request-Source": "smoke-test"}
        assert requests.post(predict, data=b"x", headers={**_auth(SOURCE_TOKEN), **headers}, timeout=5).status_code == 401
        assert requests.post(predict, data=b"x", headers={**_auth(), **headers}, timeout=5).status_code == 200
        assert "X-Request-Source" not in upstream.seen[-1]["headers"]
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_upstream_errors_are_relayed_and_a_dead_upstream_is_a_502(pod):
    url, upstream, _ = pod
    upstream.status = 400  # e.g. the handler refusing a corrupt image
    answer = requests.post(f"{url}/predictions/digits", data=b"junk", headers=_auth(), timeout=5)
    assert answer.status_code == 400 and answer.json()["label"] == "7"
    upstream.shutdown()
    upstream.server_close()
    answer = requests.post(f"{url}/predictions/digits", data=b"junk", headers=_auth(), timeout=5)
    assert answer.status_code == 502 and "did not answer on loopback" in answer.json()["message"]
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200, "the proxy itself lives on"


def test_rotations_need_no_restart(pod):
    url, upstream, paths = pod
    # Client tokens: a second line is a second valid token (rotation overlap), then the old one goes.
    new = "rotated-token-abcdefghijklmnop"
    paths["token_file"].write_text(f"{TOKEN}\n{new}\n")
    assert requests.get(f"{url}/ping", headers=_auth(new), timeout=5).status_code == 200
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 200
    paths["token_file"].write_text(f"{new}\n")
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 401
    # A broken update (empty file) keeps the last good tokens: it neither locks out nor opens up.
    paths["token_file"].write_text("\n")
    assert requests.get(f"{url}/ping", headers=_auth(new), timeout=5).status_code == 200
    assert requests.get(f"{url}/ping", headers={}, timeout=5).status_code == 401

    # The pod key: TorchServe rewrote key_file.json (the readiness probe renewed it).
    _write_keys(paths["key_file"], "pod-key-2")
    assert requests.get(f"{url}/ping", headers=_auth(new), timeout=5).status_code == 200
    assert upstream.seen[-1]["headers"]["Authorization"] == "Bearer pod-key-2"


def test_a_refused_pod_key_makes_the_proxy_reread_it_and_retry_once(pod):
    url, upstream, paths = pod
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 200
    # The key file changes between two checks of it (the proxy looks at most once a second).
    paths["proxy"].pod_key._file.check_every_s = 3600
    upstream.key_file.write_text(upstream.key_file.read_text().replace("pod-key-1", "pod-key-9"))
    before = len(upstream.seen)
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 200
    assert upstream.seen[-1]["headers"]["Authorization"] == "Bearer pod-key-9"
    assert len(upstream.seen) - before == 2, "one refused with the old key, one answered with the new"


def test_keep_alive_serves_many_requests_on_one_connection(pod):
    url, upstream, _ = pod
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    for i in range(20):
        connection.request("POST", "/predictions/digits", body=b"x" * i, headers=_auth())
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["bytes"] == i
    connection.request("POST", "/predictions/digits", body=b"x", headers={})  # a refusal keeps order too
    response = connection.getresponse()
    assert response.status == 401
    response.read()
    connection.close()
    assert len(upstream.seen) == 20


def test_healthz_needs_no_token_and_tells_nothing(pod):
    url, upstream, _ = pod
    answer = requests.get(f"{url}/healthz", timeout=5)
    assert answer.status_code == 200 and answer.json()["message"] == "auth proxy up"
    assert upstream.seen == []


def test_a_failure_inside_the_proxy_is_a_500_not_a_dropped_connection(pod, capfd):
    url, upstream, paths = pod

    def broken(force=False):
        raise RuntimeError("a bug")

    paths["proxy"].pod_key.get = broken
    answer = requests.post(f"{url}/predictions/digits", data=b"x", headers=_auth(), timeout=5)
    assert answer.status_code == 500 and "its log has the details" in answer.json()["message"]
    assert answer.headers["Connection"] == "close"
    assert "RuntimeError: a bug" in capfd.readouterr().err
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200, "the proxy itself lives on"


def test_the_connection_cap_fits_the_open_file_limit():
    """A hard limit too low for --max-connections lowers the cap (and says so) rather than failing later."""
    code = "from serving.auth_proxy import _connections_within_open_files as fit; print(fit(512), fit(10))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024)))
    assert result.returncode == 0, result.stderr
    assert "needs 1600 open files but the limit is 1024: serving at most 320 connections" in result.stdout
    assert result.stdout.splitlines()[-1] == "320 10"


def test_no_key_file_yet_is_a_503(tmp_path, pod):
    url, upstream, paths = pod
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(upstream=f"http://127.0.0.1:{upstream.server_port}",
                                                           key_file=str(tmp_path / "absent.json"),
                                                           token_file=str(paths["token_file"])))
    _serve(proxy)
    try:
        answer = requests.get(f"http://127.0.0.1:{proxy.server_port}/ping", headers=_auth(), timeout=5)
        assert answer.status_code == 503 and "still starting" in answer.json()["message"]
    finally:
        proxy.shutdown()
        proxy.server_close()


@pytest.mark.parametrize(
    "token_text, message",
    [
        (None, "cannot read the client token file"),
        ("\n\n", "holds no token"),
        ("short\n", "shorter than 16 characters"),
    ],
)
def test_the_proxy_refuses_to_start_without_a_usable_token(tmp_path, token_text, message):
    """Fail closed: no token file, an empty one or a weak token stops the container (exit 2)."""
    token_file = tmp_path / "token"
    if token_text is not None:
        token_file.write_text(token_text)
    result = subprocess.run(
        [sys.executable, "-m", "serving.auth_proxy", "--listen", "127.0.0.1:0", "--token-file", str(token_file),
         "--key-file", str(tmp_path / "key_file.json")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_the_proxy_refuses_to_start_without_its_source_token_file(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "serving.auth_proxy", "--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "token"),
         "--source-token-file", str(tmp_path / "absent"), "--key-file", str(tmp_path / "key_file.json")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "cannot read the source token file" in result.stderr


# -- HTTP framing: llhttp parses, the proxy checks on top; what it cannot frame gets a 4xx (the full table is
# tests/serving/test_serving_auth_proxy_smuggling.py).

def _raw(url: str, data: bytes, read_until_close: bool = True) -> bytes:
    """Send raw bytes on a fresh connection; everything the proxy answers until it closes (or 2 s pass)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(2)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if not read_until_close:
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


HOST_LINE = b"Host: serving.example\r\n"  # HTTP/1.1 requires one
AUTH_LINE = HOST_LINE + f"Authorization: Bearer {TOKEN}\r\n".encode()


@pytest.mark.parametrize(
    "request_bytes, status, message",
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request"),
        (b"GET /ping HTTP/2.0\r\n" + HOST_LINE + b"\r\n", 505, "HTTP/2.0 is not supported"),
        (b"GET /ping HTTP/1.1\r\n" + HOST_LINE + b"no colon here\r\n\r\n", 400, "malformed request"),
        (b"GET /ping HTTP/1.1\r\n" + HOST_LINE + b"X-A: 1\r\n folded: value\r\n\r\n", 400, "malformed request"),
        (b"GET /ping HTTP/1.1\r\n" + HOST_LINE + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
         431, "at most 100"),
        (b"GET /ping HTTP/1.1\r\n" + HOST_LINE + b"X-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "request head over"),
        # Equal repeated lengths too: RFC 9110 8.6 lets a recipient refuse them, and llhttp does.
        (b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
         400, "invalid Content-Length"),
        # Two different lengths would let the proxy and TorchServe disagree on where a request ends.
        (b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
         400, "invalid Content-Length"),
        (b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: -1\r\n\r\n", 400, "invalid Content-Length"),
        (b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
         411, "Content-Length"),
    ],
)
def test_requests_it_cannot_frame_get_a_4xx_and_the_connection_closed(pod, request_bytes, status, message):
    url, upstream, _ = pod
    answer = _raw(url, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Connection: close" in head
    assert message in json.loads(body)["message"]
    assert upstream.seen == []


def test_expect_100_continue_is_answered_only_after_the_checks(pod):
    url, upstream, _ = pod
    answer = _raw(url, b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE +
                  b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"bytes": 3' in answer
    # Expect: 100-continue: the interim answer comes only after the token and the size were checked.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abcd")
        assert b'"bytes": 4' in sock.recv(65536)
    refused = _raw(url, b"POST /predictions/digits HTTP/1.1\r\n" + HOST_LINE + b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in refused
    assert [s["headers"].get("Expect") for s in upstream.seen] == [None, None]  # hop-by-hop: not forwarded


def test_http_1_0_and_connection_close_end_the_connection_after_the_answer(pod):
    url, _, _ = pod
    for request in (b"GET /ping HTTP/1.0\r\n" + AUTH_LINE + b"\r\n",
                    b"GET /ping HTTP/1.1\r\n" + AUTH_LINE + b"Connection: close\r\n\r\n"):
        answer = _raw(url, request)  # returns only because the proxy closed the connection
        assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer
    kept = _raw(url, b"GET /ping HTTP/1.0\r\n" + AUTH_LINE + b"Connection: keep-alive\r\n\r\n", read_until_close=False)
    assert kept.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in kept
    assert b"Connection: keep-alive" in kept, "an HTTP/1.0 client closes unless told the connection stays open"


def test_concurrent_clients_each_get_their_own_answers(pod):
    """One upstream connection per client connection: answers never cross between clients."""
    url, upstream, _ = pod

    def client(n: int) -> list[int]:
        with requests.Session() as session:
            return [session.post(f"{url}/predictions/digits", data=b"x" * (n * 40 + i), headers=_auth(),
                                 timeout=10).json()["bytes"] for i in range(25)]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    assert results == [[n * 40 + i for i in range(25)] for n in range(16)]
    assert len(upstream.seen) == 16 * 25


def test_clients_that_vanish_mid_request_leave_no_traceback_and_the_proxy_serving(pod, capfd):
    url, _, _ = pod
    host, port = url.removeprefix("http://").split(":")
    for partial in (b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: 100\r\n\r\nonly-part",
                    b"GET /ping HTTP/1.1\r\n" + AUTH_LINE):  # mid-body, mid-head
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(partial)
        sock.close()
    for _ in range(20):  # ask and hang up before the answer arrives
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        sock.sendall(b"GET /ping HTTP/1.1\r\n" + AUTH_LINE + b"\r\n")
        sock.close()
    assert requests.get(f"{url}/ping", headers=_auth(), timeout=5).status_code == 200
    assert "Traceback" not in capfd.readouterr().err


def test_shutdown_lets_a_request_in_flight_finish(pod):
    url, upstream, paths = pod
    upstream.delay_s = 0.5
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, f"{url}/ping", headers=_auth(), timeout=5)
        time.sleep(0.2)  # the request is at the upstream now
        paths["proxy"].shutdown()
        assert pending.result().status_code == 200
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", headers=_auth(), timeout=2)


def test_the_watchdog_cuts_idle_clients_and_gives_up_on_a_slow_torchserve(pod):
    url, upstream, paths = pod
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.server_port}", key_file=str(paths["key_file"]),
        token_file=str(paths["token_file"]), idle_timeout_s=0.4, upstream_timeout_s=0.4))
    _serve(proxy)
    try:
        front = f"http://127.0.0.1:{proxy.server_port}"
        started = time.monotonic()
        assert _raw(front, b"") == b""  # says nothing: closed by the proxy, not by _raw's 2 s wait
        assert _raw(front, b"POST /predictions/digits HTTP/1.1\r\n" + AUTH_LINE + b"Content-Length: 9\r\n\r\nhalf") == b""
        assert time.monotonic() - started < 3.5
        upstream.delay_s = 1.5  # TorchServe stuck on a batch
        answer = requests.get(f"{front}/ping", headers=_auth(), timeout=5)
        assert answer.status_code == 502 and "TimeoutError" in answer.json()["message"]
        upstream.delay_s = 0.0
        time.sleep(1.2)  # the stuck exchange ends upstream; the next request gets a fresh connection
        assert requests.get(f"{front}/ping", headers=_auth(), timeout=5).status_code == 200
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_shutdown_right_after_start_still_stops_it(pod):
    url, upstream, paths = pod
    proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream.server_port}", key_file=str(paths["key_file"]),
        token_file=str(paths["token_file"])))
    thread = _serve(proxy)
    proxy.shutdown()  # possibly before serve_forever has set up its event loop (SIGTERM during start-up)
    thread.join(5)
    assert not thread.is_alive()
    proxy.server_close()
