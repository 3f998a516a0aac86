"""`mlops run --runner docker`: the whole pipeline in containers of the pipeline image, served from containers.

The module fixture runs `mlops run --runner docker` once on examples/quick.yaml (a short replay, free ports, a
serving home of its own) and the tests read what it left: the summary (every step in the pipeline image, by
id), the files the step containers wrote, the serving containers (the serving image, non-root, read-only, no
capabilities), the endpoint (a PNG with the client token gets the right class, none without it), the monitor's
verdict, then `mlops serve status` and `mlops serve stop`. Skipped with the reason when no Docker engine answers;
the images must hold this checkout's step code (`make image`; `make test` builds them first).

The serving broker's refusals (the deploy step's only way to start containers) are checked on a real socket
without an engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from components.deploy import broker as broker_mod
from components.deploy.containers import local_identity
from pipelines.config import ClusterConfig
from serving.processes import free_ports

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_IMAGE = ClusterConfig().image
SERVING_IMAGE = ClusterConfig().serving_image
RUN_TIMEOUT_S = 1800
GATES = ("evaluate", "privacy", "robustness")


def mlops(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`mlops ARGS` as a user runs it, from the checkout."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DO_NOT_TRACK": "1"})


def engine():
    """The Docker client with both images built from this checkout's step code, or a skip that says why not
    (a failure under `make test CONTAINERS=require`, which builds them first)."""
    from container_support import HOW_TO_BUILD, engine_client, local_images, project_image_tags

    from pipelines.docker_steps import DockerSteps, step_code_digest

    client = engine_client()
    images = local_images(client, project_image_tags())
    steps = DockerSteps.__new__(DockerSteps)
    steps.client, steps.uid, steps.gid = client, 10001, 10001
    if steps.image_code_digest(images[PIPELINE_IMAGE].id) != step_code_digest():
        pytest.skip(f"{PIPELINE_IMAGE} holds other step code than this checkout: {HOW_TO_BUILD}")
    return client


@pytest.fixture(scope="module")
def docker_run(tmp_path_factory):
    """One `mlops run --runner docker` of examples/quick.yaml; the serving containers are stopped afterwards."""
    client = engine()
    tmp = tmp_path_factory.mktemp("docker-runner")
    inference, management, metrics = free_ports(3, set())
    home = tmp / "serving"
    run = mlops("run", "--runner", "docker", "--config", "examples/quick.yaml", "--runs-dir", str(tmp / "runs"),
                "--run-id", "in-docker", "--serving-home", str(home), "--serving-inference-port", str(inference),
                "--serving-management-port", str(management), "--serving-metrics-port", str(metrics),
                "--monitor-replay-limit", "60", timeout=RUN_TIMEOUT_S)
    summary_file = tmp / "runs" / "in-docker" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    yield {"run": run, "summary": summary, "home": home, "client": client}
    mlops("serve", "stop", "--serving-home", str(home))


def digits_png(count: int) -> tuple[list[bytes], list[int]]:
    from sklearn.datasets import load_digits

    from serving.client import encode_png

    digits = load_digits()
    images = (digits.images[-count:] / 16.0).astype(np.float32)[:, None]
    return [encode_png(image) for image in images], [int(t) for t in digits.target[-count:]]


@pytest.mark.containers
@pytest.mark.slow
def test_every_step_ran_in_the_pipeline_image(docker_run):
    run, summary, client = docker_run["run"], docker_run["summary"], docker_run["client"]
    assert run.returncode == 0, f"mlops run --runner docker exited {run.returncode}:\n{run.stdout[-6000:]}\n" \
                                f"{run.stderr[-3000:]}"
    assert summary["status"] == "succeeded" and summary["runner"] == "docker"
    image_id = client.images.get(PIPELINE_IMAGE).id
    for step, info in summary["steps"].items():
        assert info["status"] == "succeeded", step
        assert (info["runner"], info["image"], info["image_id"]) == ("docker", PIPELINE_IMAGE, image_id), step
        assert info["task_seconds"] >= info["seconds"] > 0, step
    log = Path(summary["log"]).read_text()
    # kfp.local's DockerRunner names the image of every task it starts: the run's own tag of that image id.
    assert log.count("Found image 'kfp-mlops-run/pipeline:in-docker'") == len(summary["steps"])
    assert "kfp-mlops-run/pipeline:in-docker" not in {t for i in client.images.list() for t in i.tags}, \
        "the run's tag is removed after the run"
    # The outputs were written by the step containers, as the steps' user (not by this process when it is root).
    step_uid = local_identity()[0] or ClusterConfig().run_as_user
    assert Path(summary["artifacts"]["model"]).stat().st_uid == step_uid


@pytest.mark.containers
@pytest.mark.slow
def test_the_endpoint_is_the_serving_pod_of_the_manifests(docker_run):
    summary, client = docker_run["summary"], docker_run["client"]
    record = summary["deployment"]
    assert record["runner"] == "docker" and record["serving_image"] == SERVING_IMAGE
    serving_id = client.images.get(SERVING_IMAGE).id
    assert record["serving_image_id"] == serving_id
    assert set(record["containers"]) == {"torchserve", "auth-proxy"}
    for name, container_id in record["containers"].items():
        attrs = client.containers.get(container_id).attrs
        assert attrs["State"]["Running"], name
        assert attrs["Image"] == serving_id, name
        host = attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"], name
        assert "no-new-privileges:true" in host["SecurityOpt"], name
        uid = int(attrs["Config"]["User"].split(":")[0])
        assert uid != 0 and uid == (local_identity()[0] or 10001), name  # the manifests' runAsUser when root
        # The Deployment's command, not the image's default (torchserve --help).
        command = attrs["Config"]["Entrypoint"]
        assert command[0] == ("tini" if name == "torchserve" else "python"), (name, command)


@pytest.mark.containers
@pytest.mark.slow
def test_a_png_with_the_client_token_gets_its_class_and_none_without(docker_run):
    summary = docker_run["summary"]
    endpoint, token = summary["endpoint"], Path(summary["token_file"]).read_text().strip()
    pngs, labels = digits_png(20)
    right = 0
    for png, label in zip(pngs, labels):
        answer = requests.post(endpoint, data=png, timeout=30, headers={"Authorization": f"Bearer {token}",
                                                                        "Content-Type": "image/png"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == summary["deployment"]["model_version"]
        right += body["class_index"] == label
    assert right >= 14, f"{right}/20 right: the served model is not the trained one"  # test accuracy >= 0.8 (gate)
    refused = requests.post(endpoint, data=pngs[0], timeout=30, headers={"Content-Type": "image/png"})
    assert refused.status_code == 401
    wrong = requests.post(endpoint, data=pngs[0], timeout=30, headers={"Authorization": "Bearer not-the-token",
                                                                       "Content-Type": "image/png"})
    assert wrong.status_code == 401


@pytest.mark.containers
@pytest.mark.slow
def test_the_monitor_step_replayed_to_the_containers_and_wrote_its_verdict(docker_run):
    summary = docker_run["summary"]
    verdict = json.loads(Path(summary["reports"]["drift_verdict"]).read_text())
    assert verdict["status"] == "ok" and verdict["drift_detected"] is False, verdict
    metrics = summary["steps"]["monitor"]
    assert metrics["status"] == "succeeded"
    log_dir = Path(summary["deployment"]["request_log_dir"])
    assert log_dir.is_relative_to(docker_run["home"]), "the request log is a directory both sides reach"
    logged = [json.loads(line) for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines() if line]
    assert sum(r.get("source") == "replay" for r in logged) >= 60, "the monitor step's replay reached the log"


@pytest.mark.containers
@pytest.mark.slow
def test_the_step_containers_appended_to_the_release_ledger(docker_run):
    """The ledger directory is mounted read-write into the steps: trained (naming the image by id), gated,
    released and drift, each after the one before, written as the steps' user."""
    from components.core.ledger import Ledger

    summary, client, home = docker_run["summary"], docker_run["client"], docker_run["home"]
    ledger = Ledger(home / "ledger")
    trained, gated, released, drift = ledger.records()
    assert [r.type for r in (trained, gated, released, drift)] == ["trained", "gated", "released", "drift"]
    assert (gated.parents, released.parents, drift.parents) == ((trained.id,), (gated.id,), (released.id,))
    assert trained.data["run_id"] == "in-docker"
    assert trained.data["code"]["image"] == PIPELINE_IMAGE
    assert trained.data["code"]["image_id"] == client.images.get(PIPELINE_IMAGE).id
    assert summary["deployment"]["released_record"] == released.id
    step_uid = local_identity()[0] or ClusterConfig().run_as_user
    assert (home / "ledger" / "records" / f"{released.id}.json").stat().st_uid == step_uid


