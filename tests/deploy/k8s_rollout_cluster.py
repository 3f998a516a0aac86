"""The fake API server of k8s_api_server.py, extended for shadow and canary rollouts, and the stable pods' auth
proxies as the deploy step sees them.

``RolloutCluster`` adds to ``FakeCluster`` the objects a rollout touches, recorded like the others in
tests/data/k8s/ (the challenger Deployment, its Service, the rollout ConfigMap, the ready stable pods), written
for this version's manifests: deployment-serving-rollout.json is deployment-serving.json after `kubectl apply -k`
mounted the rollout ConfigMap into the auth proxy; deployment-challenger.json is the challenger as the API returns
it after the same apply (0 replicas, the stable pod spec with its own labels and its own empty rollout file).
Every call is authorized with RBAC against the rendered pipeline Role, as before; server-side applies merge and
JSON patches run with their test operations (422 when a test fails, as the API server answers).

``ProxyFleet`` plays the stable pods' auth proxies behind their pod IPs: each re-reads the rollout ConfigMap
``sync_polls`` polls after it changes (the kubelet's delay), and between two polls its clients send
``requests_per_poll`` requests, of which the challenger gets ``share`` (mirrored in shadow, answered in canary)
and answers as its ``Behaviour`` says; ``GET /rollout`` answers the proxy contract's evidence
(docs/releases.md), cumulative since the file named the challenger.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from k8s_api_server import NS, FakeCluster, PatchTestFailed, json_patch, load, request_attributes, ssa_merge

from components.core.names import ROLLOUT_CONFIG_MAP, ROLLOUT_FILE_KEY, SERVING_CHALLENGER
from components.deploy.kubernetes.evidence import ProxyAnswer
from components.deploy.kubernetes.release import MODEL_VERSION_LABEL
from serving.rollout_router import no_evidence

CHALLENGER_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{SERVING_CHALLENGER}"
CHALLENGER_SERVICE_PATH = f"/api/v1/namespaces/{NS}/services/{SERVING_CHALLENGER}"
ROLLOUT_CM_PATH = f"/api/v1/namespaces/{NS}/configmaps/{ROLLOUT_CONFIG_MAP}"
CHALLENGER_ENDPOINT = f"http://{SERVING_CHALLENGER}.{NS}.svc.cluster.local:8080"


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code, "reason": reason,
            "message": message}


class RolloutCluster(FakeCluster):
    """One namespace with the stable and the challenger Deployment, the rollout ConfigMap and the ready stable pods."""

    def __init__(self, statuses: dict[int, str], challenger_statuses: dict[int, str] | None = None,
                 challenger_pods: str | None = None, stable: str = "deployment-serving-rollout.json"):
        super().__init__(stable, "replicasets-serving.json", statuses, pods="pods-serving-ready.json")
        self.pods += load("pods-new-release-starting.json")["items"]  # a new stable pod, for a promotion
        if challenger_pods:
            self.pods += load(challenger_pods)["items"]
        self.challenger = load("deployment-challenger.json")
        self.challenger_scripts = {gen: load(name) for gen, name in (challenger_statuses or {}).items()}
        self.challenger_service = load("service-challenger.json")
        self.rollout_cm = load("configmap-rollout.json")
        self.rollout_files = [self.rollout_file()]  # every value the ConfigMap held, in order

    def rollout_file(self) -> str:
        return self.rollout_cm["data"][ROLLOUT_FILE_KEY]

    def challenger_version(self) -> str:
        return self.challenger["spec"]["template"]["metadata"]["labels"][MODEL_VERSION_LABEL]

    def handle(self, method, url, content_type, body, authorization):
        parts = urlsplit(url)
        if parts.path not in (CHALLENGER_PATH, CHALLENGER_SERVICE_PATH, ROLLOUT_CM_PATH):
            return super().handle(method, url, content_type, body, authorization)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        request = {"method": method, "path": parts.path, "query": query, "content_type": content_type,
                   "body": json.loads(body) if body else None, "authorization": authorization}
        self.requests.append(request)
        denied = self.authorize(request_attributes(method, parts.path, query), authorization)
        if denied:
            return denied["code"], denied
        for predicate, status_file in self.errors:
            if predicate(request):
                status = load(status_file)
                return status["code"], status
        if parts.path == CHALLENGER_SERVICE_PATH and method == "GET":
            return 200, self.challenger_service
        if parts.path == ROLLOUT_CM_PATH:
            if method == "GET":
                return 200, self.rollout_cm
            if method == "PATCH" and content_type == "application/json-patch+json":
                try:
                    self.rollout_cm = json_patch(self.rollout_cm, request["body"])
                except PatchTestFailed as err:
                    return 422, _status(422, "Invalid", str(err))
                self.rollout_cm["metadata"]["resourceVersion"] = str(int(self.rollout_cm["metadata"]["resourceVersion"]) + 1)
                self.rollout_files.append(self.rollout_file())
                return 200, self.rollout_cm
        if parts.path == CHALLENGER_PATH:
            if method == "GET":
                script = self.challenger_scripts.get(self.challenger["metadata"]["generation"])
                if script:
                    self.challenger["status"] = script.pop(0) if len(script) > 1 else script[0]
                return 200, self.challenger
            if method == "PATCH":
                if content_type == "application/apply-patch+yaml":
                    after = ssa_merge(self.challenger, request["body"])
                elif content_type == "application/json-patch+json":
                    try:
                        after = json_patch(self.challenger, request["body"])
                    except PatchTestFailed as err:
                        return 422, _status(422, "Invalid", str(err))
                else:
                    return 415, _status(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
                if after["spec"] != self.challenger["spec"]:
                    after["metadata"]["generation"] += 1
                self.challenger = after
                return 200, self.challenger
        return 405, _status(405, "MethodNotAllowed", f"{method} {parts.path}")


# ---------------------------------------------------------------- the stable pods' auth proxies

@dataclass
class Behaviour:
    """How one model version answers: a share of errors, its latency, how often it names another class than the
    champion (shadow), its confidence range."""

    error_share: float = 0.0
    latency_ms: float = 20.0
    disagree_share: float = 0.0
    confidence: tuple[float, float] = (0.85, 0.99)


@dataclass
class Proxy:
    """One stable pod's auth proxy: the rollout file it has loaded, and its evidence since it named the challenger."""

    name: str
    rng: random.Random
    loaded: str = "{}"
    seen: str = "{}"  # the ConfigMap's value it last saw change
    polls_since_change: int = 0
    since: float | None = None
    answer: dict = field(default_factory=dict)


