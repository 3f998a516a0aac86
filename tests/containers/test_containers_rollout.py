"""Shadow and canary rollouts, run for real on the pods the manifests describe (components/deploy/pods): the dev
overlay's stable serving Deployment with the champion's release, and the challenger Deployment as the deploy step
applies it (``challenger.render_challenger`` of the stable one, with the challenger's release), both fetching
their .mar from a real S3 server (moto) and serving it with TorchServe behind the auth proxy of the serving image.

The rollout ConfigMap is changed as the deploy step changes it and reaches the stable pod's proxy the way the
kubelet delivers it (the ConfigMap volume's file replaced: ``Pod.update_config_map``); client requests go through
the stable pod's proxy (where the Service sends them), and the step's evidence reader asks the pod's ``GET
/rollout`` with the pipeline's source token. Needs an engine and the images of this tree (`make image`).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import numpy as np
import pytest
import requests
import test_containers_manifests as manifests_tests
from conftest import settings_of
from test_containers_manifests import CLIENT_TOKEN, SOURCE_TOKEN, cluster_state, engine_with, images_of

from components.core import names
from components.deploy import pods
from components.deploy.kubernetes.challenger import encode, proxy_port, render_challenger, rollout_document
from components.deploy.kubernetes.evidence import EvidenceBook, fetch_rollout, poll_pods
from components.deploy.kubernetes.release import Release, render_release
from components.deploy.rollout.decision import decide
from pipelines.config import RolloutConfig

CHAMPION, CHALLENGER = "champion-1", "challenger-2"
SERVING_S3_SECRET = "kfp-mlops-serving-s3"

# The moto server of test_containers_manifests.py, for this module's pods (module-scoped fixtures of their own).
objects, s3 = manifests_tests.objects, manifests_tests.s3


@pytest.fixture(scope="module")
def engine(objects, container_engine):
    return engine_with(container_engine, images_of(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT)))


@pytest.fixture(scope="module")
def releases(objects, s3, engine, tmp_path_factory):
    """One digits model trained here, published twice (the champion's release and the challenger's, told apart by
    their model version): the two versions answer alike, so a shadow comparison agrees."""
    from conftest import train_digits_classifier

    from components.core import blobs
    from components.core.blobs import Storage
    from components.core.releases import publish
    from serving.archive import build_mar

    stable = pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT)
    fetch = next(c for c in pods.pod_template(stable)["spec"]["initContainers"] if c["name"] == "fetch-model")
    model_uri = next(e["value"] for e in fetch["env"] if e["name"] == names.MODEL_URI_ENV)
    Storage().client.create_bucket(Bucket=blobs.split_s3(model_uri)[0])
    work = tmp_path_factory.mktemp("releases")
    x, y = train_digits_classifier(work / "champion", model_version=CHAMPION)
    shutil.copytree(work / "champion", work / "challenger")
    metadata = json.loads((work / "challenger" / "metadata.json").read_text())
    (work / "challenger" / "metadata.json").write_text(json.dumps({**metadata, "model_version": CHALLENGER}))
    out = {"x": x, "y": y}
    for version, model_dir in ((CHAMPION, work / "champion"), (CHALLENGER, work / "challenger")):
        build_mar(model_dir, work / f"release-{version}", "digits", version)
        manifest = publish(work / f"release-{version}", model_uri)
        out[version] = Release("digits", version, manifest["version"], model_uri, namespace=stable["metadata"]["namespace"])
    return out


@pytest.fixture(scope="module")
def serving(objects, engine, releases, s3):
    """The challenger pod (as the deploy step applies it), then the stable pod (the champion's release), both ready."""
    from components.deploy.containers import apply_release

    configmaps, secrets = cluster_state(objects, s3, SERVING_S3_SECRET)
    stable = pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT)
    stable = apply_release(stable, render_release(stable, releases[CHAMPION]))
    challenger_release = Release("digits", CHALLENGER, releases[CHALLENGER].release_id, releases[CHALLENGER].model_uri,
                                 namespace=stable["metadata"]["namespace"], deployment_name=names.SERVING_CHALLENGER)
    applied = render_challenger(stable, pods.find(objects, "Deployment", names.SERVING_CHALLENGER), challenger_release, 1)
    challenger_workload = {"kind": "Deployment", "metadata": applied["metadata"], "spec": applied["spec"]}
    started = []
    try:
        for workload, prefix in ((challenger_workload, "challenger"), (stable, "stable")):
            pod = pods.start_pod(workload, configmaps=configmaps, secrets=secrets, client=engine,
                                 name=f"kfp-mlops-rollout-{prefix}-{uuid.uuid4().hex[:6]}")
            started.append(pod)
            pod.wait_ready(timeout_s=300)
        yield {"challenger": started[0], "stable": started[1], "port": proxy_port(pods.pod_template(stable)["spec"])}
    finally:
        for pod in reversed(started):
            pod.stop(grace_period_s=5)


