"""Shadow and canary rollouts on Kubernetes (components/deploy/kubernetes/staged.py), without a cluster: the deploy
step against the recorded API of k8s_rollout_cluster.py (the real ``kubernetes`` client over loopback, every call
authorized by the pipeline Role) and the stable pods' auth proxies answering ``GET /rollout``.

Every path is checked for what it leaves behind: the rollout ConfigMap back at ``{}`` (and, once it named the
challenger, cleared only after that), the challenger at 0 replicas, the stable Deployment untouched unless the
challenger was promoted, every call allowed by the Role."""

from __future__ import annotations

import csv
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import test_deploy_kubernetes
from conftest import settings_of
from k8s_api_server import (
    NEW_RELEASE,
    NEW_VERSION,
    NS,
    OLD_VERSION,
    PIPELINE_ACCOUNT,
    Attributes,
    bound_rules,
    load,
    validate_strict,
)
from k8s_rollout_cluster import CHALLENGER_ENDPOINT, Behaviour, ProxyFleet, RolloutCluster
from PIL import Image
from test_deploy_kubernetes import CLASS_NAMES, ENDPOINT, TOKEN, FakeStore, FakeTime, fake_build

from components.core.features import MODEL_REFERENCE_FILE
from components.core.names import ROLLOUT_CONFIG_MAP, SERVING_CHALLENGER
from components.deploy.kubernetes import DeployError, ReleaseRolledBack, RollbackFailed, deploy_kubernetes
from components.deploy.kubernetes.challenger import render_challenger
from components.deploy.kubernetes.evidence import EvidenceBook, ProxyAnswer, fetch_rollout, reference_confidences
from components.deploy.kubernetes.release import Release
from pipelines.config import RolloutConfig, ServingConfig

# The fixtures of test_deploy_kubernetes.py: the fake API server's client, and the step's inputs.
serve_cluster, inputs = test_deploy_kubernetes.serve_cluster, test_deploy_kubernetes.inputs

SOUND = Behaviour()
FAULTS = {  # the fault drills: each challenger is rolled back naming its criterion
    "error_rate": ("shadow", Behaviour(error_share=0.3)),
    "p99_latency": ("canary", Behaviour(latency_ms=80.0)),
    "agreement": ("shadow", Behaviour(disagree_share=0.25)),
    "confidence_drift": ("canary", Behaviour(confidence=(0.3, 0.6))),
}


class Service:
    """The stable Service (the live stable version answers) and the challenger's (its version answers), as the
    handler answers: a version in ``broken`` names the wrong class."""

    def __init__(self, cluster: RolloutCluster, broken: tuple[str, ...] = ()):
        self.cluster, self.broken, self.calls = cluster, broken, []

    def __call__(self, endpoint, body, token, source=None, **_):
        assert token == TOKEN and source == "smoke-test"
        if endpoint == f"{CHALLENGER_ENDPOINT}/predictions/digits":
            which, version = "challenger", self.cluster.challenger_version()
        else:
            assert endpoint == ENDPOINT
            which, version = "stable", self.cluster.serving_version()
        self.calls.append((which, version))
        label = int(np.asarray(Image.open(io.BytesIO(body)))[0, 0]) // 20
        if version in self.broken:
            label = (label + 1) % 10
        p = {name: (0.9 if i == label else 0.01) for i, name in enumerate(CLASS_NAMES)}
        return {"label": CLASS_NAMES[label], "class_index": label, "confidence": 0.9, "probabilities": p,
                "model_version": version}


def write_reference(model_dir, low=0.85, high=0.99, n=200):
    """The model's reference predictions (finetune writes reference_model.csv): their confidences are what the
    challenger's live confidences are compared with."""
    import random

    rng = random.Random(7)
    with (model_dir / MODEL_REFERENCE_FILE).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["predicted_class", "confidence"])
        for _ in range(n):
            writer.writerow([rng.randrange(10), round(rng.uniform(low, high), 4)])


def rollout_settings(strategy, **overrides):
    values = dict(strategy=strategy, share=0.5, min_requests=60, max_wait_s=600.0, max_error_rate_increase=0.02,
                  max_p99_ratio=1.5, min_agreement=0.95, max_confidence_drift_p=0.01, on_deadline="rollback")
    values.update(overrides)
    return settings_of(rollout=RolloutConfig(**values)).rollout


