"""Deploy step on Kubernetes (components/deploy/kubernetes/), without a cluster: every phase of a release, its
rollback and the pipeline Role, against the API server stand-in of k8s_api_server.py (the real ``kubernetes``
client talking over loopback to recorded API objects, every call authorized with RBAC)."""

import io
import json
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import settings_of
from k8s_api_server import (
    BEARER,
    NAME,
    NEW_RELEASE,
    NEW_VERSION,
    NS,
    OLD_VERSION,
    PIPELINE_ACCOUNT,
    STORE,
    ApiHandler,
    Attributes,
    FakeCluster,
    bound_rules,
    forbidden,
    load,
    rbac_allows,
    request_attributes,
    validate_strict,
)
from kfp.dsl import Artifact, Dataset, Metrics, Model
from PIL import Image
from test_manifests import find

from components.core.data import Splits, save_splits
from components.deploy import kubernetes as k8s_deploy
from components.deploy.kubernetes import (
    DeployError,
    KubernetesApi,
    Release,
    ReleaseRolledBack,
    RollbackFailed,
    deploy_kubernetes,
)
from components.deploy.kubernetes import deploy as deploy_module
from components.deploy.kubernetes.release import render_release
from pipelines.config import ServingConfig

TOKEN = "client-token-for-the-smoke-test-0123"
ENDPOINT = f"http://{NAME}.{NS}.svc.cluster.local:8080/predictions/digits"
CLASS_NAMES = [str(i) for i in range(10)]


@pytest.fixture
def serve_cluster():
    """serve_cluster(FakeCluster) -> KubernetesApi whose real ApiClient talks to it over loopback."""
    from kubernetes import client

    started = []

    def start(cluster: FakeCluster) -> KubernetesApi:
        server = ThreadingHTTPServer(("127.0.0.1", 0), ApiHandler)  # the client's pool may open several connections
        server.daemon_threads = True
        server.cluster = cluster
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        configuration.api_key = {"authorization": BEARER}
        api_client = client.ApiClient(configuration)
        started.append((server, api_client))
        return KubernetesApi(api_client)

    yield start
    for server, api_client in started:
        api_client.close()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the step's other collaborators

@dataclass
class Inputs:
    model: Path
    dataset: Path
    token: Path


@pytest.fixture
def inputs(tmp_path) -> Inputs:
    """A model artifact (metadata only: the archive builder is a fake, except in the end-to-end test),
    eight test images whose pixel value tells their label, and the clients' token file."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "metadata.json").write_text(json.dumps({"model_version": NEW_VERSION, "class_names": CLASS_NAMES}))
    labels = np.arange(8) % 10
    images = (labels[:, None, None, None] * 20 / 255.0 * np.ones((1, 1, 8, 8))).astype(np.float32)
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=empty, val_y=np.zeros(0, np.int64),
                       test_x=images, test_y=labels.astype(np.int64), pool_x=empty, class_names=CLASS_NAMES),
                tmp_path / "dataset")
    (tmp_path / "token").write_text(TOKEN + "\n")
    return Inputs(tmp_path / "model", tmp_path / "dataset", tmp_path / "token")


class FakeService:
    """The Service in front of the serving pods: answers as the handler does, with the version that is live."""

    def __init__(self, cluster: FakeCluster, broken: tuple[str, ...] = ()):
        self.cluster, self.broken, self.calls = cluster, broken, []

    def __call__(self, endpoint, body, token, source=None, **_):
        assert endpoint == ENDPOINT and token == TOKEN and source == "smoke-test"
        version = self.cluster.serving_version()
        self.calls.append(version)
        label = int(np.asarray(Image.open(io.BytesIO(body)))[0, 0]) // 20
        if version in self.broken:
            label = (label + 1) % 10  # a model that answers, wrongly
        p = {name: (0.9 if i == label else 0.01) for i, name in enumerate(CLASS_NAMES)}
        return {"label": CLASS_NAMES[label], "class_index": label, "confidence": 0.9, "probabilities": p,
                "model_version": version}


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


BUILT: list[dict] = []  # the model-config settings each fake_build call was given


def fake_build(model_dir, release_dir, model_name, version, **settings):
    BUILT.append(settings)
    Path(release_dir).mkdir(parents=True)
    mar = Path(release_dir) / f"{model_name}.mar"
    mar.write_bytes(b"PK\x03\x04 model archive of " + version.encode())
    return mar


class FakeStore:
    def __init__(self):
        self.published = []

    def __call__(self, release_dir, uri):
        self.published.append((sorted(p.name for p in Path(release_dir).iterdir()), uri))
        return {"version": NEW_RELEASE, "uri": uri, "files": [{"path": "digits.mar"}]}


SERVING_SETTINGS = ("model_name", "model_store_uri", "rollout_timeout_s", "workers", "batch_size", "max_batch_delay_ms")


def run(api, cluster, inputs, *, broken=(), store=None, **overrides):
    """deploy_kubernetes against the fake cluster; ``overrides`` are serving settings or the step's keywords."""
    store = store or FakeStore()
    service = FakeService(cluster, broken)
    time_ = FakeTime()
    serving = {"rollout_timeout_s": 900, **{k: overrides.pop(k) for k in SERVING_SETTINGS if k in overrides}}
    kwargs = dict(namespace=NS, token_file=inputs.token, run_id="kfp-mlops-r8n2v", api=api, publish=store,
                  build_archive=fake_build, send=service, sleep=time_.sleep, clock=time_.clock, poll_s=5)
    kwargs.update(overrides)
    cfg = settings_of(serving=ServingConfig(**serving))
    return deploy_kubernetes(inputs.model, inputs.dataset, cfg.serving, **kwargs), service, store


