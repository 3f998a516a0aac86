# The one image every pipeline step, the serving pods and the monitor CronJob run in.
#
#   CPU (default):  make image                 (docker build -t ghcr.io/kfp-mlops/kfp-mlops:0.1.0 .)
#   CUDA:           make image-cuda            (adds --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128,
#                                               tag ...:0.1.0-cuda; used by manifests/overlays/gpu)
#
# CUDA comes from the build argument TORCH_INDEX_URL, not from an nvidia/cuda base image:
# torch's CUDA wheels carry their own CUDA runtime libraries (the nvidia-* wheels), so the
# same slim Python base works for both builds and a GPU node only needs the NVIDIA driver
# (CUDA 12.8 wheels: driver >= 570, or >= 525 with CUDA minor-version compatibility).
# BASE may point at a mirror of the same image; keep it a Debian/Ubuntu image with Python 3.11.
ARG BASE=python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_7: the base is the ARG above, a pinned tag (python:3.11-slim-bookworm); checkov cannot resolve ARGs
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Fixed non-root identity; the manifests' runAsUser/runAsGroup/fsGroup use the same numbers.
ARG UID=10001
ARG GID=10001

ENV DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Java for TorchServe's frontend; tini as PID 1 so SIGTERM reaches the Java process group
# (torchserve --foreground's launcher would otherwise swallow it as PID 1).
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/* \
    && java -version

WORKDIR /opt/kfp-mlops
# torch first, pinned, from the index that matches the build (CPU or CUDA); everything
# else with the versions tested in the project's environment (requirements.lock).
RUN pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION}
COPY requirements.lock pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY scripts/torchserve_probe.py ./scripts/torchserve_probe.py
RUN pip install -c requirements.lock . \
    && pip check

# Non-root with a fixed UID/GID so Kubernetes' runAsNonRoot can verify it. The home directory
# is the TorchServe working directory in the serving pods (an emptyDir there: the root
# filesystem is read-only on the cluster).
RUN groupadd --gid ${GID} mlops \
    && useradd --uid ${UID} --gid ${GID} --home-dir /home/model-server --create-home --shell /usr/sbin/nologin mlops
USER 10001:10001
WORKDIR /home/model-server
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK: Kubernetes ignores it; the probes are in the manifests (TorchServe
# needs its token even for /ping), and one image has three roles (pipeline step, server, monitor) with different health.
ENTRYPOINT ["mlops"]
