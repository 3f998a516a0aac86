"""Deploy step on this machine: input checks, the settings that reach the server and the archive, and (slow) a
real deployment, its replacement and a failing smoke test."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DIGIT_NAMES, settings_of, train_digits_classifier
from kfp.dsl import Artifact, Dataset, Metrics, Model

from components.core.data import Splits, save_splits
from components.core.models import Classifier, EncoderSpec, save_classifier
from components.deploy.component import deploy_component
from components.deploy.local import deploy_local
from pipelines.config import ServingConfig
from serving.client import encode_png, predict, read_token
from serving.processes import free_port, port_in_use
from serving.server import LocalTorchServe, _is_auth_proxy, _is_torchserve

RECORD_KEYS = {"endpoint", "management_endpoint", "metrics_endpoint", "token_file", "source_token_file",
               "request_log_dir", "model_name", "model_version", "model_dir", "dataset_dir", "model_reference", "home",
               "pid", "proxy_pid"}


def _splits(test_x: np.ndarray, test_y: np.ndarray) -> Splits:
    empty = np.zeros((0, 1, 8, 8), np.float32)
    return Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=empty, val_y=np.zeros(0, np.int64),
                  test_x=test_x, test_y=test_y.astype(np.int64), pool_x=empty, class_names=DIGIT_NAMES)


def serving_at(home: Path, **changes):
    """The serving settings a step gets (``cfg.serving``), serving from ``home`` on free ports."""
    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    return settings_of(serving=ServingConfig(home=str(home), **{**ports, **changes})).serving


@pytest.fixture
def untrained_model(tmp_path) -> Path:
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), tmp_path / "model", {"class_names": DIGIT_NAMES})
    return tmp_path / "model"


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("no-model", FileNotFoundError, "metadata.json is missing"),
        ("no-dataset", FileNotFoundError, "run ingest first"),
        ("empty-test-split", ValueError, "empty test split"),
    ],
)
def test_deploy_refuses_bad_inputs_before_starting_anything(tmp_path, untrained_model, case, error, message):
    model_dir, dataset_dir = untrained_model, tmp_path / "dataset"
    if case == "no-model":
        model_dir = tmp_path / "nothing-here"
    if case != "no-dataset":
        n = 0 if case == "empty-test-split" else 4
        save_splits(_splits(np.zeros((n, 1, 8, 8), np.float32), np.zeros(n)), dataset_dir)
    with pytest.raises(error, match=message):
        deploy_local(model_dir, dataset_dir, serving_at(tmp_path / "home"))
    assert not (tmp_path / "home" / "state.json").exists()


@pytest.mark.slow
def test_deploy_component_serves_then_a_failed_redeploy_stops_everything(tmp_path, monkeypatch):
    test_x, test_y = train_digits_classifier(tmp_path / "model", model_version="deploy-test")
    save_splits(_splits(test_x, test_y), tmp_path / "dataset")
    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "serving"
    deployment = Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    try:
        endpoint = deploy_component(
            model=Model(name="model", uri=str(tmp_path / "model")),
            dataset=Dataset(name="dataset", uri=str(tmp_path / "dataset")),
            # home relative: resolves against the current directory
            cfg=settings_of(serving=ServingConfig(home="serving", host="127.0.0.1", workers=1, model_name="digits",
                                                  startup_timeout_s=120, **ports)),
            deployment=deployment, metrics=metrics,
        )
        record = json.loads(Path(deployment.path).read_text())
        assert RECORD_KEYS <= set(record)
        assert endpoint == record["endpoint"] == f"http://127.0.0.1:{ports['inference_port']}/predictions/digits"
        assert record["home"] == str(home) and record["model_version"] == "deploy-test"
        # What the monitor and 'mlops serve start' need to know which model is served.
        assert (record["model_dir"], record["dataset_dir"]) == (str(tmp_path / "model"), str(tmp_path / "dataset"))
        assert record["model_reference"] is None, "this model has no reference_model.csv"
        assert record["token_file"] == str(home / "token") and record["source_token_file"] == str(home / "source-token")
        assert record["smoke_test_images"] == 16 and record["smoke_test_accuracy"] >= 0.5
        assert metrics.metadata["smoke_test_accuracy"] == record["smoke_test_accuracy"]
        assert "cost_wall_seconds" in metrics.metadata
        state = json.loads((home / "state.json").read_text())
        assert {k: state[k] for k in RECORD_KEYS} == {k: record[k] for k in RECORD_KEYS}
        deadline = time.monotonic() + 10  # the handler writes its request log from a background thread
        while True:
            logged = [json.loads(line) for f in Path(record["request_log_dir"]).glob("requests-*.jsonl")
                      for line in f.read_text().splitlines()]
            if len(logged) >= 16 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # The smoke test used the pipeline's source token: the proxy let its X-Request-Source through.
        assert len(logged) == 16 and {line["source"] for line in logged} == {"smoke-test"}
        answer = predict(endpoint, encode_png(test_x[0]), read_token(record["token_file"]))
        assert answer["model_version"] == "deploy-test", "the record's token_file is the clients' token"

        # Redeploying from the same home replaces the running server; an impossible smoke-test bar
        # makes the new one fail, and then nothing may be left serving.
        first_pid, first_proxy = record["pid"], record["proxy_pid"]
        with pytest.raises(RuntimeError, match=r"smoke test of .* failed, server stopped"):
            deploy_local(tmp_path / "model", tmp_path / "dataset", serving_at(home, startup_timeout_s=120, **ports),
                         min_smoke_accuracy=1.01)
        assert not _is_torchserve(first_pid), "the first server should have been replaced"
        assert not _is_auth_proxy(first_proxy, home), "and its auth proxy"
        assert LocalTorchServe(home).status()["running"] is False
        assert not any(port_in_use("127.0.0.1", p) for p in ports.values())
    finally:
        LocalTorchServe(home).stop(quiet=True)


def test_deploy_component_passes_the_request_log_settings_to_the_local_server(tmp_path, untrained_model, monkeypatch):
    """serving.request_log_dir / _max_mb / _max_age_s and unbatched_route reach the local server the deploy step
    starts."""
    seen: list[dict] = []

    class Started(Exception):
        pass

    def start(self, mar_path, model_name, **kwargs):
        seen.append(kwargs)
        raise Started

    monkeypatch.setattr(LocalTorchServe, "start", start)
    monkeypatch.setattr("serving.archive.build_mar", lambda *args, **kwargs: tmp_path / "digits.mar")
    save_splits(_splits(np.zeros((4, 1, 8, 8), np.float32), np.zeros(4)), tmp_path / "dataset")
    common = dict(model=Model(name="model", uri=str(untrained_model)),
                  dataset=Dataset(name="dataset", uri=str(tmp_path / "dataset")))
    serving = dict(home=str(tmp_path / "serving"), host="127.0.0.1", inference_port=1, management_port=2,
                   metrics_port=3, workers=1, model_name="digits", startup_timeout_s=1)
    out = lambda: dict(deployment=Artifact(name="d", uri=str(tmp_path / "out" / "d")),  # noqa: E731
                       metrics=Metrics(name="m", uri=str(tmp_path / "out" / "m")))
    with pytest.raises(Started):
        deploy_component(**common, **out(), cfg=settings_of(serving=ServingConfig(
            **serving, request_log_dir="s3://bucket/request-logs", request_log_max_mb=2.5, request_log_max_age_s=60.0,
            unbatched_route=False)))
    with pytest.raises(Started):
        deploy_component(**common, **out(), cfg=settings_of(serving=ServingConfig(**serving)))
    changed, default = seen
    assert changed["request_log_dir"] == "s3://bucket/request-logs"
    assert changed["request_log_max_bytes"] == int(2.5 * 2**20) and changed["request_log_max_age_s"] == 60.0
    assert default["request_log_dir"] == (tmp_path / "serving").resolve() / "requests", "empty = <serving_home>/requests"
    assert default["request_log_max_bytes"] == int(ServingConfig().request_log_max_mb * 2**20)
    assert default["request_log_max_age_s"] == ServingConfig().request_log_max_age_s
    assert changed["unbatched_route"] is False and default["unbatched_route"] is True


def test_deploy_local_packs_the_given_batching_into_the_archive(untrained_model, tmp_path, monkeypatch):
    """deploy_local builds the .mar with non-default batching; what the server would load carries it."""
    from serving.archive import build_mar

    built = {}
    real_build = build_mar

    def build(*args, **kwargs):
        built["mar"] = real_build(*args, **kwargs)
        return built["mar"]

    class StopHere(Exception):
        pass

    def start(self, mar, *args, **kwargs):
        raise StopHere

    monkeypatch.setattr("serving.archive.build_mar", build)
    monkeypatch.setattr(LocalTorchServe, "start", start)
    monkeypatch.setattr("components.core.data.load_splits", lambda d: type("S", (), {"test_y": [1], "test_x": [None]})())
    with pytest.raises(StopHere):
        deploy_local(untrained_model, tmp_path / "data", serving_at(tmp_path / "home", workers=2, batch_size=8,
                                                                    max_batch_delay_ms=7))
    with zipfile.ZipFile(built["mar"]) as z:
        config = z.read(json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]).decode()

    assert {k: yaml.safe_load(config)[k] for k in ("minWorkers", "batchSize", "maxBatchDelay")} == \
        {"minWorkers": 2, "batchSize": 8, "maxBatchDelay": 7}