@pytest.mark.containers
@pytest.mark.slow
def test_serve_status_then_stop_manage_the_containers(docker_run):
    home, client = docker_run["home"], docker_run["client"]
    status = mlops("serve", "status", "--json", "--serving-home", str(home))
    assert status.returncode == 0, status.stdout + status.stderr
    state = json.loads(status.stdout)
    assert state["runner"] == "docker" and state["healthy"] and state["workers_ready"] >= 1, state
    pngs, _ = digits_png(1)
    token = Path(state["token_file"]).read_text().strip()
    requests.post(state["endpoint"], data=pngs[0], timeout=30, headers={"Authorization": f"Bearer {token}",
                                                                        "Content-Type": "image/png"})
    stop = mlops("serve", "stop", "--serving-home", str(home))
    assert stop.returncode == 0, stop.stdout + stop.stderr
    pod = state["pod"]
    assert not client.containers.list(all=True, filters={"label": f"kfp-mlops.io/pod={pod}"})
    assert not client.volumes.list(filters={"label": f"kfp-mlops.io/pod={pod}"})
    after = mlops("serve", "status", "--json", "--serving-home", str(home))
    assert after.returncode == 1 and json.loads(after.stdout)["running"] is False
    # The preStop drain flushed the last client request to the log before TorchServe stopped.
    logged = [json.loads(line) for f in Path(state["request_log_dir"]).glob("*.jsonl")
              for line in f.read_text().splitlines() if line]
    assert any(r.get("source") == "client" for r in logged)
    assert (home / "logs" / "torchserve.log").is_file(), "the containers' logs outlive them"


