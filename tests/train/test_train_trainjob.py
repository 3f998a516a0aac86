"""Multi-node pretraining as a Kubeflow Trainer v2 TrainJob, tested on recorded API objects (no cluster).

The recordings in tests/data/trainjob/ have the shape the API server returns for
trainjobs.trainer.kubeflow.org/v1alpha1; a fake CustomObjectsApi replays them in
order and raises the kubernetes client's real ApiException for error responses.
Time is injected: no test sleeps.
"""

import copy
import json
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from components.train.trainjob import (
    ANNOTATION_OUTPUT_URI,
    ANNOTATION_SPEC_HASH,
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    TORCHRUN_RESERVED_ENV,
    VERSION,
    TrainJobError,
    TrainJobFailed,
    TrainJobSpec,
    TrainJobTimeout,
    collect_output,
    render_trainjob,
    run_multinode_pretrain,
    submit_trainjob,
    trainjob_name,
    trainjob_state,
    validate_trainjob,
    wait_for_trainjob,
)

DATA = Path(__file__).parent.parent / "data" / "trainjob"


def recording(name: str) -> dict:
    return json.loads((DATA / name).read_text())


ERRORS = recording("errors.json")

# The spec the recordings were made with (2 nodes x 4 GPUs on the torch-distributed runtime).
RECORDED_SPEC = dict(
    name="pretrain-5c1d0e9a47b2", namespace="kubeflow-user-example-com",
    image="ghcr.io/kfp-mlops/kfp-mlops:0.1.0-cuda",
    dataset_uri="s3://mlpipeline/kfp-mlops/runs/7f3e2b1c/ingest/dataset",
    output_uri="s3://mlpipeline/kfp-mlops/runs/7f3e2b1c/pretrain/encoder",
    num_nodes=2, gpus_per_node=4, cpu_per_node="16", memory_per_node="64Gi",
    entry_args={"objective": "contrastive", "epochs": 30, "batch_size": 256, "learning_rate": 0.003,
                "temperature": 0.2, "width": 32, "embed_dim": 128, "seed": 0},
    env={"AWS_ENDPOINT_URL": "http://seaweedfs.kubeflow:8333", "AWS_REGION": "us-east-1"},
    s3_secret_name="kfp-mlops-s3",
    labels={"pipelines.kubeflow.org/run-id": "7f3e2b1c-5d2a-4f0e-9a43-1c2d3e4f5a6b"},
)
NAME, NAMESPACE = RECORDED_SPEC["name"], RECORDED_SPEC["namespace"]


def make_spec(**overrides) -> TrainJobSpec:
    return TrainJobSpec(**{**copy.deepcopy(RECORDED_SPEC), **overrides})


# ------------------------------------------------------------------ fakes


class _HttpResponse:
    """What urllib3 hands ApiException(http_resp=...) in the real client."""

    def __init__(self, code: int, reason: str, body: dict):
        self.status, self.reason, self.data = code, reason, json.dumps(body).encode()

    def getheaders(self):
        return {"Content-Type": "application/json"}


def api_error(key: str) -> ApiException:
    e = ERRORS[key]
    return ApiException(http_resp=_HttpResponse(e["code"], e["reason_phrase"], e["body"]))


class RecordedCustomObjectsApi:
    """Stands in for kubernetes.client.CustomObjectsApi: same method signatures, replays recordings.

    ``gets`` is a list of GET bodies (dicts) or ApiExceptions, returned/raised in order;
    the last entry repeats once the list is used up (a job that never changes).
    """

    def __init__(self, gets=(), creates=(), deletes=()):
        self.gets, self.creates, self.deletes = list(gets), list(creates), list(deletes)
        self.calls: list[tuple] = []

    @staticmethod
    def _next(queue, default):
        item = queue.pop(0) if len(queue) > 1 else (queue[0] if queue else default)
        if isinstance(item, Exception):
            raise item
        return copy.deepcopy(item)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self.calls.append(("create", group, version, namespace, plural, copy.deepcopy(body)))
        return self._next(self.creates, body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("get", group, version, namespace, plural, name))
        if self.count("get") > 500:  # a wait loop that never ends must fail the test, not hang it
            raise AssertionError("more than 500 GETs: the wait loop does not stop")
        return self._next(self.gets, None)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append(("delete", group, version, namespace, plural, name, kwargs))
        return self._next(self.deletes, {"kind": "Status", "status": "Success"})

    def count(self, verb: str) -> int:
        return sum(1 for c in self.calls if c[0] == verb)


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait(api, clock, lines=None, **kwargs):
    kwargs = {"timeout_s": 3600, "poll_s": 15, **kwargs}
    return wait_for_trainjob(api, NAMESPACE, NAME, clock=clock, sleep=clock.sleep,
                             log=(lines.append if lines is not None else lambda _: None), **kwargs)


