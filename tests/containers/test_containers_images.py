"""The two images `make image` builds, run for real on the local Docker engine.

`make test` builds them before the tests (tests/container_support.py); without a Docker engine or the images the
tests are skipped with the reason (failed under `make test CONTAINERS=require`, as in CI). The serving image is also started as the serving pod runs it (manifests/base: the init
container's release fetch, TorchServe under tini, the auth proxy beside it in the same network namespace, the
readiness probe and the preStop drain) and answers a prediction.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from pipelines.config import ClusterConfig

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_IMAGE = ClusterConfig().image
SERVING_IMAGE = ClusterConfig().serving_image
USER = "10001:10001"


def docker(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"docker {' '.join(args)[:300]} exited {done.returncode}:\n{done.stdout[-3000:]}"
                             f"\n{done.stderr[-3000:]}")
    return done


def run_in(image: str, *command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` in a throwaway container of ``image``, as the image's user, with a read-only root as on the cluster."""
    return docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network", "none", image, *command,
                  check=check, timeout=timeout)


@pytest.fixture(scope="session")
def images(project_images) -> dict[str, dict]:
    """``{image: docker image inspect}`` of both images (tests/conftest.py: skipped without an engine or an image).
    The tests run containers with the docker command, which reaches the same engine (DOCKER_HOST)."""
    if shutil.which("docker") is None:
        pytest.skip("no docker command: install Docker's CLI (Debian: docker.io; scripts/container_engine.sh ensure)")
    return {tag: image.attrs for tag, image in project_images.items()}


# ---------------------------------------------------------------- both images


@pytest.mark.parametrize("image", [PIPELINE_IMAGE, SERVING_IMAGE])
def test_runs_as_the_manifests_non_root_user_without_an_entrypoint(images, image):
    config = images[image]["Config"]
    assert config["User"] == USER, "runAsUser/runAsGroup 10001 in the manifests"
    # kfp.local's DockerRunner and KFP pass a step's command (sh -c ...) as the container command.
    assert not config.get("Entrypoint"), config.get("Entrypoint")
    assert run_in(image, "id", "-u").stdout.strip() == "10001"
    assert run_in(image, "id", "-g").stdout.strip() == "10001"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["DO_NOT_TRACK"] == "1"
    assert not [k for k in env if k.startswith("PIP_")], "no pip settings baked into the image"


