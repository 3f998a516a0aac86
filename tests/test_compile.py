"""The compiled KFP v2 YAML: task graph, GPU placement, parameters the UI can show."""

import yaml
import pytest

from pipelines.config import ClusterConfig, parameters
from pipelines.pipeline import STEPS, compile_pipeline

IMAGE = "registry.example.com/team/kfp-mlops:1.2.3"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    cluster = ClusterConfig(image=IMAGE, gpu_accelerator="nvidia.com/gpu", gpu_limit=2,
                            gpu_node_selector_key="cloud.google.com/gke-accelerator",
                            gpu_node_selector_value="nvidia-h100-80gb", gpu_toleration_key="nvidia.com/gpu")
    compile_pipeline(str(path), cluster)
    docs = list(yaml.safe_load_all(path.read_text()))
    return path, docs[0], (docs[1] if len(docs) > 1 else {})


def _all_tasks(spec):
    """Task name -> task, through the nested condition sub-DAGs."""
    tasks = {}

    def walk(dag):
        for name, task in dag.get("tasks", {}).items():
            tasks[name] = task
            ref = task["componentRef"]["name"]
            sub = spec["components"][ref].get("dag")
            if sub:
                walk(sub)

    walk(spec["root"]["dag"])
    return tasks


def test_yaml_loads_back_with_kfp(compiled):
    from kfp import components

    path, _, _ = compiled
    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "kfp-mlops"


def test_task_graph(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    assert set(STEPS) <= set(tasks), f"missing steps: {set(STEPS) - set(tasks)}"

    def deps(name):
        return set(tasks[name].get("dependentTasks", []))

    assert deps("pretrain") == {"ingest"}
    assert deps("finetune") == {"ingest", "pretrain"}
    for gate in ("evaluate", "privacy", "robustness"):
        assert deps(gate) == {"ingest", "finetune"}
    root_tasks = spec["root"]["dag"]["tasks"]
    assert "deploy" not in root_tasks and "monitor" not in root_tasks, "deploy/monitor must sit under the gate conditions"
    # deploy sits inside three nested conditions, one per gate
    conditions = [t["triggerPolicy"]["condition"] for t in tasks.values() if "triggerPolicy" in t]
    joined = " ".join(conditions)
    for gate in ("evaluate", "privacy", "robustness"):
        assert f"pipelinechannel--{gate}-Output" in joined
    assert "deployment" in tasks["monitor"]["inputs"]["artifacts"]


def test_every_root_parameter_has_description_and_default(compiled):
    _, spec, _ = compiled
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(root_params) == {p.key for p in parameters()}
    for name, definition in root_params.items():
        assert definition.get("description"), f"{name} has no description"
        assert "defaultValue" in definition, f"{name} has no defaultValue"


def test_every_step_runs_in_the_configured_image_without_runtime_installs(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(STEPS)
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"] == IMAGE, name
        assert "pip install" not in " ".join(container["command"] + container.get("args", [])), name


def test_pretrain_requests_a_gpu_on_gpu_nodes(compiled):
    _, spec, platform = compiled
    resources = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pretrain"]
    assert k8s["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["tolerations"][0]["effect"] == "NoSchedule"
    # only pretrain is placed on GPUs
    for name, ex in spec["deploymentSpec"]["executors"].items():
        if name != "exec-pretrain":
            assert "accelerator" not in ex["container"].get("resources", {}), name


def test_deploy_and_monitor_are_never_cached(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    for name in ("deploy", "monitor"):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache", False), name
    assert tasks["ingest"]["cachingOptions"]["enableCache"] is True


def test_cli_compile(tmp_path):
    from pipelines.cli import main

    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), "--cluster-image", "example.org/x:9"]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()} == {"example.org/x:9"}
