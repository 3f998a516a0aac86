# Two commands: `make run` and `make test`. Both install into .venv first.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
# TorchServe and torch-model-archiver are console scripts of the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-fast compile image clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch is pinned here first: an unpinned resolve pulls a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/mlops run

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

compile: install
	$(VENV)/bin/mlops compile -o pipeline.yaml

image:
	docker build -t kfp-mlops:0.1.0 .

clean:
	-$(VENV)/bin/mlops serve stop
	rm -rf runs pipeline.yaml
