"""``mlops releases rollback`` and ``promote`` on Kubernetes, against the recorded API responses of
k8s_api_server.py: the released record's published release is applied to the serving Deployment with the deploy
step's phases (server-side apply, rollout wait, smoke test through the Service, rollback when that fails), and
only a release that serves is recorded in the ledger, with who and why."""

from __future__ import annotations

import pytest
from k8s_api_server import NEW_RELEASE, NEW_VERSION, NS, OLD_VERSION, STORE, FakeCluster
from test_deploy_kubernetes import (  # noqa: F401 - fixtures
    ENDPOINT,
    FakeService,
    assert_allowed_by_the_pipeline_role,
    inputs,
    patches,
    serve_cluster,
)

from components.core.ledger import Ledger
from components.deploy.kubernetes import KubernetesApi
from components.deploy.kubernetes import deploy as deploy_module

OLD_RELEASE = "4b0d" * 16  # the release deployment-serving.json's revision 4 fetches


def released(ledger: Ledger, version: str, release_id: str, strategy: str = "replace", run: str = "run"):
    return ledger.append("released", {"model_name": "digits", "model_version": version, "target": "kubernetes",
                                      "endpoint": ENDPOINT, "strategy": strategy, "run_id": run,
                                      "model_uri": STORE, "release_id": release_id,
                                      "model_config": {"workers": 1, "batch_size": 32, "max_batch_delay_ms": 1}})


@pytest.fixture
def cluster_cli(serve_cluster, inputs, monkeypatch, tmp_path, run_cli):  # noqa: F811 - fixtures
    """run(cluster, *argv, broken=()) -> (code, out, err): `mlops releases ...` against the fake cluster."""

    def run(cluster: FakeCluster, *argv: str, broken: tuple[str, ...] = ()):
        api = serve_cluster(cluster)
        monkeypatch.setattr(KubernetesApi, "from_environment", classmethod(lambda cls: api))
        monkeypatch.setattr("serving.client.predict", FakeService(cluster, broken))
        monkeypatch.setattr(deploy_module.time, "sleep", lambda s: None)
        return run_cli(["releases", *argv, "--ledger", str(tmp_path / "ledger"), "--serving-deploy-target",
                        "kubernetes", "--namespace", NS, "--token-file", str(inputs.token), "--dataset",
                        str(inputs.dataset)])

    return run


def test_rollback_applies_the_release_that_served_before(cluster_cli, tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    earlier = released(ledger, NEW_VERSION, NEW_RELEASE, run="run-a")
    current = released(ledger, OLD_VERSION, OLD_RELEASE, run="run-b")  # what the recorded Deployment serves
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"},
                          pods="pods-new-release-starting.json")
    code, out, err = cluster_cli(cluster, "rollback", "--reason", "run-b's model answers slowly")
    assert code == 0, err
    (apply,) = patches(cluster, "application/apply-patch+yaml")
    assert cluster.serving_version() == NEW_VERSION, "the earlier release serves again"
    assert cluster.history()[-1][1] == f"model digits v{NEW_VERSION} (release {NEW_RELEASE[:12]}) from run run-a"
    rolled_back, back = Ledger(tmp_path / "ledger").records()[-2:]
    assert (rolled_back.type, rolled_back.data["model_version"], rolled_back.parents) == (
        "rolled_back", OLD_VERSION, (current.id,))
    assert back.data["strategy"] == "rollback" and back.data["release_id"] == NEW_RELEASE
    assert back.data["revision"] == "5" and set(back.parents) == {earlier.id, rolled_back.id}
    assert back.data["reason"] == "run-b's model answers slowly" and f"released {back.id}" in out
    assert_allowed_by_the_pipeline_role(cluster)


def test_promote_applies_a_challenger_its_rollout_rolled_back(cluster_cli, tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    released(ledger, OLD_VERSION, OLD_RELEASE)
    challenger = released(ledger, NEW_VERSION, NEW_RELEASE, strategy="canary")
    ledger.append("rolled_back", {"model_version": NEW_VERSION, "reason": "deadline without evidence",
                                  "automatic": True}, parents=[challenger])
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"},
                          pods="pods-new-release-starting.json")
    code, _, err = cluster_cli(cluster, "promote", NEW_VERSION[:6], "--reason", "quiet night: evidence by hand")
    assert code == 0, err
    assert cluster.serving_version() == NEW_VERSION
    ledger = Ledger(tmp_path / "ledger")
    again, promoted = ledger.records()[-2:]
    assert again.parents == (challenger.id,) and again.data["strategy"] == "promote"
    assert promoted.data["replaced_version"] == OLD_VERSION and promoted.data["automatic"] is False
    assert ledger.in_production().id == again.id and ledger.status(NEW_VERSION) == "production"


def test_a_release_that_fails_its_smoke_test_is_rolled_back_and_not_recorded(cluster_cli, tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    released(ledger, NEW_VERSION, NEW_RELEASE)
    released(ledger, OLD_VERSION, OLD_RELEASE)
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json",
                          {8: "rollout-complete.json", 9: "rollback-complete.json"}, pods="pods-new-release-starting.json")
    code, _, err = cluster_cli(cluster, "rollback", "--reason", "try", broken=(NEW_VERSION,))
    assert code == 1 and f"release of model v{NEW_VERSION} failed: smoke test through {ENDPOINT} failed" in err
    assert f"Rolled back to revision 4 (model v{OLD_VERSION})" in err
    assert cluster.serving_version() == OLD_VERSION
    assert [r.type for r in Ledger(tmp_path / "ledger").records()] == ["released", "released"], "nothing recorded"


def test_a_local_release_cannot_be_applied_to_the_cluster(cluster_cli, tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("released", {"model_name": "digits", "model_version": NEW_VERSION, "target": "local",
                               "endpoint": "http://127.0.0.1:8080/predictions/digits", "strategy": "replace"})
    released(ledger, OLD_VERSION, OLD_RELEASE)
    cluster = FakeCluster("deployment-serving.json", "replicasets-serving.json", {8: "rollout-complete.json"})
    code, _, err = cluster_cli(cluster, "rollback", "--reason", "x")
    assert code == 1 and "names no published release" in err and not cluster.requests
