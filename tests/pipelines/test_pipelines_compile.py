"""The compiled KFP v2 YAML: task graph, GPU placement, parameters the UI can show, the
Kubernetes settings of every step, and a golden copy of the whole spec."""

import difflib
import os
import re
from pathlib import Path

import pytest
import yaml

from pipelines.config import CLUSTER, ClusterConfig, parameters
from pipelines.pipeline import SETTINGS_TASK, STEP_AREAS, STEPS, build_pipeline, compile_pipeline
from pipelines.pod_settings import RETRYABLE_STEPS, STEP_DEFAULTS, STORAGE_CONFIG_ENV, STORAGE_STEPS, step_settings
from pipelines.run_settings import OTHER_SETTINGS

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

    def deps(name):  # every step also takes its settings from the settings task
        return set(tasks[name].get("dependentTasks", [])) - {SETTINGS_TASK}

    assert set(tasks["ingest"]["dependentTasks"]) == {SETTINGS_TASK}
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


def test_the_run_form_is_the_few_marked_fields_and_other_settings_each_described_with_a_default(compiled):
    _, spec, _ = compiled
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    boxes = {p.key for p in parameters(target=CLUSTER) if p.form}
    assert 5 <= len(boxes) <= 10, "a handful of boxes: the stock run form lists them without descriptions"
    assert set(root_params) == boxes | {OTHER_SETTINGS}
    assert {"data_source", "pretrain_epochs", "finetune_epochs", "finetune_label_fraction", "finetune_dp_epsilon",
            "gates_min_test_accuracy", "rollout_strategy"} <= boxes
    for name, definition in root_params.items():
        assert definition.get("description"), f"{name} has no description"
        assert "defaultValue" in definition, f"{name} has no defaultValue"
    other = root_params[OTHER_SETTINGS]
    assert other["parameterType"] == "STRUCT" and "docs/configuration.md" in other["description"]
    # every run field without a box is in its default, by area, with its cluster value
    shown = {f"{area}_{name}" for area, fields in other["defaultValue"].items() for name in fields}
    assert shown == {p.key for p in parameters(target=CLUSTER) if not p.form}
    assert other["defaultValue"]["serving"]["deploy_target"] == "kubernetes"
    assert other["defaultValue"]["pretrain"]["batch_size"] == 128


def test_no_root_parameter_has_a_default_the_kfp_run_form_takes_for_missing(compiled):
    """KFP's run form (NewRunParametersV2) treats a falsy default (0, '', false) as a missing value and keeps
    Start disabled; such fields are declared as text ("0", "false", '""') and decoded by the step."""
    _, spec, _ = compiled
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    falsy = {name: d["defaultValue"] for name, d in root_params.items() if not d["defaultValue"]}
    assert not falsy, f"the KFP run form cannot start a run with these defaults: {falsy}"
    assert root_params["finetune_dp_epsilon"] == {
        "parameterType": "STRING", "defaultValue": "0.0", "isOptional": True,
        "description": root_params["finetune_dp_epsilon"]["description"]}
    assert root_params["pretrain_epochs"]["parameterType"] == "NUMBER_INTEGER", "truthy defaults keep their type"


def test_cluster_defaults_and_no_loopback_settings_in_the_run_form(compiled):
    _, spec, _ = compiled
    other = spec["root"]["inputDefinitions"]["parameters"][OTHER_SETTINGS]["defaultValue"]
    assert other["serving"]["deploy_target"] == "kubernetes"
    assert other["gates"]["champion_model"] == "store"
    for local_only in ("host", "inference_port", "management_port", "metrics_port", "home", "request_log_dir",
                       "startup_timeout_s"):
        assert local_only not in other["serving"], local_only
    assert "replay" not in other["rollout"] and "cluster" not in other


KFP_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN", str: "STRING"}