def staged(api, cluster, inputs, strategy="shadow", *, challenger=SOUND, broken=(), fleet=None, rollout=None,
           **overrides):
    """deploy_kubernetes with a rollout against the fake cluster and its proxies."""
    write_reference(inputs.model)
    service = Service(cluster, broken)
    fleet = fleet or ProxyFleet(cluster, TOKEN, challenger=challenger)
    time_ = FakeTime()
    serving = settings_of(serving=ServingConfig(rollout_timeout_s=900)).serving
    kwargs = dict(namespace=NS, token_file=inputs.token, run_id="kfp-mlops-r8n2v", api=api, publish=FakeStore(),
                  build_archive=fake_build, send=service, sleep=time_.sleep, clock=time_.clock, poll_s=5,
                  rollout=rollout or rollout_settings(strategy), fetch_evidence=fleet, unroute_timeout_s=120)
    kwargs.update(overrides)
    return deploy_kubernetes(inputs.model, inputs.dataset, serving, **kwargs), fleet, service


def challenger_calls(cluster):
    return [r for r in cluster.requests if SERVING_CHALLENGER in r["path"] or ROLLOUT_CONFIG_MAP in r["path"]]


def assert_left_clean(cluster, routed: bool):
    """No trace in the serving path: the rollout file is {} again, the challenger at 0, every call allowed."""
    files = cluster.rollout_files
    assert files[0] == files[-1] == "{}"
    if routed:
        assert len(files) == 3 and json.loads(files[1])["challenger"]["version"] == NEW_VERSION, files
    else:
        assert files == ["{}"], "never routed"
    assert cluster.challenger["spec"]["replicas"] == 0
    validate_strict(cluster.challenger)
    assert cluster.requests and len(cluster.authorized) == len(cluster.requests)


# ---------------------------------------------------------------- promote

@pytest.mark.parametrize("strategy", ["shadow", "canary"])
def test_a_sound_challenger_is_promoted_through_the_stable_rollout(serve_cluster, inputs, strategy):
    cluster = RolloutCluster({8: "rollout-complete.json"}, {2: "rollout-challenger-ready.json"})
    stable_before = load("deployment-serving-rollout.json")
    record, fleet, service = staged(serve_cluster(cluster), cluster, inputs, strategy)

    rollout = record["rollout"]
    assert rollout["decision"] == "promote" and rollout["reason"].startswith("every criterion holds")
    assert {c["name"]: c["passed"] for c in rollout["criteria"]} == {
        "error_rate": True, "p99_latency": True, "agreement": True if strategy == "shadow" else None,
        "confidence_drift": True}
    assert rollout["strategy"] == strategy and rollout["share"] == 0.5
    assert (rollout["champion_version"], rollout["challenger_version"]) == (OLD_VERSION, NEW_VERSION)
    evidence = rollout["evidence"]
    assert evidence["challenger"]["requests"] >= 60 and set(evidence["pods"]) == {
        "kfp-mlops-serving-5b7d9c8f6-h2x9q", "kfp-mlops-serving-5b7d9c8f6-m7k4t"}, "both pods' evidence, summed"
    assert sum(p["challenger"] for p in evidence["pods"].values()) == evidence["challenger"]["requests"]
    assert rollout["seconds_to_decision"] > 0
    json.dumps(record)

    # The challenger: the stable pod spec, the new release, its own labels and empty rollout file; 1 pod, then 0.
    (apply,) = [r for r in challenger_calls(cluster) if r["content_type"] == "application/apply-patch+yaml"]
    challenger_release = Release("digits", NEW_VERSION, NEW_RELEASE, "s3://kfp-mlops/models/digits",
                                 run_id="kfp-mlops-r8n2v", namespace=NS, deployment_name=SERVING_CHALLENGER)
    assert apply["body"] == render_challenger(stable_before, load("deployment-challenger.json"), challenger_release, 1)
    assert apply["query"] == {"fieldManager": "kfp-mlops", "force": "true"}
    assert cluster.challenger_version() == NEW_VERSION
    # The smoke tests: the challenger's through its Service, then the promoted stable one's.
    assert service.calls[0] == ("challenger", NEW_VERSION) and service.calls[-1] == ("stable", NEW_VERSION)

    # Promoted as a replace is: server-side apply to the stable Deployment, its rollout, its smoke test.
    assert cluster.serving_version() == NEW_VERSION and record["revision"] == "5"
    assert record["served_model_version"] == NEW_VERSION and record["deployment_rollout"]["ok"]
    # The routing: the rollout file named the challenger, then {} again (after the promotion's rollout).
    routed = json.loads(cluster.rollout_files[1])["challenger"]
    assert routed == {"version": NEW_VERSION, "mode": strategy, "share": 0.5, "upstream": CHALLENGER_ENDPOINT,
                      "token_file": "/etc/kfp-mlops/serving-source-token/token"}
    assert record["challenger"]["end"] == {"cleared": True, "unrouted": True, "unrouted_after_s": 5.0,
                                           "scaled_to_zero": True}
    assert_left_clean(cluster, routed=True)
    validate_strict(cluster.deployment)