class ProxyFleet:
    """``fetch(url, token)`` for the deploy step: the stable pods' proxies, by pod IP."""

    def __init__(self, cluster: RolloutCluster, token: str, *, champion: Behaviour | None = None,
                 challenger: Behaviour | None = None, requests_per_poll: int = 20, sync_polls: int = 1,
                 refuse_token: bool = False):
        self.cluster, self.token = cluster, token
        self.champion, self.challenger = champion or Behaviour(), challenger or Behaviour()
        self.requests_per_poll, self.sync_polls, self.refuse_token = requests_per_poll, sync_polls, refuse_token
        self.proxies: dict[str, Proxy] = {}
        self.fetches: list[str] = []
        for i, pod in enumerate(p for p in cluster.pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"):
            self.proxies[pod["status"]["podIP"]] = Proxy(pod["metadata"]["name"], random.Random(i))

    def __call__(self, url: str, token: str) -> dict:
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.port == 8080 and parts.path == "/rollout", url
        assert token == self.token, "the pipeline's source token"
        self.fetches.append(url)
        proxy = self.proxies.get(parts.hostname)
        if proxy is None:
            raise ConnectionError(f"no route to host {parts.hostname}")
        if self.refuse_token:
            raise ProxyAnswer(401, '{"error": "a source token is needed"}')
        self._sync(proxy)
        document = json.loads(proxy.loaded)
        challenger = document.get("challenger")
        if not challenger:
            proxy.answer, proxy.since = {}, None
            return no_evidence()  # what serving/rollout_router.py answers with no challenger named
        if proxy.since is None or proxy.answer.get("version") != challenger["version"]:
            proxy.since = f"2026-12-01T03:{len(self.fetches) // 60:02d}:{len(self.fetches) % 60:02d}Z"
            # no_evidence()'s keys, with arms of their own (its two arms share their empty lists)
            arms = {arm: {"requests": 0, "errors": 0, "latencies_ms": [], "confidences": []}
                    for arm in ("champion", "challenger")}
            proxy.answer = {**no_evidence(), **arms, "version": challenger["version"], "mode": challenger["mode"],
                            "share": challenger["share"], "since": proxy.since}
        self._traffic(proxy, challenger)
        return copy.deepcopy(proxy.answer)

    def _sync(self, proxy: Proxy) -> None:
        """The kubelet updates the pod's volume ``sync_polls`` polls after the ConfigMap changed."""
        current = self.cluster.rollout_file()
        if current != proxy.seen:
            proxy.seen, proxy.polls_since_change = current, 0
        proxy.polls_since_change += 1
        if proxy.polls_since_change > self.sync_polls:
            proxy.loaded = proxy.seen

    def _answer(self, arm: dict, behaviour: Behaviour, rng: random.Random) -> bool:
        arm["requests"] += 1
        if rng.random() < behaviour.error_share:
            arm["errors"] += 1
            return False
        arm["latencies_ms"].append(round(behaviour.latency_ms * (1 + 0.2 * rng.random()), 3))
        arm["confidences"].append(round(rng.uniform(*behaviour.confidence), 4))
        return True

    def _traffic(self, proxy: Proxy, challenger: dict) -> None:
        """One poll's client requests through this proxy."""
        rng, answer = proxy.rng, proxy.answer
        for _ in range(self.requests_per_poll):
            answer["predictions"] += 1
            to_challenger = rng.random() < challenger["share"]
            if challenger["mode"] == "canary" and to_challenger:
                self._answer(answer["challenger"], self.challenger, rng)
                continue
            champion_ok = self._answer(answer["champion"], self.champion, rng)
            if challenger["mode"] == "shadow" and to_challenger:
                if self._answer(answer["challenger"], self.challenger, rng) and champion_ok:
                    answer["compared"] += 1
                    answer["agreed"] += rng.random() >= self.challenger.disagree_share
