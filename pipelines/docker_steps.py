"""What ``mlops run --runner docker`` sets up around a run: the pinned pipeline image, the steps' identity,
environment and mounts, and the serving broker (``DockerSteps``)."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

from pipelines.config import Config

# Host variables a step container gets (the S3 settings and keys components/core/s3_client.py reads, the model
# store), as a cluster's steps get them from the storage ConfigMap and Secret. Not those naming files of
# this machine, which the containers do not have.
STEP_ENV_PREFIXES = ("S3_", "AWS_")
STEP_ENV_NAMES = ("KFP_MLOPS_MODEL_STORE", "KFP_MLOPS_REFERENCE")
STEP_ENV_EXCLUDED = ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE")
PINNED_REPOSITORY = "kfp-mlops-run/pipeline"  # a run's own tag of the pipeline image, removed after the run


def step_code_digest(packages: tuple[str, ...] = ("components", "serving")) -> str:
    """sha256 over the Python files of the packages the steps import (paths and bytes), found beside the
    ``components`` package Python imports. Runs here and, by its source, inside the pipeline image: equal
    digests mean the steps run this checkout's code."""
    import hashlib
    import importlib
    import pathlib

    digest = hashlib.sha256()
    top = pathlib.Path(importlib.import_module("components").__file__).parent.parent
    for name in packages:
        root = top / name
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(f"{name}/{path.relative_to(root).as_posix()}\n".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


class DockerSteps:
    """What ``--runner docker`` sets up around a run.

    * The pipeline image (``cluster.image``) is pinned: its id is read before the run, tagged for the run
      (``kfp-mlops-run/pipeline:<run-id>``) and the steps are built on that tag, so every step runs the image
      the summary names, even if ``make image`` retags it meanwhile. Its step code must be this checkout's
      (``step_code_digest``), else the run stops before it starts: rebuild with ``make image``.
    * The steps run as this user's uid:gid, or as ``cluster.run_as_user``/``run_as_group`` when this is root
      (the run's pipeline root is handed to them; ``containers.local_identity``), HOME=/tmp, all capabilities dropped, no privilege
      escalation; on the host's network, so the endpoint and an S3 server on loopback are the same address
      inside and out. kfp.local bind-mounts the pipeline root at its own path; the serving home (and the
      request-log directory) are mounted read-only at theirs, so the paths in records and state files mean
      the same files everywhere. No host code is mounted: the steps import the image's installed package.
    * The serving broker (``components.deploy.broker``) runs in this process: the deploy step asks it to
      serve, this process starts the serving containers (``components.deploy.containers.serve_release``).
    """

    def __init__(self, cfg: Config, run_id: str, manifests: str | Path):
        self.cfg, self.run_id, self.manifests = cfg, run_id, Path(manifests)
        self.home = Path(cfg.serving.home)
        self.image: dict[str, Any] = {}

    def check(self) -> DockerSteps:
        """Fail now, with what to do, if the engine, the images or the manifests are not there."""
        from components.deploy.containers import local_identity, request_log_dir_of
        from components.deploy.pods import PodError, docker_client

        self.client = docker_client()
        pipeline_image = self.image_on_engine(self.cfg.cluster.image)
        self.image_on_engine(self.cfg.cluster.serving_image)  # the deploy step will need it
        self.image = {"image": self.cfg.cluster.image, "image_id": pipeline_image.id,
                      "image_repo_digests": pipeline_image.attrs.get("RepoDigests") or []}
        uid, gid = local_identity()
        self.uid, self.gid = (self.cfg.cluster.run_as_user, self.cfg.cluster.run_as_group) if uid is None else (uid, gid)
        if not self.uid:
            raise PodError("the steps would run as root: set cluster.run_as_user to a non-root uid")
        if not (self.manifests / "kustomization.yaml").is_file():
            raise FileNotFoundError(f"no kustomization.yaml in {self.manifests}: the docker runner serves the "
                                    "serving Deployment of the manifests (run from a checkout of kfp-mlops)")
        request_log_dir_of(self.cfg.serving, self.home)  # an s3:// request log cannot work here: say so now
        ours, theirs = step_code_digest(), self.image_code_digest(pipeline_image.id)
        if ours != theirs:
            raise PodError(f"the pipeline image {self.cfg.cluster.image} ({pipeline_image.short_id}) holds other step "
                           f"code than this checkout (digest {theirs[:12]} there, {ours[:12]} here): rebuild it with "
                           "'make image', so that the steps run the code you see")
        return self

    def image_on_engine(self, image: str):
        from components.deploy.pods import PodError

        try:
            return self.client.images.get(image)
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound and the engine's other refusals
            raise PodError(f"image {image} is not on the Docker engine and a local run never pulls: build it with "
                           "'make image' (or tag yours with that name)") from None

    def image_code_digest(self, image: str) -> str:
        script = inspect.getsource(step_code_digest) + "\nprint(step_code_digest())\n"
        output = self.client.containers.run(image, ["python", "-c", script], remove=True, network_mode="none",
                                            user=f"{self.uid}:{self.gid}", environment={"HOME": "/tmp"})
        return output.decode().strip().splitlines()[-1]

    def environment(self, broker_socket: Path) -> dict[str, str]:
        from components.core import ledger
        from components.core.names import LEDGER_ENV
        from components.deploy.broker import SOCKET_ENV

        passed = {k: v for k, v in os.environ.items()
                  if (k.startswith(STEP_ENV_PREFIXES) or k in STEP_ENV_NAMES) and k not in STEP_ENV_EXCLUDED}
        # The ledger where this machine has it (mounted read-write, see mounts), and what the record step names.
        recorded = {LEDGER_ENV: ledger.location(self.cfg.serving), ledger.RUN_ID_ENV: self.run_id,
                    ledger.IMAGE_ENV: self.image["image"], ledger.IMAGE_ID_ENV: self.image["image_id"]}
        return {**passed, **recorded, "HOME": "/tmp", "DO_NOT_TRACK": "1", SOCKET_ENV: str(broker_socket)}

    def mounts(self, broker_dir: Path, request_log_dir: Path) -> list:
        from docker.types import Mount

        mounts = [Mount(str(self.home), str(self.home), type="bind", read_only=True),
                  Mount(str(broker_dir), str(broker_dir), type="bind", read_only=True)]
        if not request_log_dir.is_relative_to(self.home):
            mounts.append(Mount(str(request_log_dir), str(request_log_dir), type="bind", read_only=True))
        from components.core.ledger import prepare_directory

        ledger_dir = prepare_directory(self.cfg.serving, (self.uid, self.gid) if os.getuid() == 0 else None)
        if ledger_dir is not None:  # the record, deploy and monitor steps append to the release ledger there
            mounts.append(Mount(str(ledger_dir), str(ledger_dir), type="bind", read_only=False))
        return mounts

    def serve(self, request: dict[str, Any]) -> dict[str, Any]:
        from components.deploy.containers import serve_release

        return serve_release(request["archive"], request["model_version"], self.cfg.serving, self.home,
                             overlay=self.manifests, serving_image=self.cfg.cluster.serving_image,
                             model_dir=request["model_dir"], dataset_dir=request["dataset_dir"], run_id=self.run_id)

    def stop_serving(self) -> dict[str, Any]:
        from components.deploy.containers import served_from

        return served_from(self.home).stop()

    def started(self, pipeline_root: Path):
        """A context: (the DockerRunner, the run's tag of the pipeline image) while the broker listens."""
        import contextlib

        from kfp import local

        from components.deploy.broker import ServingBroker
        from components.deploy.containers import prepare_home
        from pipelines.pipeline import GATE_STEPS

        @contextlib.contextmanager
        def context():
            if os.getuid() == 0:
                os.chown(pipeline_root, self.uid, self.gid)  # the steps write their outputs there
            paths = prepare_home(self.cfg.serving, self.home, self.uid, self.gid)
            tag = re.sub(r"[^A-Za-z0-9_.-]", "-", self.run_id)[:128].lstrip(".-") or "run"
            self.client.images.get(self.image["image_id"]).tag(PINNED_REPOSITORY, tag)
            broker = ServingBroker(pipeline_root, GATE_STEPS, serve=self.serve, stop=self.stop_serving,
                                   allowed_uid=self.uid, owner=(self.uid, self.gid))
            try:
                with broker:
                    runner = local.DockerRunner(
                        user=f"{self.uid}:{self.gid}", environment=self.environment(broker.socket_path),
                        mounts=self.mounts(broker.directory, paths["request_log_dir"]), network_mode="host",
                        cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
                        labels={"kfp-mlops.io/run-id": self.run_id})
                    yield runner, f"{PINNED_REPOSITORY}:{tag}"
            finally:
                self.client.images.remove(f"{PINNED_REPOSITORY}:{tag}", noprune=True)

        return context()
