"""The Kubernetes settings of each step's pod, applied to its task in one place (``apply_cluster_settings``).

CPU/memory requests and limits, a pod deadline (timeout), retries with backoff on
the idempotent steps, a non-root security context, the image pull policy, S3
credentials from a Secret and storage settings from a ConfigMap (both as env,
never as parameters, on the steps that touch storage), GPU placement, and the
serving token of the steps that call the endpoint. kfp.local ignores all of them
but the retries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kfp import kubernetes

from components.core.names import (
    INFERENCE_CLIENT_LABEL,
    SERVING_SOURCE_TOKEN_MOUNT,
    SERVING_SOURCE_TOKEN_SECRET,
    STORAGE_CONFIG_ENV,
)
from pipelines.config import ClusterConfig

# Steps that call the serving Service on a cluster: they get that token and the label the serving NetworkPolicy admits.
INFERENCE_CLIENT_STEPS = ("deploy", "monitor")
NEVER_CACHED = ("record", "deploy", "monitor")  # they act on the world (the ledger, a server, live traffic)
# Steps whose rerun gives the same result (they write only their own outputs; record finds
# the ledger records it already appended), so a retry after a lost node or a flaky download
# is safe. Deploy changes the live endpoint and monitor replays traffic to it: a retry
# would act twice, so never.
RETRYABLE_STEPS = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness", "record")
# Steps that read or write s3:// themselves (sources, the multi-node pretrain
# exchange, the model store and its champion, request logs, the release ledger). The others only use
# KFP artifacts, which KFP's launcher moves with its own credentials, so they get no S3 keys at all.
STORAGE_STEPS = ("ingest", "pretrain", "evaluate", "record", "deploy", "monitor")


@dataclass(frozen=True)
class StepSettings:
    """Pod settings of one step; ``ClusterConfig.step_overrides`` changes single fields."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_s: int  # the pod's activeDeadlineSeconds: a hung step fails instead of holding a node
    retries: int  # only on RETRYABLE_STEPS


# Sized for the digits default with headroom for real image folders; pretrain is the
# long one (it runs on a GPU by default).
STEP_DEFAULTS: dict[str, StepSettings] = {
    "ingest": StepSettings("1", "2", "2Gi", "4Gi", timeout_s=3600, retries=2),
    "pretrain": StepSettings("4", "8", "8Gi", "16Gi", timeout_s=6 * 3600, retries=2),
    "finetune": StepSettings("2", "4", "4Gi", "8Gi", timeout_s=2 * 3600, retries=2),
    "evaluate": StepSettings("1", "2", "2Gi", "4Gi", timeout_s=1800, retries=2),
    "privacy": StepSettings("1", "2", "2Gi", "4Gi", timeout_s=1800, retries=2),
    "robustness": StepSettings("1", "2", "2Gi", "4Gi", timeout_s=3600, retries=2),
    "record": StepSettings("100m", "500m", "256Mi", "512Mi", timeout_s=600, retries=2),  # a few small writes
    "deploy": StepSettings("500m", "2", "1Gi", "2Gi", timeout_s=1800, retries=0),
    "monitor": StepSettings("1", "2", "2Gi", "4Gi", timeout_s=3600, retries=0),
}
_INT_SETTINGS = ("timeout_s", "retries")


def step_settings(cluster: ClusterConfig) -> dict[str, StepSettings]:
    """STEP_DEFAULTS with ``cluster.step_overrides`` applied, validated.

    The overrides are ``step.setting=value`` pairs separated by commas (or spaces),
    e.g. ``pretrain.timeout_s=43200,finetune.memory_limit=16Gi``.
    """
    settings = dict(STEP_DEFAULTS)
    names = [f.name for f in dataclasses.fields(StepSettings)]
    for item in cluster.step_overrides.replace(",", " ").split():
        key, sep, value = item.partition("=")
        step, dot, name = key.partition(".")
        if not sep or not dot or not value:
            raise ValueError(f"step override {item!r} is not 'step.setting=value' (e.g. pretrain.timeout_s=43200)")
        if step not in settings:
            raise ValueError(f"step override {item!r}: unknown step {step!r}; steps: {', '.join(STEP_DEFAULTS)}")
        if name not in names:
            raise ValueError(f"step override {item!r}: unknown setting {name!r}; settings: {', '.join(names)}")
        if name in _INT_SETTINGS:
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"step override {item!r}: {name} must be a whole number") from None
            if number < 0 or (name == "timeout_s" and number == 0):
                raise ValueError(f"step override {item!r}: {name} must be {'positive' if name == 'timeout_s' else '0 or more'}")
            if name == "retries" and number > 0 and step not in RETRYABLE_STEPS:
                raise ValueError(f"step override {item!r}: {step} is not safe to retry (it acts on the live "
                                 f"endpoint); retries are allowed on {', '.join(RETRYABLE_STEPS)}")
            settings[step] = dataclasses.replace(settings[step], **{name: number})
        else:
            settings[step] = dataclasses.replace(settings[step], **{name: value})
    return settings


