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
``customize`` (see ``components.train.training.FinetuneParts``).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from pipelines.config import FinetuneConfig

_DEFAULTS = FinetuneConfig()


def weights_hash(state_dict) -> str:
    """A short content hash of a model's weights: same weights, same version."""
    from components.core.models import state_dict_sha256

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
    DP-SGD). ``robust``: a ``components.robustness.robustness.RobustTraining`` (noise /
    adversarial examples in each batch). ``dp``: a ``components.train.dp.DPSettings``
    to fine-tune with DP-SGD (its own epochs, batches, optimizer and trainable
    layers); the spent epsilon goes into the metadata (``dp``) and the summary
    (``dp_epsilon``). Returns a summary: model_version, val_accuracy, val_loss,
    best_epoch, epochs_run, n_labeled, mode, resumed_from_step, seconds,
    label_counts.
    """
    import numpy as np

    from components.core.checkpoint import Checkpointer, checkpoint_location
    from components.core.data import load_splits
    from components.core.models import load_encoder, save_classifier
    from components.train.training import best_epoch, finetune_classifier, make_runtime, subsample_labels

    splits = load_splits(dataset_dir)
    encoder, encoder_meta = load_encoder(encoder_dir)
    rt = runtime or make_runtime(compile=compile)
    hyper = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience,
             "label_fraction": label_fraction, "seed": seed, "mode": mode, "unfreeze_blocks": unfreeze_blocks,
             "encoder_lr_scale": encoder_lr_scale, "min_epoch_samples": min_epoch_samples,
             "probe_epochs": probe_epochs}
    # Privacy / robustness variants plug in through `customize` (components.train.dp, components.robustness.robustness).
    dp_run = None
    if dp is not None:
        from dataclasses import asdict

        from components.train.dp import DPFinetune

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
