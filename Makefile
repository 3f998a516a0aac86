# Two commands: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
# TorchServe and torch-model-archiver are console scripts of the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# The images' tags; keep them equal to ClusterConfig.image's and .serving_image's defaults in pipelines/config.py
# (a test checks).
IMAGE ?= ghcr.io/kfp-mlops/kfp-mlops:0.1.0
SERVING_IMAGE ?= ghcr.io/kfp-mlops/kfp-mlops-serving:0.1.0
# The images' base: built here by `make base-image` (debootstrap) unless BASE names a pullable image, e.g.
# BASE=python:3.11-slim-bookworm where a registry is reachable.
LOCAL_BASE := kfp-mlops/base:bookworm
BASE ?= $(LOCAL_BASE)
# torch's build in the images: cpu, or a CUDA tag (make image-cuda). The wheelhouse takes torch from pip's
# configured sources when they hold it, else from TORCH_INDEX_URL.
TORCH_VARIANT ?= cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/$(TORCH_VARIANT)
CUDA_VARIANT ?= cu128
WHEELHOUSE := build/wheelhouse/$(TORCH_VARIANT)
# DOCKER_BUILD_FLAGS: e.g. --no-cache, or --pull for a registry base.
DOCKER_BUILD_FLAGS ?=
DOCKER_BUILD := docker build $(DOCKER_BUILD_FLAGS) --build-arg BASE=$(BASE) --build-arg TORCH_VARIANT=$(TORCH_VARIANT)
# checkov pins old boto3/packaging, so it lives in a venv of its own; tests/test_manifests.py calls its binary.
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
# Test files run in parallel, whole files per worker (their module fixtures train models once).
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile
# The container tests (tests/containers) need a Docker engine and both images. CONTAINERS=require (CI): install and
# start an engine where none answers (scripts/container_engine.sh, as root), build the images, and fail on any
# skipped container test; auto (default): build the images when an engine answers, else those tests skip; off:
# prepare nothing. The tests read the mode from KFP_MLOPS_CONTAINER_TESTS.
CONTAINERS ?= auto
ifeq ($(filter $(CONTAINERS),require auto off),)
$(error CONTAINERS=$(CONTAINERS): use require, auto or off)
endif
export KFP_MLOPS_CONTAINER_TESTS := $(CONTAINERS)
# The browser tests (tests/browser) drive Debian's headless chromium with its chromedriver. BROWSER=require (CI):
# install both where missing (scripts/browser.sh, as root) and fail on any skipped browser test; auto (default): those
# tests skip, saying why, when no browser runs; off: they skip. The tests read the mode from KFP_MLOPS_BROWSER_TESTS
# and leave a screenshot per test in build/test-artifacts/browser/.
BROWSER ?= auto
ifeq ($(filter $(BROWSER),require auto off),)
$(error BROWSER=$(BROWSER): use require, auto or off)
endif
export KFP_MLOPS_BROWSER_TESTS := $(BROWSER)

.PHONY: install run test test-fast containers browser compile base-image wheelhouse project-wheels image image-cuda lock checkov manifests clean

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

# A daemon that containers started for this run (no engine answered before it) is stopped after the tests, pass
# or fail; the exit status stays pytest's.
test: install checkov
	if [ $(CONTAINERS) = require ] && ! scripts/container_engine.sh check >/dev/null; then \
	    trap 'scripts/container_engine.sh stop' EXIT; fi; \
	$(MAKE) --no-print-directory containers browser && $(PYTEST)

test-fast: install checkov
	$(PYTEST) -m "not slow and not containers"

# What the container tests need, by CONTAINERS (above); `make image` reuses Docker's layer cache, so a rerun is quick.
containers:
ifeq ($(CONTAINERS),require)
	scripts/container_engine.sh ensure
	$(MAKE) --no-print-directory image
else ifeq ($(CONTAINERS),auto)
	@if why=$$(scripts/container_engine.sh check); then $(MAKE) --no-print-directory image; else \
	    echo "$$why: the container tests (tests/containers) will be skipped; an engine: sudo scripts/container_engine.sh ensure"; fi
else
	@:
endif

# What the browser tests need, by BROWSER (above).
browser:
ifeq ($(BROWSER),require)
	scripts/browser.sh ensure
else ifeq ($(BROWSER),auto)
	@why=$$(scripts/browser.sh check) || \
	    echo "$$why: the browser tests (tests/browser) will be skipped; a browser: sudo scripts/browser.sh ensure"
else
	@:
endif

compile: install
	$(VENV)/bin/mlops compile -o pipeline.yaml

# The pipeline image ($(IMAGE)) and the serving image ($(SERVING_IMAGE)), from the wheels below (docs/cluster.md).
# The pipeline image and everything it installs build without a network (--network none): the proof that the
# wheelhouse is complete; only the serving stage's apt-get (Java, tini) goes online.
image: $(if $(filter $(LOCAL_BASE),$(BASE)),base-image) project-wheels
	$(DOCKER_BUILD) --network none --target pipeline -t $(IMAGE) .
	$(DOCKER_BUILD) --target serving -t $(SERVING_IMAGE) .

# Both images with torch's CUDA build (manifests/overlays/gpu); its wheel needs PyTorch's CUDA index (or a local copy).
image-cuda:
	$(MAKE) image TORCH_VARIANT=$(CUDA_VARIANT) IMAGE=$(IMAGE)-cuda SERVING_IMAGE=$(SERVING_IMAGE)-cuda

# Debian bookworm with Python 3.11, from debootstrap, for machines that cannot pull python:3.11-slim-bookworm;
# skipped when the tag exists (scripts/base_image.sh --force rebuilds it). Needs root.
base-image:
	BASE_TAG=$(LOCAL_BASE) scripts/base_image.sh

# requirements.lock and torch as wheels, hash-pinned; collected again only when the lock or pyproject.toml change.
wheelhouse: $(WHEELHOUSE)/requirements.txt

$(WHEELHOUSE)/requirements.txt: requirements.lock pyproject.toml scripts/wheelhouse.py
	$(PYTHON) scripts/wheelhouse.py deps --variant $(TORCH_VARIANT) --torch-index-url $(TORCH_INDEX_URL) --out $(WHEELHOUSE)

# The project's wheels and the serving closure: offline and quick, so always rebuilt (reproducible: an
# unchanged tree gives the same bytes, and Docker's layer cache holds).
project-wheels: wheelhouse
	$(PYTHON) scripts/wheelhouse.py project --wheelhouse $(WHEELHOUSE) --out build/project/$(TORCH_VARIANT)

# Re-pin requirements.lock (the images' dependency versions) from .venv.
lock: install
	$(VPY) scripts/lock.py

# Print every overlay rendered (kubectl kustomize), e.g. to review before `kubectl apply -k`.
manifests:
	for overlay in manifests/overlays/*/; do echo "# --- $$overlay"; kubectl kustomize "$$overlay"; done

clean:
	-$(VENV)/bin/mlops serve stop
	rm -rf runs pipeline.yaml