@pytest.mark.containers
def test_a_missing_image_stops_the_run_before_anything_runs(tmp_path):
    engine()
    config = tmp_path / "missing.yaml"
    config.write_text("cluster:\n  image: kfp-mlops-test/not-built:0\n")
    argv = ["run", "--runner", "docker", "--config", str(config), "--runs-dir", str(tmp_path / "runs"),
            "--run-id", "never", "--serving-home", str(tmp_path / "serving")]
    run = mlops(*argv)  # the preflight (mlops doctor) finds it first
    assert run.returncode == 2, run.stdout + run.stderr
    assert "image kfp-mlops-test/not-built:0 is not on the engine" in run.stderr and "make image" in run.stderr
    assert not (tmp_path / "runs" / "never").exists()
    run = mlops(*argv, "--skip-doctor")  # and without it, the runner itself, before anything runs
    assert run.returncode == 1, run.stdout + run.stderr
    assert "kfp-mlops-test/not-built:0 is not on the Docker engine and a local run never pulls: build it with " \
           "'make image'" in run.stderr
    assert not (tmp_path / "runs" / "never").exists()


# ---------------------------------------------------------------- the broker, on a real socket, no engine


def fake_pipeline_run(root: Path, gates: dict[str, bool]) -> Path:
    """A pipeline root holding one kfp.local run whose gate steps returned ``gates``; the deploy step's archive."""
    run = root / "kfp-mlops-2026-01-01-00-00-00-000000"
    for step, passed in gates.items():
        (run / step).mkdir(parents=True)
        (run / step / "executor_output.json").write_text(json.dumps({"parameterValues": {"Output": passed}}))
    archive = run / "deploy" / "archive" / "digits.mar"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"PK")
    for artifact in ("finetune/model", "ingest/dataset"):
        (run / artifact).mkdir(parents=True)
    return archive


