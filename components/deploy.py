"""Deploy step: serve the released model behind a local TorchServe and smoke-test it.

Packs the model artifact into a .mar, replaces the server running from the
same serving home, waits until it answers, then sends a few test images as
PNG through the real endpoint (token and all). If the served model does not
answer sensibly, the server is stopped and the step fails: a deployment is
only reported when it was seen working.
"""

import json
import time
from pathlib import Path
from typing import Any

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

SMOKE_SOURCE = "smoke-test"  # request-log 'source' of the smoke test's requests, so the monitor can skip them


def smoke_test(endpoint: str, token_file: str | Path, images, labels, class_names: list[str],
               model_version: str | None = None) -> dict[str, Any]:
    """Send each image as PNG to the endpoint; return counts, accuracy, latency and what went wrong."""
    from serving.client import encode_png, predict, read_token

    token = read_token(token_file)
    problems: list[str] = []
    correct, latencies = 0, []
    for i, (image, label) in enumerate(zip(images, labels)):
        t0 = time.perf_counter()
        try:
            answer = predict(endpoint, encode_png(image), token, source=SMOKE_SOURCE)
        except Exception as err:  # noqa: BLE001 - every failure is reported, none hidden
            problems.append(f"image {i}: {err}")
            continue
        latencies.append(time.perf_counter() - t0)
        missing = {"label", "class_index", "confidence", "probabilities", "model_version"} - set(answer if isinstance(answer, dict) else {})
        if missing:
            problems.append(f"image {i}: response lacks {sorted(missing)}: {str(answer)[:200]}")
            continue
        if model_version is not None and answer["model_version"] != model_version:
            problems.append(f"image {i}: served model_version {answer['model_version']!r}, expected {model_version!r}")
        if answer["label"] != class_names[answer["class_index"]]:
            problems.append(f"image {i}: label {answer['label']!r} does not match class_index {answer['class_index']}")
        correct += int(answer["class_index"] == int(label))
    n = len(labels)
    return {
        "images": n,
        "answered": len(latencies),
        "accuracy": correct / n if n else 0.0,
        "latency_ms_mean": 1000 * sum(latencies) / len(latencies) if latencies else None,
        "problems": problems,
    }


def deploy_local(
    model_dir: str | Path,
    dataset_dir: str | Path,
    home: str | Path,
    model_name: str = "digits",
    host: str = "127.0.0.1",
    inference_port: int = 8080,
    management_port: int = 8081,
    metrics_port: int = 8082,
    workers: int = 1,
    startup_timeout_s: int = 120,
    smoke_images: int = 16,
    min_smoke_accuracy: float = 0.5,
) -> dict[str, Any]:
    """Serve ``model_dir`` from a TorchServe owned by ``home`` and smoke-test it with test-split images.

    Returns the deployment record (endpoint, token_file, request_log_dir, ...)
    plus ``smoke_test_*`` numbers. Raises (after stopping the new server) when
    the smoke test fails: not every image answered, a malformed answer, or an
    accuracy below ``min_smoke_accuracy``.
    """
    from components.data import load_splits
    from components.models import METADATA_FILE
    from serving.archive import build_mar
    from serving.server import LocalTorchServe

    home = Path(home).resolve()
    metadata_file = Path(model_dir) / METADATA_FILE
    if not metadata_file.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model artifact: {METADATA_FILE} is missing (run finetune first)")
    metadata = json.loads(metadata_file.read_text())
    version = str(metadata.get("model_version") or "1.0")
    splits = load_splits(dataset_dir)
    if len(splits.test_y) == 0:
        raise ValueError(f"dataset {dataset_dir} has an empty test split: nothing to smoke-test the endpoint with")

    # Archive first: if packing fails, the server already running keeps serving.
    mar = build_mar(model_dir, home / "export", model_name, version)
    server = LocalTorchServe(home)
    if server.status()["running"]:
        print(f"[deploy] replacing the server already running from {home}", flush=True)
        server.stop()
    record = server.start(mar, model_name, host=host, inference_port=inference_port, management_port=management_port,
                          metrics_port=metrics_port, workers=workers, request_log_dir=home / "requests",
                          timeout_s=startup_timeout_s, model_version=version)

    n = min(smoke_images, len(splits.test_y))
    print(f"[deploy] smoke test: {n} test images to {record['endpoint']}", flush=True)
    result = smoke_test(record["endpoint"], record["token_file"], splits.test_x[:n], splits.test_y[:n],
                        splits.class_names, model_version=version)
    failed = result["problems"] or result["answered"] < n or result["accuracy"] < min_smoke_accuracy
    if failed:
        server.stop()
        details = "\n  ".join(result["problems"][:10]) or "(all answered)"
        raise RuntimeError(
            f"smoke test of {record['endpoint']} failed, server stopped: {result['answered']}/{n} answered, "
            f"accuracy {result['accuracy']:.2f} (need {min_smoke_accuracy:.2f}). Problems:\n  {details}\n"
            f"Logs: {home / 'logs'}"
        )
    print(f"[deploy] smoke test passed: accuracy {result['accuracy']:.2f} on {n} images, "
          f"{result['latency_ms_mean']:.1f} ms per request", flush=True)
    return {
        **record,
        "smoke_test_images": n,
        "smoke_test_accuracy": result["accuracy"],
        "smoke_test_latency_ms_mean": result["latency_ms_mean"],
    }