def patches(cluster: FakeCluster, content_type: str) -> list[dict]:
    return [r["body"] for r in cluster.requests if r["method"] == "PATCH" and r["content_type"] == content_type]


def assert_allowed_by_the_pipeline_role(cluster: FakeCluster) -> None:
    """Every call the step made was authorized by the pipeline's Roles (the fake refuses the others)."""
    assert cluster.requests and len(cluster.authorized) == len(cluster.requests), \
        [r["path"] for r in cluster.requests]
    assert {a.verb for a in cluster.authorized} <= {"get", "list", "patch"}, "the step never creates or deletes"


# ---------------------------------------------------------------- the step against the fake API server

def test_a_good_release_is_applied_rolled_out_and_smoke_tested(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"},
                          pods="pods-new-release-starting.json")
    record, service, store = run(serve_cluster(cluster), cluster, inputs)

    assert store.published == [(["digits.mar"], STORE)], "the .mar goes to the store the pods fetch from"
    (apply,) = [r for r in cluster.requests if r["method"] == "PATCH"]
    assert apply["query"] == {"fieldManager": "kfp-mlops", "force": "true"}
    assert apply["content_type"] == "application/apply-patch+yaml"
    assert apply["body"] == render_release(load("deployment-serving.json"),
                                           Release("digits", NEW_VERSION, NEW_RELEASE, STORE, run_id="kfp-mlops-r8n2v"))
    validate_strict(cluster.deployment)
    assert cluster.serving_version() == NEW_VERSION
    assert cluster.history()[-1] == (5, f"model digits v{NEW_VERSION} (release {NEW_RELEASE[:12]}) from run kfp-mlops-r8n2v")

    assert record["endpoint"] == ENDPOINT and record["token_file"] == record["source_token_file"] == str(inputs.token)
    assert record["model_version"] == NEW_VERSION and record["release_id"] == NEW_RELEASE
    assert record["revision"] == "5" and record["previous_revision"] == "4"
    assert record["previous_model_version"] == OLD_VERSION
    assert record["request_log_dir"] == "s3://kfp-mlops/request-logs/digits"  # from the storage ConfigMap
    assert record["smoke_test_images"] == 8 and record["smoke_test_accuracy"] == 1.0
    assert record["deployment_rollout"]["polls"] == 4 and record["deployment_rollout"]["ok"]
    assert set(service.calls) == {NEW_VERSION}
    json.dumps(record)  # the deployment artifact is this record as JSON
    assert_allowed_by_the_pipeline_role(cluster)


