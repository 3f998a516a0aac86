"""The rendered manifests, run for real as pods on this machine's Docker engine (components/deploy/pods).

The dev overlay's serving Deployment runs as one pod: its init container fetches a real release (a .mar of a
digits model trained here, published with components.core.releases) from a real S3 server (moto, on the pods'
network gateway), then TorchServe and the auth proxy run with the commands, env, volumes and security context
read from the rendered YAML, and their probes decide when the pod is ready. Then the monitor CronJob's pod
template judges that pod's request log. The runner's own rules (probes that fail, init containers that fail,
refusals) are tested on small pods of the serving image. Without an engine or the images (`make image`) the
engine tests are skipped with the reason (failed under `make test CONTAINERS=require`, as in CI); the translation
tests at the top need neither.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import socket
import time
import uuid
from pathlib import Path

import container_support
import numpy as np
import pytest
import requests

from components.core import names
from components.deploy import pods
from components.deploy.pods import containers as container_args
from components.deploy.pods.manifests import container_env, cpu_cores, memory_bytes

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / "manifests" / "overlays" / "dev"
CLIENT_TOKEN = "client-token-from-the-secret-0123456789"
SOURCE_TOKEN = "pipeline-token-from-the-source-secret-0123"
SERVING_S3_SECRET, MONITOR_S3_SECRET = "kfp-mlops-serving-s3", "kfp-mlops-monitor-s3"
MODEL_NAME, MODEL_VERSION = "digits", "test-1"
TRAFFIC = 150  # held-out digits sent through the proxy: enough for the monitor's drift tests (30 at least)


# ---------------------------------------------------------------- the translation, without an engine

@pytest.mark.parametrize("text, expected", [
    ("$(A)/x", "a/x"), ("$(MISSING)", "$(MISSING)"), ("$$(A)", "$(A)"), ("$$", "$"), ("a$b", "a$b"),
    ("$(A", "$(A"), ("$", "$"), ("$(A)$(B)", "ab"), ("$(A)-$$-$(B)", "a-$-b"),
])
def test_dollar_references_expand_as_kubernetes_expands_them(text, expected):
    assert pods.expand(text, {"A": "a", "B": "b"}) == expected


def test_a_containers_env_is_built_in_the_kubelets_order():
    container = {
        "name": "app",
        "envFrom": [{"configMapRef": {"name": "settings"}}, {"secretRef": {"name": "keys"}, "prefix": "K_"},
                    {"configMapRef": {"name": "absent", "optional": True}}],
        "env": [
            {"name": "REGION", "value": "override"},  # env wins over envFrom
            {"name": "URL", "value": "$(ENDPOINT)/$(REGION)/$(LATER)"},  # only variables defined before it
            {"name": "LATER", "value": "x"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "id"}}},
            {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "id", "optional": True}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "RANK", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['rank']"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        ],
        "resources": {"limits": {"memory": "1536Mi"}},
    }
    pod = {"metadata": {"name": "p-1", "namespace": "ns", "annotations": {"rank": "3"}}, "spec": {}, "podIP": "10.0.0.9"}
    env = container_env(container, pod, {"settings": {"ENDPOINT": b"http://s3", "REGION": b"eu"}},
                        {"keys": {"id": b"AKIA"}})
    assert env == {"ENDPOINT": "http://s3", "REGION": "override", "K_id": "AKIA", "URL": "http://s3/override/$(LATER)",
                   "LATER": "x", "KEY": "AKIA", "POD": "p-1", "RANK": "3", "MEM": "1536"}
    with pytest.raises(pods.PodError, match="Secret keys2 is missing"):
        container_env({"name": "app", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "keys2", "key": "a"}}}]},
                      pod, {}, {})


def test_quantities_and_resources_map_to_the_engines_cgroup_settings():
    assert cpu_cores("250m") == 0.25 and cpu_cores("2") == 2 and memory_bytes("768Mi") == 768 * 2**20
    assert memory_bytes("1G") == 10**9 and memory_bytes("1e3") == 1000
    args = container_args.resources({"name": "c", "resources": {"limits": {"cpu": "1", "memory": "1536Mi"},
                                                                  "requests": {"cpu": "250m", "memory": "768Mi"}}})
    assert args == {"nano_cpus": 10**9, "cpu_shares": 256, "mem_limit": 1536 * 2**20, "memswap_limit": 1536 * 2**20,
                    "mem_reservation": 768 * 2**20}
    with pytest.raises(pods.PodError, match="nvidia.com/gpu"):
        container_args.resources({"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}})


RESTRICTED_POD = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}}
HARDENED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}


def test_the_security_context_maps_one_to_one_and_refuses_what_it_cannot_honour():
    args = container_args.security(RESTRICTED_POD, {"name": "c", "securityContext": HARDENED}, "10001:10001")
    assert args == {"user": "10001:10001", "group_add": ["10001"], "read_only": True, "cap_drop": ["ALL"],
                    "privileged": False, "security_opt": ["no-new-privileges:true"]}
    root = {"securityContext": {"runAsNonRoot": True}}
    with pytest.raises(pods.PodError, match="would run as root"):
        container_args.security(root, {"name": "c", "securityContext": {"runAsUser": 0}}, "")
    with pytest.raises(pods.PodError, match="non-numeric user"):
        container_args.security(root, {"name": "c"}, "mlops")
    assert container_args.security(root, {"name": "c"}, "10001:10001")["read_only"] is False  # the image's user
    with pytest.raises(pods.PodError, match="procMount"):
        container_args.security({}, {"name": "c", "securityContext": {"procMount": "Unmasked"}}, "")
    with pytest.raises(pods.PodError, match="Localhost"):
        container_args.security({}, {"name": "c", "securityContext": {"seccompProfile": {"type": "Localhost"}}}, "")


def test_command_replaces_the_images_entrypoint_and_cmd_as_in_kubernetes():
    env = {"URI": "s3://b/m"}
    assert container_args.command_line({"command": ["fetch", "$(URI)"]}, env) == {"entrypoint": ["fetch", "s3://b/m"],
                                                                                  "command": []}
    assert container_args.command_line({"args": ["--x", "$(URI)"]}, env) == {"command": ["--x", "s3://b/m"]}
    assert container_args.command_line({}, env) == {}


# ---------------------------------------------------------------- the engine and the images

@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return pods.render(DEV)


def engine_with(client, images: set[str]):
    """The engine's client once every image the pods name is on it; else a skip that says why (tests/conftest.py:
    no engine answers, or an image `make image` has not built)."""
    container_support.local_images(client, images)
    return client


def images_of(*workloads: dict) -> set[str]:
    out = set()
    for workload in workloads:
        spec = pods.pod_template(workload)["spec"]
        out |= {c["image"] for c in spec.get("initContainers", []) + spec["containers"]}
    return out


@pytest.fixture(scope="module")
def engine(objects, container_engine):
    return engine_with(container_engine, images_of(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT),
                                 pods.find(objects, "CronJob", "kfp-mlops-monitor")))


@pytest.fixture(scope="module")
def s3(engine):
    """moto on the pods' network gateway (the pods reach it there), the environment pointing at it."""
    from s3server import MotoServer, s3_env

    gateway = pods.ensure_network(client=engine)
    with MotoServer(host=gateway) as server:
        patch = pytest.MonkeyPatch()
        for key, value in s3_env(server.endpoint).items():
            patch.setenv(key, value)
        patch.setenv("NO_PROXY", f"127.0.0.1,localhost,{gateway}")
        patch.setenv("no_proxy", f"127.0.0.1,localhost,{gateway}")
        yield server
        patch.undo()


