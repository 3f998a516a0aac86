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

from components.core import settings
from components.deploy.component import deploy_component
from components.evaluate.component import evaluate_component
from components.finetune.component import finetune_component
from components.ingest.component import ingest_component
from components.monitor.component import monitor_component
from components.pretrain.component import pretrain_component
from components.privacy.component import privacy_component
from components.robustness.component import robustness_component
from pipelines.config import CLUSTER, LOCAL, ClusterConfig, Config, Parameter, parameters
from pipelines.config import defaults as config_defaults
from pipelines.kfp_steps import StepInput, kfp_function

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
# The config areas each step receives (its ``config`` input).
STEP_AREAS: dict[str, tuple[str, ...]] = {
    "ingest": ("data",),
    "pretrain": ("data", "pretrain"),
    "finetune": ("data", "finetune"),
    "evaluate": ("gates", "serving"),
    "privacy": ("data", "gates"),
    "robustness": ("data", "gates"),
    "deploy": ("serving",),
    "monitor": ("monitor",),
}
# The pipeline's own token for the serving pods' auth proxy (manifests/base/serving-deployment.yaml):
# accepted like a client token, and its requests may say they are synthetic (X-Request-Source).
SERVING_SOURCE_TOKEN_SECRET = "kfp-mlops-serving-source-token"
SERVING_SOURCE_TOKEN_MOUNT = "/var/run/secrets/kfp-mlops/serving-source-token"
NEVER_CACHED = ("deploy", "monitor")  # they act on the world (a server, live traffic)
# Steps whose rerun gives the same result (they write only their own outputs), so a
# retry after a lost node or a flaky download is safe. Deploy changes the live
# endpoint and monitor replays traffic to it: a retry would act twice, so never.
RETRYABLE_STEPS = ("ingest", "pretrain", "finetune", "evaluate", "privacy", "robustness")
# Steps that read or write s3:// themselves (sources, the multi-node pretrain
# exchange, the model store and its champion, request logs). The others only use KFP artifacts, which
# KFP's launcher moves with its own credentials, so they get no S3 keys at all.
STORAGE_STEPS = ("ingest", "pretrain", "evaluate", "deploy", "monitor")
# Env var (what components/core/storage.py and boto3 read) -> key in the storage ConfigMap
# (manifests/base/storage-configmap.yaml uses the same names).
STORAGE_CONFIG_ENV = ("S3_ENDPOINT_URL", "AWS_REGION", "S3_ADDRESSING_STYLE", "AWS_MAX_ATTEMPTS", "KFP_MLOPS_MODEL_STORE")


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


def step_inputs(step: str, roots: list[RootParameter], target: str) -> list[StepInput]:
    """The config fields of ``step``'s areas as inputs of its KFP function, typed like their root parameters."""
    root_types = {r.key: r.type for r in roots}
    return [StepInput(p, root_types.get(p.key, p.type)) for area in STEP_AREAS[step] for p in parameters((area,))]


def make_components(image: str, roots: list[RootParameter], target: str) -> dict[str, Any]:
    """The KFP component of every step for the given image; task names are the step names."""
    out = {}
    for step, func in STEPS.items():
        component = dsl.component(kfp_function(step, func, step_inputs(step, roots, target)), base_image=image,
                                  install_kfp_package=False)
        component.component_spec.name = step
        out[step] = component
    return out


def step_component(step: str, image: str = ClusterConfig().image, target: str = LOCAL):
    """One step's KFP component on its own (as the pipeline builds it for ``target``)."""
    return make_components(image, root_parameters(target), target)[step]


def config_arguments(step: str, cfg: Config, target: str = LOCAL) -> dict[str, Any]:
    """The config inputs of one step's component for ``cfg``, to call it outside the pipeline."""
    roots = root_parameters(target)
    values = {r.key: r.encode(getattr(getattr(cfg, r.field.area), r.field.name)) for r in roots}
    return {item.name: values.get(item.name, getattr(getattr(cfg, item.field.area), item.field.name))
            for item in step_inputs(step, roots, target)}


@dataclass(frozen=True)
class RootParameter:
    """A run parameter of the compiled pipeline: a config field, typed so that the KFP run form can start it.

    The stock KFP run form (``NewRunParametersV2``) takes a default that is falsy in JavaScript
    (``0``, ``false``, ``""``) for a missing value and keeps Start disabled, so a field whose
    default is falsy is declared as text (``"0"``, ``"false"``, ``'""'``); the step decodes it
    with the field's own type (``components.core.settings``).
    """

    field: Parameter
    type: type
    default: Any

    @property
    def key(self) -> str:
        return self.field.key

    def encode(self, value: Any) -> Any:
        """A config value as this parameter carries it (run parameters of submit, schedule and local runs)."""
        return settings.encode(value) if self.type is str else value

    def description(self) -> str:
        p, notes = self.field, []
        if p.range_text():
            notes.append(f"Allowed: {p.range_text()}.")
        if self.type is str and p.type is not str:
            notes.append(f"A {_TYPE_WORDS[p.type]}, entered as text.")
        if p.type is str:
            notes.append('Empty: "".')
        return " ".join([p.help, *notes])


_TYPE_WORDS = {int: "whole number", float: "number", bool: "true or false", str: "text"}


