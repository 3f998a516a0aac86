"""What the container tests (tests/containers/) need: a Docker engine that answers, and the images `make image` builds.

`make test` prepares both before pytest starts (scripts/container_engine.sh, `make image`); the tests build nothing.
KFP_MLOPS_CONTAINER_TESTS, set by the Makefile from CONTAINERS, says how strictly: ``require`` (CI runs
`make test CONTAINERS=require`) turns every skip of a test under tests/containers into a failure with the skip's
reason, so CI cannot pass without running them; ``auto`` (the default) and ``off`` let them skip. tests/conftest.py
wires the fixtures and the hooks to the functions here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODE_ENV = "KFP_MLOPS_CONTAINER_TESTS"
CONTAINER_TESTS = Path(__file__).resolve().parent / "containers"
HOW_TO_GET_AN_ENGINE = "`sudo scripts/container_engine.sh ensure` installs and starts one (Debian's docker.io)"
HOW_TO_BUILD = "build them with `make image` (`make test` does when an engine answers)"


def required() -> bool:
    return os.environ.get(MODE_ENV, "auto") == "require"


def project_image_tags() -> tuple[str, str]:
    """The pipeline image's and the serving image's tags, as the Makefile and the compiled pipeline name them."""
    from pipelines.config import ClusterConfig

    return ClusterConfig().image, ClusterConfig().serving_image


def engine_client():
    """A client (docker SDK) of the engine DOCKER_HOST or the local socket points at; a skip that says what to do
    when none answers."""
    from components.deploy.pods import PodError, docker_client

    try:
        return docker_client()
    except PodError as err:
        pytest.skip(f"{err}: {HOW_TO_GET_AN_ENGINE}")


def local_images(client, tags) -> dict:
    """``{tag: docker.models.images.Image}`` of ``tags`` on the engine; a skip naming the missing ones. Nothing is
    pulled or built."""
    import docker

    found, missing = {}, []
    for tag in sorted(tags):
        try:
            found[tag] = client.images.get(tag)
        except docker.errors.ImageNotFound:
            missing.append(tag)
    if missing:
        pytest.skip(f"images {missing} are not on the engine: {HOW_TO_BUILD}")
    return found


def is_container_test(path: Path) -> bool:
    return CONTAINER_TESTS in Path(path).resolve().parents


def fail_instead_of_skip(report, path: Path) -> None:
    """Under KFP_MLOPS_CONTAINER_TESTS=require, turn a skipped report (a test's or a module's collection) of a
    container test into a failure that keeps the skip's reason. Expected failures (xfail) stay as they are."""
    if not (report.skipped and required() and is_container_test(path)) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{MODE_ENV}=require: a container test may not skip, and this one did: {reason}")
