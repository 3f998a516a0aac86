"""The deploy step's side of the auth proxy's rollout interface, against the real proxy (serving/auth_proxy.py and
serving/rollout_router.py) over HTTP on loopback, without a cluster: two stable "pods" (each an auth proxy in front
of a stand-in for TorchServe, on its own loopback address and the same port, as pods have their own IPs) read
the rollout file the deploy step writes into the ConfigMap; a third proxy is the challenger. The step's evidence
reader (components/deploy/kubernetes/evidence.py) polls both with the pipeline's source token, sums them and
``decide()``s, as it does on the cluster."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from conftest import settings_of

from components.deploy.kubernetes.challenger import encode, rollout_document
from components.deploy.kubernetes.evidence import EvidenceBook, fetch_rollout, poll_pods
from components.deploy.kubernetes.release import DeployError, Release
from components.deploy.rollout.decision import decide
from pipelines.config import RolloutConfig

CLIENT_TOKEN = "client-token-0123456789abcdef"
SOURCE_TOKEN = "pipeline-source-token-0123456789abcdef"


class Model(ThreadingHTTPServer):
    """TorchServe as the handler answers: a class from the body (``offset`` shifts it), a confidence, a version."""

    daemon_threads = True

    def __init__(self, host: str, version: str, offset: int = 0):
        self.version, self.offset, self.seen = version, offset, []
        super().__init__((host, 0), _ModelHandler)


class _ModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        server: Model = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server.seen.append(self.headers.get("X-Request-Source"))
        index = (len(body) + server.offset) % 10
        data = json.dumps({"label": str(index), "class_index": index, "confidence": 0.9,
                           "model_version": server.version}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _serve(server) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


class ProxyPod:
    """An auth proxy in front of a model on ``host``:``port``, with the serving pods' files."""

    def __init__(self, root: Path, host: str, port: int, version: str, offset: int = 0):
        from serving.auth_proxy import AuthProxyServer, ProxyConfig

        root.mkdir(parents=True)
        (root / "key_file.json").write_text(json.dumps({"inference": {"key": f"key-of-{version}"}}))
        (root / "token").write_text(CLIENT_TOKEN + "\n")
        self.source_token_file = root / "source-token"
        self.source_token_file.write_text(SOURCE_TOKEN + "\n")
        self.rollout_file = root / "rollout" / "rollout.json"  # the ConfigMap volume: {} until a rollout
        self.rollout_file.parent.mkdir()
        self.rollout_file.write_text("{}")
        self.model = Model(host, version, offset)
        _serve(self.model)
        self.proxy = AuthProxyServer((host, port), ProxyConfig(
            upstream=f"http://{host}:{self.model.server_port}", key_file=str(root / "key_file.json"),
            token_file=str(root / "token"), source_token_file=str(self.source_token_file),
            rollout_file=str(self.rollout_file), upstream_timeout_s=5))
        self.proxy.rollout.file.check_every_s = 0.0  # the test changes the file and asks at once
        _serve(self.proxy)
        self.host, self.port = host, self.proxy.server_port
        self.url = f"http://{host}:{self.port}"

    def as_pod(self, name: str) -> dict:
        """The pod as the API lists it: what poll_pods reads."""
        return {"metadata": {"name": name, "uid": f"uid-{name}"},
                "status": {"podIP": self.host, "conditions": [{"type": "Ready", "status": "True"}]}}

    def close(self):
        for server in (self.proxy, self.model):
            server.shutdown()
            server.server_close()