@pytest.mark.parametrize("case", ["progress-deadline", "crashloop", "smoke-test"])
def test_a_failed_release_is_rolled_back_to_the_previous_revision(serve_cluster, inputs, case):
    statuses = {8: "rollout-complete.json" if case == "smoke-test" else "rollout-progress-deadline-exceeded.json",
                9: "rollback-complete.json"}
    pods = "pods-new-release-crashloop.json" if case == "crashloop" else "pods-new-release-starting.json"
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", statuses, pods=pods)
    with pytest.raises(ReleaseRolledBack) as caught:
        run(serve_cluster(cluster), cluster, inputs, broken=(NEW_VERSION,) if case == "smoke-test" else ())
    message, report = str(caught.value), caught.value.report

    expected_failure = {
        "progress-deadline": "rollout failed: ProgressDeadlineExceeded",
        "crashloop": "rollout failed: pod kfp-mlops-serving-6d8f7b9c4-w7x2k: container torchserve CrashLoopBackOff",
        "smoke-test": f"smoke test through {ENDPOINT} failed: 8/8 answered, accuracy 0.00",
    }[case]
    assert f"release of model v{NEW_VERSION} failed: {expected_failure}" in message
    assert f"Rolled back to revision 4 (model v{OLD_VERSION}), now revision 6" in message
    assert "rollout complete" in message and "smoke test passed" in message
    if case == "crashloop":
        assert report["deployment_rollout"]["polls"] == 1, "a crash-looping pod fails the rollout at once, not at the deadline"
    if case == "smoke-test":
        assert report["smoke_test"]["attempts"] == 2

    # kubectl rollout undo's patch: the previous ReplicaSet's template, guarded by a test of the failed release.
    (undo,) = patches(cluster, "application/json-patch+json")
    assert undo[0] == {"op": "test", "path": "/spec/template/metadata/annotations/kfp-mlops.io~1model-release",
                       "value": NEW_RELEASE}
    assert cluster.deployment["spec"]["template"] == load("deployment-serving.json")["spec"]["template"]
    validate_strict(cluster.deployment)
    assert cluster.serving_version() == OLD_VERSION and report["recovery"]["ok"]
    # History: the failed release keeps its line; the restored revision moved to the top with the reason.
    history = dict(cluster.history())
    assert history[5].startswith(f"model digits v{NEW_VERSION}")
    assert history[6].startswith(f"rollback to revision 4: model digits v{OLD_VERSION}") and expected_failure[:40] in history[6]
    assert 4 not in history, "the restored ReplicaSet is revision 6 now, as after kubectl rollout undo"
    assert_allowed_by_the_pipeline_role(cluster)


def test_a_failing_rollback_is_an_error_naming_both(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json",
                          {8: "rollout-progress-deadline-exceeded.json"}, pods="pods-new-release-starting.json")
    cluster.errors.append((lambda r: r["content_type"] == "application/json-patch+json", "status-500-etcd-timeout.json"))
    with pytest.raises(RollbackFailed) as caught:
        run(serve_cluster(cluster), cluster, inputs)
    message = str(caught.value)
    assert f"release of model v{NEW_VERSION} failed (rollout failed: ProgressDeadlineExceeded" in message
    assert f"the rollback to revision 4 (model v{OLD_VERSION}) failed too: HTTP 500: etcdserver: request timed out" in message
    assert f"kubectl -n {NS} rollout undo deployment/{NAME} --to-revision=4" in message
    assert caught.value.report["recovery"] == {"action": "rollback", "ok": False, "message": "HTTP 500: etcdserver: request timed out"}


@pytest.mark.parametrize("scale_down_fails", [False, True])
def test_a_failed_first_release_scales_the_deployment_to_zero(serve_cluster, inputs, scale_down_fails):
    """Nothing to roll back to (the base manifests' placeholder revision never served): no pods, clear error."""
    cluster = FakeCluster("deployment-unreleased.json", "replicasets-unreleased.json",
                          {2: "rollout-first-release-complete.json"}, pods="pods-new-release-starting.json")
    if scale_down_fails:
        cluster.errors.append((lambda r: r["content_type"] == "application/json-patch+json", "status-403-patch-forbidden.json"))
    with pytest.raises(RollbackFailed if scale_down_fails else ReleaseRolledBack) as caught:
        run(serve_cluster(cluster), cluster, inputs, broken=(NEW_VERSION,))
    message = str(caught.value)
    assert f"first release of model v{NEW_VERSION} failed" in message and "accuracy 0.00" in message
    if scale_down_fails:
        assert "scaling kfp-mlops/kfp-mlops-serving to 0 failed too (HTTP 403: deployments.apps" in message
        assert f"kubectl -n {NS} scale deployment/{NAME} --replicas=0" in message
        assert cluster.deployment["spec"]["replicas"] == 2
    else:
        assert "no earlier release to roll back to" in message and "scaled to 0 replicas" in message
        assert cluster.deployment["spec"]["replicas"] == 0
        validate_strict(cluster.deployment)
        assert cluster.history()[-1][1].endswith("scaled to 0 (no earlier release to roll back to)")
    (scale,) = patches(cluster, "application/json-patch+json")
    assert {"op": "add", "path": "/spec/replicas", "value": 0} in scale


