# Two commands: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
# TorchServe and torch-model-archiver are console scripts of the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The image tag; keep it equal to ClusterConfig.image's default in pipelines/config.py (a test checks).
IMAGE ?= ghcr.io/kfp-mlops/kfp-mlops:0.1.0
# checkov pins old boto3/packaging, so it lives in a venv of its own; tests/test_manifests.py calls its binary.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# Test files run in parallel, whole files per worker (their module fixtures train models once).
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install run test test-fast compile image image-cuda lock checkov manifests clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch is pinned here first: an unpinned resolve pulls a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q "checkov==3.3.30"
	touch $(CHECKOV_STAMP)

checkov: $(CHECKOV_STAMP)

run: install
	$(VENV)/bin/mlops run

test: install checkov
	$(PYTEST)

test-fast: install checkov
	$(PYTEST) -m "not slow"

compile: install
	$(VENV)/bin/mlops compile -o pipeline.yaml

image:
	docker build -t $(IMAGE) .

# The CUDA build (manifests/overlays/gpu): torch's CUDA wheels bring their CUDA libraries.
image-cuda:
	docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t $(IMAGE)-cuda .

# Re-pin requirements.lock (the image's dependency versions) from .venv.
lock: install
	$(VPY) scripts/lock.py

# Print every overlay rendered (kubectl kustomize), e.g. to review before `kubectl apply -k`.
manifests:
	for overlay in manifests/overlays/*/; do echo "# --- $$overlay"; kubectl kustomize "$$overlay"; done

clean:
	-$(VENV)/bin/mlops serve stop
	rm -rf runs pipeline.yaml
