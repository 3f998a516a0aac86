"""The kfp-mlops pipeline, defined once with the KFP v2 SDK.

``build_pipeline(cluster)`` returns the ``@dsl.pipeline`` whose root parameters
are the run fields of ``pipelines.config`` (flattened ``area_field``, each with
its description and default), so the KFP UI run form documents itself. The same
object runs on a cluster (compiled YAML) and on one machine (``kfp.local``).

Compile-time settings (image, GPU placement) come from ``ClusterConfig``: the
components are decorated here, not in their modules, so the image is
configurable without editing code.
"""

from __future__ import annotations

import inspect
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
NEVER_CACHED = ("deploy", "monitor")  # they act on the world (a server, live traffic)


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


def build_pipeline(cluster: ClusterConfig | None = None):
    """The pipeline for a cluster config (image and GPU placement of the pretrain step)."""
    cluster = cluster or ClusterConfig()
    c = make_components(cluster.image)
    params = parameters()
    names = [p.key for p in params]

    def pipeline_body(*args, **kwargs):
        p = dict(zip(names, args))
        p.update(kwargs)

        ingest = c["ingest"](
            source=p["data_source"], seed=p["data_seed"], test_fraction=p["data_test_fraction"],
            val_fraction=p["data_val_fraction"], pool_fraction=p["data_pool_fraction"],
            image_size=p["data_image_size"],
        )
        dataset = ingest.outputs["dataset"]

        pretrain = c["pretrain"](
            dataset=dataset, objective=p["pretrain_objective"], epochs=p["pretrain_epochs"],
            batch_size=p["pretrain_batch_size"], learning_rate=p["pretrain_learning_rate"],
            temperature=p["pretrain_temperature"], width=p["pretrain_width"],
            embed_dim=p["pretrain_embed_dim"], seed=p["data_seed"],
        )
        place_on_gpu(pretrain, cluster)

        finetune = c["finetune"](
            dataset=dataset, encoder=pretrain.outputs["encoder"], epochs=p["finetune_epochs"],
            batch_size=p["finetune_batch_size"], learning_rate=p["finetune_learning_rate"],
            patience=p["finetune_patience"], label_fraction=p["finetune_label_fraction"], seed=p["data_seed"],
        )
        model = finetune.outputs["model"]

        evaluate = c["evaluate"](dataset=dataset, model=model, min_test_accuracy=p["gates_min_test_accuracy"])
        privacy = c["privacy"](dataset=dataset, model=model, max_mia_auc=p["gates_max_mia_auc"], seed=p["data_seed"])
        robustness = c["robustness"](
            dataset=dataset, model=model, noise_sigma=p["gates_noise_sigma"], fgsm_epsilon=p["gates_fgsm_epsilon"],
            min_noise_accuracy=p["gates_min_noise_accuracy"], min_fgsm_accuracy=p["gates_min_fgsm_accuracy"],
            seed=p["data_seed"],
        )

        # Deploy only when every gate passed: nested conditions are KFP's AND.
        with dsl.If(evaluate.outputs["Output"] == True, name="evaluation-passed"):  # noqa: E712 - KFP condition syntax
            with dsl.If(privacy.outputs["Output"] == True, name="privacy-passed"):  # noqa: E712
                with dsl.If(robustness.outputs["Output"] == True, name="robustness-passed"):  # noqa: E712
                    deploy = c["deploy"](
                        model=model, dataset=dataset, serving_home=p["serving_home"], host=p["serving_host"],
                        inference_port=p["serving_inference_port"], management_port=p["serving_management_port"],
                        metrics_port=p["serving_metrics_port"], workers=p["serving_workers"],
                        model_name=p["serving_model_name"], startup_timeout_s=p["serving_startup_timeout_s"],
                    )
                    monitor = c["monitor"](
                        dataset=dataset, deployment=deploy.outputs["deployment"],
                        drift_share=p["monitor_drift_share"], replay_limit=p["monitor_replay_limit"],
                    )
                    for task in (deploy, monitor):
                        task.set_caching_options(False)

    pipeline_body.__signature__ = inspect.Signature(
        [inspect.Parameter(p.key, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
         for p in params]
    )
    pipeline_body.__annotations__ = {p.key: p.type for p in params}
    pipeline_body.__doc__ = _pipeline_docstring()
    pipeline_body.__name__ = PIPELINE_NAME.replace("-", "_")
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(pipeline_body)


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


def compile_pipeline(output_path: str, cluster: ClusterConfig | None = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cluster), package_path=str(output_path))
    return str(output_path)
