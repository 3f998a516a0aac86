"""Finetune step: train encoder + linear head on the labeled train split.

Starts from the pretrained encoder in one of three modes (``full``,
``partial``: the head plus the last ``unfreeze_blocks`` encoder stages,
``linear_probe``: the head only), with a warmup + cosine schedule, seeded
augmentations and early stopping on the validation loss, and writes the
classifier artifact (``model.safetensors`` + ``metadata.json``) that evaluate,
the audits and the serving handler load.

Checkpoints (model, optimizer, scheduler, RNG and loop state, best weights)
go every ``checkpoint_every_epochs`` epochs and/or ``checkpoint_every_steps``
steps into a directory keyed by the output artifact's URI (under
``checkpoint_root`` when set, else the local temp dir), so a retried step
resumes where the failed attempt stopped and ends with the same weights.
Variants of the loop (DP-SGD, adversarial training) plug in through
``customize`` (see ``components.training.FinetuneParts``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from components.settings import Settings
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pipelines.config import FinetuneConfig

_DEFAULTS = FinetuneConfig()


def weights_hash(state_dict) -> str:
    """A short content hash of a model's weights: same weights, same version."""
    from components.models import state_dict_sha256

    return state_dict_sha256(state_dict)[:12]


def finetune(dataset_dir: str | Path, encoder_dir: str | Path, out_dir: str | Path,
             epochs: int = _DEFAULTS.epochs, batch_size: int = _DEFAULTS.batch_size,
             learning_rate: float = _DEFAULTS.learning_rate, patience: int = _DEFAULTS.patience,
             label_fraction: float = _DEFAULTS.label_fraction, seed: int = 0, log=print, *,
             mode: str = _DEFAULTS.mode, unfreeze_blocks: int = _DEFAULTS.unfreeze_blocks,
             encoder_lr_scale: float = _DEFAULTS.encoder_lr_scale,
             min_epoch_samples: int = _DEFAULTS.min_epoch_samples, probe_epochs: int = _DEFAULTS.probe_epochs,
             compile: bool = _DEFAULTS.compile,
             checkpoint_dir: str | Path | None = None,
             checkpoint_every_steps: int = _DEFAULTS.checkpoint_every_steps,
             checkpoint_every_epochs: int = _DEFAULTS.checkpoint_every_epochs,
             runtime=None, on_step=None, customize=None, robust=None, dp=None) -> dict:
    """Fine-tune a classifier from a pretrained encoder and save it to ``out_dir``.

    ``mode``: 'full', 'partial' (the last ``unfreeze_blocks`` encoder stages)
    or 'linear_probe'. ``checkpoint_dir``: a local directory or ``s3://`` URI
    to checkpoint into and resume from (None: no checkpoints). ``customize``
    is passed to ``finetune_classifier`` (the hook for variants such as
    DP-SGD). ``robust``: a ``components.robustness.RobustTraining`` (noise /
    adversarial examples in each batch). ``dp``: a ``components.dp.DPSettings``
    to fine-tune with DP-SGD (its own epochs, batches, optimizer and trainable
    layers); the spent epsilon goes into the metadata (``dp``) and the summary
    (``dp_epsilon``). Returns a summary: model_version, val_accuracy, val_loss,
    best_epoch, epochs_run, n_labeled, mode, resumed_from_step, seconds,
    label_counts.
    """
    import numpy as np

    from components.checkpoint import Checkpointer
    from components.data import load_splits
    from components.models import load_encoder, save_classifier
    from components.pretrain import checkpoint_location
    from components.training import best_epoch, finetune_classifier, make_runtime, subsample_labels

    splits = load_splits(dataset_dir)
    encoder, encoder_meta = load_encoder(encoder_dir)
    rt = runtime or make_runtime(compile=compile)
    hyper = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
             "label_fraction": label_fraction, "seed": seed, "mode": mode, "unfreeze_blocks": unfreeze_blocks,
             "encoder_lr_scale": encoder_lr_scale, "min_epoch_samples": min_epoch_samples,
             "probe_epochs": probe_epochs}
    # Privacy / robustness variants plug in through `customize` (components.dp, components.robustness).
    dp_run = None
    if dp is not None:
        from dataclasses import asdict

        from components.dp import DPFinetune

        dp_run = DPFinetune(dp, len(subsample_labels(splits.train_y, label_fraction, seed)), seed, log=log,
                            reference_images=splits.val_x)  # standardise the embedding with val statistics
        hyper["dp"] = asdict(dp)
    if robust is not None:
        from dataclasses import asdict

        hyper["robust_training"] = asdict(robust)
    hooks = tuple(h for h in (customize, dp_run, robust.customize if robust is not None else None) if h is not None)
    if hooks:
        def customize(parts, hooks=hooks):  # noqa: F811 - every hook in turn
            for hook in hooks:
                parts = hook(parts)
            return parts
    local_ckpt, mirror = checkpoint_location(checkpoint_dir)
    checkpointer = None
    if local_ckpt is not None:
        checkpointer = Checkpointer(local_ckpt, every_steps=checkpoint_every_steps,
                                    every_epochs=checkpoint_every_epochs, mirror_uri=mirror, log=log,
                                    fingerprint={**hyper, "encoder": weights_hash(encoder.state_dict()),
                                                 "n_train": int(len(splits.train_y)), "n_val": int(len(splits.val_y))})

    t0 = time.perf_counter()
    model, history = finetune_classifier(encoder, splits, dp.epochs if dp is not None else epochs, batch_size,
                                         learning_rate, patience,
                                         label_fraction, seed, log=log, mode=mode, unfreeze_blocks=unfreeze_blocks,
                                         encoder_lr_scale=encoder_lr_scale, min_epoch_samples=min_epoch_samples,
                                         probe_epochs=probe_epochs, runtime=rt, checkpointer=checkpointer,
                                         on_step=on_step, customize=customize)
    seconds = time.perf_counter() - t0
    best = best_epoch(history)
    # The same call finetune_classifier made, so these are the labels it trained on.
    used = splits.train_y[subsample_labels(splits.train_y, label_fraction, seed)]
    label_counts = {name: int(np.sum(used == i)) for i, name in enumerate(splits.class_names)}
    summary = {
        "model_version": weights_hash(model.state_dict()),
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "n_labeled": int(len(used)),
        "mode": mode,
        "resumed_from_step": checkpointer.resumed_from if checkpointer else 0,
        "seconds": seconds,
    }
    dp_record = dp_run.report(len(history)) if dp_run is not None else None
    if dp_record is not None:
        summary["dp_epsilon"] = dp_record["epsilon"]
        log(f"finetune (DP-SGD): spent epsilon {dp_record['epsilon']:.3f} at delta {dp_record['delta']:g} "
            f"over {dp_record['steps']} steps")
    save_classifier(model, out_dir, {
        **summary,
        **hyper,
        **({"dp": dp_record} if dp_record is not None else {}),
        "class_names": list(splits.class_names),
        "label_counts": label_counts,
        "pretrain": {k: encoder_meta.get(k) for k in ("objective", "arch", "epochs", "final_loss", "seed", "n_images")},
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    })
    return {**summary, "label_counts": label_counts}


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

    from components.cost import log_metrics, measure
    from components.dp import DPSettings
    from components.finetune import finetune
    from components.pretrain import checkpoint_location, step_checkpoint_dir
    from components.robustness import robust_training

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
    from components.data import load_splits
    from components.monitor import write_model_reference

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