def test_the_next_release_scales_a_zeroed_deployment_back_up(serve_cluster, inputs):
    cluster = FakeCluster("deployment-unreleased.json", "replicasets-unreleased.json",
                          {3: "rollout-scale-up-complete.json"}, pods="pods-new-release-starting.json")
    cluster.deployment["spec"]["replicas"] = 0  # as a failed first release leaves it
    record, _, _ = run(serve_cluster(cluster), cluster, inputs, scale_up_replicas=1)
    (scale_up,) = patches(cluster, "application/json-patch+json")
    assert scale_up == [{"op": "test", "path": "/spec/replicas", "value": 0}, {"op": "add", "path": "/spec/replicas", "value": 1}]
    assert record["smoke_test_accuracy"] == 1.0 and cluster.deployment["spec"]["replicas"] == 1


@pytest.mark.parametrize("failing, status_file, message", [
    ("GET", "status-404-deployment-not-found.json", "not found: apply the manifests first (kubectl apply -k manifests/overlays/<env>"),
    ("GET", "status-500-etcd-timeout.json", "cannot read Deployment kfp-mlops/kfp-mlops-serving: HTTP 500: etcdserver"),
    ("PATCH", "status-403-patch-forbidden.json", "was refused, so nothing changed: HTTP 403: deployments.apps \"kfp-mlops-serving\" is forbidden"),
])
def test_api_errors_before_the_rollout_change_nothing(serve_cluster, inputs, failing, status_file, message):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    cluster.errors.append((lambda r: r["method"] == failing and r["path"].endswith(f"/deployments/{NAME}"), status_file))
    store = FakeStore()
    with pytest.raises(DeployError) as caught:
        run(serve_cluster(cluster), cluster, inputs, store=store)
    assert message in str(caught.value)
    assert not isinstance(caught.value, (ReleaseRolledBack, RollbackFailed))
    assert cluster.deployment == load("deployment-serving.json"), "the Deployment is untouched"
    assert store.published == ([] if failing == "GET" else [(["digits.mar"], STORE)])


def test_a_deployment_deleted_after_it_was_read_is_not_recreated(serve_cluster, inputs):
    """The step only updates the Deployment the manifests created: an apply that would create it is
    refused by RBAC (no create), and the step says to apply the manifests instead."""
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    cluster.reads_before_deletion = 1  # gone right after the step read it
    with pytest.raises(DeployError) as caught:
        run(serve_cluster(cluster), cluster, inputs)
    message = str(caught.value)
    assert f"Deployment {NS}/{NAME} is gone (deleted after it was read): apply the manifests first" in message
    assert "kubectl apply -k manifests/overlays/<env>" in message and "may not create one" in message
    assert not isinstance(caught.value, (ReleaseRolledBack, RollbackFailed))
    assert cluster.deployment is None, "nothing was created"
    (apply,) = [r for r in cluster.requests if r["method"] == "PATCH"]
    assert apply["content_type"] == "application/apply-patch+yaml"


ROLLOUT_OBJECTS = {"kfp-mlops-serving-challenger", "kfp-mlops-serving-rollout"}


def test_the_pipeline_role_grants_exactly_what_the_step_calls(serve_cluster, inputs):
    """A release that is rolled back makes every kind of call the step has; each one is authorized by
    the pipeline Role, and each of the Role's verbs (and names) is used by one of them: no spare grant."""
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json",
                          {8: "rollout-progress-deadline-exceeded.json", 9: "rollback-complete.json"},
                          pods="pods-new-release-starting.json")
    with pytest.raises(ReleaseRolledBack):
        run(serve_cluster(cluster), cluster, inputs)
    assert_allowed_by_the_pipeline_role(cluster)
    used = set(cluster.authorized)
    for rule in bound_rules(role=PIPELINE_ACCOUNT):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [""]:
                        if name in ROLLOUT_OBJECTS:
                            continue  # shadow and canary rollouts: test_deploy_k8s_staged.py checks those grants
                        assert Attributes(verb, group, resource, name) in used, \
                            f"the Role grants {verb} on {resource} {name!r} but the step never calls it"


