"""The KFP entry of the pretrain step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def pretrain_component(
    dataset: Input[Dataset],
    cfg: Settings,
    encoder: Output[Model],
    metrics: Output[Metrics],
    trainjob_image: str = "",
    trainjob_s3_key_source: str = "",
):
    """Self-supervised pretraining of the image encoder on the unlabeled pool plus train images.

    Args:
        dataset: The dataset artifact written by ingest.
        cfg: The run's ``pretrain`` settings and ``data.seed`` (initialisation, batch order, augmentations).
        encoder: Output directory for the encoder weights (safetensors) and metadata.
        metrics: Pretraining loss, image count and the step's cost.
        trainjob_image: Image of the TrainJob nodes (num_nodes > 1); the pipeline passes its own image.
        trainjob_s3_key_source: Name of the Kubernetes Secret whose S3 keys the TrainJob nodes get as env; empty = none (workload identity).
    """
    import os
    import shutil

    from components.core.checkpoint import checkpoint_location, step_checkpoint_dir
    from components.core.cost import log_metrics, measure
    from components.pretrain.multinode import current_namespace, pretrain_multinode
    from components.pretrain.pretrain import default_nproc_per_node, pretrain

    os.makedirs(encoder.path, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    with measure() as cost:
        if cfg.pretrain.num_nodes > 1:
            summary = pretrain_multinode(dataset.path, encoder.path, cfg, run_uri=encoder.uri, image=trainjob_image,
                                         namespace=current_namespace(), s3_secret_name=trainjob_s3_key_source,
                                         log=log)
        else:
            ckpt = step_checkpoint_dir("pretrain", encoder.uri, cfg.pretrain.checkpoint_root)
            summary = pretrain(dataset.path, encoder.path, cfg, log, checkpoint_dir=ckpt,
                               nproc_per_node=default_nproc_per_node())
            local_ckpt, _ = checkpoint_location(ckpt)
            shutil.rmtree(local_ckpt, ignore_errors=True)  # done: a later retry has nothing to resume
    encoder.metadata.update({"objective": cfg.pretrain.objective, "arch": summary["arch"],
                             "final_loss": summary["final_loss"]})
    log_metrics(metrics, {
        "pretrain_first_loss": summary["first_loss"],
        "pretrain_final_loss": summary["final_loss"],
        "pretrain_epochs": summary["epochs"],
        "pretrain_world_size": summary["world_size"],
        "pretrain_resumed_from_step": summary["resumed_from_step"],
        "n_images": summary["n_images"],
        **cost.as_metrics(),
    })
