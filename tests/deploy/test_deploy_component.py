"""The deploy step's component: the serving settings reach the target that serves, and the pipeline wires
every one of them into the deploy task."""

from __future__ import annotations

import pytest
from conftest import settings_of
from kfp.dsl import Artifact, Dataset, Metrics, Model

from pipelines.config import ServingConfig


@pytest.mark.parametrize("target", ["local", "kubernetes"])
def test_deploy_component_passes_batching_and_workers_on(tmp_path, monkeypatch, target):
    """serving.batch_size / max_batch_delay_ms / workers reach the step that builds the .mar, on both targets."""
    import components.deploy.kubernetes as k8s_mod
    import components.deploy.local as deploy_mod
    from components.deploy.component import deploy_component

    seen = {}

    def fake(model_dir, dataset_dir, serving, *args, **kwargs):
        seen.update(workers=serving.workers, batch_size=serving.batch_size,
                    max_batch_delay_ms=serving.max_batch_delay_ms)
        return {"endpoint": "http://x/predictions/digits", "model_version": "v", "token_file": "t",
                "smoke_test_images": 1, "smoke_test_accuracy": 1.0, "smoke_test_latency_ms_mean": 1.0}

    monkeypatch.setattr(deploy_mod, "deploy_local", fake)
    monkeypatch.setattr(k8s_mod, "deploy_kubernetes", fake)
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))  # the storage ConfigMap's, on a cluster
    deploy_component(
        model=Model(name="model", uri=str(tmp_path / "m")), dataset=Dataset(name="dataset", uri=str(tmp_path / "d")),
        cfg=settings_of(serving=ServingConfig(
            home=str(tmp_path / "home"), host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3,
            workers=3, model_name="digits", startup_timeout_s=1, batch_size=8, max_batch_delay_ms=7,
            deploy_target=target)),
        deployment=Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment")),
        metrics=Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics")))
    assert (seen["workers"], seen["batch_size"], seen["max_batch_delay_ms"]) == (3, 8, 7)
    from components.core.ledger import Ledger

    (released,) = Ledger(tmp_path / "ledger").records()
    assert released.type == "released" and released.data["target"] == target and released.data["model_version"] == "v"


def test_the_deploy_step_records_the_release_and_its_rollout_decision(tmp_path, monkeypatch):
    """released (parent: the run's gated record), then promoted or rolled_back with the evidence; the deployment
    record says where the ledger is and which released record serves; the decision is in the step's metrics."""
    import json

    import components.deploy.local as deploy_mod
    from components.core.ledger import Ledger
    from components.deploy.component import deploy_component

    ledger = Ledger(tmp_path / "home" / "ledger")
    champion_gated = ledger.append("gated", {"run_id": "r0", "model_version": "v0", "gates": {}, "passed": True})
    champion = ledger.append("released", {"model_name": "digits", "model_version": "v0", "target": "local",
                                          "endpoint": "http://x/predictions/digits", "strategy": "replace"},
                             parents=[champion_gated])
    gated = ledger.append("gated", {"run_id": "r1", "model_version": "v1", "gates": {}, "passed": True})
    outcomes = {}
    for decision in ("rollback", "promote"):
        rollout = {"strategy": "shadow", "share": 0.2, "decision": decision, "reason": f"{decision}: agreement",
                   "criteria": [{"name": "agreement", "held": decision == "promote"}],
                   "evidence": {"challenger": {"requests": 210}, "champion": {"requests": 1050}},
                   "seconds_to_decision": 12.5, "champion_version": "v0", "challenger_version": "v1"}
        monkeypatch.setattr(deploy_mod, "deploy_local", lambda *a, _outcome=rollout, **k: {
            "endpoint": "http://x/predictions/digits", "model_version": "v0" if _outcome["decision"] == "rollback"
            else "v1", "token_file": "t", "smoke_test_images": 1, "smoke_test_accuracy": 1.0,
            "smoke_test_latency_ms_mean": 1.0, "rollout": _outcome})
        out = tmp_path / decision
        metrics = Metrics(name="metrics", uri=str(out / "metrics"))
        deploy_component(model=Model(name="model", uri=str(tmp_path / "m")),
                         dataset=Dataset(name="dataset", uri=str(tmp_path / "d")),
                         cfg=settings_of(serving=ServingConfig(home=str(tmp_path / "home"))),
                         deployment=Artifact(name="deployment", uri=str(out / "deployment")), metrics=metrics,
                         gated_record=gated.id, run_id="r1")
        outcomes[decision] = (json.loads((out / "deployment").read_text()), metrics.metadata)
    records = Ledger(tmp_path / "home" / "ledger").records()
    assert [r.type for r in records[3:]] == ["released", "rolled_back", "released", "promoted"]
    shadow, rolled_back, _, promoted = records[3:]
    assert shadow.parents == (gated.id,) and shadow.data["strategy"] == "shadow" and shadow.data["model_version"] == "v1"
    assert rolled_back.parents == (shadow.id,) and rolled_back.data["evidence"]["challenger"]["requests"] == 210
    assert rolled_back.data["reason"] == "rollback: agreement" and promoted.data["seconds_to_decision"] == 12.5
    record, metrics = outcomes["rollback"]
    assert record["released_record"] == champion.id, "after a rollback the champion's release serves"
    assert record["ledger"] == str((tmp_path / "home" / "ledger").resolve())
    assert metrics["rollout_promoted"] == 0.0 and metrics["rollout_challenger_requests"] == 210
    record, metrics = outcomes["promote"]
    assert record["released_record"] == records[5].id and metrics["rollout_promoted"] == 1.0
    assert metrics["rollout_seconds_to_decision"] == 12.5


def test_the_pipeline_wires_every_serving_setting_the_deploy_step_takes(tmp_path):
    """Every serving.* run parameter reaches the deploy task (none silently ignored)."""
    import yaml

    from pipelines.config import ClusterConfig, parameters
    from pipelines.pipeline import compile_pipeline

    compile_pipeline(str(tmp_path / "pipeline.yaml"), ClusterConfig())
    spec = next(yaml.safe_load_all((tmp_path / "pipeline.yaml").read_text()))
    tasks = {}

    def walk(dag):
        for name, task in dag.get("tasks", {}).items():
            tasks[name] = task
            walk(spec["components"][task["componentRef"]["name"]].get("dag", {}))

    walk(spec["root"]["dag"])
    inputs = tasks["deploy"]["inputs"]["parameters"]
    for p in parameters(("serving",)):
        if p.local_only:  # the local server's settings are constants on a cluster
            assert "runtimeValue" in inputs[p.key], p.key
        else:
            # from the settings task (the run form's boxes and other_settings, checked), into the gates' conditions
            assert inputs[p.key] == {"componentInputParameter": f"pipelinechannel--settings-{p.key}"}, \
                f"{p.key} is not wired"


def test_pipeline_wires_serving_batching_into_the_deploy_task():
    """The compiled pipeline feeds the deploy task from the serving.* run parameters."""
    from pipelines.pipeline import build_pipeline

    spec = build_pipeline(retries=False).pipeline_spec
    tasks = {}

    def collect(component_spec):
        for name, task in component_spec.dag.tasks.items():
            tasks[name] = task
            sub = spec.components[task.component_ref.name]
            if sub.HasField("dag"):
                collect(sub)

    collect(spec.root)
    params = tasks["deploy"].inputs.parameters
    wired = {name: params[f"serving_{name}"].component_input_parameter
             for name in ("workers", "batch_size", "max_batch_delay_ms")}
    assert all(wired.values()), wired
    assert all(v.endswith(f"serving_{k}") for k, v in wired.items()), wired


def test_a_challenger_that_fails_before_any_evidence_is_recorded_rolled_back(tmp_path, monkeypatch):
    """The Kubernetes rollout's challenger never became ready: the step fails, and the ledger says so."""
    import components.deploy.kubernetes as k8s_mod
    from components.core.ledger import Ledger
    from components.deploy.component import deploy_component
    from components.deploy.kubernetes import ReleaseRolledBack

    report = {"model_uri": "s3://kfp-mlops/models/digits", "release_id": "7a1f",
              "rollout": {"strategy": "canary", "share": 0.1, "decision": "rollback",
                          "reason": "challenger never became ready: ImagePullBackOff", "criteria": [], "evidence": {},
                          "seconds_to_decision": None, "champion_version": "v0", "challenger_version": "v1"}}

    def fails(*args, **kwargs):
        raise ReleaseRolledBack("the challenger model v1 never became ready", report)

    monkeypatch.setattr(k8s_mod, "deploy_kubernetes", fails)
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))
    with pytest.raises(ReleaseRolledBack, match="never became ready"):
        deploy_component(model=Model(name="model", uri=str(tmp_path / "m")),
                         dataset=Dataset(name="dataset", uri=str(tmp_path / "d")),
                         cfg=settings_of(serving=ServingConfig(deploy_target="kubernetes")),
                         deployment=Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment")),
                         metrics=Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics")))
    released, rolled_back = Ledger(tmp_path / "ledger").records()
    assert (released.data["strategy"], released.data["model_version"], released.data["release_id"]) == (
        "canary", "v1", "7a1f")
    assert rolled_back.parents == (released.id,) and "ImagePullBackOff" in rolled_back.data["reason"]