def test_rbac_as_the_fake_api_server_applies_it():
    """Names bind get/patch, and list only with a metadata.name field selector; create never has a name."""
    rules = [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [NAME], "verbs": ["get", "list"]}]
    path = f"/apis/apps/v1/namespaces/{NS}/deployments"
    assert rbac_allows(rules, request_attributes("GET", f"{path}/{NAME}", {}))
    assert not rbac_allows(rules, request_attributes("GET", f"{path}/other", {}))
    assert not rbac_allows(rules, request_attributes("GET", path, {}))
    assert rbac_allows(rules, request_attributes("GET", path, {"fieldSelector": f"metadata.name={NAME}"}))
    assert not rbac_allows(rules, request_attributes("GET", path, {"fieldSelector": f"metadata.name={NAME},a=b"}))
    assert not rbac_allows(rules, request_attributes("GET", path, {"watch": "true", "fieldSelector": f"metadata.name={NAME}"}))
    assert request_attributes("POST", path, {}) == Attributes("create", "apps", "deployments", "")
    assert request_attributes("GET", f"/api/v1/namespaces/{NS}/pods", {"labelSelector": "a=b"}) == \
        Attributes("list", "", "pods", "")
    # The fake's 403 is worded like the recorded one.
    assert forbidden(Attributes("patch", "apps", "deployments", NAME), f"system:serviceaccount:{NS}:default") == \
        load("status-403-patch-forbidden.json")


def test_the_smoke_test_token_is_the_pipelines_source_token():
    """The step reads the Secret the pipeline mounts for it, and the serving pods' proxy takes that
    Secret as the tokens that may tag traffic (X-Request-Source)."""
    from pipelines import pod_settings

    assert k8s_deploy.TOKEN_SECRET == pod_settings.SERVING_SOURCE_TOKEN_SECRET == "kfp-mlops-serving-source-token"
    assert k8s_deploy.TOKEN_FILE == f"{pod_settings.SERVING_SOURCE_TOKEN_MOUNT}/token"
    spec = find("base", "Deployment", NAME)["spec"]["template"]["spec"]
    proxy = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
    source_file = proxy["command"][proxy["command"].index("--source-token-file") + 1]
    mount = next(m for m in proxy["volumeMounts"] if source_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == k8s_deploy.TOKEN_SECRET


@pytest.mark.parametrize("case, error, message", [
    ("no-model", FileNotFoundError, "metadata.json is missing"),
    ("empty-test-split", ValueError, "empty test split"),
    ("no-token", FileNotFoundError, "mount the Secret kfp-mlops-serving-source-token"),
    ("empty-token", ValueError, "serving token file"),
    ("other-model", DeployError, "the Deployment serves model 'digits' (--models digits=digits.mar), not 'letters'"),
])
def test_bad_inputs_are_refused_before_anything_is_published(serve_cluster, inputs, tmp_path, case, error, message):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {})
    overrides = {}
    if case == "no-model":
        inputs.model = tmp_path / "nothing-here"
    elif case == "empty-test-split":
        empty = np.zeros((0, 1, 8, 8), np.float32)
        save_splits(Splits(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64),
                           empty, CLASS_NAMES), inputs.dataset)
    elif case == "no-token":
        inputs.token.unlink()
    elif case == "empty-token":
        inputs.token.write_text("\n")
    elif case == "other-model":
        overrides["model_name"] = "letters"
    store = FakeStore()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        run(serve_cluster(cluster), cluster, inputs, store=store, **overrides)
    assert store.published == [] and not [r for r in cluster.requests if r["method"] == "PATCH"]