def _free_port(*hosts: str) -> int:
    """A port free on every one of ``hosts`` (pods have one IP each, the same container port)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    pytest.skip("no port free on every loopback address")


@pytest.fixture
def fleet(tmp_path):
    hosts = ("127.0.0.2", "127.0.0.3")
    port = _free_port(*hosts)
    stable = [ProxyPod(tmp_path / f"stable-{i}", host, port, "v1") for i, host in enumerate(hosts)]
    challengers = {offset: ProxyPod(tmp_path / f"challenger-{offset}", "127.0.0.1", 0, "v2", offset)
                   for offset in (0, 3)}  # a sound challenger, and one that names other classes
    yield stable, challengers
    for pod in stable + list(challengers.values()):
        pod.close()


def _settings(**overrides):
    values = dict(strategy="shadow", share=1.0, min_requests=20, max_wait_s=600.0, max_error_rate_increase=0.01,
                  max_p99_ratio=50.0, min_agreement=0.95, max_confidence_drift_p=0.01, on_deadline="rollback")
    return settings_of(rollout=RolloutConfig(**{**values, **overrides})).rollout


@pytest.mark.parametrize("offset, decision", [(0, "promote"), (3, "rollback")])
def test_the_step_routes_reads_and_sums_the_real_proxies_evidence(fleet, offset, decision):
    stable, challengers = fleet
    challenger = challengers[offset]
    release = Release("digits", "v2", "release-id", "s3://kfp-mlops/models/digits")
    document = rollout_document(release, "shadow", 1.0, challenger.url, token_file=str(stable[0].source_token_file))
    for pod in stable:  # the kubelet writes the ConfigMap's value into every pod's volume
        pod.rollout_file.write_text(encode(document))
    for i in range(30):  # the clients' traffic, spread over the two pods (the Service)
        pod = stable[i % 2]
        answer = requests.post(f"{pod.url}/predictions/digits", data=b"x" * (i + 1), timeout=10,
                               headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        assert answer.status_code == 200 and answer.json()["model_version"] == "v1", "the champion answers"
    pods = [pod.as_pod(f"kfp-mlops-serving-{i}") for i, pod in enumerate(stable)]
    book = EvidenceBook("shadow", "v2")
    deadline = 50
    while deadline and book.evidence(0).compared < 30:  # the mirrored copies are sent after each answer
        poll = poll_pods(pods, stable[0].port, SOURCE_TOKEN, book, fetch_rollout)
        assert (poll.ready, poll.routing, poll.silent) == (2, 2, [])
        deadline -= 1
        threading.Event().wait(0.05)
    evidence = book.evidence(elapsed_s=1.0)
    assert (evidence.champion.requests, evidence.challenger.requests, evidence.compared) == (30, 30, 30)
    assert book.per_pod() == {"kfp-mlops-serving-0": {"champion": 15, "challenger": 15, "mirror_dropped": 0},
                              "kfp-mlops-serving-1": {"champion": 15, "challenger": 15, "mirror_dropped": 0}}
    result = decide(evidence, _settings())
    assert result.action == decision, result.reason
    if decision == "rollback":
        assert result.reason.startswith("failed: agreement")
    assert set(challenger.model.seen) == {"shadow"}, "the challenger's copies are marked as mirrored"

    # Cleared: every proxy drops the challenger at once (it answers no version) and the step sees it.
    for pod in stable:
        pod.rollout_file.write_text("{}")
    poll = poll_pods(pods, stable[0].port, SOURCE_TOKEN, EvidenceBook("shadow", "v2"), fetch_rollout)
    assert (poll.ready, poll.routing) == (2, 0)


def test_a_token_the_proxy_refuses_stops_the_step(fleet):
    stable, _ = fleet
    pods = [stable[0].as_pod("kfp-mlops-serving-0")]
    with pytest.raises(DeployError, match="refuses the pipeline's source token"):
        poll_pods(pods, stable[0].port, CLIENT_TOKEN, EvidenceBook("canary", "v2"), fetch_rollout)


def test_what_the_step_writes_is_what_the_proxy_reads(tmp_path):
    """The rollout document, as the ConfigMap holds it, parses as the proxy parses its file; the proxy refuses
    a document of another shape, so the contract cannot drift silently on either side."""
    from serving.rollout_router import parse_rollout

    token = tmp_path / "token"
    token.write_text(SOURCE_TOKEN + "\n")
    release = Release("digits", "c0ffee123456", "r", "s3://b/m")
    document = rollout_document(release, "canary", 0.25, "http://kfp-mlops-serving-challenger.ns.svc.cluster.local:8080",
                                token_file=str(token))
    parsed = parse_rollout(json.loads(encode(document)), "rollout.json")
    assert (parsed.version, parsed.mode, parsed.share, parsed.host, parsed.port, parsed.token) == (
        "c0ffee123456", "canary", 0.25, "kfp-mlops-serving-challenger.ns.svc.cluster.local", 8080, SOURCE_TOKEN)
    with pytest.raises(ValueError):
        parse_rollout({"challenger": {**document["challenger"], "extra": 1}}, "rollout.json")