@pytest.mark.parametrize("image", [PIPELINE_IMAGE, SERVING_IMAGE])
def test_no_file_of_the_hosts_pip_settings_or_ca_bundle_is_in_the_image(images, image):
    host_files = [Path("/etc/ssl/certs/ca-certificates.crt")]
    debug = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], check=False, capture_output=True,
                           text=True)
    host_files += [Path(m) for m in re.findall(r"^\s+(/\S+), exists: True$", debug.stdout, re.MULTILINE)]
    host_files += [Path(os.environ[v]) for v in ("PIP_CONFIG_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
                   if os.environ.get(v)]
    host_files = sorted({f.resolve() for f in host_files if f.is_file() and f.stat().st_size > 0})
    assert host_files, "this machine has no CA bundle or pip configuration to compare with"
    for host_file in host_files:
        digest = hashlib.sha256(host_file.read_bytes()).hexdigest()
        found = run_in(image, "sh", "-c", f"find / -xdev -type f -size {host_file.stat().st_size}c "
                       "-exec sha256sum {} + 2>/dev/null; true", timeout=600).stdout
        copies = [line.split(None, 1)[1] for line in found.splitlines() if line.split()[0] == digest]
        assert not copies, f"{host_file} of this machine is in {image} as {copies}"
    # Certificates this machine added to its bundle (Debian: /usr/local/share/ca-certificates, e.g. a TLS proxy's)
    # are in no file of the image: its CA bundles are Debian's and certifi's own.
    local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    for ca in local_cas:
        body = [line for line in ca.read_text(errors="replace").splitlines() if re.fullmatch(r"[A-Za-z0-9+/]{64}", line)]
        if len(body) > 3:
            probe = body[3]
            hit = run_in(image, "sh", "-c", f"grep -rlF '{probe}' /etc /opt /usr/share/ca-certificates /usr/lib/ssl "
                         "2>/dev/null; true", timeout=600).stdout.strip()
            assert not hit, f"this machine's CA {ca} is in {image}: {hit}"
    pip_files = "/etc/pip.conf /etc/xdg/pip/pip.conf /home/model-server/.config/pip/pip.conf /home/model-server/.pip/pip.conf /opt/venv/pip.conf"
    assert run_in(image, "sh", "-c", f"ls {pip_files} 2>/dev/null; true").stdout.strip() == ""


@pytest.mark.parametrize("image", [PIPELINE_IMAGE, SERVING_IMAGE])
def test_dependencies_sit_below_the_code_layers(images, image):
    """Layer-cache friendly: what comes after the virtual environment's layer (the project's code) is small, so a
    code change rebuilds and pushes megabytes, not the dependencies."""
    history = [json.loads(line) for line in docker("history", "--no-trunc", "--human=false", "--format", "{{json .}}",
                                                   image).stdout.splitlines()]
    # COPY --from=...dependencies /opt/venv /opt/venv (the classic builder shows "COPY dir:<sha> in /opt/venv")
    venv = next(i for i, layer in enumerate(history) if re.search(r"COPY .*/opt/venv( # buildkit)?\s*$", layer["CreatedBy"]))
    above = sum(int(layer["Size"]) for layer in history[:venv])
    assert int(history[venv]["Size"]) > 500 * 2**20, "the dependencies are one big layer"
    assert above < 10 * 2**20, f"{above} bytes above the dependencies' layer"


# ---------------------------------------------------------------- the pipeline image


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def installed(image: str) -> dict[str, str]:
    listing = json.loads(run_in(image, "pip", "list", "--format", "json", "--disable-pip-version-check").stdout)
    return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in listing}


def test_pipeline_image_holds_the_lock_torch_and_the_project(images):
    have = installed(PIPELINE_IMAGE)
    wrong = {n: (v, have.get(n)) for n, v in lock_pins().items() if have.get(n) != v}
    assert not wrong, f"(locked, installed): {wrong}"
    torch_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                     if d.startswith("torch=="))
    assert have["torch"] == torch_pin.split("==")[1] + "+cpu", "pyproject's torch, the CPU build"
    assert have["kfp-mlops"] == "0.1.0"
    assert run_in(PIPELINE_IMAGE, "pip", "check", "--disable-pip-version-check").returncode == 0
    assert "java" not in run_in(PIPELINE_IMAGE, "sh", "-c", "command -v java || true").stdout, \
        "Java is the serving image's"


def test_pipeline_image_runs_mlops_and_imports_every_step(images):
    from components.train.trainjob import TrainJobSpec
    from pipelines.pipeline import STEPS

    assert "compile" in run_in(PIPELINE_IMAGE, "mlops", "--help").stdout
    modules = sorted({f.__module__ for f in STEPS.values()} | {TrainJobSpec.__dataclass_fields__["entry_module"].default,
                                                              "pipelines.cli", "components.train.dp"})
    script = f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\nprint('imported', len({modules!r}))"
    assert run_in(PIPELINE_IMAGE, "python", "-c", script).stdout.strip() == f"imported {len(modules)}"
    assert run_in(PIPELINE_IMAGE, "torchrun", "--help").returncode == 0, "the TrainJob nodes' launcher"


def test_pipeline_image_runs_a_compiled_steps_command(images):
    """The command KFP (and kfp.local's DockerRunner) gives a step's container: sh, mktemp, python3 with kfp."""
    from pipelines.pipeline import step_component

    container = step_component("ingest").component_spec.implementation.container
    done = run_in(PIPELINE_IMAGE, *container.command, "--help")
    assert "--executor_input" in done.stdout and "--function_to_execute" in done.stdout


# ---------------------------------------------------------------- the serving image