def test_on_deadline_promote_promotes_without_enough_traffic(serve_cluster, inputs):
    cluster = RolloutCluster({8: "rollout-complete.json"}, {2: "rollout-challenger-ready.json"})
    fleet = ProxyFleet(cluster, TOKEN, requests_per_poll=0)
    record, _, _ = staged(serve_cluster(cluster), cluster, inputs, fleet=fleet,
                          rollout=rollout_settings("canary", on_deadline="promote", max_wait_s=60))
    assert record["rollout"]["decision"] == "promote" and record["rollout"]["reason"].startswith("deadline: 0 of 60")
    assert cluster.serving_version() == NEW_VERSION
    assert_left_clean(cluster, routed=True)


# ---------------------------------------------------------------- roll back on the evidence

@pytest.mark.parametrize("criterion", sorted(FAULTS))
def test_a_faulty_challenger_is_rolled_back_naming_the_failing_criterion(serve_cluster, inputs, criterion):
    strategy, behaviour = FAULTS[criterion]
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    record, fleet, _ = staged(serve_cluster(cluster), cluster, inputs, strategy, challenger=behaviour)

    rollout = record["rollout"]
    assert rollout["decision"] == "rollback" and rollout["reason"].startswith(f"failed: {criterion} (")
    failed = [c["name"] for c in rollout["criteria"] if c["passed"] is False]
    assert failed == [criterion]
    # The champion serves on, untouched: no patch of the stable Deployment at all.
    assert cluster.deployment == load("deployment-serving-rollout.json")
    assert not [r for r in cluster.requests if r["method"] == "PATCH" and r["path"].endswith("/deployments/kfp-mlops-serving")]
    assert record["served_model_version"] == OLD_VERSION and record["model_version"] == NEW_VERSION
    assert record["revision"] == "4" and record["smoke_test_accuracy"] == 1.0, "the challenger's smoke test"
    assert record["endpoint"] == ENDPOINT
    assert_left_clean(cluster, routed=True)


def test_without_live_traffic_the_deadline_rolls_back(serve_cluster, inputs):
    """rollout.replay is local-only: on a cluster only the clients' traffic is evidence, so with none the rollout
    waits max_wait_s (counted from the routing patch) and on_deadline decides."""
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    fleet = ProxyFleet(cluster, TOKEN, requests_per_poll=0)
    record, _, _ = staged(serve_cluster(cluster), cluster, inputs, fleet=fleet, rollout=rollout_settings("shadow", max_wait_s=60))
    rollout = record["rollout"]
    assert rollout["decision"] == "rollback" and rollout["reason"].startswith("deadline: 0 of 60 requests after 60 s")
    assert 60 <= rollout["seconds_to_decision"] < 70
    assert cluster.serving_version() == OLD_VERSION
    assert_left_clean(cluster, routed=True)


