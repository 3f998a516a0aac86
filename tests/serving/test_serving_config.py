"""The local TorchServe's configuration: locked down whatever the arguments, and the shipped defaults."""

from __future__ import annotations

import re

import pytest

from serving.archive import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS, DEFAULT_WORKERS
from serving.torchserve_config import render_config


def _properties(text: str) -> dict[str, str]:
    """Read a .properties text as java.util.Properties does (for the subset we write: backslash escapes)."""
    pairs = [line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): re.sub(r"\\(.)", r"\1", v.strip()) for k, v in pairs}


def test_config_is_locked_down(tmp_path):
    props = _properties(render_config(tmp_path / "store", "digits=digits.mar", inference_port=9080,
                                      management_port=9081, metrics_port=9082, grpc_inference_port=9070,
                                      grpc_management_port=9071, workers=2))
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_envvars_config"] == "false"  # TS_* variables cannot turn the above around
    assert props["inference_address"] == "http://127.0.0.1:9080"
    assert props["management_address"] == "http://127.0.0.1:9081"
    assert props["metrics_address"] == "http://127.0.0.1:9082"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["model_store"] == str((tmp_path / "store").resolve())
    assert props["workflow_store"] == str((tmp_path / "workflow-store").resolve())  # not the model store
    assert props["load_models"] == "digits=digits.mar" and props["default_workers_per_model"] == "2"
    assert props["install_py_dep_per_model"] == "false" and props["metrics_mode"] == "prometheus"
    assert int(props["max_request_size"]) <= 64 * 2**20 and int(props["token_expiration_min"]) >= 60
    assert 1 <= int(props["job_queue_size"]) <= 10_000
    assert {"number_of_netty_threads", "netty_client_threads", "disable_system_metrics"} <= set(props)
    assert "-XX:TieredStopAtLevel=1" in props["vmargs"].split()  # C1 only: no C2 compile bursts (p99)
    assert not any("$" in v for v in props.values())


def test_allowed_urls_only_match_the_model_store(tmp_path):
    store = (tmp_path / "my.store").resolve()
    pattern = _properties(render_config(store, "d=d.mar"))["allowed_urls"]
    assert re.fullmatch(pattern, f"file://{store}/d.mar")
    for url in ("file:///etc/passwd", f"file://{tmp_path}/myXstore/d.mar", "https://example.com/d.mar"):
        assert not re.fullmatch(pattern, url), url


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inference_port": 8081}, "must be distinct"),
        ({"metrics_port": 70000}, "must be distinct"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"token_expiration_min": 0}, "token_expiration_min must be at least 1"),
        ({"host": "127.0.0.1\nenable_model_api=true"}, "may not contain line breaks"),
        ({"job_queue_size": 0}, "job_queue_size >= 1"),
        ({"netty_threads": -1}, "netty threads must be >= 0"),
        ({"max_request_size": 10}, "max_request_size must be at least 1024"),
        ({"workflow_store": "<the model store>"}, "workflow_store must not be the model store"),
    ],
    ids=["port-clash", "port-range", "no-workers", "token-expiry", "injection", "queue", "netty", "request-size",
         "workflow-store"],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    kwargs = {k: tmp_path if v == "<the model store>" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        render_config(tmp_path, "d=d.mar", **kwargs)


def test_shipped_serving_defaults_match_the_config():
    from pipelines.config import ServingConfig

    cfg = ServingConfig()
    assert (cfg.workers, cfg.batch_size, cfg.max_batch_delay_ms) == (DEFAULT_WORKERS, DEFAULT_BATCH_SIZE,
                                                                     DEFAULT_MAX_BATCH_DELAY_MS)