def as_listed(pod) -> dict:
    """The pod as the Kubernetes API would list it: what the deploy step's evidence reader reads."""
    return {"metadata": {"name": pod.name, "uid": pod.metadata["uid"]},
            "status": {"podIP": pod.ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def route(serving, document: dict | None) -> None:
    """What the deploy step's JSON patch of the rollout ConfigMap does, as the kubelet delivers it to the pod; then
    wait until the stable pod's proxy has read it (it checks its file once a second)."""
    text = encode(document) if document else "{}"
    assert serving["stable"].update_config_map(names.ROLLOUT_CONFIG_MAP, {names.ROLLOUT_FILE_KEY: text}) == ["rollout"]
    want = (document["challenger"]["version"], document["challenger"]["mode"]) if document else (None, None)
    url = f"http://{serving['stable'].ip}:{serving['port']}/rollout"
    deadline = time.monotonic() + 30
    while (lambda answer: (answer["version"], answer["mode"]))(fetch_rollout(url, SOURCE_TOKEN)) != want:
        assert time.monotonic() < deadline, f"the proxy never loaded {text}"
        time.sleep(0.2)


def send(serving, images) -> list[dict]:
    from serving.client import encode_png

    url = serving["stable"].url("inference", "/predictions/digits")  # the Service's targetPort on the stable pod
    answers = []
    for image in images:
        answer = requests.post(url, data=encode_png(image), timeout=30,
                               headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    return answers


def inference_requests(pod) -> float:
    """TorchServe's own count of the inference requests it answered (its Prometheus metrics, port 8082)."""
    text = requests.get(pod.url("metrics", "/metrics"), timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ts_inference_requests_total"))


def evidence_of(serving, version: str, mode: str, until) -> EvidenceBook:
    """Poll the stable pod's GET /rollout as the deploy step does, until ``until(evidence)``."""
    deadline = time.monotonic() + 60
    while True:
        book = EvidenceBook(mode, version)
        poll = poll_pods([as_listed(serving["stable"])], serving["port"], SOURCE_TOKEN, book, fetch_rollout)
        assert (poll.ready, poll.routing, poll.silent) == (1, 1, [])
        if until(book.evidence(0)) or time.monotonic() > deadline:
            return book
        time.sleep(0.5)


def settings(strategy: str, min_requests: int):
    return settings_of(rollout=RolloutConfig(strategy=strategy, share=1.0, min_requests=min_requests,
                                             max_p99_ratio=20.0)).rollout


@pytest.mark.containers
def test_shadow_mirrors_client_requests_to_the_challenger_pod(serving, releases):
    challenger = serving["challenger"]
    document = rollout_document(releases[CHALLENGER], "shadow", 1.0,
                                f"http://{challenger.ip}:{serving['port']}")  # the challenger Service's endpoint
    assert document["challenger"]["token_file"] == names.PROXY_SOURCE_TOKEN_FILE
    before = inference_requests(challenger)
    route(serving, document)
    answers = send(serving, releases["x"][:24])
    assert {a["model_version"] for a in answers} == {CHAMPION}, "in shadow every client answer is the champion's"
    book = evidence_of(serving, CHALLENGER, "shadow", lambda e: e.compared >= 24)
    evidence = book.evidence(elapsed_s=1.0)
    assert (evidence.champion.requests, evidence.challenger.requests, evidence.challenger.errors) == (24, 24, 0)
    assert (evidence.compared, evidence.agreed) == (24, 24), "the same weights name the same classes"
    assert inference_requests(challenger) - before == 24, "every mirrored copy reached the challenger's TorchServe"
    decision = decide(evidence, settings("shadow", 24))
    assert decision.action == "promote", decision.reason


@pytest.mark.containers
def test_canary_answers_a_share_of_client_requests_from_the_challenger_pod(serving, releases):
    challenger = serving["challenger"]
    document = rollout_document(releases[CHALLENGER], "canary", 0.5, f"http://{challenger.ip}:{serving['port']}")
    before = inference_requests(challenger)
    route(serving, document)
    answers = send(serving, releases["x"][:40])
    versions = [a["model_version"] for a in answers]
    assert set(versions) == {CHAMPION, CHALLENGER}, "a share answered by each"
    answered_by_challenger = versions.count(CHALLENGER)
    assert inference_requests(challenger) - before == answered_by_challenger
    book = evidence_of(serving, CHALLENGER, "canary", lambda e: e.champion.requests + e.challenger.requests >= 40)
    evidence = book.evidence(elapsed_s=1.0)
    assert evidence.challenger.requests == answered_by_challenger and evidence.champion.requests == 40 - answered_by_challenger
    assert evidence.compared == 0, "canary: nothing is answered twice"
    served = [a["class_index"] for a in answers]
    assert np.mean(np.array(served) == releases["y"][:40]) >= 0.85


@pytest.mark.containers
def test_a_cleared_rollout_file_leaves_no_trace_in_the_serving_path(serving, releases):
    route(serving, None)
    before = inference_requests(serving["challenger"])
    answers = send(serving, releases["x"][:10])
    assert {a["model_version"] for a in answers} == {CHAMPION}
    assert inference_requests(serving["challenger"]) == before, "nothing reaches the challenger any more"
    poll = poll_pods([as_listed(serving["stable"])], serving["port"], SOURCE_TOKEN, EvidenceBook("canary", CHALLENGER),
                     fetch_rollout)
    assert (poll.ready, poll.routing) == (1, 0)
