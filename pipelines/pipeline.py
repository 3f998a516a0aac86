"""The kfp-mlops pipeline, defined once with the KFP v2 SDK.

``build_pipeline(cluster)`` returns the ``@dsl.pipeline``. For a cluster its root
parameters are the run form: a box for each of the few fields marked ``form=True``
in ``pipelines.config`` and ``other_settings``, every other run field by area
(``pipelines.run_settings``); a first task, ``settings``, checks them as one config
and hands every field to the steps. Locally (``kfp.local``) every run field is a
root parameter wired straight to the steps: no extra task.

Compile-time settings come from ``ClusterConfig``: the components are decorated
here, not in their modules, so the image is configurable without editing code,
and every task gets its Kubernetes settings in one place,
``pipelines.pod_settings.apply_cluster_settings``. kfp.local ignores the Kubernetes
settings; it would honour retries, so they are left out of local runs (a local
failure is deterministic; retrying only delays it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from kfp import dsl

from components.core import settings
from components.deploy.component import deploy_component
from components.evaluate.component import evaluate_component
from components.finetune.component import finetune_component
from components.ingest.component import ingest_component
from components.monitor.component import monitor_component
from components.pretrain.component import pretrain_component
from components.privacy.component import privacy_component
from components.record.component import record_component
from components.robustness.component import robustness_component
from pipelines.config import CLUSTER, LOCAL, PARAMETER_AREAS, ClusterConfig, Config, Parameter, coerce, parameters
from pipelines.config import defaults as config_defaults
from pipelines.kfp_steps import StepInput, kfp_function, settings_function
from pipelines.pod_settings import StepSettings, apply_cluster_settings, step_settings
from pipelines.run_settings import OTHER_SETTINGS, other_settings_of

PIPELINE_NAME = "kfp-mlops"
PIPELINE_DESCRIPTION = (
    "Raw data to a monitored TorchServe endpoint: ingest, self-supervised pretraining, fine-tuning, "
    "evaluation, privacy and robustness gates, deploy (only when every gate passes), drift monitoring."
)
SETTINGS_TASK = "settings"  # the cluster's first task: checks the run's settings, outputs every field
SETTINGS_POD = StepSettings("100m", "500m", "256Mi", "512Mi", timeout_s=600, retries=0)
COMPILED_SETTINGS = "compiled_settings"  # the settings task's input: the compiled values behind other_settings
OTHER_SETTINGS_HELP = (
    "Every other run setting, by area, as in a config file: open the JSON editor and change a value; a setting "
    "left out keeps its compiled value; a setting with its own box here is refused. Fields, ranges and "
    "examples: docs/configuration.md, 'The KFP run form'."
)

# Step name -> the component function that implements it, in pipeline order.
STEPS: dict[str, Callable[..., Any]] = {
    "ingest": ingest_component,
    "pretrain": pretrain_component,
    "finetune": finetune_component,
    "evaluate": evaluate_component,
    "privacy": privacy_component,
    "robustness": robustness_component,
    "record": record_component,
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
    "record": PARAMETER_AREAS,  # the whole run config, recorded with its hash in the ledger
    "deploy": ("serving", "rollout"),
    "monitor": ("monitor",),
}


def step_inputs(step: str, roots: list[RootParameter], target: str) -> list[StepInput]:
    """The config fields of ``step``'s areas as inputs of its KFP function, typed like their root parameters
    (locally) or like the settings task's outputs, the field's own type (on a cluster)."""
    root_types = {r.key: r.type for r in roots} if target == LOCAL else {}
    return [StepInput(p, root_types.get(p.key, p.type)) for area in STEP_AREAS[step] for p in parameters((area,))]


def make_components(image: str, roots: list[RootParameter], target: str) -> dict[str, Any]:
    """The KFP component of every step for the given image; task names are the step names."""
    out = {}
    for step, func in STEPS.items():
        component = dsl.component(kfp_function(step, func, step_inputs(step, roots, target)), base_image=image,
                                  install_kfp_package=False)
        component.component_spec.name = step
        out[step] = component
    if target == CLUSTER:
        boxes = [StepInput(r.field, r.type) for r in roots if r.field is not None]
        component = dsl.component(settings_function(boxes, parameters(target=CLUSTER), OTHER_SETTINGS,
                                                    COMPILED_SETTINGS), base_image=image, install_kfp_package=False)
        component.component_spec.name = SETTINGS_TASK
        out[SETTINGS_TASK] = component
    return out


def step_component(step: str, image: str = ClusterConfig().image, target: str = LOCAL):
    """One step's KFP component on its own (as the pipeline builds it for ``target``)."""
    return make_components(image, root_parameters(target), target)[step]


def config_arguments(step: str, cfg: Config, target: str = LOCAL) -> dict[str, Any]:
    """The config inputs of one step's component for ``cfg``, to call it outside the pipeline."""
    values = run_parameters(cfg, target)
    return {item.name: values.get(item.name, item.field.value_in(cfg))
            for item in step_inputs(step, root_parameters(target), target)}