def test_proxies_that_never_report_the_challenger_are_named_at_the_deadline(serve_cluster, inputs):
    """Stable pods whose proxy never loads the rollout file (an old image, a kubelet that never syncs): nothing to
    judge, so the deadline rolls back and the reason says that no proxy reported."""
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    fleet = ProxyFleet(cluster, TOKEN, sync_polls=10**6)
    record, _, _ = staged(serve_cluster(cluster), cluster, inputs, fleet=fleet,
                          rollout=rollout_settings("canary", max_wait_s=30), unroute_timeout_s=10)
    assert "no stable pod's proxy ever reported this challenger; last poll: 0 of 2 ready pods route to it" in \
        record["rollout"]["reason"]
    assert record["rollout"]["decision"] == "rollback"
    assert_left_clean(cluster, routed=True)


# ---------------------------------------------------------------- a challenger that never serves

@pytest.mark.parametrize("case", ["progress-deadline", "crashloop", "smoke-test"])
def test_a_challenger_that_never_becomes_ready_is_scaled_back_and_never_routed(serve_cluster, inputs, case):
    scripts = {2: "rollout-challenger-deadline-exceeded.json" if case == "progress-deadline" else
               "rollout-challenger-ready.json"}
    pods = "pods-challenger-crashloop.json" if case == "crashloop" else None
    if case == "crashloop":
        scripts = {2: "rollout-challenger-deadline-exceeded.json"}
    cluster = RolloutCluster({}, scripts, challenger_pods=pods)
    with pytest.raises(ReleaseRolledBack) as caught:
        staged(serve_cluster(cluster), cluster, inputs, broken=(NEW_VERSION,) if case == "smoke-test" else ())
    message, report = str(caught.value), caught.value.report
    expected = {"progress-deadline": "never became ready: ProgressDeadlineExceeded",
                "crashloop": "never became ready: pod kfp-mlops-serving-challenger-5f6c8d9b7-q8w3z: container torchserve "
                             "CrashLoopBackOff after 4 restarts; last exit 1 (Error): java.lang.OutOfMemoryError",
                "smoke-test": f"failed its smoke test through {CHALLENGER_ENDPOINT}/predictions/digits: 8/8 answered, "
                              "accuracy 0.00"}[case]
    assert f"the challenger model v{NEW_VERSION} {expected}" in message
    assert f"No traffic was routed to it; it was scaled back to 0. The champion v{OLD_VERSION} serves unchanged." in message
    assert report["rollout"]["decision"] == "rollback" and expected in report["rollout"]["reason"]
    assert cluster.serving_version() == OLD_VERSION
    assert_left_clean(cluster, routed=False)


# ---------------------------------------------------------------- refusals before anything changes

@pytest.mark.parametrize("case, message", [
    ("routed", f"another rollout is in progress, or one was interrupted: the rollout file routes traffic to "
               f"challenger v0badc0ffee00. Nothing was changed. If no deploy step is rolling out now, end it by hand: "
               f"kubectl -n {NS} patch configmap {ROLLOUT_CONFIG_MAP} --type merge -p"),
    ("running", f"the challenger Deployment {SERVING_CHALLENGER} runs 1 replica(s). Nothing was changed."),
    ("old-manifests", "the serving Deployment's auth proxy has no --rollout-file argument: it predates shadow and "
                      "canary rollouts. Apply the manifests of this version"),
    ("no-challenger", f"a shadow rollout needs the challenger Deployment and Service {SERVING_CHALLENGER}"),
])
def test_a_rollout_is_refused_before_anything_is_published(serve_cluster, inputs, case, message):
    cluster = RolloutCluster({}, {}, stable="deployment-serving.json" if case == "old-manifests" else
                             "deployment-serving-rollout.json")
    if case == "routed":
        cluster.rollout_cm["data"]["rollout.json"] = json.dumps({"challenger": {"version": "0badc0ffee00"}})
    elif case == "running":
        cluster.challenger["spec"]["replicas"] = 1
    elif case == "no-challenger":
        cluster.errors.append((lambda r: r["path"].endswith(f"/deployments/{SERVING_CHALLENGER}"),
                               "status-404-deployment-not-found.json"))
    store = FakeStore()
    with pytest.raises(DeployError) as caught:
        staged(serve_cluster(cluster), cluster, inputs, publish=store)
    assert message in str(caught.value)
    assert store.published == [] and not [r for r in cluster.requests if r["method"] == "PATCH"]


