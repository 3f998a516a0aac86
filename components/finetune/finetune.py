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
``customize`` (see ``components.train.loops.FinetuneParts``).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from components.core.settings import Settings


def weights_hash(state_dict) -> str:
    """A short content hash of a model's weights: same weights, same version."""
    from components.core.models import state_dict_sha256

    return state_dict_sha256(state_dict)[:12]


def dp_settings(area: Settings):
    """The DP-SGD settings of the finetune settings ``area`` (a ``components.train.dp.DPSettings``); None
    when ``dp_epsilon`` is 0, i.e. no DP."""
    from components.train.dp import DPSettings

    if not area.dp_epsilon > 0:
        return None
    return DPSettings(target_epsilon=area.dp_epsilon, delta=area.dp_delta, max_grad_norm=area.dp_max_grad_norm,
                      batch_size=area.dp_batch_size, learning_rate=area.dp_learning_rate,
                      trainable=area.dp_trainable, epochs=area.dp_epochs)


def finetune(dataset_dir: str | Path, encoder_dir: str | Path, out_dir: str | Path, cfg: Settings,
             log: Callable[[str], None] = print, *, checkpoint_dir: str | Path | None = None, runtime=None,
             on_step=None, customize=None) -> dict:
    """Fine-tune a classifier from a pretrained encoder and save it to ``out_dir``.

    ``cfg``: the step's settings, ``cfg.finetune`` and ``cfg.data.seed``
    (head initialisation, label subsample, batch order, augmentations). Its
    ``mode`` is 'full', 'partial' (the last ``unfreeze_blocks`` encoder
    stages) or 'linear_probe'; noise and adversarial examples in each batch
    come with ``augment_noise_sigma`` / ``adversarial_epsilon``
    (``components.train.adversarial.RobustTraining``); ``dp_epsilon`` > 0
    fine-tunes with DP-SGD (its own epochs, batches, optimizer and trainable
    layers: the ``dp_*`` settings), and the spent epsilon goes into the
    metadata (``dp``) and the summary (``dp_epsilon``). ``checkpoint_dir``: a
    local directory or ``s3://`` URI to checkpoint into and resume from (None:
    no checkpoints). ``customize`` is passed to ``finetune_classifier`` (the
    hook for further variants). Returns a summary: model_version,
    val_accuracy, val_loss, best_epoch, epochs_run, n_labeled, mode,
    resumed_from_step, seconds, label_counts.
    """
    import numpy as np

    from components.core.checkpoint import Checkpointer, checkpoint_location
    from components.core.data import load_splits
    from components.core.models import load_encoder, save_classifier
    from components.train.adversarial import robust_training
    from components.train.loops import best_epoch, finetune_classifier, subsample_labels
    from components.train.runtime import make_runtime

    f, seed = cfg.finetune, cfg.data.seed
    robust = robust_training(f.augment_noise_sigma, f.adversarial_epsilon, f.adversarial_fraction)
    dp = dp_settings(f)
    splits = load_splits(dataset_dir)
    encoder, encoder_meta = load_encoder(encoder_dir)
    rt = runtime or make_runtime(compile=f.compile)
    hyper = {"epochs": f.epochs, "batch_size": f.batch_size, "learning_rate": f.learning_rate,
             "patience": f.patience, "label_fraction": f.label_fraction, "seed": seed, "mode": f.mode,
             "unfreeze_blocks": f.unfreeze_blocks, "encoder_lr_scale": f.encoder_lr_scale,
             "min_epoch_samples": f.min_epoch_samples, "probe_epochs": f.probe_epochs}
    # Privacy / robustness variants plug in through `customize` (components.train.dp, components.train.adversarial).
    dp_run = None
    if dp is not None:
        from components.train.dp import DPFinetune

        dp_run = DPFinetune(dp, len(subsample_labels(splits.train_y, f.label_fraction, seed)), seed, log=log,
                            reference_images=splits.val_x)  # standardise the embedding with val statistics
        hyper["dp"] = asdict(dp)
    if robust is not None:
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
        checkpointer = Checkpointer(local_ckpt, every_steps=f.checkpoint_every_steps,
                                    every_epochs=f.checkpoint_every_epochs, mirror_uri=mirror, log=log,
                                    fingerprint={**hyper, "encoder": weights_hash(encoder.state_dict()),
                                                 "n_train": int(len(splits.train_y)), "n_val": int(len(splits.val_y))})

    t0 = time.perf_counter()
    model, history = finetune_classifier(encoder, splits, dp.epochs if dp is not None else f.epochs, f.batch_size,
                                         f.learning_rate, f.patience, f.label_fraction, seed, log=log, mode=f.mode,
                                         unfreeze_blocks=f.unfreeze_blocks, encoder_lr_scale=f.encoder_lr_scale,
                                         min_epoch_samples=f.min_epoch_samples, probe_epochs=f.probe_epochs,
                                         runtime=rt, checkpointer=checkpointer, on_step=on_step, customize=customize)
    seconds = time.perf_counter() - t0
    best = best_epoch(history)
    # The same call finetune_classifier made, so these are the labels it trained on.
    used = splits.train_y[subsample_labels(splits.train_y, f.label_fraction, seed)]
    label_counts = {name: int(np.sum(used == i)) for i, name in enumerate(splits.class_names)}
    summary = {
        "model_version": weights_hash(model.state_dict()),
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "n_labeled": int(len(used)),
        "mode": f.mode,
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