@dataclass(frozen=True)
class RootParameter:
    """A run parameter of the compiled pipeline: a config field, typed so that the KFP run form can start it
    (``field`` None: ``other_settings``, a dict).

    The stock KFP run form (``NewRunParametersV2``) takes a default that is falsy in JavaScript
    (``0``, ``false``, ``""``) for a missing value and keeps Start disabled, so a field whose
    default is falsy is declared as text (``"0"``, ``"false"``, ``'""'``); the step decodes it
    with the field's own type (``components.core.settings``).
    """

    field: Parameter | None
    type: type
    default: Any

    @property
    def key(self) -> str:
        return self.field.key if self.field is not None else OTHER_SETTINGS

    def encode(self, value: Any) -> Any:
        """A config value as this parameter carries it (run parameters of submit, schedule and local runs)."""
        if self.field is not None:  # strictly typed, so a value set in code (an int on a float field) fits KFP's type
            value = coerce(value, self.field.type, self.key)
        return settings.encode(value) if self.type is str else value

    def description(self) -> str:
        if self.field is None:
            return OTHER_SETTINGS_HELP
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
    """The run parameters of the pipeline built for ``target``, with defaults from ``defaults`` (else the target's):
    locally every run field; on a cluster the fields marked ``form=True``, then ``other_settings``."""
    defaults = defaults or config_defaults(target)
    out = []
    for p in parameters(target=target):
        if target == CLUSTER and not p.form:
            continue
        default = p.value_in(defaults)
        typ = p.type if default else str  # falsy: declared as text (see RootParameter)
        out.append(RootParameter(p, typ, settings.encode(default) if typ is str else default))
    if target == CLUSTER:
        out.append(RootParameter(None, dict, other_settings_of(defaults)))
    return out


def run_parameters(cfg: Config, target: str = CLUSTER, compiled: Config | None = None) -> dict[str, Any]:
    """The values to start the pipeline with for ``cfg``, keyed and encoded as its root parameters. On a cluster:
    the boxes, and in ``other_settings`` only what differs from the pipeline's compiled values (``compiled``,
    else the cluster defaults); left out when nothing does."""
    out = {r.key: r.encode(r.field.value_in(cfg)) for r in root_parameters(target) if r.field is not None}
    if target == CLUSTER:
        differing = other_settings_of(cfg, against=compiled or config_defaults(CLUSTER))
        if differing:
            out[OTHER_SETTINGS] = differing
    return out


def _pipeline_docstring(roots: list[RootParameter]) -> str:
    lines = [PIPELINE_DESCRIPTION, "", "Args:"]
    lines += [f"    {r.key}: {r.description()}" for r in roots]
    return "\n".join(lines) + "\n"


def step_arguments(step: str, channels: dict[str, Any], roots: list[RootParameter], target: str) -> dict[str, Any]:
    """The field inputs of one step's task: each from its channel (locally the run parameter, on a cluster the
    settings task's output), or its default where it has none (local-only fields on a cluster)."""
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
    compiled = other_settings_of(defaults or config_defaults(target)) if target == CLUSTER else {}

    def configure(task, step: str):
        apply_cluster_settings(task, step, cluster, settings_by_step[step], retries=retries)
        return task

    def pipeline_body(*args, **kwargs):
        p = dict(zip(names, args))
        p.update(kwargs)
        if target == CLUSTER:  # one task checks the form's values as a config and hands every field on
            checked = c[SETTINGS_TASK](**p, **{COMPILED_SETTINGS: compiled})
            apply_cluster_settings(checked, SETTINGS_TASK, cluster, SETTINGS_POD, retries=False)
            p = {f.key: checked.outputs[f.key] for f in parameters(target=CLUSTER)}

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
        # The run's trained and gated records, outside the conditions: a blocked run is recorded too.
        record = configure(c["record"](
            model=model, dataset=dataset, **{f"{step}_metrics": task.outputs["metrics"] for step, task in
                                             (("ingest", ingest), ("pretrain", pretrain), ("finetune", finetune))},
            **{f"{step}_metrics": gates[step].outputs["metrics"] for step in GATE_STEPS},
            **{f"passed_{step}": gates[step].outputs["Output"] for step in GATE_STEPS},
            **config("record"), run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            image=cluster.image if target == CLUSTER else ""), "record")

        # Deploy only when every gate passed: nested conditions are KFP's AND.
        with dsl.If(gates["evaluate"].outputs["Output"] == True, name="evaluation-passed"):  # noqa: E712 - KFP condition syntax
            with dsl.If(gates["privacy"].outputs["Output"] == True, name="privacy-passed"):  # noqa: E712
                with dsl.If(gates["robustness"].outputs["Output"] == True, name="robustness-passed"):  # noqa: E712
                    deploy = configure(c["deploy"](model=model, dataset=dataset, **config("deploy"),
                                                   gated_record=record.outputs["Output"],
                                                   namespace=cluster.namespace, serving_image=cluster.serving_image,
                                                   run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "deploy")
                    configure(c["monitor"](dataset=dataset, deployment=deploy.outputs["deployment"], model=model,
                                           **config("monitor")), "monitor")

    pipeline_body.__signature__ = inspect.Signature(
        [inspect.Parameter(r.key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=r.default, annotation=r.type)
         for r in roots]
    )
    pipeline_body.__annotations__ = {r.key: r.type for r in roots}
    pipeline_body.__doc__ = _pipeline_docstring(roots)
    pipeline_body.__name__ = PIPELINE_NAME.replace("-", "_")
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(pipeline_body)


def _kfp_local_initialised() -> bool:
    from kfp.local import config as local_config

    return local_config.LocalExecutionConfig.instance is not None


def compile_pipeline(output_path: str, cluster: ClusterConfig | None = None, defaults: Config | None = None) -> str:
    """Compile for a cluster (retry policies always in, whatever kfp.local's state); ``defaults`` fill the run form."""
    from kfp import compiler

    pipeline = build_pipeline(cluster, target=CLUSTER, defaults=defaults, retries=True)
    compiler.Compiler().compile(pipeline, package_path=str(output_path))
    return str(output_path)