def root_parameters(target: str = CLUSTER, defaults: Config | None = None) -> list[RootParameter]:
    """The run parameters of the pipeline built for ``target``, with defaults from ``defaults`` (else the target's)."""
    defaults = defaults or config_defaults(target)
    out = []
    for p in parameters(target=target):
        default = getattr(getattr(defaults, p.area), p.name)
        typ = p.type if default else str  # falsy: declared as text (see RootParameter)
        out.append(RootParameter(p, typ, settings.encode(default) if typ is str else default))
    return out


def run_parameters(cfg: Config, target: str = CLUSTER) -> dict[str, Any]:
    """The values to start the pipeline with for ``cfg``: keyed and encoded as its root parameters."""
    return {r.key: r.encode(getattr(getattr(cfg, r.field.area), r.field.name)) for r in root_parameters(target)}


def _pipeline_docstring(roots: list[RootParameter]) -> str:
    lines = [PIPELINE_DESCRIPTION, "", "Args:"]
    lines += [f"    {r.key}: {r.description()}" for r in roots]
    return "\n".join(lines) + "\n"


def step_arguments(step: str, channels: dict[str, Any], roots: list[RootParameter], target: str) -> dict[str, Any]:
    """The field inputs of one step's task: each from its run parameter, or its default where it is none
    (local-only fields on a cluster)."""
    return {item.name: channels[item.name] if item.name in channels else item.field.default_for(target)
            for item in step_inputs(step, roots, target)}


def build_pipeline(cluster: ClusterConfig | None = None, *, target: str = CLUSTER, defaults: Config | None = None,
                   retries: bool | None = None):
    """The pipeline for ``target`` ('cluster': compiled and submitted; 'local': kfp.local) and a cluster config.

    ``defaults``: the run parameters' defaults (the run form's), e.g. a YAML config
    compiled in; None = the target's built-in defaults. ``retries``: put the retry
    policies in (True), leave them out (False), or (None) leave them out only when
    kfp.local is initialised, i.e. for a local run.
    """
    cluster = cluster or ClusterConfig()
    settings_by_step = step_settings(cluster)  # validates the overrides before anything is built
    if retries is None:
        retries = not _kfp_local_initialised()
    roots = root_parameters(target, defaults)
    c = make_components(cluster.image, roots, target)
    names = [r.key for r in roots]

    def configure(task, step: str):
        apply_cluster_settings(task, step, cluster, settings_by_step[step], retries=retries)
        return task

    def pipeline_body(*args, **kwargs):
        p = dict(zip(names, args))
        p.update(kwargs)

        def config(step: str) -> dict[str, Any]:
            return step_arguments(step, p, roots, target)

        ingest = configure(c["ingest"](**config("ingest")), "ingest")
        dataset = ingest.outputs["dataset"]
        # The TrainJob nodes (num_nodes > 1) run the same image with the same S3 Secret as the steps.
        pretrain = configure(c["pretrain"](dataset=dataset, **config("pretrain"), trainjob_image=cluster.image,
                                           trainjob_s3_key_source=cluster.s3_secret_name), "pretrain")
        finetune = configure(c["finetune"](dataset=dataset, encoder=pretrain.outputs["encoder"],
                                           **config("finetune")), "finetune")
        model = finetune.outputs["model"]
        gates = {step: configure(c[step](dataset=dataset, model=model, **config(step)), step)
                 for step in GATE_STEPS}

        # Deploy only when every gate passed: nested conditions are KFP's AND.
        with dsl.If(gates["evaluate"].outputs["Output"] == True, name="evaluation-passed"):  # noqa: E712 - KFP condition syntax
            with dsl.If(gates["privacy"].outputs["Output"] == True, name="privacy-passed"):  # noqa: E712
                with dsl.If(gates["robustness"].outputs["Output"] == True, name="robustness-passed"):  # noqa: E712
                    deploy = c["deploy"](model=model, dataset=dataset, **config("deploy"),
                                         namespace=cluster.namespace, serving_image=cluster.image,
                                         run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
                    monitor = c["monitor"](dataset=dataset, deployment=deploy.outputs["deployment"], model=model,
                                           **config("monitor"))
                    for step, task in (("deploy", deploy), ("monitor", monitor)):
                        configure(task, step)
                        # On a cluster both call the serving Service: the pipeline's own token (its requests
                        # may say they are synthetic), and the label the serving NetworkPolicy admits.
                        kubernetes.use_secret_as_volume(task, secret_name=SERVING_SOURCE_TOKEN_SECRET,
                                                        mount_path=SERVING_SOURCE_TOKEN_MOUNT, optional=True)
                        kubernetes.add_pod_label(task, "kfp-mlops.io/inference-client", "true")

    pipeline_body.__signature__ = inspect.Signature(
        [inspect.Parameter(r.key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=r.default, annotation=r.type)
         for r in roots]
    )
    pipeline_body.__annotations__ = {r.key: r.type for r in roots}
    pipeline_body.__doc__ = _pipeline_docstring(roots)
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
            # and components/core/storage.py falls back to its default.
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


def compile_pipeline(output_path: str, cluster: ClusterConfig | None = None, defaults: Config | None = None) -> str:
    """Compile for a cluster (retry policies always in, whatever kfp.local's state); ``defaults`` fill the run form."""
    from kfp import compiler

    pipeline = build_pipeline(cluster, target=CLUSTER, defaults=defaults, retries=True)
    compiler.Compiler().compile(pipeline, package_path=str(output_path))
    return str(output_path)