def storage_settings(objects) -> dict[str, str]:
    return {k: v.decode() for k, v in pods.config_maps(objects)[names.STORAGE_CONFIG_MAP].items()}


@pytest.fixture(scope="module")
def release(objects, s3, tmp_path_factory):
    """A digits model trained here, packed into the .mar the Deployment loads and published where its init
    container fetches; the training references where the monitor CronJob reads them."""
    from conftest import train_digits_classifier

    from components.core import blobs
    from components.core.blobs import Storage
    from components.core.features import MODEL_REFERENCE_FILE, image_features, write_model_reference
    from components.core.releases import publish
    from serving.archive import build_mar

    storage = storage_settings(objects)
    fetch = next(c for c in pods.pod_template(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT))["spec"]
                 ["initContainers"] if c["name"] == "fetch-model")
    model_uri = next(e["value"] for e in fetch["env"] if e["name"] == names.MODEL_URI_ENV)
    Storage().client.create_bucket(Bucket=blobs.split_s3(model_uri)[0])
    work = tmp_path_factory.mktemp("release")
    held_out_x, held_out_y = train_digits_classifier(work / "model", model_version=MODEL_VERSION)
    build_mar(work / "model", work / "release", MODEL_NAME, MODEL_VERSION)
    manifest = publish(work / "release", model_uri)
    from sklearn.datasets import load_digits

    train_x = (load_digits().images[:-200, None] / 16.0).astype(np.float32)
    reference = image_features(train_x)
    reference["label"] = 0
    reference.to_csv(work / "reference.csv", index=False)
    blobs.put_file(work / "reference.csv", storage[names.REFERENCE_ENV])
    write_model_reference(work / "model", train_x[-300:])
    blobs.put_file(work / "model" / MODEL_REFERENCE_FILE,
                   storage[names.REFERENCE_ENV].rsplit("/", 1)[0] + "/" + MODEL_REFERENCE_FILE)
    return {"x": held_out_x, "y": held_out_y, "model_dir": work / "model", "version": manifest["version"],
            "model_uri": model_uri}


