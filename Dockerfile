# Two images from one file; `make image` builds both (and what they install: see below).
#
#   pipeline  ghcr.io/kfp-mlops/kfp-mlops:0.1.0          every pipeline step, the monitor CronJob, the TrainJob nodes:
#                                                         everything in requirements.lock, torch, kfp-mlops
#   serving   ghcr.io/kfp-mlops/kfp-mlops-serving:0.1.0  the serving pods (release fetch, TorchServe, auth proxy,
#                                                         readiness probe): only what they import, and Java 17
#
# Hermetic install: pip here never reaches an index. `make wheelhouse` collects requirements.lock and torch as wheels
# on the host (build/wheelhouse/<torch variant>/), `make project-wheels` builds the project's wheels and the serving
# closure (build/project/<torch variant>/), and each requirement file pins every wheel by sha256; pip runs with
# --no-index --require-hashes and no configuration file, so neither the host's network, certificates nor pip
# settings reach the build. Only the last stage (serving) uses the network: apt-get for Java and tini (Debian).
#
# BASE: kfp-mlops/base:bookworm, built locally by `make base-image` (scripts/base_image.sh, debootstrap) where no
# registry is reachable, or python:3.11-slim-bookworm where one is (make image BASE=python:3.11-slim-bookworm).
# Both are Debian bookworm with Python 3.11, the Python the wheelhouse is collected for.
# CUDA: TORCH_VARIANT=cu128 (make image-cuda): torch's CUDA wheels bring their CUDA libraries, so the same base
# serves both builds and a GPU node only needs the NVIDIA driver (CUDA 12.8 wheels: driver >= 570, or >= 525 with
# CUDA minor-version compatibility).
ARG BASE=python:3.11-slim-bookworm
ARG TORCH_VARIANT=cpu

# checkov:skip=CKV_DOCKER_7: the base is the ARG above, a pinned tag; checkov cannot resolve ARGs
FROM ${BASE} AS runtime
# Fixed non-root identity; the manifests' runAsUser/runAsGroup/fsGroup use the same numbers.
ARG UID=10001
ARG GID=10001
ENV DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version' \
    && groupadd --gid ${GID} mlops \
    && useradd --uid ${UID} --gid ${GID} --home-dir /home/model-server --create-home --shell /usr/sbin/nologin mlops

# The wheels, in build stages only: the images get the installed virtual environment, not the wheels. Every stage
# but the last (serving) works offline: `make image` builds --target pipeline with --network none, which proves it.
# (Docker's classic builder builds every stage above --target; BuildKit only those the target needs.)
FROM runtime AS wheels
ARG TORCH_VARIANT
COPY build/wheelhouse/${TORCH_VARIANT}/ /wheels/

FROM wheels AS serving-dependencies
ARG TORCH_VARIANT
COPY build/project/${TORCH_VARIANT}/serving/requirements.txt /wheels/serving.txt
RUN python3 -m venv /opt/venv \
    && PIP_CONFIG_FILE=/dev/null pip install --no-cache-dir --disable-pip-version-check --no-index \
       --find-links /wheels --only-binary :all: --require-hashes -r /wheels/serving.txt

# ---------------------------------------------------------------- pipeline
FROM wheels AS pipeline-dependencies
RUN python3 -m venv /opt/venv \
    && PIP_CONFIG_FILE=/dev/null pip install --no-cache-dir --disable-pip-version-check --no-index \
       --find-links /wheels --only-binary :all: --require-hashes -r /wheels/requirements.txt \
    && PIP_CONFIG_FILE=/dev/null pip check

FROM runtime AS pipeline
COPY --from=pipeline-dependencies /opt/venv /opt/venv
# The project's code last: a code change rebuilds only the layers from here on.
ARG TORCH_VARIANT
COPY build/project/${TORCH_VARIANT}/pipeline/ /tmp/project/
RUN PIP_CONFIG_FILE=/dev/null pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
       --find-links /tmp/project --only-binary :all: --require-hashes -r /tmp/project/requirements.txt \
    && PIP_CONFIG_FILE=/dev/null pip check \
    && rm -rf /tmp/project
USER 10001:10001
WORKDIR /home/model-server
LABEL org.opencontainers.image.title="kfp-mlops" \
      org.opencontainers.image.description="kfp-mlops: every pipeline step, the drift monitor, multi-node pretraining"
# No ENTRYPOINT: kfp.local's DockerRunner and KFP pass each step's command (sh -c ...) as the container command.
CMD ["mlops", "--help"]

# ---------------------------------------------------------------- serving
FROM runtime AS serving
# Java for TorchServe's frontend and tini as PID 1 of its container (SIGTERM must reach the Java process group),
# from Debian (bookworm and its security updates): the only step that needs a network. The man1 directory must
# exist for the JRE's alternatives, which the slim dpkg settings would otherwise skip.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && java -version
COPY --from=serving-dependencies /opt/venv /opt/venv
# The project's code last: a code change rebuilds only the layers from here on.
WORKDIR /opt/kfp-mlops
ARG TORCH_VARIANT
COPY build/project/${TORCH_VARIANT}/serving/ /tmp/project/
RUN PIP_CONFIG_FILE=/dev/null pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
       --find-links /tmp/project --only-binary :all: --require-hashes -r /tmp/project/project.txt \
    && PIP_CONFIG_FILE=/dev/null pip check \
    && rm -rf /tmp/project
COPY scripts/torchserve_probe.py ./scripts/torchserve_probe.py
USER 10001:10001
# The serving pods' working directory and HOME (an emptyDir there: the root filesystem is read-only).
WORKDIR /home/model-server
LABEL org.opencontainers.image.title="kfp-mlops-serving" \
      org.opencontainers.image.description="TorchServe, the kfp-mlops handler, auth proxy, release fetch and probe"
# No ENTRYPOINT: the manifests give every container its command.
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK: Kubernetes ignores it; the probes are in the manifests (TorchServe
# needs its token even for /ping).
CMD ["torchserve", "--help"]