def test_the_settings_task_takes_the_run_form_and_outputs_every_field_typed(compiled):
    _, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    task = root[SETTINGS_TASK]
    assert "dependentTasks" not in task, "the settings task runs first"
    wired = task["inputs"]["parameters"]
    for name in spec["root"]["inputDefinitions"]["parameters"]:
        assert wired[name] == {"componentInputParameter": name}
    outputs = spec["components"][f"comp-{SETTINGS_TASK}"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == {
        p.key: KFP_TYPES[p.type] for p in parameters(target=CLUSTER)}
    assert wired["compiled_settings"]["runtimeValue"]["constant"]["pretrain"]["batch_size"] == 128
    assert "ingest" in {name for name, t in root.items() if SETTINGS_TASK in t.get("dependentTasks", [])}


def test_every_step_gets_each_field_of_its_config_areas_as_a_typed_input(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    for step, areas in STEP_AREAS.items():
        task_inputs = tasks[step]["inputs"]["parameters"]
        component_inputs = spec["components"][f"comp-{step}"]["inputDefinitions"]["parameters"]
        for p in (p for area in areas for p in parameters((area,))):
            wired = task_inputs[p.key]
            if p.local_only:  # not a run parameter on a cluster: the default goes in as a constant
                assert "constant" in wired["runtimeValue"], (step, p.key)
                continue
            # from the settings task's output; deploy and monitor sit in the gates' condition sub-DAGs,
            # which pass it down as a channel
            assert wired.get("taskOutputParameter") == {"outputParameterKey": p.key, "producerTask": SETTINGS_TASK} \
                or wired.get("componentInputParameter") == f"pipelinechannel--{SETTINGS_TASK}-{p.key}", (step, p.key)
            assert component_inputs[p.key]["parameterType"] == KFP_TYPES[p.type], (step, p.key)
            assert component_inputs[p.key]["description"] == p.help, (step, p.key)
        own = {p.key for area in areas for p in parameters((area,))}
        assert not {k for k in task_inputs if "_" in k and k.split("_")[0] in STEP_AREAS} - own, step


def test_compile_with_a_config_file_makes_its_values_the_run_forms_defaults(tmp_path):
    from pipelines.cli import main

    settings = tmp_path / "prod.yaml"
    settings.write_text("pretrain:\n  epochs: 7\ngates:\n  min_test_accuracy: 0.95\nserving:\n  model_store_uri: s3://models/x\n")
    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), "--config", str(settings)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    assert root_params["pretrain_epochs"]["defaultValue"] == 7
    assert root_params["gates_min_test_accuracy"]["defaultValue"] == 0.95
    other = root_params[OTHER_SETTINGS]["defaultValue"]
    assert other["serving"]["model_store_uri"] == "s3://models/x"
    assert other["serving"]["deploy_target"] == "kubernetes"
    compiled_in = spec["root"]["dag"]["tasks"][SETTINGS_TASK]["inputs"]["parameters"]["compiled_settings"]
    assert compiled_in["runtimeValue"]["constant"] == other, "a setting left out of other_settings keeps this value"


def test_every_step_runs_in_the_configured_image_without_runtime_installs(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len(STEPS) + 1  # the steps and the settings task
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


# --- Kubernetes settings of every step (kfp-kubernetes), asserted on the compiled spec ---

def _k8s(platform, step):
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{step}"]


def test_s3_credentials_come_from_the_secret_as_env_on_storage_steps_only(compiled):
    _, _, platform = compiled
    for step in STEPS:
        k8s = _k8s(platform, step)
        if step in STORAGE_STEPS:
            (secret,) = k8s["secretAsEnv"]
            assert secret["secretName"] == "kfp-mlops-s3" and secret["optional"] is False, step
            assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {
                ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")}, step
            (config_map,) = k8s["configMapAsEnv"]
            assert config_map["configMapName"] == "kfp-mlops-storage", step
            assert config_map["optional"] is True, "a key the ConfigMap lacks must leave the env unset, not block the pod"
            assert [m["envVar"] for m in config_map["keyToEnv"]] == list(STORAGE_CONFIG_ENV), step
        else:
            assert "secretAsEnv" not in k8s and "configMapAsEnv" not in k8s, f"{step} needs no S3 access"


def test_no_credentials_anywhere_in_parameters(compiled):
    path, spec, _ = compiled
    suspicious = ("secret", "access_key", "password", "token", "credential")
    root_params = spec["root"]["inputDefinitions"]["parameters"]
    component_params = [name for comp in spec["components"].values()
                         for name in comp.get("inputDefinitions", {}).get("parameters", {})]
    for name in list(root_params) + component_params:
        assert not any(word in name.lower() for word in suspicious), f"parameter {name!r} looks like a credential"
    # the only mention of the secret's keys is the secretAsEnv mapping in the platform spec
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump(spec)
    assert path.read_text().count("AWS_SECRET_ACCESS_KEY") == 2 * len(STORAGE_STEPS)  # secretKey + envVar per step


def test_every_step_has_its_timeout(compiled):
    _, _, platform = compiled
    for step in STEPS:
        assert int(_k8s(platform, step)["activeDeadlineSeconds"]) == STEP_DEFAULTS[step].timeout_s, step
    assert int(_k8s(platform, SETTINGS_TASK)["activeDeadlineSeconds"]) > 0


def test_retries_with_backoff_on_idempotent_steps_never_on_deploy(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    for step in STEPS:
        policy = tasks[step].get("retryPolicy")
        if step in RETRYABLE_STEPS:
            assert policy == {"maxRetryCount": 2, "backoffDuration": "30s", "backoffFactor": 2.0,
                              "backoffMaxDuration": "3600s"}, step
        else:
            assert policy is None, f"{step} acts on the live endpoint and must not be retried"
    assert "deploy" not in RETRYABLE_STEPS and "monitor" not in RETRYABLE_STEPS


def test_every_step_runs_non_root_with_pull_policy_and_resources(compiled):
    from pipelines.pipeline import SETTINGS_POD

    _, spec, platform = compiled
    for step, defaults in {**STEP_DEFAULTS, SETTINGS_TASK: SETTINGS_POD}.items():
        k8s = _k8s(platform, step)
        assert k8s["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}, step
        assert k8s["imagePullPolicy"] == "IfNotPresent", step
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"], resources["resourceMemoryRequest"],
                resources["resourceMemoryLimit"]) == (defaults.cpu_request, defaults.cpu_limit,
                                                      defaults.memory_request, defaults.memory_limit), step


def _compile(tmp_path, **cluster_fields):
    path = tmp_path / "p.yaml"
    compile_pipeline(str(path), ClusterConfig(**cluster_fields))
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], docs[1]


def test_cluster_config_changes_reach_the_compiled_spec(tmp_path):
    spec, platform = _compile(
        tmp_path, gpu_finetune=True, s3_secret_name="team-s3", s3_access_key_id_key="id",
        s3_secret_access_key_key="key", storage_config_map="", image_pull_policy="Always",
        retry_backoff_s=5, step_overrides="pretrain.timeout_s=43200, finetune.memory_limit=32Gi,ingest.retries=0")
    for step in ("pretrain", "finetune"):  # finetune joins pretrain on the GPU nodes
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        assert _k8s(platform, step)["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, step
        assert _k8s(platform, step)["tolerations"][0]["key"] == "nvidia.com/gpu", step
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    (secret,) = _k8s(platform, "ingest")["secretAsEnv"]
    assert secret["secretName"] == "team-s3"
    assert {(m["secretKey"], m["envVar"]) for m in secret["keyToEnv"]} == {
        ("id", "AWS_ACCESS_KEY_ID"), ("key", "AWS_SECRET_ACCESS_KEY")}
    assert "configMapAsEnv" not in _k8s(platform, "ingest")
    assert _k8s(platform, "deploy")["imagePullPolicy"] == "Always"
    assert _k8s(platform, "pretrain")["activeDeadlineSeconds"] == "43200"
    assert spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]["resourceMemoryLimit"] == "32Gi"
    tasks = _all_tasks(spec)
    assert "retryPolicy" not in tasks["ingest"]
    assert tasks["pretrain"]["retryPolicy"]["backoffDuration"] == "5s"


def test_local_runs_get_no_retries(tmp_path, monkeypatch):
    """kfp.local would honour retry policies; a local failure is deterministic, so they stay out."""
    from kfp import compiler
    from kfp.local import config as local_config

    monkeypatch.setattr(local_config.LocalExecutionConfig, "instance", object())  # as after local.init()
    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(ClusterConfig()), package_path=str(path))
    assert "retryPolicy" not in path.read_text()
    compile_pipeline(str(path), ClusterConfig())  # compiling for a cluster keeps them, whatever kfp.local's state
    assert "retryPolicy" in path.read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("pretrain.timeout=5", "unknown setting 'timeout'"),
        ("train.timeout_s=5", "unknown step 'train'"),
        ("pretrain_timeout_s=5", "is not 'step.setting=value'"),
        ("pretrain.timeout_s=", "is not 'step.setting=value'"),
        ("pretrain.timeout_s=soon", "timeout_s must be a whole number"),
        ("pretrain.timeout_s=0", "timeout_s must be positive"),
        ("ingest.retries=-1", "retries must be 0 or more"),
        ("deploy.retries=1", "deploy is not safe to retry"),
        ("monitor.retries=3", "monitor is not safe to retry"),
    ],
)
def test_bad_step_overrides_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError) as err:
        step_settings(ClusterConfig(step_overrides=overrides))
    assert message in str(err.value)