def cluster_state(objects, s3, s3_secret: str) -> tuple[dict, dict]:
    """What the cluster would hold: the rendered ConfigMaps with the local S3 endpoint, and the Secrets of
    docs/cluster.md section 2 (here, files the test writes)."""
    configmaps = pods.config_maps(objects)
    configmaps[names.STORAGE_CONFIG_MAP]["S3_ENDPOINT_URL"] = s3.endpoint.encode()
    keys = {"AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    secrets = {s3_secret: keys, names.SERVING_TOKEN_SECRET: {"token": CLIENT_TOKEN + "\n"},
               names.SERVING_SOURCE_TOKEN_SECRET: {"token": SOURCE_TOKEN + "\n"}}
    return configmaps, secrets


@pytest.fixture(scope="module")
def serving_pod(objects, engine, release, s3):
    configmaps, secrets = cluster_state(objects, s3, SERVING_S3_SECRET)
    pod = pods.start_pod(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT), configmaps=configmaps,
                         secrets=secrets, name=f"kfp-mlops-serving-{uuid.uuid4().hex[:6]}", client=engine)
    try:
        pod.wait_ready(timeout_s=300)
        yield pod
    finally:
        pod.stop()


def serving_containers(objects) -> list[dict]:
    spec = pods.pod_template(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT))["spec"]
    return spec["initContainers"] + spec["containers"]