def gpu_steps(cluster: ClusterConfig) -> tuple[str, ...]:
    """The steps placed on GPU nodes: pretrain, and finetune when configured."""
    if cluster.gpu_limit <= 0:
        return ()
    return ("pretrain", "finetune") if cluster.gpu_finetune else ("pretrain",)


def apply_cluster_settings(task, step: str, cluster: ClusterConfig, settings: StepSettings, *,
                           retries: bool = True) -> None:
    """Every Kubernetes setting of one task (kfp.local ignores all but the retries)."""
    task.set_cpu_request(settings.cpu_request).set_cpu_limit(settings.cpu_limit)
    task.set_memory_request(settings.memory_request).set_memory_limit(settings.memory_limit)
    kubernetes.set_timeout(task, settings.timeout_s)
    if retries and settings.retries > 0 and step in RETRYABLE_STEPS:
        task.set_retry(settings.retries, backoff_duration=f"{cluster.retry_backoff_s}s",
                       backoff_factor=cluster.retry_backoff_factor,
                       backoff_max_duration=f"{cluster.retry_backoff_max_s}s")
    if step in NEVER_CACHED:
        task.set_caching_options(False)
    kubernetes.set_image_pull_policy(task, cluster.image_pull_policy)
    # Non-root at the container level (kfp-kubernetes' set_security_context: runAsUser,
    # runAsGroup, runAsNonRoot; it cannot set readOnlyRootFilesystem or pod-level fields).
    # KFP's backend adds allowPrivilegeEscalation=false, drop ALL capabilities and
    # seccompProfile RuntimeDefault itself. A KFP backend older than this field may not
    # apply it; the namespace's "restricted" Pod Security admission
    # (manifests/base/namespace.yaml) rejects a root or privileged pod either way.
    if cluster.run_as_user <= 0:
        raise ValueError(f"cluster.run_as_user must be a non-root UID (> 0), got {cluster.run_as_user}")
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_group,
                                    run_as_non_root=True)
    if step in STORAGE_STEPS:
        # Credentials reach the pod from the Secret at start; they are never pipeline
        # parameters (the UI shows parameters to everyone who can see the run).
        if cluster.s3_secret_name:
            kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret_name, secret_key_to_env={
                cluster.s3_access_key_id_key: "AWS_ACCESS_KEY_ID",
                cluster.s3_secret_access_key_key: "AWS_SECRET_ACCESS_KEY",
            })
        if cluster.storage_config_map:
            # optional: a key the ConfigMap lacks (no endpoint on AWS) leaves the env unset,
            # and components/core/s3_client.py falls back to its default.
            kubernetes.use_config_map_as_env(task, config_map_name=cluster.storage_config_map,
                                             config_map_key_to_env={k: k for k in STORAGE_CONFIG_ENV}, optional=True)
    if step in gpu_steps(cluster):
        place_on_gpu(task, cluster)
    if step in INFERENCE_CLIENT_STEPS:
        # The pipeline's own token (its requests may say they are synthetic) and the serving NetworkPolicy's label.
        kubernetes.use_secret_as_volume(task, secret_name=SERVING_SOURCE_TOKEN_SECRET,
                                        mount_path=SERVING_SOURCE_TOKEN_MOUNT, optional=True)
        kubernetes.add_pod_label(task, INFERENCE_CLIENT_LABEL, "true")


def place_on_gpu(task, cluster: ClusterConfig) -> None:
    """GPU request, node selector and toleration (ignored by kfp.local, compiled for Kubernetes)."""
    if cluster.gpu_limit <= 0:
        return
    task.set_accelerator_type(cluster.gpu_accelerator).set_accelerator_limit(cluster.gpu_limit)
    if cluster.gpu_node_selector_key:
        kubernetes.add_node_selector(task, label_key=cluster.gpu_node_selector_key,
                                     label_value=cluster.gpu_node_selector_value)
    if cluster.gpu_toleration_key:
        kubernetes.add_toleration(task, key=cluster.gpu_toleration_key, operator="Exists",
                                  effect=cluster.gpu_toleration_effect)