def test_cli_compile_rejects_bad_overrides(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["compile", "-o", str(tmp_path / "p.yaml"), "--cluster-step-overrides", "deploy.retries=2"]) == 1
    assert "deploy is not safe to retry" in capsys.readouterr().err


# --- golden copy of the compiled YAML ---

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "pipeline.yaml"
UPDATE_HINT = "UPDATE_GOLDEN=1 .venv/bin/pytest tests/pipelines/test_pipelines_compile.py -k golden"


def normalise(docs: list) -> str:
    """The compiled YAML without what other changes legitimately move.

    Kept: the task graph, conditions, inputs/outputs and their types, images, resources,
    retries, caching and every Kubernetes setting. Replaced by placeholders: the
    component source KFP embeds in each command (the step modules change often and have
    their own tests), descriptions, parameter defaults and the settings task's compiled
    values (they come from the config's help texts and defaults; the run form's tests check
    them), and the kfp version.
    """
    def walk(node, key=None):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "description":
                    out[k] = "<description>"
                elif k == "defaultValue" and key == "parameter":
                    out[k] = "<config default>"
                elif k == "constant" and isinstance(v, dict):
                    out[k] = "<compiled settings>"
                else:
                    out[k] = walk(v, "parameter" if key == "parameters" else k)
            return out
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and "\ndef " in node and "import kfp" in node:
            name = re.search(r"\ndef (\w+)\(", node).group(1)
            return f"<python source of {name}>"
        return node

    docs = [walk(d) for d in docs]
    docs[0]["sdkVersion"] = "kfp-<version>"
    return yaml.safe_dump_all(docs, sort_keys=True, width=120)


def test_compiled_yaml_matches_the_golden_copy(tmp_path):
    path = tmp_path / "pipeline.yaml"
    compile_pipeline(str(path), ClusterConfig())
    actual = normalise(list(yaml.safe_load_all(path.read_text())))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(actual)
    assert GOLDEN.is_file(), f"no golden file yet: run {UPDATE_HINT}"
    expected = GOLDEN.read_text()
    if actual != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                            "tests/golden/pipeline.yaml", "compiled now", n=2))
        lines = diff.splitlines()
        shown = "\n".join(lines[:120]) + (f"\n... ({len(lines) - 120} more diff lines)" if len(lines) > 120 else "")
        pytest.fail(f"the compiled pipeline differs from the golden copy:\n{shown}\n\n"
                    f"If the change is intended, review it and accept it with: {UPDATE_HINT}")
