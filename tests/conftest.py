"""Fixtures shared by the test files: the real digits split and one torch thread."""

import numpy as np
import pytest
import torch
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


@pytest.fixture
def run_cli():
    """Run ``mlops`` in-process: ``code, out, err = run_cli(["monitor", "--json"])``."""
    return _run_cli


def settings_of(**areas):
    """Step settings (what a step function's ``cfg`` holds) from config dataclasses: ``settings_of(data=DataConfig())``."""
    import dataclasses

    from components.core.settings import Settings

    return Settings(**{name: Settings(**dataclasses.asdict(value)) for name, value in areas.items()})