def test_end_to_end_with_the_real_archiver_and_model_store(serve_cluster, inputs, tmp_path):
    """The real .mar builder and components.core.releases.publish into a local model store: the release the
    Deployment now names is fetchable and holds the archive TorchServe loads."""
    import torch

    from components.core import releases
    from components.core.models import Classifier, EncoderSpec, save_classifier

    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), inputs.model,
                    {"class_names": CLASS_NAMES, "model_version": NEW_VERSION})
    store_dir = tmp_path / "store"
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    record, _, _ = run(serve_cluster(cluster), cluster, inputs, publish=releases.publish, build_archive=None,
                       model_store_uri=str(store_dir), workers=2, batch_size=8, max_batch_delay_ms=7)
    fetch = next(c for c in cluster.deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == "fetch-model")
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["KFP_MLOPS_MODEL_URI"] == str(store_dir) and env["KFP_MLOPS_MODEL_VERSION"] == record["release_id"]
    manifest = releases.fetch(env["KFP_MLOPS_MODEL_URI"], tmp_path / "pod-store", version=env["KFP_MLOPS_MODEL_VERSION"])
    assert [f["path"] for f in manifest["files"]] == ["digits.mar"]
    assert (tmp_path / "pod-store" / "digits.mar").stat().st_size > 1000
    # The batching and worker settings (non-default here) travel in the archive the pods load.
    import zipfile

    with zipfile.ZipFile(tmp_path / "pod-store" / "digits.mar") as z:
        config = yaml.safe_load(z.read(json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]))
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"], config["maxBatchDelay"]) == (2, 2, 8, 7)
    assert record["model_config"] == {"workers": 2, "batch_size": 8, "max_batch_delay_ms": 7}


# ---------------------------------------------------------------- the KFP component's cluster path

def test_bad_batching_fails_before_anything_is_published(serve_cluster, inputs):
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    store = FakeStore()
    with pytest.raises(ValueError, match="max_batch_delay_ms must be an integer from 1"):
        run(serve_cluster(cluster), cluster, inputs, store=store, max_batch_delay_ms=0)
    assert store.published == [] and patches(cluster, "application/apply-patch+yaml") == []


def test_deploy_component_on_kubernetes_writes_the_record(serve_cluster, inputs, tmp_path, monkeypatch):
    from components.deploy.component import deploy_component

    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    api = serve_cluster(cluster)
    service = FakeService(cluster)
    monkeypatch.setattr(KubernetesApi, "from_environment", classmethod(lambda cls: api))
    monkeypatch.setattr("components.core.releases.publish", FakeStore())
    monkeypatch.setattr("serving.archive.build_mar", fake_build)
    monkeypatch.setattr("serving.client.predict", service)
    monkeypatch.setattr(deploy_module.time, "sleep", lambda s: None)
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))  # the storage ConfigMap's (an s3:// prefix)
    deployment = Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    common = dict(model=Model(name="model", uri=str(inputs.model)), dataset=Dataset(name="dataset", uri=str(inputs.dataset)),
                  deployment=deployment, metrics=metrics)
    serving = dict(home="unused", host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3, workers=1,
                   model_name="digits", startup_timeout_s=1)
    with pytest.raises(ValueError, match="deploy_target must be 'local' or 'kubernetes'"):
        deploy_component(**common, cfg=settings_of(serving=ServingConfig(**serving, deploy_target="k8s")))

    BUILT.clear()
    cfg = settings_of(serving=ServingConfig(**serving, deploy_target="kubernetes", batch_size=16, max_batch_delay_ms=3))
    endpoint = deploy_component(**common, cfg=cfg, namespace=NS, pipeline_auth_file=str(inputs.token),
                                run_id="kfp-mlops-r8n2v")
    assert BUILT == [{"workers": 1, "batch_size": 16, "max_batch_delay_ms": 3}], "serving.* settings reach the .mar"
    record = json.loads(Path(deployment.path).read_text())
    assert endpoint == record["endpoint"] == ENDPOINT and record["target"] == "kubernetes"
    assert {"endpoint", "token_file", "request_log_dir", "model_version"} <= set(record), "what the monitor step reads"
    assert metrics.metadata["smoke_test_accuracy"] == 1.0 and "rollout_seconds" in metrics.metadata
    assert not (tmp_path / "unused").exists(), "the local server's settings are not used on the cluster"
    from components.core.ledger import Ledger

    (released,) = Ledger(tmp_path / "ledger").records()
    assert released.data["release_id"] == NEW_RELEASE and released.data["model_uri"] == STORE
    assert released.data["target"] == "kubernetes" and record["released_record"] == released.id