def test_the_first_release_is_a_replace_whatever_the_strategy(serve_cluster, inputs):
    cluster = RolloutCluster({2: "rollout-first-release-complete.json"}, {})
    cluster.deployment = load("deployment-unreleased.json")
    cluster.replicasets = load("replicasets-unreleased.json")["items"]
    record, fleet, _ = staged(serve_cluster(cluster), cluster, inputs, "canary")
    assert "rollout" not in record and cluster.serving_version() == NEW_VERSION
    assert challenger_calls(cluster) == [] and fleet.fetches == []


# ---------------------------------------------------------------- failures after the routing: cleaned up all the same

def test_a_failed_promotion_rolls_the_stable_back_and_ends_the_rollout(serve_cluster, inputs):
    cluster = RolloutCluster({8: "rollout-progress-deadline-exceeded.json", 9: "rollback-complete.json"},
                             {2: "rollout-challenger-ready.json"})
    with pytest.raises(ReleaseRolledBack) as caught:
        staged(serve_cluster(cluster), cluster, inputs, "canary")
    assert "rollout failed: ProgressDeadlineExceeded" in str(caught.value) and "Rolled back to revision 4" in str(caught.value)
    report = caught.value.report
    assert report["recovery"]["ok"]
    rollout = report["rollout"]  # what happened: a rollback (the ledger records rolled_back)
    assert (rollout["decision"], rollout["evidence_decision"]) == ("rollback", "promote")
    assert rollout["reason"].startswith("the evidence said promote (every criterion holds") and \
        "but the promotion failed: rollout failed: ProgressDeadlineExceeded" in rollout["reason"]
    assert cluster.serving_version() == OLD_VERSION
    assert_left_clean(cluster, routed=True)


def test_a_refused_token_ends_the_rollout_with_the_reason(serve_cluster, inputs):
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    fleet = ProxyFleet(cluster, TOKEN, refuse_token=True)
    with pytest.raises(DeployError, match="auth proxy refuses the pipeline's source token") as caught:
        staged(serve_cluster(cluster), cluster, inputs, fleet=fleet, unroute_timeout_s=10)
    rollout = caught.value.report["rollout"]  # recorded as a rollback, with the reason
    assert rollout["decision"] == "rollback" and rollout["reason"].startswith("the rollout failed: DeployError: pod ")
    assert cluster.serving_version() == OLD_VERSION
    assert_left_clean(cluster, routed=True)


def test_a_rollout_file_that_cannot_be_cleared_keeps_the_challenger_and_says_what_to_do(serve_cluster, inputs):
    """Scaling the challenger down while the proxies still send it canary traffic would fail those requests: it
    keeps running, and the step fails with the commands that end the rollout by hand."""
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    clears = lambda r: r["path"].endswith(ROLLOUT_CONFIG_MAP) and r["method"] == "PATCH" and \
        r["body"][1]["value"] == "{}"  # noqa: E731
    cluster.errors.append((clears, "status-500-etcd-timeout.json"))
    with pytest.raises(RollbackFailed) as caught:
        staged(serve_cluster(cluster), cluster, inputs, challenger=Behaviour(error_share=0.5))
    message = str(caught.value)
    assert "the shadow rollout decided rollback, but ending it failed: the rollout file could not be cleared" in message
    assert f"kubectl -n {NS} patch configmap {ROLLOUT_CONFIG_MAP}" in message
    assert f"kubectl -n {NS} scale deployment/{SERVING_CHALLENGER} --replicas=0" in message
    assert cluster.challenger["spec"]["replicas"] == 1, "still serving the share the proxies send it"
    assert cluster.serving_version() == OLD_VERSION


def test_proxies_that_keep_routing_are_waited_for_then_the_challenger_is_parked(serve_cluster, inputs):
    cluster = RolloutCluster({}, {2: "rollout-challenger-ready.json"})
    fleet = ProxyFleet(cluster, TOKEN, challenger=Behaviour(error_share=0.5), sync_polls=4)
    record, _, _ = staged(serve_cluster(cluster), cluster, inputs, fleet=fleet, unroute_timeout_s=10)
    end = record["challenger"]["end"]
    assert end["unrouted"] is False and len(end["still_routing"]) == 2 and end["unrouted_after_s"] >= 10
    assert_left_clean(cluster, routed=True)


