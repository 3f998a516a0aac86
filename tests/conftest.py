"""Fixtures shared by the test files: the real digits split, one torch thread, the Docker engine and the images."""

import os
import time
import uuid
from pathlib import Path

import browser_support
import container_support
import numpy as np
import pytest
import torch
from runbrowser_support import make_run  # noqa: F401 - a fixture of the run browser's tests
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from components.core.data import Splits, save_splits


def digits_splits(seed: int = 0, test: float = 0.2, val: float = 0.15, pool: float = 0.2) -> Splits:
    """Digits split like ingest does it (stratified test, val, pool; the rest trains), without running ingest."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    n = len(y)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=round(test * n), stratify=y, random_state=seed)
    rest_x, val_x, rest_y, val_y = train_test_split(rest_x, rest_y, test_size=round(val * n), stratify=rest_y,
                                                    random_state=seed)
    train_x, pool_x, train_y, _ = train_test_split(rest_x, rest_y, test_size=round(pool * n), stratify=rest_y,
                                                   random_state=seed)
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, pool_x, [str(d) for d in range(10)])


@pytest.fixture(scope="module")
def splits() -> Splits:
    return digits_splits()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("digits")
    save_splits(splits, out)
    return out


@pytest.fixture
def one_thread():
    """One torch thread: test files run in parallel on 2 cores, and oversubscribed threads make small models
    tens of times slower (measured: 0.015 s vs 0.44 s per training step); it also makes runs reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_cluster_environment(monkeypatch):
    """No test may pick up a real cluster, KFP endpoint or token from the environment it runs in."""
    for name in ("KUBERNETES_SERVICE_HOST", "KFP_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "KUBECONFIG",
                 "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kfp_api():
    """The KFP API stand-in (tests/kfp_api_server.py) on loopback; its token is "good-token"."""
    from kfp_api_server import FakeKfpApi

    server = FakeKfpApi(token="good-token").start()
    yield server
    server.stop()
    assert not server.errors, f"the fake KFP API hit internal errors: {server.errors}"


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``mlops ARGV`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def run_cli():
    """Run ``mlops`` in-process: ``code, out, err = run_cli(["monitor", "--json"])``."""
    return _run_cli


def free_ports(n: int) -> list[int]:
    """``n`` free loopback ports below Linux's ephemeral range (32768-60999), for a pipeline's serving ports:
    minutes may pass before deploy binds them, and a port from that range may meanwhile be handed to any other
    process's outgoing or port-0 socket."""
    import random
    import socket

    ports = []
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError("no free port between 20000 and 32000")


def settings_of(**areas):
    """Step settings (what a step function's ``cfg`` holds) from config dataclasses: ``settings_of(data=DataConfig())``."""
    import dataclasses

    from components.core.settings import Settings

    return Settings(**{name: Settings(**dataclasses.asdict(value)) for name, value in areas.items()})


# Blob storage and releases: the same tests on a local directory and on a real S3 API (moto's server on loopback).

SAMPLE_FILES = {
    "model.safetensors": os.urandom(3000),
    "metadata.json": b'{"class_names": ["0", "1"]}',
    "nested/deeper/empty.bin": b"",
    "nested/notes \u00e9t\u00e9.txt": b"Unicode names survive",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """Write ``{relative path: bytes}`` below ``root``; returns ``root``."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftover_temp_files(root: Path) -> list[str]:
    """Temporary files and directories an atomic write, a fetch or a swap left behind below ``root``."""
    return [p.name for p in root.rglob(".*") if ".tmp-" in p.name or ".fetch-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="session")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.fixture
def bucket(moto_server, monkeypatch) -> str:
    """A fresh bucket on the moto server, with the environment pointing at it (multipart from 5 MiB)."""
    from s3server import s3_env

    from components.core.blobs import Storage

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_env(moto_server.endpoint, S3_MULTIPART_THRESHOLD_MB="5", S3_MULTIPART_CHUNKSIZE_MB="5").items():
        monkeypatch.setenv(name, value)
    name = f"test-{uuid.uuid4().hex[:12]}"
    Storage().client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store_base(request, tmp_path) -> str:
    """Where a test stores: a local directory, then an s3:// prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/store"


# The evaluate step's models: challengers and champions of known quality, shared by the evaluate and gate tests.


def probe_model(splits: Splits, width: int, seed: int = 0, train_limit: int | None = None):
    """A classifier without training: a random encoder with a logistic-regression head on its features."""
    from sklearn.linear_model import LogisticRegression

    from components.core.models import Classifier, EncoderSpec

    torch.manual_seed(seed)
    model = Classifier(EncoderSpec(1, 8, width=width, embed_dim=4 * width), num_classes=10).eval()
    x, y = splits.train_x[:train_limit], splits.train_y[:train_limit]
    with torch.no_grad():
        features = model.embed(torch.from_numpy(x)).numpy()
    mean, std = features.mean(0), features.std(0) + 1e-6
    probe = LogisticRegression(max_iter=1000).fit((features - mean) / std, y)
    with torch.no_grad():  # fold the standardisation into the linear head
        model.head.weight.copy_(torch.from_numpy(probe.coef_ / std).float())
        model.head.bias.copy_(torch.from_numpy(probe.intercept_ - (probe.coef_ * mean / std).sum(1)).float())
    return model


@pytest.fixture(scope="module")
def known_model(tmp_path_factory, splits):
    """A good-but-imperfect classifier (test accuracy ~0.9): its directory and its test predictions."""
    from components.core.models import save_classifier
    from components.train.loops import predict_logits

    model = probe_model(splits, width=32)
    out = tmp_path_factory.mktemp("model")
    save_classifier(model, out, {"class_names": splits.class_names, "model_version": "known-1"})
    predictions = predict_logits(model, splits.test_x).argmax(1).numpy()
    return out, predictions


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory, splits):
    """A clearly worse classifier: a narrow encoder probed with 60 labels."""
    from components.core.models import save_classifier

    out = tmp_path_factory.mktemp("weak")
    save_classifier(probe_model(splits, width=8, seed=1, train_limit=60), out,
                    {"class_names": splits.class_names, "model_version": "weak-1"})
    return out


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, known_model):
    """A serving home as deploy leaves it: the .mar in the model store and state.json (server not running)."""
    import json

    from serving.archive import build_mar

    home = tmp_path_factory.mktemp("serving")
    build_mar(known_model[0], home / "model-store", "digits", "known-1")
    (home / "state.json").write_text(json.dumps({"model_name": "digits", "model_version": "known-1", "pid": None,
                                                 "endpoint": "http://127.0.0.1:1/predictions/digits"}))
    return home


def assert_self_contained_html(page: str) -> None:
    """A report page that needs nothing from the network: no links, scripts or external images."""
    import re

    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://|<link|<script|@import|url\(|href\s*=", page, re.IGNORECASE)
    for source in re.findall(r"""src\s*=\s*["']?([^"'\s>]*)""", page):  # images are inline data only
        assert source.startswith("data:image/png;base64,"), source[:80]


# The privacy and robustness gates' models: small digits classifiers trained by a plain AdamW loop.

MEMORISED_EXAMPLES = 50  # train images the memorising model learns by heart


def train_classifier(x: np.ndarray, y: np.ndarray, epochs: int, weight_decay: float, val=None, patience: int = 0,
                     batch_size: int = 64, seed: int = 0):
    """A small classifier trained on one thread: reproducible, and fast beside the test files running in parallel.

    With ``val`` (images, labels) it stops after ``patience`` epochs without a lower validation loss and keeps
    the best weights.
    """
    import copy
    import math

    import torch.nn.functional as F

    from components.core.models import Classifier, EncoderSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = Classifier(EncoderSpec(width=16, embed_dim=32), 10)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=weight_decay)
        best_loss, best_state, stale = math.inf, None, 0
        for _ in range(epochs):
            model.train()
            for batch in torch.randperm(len(x)).split(batch_size):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if val is not None:
                model.eval()
                with torch.no_grad():
                    val_loss = F.cross_entropy(model(torch.from_numpy(val[0])), torch.from_numpy(val[1])).item()
                if val_loss < best_loss:
                    best_loss, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
                else:
                    stale += 1
                    if stale >= patience:
                        break
        if best_state is not None:
            model.load_state_dict(best_state)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def regularised_model():
    """Early-stopped on validation loss, with weight decay: the pipeline's kind of model.

    Trained once per test process; a test that changes its mode or gradients puts them back.
    """
    splits = digits_splits()
    return train_classifier(splits.train_x, splits.train_y, epochs=30, weight_decay=0.01,
                            val=(splits.val_x, splits.val_y), patience=5)


@pytest.fixture(scope="session")
def memorising_model():
    """The first 50 train images, 200 full-batch epochs, no regularisation: it memorises them."""
    splits = digits_splits()
    return train_classifier(splits.train_x[:MEMORISED_EXAMPLES], splits.train_y[:MEMORISED_EXAMPLES], epochs=200,
                            weight_decay=0.0, batch_size=MEMORISED_EXAMPLES)


@pytest.fixture(scope="module")
def test_set(splits):
    """The test split as tensors."""
    return torch.from_numpy(splits.test_x), torch.from_numpy(splits.test_y)


def run_gate_in_local_pipeline(step: str, cfg, dataset_dir, model_dir, pipeline_root) -> bool:
    """The output of gate ``step``'s KFP component run by kfp.local in a subprocess, which gets only its source."""
    from kfp import dsl, local

    from pipelines.pipeline import config_arguments, step_component

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    component = step_component(step, image="python:3.11")

    @dsl.pipeline
    def gate(dataset_uri: str, model_uri: str) -> bool:
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        return component(dataset=dataset.output, model=model.output, **config_arguments(step, cfg)).outputs["Output"]

    return gate(dataset_uri=str(dataset_dir), model_uri=str(model_dir)).output


# The monitor's data, shared by its test files: shuffled digits, the first ones as the training reference and the
# rest as clean production traffic, and a tiny classifier with its model reference.

MONITOR_REFERENCE_ROWS = 1100  # like ingest's train+val reference on digits


@pytest.fixture(scope="session")
def digits_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as [N, 1, 8, 8] in [0, 1] with labels, shuffled once (the file is ordered by writer)."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    return (data.images / 16.0).astype(np.float32)[:, None][order], data.target[order].astype(np.int64)


@pytest.fixture(scope="session")
def digits(digits_and_labels) -> np.ndarray:
    return digits_and_labels[0]


@pytest.fixture(scope="session")
def reference(digits):
    """The image-feature reference of the first digits, as ingest writes it (with a label column to ignore)."""
    from components.core.features import image_features

    ref = image_features(digits[:MONITOR_REFERENCE_ROWS])
    ref["label"] = 0
    return ref


@pytest.fixture(scope="session")
def held_out(digits) -> np.ndarray:
    """697 digits the reference never saw: i.i.d. production traffic."""
    return digits[MONITOR_REFERENCE_ROWS:]


def _train_tiny_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 150):
    """A small CNN trained for a second or two (one thread: faster on a busy 2-core machine)."""
    return fit_small_classifier(images, labels, width=8, steps=steps)


@pytest.fixture(scope="session")
def model_dir(digits_and_labels, tmp_path_factory):
    """A classifier trained on digits[:800] with its model reference on digits[800:1100] (its validation split)."""
    from components.core.features import write_model_reference
    from components.core.models import save_classifier

    images, labels = digits_and_labels
    out = tmp_path_factory.mktemp("model")
    save_classifier(_train_tiny_classifier(images[:800], labels[:800]), out,
                    {"class_names": [str(i) for i in range(10)], "model_version": "m1"})
    write_model_reference(out, images[800:MONITOR_REFERENCE_ROWS])
    return out


@pytest.fixture(scope="session")
def model(model_dir):
    from components.core.models import load_classifier

    return load_classifier(model_dir)[0]


@pytest.fixture(scope="session")
def model_reference(model_dir):
    import pandas as pd

    from components.core.features import MODEL_REFERENCE_FILE

    return pd.read_csv(model_dir / MODEL_REFERENCE_FILE)


# The serving and deploy tests' model: a small classifier trained for real, so a served model answers sensibly.

DIGIT_NAMES = [str(i) for i in range(10)]


def fit_small_classifier(images: np.ndarray, labels: np.ndarray, width: int, steps: int,
                         max_seconds: float = float("inf")):
    """A small CNN fitted with a plain seeded loop on one thread (several times faster on a busy 2-core machine)."""
    from components.core.models import Classifier, EncoderSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = Classifier(EncoderSpec(width=width, embed_dim=2 * width), num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        start = time.monotonic()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.monotonic() - start > max_seconds:
                break
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def train_digits_classifier(out_dir: Path, steps: int = 300, max_seconds: float = 20.0,
                            model_version: str = "test-1") -> tuple[np.ndarray, np.ndarray]:
    """Train a small classifier on sklearn digits; save it; return the held-out 200 images and their labels."""
    from components.core.models import save_classifier

    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    model = fit_small_classifier(x[:-200], y[:-200], width=16, steps=steps, max_seconds=max_seconds)
    save_classifier(model, out_dir, {"class_names": DIGIT_NAMES, "model_version": model_version})
    return x[-200:], y[-200:]


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory) -> Path:
    """An untrained digits classifier (8x8 gray images): enough to pack, load and answer."""
    from components.core.models import Classifier, EncoderSpec, save_classifier

    out = tmp_path_factory.mktemp("gray-model")
    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), out, {"class_names": DIGIT_NAMES, "model_version": "v-gray"})
    return out


# ---------------------------------------------------------------- the container tests (tests/container_support.py)


@pytest.fixture(scope="session")
def container_engine():
    """The Docker engine's client (docker SDK); the test skips, saying how to get one, when none answers."""
    return container_support.engine_client()


@pytest.fixture(scope="session")
def project_images(container_engine) -> dict:
    """``{tag: docker Image}`` of the pipeline and the serving image; the test skips when one is missing (`make
    image` builds them; the tests do not)."""
    return container_support.local_images(container_engine, container_support.project_image_tags())


# ---------------------------------------------------------------- the browser tests (tests/browser_support.py)
# Fixtures of nested folders live here too: a second conftest.py would be imported as the module "conftest" and
# shadow this one for the tests that import helpers from it.


@pytest.fixture(scope="session")
def chromium():
    """The session's headless Chromium (Selenium WebDriver); skips, saying how to get one, when none is installed."""
    driver = browser_support.start_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium, request):
    """The session's Chromium for one test, its console emptied first; on teardown a screenshot of the page it
    shows goes to build/test-artifacts/browser/<test>.png (CI keeps that folder)."""
    import warnings

    browser_support.console_entries(chromium)  # the messages of the tests before this one
    yield chromium
    path = browser_support.artifacts_dir() / f"{browser_support.artifact_name(request.node.nodeid)}.png"
    try:
        browser_support.screenshot(chromium, path)
    except Exception as err:  # the test's own result matters more than its picture
        warnings.warn(f"no screenshot of {request.node.nodeid}: {err}", stacklevel=1)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    container_support.fail_instead_of_skip(outcome.get_result(), item.path)
    browser_support.fail_instead_of_skip(outcome.get_result(), item.path)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    outcome = yield
    container_support.fail_instead_of_skip(outcome.get_result(), collector.path)
    browser_support.fail_instead_of_skip(outcome.get_result(), collector.path)
