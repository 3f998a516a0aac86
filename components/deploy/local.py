"""Deploy step on this machine: serve the released model behind a local TorchServe and smoke-test it.

(On a cluster, ``serving.deploy_target="kubernetes"``, the component hands over to
``components.deploy.kubernetes.deploy_kubernetes``: publish, server-side apply, rollout
watch, smoke test through the Service, automatic rollback.)

Packs the model artifact into a .mar, replaces the server running from the
same serving home, waits until it answers, then sends a few test images as
PNG through the real endpoint: the auth proxy in front of TorchServe, with the
serving home's source token, so the request log tags them as the smoke test's.
If the served model does not answer sensibly, the server is stopped and the
step fails: a deployment is only reported when it was seen working.

With ``rollout.strategy`` ``shadow`` or ``canary`` and a healthy model already serving from the
home, the new model is the challenger of a rollout instead (``components.deploy.rollout.local``):
served beside the champion, promoted or rolled back on the evidence of live (or replayed) traffic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.deploy.checks import SmokeTest, archive_settings, model_version_of
from components.deploy.containers import served_from


def server_settings(serving, home: Path) -> dict[str, Any]:
    """``LocalTorchServe.start``'s settings from the serving settings: where it listens, how long it may take
    to start, where (``request_log_dir`` "" = ``home/requests``) and how its request log rotates, and whether
    lone requests get the unbatched twin (serving/unbatched_route.py)."""
    return {
        "host": serving.host, "inference_port": serving.inference_port, "management_port": serving.management_port,
        "metrics_port": serving.metrics_port, "workers": serving.workers, "timeout_s": serving.startup_timeout_s,
        "request_log_dir": serving.request_log_dir or home / "requests",
        "request_log_max_bytes": int(serving.request_log_max_mb * 2**20),
        "request_log_max_age_s": serving.request_log_max_age_s,
        "unbatched_route": serving.unbatched_route,
    }


def deploy_local(model_dir: str | Path, dataset_dir: str | Path, serving, rollout=None, *, smoke_images: int = 16,
                 min_smoke_accuracy: float = 0.5) -> dict[str, Any]:
    """Serve ``model_dir`` from the TorchServe owned by ``serving.home`` and smoke-test it with test-split images.

    ``serving`` is the run's serving settings (``cfg.serving``): ``home`` (relative to the working
    directory), the host and ports, ``workers`` and dynamic batching (packed into the .mar),
    ``startup_timeout_s`` and the request log (``request_log_dir``: a directory or an ``s3://``
    prefix, "" = ``home/requests``; rotated at ``request_log_max_mb`` / ``request_log_max_age_s``).
    ``rollout`` is the run's rollout settings (``cfg.rollout``; None = replace): with ``shadow`` or
    ``canary`` and a healthy model serving, the new one is a challenger first, and the record then
    holds ``rollout`` (strategy, decision, reason, criteria, evidence, seconds_to_decision, both
    versions) and describes what serves afterwards: the challenger, promoted, or the champion.

    Returns the deployment record (endpoint, token_file, source_token_file, request_log_dir,
    model_dir, dataset_dir, model_reference, ...) plus ``smoke_test_*`` numbers. Raises
    (after stopping the new server) when the smoke test fails: not every image answered,
    a malformed answer, or an accuracy below ``min_smoke_accuracy``.
    """
    from serving.archive import build_mar
    from serving.server import LocalTorchServe

    home = Path(serving.home).resolve()
    version = model_version_of(model_dir)
    smoke = SmokeTest.of_dataset(dataset_dir, smoke_images, min_smoke_accuracy)

    # Archive first: if packing fails, the server already running keeps serving.
    model_config = archive_settings(serving)
    mar = build_mar(model_dir, home / "export", serving.model_name, version, **model_config)
    strategy = rollout.strategy if rollout is not None else "replace"
    if strategy != "replace":
        from components.deploy.rollout.local import rollout_blocker, run_rollout

        why_not = rollout_blocker(home)
        if why_not is None:
            settings = server_settings(serving, home)
            rotation = {k: settings[k] for k in ("request_log_max_bytes", "request_log_max_age_s")}
            record = run_rollout(model_dir, dataset_dir, serving, rollout, mar, version, smoke, rotation)
            return {**record, "model_config": model_config}
        print(f"[deploy] {strategy} rollout: {why_not}", flush=True)
    running = served_from(home)  # processes or, after mlops run --runner docker, containers
    if running.status()["running"]:
        print(f"[deploy] replacing the server already running from {home}", flush=True)
        running.stop()
    server = LocalTorchServe(home)
    record = server.start(mar, serving.model_name, **server_settings(serving, home), model_version=version,
                          model_dir=model_dir, dataset_dir=dataset_dir)

    print(f"[deploy] smoke test: {smoke.count} test images to {record['endpoint']}", flush=True)
    result = smoke.run(record["endpoint"], version, token_file=record["source_token_file"])
    if result["failed"]:
        server.stop()
        details = "\n  ".join(result["problems"][:10]) or "(all answered)"
        raise RuntimeError(f"smoke test of {record['endpoint']} failed, server stopped: {result['summary']}. "
                           f"Problems:\n  {details}\nLogs: {home / 'logs'}")
    print(f"[deploy] smoke test passed: accuracy {result['accuracy']:.2f} on {smoke.count} images, "
          f"{result['latency_ms_mean']:.1f} ms per request", flush=True)
    return {
        **record,
        "model_config": model_config,
        "strategy": "replace",
        "smoke_test_images": smoke.count,
        "smoke_test_accuracy": result["accuracy"],
        "smoke_test_latency_ms_mean": result["latency_ms_mean"],
    }