# ---------------------------------------------------------------- the Role: exactly what the step calls

def test_the_pipeline_role_grants_exactly_what_replace_and_staged_releases_call(serve_cluster, inputs):
    """A promoted rollout, a rolled-back replace and a rolled-back rollout together use every grant of the Role."""
    from test_deploy_kubernetes import run

    used = set()
    cluster = RolloutCluster({8: "rollout-complete.json"}, {2: "rollout-challenger-ready.json"})
    staged(serve_cluster(cluster), cluster, inputs)
    used |= set(cluster.authorized)
    cluster = RolloutCluster({8: "rollout-progress-deadline-exceeded.json", 9: "rollback-complete.json"}, {})
    with pytest.raises(ReleaseRolledBack):
        run(serve_cluster(cluster), cluster, inputs)
    used |= set(cluster.authorized)
    for rule in bound_rules(role=PIPELINE_ACCOUNT):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        assert Attributes(verb, group, resource, name) in used, \
                            f"the Role grants {verb} on {resource} {name!r} but the step never calls it"


# ---------------------------------------------------------------- the evidence, pod by pod

def pod(name, uid="u-" + "0"):
    return {"metadata": {"name": name, "uid": uid}}


def answer(since, champion, challenger, compared=0, agreed=0, version="v2", mode="shadow"):
    arm = lambda n, errors=0: {"requests": n, "errors": errors, "latencies_ms": [10.0] * (n - errors),  # noqa: E731
                               "confidences": [0.9] * (n - errors)}
    return {"version": version, "mode": mode, "since": since, "champion": arm(champion), "challenger": arm(*challenger),
            "compared": compared, "agreed": agreed, "mirror_dropped": 1}


def test_evidence_of_pods_that_left_or_restarted_still_counts():
    book = EvidenceBook("shadow", "v2")
    assert book.record(pod("a", "ua"), answer(1, 10, (4,), 4, 4))
    assert book.record(pod("b", "ub"), answer(1, 10, (5, 1), 4, 3))
    assert book.record(pod("a", "ua"), answer(1, 20, (8,), 8, 8))  # a's later answer replaces its earlier one
    assert book.record(pod("b", "ub"), answer(9, 3, (2,), 2, 2))  # b's proxy restarted: a new tally beside the old
    assert not book.record(pod("c", "uc"), answer(1, 5, (5,), version="v1"))  # routes to another challenger
    assert not book.record(pod("c", "uc"), {})  # no challenger (the file is {} there)
    evidence = book.evidence(elapsed_s=12.0)
    assert (evidence.champion.requests, evidence.challenger.requests, evidence.challenger.errors) == (33, 15, 1)
    assert (evidence.compared, evidence.agreed) == (14, 13) and len(evidence.challenger.latencies_ms) == 14
    assert book.per_pod() == {"a": {"champion": 20, "challenger": 8, "mirror_dropped": 1},
                              "b": {"champion": 13, "challenger": 7, "mirror_dropped": 2}}


@pytest.mark.parametrize("bad", [
    {"version": "v2", "mode": "canary"},
    {"version": "v2", "champion": {"requests": 1, "errors": 2}},
    {"version": "v2", "compared": 1, "agreed": 2},
    {"version": "v2", "challenger": {"requests": 3, "latencies_ms": ["slow"]}},
])
def test_an_answer_that_is_not_the_proxys_evidence_is_refused(bad):
    with pytest.raises(ValueError):
        EvidenceBook("shadow", "v2").record(pod("a"), bad)