def serving_manifests() -> tuple[dict, dict]:
    deployment = yaml.safe_load((ROOT / "manifests/base/serving-deployment.yaml").read_text())
    config = yaml.safe_load((ROOT / "manifests/base/serving-configmap.yaml").read_text())
    return deployment, config


def test_serving_image_runs_each_command_of_the_serving_pod(images):
    deployment, _ = serving_manifests()
    spec = deployment["spec"]["template"]["spec"]
    pods_containers = spec["initContainers"] + spec["containers"]
    assert {c["image"] for c in pods_containers} == {SERVING_IMAGE}
    commands = [c["command"] for c in pods_containers]
    commands += [c[kind]["exec"]["command"] for c in pods_containers for kind in ("readinessProbe",) if "exec" in c.get(kind, {})]
    commands += [c["lifecycle"]["preStop"]["exec"]["command"] for c in pods_containers if "lifecycle" in c]
    for command in commands:
        if command[0] == "tini":
            command = command[command.index("--") + 1:]
            assert run_in(SERVING_IMAGE, "tini", "--version").returncode == 0
        if command[0] == "sleep":
            continue
        if command[:2] == ["python", "-m"]:
            check = ["python", "-m", command[2], *(command[3:4] if command[3:4] == ["drain"] else []), "--help"]
        elif command[0] == "python":
            check = ["python", command[1], "--help"]
        else:
            check = [command[0], "--help"]
        done = run_in(SERVING_IMAGE, *check)
        assert "usage" in (done.stdout + done.stderr).lower(), f"{check}: {done.stdout[-500:]}"
    java = run_in(SERVING_IMAGE, "java", "-version")
    assert 'version "17.' in java.stderr, java.stderr


def test_serving_image_holds_only_what_serving_imports(images):
    imports = "import serving.handler, serving.auth_proxy, serving.request_log, components.core.releases; print('ok')"
    assert run_in(SERVING_IMAGE, "python", "-c", imports).stdout.strip() == "ok"
    for absent in ("kfp", "evidently", "pipelines", "components.train", "components.pretrain", "sklearn",
                   "model_archiver"):
        done = run_in(SERVING_IMAGE, "python", "-c", f"import {absent}", check=False)
        assert done.returncode == 1 and "ModuleNotFoundError" in done.stderr, f"{absent} is importable"
    assert run_in(SERVING_IMAGE, "pip", "check", "--disable-pip-version-check").returncode == 0


def test_serving_image_installs_exactly_the_serving_closure(images):
    closure = ROOT / "build/project/cpu/serving/requirements.txt"
    if not closure.is_file():
        pytest.skip(f"{closure.relative_to(ROOT)} is missing (images built elsewhere): run make project-wheels")
    have = installed(SERVING_IMAGE)
    requirements = closure.read_text().splitlines()
    wanted = {line.split("==")[0]: line.split("==")[1].split()[0] for line in requirements if "==" in line}
    extra = set(have) - set(wanted) - {"kfp-mlops-serving", "pip", "setuptools"}
    assert not extra, f"installed beyond the serving closure: {extra}"
    assert all(have.get(n) == v for n, v in wanted.items()), {n: (v, have.get(n)) for n, v in wanted.items()}


@pytest.fixture
def release(tmp_path):
    """A real model's .mar, published as a release in a local directory, as the deploy step publishes it."""
    import torch

    from components.core.models import Classifier, EncoderSpec, save_classifier
    from components.core.releases import publish
    from serving.archive import build_mar

    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), tmp_path / "model",
                    {"class_names": [str(i) for i in range(10)], "model_version": "image-test"})
    build_mar(tmp_path / "model", tmp_path / "mar", "digits", "image-test", workers=1)
    manifest = publish(tmp_path / "mar", str(tmp_path / "release"))
    return tmp_path / "release", manifest


