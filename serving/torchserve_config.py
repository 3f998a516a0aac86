"""The TorchServe configuration of the local server: ``serving/config.properties`` filled in, locked down.

Token authorization stays on and the model-management API off whatever the arguments; every
model comes from the local model store. The serving pods' ConfigMap (manifests/base) holds the
same locked-down settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template
from typing import Any

CONFIG_TEMPLATE = Path(__file__).with_name("config.properties")
DEFAULT_TOKEN_EXPIRATION_MIN = 10 * 365 * 24 * 60  # internal keys; see the comment in config.properties
DEFAULT_MAX_REQUEST_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 1 * 1024 * 1024
# Frontend threads, chosen with benchmarks/serving.py (docs/benchmarks.md, "Serving"): Netty's event loops for
# client connections (0 = one per core, TorchServe's default) and for talking to the workers.
DEFAULT_NETTY_THREADS = 0
DEFAULT_NETTY_CLIENT_THREADS = 0
# JVM options of the frontend (TorchServe's vmargs). C1 only (no C2): on a small machine the C2 compiler thread keeps
# taking CPU long after warm-up while the Python worker waits for a core, which widens the latency tail under load;
# C1 code costs a little more frontend CPU per request.
# A/B: python benchmarks/serving.py --skip peer nolog defaults inprocess --variant 'c2={"vmargs": ""}'
DEFAULT_VMARGS = "-XX:TieredStopAtLevel=1"
DEFAULT_JOB_QUEUE_SIZE = 1000  # requests waiting per model before the frontend answers 503; bounded memory


def _properties_value(value: Any) -> str:
    """A value as java.util.Properties reads it back unchanged (backslashes are escapes there)."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"config value {text!r} may not contain line breaks")
    return text.replace("\\", "\\\\")


def render_config(
    model_store: str | Path,
    load_models: str,
    host: str = "127.0.0.1",
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int = 8082,
    grpc_inference_port: int = 7070,
    grpc_management_port: int = 7071,
    workers: int = 1,
    token_expiration_min: int = DEFAULT_TOKEN_EXPIRATION_MIN,
    max_request_size: int = DEFAULT_MAX_REQUEST_BYTES,
    max_response_size: int = DEFAULT_MAX_RESPONSE_BYTES,
    response_timeout_s: int = 60,
    startup_timeout_s: int = 120,
    netty_threads: int = DEFAULT_NETTY_THREADS,
    netty_client_threads: int = DEFAULT_NETTY_CLIENT_THREADS,
    job_queue_size: int = DEFAULT_JOB_QUEUE_SIZE,
    workflow_store: str | Path | None = None,
    vmargs: str = DEFAULT_VMARGS,
) -> str:
    """Fill in ``serving/config.properties``: the TorchServe config for one model on ``host``.

    ``load_models`` is TorchServe's ``name=file.mar`` list. Token authorization
    stays on and the model API off whatever the arguments. ``workflow_store``
    (default: ``workflow-store`` next to the model store) must be an empty
    directory: TorchServe has no switch to turn the workflow API off.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if token_expiration_min < 1:
        raise ValueError(f"token_expiration_min must be at least 1 minute, got {token_expiration_min}")
    if netty_threads < 0 or netty_client_threads < 0 or job_queue_size < 1:
        raise ValueError(f"netty threads must be >= 0 (0 = one per core) and job_queue_size >= 1, got "
                         f"{netty_threads}, {netty_client_threads}, {job_queue_size}")
    if max_request_size < 1024:
        raise ValueError(f"max_request_size must be at least 1024 bytes, got {max_request_size}")
    ports = [inference_port, management_port, metrics_port, grpc_inference_port, grpc_management_port]
    if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"the five TorchServe ports must be distinct and in 1..65535, got {ports}")
    store = Path(model_store).resolve()
    workflows = Path(workflow_store).resolve() if workflow_store else store.parent / "workflow-store"
    if workflows == store:
        raise ValueError("workflow_store must not be the model store: the workflow API would load archives from it")
    # Java regex of the only place models may come from; re.escape never escapes letters, which Java accepts.
    allowed_urls = f"file://{re.escape(str(store))}/.*"
    values = {
        "host": host, "inference_port": inference_port, "management_port": management_port,
        "metrics_port": metrics_port, "grpc_inference_port": grpc_inference_port,
        "grpc_management_port": grpc_management_port, "token_expiration_min": int(token_expiration_min),
        "model_store": store, "workflow_store": workflows, "load_models": load_models, "workers": int(workers),
        "allowed_urls": allowed_urls, "max_request_size": int(max_request_size),
        "max_response_size": int(max_response_size), "response_timeout_s": int(response_timeout_s),
        "startup_timeout_s": int(startup_timeout_s), "netty_threads": int(netty_threads),
        "netty_client_threads": int(netty_client_threads), "job_queue_size": int(job_queue_size),
        "vmargs": vmargs,
    }
    return Template(CONFIG_TEMPLATE.read_text()).substitute({k: _properties_value(v) for k, v in values.items()})
