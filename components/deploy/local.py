"""Deploy step: serve the released model behind a local TorchServe and smoke-test it.

(On a cluster, ``deploy_target="kubernetes"``, the component hands over to
``components.deploy.kubernetes.deploy_kubernetes``: publish, server-side apply, rollout
watch, smoke test through the Service, automatic rollback.)

Packs the model artifact into a .mar, replaces the server running from the
same serving home, waits until it answers, then sends a few test images as
PNG through the real endpoint: the auth proxy in front of TorchServe, with the
serving home's source token, so the request log tags them as the smoke test's.
If the served model does not answer sensibly, the server is stopped and the
step fails: a deployment is only reported when it was seen working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serving.client import smoke_test


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
    batch_size: int | None = None,
    max_batch_delay_ms: int | None = None,
    request_log_dir: str | Path | None = None,
    request_log_max_bytes: int | None = None,
    request_log_max_age_s: float | None = None,
) -> dict[str, Any]:
    """Serve ``model_dir`` from a TorchServe owned by ``home`` and smoke-test it with test-split images.

    ``batch_size`` / ``max_batch_delay_ms`` (dynamic batching; None = the shipped
    defaults of ``serving.archive``) and ``workers`` are packed into the .mar.
    ``request_log_dir`` is a directory or an ``s3://`` prefix (None = ``home/requests``).

    Returns the deployment record (endpoint, token_file, source_token_file, request_log_dir,
    model_dir, dataset_dir, model_reference, ...) plus ``smoke_test_*`` numbers. Raises
    (after stopping the new server) when the smoke test fails: not every image answered,
    a malformed answer, or an accuracy below ``min_smoke_accuracy``.
    """
    from components.core.data import load_splits
    from components.core.models import METADATA_FILE
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
    from serving import archive

    model_config = {"workers": workers,
                    "batch_size": archive.DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                    "max_batch_delay_ms": archive.DEFAULT_MAX_BATCH_DELAY_MS if max_batch_delay_ms is None else max_batch_delay_ms}
    mar = build_mar(model_dir, home / "export", model_name, version, **model_config)
    server = LocalTorchServe(home)
    if server.status()["running"]:
        print(f"[deploy] replacing the server already running from {home}", flush=True)
        server.stop()
    record = server.start(mar, model_name, host=host, inference_port=inference_port, management_port=management_port,
                          metrics_port=metrics_port, workers=workers,
                          request_log_dir=request_log_dir or home / "requests", timeout_s=startup_timeout_s,
                          model_version=version, request_log_max_bytes=request_log_max_bytes,
                          request_log_max_age_s=request_log_max_age_s, model_dir=model_dir, dataset_dir=dataset_dir)

    n = min(smoke_images, len(splits.test_y))
    print(f"[deploy] smoke test: {n} test images to {record['endpoint']}", flush=True)
    result = smoke_test(record["endpoint"], record["source_token_file"], splits.test_x[:n], splits.test_y[:n],
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
        "model_config": model_config,
        "smoke_test_images": n,
        "smoke_test_accuracy": result["accuracy"],
        "smoke_test_latency_ms_mean": result["latency_ms_mean"],
    }
