"""The auth proxy's challenger (serving/rollout_router.py), over real HTTP on loopback: two real proxies, the
champion's and the challenger's, each in front of a stand-in for TorchServe that answers like the handler
(``class_index``, ``confidence``, ``model_version``) and records what reached it.

Checked on both sides, as in test_serving_auth_proxy.py: what the client got (the champion's answers byte for
byte where the challenger must not matter), what reached each TorchServe, and the evidence ``GET /rollout``
reports."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from serving import rollout_router
from serving.auth_proxy import AuthProxyServer, ProxyConfig
from serving.rollout_router import Arm, RolloutFile, parse_rollout, write_rollout_file

TOKEN = "client-token-0123456789abcdef"
SOURCE_TOKEN = "source-token-0123456789abcdef"
CHALLENGER_SOURCE_TOKEN = "challenger-source-0123456789abcdef"


class Model(ThreadingHTTPServer):
    """A TorchServe stand-in: wants its key, answers a prediction whose class is the body's length mod 10 (plus
    ``offset``), and can fail (``status``), be slow (``delay_s``) or fail on every ``fail_every``-th request."""

    daemon_threads = True

    def __init__(self, key_file: Path, version: str):
        self.key_file, self.version, self.seen = key_file, version, []
        self.status, self.delay_s, self.offset, self.fail_every = 200, 0.0, 0, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ModelHandler)


class _ModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _handle(self):
        server: Model = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(server.delay_s)
        with server.lock:
            server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
            count = len(server.seen)
        key = json.loads(server.key_file.read_text())["inference"]["key"]
        if self.headers.get("Authorization") != f"Bearer {key}":
            status, payload = 400, {"code": 400, "message": "Token Authorization failed"}
        elif server.status != 200 or (server.fail_every and count % server.fail_every == 0):
            status, payload = server.status if server.status != 200 else 503, {"code": 503, "message": "failed"}
        elif self.path.startswith("/ping"):
            status, payload = 200, {"status": "Healthy"}
        else:
            index = (len(body) + server.offset) % 10
            status, payload = 200, {"label": str(index), "class_index": index, "confidence": 0.5 + index / 20,
                                    "model_version": server.version, "path": self.path}
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle


def _serve(server) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


class Pod:
    """One model behind one auth proxy, as a serving home has them."""

    def __init__(self, root: Path, version: str, source_token: str, rollout_file: bool = True):
        root.mkdir(parents=True, exist_ok=True)
        self.key_file, self.token_file, self.source_token_file = root / "key_file.json", root / "token", root / "source-token"
        self.key_file.write_text(json.dumps({"inference": {"key": f"key-of-{version}"}}))
        self.token_file.write_text(TOKEN + "\n")
        self.source_token_file.write_text(source_token + "\n")
        self.rollout_file = root / "rollout.json"
        self.model = Model(self.key_file, version)
        _serve(self.model)
        self.proxy = AuthProxyServer(("127.0.0.1", 0), ProxyConfig(
            upstream=f"http://127.0.0.1:{self.model.server_port}", key_file=str(self.key_file),
            token_file=str(self.token_file), source_token_file=str(self.source_token_file),
            rollout_file=str(self.rollout_file) if rollout_file else None, upstream_timeout_s=5))
        if self.proxy.rollout is not None:
            self.proxy.rollout.file.check_every_s = 0.0  # see file changes at once
        _serve(self.proxy)
        self.url = f"http://127.0.0.1:{self.proxy.server_port}"

    def close(self):
        for server in (self.proxy, self.model):
            server.shutdown()
            server.server_close()


@pytest.fixture
def pods(tmp_path):
    champion = Pod(tmp_path / "champion", "champ-1", SOURCE_TOKEN)
    challenger = Pod(tmp_path / "challenger", "chall-2", CHALLENGER_SOURCE_TOKEN)
    yield champion, challenger
    champion.close()
    challenger.close()


def _name(champion: Pod, challenger: Pod | None, mode: str = "shadow", share: float = 1.0, version: str = "chall-2",
          upstream: str | None = None) -> None:
    write_rollout_file(champion.rollout_file, None if challenger is None and upstream is None else {
        "version": version, "mode": mode, "share": share, "upstream": upstream or challenger.url,
        "token_file": str(challenger.source_token_file if challenger else champion.source_token_file)})


def _auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


def _evidence(pod: Pod, token=SOURCE_TOKEN) -> dict:
    answer = requests.get(f"{pod.url}/rollout", headers=_auth(token), timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _evidence_when(pod: Pod, ready, timeout_s: float = 10.0) -> dict:
    """The evidence once ``ready(evidence)`` holds (mirrored copies are sent in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = _evidence(pod)
        if ready(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def _predict(pod: Pod, body: bytes, token=TOKEN, **headers) -> requests.Response:
    return requests.post(f"{pod.url}/predictions/digits", data=body, timeout=10,
                         headers={**_auth(token), "Content-Type": "image/png", **headers})


BODIES = [b"x" * n for n in range(1, 41)]


def _answers(pod: Pod) -> list[tuple[int, bytes]]:
    with requests.Session() as session:
        return [(r.status_code, r.content) for r in (
            session.post(f"{pod.url}/predictions/digits", data=b, headers={**_auth(), "Content-Type": "image/png"},
                         timeout=10) for b in BODIES)]


def test_rollout_evidence_is_for_the_pipelines_source_token_only(pods, tmp_path):
    champion, challenger = pods
    url = f"{champion.url}/rollout"
    assert requests.get(url, timeout=5).status_code == 401
    client = requests.get(url, headers=_auth(), timeout=5)
    assert client.status_code == 403 and "source token" in client.json()["message"]
    assert requests.post(url, headers=_auth(SOURCE_TOKEN), timeout=5).status_code == 405
    refused = requests.get(url, headers=_auth(SOURCE_TOKEN), data=b"body", timeout=5)
    assert refused.status_code == 400 and refused.headers["Connection"] == "close"
    doc = _evidence(champion)
    assert doc["version"] is None and doc["challenger"]["requests"] == 0, "no rollout file: no challenger"
    plain = Pod(tmp_path / "plain", "champ-1", SOURCE_TOKEN, rollout_file=False)
    try:
        answer = requests.get(f"{plain.url}/rollout", headers=_auth(SOURCE_TOKEN), timeout=5)
        assert answer.status_code == 404 and "--rollout-file" in answer.json()["message"]
    finally:
        plain.close()
    assert champion.model.seen == [] and challenger.model.seen == []


def test_shadow_never_changes_the_champions_answers_and_compares_every_mirrored_pair(pods):
    champion, challenger = pods
    before = _answers(champion)
    challenger.model.offset = 1  # disagrees on every prediction
    _name(champion, challenger, "shadow", 1.0)
    during = _answers(champion)
    doc = _evidence_when(champion, lambda d: d["compared"] >= len(BODIES))
    _name(champion, None)
    after = _answers(champion)
    assert before == during == after, "byte for byte, whatever the challenger answers"
    assert all(json.loads(body)["model_version"] == "champ-1" for _, body in during)
    assert doc["version"] == "chall-2" and doc["mode"] == "shadow" and doc["predictions"] == len(BODIES)
    assert doc["champion"]["requests"] == doc["challenger"]["requests"] == doc["compared"] == len(BODIES)
    assert doc["agreed"] == 0 and doc["challenger"]["errors"] == 0 and doc["mirror_dropped"] == 0
    assert len(doc["challenger"]["latencies_ms"]) == len(doc["challenger"]["confidences"]) == len(BODIES)
    assert _evidence(champion)["version"] is None, "the file removed: no challenger, no evidence"


def test_what_reaches_the_challenger_is_rewritten_with_its_token_and_a_source(pods):
    champion, challenger = pods
    _name(champion, challenger, "shadow", 1.0)
    sent = _predict(champion, b"\x89PNG-bytes", SOURCE_TOKEN, **{"X-Request-Source": "replay", "X-Top-K": "2",
                                                                 "X-Evil": "1", "Cookie": "a=b"})
    assert sent.status_code == 200
    deadline = time.monotonic() + 5
    while not challenger.model.seen and time.monotonic() < deadline:
        time.sleep(0.02)
    (seen,) = challenger.model.seen
    assert seen["headers"]["Authorization"] == "Bearer key-of-chall-2", "through the challenger's own proxy"
    assert seen["headers"]["X-Request-Source"] == "shadow", "its log tells the copies from client traffic"
    assert seen["headers"]["X-Top-K"] == "2" and seen["body"] == b"\x89PNG-bytes"
    assert "X-Evil" not in seen["headers"] and "Cookie" not in seen["headers"]
    assert champion.model.seen[-1]["headers"]["X-Request-Source"] == "replay", "the champion's log keeps the source"


def test_the_challengers_request_is_canonical_http(pods, tmp_path):
    """Sent straight to a recording TorchServe stand-in (no proxy between), the request is the proxy's own
    writing: one Host, the proxy's Content-Length, the challenger's token, no client field beyond the allowed."""
    champion, _ = pods
    recorder = Model(tmp_path / "none.json", "rec")
    (tmp_path / "none.json").write_text(json.dumps({"inference": {"key": "unused-key-0123456789"}}))
    _serve(recorder)
    try:
        (tmp_path / "rec-token").write_text("unused-key-0123456789\n")
        write_rollout_file(champion.rollout_file, {"version": "rec", "mode": "canary", "share": 1.0,
                                                   "upstream": f"http://127.0.0.1:{recorder.server_port}",
                                                   "token_file": str(tmp_path / "rec-token")})
        answer = _predict(champion, b"abc", **{"Content-Type": "image/png", "X-Request-Id": "r-1", "Via": "evil"})
        assert answer.status_code == 200 and answer.json()["model_version"] == "rec"
        (seen,) = recorder.seen
        assert seen["headers"] == {"Host": f"127.0.0.1:{recorder.server_port}", "Content-Type": "image/png",
                                   "User-Agent": seen["headers"]["User-Agent"], "Accept": "*/*",
                                   "X-Request-Id": "r-1", "Authorization": "Bearer unused-key-0123456789",
                                   "X-Request-Source": "canary", "Content-Length": "3"}
        assert TOKEN not in json.dumps(seen["headers"])
    finally:
        recorder.shutdown()
        recorder.server_close()


@pytest.mark.parametrize("fault", ["errors", "down", "slow-and-full"])
def test_a_failing_shadow_challenger_is_counted_and_never_felt(pods, monkeypatch, fault):
    champion, challenger = pods
    before = _answers(champion)
    if fault == "errors":
        challenger.model.fail_every = 2
    elif fault == "down":
        challenger.close()
    else:  # at most 2 copies on their way, each taking 0.5 s: the rest are dropped
        monkeypatch.setattr(rollout_router, "MIRROR_IN_FLIGHT", 2)
        challenger.model.delay_s = 0.5
    _name(champion, challenger, "shadow", 1.0)
    started = time.monotonic()
    during = _answers(champion)
    took = time.monotonic() - started
    assert during == before
    if fault == "errors":
        doc = _evidence_when(champion, lambda d: d["challenger"]["requests"] >= len(BODIES))
        assert doc["challenger"]["errors"] == len(BODIES) // 2 and doc["compared"] == len(BODIES) // 2
        assert doc["champion"]["errors"] == 0
    elif fault == "down":
        doc = _evidence_when(champion, lambda d: d["challenger"]["requests"] >= len(BODIES))
        assert doc["challenger"]["errors"] == doc["challenger"]["requests"] == len(BODIES)
        assert doc["compared"] == 0 and doc["challenger"]["latencies_ms"] == []
    else:
        assert took < len(BODIES) * 0.5 / 4, "the champion's answers never waited for the slow challenger"
        doc = _evidence(champion)
        assert doc["mirror_dropped"] >= len(BODIES) - 4
        assert doc["challenger"]["requests"] + doc["mirror_dropped"] + 3 >= len(BODIES)


def test_canary_answers_from_the_challenger_and_falls_back_to_the_champion_when_it_fails(pods):
    champion, challenger = pods
    _name(champion, challenger, "canary", 1.0)
    answers = _answers(champion)
    assert {json.loads(body)["model_version"] for _, body in answers} == {"chall-2"}
    assert all(seen["headers"]["X-Request-Source"] == "canary" for seen in challenger.model.seen)
    doc = _evidence(champion)
    assert doc["challenger"]["requests"] == len(BODIES) and doc["champion"]["requests"] == 0

    challenger.model.fail_every = 4  # every 4th answer a 503: the client gets the champion's answer instead
    _name(champion, challenger, "canary", 1.0, version="chall-3")  # a new version: evidence from zero
    answers = _answers(champion)
    assert all(status == 200 for status, _ in answers), "a canary's failure never reaches the client"
    versions = [json.loads(body)["model_version"] for _, body in answers]
    assert versions.count("champ-1") == len(BODIES) // 4
    doc = _evidence(champion)
    assert doc["version"] == "chall-3" and doc["challenger"]["errors"] == len(BODIES) // 4
    assert doc["challenger"]["requests"] == len(BODIES) and doc["champion"]["requests"] == len(BODIES) // 4


def test_canary_share_splits_the_predictions_and_explanations_stay_with_the_champion(pods):
    champion, challenger = pods
    _name(champion, challenger, "canary", 0.3)
    with requests.Session() as session:
        versions = [session.post(f"{champion.url}/predictions/digits", data=b"x", headers=_auth(),
                                 timeout=10).json()["model_version"] for _ in range(300)]
        explanation = session.post(f"{champion.url}/explanations/digits", data=b"x", headers=_auth(), timeout=10)
    assert 45 <= versions.count("chall-2") <= 135, versions.count("chall-2")  # 90 expected; 5 sigma either way
    assert explanation.json()["model_version"] == "champ-1"
    doc = _evidence(champion)
    assert doc["predictions"] == 300 and doc["champion"]["requests"] + doc["challenger"]["requests"] == 300
    assert doc["share"] == 0.3


def test_the_rollout_file_is_checked_and_a_broken_update_keeps_the_challenger(pods, tmp_path, capfd):
    champion, challenger = pods
    _name(champion, challenger, "shadow", 1.0)
    assert _predict(champion, b"x").status_code == 200
    _evidence_when(champion, lambda d: d["compared"] == 1)
    champion.rollout_file.write_text('{"challenger": {"version": "chall-2", "mode": "mirror"}}')
    doc = _evidence(champion)
    assert doc["version"] == "chall-2" and doc["compared"] == 1, "kept, with its evidence"
    assert "keeping the previous challenger" in capfd.readouterr().out
    champion.rollout_file.unlink()
    assert _evidence(champion)["version"] is None, "absent: no challenger"
    for bad, message in [
        ([], "must hold a JSON object"),
        ({"challenger": {"version": "v"}}, "exactly"),
        ({"other": 1}, "unknown keys"),
        ({"challenger": {"version": "v", "mode": "shadow", "share": 0, "upstream": "http://h:1", "token_file": "t"}},
         "'share' must be"),
        ({"challenger": {"version": "v", "mode": "shadow", "share": 0.5, "upstream": "https://h:1/x",
                         "token_file": "t"}}, "'upstream' must be"),
        ({"challenger": {"version": "v", "mode": "shadow", "share": 0.5, "upstream": "http://h:1",
                         "token_file": str(tmp_path / "missing")}}, "cannot read the challenger's token file"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_rollout(bad, "rollout.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError):
        RolloutFile(broken)  # at start a broken file stops the proxy (exit 2)
    assert RolloutFile(tmp_path / "absent.json").challenger is None


def test_samples_stay_bounded_and_uniform(monkeypatch):
    monkeypatch.setattr(rollout_router, "SAMPLE_LIMIT", 100)
    import random

    arm = Arm(random.Random(0))
    for i in range(10_000):
        arm.add(True, float(i), i / 10_000)
    arm.add(False)
    assert arm.requests == 10_001 and arm.errors == 1
    assert len(arm.latencies_ms) == len(arm.confidences) == 100
    assert 2_500 < sum(arm.latencies_ms) / 100 < 7_500, "a uniform sample of all, not the first or the last"


def test_a_proxy_with_a_broken_rollout_file_does_not_start(tmp_path):
    key, token = tmp_path / "key_file.json", tmp_path / "token"
    key.write_text(json.dumps({"inference": {"key": "k"}}))
    token.write_text(TOKEN + "\n")
    (tmp_path / "rollout.json").write_text('{"challenger": 1}')
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "serving.auth_proxy", "--listen", "127.0.0.1:0", "--key-file",
                           str(key), "--token-file", str(token), "--rollout-file", str(tmp_path / "rollout.json")],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 2 and "'challenger' must be an object" in done.stderr


def test_server_timing_is_for_source_tokens_and_a_challengers_never_reaches_a_client(pods):
    """Each proxy tells the pipeline's requests how long its TorchServe took (Server-Timing): that is how the
    champion's proxy times the challenger without the hop between the proxies. Clients never see it."""
    champion, challenger = pods
    challenger.model.delay_s = 0.2
    timed = _predict(champion, b"x", SOURCE_TOKEN)
    assert timed.headers["Server-Timing"].startswith("upstream;dur=")
    assert "Server-Timing" not in _predict(champion, b"x").headers
    _name(champion, challenger, "canary", 1.0)
    for token in (TOKEN, SOURCE_TOKEN):
        answer = _predict(champion, b"x", token)
        assert answer.json()["model_version"] == "chall-2" and "Server-Timing" not in answer.headers
    latencies = _evidence(champion)["challenger"]["latencies_ms"]
    assert len(latencies) == 2 and all(200 <= ms < 400 for ms in latencies), latencies


def test_in_shadow_a_failing_champion_is_counted_against_the_champion(pods):
    champion, challenger = pods
    _name(champion, challenger, "shadow", 1.0)
    champion.model.shutdown()
    champion.model.server_close()
    for _ in range(3):
        assert _predict(champion, b"x").status_code == 502, "the champion's own failure, as without a challenger"
    doc = _evidence_when(champion, lambda d: d["challenger"]["requests"] >= 3)
    assert (doc["champion"]["requests"], doc["champion"]["errors"]) == (3, 3)
    assert (doc["challenger"]["requests"], doc["challenger"]["errors"], doc["compared"]) == (3, 0, 0)
