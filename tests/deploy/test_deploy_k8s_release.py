"""The deploy step's release rendering, rollback patch and rollout decisions, on recorded API objects."""

import copy
import json

import pytest
from k8s_api_server import (
    DATA,
    NAME,
    NEW_RELEASE,
    NEW_VERSION,
    OLD_VERSION,
    STORE,
    PatchTestFailed,
    json_patch,
    load,
    ssa_merge,
    validate_strict,
    without_pod_hash,
)
from test_manifests import TARGETS, find

from components.deploy.kubernetes.release import REVISION, Release, label_value, render_release, rollback_patch
from components.deploy.kubernetes.rollout import pod_problems, rollout_state

# ---------------------------------------------------------------- recordings and rendering

def test_the_recorded_api_objects_are_valid_kubernetes_objects():
    count = 0
    for path in sorted(DATA.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, list) or data.get("kind") == "Status":
            continue
        items = ([{"apiVersion": data["apiVersion"], "kind": data["kind"][: -len("List")], **i} for i in data["items"]]
                 if data["kind"].endswith("List") else [data])
        for obj in items:
            validate_strict(obj)
            count += 1
    assert count >= 10


@pytest.mark.parametrize("image", ["", "registry.example/kfp-mlops:0.2.0"])
@pytest.mark.parametrize("target", TARGETS)
def test_render_release_touches_only_the_release_fields(target, image):
    deployment = find(target, "Deployment", NAME)
    release = Release("digits", NEW_VERSION, NEW_RELEASE, STORE, image, run_id="kfp-mlops-r8n2v")
    config = render_release(deployment, release)
    validate_strict(config)  # the apply configuration itself is a valid (partial) Deployment
    applied = ssa_merge(deployment, config)
    validate_strict(applied)

    pod = applied["spec"]["template"]
    fetch = next(c for c in pod["spec"]["initContainers"] if c["name"] == "fetch-model")
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["KFP_MLOPS_MODEL_URI"] == STORE and env["KFP_MLOPS_MODEL_VERSION"] == NEW_RELEASE
    for labels in (applied["metadata"]["labels"], pod["metadata"]["labels"]):
        assert labels["kfp-mlops.io/model-version"] == labels["app.kubernetes.io/version"] == NEW_VERSION
    assert pod["metadata"]["annotations"]["kfp-mlops.io/model-release"] == NEW_RELEASE
    assert applied["metadata"]["annotations"]["kubernetes.io/change-cause"] == (
        f"model digits v{NEW_VERSION} (release {NEW_RELEASE[:12]}) from run kfp-mlops-r8n2v"
        + (f", image {image}" if image else ""))
    images = {c["image"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]}
    original = {c["image"] for c in deployment["spec"]["template"]["spec"]["initContainers"]
                + deployment["spec"]["template"]["spec"]["containers"]}
    assert images == ({image} if image else original), "the CUDA overlay keeps its image unless one is given"
    assert applied["spec"]["selector"] == deployment["spec"]["selector"]
    assert "replicas" not in config["spec"], "the HPA owns replicas"

    # Everything else is exactly what the overlay rendered: resources, GPU placement, security, probes.
    def release_fields_dropped(obj):
        obj = copy.deepcopy(obj)
        for labels in (obj["metadata"]["labels"], obj["spec"]["template"]["metadata"]["labels"]):
            labels.pop("kfp-mlops.io/model-version"), labels.pop("app.kubernetes.io/version")
        obj["metadata"]["annotations"].pop("kubernetes.io/change-cause")
        obj["spec"]["template"]["metadata"]["annotations"].pop("kfp-mlops.io/model-release", None)
        for c in obj["spec"]["template"]["spec"]["initContainers"] + obj["spec"]["template"]["spec"]["containers"]:
            c.pop("image")
            c["env"] = [e for e in c.get("env", []) if e["name"] not in ("KFP_MLOPS_MODEL_URI", "KFP_MLOPS_MODEL_VERSION")]
        return obj

    assert release_fields_dropped(applied) == release_fields_dropped(deployment)


@pytest.mark.parametrize("text, value", [
    ("c0ffee123456", "c0ffee123456"),
    ("run 7 / best!", "run-7-best"),
    ("--1.0--", "1.0"),
    ("x" * 80, "x" * 63),
    ("", "unknown"),
    ("???", "unknown"),
])
def test_label_value(text, value):
    assert label_value(text) == value


def test_a_rollback_restores_the_previous_template_like_kubectl_rollout_undo():
    live = load("deployment-serving.json")
    previous = next(rs for rs in load("replicasets-serving.json")["items"]
                    if rs["metadata"]["annotations"][REVISION] == "4")
    release = Release("digits", NEW_VERSION, NEW_RELEASE, STORE)
    failed = ssa_merge(live, render_release(live, release))
    restored = json_patch(failed, rollback_patch(previous, release, "rollout failed: stuck"))
    validate_strict(restored)
    assert restored["spec"]["template"] == without_pod_hash(previous["spec"]["template"]) == live["spec"]["template"]
    assert restored["metadata"]["labels"]["kfp-mlops.io/model-version"] == OLD_VERSION
    assert restored["metadata"]["annotations"]["kubernetes.io/change-cause"].startswith(
        f"rollback to revision 4: model digits v{OLD_VERSION}")
    # Only while the failed release is live: a newer release made meanwhile is never rolled back over.
    newer = ssa_merge(live, render_release(live, Release("digits", "feed00000000", "f" * 64, STORE)))
    with pytest.raises(PatchTestFailed):
        json_patch(newer, rollback_patch(previous, release, "rollout failed: stuck"))


# ---------------------------------------------------------------- rollout decisions on recorded statuses

@pytest.mark.parametrize("recording, index, generation, done, failed, message", [
    ("rollout-complete.json", 0, 8, False, False, "waiting for the controller to see generation 8"),
    ("rollout-complete.json", 1, 8, False, False, "1 of 2 new replicas updated"),
    ("rollout-complete.json", 2, 8, False, False, "1 old replicas pending termination"),
    ("rollout-complete.json", 3, 8, True, False, "2 of 2 replicas available"),
    ("rollout-progress-deadline-exceeded.json", 0, 8, False, False, "1 of 2 new replicas updated"),
    ("rollout-progress-deadline-exceeded.json", 1, 8, False, True, "ProgressDeadlineExceeded: ReplicaSet"),
    ("rollback-complete.json", 1, 9, True, False, "2 of 2 replicas available"),
    ("rollout-first-release-complete.json", 0, 2, False, False, "1 of 2 new replicas updated"),
])
def test_rollout_state_on_recorded_statuses(recording, index, generation, done, failed, message):
    deployment = load("deployment-serving.json")
    deployment["status"] = load(recording)[index]
    state = rollout_state(deployment, generation)
    assert (state.done, state.failed) == (done, failed)
    assert state.message.startswith(message)


def test_pod_problems_on_recorded_pods():
    (problem,) = pod_problems(load("pods-new-release-crashloop.json")["items"])
    assert "container torchserve CrashLoopBackOff after 4 restarts" in problem
    assert "Failed to load model digits" in problem, "the termination message (last log lines) is quoted"
    assert pod_problems(load("pods-new-release-crashloop.json")["items"], crashloop_restarts=5) == []
    assert pod_problems(load("pods-new-release-starting.json")["items"]) == []
