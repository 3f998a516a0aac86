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
    from components.finetune.finetune import finetune
    from components.train.adversarial import robust_training
    from components.train.dp import DPSettings

    seed = cfg.data.seed
    cfg = cfg.finetune
    os.makedirs(model.path, exist_ok=True)
    robust = robust_training(cfg.augment_noise_sigma, cfg.adversarial_epsilon, cfg.adversarial_fraction)
    dp = None
    if cfg.dp_epsilon > 0:
        dp = DPSettings(target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, max_grad_norm=cfg.dp_max_grad_norm,
                        batch_size=cfg.dp_batch_size, learning_rate=cfg.dp_learning_rate,
                        trainable=cfg.dp_trainable, epochs=cfg.dp_epochs)
    ckpt = step_checkpoint_dir("finetune", model.uri, cfg.checkpoint_root)
    with measure() as cost:
        summary = finetune(dataset.path, encoder.path, model.path, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           learning_rate=cfg.learning_rate, patience=cfg.patience,
                           label_fraction=cfg.label_fraction, seed=seed, log=lambda line: print(line, flush=True),
                           mode=cfg.mode, unfreeze_blocks=cfg.unfreeze_blocks,
                           encoder_lr_scale=cfg.encoder_lr_scale, min_epoch_samples=cfg.min_epoch_samples,
                           probe_epochs=cfg.probe_epochs, compile=cfg.compile, checkpoint_dir=ckpt,
                           checkpoint_every_steps=cfg.checkpoint_every_steps,
                           checkpoint_every_epochs=cfg.checkpoint_every_epochs, robust=robust, dp=dp)
    local_ckpt, _ = checkpoint_location(ckpt)
    shutil.rmtree(local_ckpt, ignore_errors=True)  # done: a later retry has nothing to resume
    # The monitor's reference for prediction and embedding drift, computed once, at training time.
    from components.core.data import load_splits
    from components.core.features import write_model_reference

    write_model_reference(model.path, load_splits(dataset.path).val_x)
    model.metadata.update({"model_version": summary["model_version"], "val_accuracy": summary["val_accuracy"]})
    if "dp_epsilon" in summary:
        model.metadata.update({"dp_epsilon": summary["dp_epsilon"], "dp_delta": cfg.dp_delta})
    log_metrics(metrics, {
        "val_accuracy": summary["val_accuracy"],
        "val_loss": summary["val_loss"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "n_labeled": summary["n_labeled"],
        "finetune_resumed_from_step": summary["resumed_from_step"],
        **({"dp_epsilon": summary["dp_epsilon"], "dp_delta": cfg.dp_delta} if "dp_epsilon" in summary else {}),
        **cost.as_metrics(),
    })
