# The one image every pipeline step runs in (and the serving pods, later).
#   CPU (default):  docker build -t kfp-mlops:0.1.0 .
#   CUDA:           docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t kfp-mlops:0.1.0-cuda .
# The CUDA wheels of torch bundle their CUDA libraries; the node only needs the NVIDIA driver.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# TorchServe's frontend is Java.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kfp-mlops
# torch first and pinned, from the index that matches the build (CPU or CUDA).
RUN pip install --index-url ${TORCH_INDEX_URL} torch==2.13.0
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
RUN pip install .

# Non-root, fixed UID so Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin mlops
USER 10001
WORKDIR /home/mlops
ENTRYPOINT ["mlops"]
