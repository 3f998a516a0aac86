"""The KFP entry of the deploy step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.core.names import SERVING_SOURCE_TOKEN_FILE
from components.core.settings import Settings


def deploy_component(
    model: Input[Model],
    dataset: Input[Dataset],
    cfg: Settings,
    deployment: Output[Artifact],
    metrics: Output[Metrics],
    namespace: str = "",
    serving_image: str = "",
    run_id: str = "",
    pipeline_auth_file: str = SERVING_SOURCE_TOKEN_FILE,
    gated_record: str = "",
) -> str:
    """Serve the released model (a local TorchServe, or the cluster's serving Deployment) and smoke-test it.

    ``serving.deploy_target="local"``: the server keeps running after the step (it lives in
    its own session); stop it with ``mlops serve stop``. Clients reach it on ``serving.host``
    through the auth proxy (a bearer token from ``<serving.home>/token``, bodies over 10 MiB
    refused with 413); TorchServe itself listens on loopback only, with token authorization
    on and the model-management API off. Under ``mlops run --runner docker`` (the run's serving
    broker in ``$KFP_MLOPS_SERVING_BROKER``) the same endpoint is the serving Deployment's pod run
    as containers of the serving image (components/deploy/containers.py).

    ``serving.deploy_target="kubernetes"``: publishes the .mar to the model store, server-side
    applies the release to the Deployment ``kfp-mlops-serving``, waits for the rollout,
    smoke-tests through the Service and rolls back to the previous revision when any of
    that fails (components/deploy/kubernetes/). The local server's settings (host, ports, home,
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
        gated_record: The run's gated record in the release ledger (the record step's output): the parent of the released record this step appends.

    Returns:
        The prediction endpoint URL.
    """
    import json
    import os

    from components.core.cost import log_metrics, measure
    from components.core.ledger import Ledger, location
    from components.deploy.broker import SOCKET_ENV as SERVING_BROKER_ENV
    from components.deploy.ledger import record_release, recorded_if_rolled_back, rollout_metrics, serving_record
    from components.deploy.local import deploy_local

    serving = cfg.serving
    ledger = Ledger(location(serving))  # where the release is recorded: known before anything changes
    # gpu=False: deploying touches no tensor, so torch is not imported for it (seconds in a fresh Python)
    with measure(gpu=False) as cost, recorded_if_rolled_back(ledger, serving, gated_record, run_id):
        if serving.deploy_target == "kubernetes":
            from components.deploy.kubernetes import deploy_kubernetes

            record = deploy_kubernetes(model.path, dataset.path, serving, namespace=namespace, image=serving_image,
                                       run_id=run_id, token_file=pipeline_auth_file,
                                       rollout=getattr(cfg, "rollout", None))
        elif serving.deploy_target == "local" and os.environ.get(SERVING_BROKER_ENV):
            from components.deploy.containers import deploy_containers
            from components.deploy.rollout.local import refuse_in_containers

            refuse_in_containers(getattr(cfg, "rollout", None))
            archive_dir = os.path.join(os.path.dirname(deployment.path), "archive")
            record = deploy_containers(model.path, dataset.path, serving, os.environ[SERVING_BROKER_ENV], archive_dir)
        elif serving.deploy_target == "local":
            record = deploy_local(model.path, dataset.path, serving, getattr(cfg, "rollout", None))
        else:
            raise ValueError(f"serving.deploy_target must be 'local' or 'kubernetes', got {serving.deploy_target!r}")
    # The release in the ledger: released (parent: the run's gated record), then promoted / rolled_back after a
    # shadow or canary rollout. The record says where, and which released record serves, for the monitor.
    version = (record.get("rollout") or {}).get("challenger_version") or record["model_version"]
    try:
        released, decision = record_release(
            ledger, record, model_name=serving.model_name, model_version=version,
            target=record.get("target") or serving.deploy_target, gated_record=gated_record, run_id=run_id,
            model_dir=record.get("model_dir") or model.path, dataset_dir=record.get("dataset_dir") or dataset.path,
            dataset_uri=dataset.uri)
    except Exception as err:
        raise RuntimeError(f"model v{version} serves at {record['endpoint']}, but recording the release in the ledger "
                           f"{ledger.base} failed: {err}") from err
    serves = serving_record(ledger, released, decision)
    record.update(ledger=ledger.base, released_record=serves.id if serves else "")
    print(f"[deploy] ledger {ledger.base}: released {released.id}"
          + (f", {decision.type} {decision.id}: {decision.data['reason']}" if decision else ""), flush=True)
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
        **rollout_metrics(record.get("rollout")),
        **cost.as_metrics(),
    })
    return record["endpoint"]
