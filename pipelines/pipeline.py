"""The kfp-mlops pipeline, defined once with the KFP v2 SDK.

``build_pipeline(cluster)`` returns the ``@dsl.pipeline`` whose root parameters
are the run fields of ``pipelines.config`` (flattened ``area_field``, each with
its description and default), so the KFP UI run form documents itself. The same
object runs on a cluster (compiled YAML) and on one machine (``kfp.local``).

Compile-time settings come from ``ClusterConfig``: the components are decorated
here, not in their modules, so the image is configurable without editing code,
and every task gets its Kubernetes settings in one place, ``apply_cluster_settings``:
CPU/memory requests and limits, a pod deadline (timeout), retries with backoff on
the idempotent steps, a non-root security context, the image pull policy, S3
credentials from a Secret and storage settings from a ConfigMap (both as env,
never as parameters, on the steps that touch storage), and GPU placement.
kfp.local ignores the Kubernetes settings; it would honour retries, so they are
left out of local runs (a local failure is deterministic; retrying only delays it).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from kfp import dsl, kubernetes

from components.deploy import deploy_component
from components.evaluate import evaluate_component
from components.finetune import finetune_component
from components.ingest import ingest_component
from components.monitor import monitor_component
from components.pretrain import pretrain_component
from components.privacy import privacy_component
from components.robustness import robustness_component
from pipelines.config import ClusterConfig, parameters

PIPELINE_NAME = "kfp-mlops"
PIPELINE_DESCRIPTION = (
    "Raw data to a monitored TorchServe endpoint: ingest, self-supervised pretraining, fine-tuning, "
    "evaluation, privacy and robustness gates, deploy (only when every gate passes), drift monitoring."
)

# Step name -> the component function that implements it, in pipeline order.
STEPS: dict[str, Callable[..., Any]] = {
    "ingest": ingest_component,
    "pretrain": pretrain_component,
    "finetune": finetune_component,
    "evaluate": evaluate_component,
    "privacy": privacy_component,
    "robustness": robustness_component,
    "deploy": deploy_component,
    "monitor": monitor_component,
}
GATE_STEPS = ("evaluate", "privacy", "robustness")
# The client token of the in-cluster serving auth proxy (manifests/base/serving-deployment.yaml).
SERVING_TOKEN_SECRET = "kfp-mlops-serving-token"
SERVING_TOKEN_MOUNT = "/var/run/secrets/kfp-mlops/serving-token"
NEVER_CACHED = ("deploy", "monitor")  # they act on the world (a server, live traffic)
# Steps whose rerun gives the same result (they write only their own outputs), so a
# retry after a lost node or a flaky download is safe. Deploy changes the live
# endpoint and monitor replays traffic to it: a retry would act twice, so never.
RETRYABLE_STEPS = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness")
# Steps that read or write s3:// themselves (sources, the multi-node pretrain
# exchange, the model store, request logs). The others only use KFP artifacts, which
# KFP's launcher moves with its own credentials, so they get no S3 keys at all.
STORAGE_STEPS = ("ingest", "pretrain", "deploy", "monitor")
# Env var (what components/storage.py and boto3 read) -> key in the storage ConfigMap
# (manifests/base/storage-configmap.yaml uses the same names).
STORAGE_CONFIG_ENV = ("S3_ENDPOINT_URL", "AWS_REGION", "S3_ADDRESSING_STYLE", "AWS_MAX_ATTEMPTS")


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
            raise ValueError(f"step override {item!r}: unknown step {step!r}; steps: {', '.join(STEPS)}")
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


def make_components(image: str) -> dict[str, Any]:
    """Decorate every step for the given image; task names are the step names."""
    out = {}
    for step, func in STEPS.items():
        component = dsl.component(func, base_image=image, install_kfp_package=False)
        component.component_spec.name = step
        out[step] = component
    return out


def _pipeline_docstring() -> str:
    lines = [PIPELINE_DESCRIPTION, "", "Args:"]
    lines += [f"    {p.key}: {p.help}" for p in parameters()]
    return "\n".join(lines) + "\n"


def build_pipeline(cluster: ClusterConfig | None = None, *, retries: bool | None = None):
    """The pipeline for a cluster config (image, Kubernetes settings of every step).

    ``retries``: put the retry policies in (True), leave them out (False), or
    (None) leave them out only when kfp.local is initialised, i.e. for a local run.
    """
    cluster = cluster or ClusterConfig()
    settings = step_settings(cluster)  # validates the overrides before anything is built
    if retries is None:
        retries = not _kfp_local_initialised()
    c = make_components(cluster.image)
    params = parameters()
    names = [p.key for p in params]

    def configure(task, step: str):
        apply_cluster_settings(task, step, cluster, settings[step], retries=retries)
        return task

    def pipeline_body(*args, **kwargs):
        p = dict(zip(names, args))
        p.update(kwargs)

        ingest = c["ingest"](
            source=p["data_source"], seed=p["data_seed"], test_fraction=p["data_test_fraction"],
            val_fraction=p["data_val_fraction"], pool_fraction=p["data_pool_fraction"],
            image_size=p["data_image_size"],
        )
        configure(ingest, "ingest")
        dataset = ingest.outputs["dataset"]

        pretrain = c["pretrain"](
            dataset=dataset, objective=p["pretrain_objective"], epochs=p["pretrain_epochs"],
            batch_size=p["pretrain_batch_size"], learning_rate=p["pretrain_learning_rate"],
            temperature=p["pretrain_temperature"], width=p["pretrain_width"],
            embed_dim=p["pretrain_embed_dim"], seed=p["data_seed"],
            arch=p["pretrain_arch"], depth=p["pretrain_depth"], compile=p["pretrain_compile"],
            checkpoint_root=p["pretrain_checkpoint_root"],
            checkpoint_every_steps=p["pretrain_checkpoint_every_steps"],
            checkpoint_every_epochs=p["pretrain_checkpoint_every_epochs"],
            num_nodes=p["pretrain_num_nodes"], gpus_per_node=p["pretrain_gpus_per_node"],
            exchange_uri=p["pretrain_exchange_uri"],
            # The TrainJob nodes (num_nodes > 1) run the same image with the same S3 Secret as the steps.
            trainjob_image=cluster.image, trainjob_s3_key_source=cluster.s3_secret_name,
        )
        configure(pretrain, "pretrain")

        finetune = c["finetune"](
            dataset=dataset, encoder=pretrain.outputs["encoder"], epochs=p["finetune_epochs"],
            batch_size=p["finetune_batch_size"], learning_rate=p["finetune_learning_rate"],
            patience=p["finetune_patience"], label_fraction=p["finetune_label_fraction"], seed=p["data_seed"],
            mode=p["finetune_mode"], unfreeze_blocks=p["finetune_unfreeze_blocks"],
            encoder_lr_scale=p["finetune_encoder_lr_scale"], min_epoch_samples=p["finetune_min_epoch_samples"],
            probe_epochs=p["finetune_probe_epochs"],
            compile=p["finetune_compile"],
            checkpoint_root=p["finetune_checkpoint_root"],
            checkpoint_every_steps=p["finetune_checkpoint_every_steps"],
            checkpoint_every_epochs=p["finetune_checkpoint_every_epochs"],
            # robust training and DP-SGD (issue 4): off by default
            **{name: p[f"finetune_{name}"] for name in (
                "augment_noise_sigma", "adversarial_epsilon", "adversarial_fraction", "dp_epsilon", "dp_delta",
                "dp_max_grad_norm", "dp_batch_size", "dp_learning_rate", "dp_epochs", "dp_trainable")},
        )
        configure(finetune, "finetune")
        model = finetune.outputs["model"]

        evaluate = c["evaluate"](
            dataset=dataset, model=model, min_test_accuracy=p["gates_min_test_accuracy"],
            max_regression=p["gates_max_regression"], champion_model=p["gates_champion_model"],
            serving_home=p["serving_home"],
        )
        privacy = c["privacy"](
            dataset=dataset, model=model, max_mia_auc=p["gates_max_mia_auc"], seed=p["data_seed"],
            max_dp_epsilon=p["gates_max_dp_epsilon"], max_leaks=p["gates_max_leaks"],
            near_duplicate_distance=p["gates_near_duplicate_distance"],
            reference_models=p["gates_mia_reference_models"], override=p["gates_override"], override_reason=p["gates_override_reason"],
        )
        robustness = c["robustness"](
            dataset=dataset, model=model, noise_sigma=p["gates_noise_sigma"], fgsm_epsilon=p["gates_fgsm_epsilon"],
            min_noise_accuracy=p["gates_min_noise_accuracy"], min_fgsm_accuracy=p["gates_min_fgsm_accuracy"],
            seed=p["data_seed"], override=p["gates_override"], override_reason=p["gates_override_reason"],
            **{name: p[f"gates_{name}"] for name in (
                "pgd_epsilon", "pgd_steps", "pgd_step_size", "pgd_random_start", "min_pgd_accuracy",
                "corruption_severities", "min_corruption_accuracy", "max_corruption_drop")},
        )
        for step, task in (("evaluate", evaluate), ("privacy", privacy), ("robustness", robustness)):
            configure(task, step)

        # Deploy only when every gate passed: nested conditions are KFP's AND.
        with dsl.If(evaluate.outputs["Output"] == True, name="evaluation-passed"):  # noqa: E712 - KFP condition syntax
            with dsl.If(privacy.outputs["Output"] == True, name="privacy-passed"):  # noqa: E712
                with dsl.If(robustness.outputs["Output"] == True, name="robustness-passed"):  # noqa: E712
                    deploy = c["deploy"](
                        model=model, dataset=dataset, serving_home=p["serving_home"], host=p["serving_host"],
                        inference_port=p["serving_inference_port"], management_port=p["serving_management_port"],
                        metrics_port=p["serving_metrics_port"], workers=p["serving_workers"],
                        batch_size=p["serving_batch_size"], max_batch_delay_ms=p["serving_max_batch_delay_ms"],
                        request_log_dir=p["serving_request_log_dir"],
                        request_log_max_mb=p["serving_request_log_max_mb"],
                        request_log_max_age_s=p["serving_request_log_max_age_s"],
                        model_name=p["serving_model_name"], startup_timeout_s=p["serving_startup_timeout_s"],
                        deploy_target=p["serving_deploy_target"], namespace=cluster.namespace,
                        model_store_uri=p["serving_model_store_uri"], serving_image=cluster.image,
                        rollout_timeout_s=p["serving_rollout_timeout_s"], run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                    )
                    monitor = c["monitor"](
                        dataset=dataset, deployment=deploy.outputs["deployment"],
                        drift_share=p["monitor_drift_share"], replay_limit=p["monitor_replay_limit"],
                        model=model, sample_epsilon=p["monitor_sample_epsilon"], sample_alpha=p["monitor_sample_alpha"],
                    )
                    for step, task in (("deploy", deploy), ("monitor", monitor)):
                        configure(task, step)
                        # On a cluster both call the serving Service: its client token, and the label
                        # the serving NetworkPolicy admits (no effect under kfp.local).
                        kubernetes.use_secret_as_volume(task, secret_name=SERVING_TOKEN_SECRET,
                                                        mount_path=SERVING_TOKEN_MOUNT, optional=True)
                        kubernetes.add_pod_label(task, "kfp-mlops.io/inference-client", "true")

    pipeline_body.__signature__ = inspect.Signature(
        [inspect.Parameter(p.key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
         for p in params]
    )
    pipeline_body.__annotations__ = {p.key: p.type for p in params}
    pipeline_body.__doc__ = _pipeline_docstring()
    pipeline_body.__name__ = PIPELINE_NAME.replace("-", "_")
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(pipeline_body)


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
            # and components/storage.py falls back to its default.
            kubernetes.use_config_map_as_env(task, config_map_name=cluster.storage_config_map,
                                             config_map_key_to_env={k: k for k in STORAGE_CONFIG_ENV}, optional=True)
    if step in gpu_steps(cluster):
        place_on_gpu(task, cluster)


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


def _kfp_local_initialised() -> bool:
    from kfp.local import config as local_config

    return local_config.LocalExecutionConfig.instance is not None


def compile_pipeline(output_path: str, cluster: ClusterConfig | None = None) -> str:
    """Compile for a cluster (retry policies always in, whatever kfp.local's state)."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cluster, retries=True), package_path=str(output_path))
    return str(output_path)