def serve_request(built: Path, **overrides) -> dict:
    """The deploy step's request for the archive it ``built``, with ``overrides``."""
    run = built.parents[2]
    return {"op": "serve", "archive": str(built), "model_version": "abc123", "model_dir": str(run / "finetune/model"),
            "dataset_dir": str(run / "ingest/dataset"), **overrides}


def test_the_broker_serves_only_a_gated_archive_of_its_own_run(tmp_path):
    root = tmp_path / "kfp"
    archive = fake_pipeline_run(root, {"evaluate": True, "privacy": True, "robustness": True})
    outside = tmp_path / "elsewhere.mar"
    outside.write_bytes(b"PK")
    served = []
    serving = broker_mod.ServingBroker(root, GATES, serve=lambda r: served.append(r) or {"endpoint": "e"},
                                       stop=lambda: {"stopped": True}, allowed_uid=os.getuid())
    with serving:
        socket_path = serving.socket_path
        with pytest.raises(broker_mod.BrokerRefused, match="started no serving containers"):
            broker_mod.request(socket_path, {"op": "stop"}, timeout_s=10)
        with pytest.raises(broker_mod.BrokerRefused, match="not under this run's pipeline root"):
            broker_mod.request(socket_path, serve_request(archive, archive=str(outside)), timeout_s=10)
        link = archive.parent / "link.mar"
        link.symlink_to(outside)
        with pytest.raises(broker_mod.BrokerRefused, match="not under this run's pipeline root"):
            broker_mod.request(socket_path, serve_request(archive, archive=str(link)), timeout_s=10)
        with pytest.raises(broker_mod.BrokerRefused, match="not a version string"):
            broker_mod.request(socket_path, serve_request(archive, model_version="1; rm -rf /"), timeout_s=10)
        with pytest.raises(broker_mod.BrokerRefused, match="unknown request"):
            broker_mod.request(socket_path, {"op": "run", "image": "alpine"}, timeout_s=10)
        assert served == []
        assert broker_mod.request(socket_path, serve_request(archive), timeout_s=10) == {"endpoint": "e"}
        assert served[0]["archive"] == archive.resolve() and served[0]["model_version"] == "abc123"
        assert broker_mod.request(socket_path, {"op": "stop"}, timeout_s=10) == {"stopped": True}
    assert not socket_path.exists() and not socket_path.parent.exists()


def test_the_broker_refuses_a_model_a_gate_blocked(tmp_path):
    archive = fake_pipeline_run(tmp_path / "kfp", {"evaluate": True, "privacy": False, "robustness": True})
    served = []
    with broker_mod.ServingBroker(tmp_path / "kfp", GATES, serve=lambda r: served.append(r) or {},
                                  stop=dict, allowed_uid=os.getuid()) as serving:
        with pytest.raises(broker_mod.BrokerRefused, match="gates .* did not pass: privacy"):
            broker_mod.request(serving.socket_path, serve_request(archive), timeout_s=10)
    assert served == []


def test_the_broker_refuses_another_uid(tmp_path):
    archive = fake_pipeline_run(tmp_path / "kfp", dict.fromkeys(GATES, True))
    with broker_mod.ServingBroker(tmp_path / "kfp", GATES, serve=lambda r: {}, stop=dict,
                                  allowed_uid=os.getuid() + 1) as serving:
        with pytest.raises(broker_mod.BrokerRefused, match=f"uid {os.getuid()} may not"):
            broker_mod.request(serving.socket_path, serve_request(archive), timeout_s=10)