@pytest.mark.containers
def test_every_container_runs_what_the_rendered_yaml_says(serving_pod, objects, s3, release):
    """Command, env, mounts, working directory, user, security and limits: the engine's record of each container
    against the YAML, so a change of the manifests changes the local pod with it."""
    storage = storage_settings(objects)
    volumes = {v["name"]: v for v in pods.pod_template(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT))
               ["spec"]["volumes"]}
    for spec in serving_containers(objects):
        attrs = serving_pod.inspect(spec["name"])
        config, host = attrs["Config"], attrs["HostConfig"]
        env = dict(line.split("=", 1) for line in config["Env"])
        expected_env = {e["name"]: e["value"] for e in spec.get("env", []) if "value" in e}
        if spec.get("envFrom"):
            expected_env.update({**storage, "S3_ENDPOINT_URL": s3.endpoint})
        if any("secretKeyRef" in e.get("valueFrom", {}) for e in spec.get("env", [])):
            expected_env["AWS_SECRET_ACCESS_KEY"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        assert expected_env.items() <= env.items(), spec["name"]
        command = [pods.expand(a, env) for a in spec["command"] + spec.get("args", [])]
        assert config["Entrypoint"] + (config["Cmd"] or []) == command
        assert "$(" not in " ".join(command), "every reference resolved"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert set(mounts) == {m["mountPath"] for m in spec["volumeMounts"]}
        for m in spec["volumeMounts"]:
            read_only = m.get("readOnly", False) or "emptyDir" not in volumes[m["name"]]
            assert mounts[m["mountPath"]]["RW"] is not read_only, (spec["name"], m)
        assert config["WorkingDir"] == spec.get("workingDir", config["WorkingDir"])
        assert config["User"] == "10001:10001" and "10001" in host["GroupAdd"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert host["Privileged"] is False and "no-new-privileges:true" in host["SecurityOpt"]
        assert not any("seccomp" in o for o in host["SecurityOpt"]), "RuntimeDefault: the engine's default profile"
        limits = spec["resources"]["limits"]
        assert host["NanoCpus"] == int(cpu_cores(limits["cpu"]) * 1e9)
        assert host["Memory"] == memory_bytes(limits["memory"]) == host["MemorySwap"]
    assert "version " + release["version"] in serving_pod.logs("fetch-model"), "the init container fetched the release"


@pytest.mark.containers
def test_the_containers_run_as_10001_read_only_without_capabilities(serving_pod):
    check = ("import errno, sys; s = open('/proc/1/status').read()\n"
             "f = lambda k: next(l.split()[1] for l in s.splitlines() if l.startswith(k + ':'))\n"
             "try:\n    open('/probe-write', 'w'); written = 'written'\n"
             "except OSError as e:\n    written = errno.errorcode[e.errno]\n"
             "sys.stdout.write(' '.join([f('Uid'), f('Gid'), f('CapEff'), f('CapBnd'), f('NoNewPrivs'), f('Seccomp'), "
             "written]))")
    for name in serving_pod.containers:
        result = serving_pod.exec(name, ["python", "-c", check], timeout_s=30)
        # The container's own PID 1 (TorchServe's tini, the proxy): UID, GID, no capability at all, no_new_privs,
        # seccomp filter mode (2); and the root filesystem refuses a write.
        assert result.output.split() == ["10001", "10001", "0000000000000000", "0000000000000000", "1", "2", "EROFS"], \
            (name, result.output)


@pytest.mark.containers
def test_the_probes_ran_and_passed(serving_pod, objects):
    """While the pod started: each startup probe passed before the other probes ran, and the pod counted as ready
    when every readiness probe had passed (liveness probes ran too; one may fail while a server still starts, as
    on a cluster). Then every readiness and liveness probe passes in one more round."""
    results = serving_pod.probe_results
    containers = pods.pod_template(pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT))["spec"]["containers"]
    for spec in containers:
        ran = lambda kind: [r for r in results if r.container == spec["name"] and r.kind == kind]  # noqa: E731
        if "startupProbe" in spec:
            started = next(r.at for r in ran("startupProbe") if r.success)
            assert all(r.at >= started for r in ran("readinessProbe") + ran("livenessProbe")), spec["name"]
        assert ran("readinessProbe") and ran("readinessProbe")[-1].success, "ready: the last readiness probe passed"
        assert ran("livenessProbe"), spec["name"]
        assert not ran("restart"), "no container was restarted"
    assert {r.action.split()[0] for r in results} == {"exec", "httpGet", "tcpSocket"}
    again = serving_pod.probe()
    assert len(again) == sum(("readinessProbe" in c) + ("livenessProbe" in c) for c in containers)
    assert all(r.success for r in again), [(r.container, r.kind, r.detail) for r in again]
    assert any(r.detail.endswith("Healthy") for r in again if r.action.startswith("exec"))


@pytest.mark.containers
def test_a_png_through_the_auth_proxy_gets_the_right_class_with_the_client_token_only(serving_pod, objects, release):
    from components.core.models import load_classifier
    from serving.client import encode_png

    service = pods.find(objects, "Service", names.SERVING_DEPLOYMENT)["spec"]["ports"][0]
    url = serving_pod.url(service["targetPort"], f"/predictions/{MODEL_NAME}")  # where the Service sends clients
    model, _ = load_classifier(release["model_dir"])
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(release["x"][:20])).argmax(1).tolist()
    served = []
    for image in release["x"][:20]:
        answer = requests.post(url, data=encode_png(image), timeout=30,
                               headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == MODEL_VERSION
        served.append(answer.json()["class_index"])
    assert served == expected, "the pod serves the published model"
    assert np.mean(np.array(served) == release["y"][:20]) >= 0.85, "and it gets the digits right"
    png = encode_png(release["x"][0])
    assert requests.post(url, data=png, timeout=30, headers={"Content-Type": "image/png"}).status_code == 401
    wrong = requests.post(url, data=png, timeout=30, headers={"Authorization": "Bearer not-the-token-0123456789"})
    assert wrong.status_code == 401
    # TorchServe listens on the pod's loopback only: the proxy reaches it on localhost, nothing else can.
    with pytest.raises(OSError):
        socket.create_connection((serving_pod.ip, 8079), timeout=3).close()


def _window_args(args: list[str], since: dt.datetime, until: dt.datetime) -> list[str]:
    """The CronJob's args with its hourly window (--last, --settle) replaced by the traffic's own window."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--last", "--settle"):
            skip = True
        else:
            out.append(arg)
    stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    return out + ["--since", stamp(since), "--until", stamp(until)]


@pytest.mark.containers
def test_the_monitor_cronjob_judges_the_pods_request_log(serving_pod, objects, engine, release, s3):
    """Runs last: it deletes the serving pod (its preStop hook drains the request log to S3), then the CronJob's pod
    template runs once against that log and writes its verdict where its args say."""
    from components.core import blobs
    from components.monitor.windows import result_dir
    from serving.client import encode_png

    storage = storage_settings(objects)
    since = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=1)
    time.sleep((since - dt.datetime.now(dt.timezone.utc)).total_seconds())  # the earlier tests' requests stay out
    url = serving_pod.url("inference", f"/predictions/{MODEL_NAME}")
    for image in release["x"][:TRAFFIC]:
        answer = requests.post(url, data=encode_png(image), timeout=30,
                               headers={"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
    hooks = serving_pod.stop()
    assert hooks["torchserve"].success, hooks["torchserve"].detail  # python -m serving.request_log drain
    assert "everything reached the destination" in hooks["torchserve"].detail
    logs = [u for u in blobs.list_uris(storage[names.REQUEST_LOG_ENV]) if u.endswith(".jsonl")]
    assert logs, "the drained request log is in the bucket"
    until = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=1)

    cronjob = copy.deepcopy(pods.find(objects, "CronJob", "kfp-mlops-monitor"))
    container = pods.pod_template(cronjob)["spec"]["containers"][0]
    assert {"--last", "--settle"} <= set(container["args"]), "the CronJob judges the last whole hour"
    container["args"] = _window_args(container["args"], since, until)  # the one change: this traffic's window
    configmaps, secrets = cluster_state(objects, s3, MONITOR_S3_SECRET)
    job = pods.start_pod(cronjob, configmaps=configmaps, secrets=secrets, client=engine,
                         name=f"kfp-mlops-monitor-{uuid.uuid4().hex[:6]}")
    try:
        codes = job.wait_completed(timeout_s=600)
        output = job.logs("monitor")
        job_stdout = job.logs("monitor", stderr=False)
        attrs = job.inspect("monitor")
    finally:
        job.stop()
    assert codes["monitor"] in (0, 2), output  # 2: the hour drifted (a failed Job by design); 1 would be an error
    assert attrs["Config"]["User"] == "10001:10001" and attrs["HostConfig"]["ReadonlyRootfs"] is True
    printed = json.loads(job_stdout.strip().splitlines()[-1])  # the verdict, on stdout
    # No --out in the args: the results go next to the reference, under verdicts/<model version>/<window>/.
    target = result_dir(storage[names.REFERENCE_ENV].rsplit("/", 1)[0] + "/verdicts", None, since, until)
    stored = json.loads(blobs.read_bytes(f"{target}/verdict.json"))
    assert printed["verdict_json"] == f"{target}/verdict.json"
    assert stored["log"]["rows_selected"] == stored["current_rows"] == TRAFFIC, stored["log"]  # every request we sent
    assert stored["status"] in ("ok", "drift") and stored["model_reference"]["found"], stored["message"]
    assert stored["drift_detected"] is (codes["monitor"] == 2)
    # The window is in the release ledger the storage ConfigMap names (an s3:// prefix), as the verdict says.
    from components.core.ledger import Ledger

    drift = Ledger(storage[names.LEDGER_ENV]).latest("drift")
    assert printed["ledger_record"] == stored["ledger_record"] == drift.id and drift.data["window"] == stored["window"]


# ---------------------------------------------------------------- the runner's own rules, on small pods

def small_pod(image: str, **container) -> dict:
    spec = copy.deepcopy(RESTRICTED_POD)
    spec["containers"] = [{"name": "web", "image": image, "command": ["python", "-m", "http.server", "8000"],
                           "ports": [{"name": "http", "containerPort": 8000}], "securityContext": dict(HARDENED),
                           **container}]
    spec["terminationGracePeriodSeconds"] = 1
    return {"kind": "Pod", "metadata": {"name": f"runner-test-{uuid.uuid4().hex[:6]}", "namespace": "test"},
            "spec": spec}


@pytest.fixture(scope="module")
def small_image(container_engine):
    from pipelines.config import ClusterConfig

    image = ClusterConfig().serving_image
    return engine_with(container_engine, {image}), image


@pytest.mark.containers
def test_a_failing_readiness_probe_keeps_the_pod_not_ready(small_image):
    engine, image = small_image
    pod = pods.start_pod(small_pod(image, readinessProbe={"httpGet": {"path": "/missing", "port": "http"},
                                                          "periodSeconds": 1}), client=engine)
    try:
        with pytest.raises(pods.PodNotReady, match=r"readinessProbe: httpGet http://[\d.]+:8000/missing -> HTTP 404"):
            pod.wait_ready(timeout_s=5)
    finally:
        pod.stop()


@pytest.mark.containers
def test_a_failing_liveness_probe_restarts_the_container_until_it_crash_loops(small_image):
    engine, image = small_image
    never = {"exec": {"command": ["false"]}, "periodSeconds": 1}
    pod = pods.start_pod(small_pod(image, livenessProbe={**never, "failureThreshold": 2}, readinessProbe=never),
                         client=engine)
    try:
        with pytest.raises(pods.PodNotReady, match="restarted 2 times"):
            pod.wait_ready(timeout_s=60, max_restarts=1)
        assert [r.detail for r in pod.probe_results if r.kind == "restart"][0].startswith("livenessProbe failed 2")
    finally:
        pod.stop()


@pytest.mark.containers
def test_a_failing_init_container_stops_the_pod_with_its_logs(small_image):
    engine, image = small_image
    obj = small_pod(image)
    obj["spec"]["initContainers"] = [{"name": "init", "image": image, "command": ["sh", "-c", "echo no model; exit 3"],
                                      "securityContext": dict(HARDENED)}]
    with pytest.raises(pods.PodError, match=r"(?s)init container init .* exited with 3.*no model"):
        pods.start_pod(obj, client=engine)
    assert obj["metadata"]["name"] not in pods.list_pods(engine), "nothing is left behind"


@pytest.mark.containers
def test_a_pod_that_would_run_as_root_or_lacks_its_secret_never_starts(small_image):
    engine, image = small_image
    root = small_pod(image, securityContext={**HARDENED, "runAsUser": 0})
    with pytest.raises(pods.PodError, match="runAsNonRoot and would run as root"):
        pods.start_pod(root, client=engine)
    secretless = small_pod(image, volumeMounts=[{"name": "token", "mountPath": "/etc/token"}])
    secretless["spec"]["volumes"] = [{"name": "token", "secret": {"secretName": "kfp-mlops-serving-token"}}]
    with pytest.raises(pods.PodError, match="Secret kfp-mlops-serving-token, which does not exist"):
        pods.start_pod(secretless, client=engine)
    assert not {root["metadata"]["name"], secretless["metadata"]["name"]} & set(pods.list_pods(engine))


@pytest.mark.containers
def test_another_process_finds_probes_and_deletes_a_pod_by_name(small_image, capsys):
    from components.deploy.pods.__main__ import main

    engine, image = small_image
    obj = small_pod(image, readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1},
                    lifecycle={"preStop": {"exec": {"command": ["sh", "-c", "echo draining"]}}})
    pod = pods.start_pod(obj, client=engine)
    try:
        pod.wait_ready(timeout_s=30)
        name = obj["metadata"]["name"]
        assert main(["list"]) == 0 and name in capsys.readouterr().out.split()
        assert main(["status", name]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["ip"] == pod.ip and status["containers"]["web"]["running"] is True
        assert main(["probe", name]) == 0 and "web readinessProbe: ok" in capsys.readouterr().out
        assert main(["stop", name]) == 0 and "web preStop: ok (exit 0: draining)" in capsys.readouterr().out
        assert name not in pods.list_pods(engine) and main(["status", name]) == 1
    finally:
        pod.stop()
