"""Deploy step: serve the released model behind a local TorchServe and smoke-test it.

(On a cluster, ``deploy_target="kubernetes"``, the component hands over to
``components.k8s_deploy.deploy_kubernetes``: publish, server-side apply, rollout
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
import time
from pathlib import Path
from typing import Any, Callable

from components.settings import Settings
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

SMOKE_SOURCE = "smoke-test"  # request-log 'source' of the smoke test's requests, so the monitor can skip them


def smoke_test(endpoint: str, token_file: str | Path | None, images, labels, class_names: list[str],
               model_version: str | None = None, *, token: str | None = None,
               send: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Send each image as PNG to the endpoint; return counts, accuracy, latency and what went wrong.

    ``token_file``: a plain-text token file (the local server's ``source-token``, so the
    proxy passes ``X-Request-Source`` on) or TorchServe's ``key_file.json``; ``token`` (e.g.
    the cluster's client token) replaces reading it; ``send`` replaces
    ``serving.client.predict`` (same signature; tests inject one).
    """
    from serving.client import encode_png, predict, read_token

    token = token if token is not None else read_token(token_file)
    send = send or predict
    problems: list[str] = []
    correct, latencies = 0, []
    for i, (image, label) in enumerate(zip(images, labels)):
        t0 = time.perf_counter()
        try:
            answer = send(endpoint, encode_png(image), token, source=SMOKE_SOURCE)
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


def deploy_component(
    model: Input[Model],
    dataset: Input[Dataset],
    cfg: Settings,
    deployment: Output[Artifact],
    metrics: Output[Metrics],
    namespace: str = "",
    serving_image: str = "",
    run_id: str = "",
    pipeline_auth_file: str = "/var/run/secrets/kfp-mlops/serving-source-token/token",
) -> str:
    """Serve the released model (a local TorchServe, or the cluster's serving Deployment) and smoke-test it.

    ``serving.deploy_target="local"``: the server keeps running after the step (it lives in
    its own session); stop it with ``mlops serve stop``. Clients reach it on ``serving.host``
    through the auth proxy (a bearer token from ``<serving.home>/token``, bodies over 10 MiB
    refused with 413); TorchServe itself listens on loopback only, with token authorization
    on and the model-management API off.

    ``serving.deploy_target="kubernetes"``: publishes the .mar to the model store, server-side
    applies the release to the Deployment ``kfp-mlops-serving``, waits for the rollout,
    smoke-tests through the Service and rolls back to the previous revision when any of
    that fails (components/k8s_deploy.py). The local server's settings (host, ports, home,
    request log) are not used there: the serving pods' request log is set in the manifests
    (kfp-mlops-storage).

    ``serving.workers``, ``batch_size`` and ``max_batch_delay_ms`` go into the .mar's model
    config on both targets (TorchServe reads them from the archive when it loads the model).

    Args:
        model: Classifier artifact (model.safetensors + metadata.json) that passed every gate.
        dataset: Dataset artifact; the first test-split images are the smoke test.
        cfg: The run's ``serving`` settings.
        deployment: Output: the deployment record as JSON (endpoint, token_file, source_token_file, request_log_dir, model_dir, ...).
        metrics: Output: smoke-test accuracy and latency, and the step's cost.
        namespace: Kubernetes only: namespace of the serving Deployment; empty = the step pod's own namespace.
        serving_image: Kubernetes only: image for the serving pods; empty keeps the images the Deployment runs (CPU or CUDA build per overlay).
        run_id: Kubernetes only: the pipeline run, written into the change-cause annotation that kubectl rollout history shows.
        pipeline_auth_file: Kubernetes only: the pipeline's own token for the serving pods' auth proxy (the Secret kfp-mlops-serving-source-token, mounted by the pipeline), for the smoke test; a path, never the token.

    Returns:
        The prediction endpoint URL.
    """
    import json
    import os
    from pathlib import Path

    from components.cost import log_metrics, measure
    from components.deploy import deploy_local

    s = cfg.serving
    with measure() as cost:
        if s.deploy_target == "kubernetes":
            from components.k8s_deploy import deploy_kubernetes

            store = s.model_store_uri or os.environ.get("KFP_MLOPS_MODEL_STORE", "")  # the storage ConfigMap's
            record = deploy_kubernetes(model.path, dataset.path, namespace=namespace, model_name=s.model_name,
                                       model_store_uri=store, image=serving_image, token_file=pipeline_auth_file,
                                       run_id=run_id,
                                       rollout_timeout_s=s.rollout_timeout_s, workers=s.workers,
                                       batch_size=s.batch_size, max_batch_delay_ms=s.max_batch_delay_ms)
        elif s.deploy_target == "local":
            home = Path(s.home)
            home = home if home.is_absolute() else Path.cwd() / home
            record = deploy_local(model.path, dataset.path, home, model_name=s.model_name, host=s.host,
                                  inference_port=s.inference_port, management_port=s.management_port,
                                  metrics_port=s.metrics_port, workers=s.workers, startup_timeout_s=s.startup_timeout_s,
                                  batch_size=s.batch_size, max_batch_delay_ms=s.max_batch_delay_ms,
                                  request_log_dir=s.request_log_dir or None,
                                  request_log_max_bytes=int(s.request_log_max_mb * 2**20),
                                  request_log_max_age_s=s.request_log_max_age_s)
        else:
            raise ValueError(f"serving.deploy_target must be 'local' or 'kubernetes', got {s.deploy_target!r}")
    os.makedirs(os.path.dirname(deployment.path) or ".", exist_ok=True)
    with open(deployment.path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    deployment.metadata.update({"endpoint": record["endpoint"], "model_version": record["model_version"],
                                "token_file": record["token_file"]})
    log_metrics(metrics, {
        "smoke_test_images": record["smoke_test_images"],
        "smoke_test_accuracy": record["smoke_test_accuracy"],
        "smoke_test_latency_ms_mean": record["smoke_test_latency_ms_mean"],
        **({"rollout_seconds": record["rollout_seconds"]} if "rollout_seconds" in record else {}),
        **cost.as_metrics(),
    })
    return record["endpoint"]
