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

    def fake(model_dir, dataset_dir, serving, **kwargs):
        seen.update(workers=serving.workers, batch_size=serving.batch_size,
                    max_batch_delay_ms=serving.max_batch_delay_ms)
        return {"endpoint": "http://x/predictions/digits", "model_version": "v", "token_file": "t",
                "smoke_test_images": 1, "smoke_test_accuracy": 1.0, "smoke_test_latency_ms_mean": 1.0}

    monkeypatch.setattr(deploy_mod, "deploy_local", fake)
    monkeypatch.setattr(k8s_mod, "deploy_kubernetes", fake)
    deploy_component(
        model=Model(name="model", uri=str(tmp_path / "m")), dataset=Dataset(name="dataset", uri=str(tmp_path / "d")),
        cfg=settings_of(serving=ServingConfig(
            home=str(tmp_path / "home"), host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3,
            workers=3, model_name="digits", startup_timeout_s=1, batch_size=8, max_batch_delay_ms=7,
            deploy_target=target)),
        deployment=Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment")),
        metrics=Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics")))
    assert (seen["workers"], seen["batch_size"], seen["max_batch_delay_ms"]) == (3, 8, 7)


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
            assert inputs[p.key] == {"componentInputParameter": f"pipelinechannel--{p.key}"}, f"{p.key} is not wired"


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