# ------------------------------------------------------------------ rendering


def test_rendered_trainjob_is_schema_valid_with_the_right_image_command_nodes_and_gpus():
    obj = render_trainjob(make_spec())
    validate_trainjob(obj)
    assert obj["apiVersion"] == API_VERSION == "trainer.kubeflow.org/v1alpha1"
    assert obj["kind"] == KIND == "TrainJob"
    assert obj["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    trainer = obj["spec"]["trainer"]
    assert trainer["image"] == "ghcr.io/kfp-mlops/kfp-mlops:0.1.0-cuda"
    # torchrun from the image; its rendezvous flags come from the runtime's PET_* env.
    assert trainer["command"] == ["torchrun", "--module", "components.pretrain.pretrain"]
    assert trainer["args"][:4] == ["--dataset", RECORDED_SPEC["dataset_uri"], "--out", RECORDED_SPEC["output_uri"]]
    assert trainer["args"][4:8] == ["--objective", "contrastive", "--epochs", "30"]
    assert "--batch-size" in trainer["args"] and "--learning-rate" in trainer["args"]
    assert trainer["numNodes"] == 2
    assert trainer["numProcPerNode"] == 4  # one rank per GPU
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["resourcesPerNode"]["requests"] == {"cpu": "16", "memory": "64Gi"}
    assert obj["metadata"]["annotations"][ANNOTATION_OUTPUT_URI] == RECORDED_SPEC["output_uri"]


def test_credentials_are_secret_references_never_literals():
    env = {e["name"]: e for e in render_trainjob(make_spec())["spec"]["trainer"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"] == {"secretKeyRef": {"name": "kfp-mlops-s3", "key": key}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://seaweedfs.kubeflow:8333"
    assert not TORCHRUN_RESERVED_ENV & set(env)  # the Torch plugin's webhook would reject these


def test_rendered_spec_is_what_the_api_server_recorded():
    """The recorded create response is our object plus the server's defaults (suspend, managedBy)."""
    recorded = recording("created.json")["object"]
    obj = render_trainjob(make_spec())
    server_spec = dict(recorded["spec"])
    assert server_spec.pop("suspend") is False
    assert server_spec.pop("managedBy") == "trainer.kubeflow.org/trainjob-controller"
    assert server_spec == obj["spec"]
    for key in ("name", "namespace", "labels", "annotations"):
        assert recorded["metadata"][key] == obj["metadata"][key]


def test_torchrun_accepts_the_command_with_the_env_the_torch_runtime_injects(monkeypatch):
    """Parse command+args exactly as torchrun will on node 1, with the PET_* values torch.go sets."""
    from torch.distributed.run import parse_args

    trainer = render_trainjob(make_spec())["spec"]["trainer"]
    for key, value in {"PET_NNODES": "2", "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                       "PET_NODE_RANK": "1", "PET_MASTER_ADDR": f"{NAME}-node-0-0.{NAME}",
                       "PET_MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(key, value)
    assert trainer["command"][0] == "torchrun"
    parsed = parse_args(trainer["command"][1:] + trainer["args"])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank) == ("2", "4", 1)
    assert parsed.master_addr == f"{NAME}-node-0-0.{NAME}"
    assert parsed.module and parsed.training_script == "components.pretrain.pretrain"
    assert parsed.training_script_args == trainer["args"]


def test_cpu_only_nodes_request_no_gpus_and_run_one_process():
    obj = render_trainjob(make_spec(gpus_per_node=0, num_nodes=3))
    validate_trainjob(obj)
    trainer = obj["spec"]["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 1
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"]


def test_boolean_entry_args_become_bare_flags_and_queue_name_a_kueue_label():
    obj = render_trainjob(make_spec(entry_args={"compile": True, "amp": False, "epochs": 2}, queue_name="gpu-queue"))
    validate_trainjob(obj)
    assert obj["spec"]["trainer"]["args"][4:] == ["--compile", "--epochs", "2"]
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_trainjob_name_is_deterministic_short_and_a_valid_label():
    a = trainjob_name("pretrain", "run-1", "s3://b/out")
    assert a == trainjob_name("pretrain", "run-1", "s3://b/out")  # a retried step adopts its own job
    assert a != trainjob_name("pretrain", "run-2", "s3://b/out")
    assert a.startswith("pretrain-") and len(a) <= 40
    assert trainjob_name("9 Weird_Prefix!", "x")[0].isalpha()
    validate_trainjob(render_trainjob(make_spec(name=trainjob_name("9 Weird_Prefix!", "x"))))


@pytest.mark.parametrize("overrides, message", [
    ({"name": "Pretrain_Job"}, "RFC 1035"),
    ({"name": "p" * 64}, "at most 63"),
    ({"num_nodes": 0}, "num_nodes must be >= 1"),
    ({"dataset_uri": "/tmp/dataset"}, "must be a URI every node can reach"),
    ({"output_uri": "runs/encoder"}, "output_uri"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "hunter2"}}, "looks like a credential"),
    ({"env": {"PET_NNODES": "2"}}, "set by the Trainer's Torch plugin"),
    ({"num_proc_per_node": 8}, "ranks would share a GPU"),
    ({"entry_args": {"layers": [1, 2]}}, "only str, int, float and bool"),
    ({"entry_args": {"out": "s3://x"}}, "must not set --out"),
    ({"entry_args": {"bad-key": 1}}, "is not a flag name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_specs_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match="invalid TrainJobSpec|entry_args") as err:
        render_trainjob(make_spec(**overrides))
    assert message in str(err.value)


def _set(path, value):
    def mutate(obj):
        *parents, last = path
        node = obj
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


_DELETE = object()


@pytest.mark.parametrize("mutate, message", [
    (_set(("spec", "trainer", "numNode"), 2), "numNode"),  # a typo the API server would silently prune
    (_set(("spec", "trainer", "resourcesPerNode", "limits", "nvidia.com/gpu"), "four"), "four"),
    (_set(("spec", "runtimeRef", "name"), ""), "spec.runtimeRef.name"),
    (_set(("spec", "runtimeRef", "name"), _DELETE), "'name' is a required property"),
    (_set(("spec", "trainer", "env"), [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]), "spec.trainer.env.0"),
    (_set(("spec", "trainer", "numNodes"), 0), "spec.trainer.numNodes"),
    (_set(("spec", "trainer", "numProcPerNode"), "auto"), "spec.trainer.numProcPerNode"),
    (_set(("metadata", "name"), "Pretrain"), "metadata.name"),
    (_set(("apiVersion",), "kubeflow.org/v1"), "apiVersion"),
    (_set(("kind",), "PyTorchJob"), "kind"),
], ids=["typo", "gpu-quantity", "empty-runtime", "no-runtime-name", "env-value-and-secret", "zero-nodes",
        "nproc-string", "name-case", "v1-api", "v1-kind"])
def test_schema_rejects_malformed_objects(mutate, message):
    obj = render_trainjob(make_spec())
    mutate(obj)
    with pytest.raises(ValueError, match="does not match the TrainJob schema") as err:
        validate_trainjob(obj)
    assert message in str(err.value)


# ------------------------------------------------------------------ waiting


def test_wait_returns_the_object_when_complete():
    responses = recording("complete.json")["responses"]
    api, clock, lines = RecordedCustomObjectsApi(gets=responses), FakeClock(), []
    final = wait(api, clock, lines)
    assert trainjob_state(final) == "Complete"
    assert final == responses[-1]
    assert api.count("get") == 4 and clock.sleeps == [15, 15, 15]
    assert all(c[1:5] == (GROUP, VERSION, NAMESPACE, PLURAL) for c in api.calls)
    assert any("state=Running" in line for line in lines) and "complete" in lines[-1]


def test_wait_waits_through_a_kueue_suspension():
    api, clock, lines = RecordedCustomObjectsApi(gets=recording("suspended_then_complete.json")["responses"]), FakeClock(), []
    assert trainjob_state(wait(api, clock, lines)) == "Complete"
    assert "Suspended=True (Suspended: TrainJob is suspended)" in lines[0]


@pytest.mark.parametrize("file, reason, message", [
    ("failed.json", "FailedJobs", "first failed job: pretrain-5c1d0e9a47b2-node-0"),
    ("deadline_exceeded.json", "DeadlineExceeded", "TrainJob exceeded its active deadline"),
])
def test_wait_raises_with_the_condition_reason_and_message_when_failed(file, reason, message):
    api, clock = RecordedCustomObjectsApi(gets=recording(file)["responses"]), FakeClock()
    with pytest.raises(TrainJobFailed) as err:
        wait(api, clock)
    assert err.value.reason == reason and message in err.value.condition_message
    assert message in str(err.value) and f"jobset.sigs.k8s.io/jobset-name={NAME}" in str(err.value)


def test_wait_times_out_on_a_stuck_job_with_the_last_status_and_no_real_sleep():
    api, clock = RecordedCustomObjectsApi(gets=recording("stuck.json")["responses"]), FakeClock()
    with pytest.raises(TrainJobTimeout) as err:
        wait(api, clock, timeout_s=600, poll_s=30)
    text = str(err.value)
    assert "did not finish within 600s" in text and "job node: active=1 ready=0" in text
    assert clock.now - 1000.0 == 600 and sum(clock.sleeps) == 600
    assert isinstance(err.value, TimeoutError)


def test_wait_retries_transient_server_errors():
    responses = recording("complete.json")["responses"]
    gets = [responses[0], api_error("internal_error"), api_error("unavailable"), *responses[1:]]
    api, clock, lines = RecordedCustomObjectsApi(gets=gets), FakeClock(), []
    assert trainjob_state(wait(api, clock, lines)) == "Complete"
    assert api.count("get") == 6
    assert any("HTTP 500" in line and "etcdserver: request timed out" in line for line in lines)


def test_wait_tolerates_not_found_right_after_creation():
    gets = [api_error("not_found"), api_error("not_found"), *recording("complete.json")["responses"]]
    api, clock = RecordedCustomObjectsApi(gets=gets), FakeClock()
    assert trainjob_state(wait(api, clock, poll_s=5)) == "Complete"


@pytest.mark.parametrize("gets, kwargs, error, message", [
    ([api_error("not_found")], {"not_found_grace_s": 30}, TrainJobError, "not found 30s after creation"),
    ([recording("stuck.json")["responses"][1], api_error("not_found")], {}, TrainJobError, "disappeared while running"),
    ([api_error("internal_error")], {"max_consecutive_errors": 3}, TrainJobError, "after 4 failed GETs in a row"),
    ([api_error("forbidden")], {}, TrainJobError, "needs a Role allowing create/get/delete"),
], ids=["404-past-grace", "404-after-seen", "persistent-500", "403"])
def test_wait_gives_up_with_a_clear_error(gets, kwargs, error, message):
    api, clock = RecordedCustomObjectsApi(gets=gets), FakeClock()
    with pytest.raises(error, match=message):
        wait(api, clock, poll_s=10, **kwargs)


# ------------------------------------------------------------------ submitting


def test_submit_creates_the_object_in_its_namespace():
    obj = render_trainjob(make_spec())
    api = RecordedCustomObjectsApi(creates=[recording("created.json")["object"]])
    assert submit_trainjob(api, obj) == NAME
    assert api.calls == [("create", GROUP, VERSION, NAMESPACE, PLURAL, obj)]


def test_submit_retries_a_transient_error():
    obj, clock = render_trainjob(make_spec()), FakeClock()
    api = RecordedCustomObjectsApi(creates=[api_error("internal_error"), recording("created.json")["object"]])
    assert submit_trainjob(api, obj, sleep=clock.sleep) == NAME
    assert api.count("create") == 2 and clock.sleeps == [2.0]


def test_submit_adopts_its_own_job_on_a_retried_step_and_refuses_a_stranger():
    obj = render_trainjob(make_spec())
    mine = recording("complete.json")["responses"][1]
    api = RecordedCustomObjectsApi(creates=[api_error("already_exists")], gets=[mine])
    assert submit_trainjob(api, obj) == NAME

    stranger = copy.deepcopy(mine)
    stranger["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = "0" * 64
    api = RecordedCustomObjectsApi(creates=[api_error("already_exists")], gets=[stranger])
    with pytest.raises(TrainJobError, match="a different TrainJob named .* already exists"):
        submit_trainjob(api, obj)


def test_submit_explains_a_forbidden_create():
    api = RecordedCustomObjectsApi(creates=[api_error("forbidden")])
    with pytest.raises(TrainJobError, match="HTTP 403.*cannot create resource.*needs a Role"):
        submit_trainjob(api, render_trainjob(make_spec()))


# ------------------------------------------------------------------ collecting


def fake_fetch(calls, files=("encoder.safetensors", "metadata.json")):
    def fetch(uri, local_dir):
        calls.append((uri, local_dir))
        for f in files:
            (Path(local_dir) / f).write_bytes(b"{}")
    return fetch


def test_collect_fetches_the_output_uri_into_the_destination(tmp_path):
    final, calls = recording("complete.json")["responses"][-1], []
    out = collect_output(final, fake_fetch(calls), tmp_path / "encoder")
    assert calls == [(RECORDED_SPEC["output_uri"], str(tmp_path / "encoder"))]
    assert (out / "encoder.safetensors").is_file()


@pytest.mark.parametrize("obj, files, message", [
    (recording("complete.json")["responses"][-1], ("metadata.json",), "lacks encoder.safetensors"),
    (recording("stuck.json")["responses"][-1], (), "is not Complete"),
], ids=["missing-weights", "not-complete"])
def test_collect_refuses_incomplete_output(tmp_path, obj, files, message):
    with pytest.raises(TrainJobError, match=message):
        collect_output(obj, fake_fetch([], files), tmp_path)


# ------------------------------------------------------------------ glue


def test_run_multinode_pretrain_submits_waits_and_collects(tmp_path):
    api = RecordedCustomObjectsApi(creates=[recording("created.json")["object"]],
                                   gets=recording("complete.json")["responses"])
    clock, calls = FakeClock(), []
    summary = run_multinode_pretrain(make_spec(), tmp_path, fake_fetch(calls), api=api, poll_s=60,
                                     clock=clock, sleep=clock.sleep, log=lambda _: None)
    assert summary["trainjob"] == NAME and summary["num_nodes"] == 2 and summary["procs_per_node"] == 4
    assert summary["local_dir"] == str(tmp_path) and summary["seconds"] == 180
    assert calls == [(RECORDED_SPEC["output_uri"], str(tmp_path))]


def test_run_multinode_pretrain_deletes_the_job_after_a_timeout(tmp_path):
    api = RecordedCustomObjectsApi(gets=recording("stuck.json")["responses"])
    clock = FakeClock()
    with pytest.raises(TrainJobTimeout):
        run_multinode_pretrain(make_spec(), tmp_path, fake_fetch([]), api=api, timeout_s=120, poll_s=60,
                               clock=clock, sleep=clock.sleep, log=lambda _: None)
    assert api.calls[-1][:6] == ("delete", GROUP, VERSION, NAMESPACE, PLURAL, NAME)