def deploy_component(
    model: Input[Model],
    dataset: Input[Dataset],
    serving_home: str,
    host: str,
    inference_port: int,
    management_port: int,
    metrics_port: int,
    workers: int,
    model_name: str,
    startup_timeout_s: int,
    deployment: Output[Artifact],
    metrics: Output[Metrics],
) -> str:
    """Serve the released model with a local TorchServe and smoke-test the endpoint.

    The server keeps running after the step (it lives in its own session); stop
    it with ``mlops serve stop``. It listens on ``host`` only, with token
    authorization on and the model-management API off.

    Args:
        model: Classifier artifact (model.safetensors + metadata.json) that passed every gate.
        dataset: Dataset artifact; the first test-split images are the smoke test.
        serving_home: Serving directory (model store, logs, key file, request log, state.json); relative paths resolve against the current directory.
        host: Address TorchServe binds to (127.0.0.1 unless you mean to expose it).
        inference_port: Inference API port.
        management_port: Management API port (model registration through it is disabled).
        metrics_port: Prometheus metrics port.
        workers: Number of TorchServe workers for the model.
        model_name: Name served under /predictions/<model_name>.
        startup_timeout_s: Seconds to wait for the workers to be ready.
        deployment: Output: the deployment record as JSON (endpoint, token_file, request_log_dir, ...).
        metrics: Output: smoke-test accuracy and latency, and the step's cost.

    Returns:
        The prediction endpoint URL.
    """
    import json
    import os
    from pathlib import Path

    from components.cost import log_metrics, measure
    from components.deploy import deploy_local

    home = Path(serving_home)
    home = home if home.is_absolute() else Path.cwd() / home
    with measure() as cost:
        record = deploy_local(model.path, dataset.path, home, model_name=model_name, host=host,
                              inference_port=inference_port, management_port=management_port,
                              metrics_port=metrics_port, workers=workers, startup_timeout_s=startup_timeout_s)
    os.makedirs(os.path.dirname(deployment.path) or ".", exist_ok=True)
    with open(deployment.path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    deployment.metadata.update({"endpoint": record["endpoint"], "model_version": record["model_version"],
                                "token_file": record["token_file"]})
    log_metrics(metrics, {
        "smoke_test_images": record["smoke_test_images"],
        "smoke_test_accuracy": record["smoke_test_accuracy"],
        "smoke_test_latency_ms_mean": record["smoke_test_latency_ms_mean"],
        **cost.as_metrics(),
    })
    return record["endpoint"]
