"""The KFP entry of the finetune step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def finetune_component(
    dataset: Input[Dataset],
    encoder: Input[Model],
    cfg: Settings,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fine-tune the pretrained encoder plus a linear head on the labeled train split.

    Args:
        dataset: The dataset artifact written by ingest.
        encoder: The encoder artifact written by pretrain.
        cfg: The run's ``finetune`` settings (schedule, mode, checkpoints, robust training, DP-SGD) and
            ``data.seed`` (head initialisation, label subsample, batch order, augmentations).
        model: Output directory for the classifier weights (safetensors) and metadata.
        metrics: Validation accuracy and loss, best epoch, label count and the step's cost.
    """
    import os
    import shutil

    from components.core.checkpoint import checkpoint_location, step_checkpoint_dir
    from components.core.cost import log_metrics, measure
    from components.core.data import load_splits
    from components.core.features import write_model_reference
    from components.finetune.finetune import finetune

    os.makedirs(model.path, exist_ok=True)
    ckpt = step_checkpoint_dir("finetune", model.uri, cfg.finetune.checkpoint_root)
    with measure() as cost:
        summary = finetune(dataset.path, encoder.path, model.path, cfg, lambda line: print(line, flush=True),
                           checkpoint_dir=ckpt)
    local_ckpt, _ = checkpoint_location(ckpt)
    shutil.rmtree(local_ckpt, ignore_errors=True)  # done: a later retry has nothing to resume
    # The monitor's reference for prediction and embedding drift, computed once, at training time.
    write_model_reference(model.path, load_splits(dataset.path).val_x)
    dp_spent = {}
    if "dp_epsilon" in summary:  # fine-tuned with DP-SGD: the privacy it spent
        dp_spent = {"dp_epsilon": summary["dp_epsilon"], "dp_delta": cfg.finetune.dp_delta}
    model.metadata.update({"model_version": summary["model_version"], "val_accuracy": summary["val_accuracy"],
                           **dp_spent})
    log_metrics(metrics, {
        "val_accuracy": summary["val_accuracy"],
        "val_loss": summary["val_loss"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "n_labeled": summary["n_labeled"],
        "finetune_resumed_from_step": summary["resumed_from_step"],
        **dp_spent,
        **cost.as_metrics(),
    })