def test_fetch_rollout_speaks_http_with_the_source_token_and_no_http_proxy(monkeypatch):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == "Bearer source-token"
            body = json.dumps(answer(1, 2, (1,)) if ok else {"error": "a source token is needed"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # would fail every request if it were used
    try:
        url = f"http://127.0.0.1:{server.server_port}/rollout"
        assert fetch_rollout(url, "source-token")["challenger"]["requests"] == 1
        with pytest.raises(ProxyAnswer) as caught:
            fetch_rollout(url, "client-token")
        assert caught.value.status == 401
        assert seen == [("/rollout", "Bearer source-token"), ("/rollout", "Bearer client-token")]
    finally:
        server.shutdown()
        server.server_close()


def test_the_reference_confidences_come_from_the_models_reference(tmp_path):
    assert reference_confidences(tmp_path) is None
    write_reference(tmp_path, 0.5, 0.6, n=30)
    values = reference_confidences(tmp_path)
    assert len(values) == 30 and all(0.5 <= v <= 0.6 for v in values)


# ---------------------------------------------------------------- the deploy component: the ledger and the metrics

@pytest.mark.parametrize("case", ["promote", "rollback", "never-ready"])
def test_the_deploy_component_records_the_rollout_in_the_ledger_and_metrics(serve_cluster, inputs, tmp_path,
                                                                             monkeypatch, case):
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from components.core.ledger import Ledger
    from components.deploy.component import deploy_component
    from components.deploy.kubernetes import KubernetesApi
    from components.deploy.kubernetes import deploy as deploy_module

    scripts = {2: "rollout-challenger-deadline-exceeded.json" if case == "never-ready" else "rollout-challenger-ready.json"}
    cluster = RolloutCluster({8: "rollout-complete.json"}, scripts)
    api = serve_cluster(cluster)
    write_reference(inputs.model)
    monkeypatch.setattr(KubernetesApi, "from_environment", classmethod(lambda cls: api))
    monkeypatch.setattr("components.core.releases.publish", FakeStore())
    monkeypatch.setattr("serving.archive.build_mar", fake_build)
    monkeypatch.setattr("serving.client.predict", Service(cluster))
    monkeypatch.setattr(deploy_module.time, "sleep", lambda s: None)
    challenger = Behaviour(error_share=0.5) if case == "rollback" else SOUND
    monkeypatch.setattr(deploy_module, "fetch_rollout", ProxyFleet(cluster, TOKEN, challenger=challenger))
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))
    deployment = Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    serving = dict(home="unused", host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3, workers=1,
                   model_name="digits", startup_timeout_s=1, deploy_target="kubernetes")
    cfg = settings_of(serving=ServingConfig(**serving), rollout=RolloutConfig(
        strategy="shadow", share=0.5, min_requests=60, max_error_rate_increase=0.02, min_agreement=0.95))
    call = lambda: deploy_component(  # noqa: E731
        model=Model(name="model", uri=str(inputs.model)), dataset=Dataset(name="dataset", uri=str(inputs.dataset)),
        cfg=cfg, deployment=deployment, metrics=metrics, namespace=NS, pipeline_auth_file=str(inputs.token),
        run_id="kfp-mlops-r8n2v")
    if case == "never-ready":
        with pytest.raises(ReleaseRolledBack, match="never became ready"):
            call()
    else:
        call()
    released, decided = Ledger(tmp_path / "ledger").records()
    assert released.type == "released" and released.data["strategy"] == "shadow"
    assert released.data["model_version"] == NEW_VERSION and released.data["release_id"] == NEW_RELEASE
    assert decided.type == ("promoted" if case == "promote" else "rolled_back") and list(decided.parents) == [released.id]
    assert decided.data["challenger_version"] == NEW_VERSION and decided.data["champion_version"] == OLD_VERSION
    if case == "never-ready":
        assert decided.data["reason"].startswith("challenger never became ready: ProgressDeadlineExceeded")
        assert_left_clean(cluster, routed=False)
        return
    record = json.loads((tmp_path / "out" / "deployment").read_text())
    assert record["rollout"]["decision"] == case and decided.data["evidence"] == record["rollout"]["evidence"]
    assert decided.data["criteria"] == record["rollout"]["criteria"]
    assert metrics.metadata["rollout_promoted"] == (1.0 if case == "promote" else 0.0)
    assert metrics.metadata["rollout_challenger_requests"] == record["rollout"]["evidence"]["challenger"]["requests"]
    assert cluster.serving_version() == (NEW_VERSION if case == "promote" else OLD_VERSION)
    assert_left_clean(cluster, routed=True)