def test_serving_image_serves_as_the_serving_pod(images, release, tmp_path):
    """The pod's containers, commands, env and mounts from manifests/base, on the local engine: the init container
    fetches the release, TorchServe starts under tini, the auth proxy shares its network namespace; the readiness
    probe passes, a client token gets a prediction, no token gets 401, and the preStop drain flushes the log."""
    deployment, config_map = serving_manifests()
    spec = deployment["spec"]["template"]["spec"]
    release_dir, _ = release
    client_token, source_token = "client-token-for-the-image-test-0123", "source-token-for-the-image-test-4567"
    volumes = tmp_path / "volumes"
    for volume in spec["volumes"]:
        path = volumes / volume["name"]
        path.mkdir(parents=True)
        if "configMap" in volume:
            for key, text in config_map["data"].items():
                (path / key).write_text(text)
        elif "secret" in volume:
            token = source_token if "source" in volume["name"] else client_token
            (path / "token").write_text(token + "\n")
            (path / "token").chmod(0o444)
        path.chmod(0o777)  # the pod's fsGroup makes emptyDirs writable for UID 10001
    request_log = tmp_path / "request-log"
    request_log.mkdir()
    request_log.chmod(0o777)
    # The ConfigMap kfp-mlops-storage points at S3; here the release and the request log are local directories.
    storage = {"KFP_MLOPS_MODEL_URI": "/release", "KFP_MLOPS_REQUEST_LOG_DIR": "/request-log"}

    def run_args(container: dict) -> list[str]:
        args = ["--user", USER, "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "-v", f"{release_dir}:/release:ro", "-v", f"{request_log}:/request-log"]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        env.update(storage)
        for name, value in env.items():
            args += ["-e", f"{name}={value}"]
        for mount in container.get("volumeMounts", []):
            args += ["-v", f"{volumes / mount['name']}:{mount['mountPath']}{':ro' if mount.get('readOnly') else ''}"]
        command = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["command"]]
        return args + [SERVING_IMAGE, *command]

    fetch, = spec["initContainers"]
    done = docker("run", "--rm", "--network", "none", *run_args(fetch))
    assert (volumes / "models" / "store" / "digits.mar").is_file(), done.stdout + done.stderr

    server = next(c for c in spec["containers"] if c["name"] == "torchserve")
    proxy = next(c for c in spec["containers"] if c["name"] == "auth-proxy")
    name = f"kfp-mlops-image-test-{uuid.uuid4().hex[:8]}"
    started = []
    try:
        docker("run", "-d", "--name", name, "-p", "127.0.0.1::8080", *run_args(server))
        started.append(name)
        docker("run", "-d", "--name", f"{name}-proxy", "--network", f"container:{name}", *run_args(proxy))
        started.append(f"{name}-proxy")
        port = docker("port", name, "8080/tcp").stdout.split(":")[-1].strip()

        probe = server["readinessProbe"]["exec"]["command"]
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            answer = docker("exec", name, *probe, check=False)
            if answer.returncode == 0:
                break
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            assert state["Running"], f"TorchServe exited: {docker('logs', name, check=False).stdout[-3000:]}"
            time.sleep(2)
        assert answer.returncode == 0 and answer.stdout.strip() == "Healthy", \
            f"readiness probe: {answer.stdout}{answer.stderr}\n{docker('logs', name, check=False).stdout[-3000:]}"

        from PIL import Image

        png = io.BytesIO()
        Image.new("L", (8, 8), 128).save(png, format="PNG")
        url = f"http://127.0.0.1:{port}/predictions/digits"
        for _ in range(3):
            answer = requests.post(url, data=png.getvalue(), timeout=30,
                                   headers={"Authorization": f"Bearer {client_token}", "Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == "image-test"
        assert requests.post(url, data=png.getvalue(), timeout=30).status_code == 401

        drain = [a if a != "20" else "0" for a in server["lifecycle"]["preStop"]["exec"]["command"]]  # no wait here
        done = docker("exec", name, *drain, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = [json.loads(line) for f in request_log.glob("*.jsonl") for line in f.read_text().splitlines()]
        assert len(lines) == 3 and {line["model_version"] for line in lines} == {"image-test"}, lines
    finally:
        for container in reversed(started):
            docker("rm", "-f", container, check=False)
