"""Finetune step: train encoder + linear head on the labeled train split.

Starts from the pretrained encoder, early-stops on the validation loss, and
writes the classifier artifact (``model.safetensors`` + ``metadata.json``) that
evaluate, the audits and the serving handler load.
"""

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pipelines.config import FinetuneConfig

_DEFAULTS = FinetuneConfig()


def weights_hash(state_dict) -> str:
    """A short content hash of a model's weights: same weights, same version."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


def finetune(dataset_dir: str | Path, encoder_dir: str | Path, out_dir: str | Path,
             epochs: int = _DEFAULTS.epochs, batch_size: int = _DEFAULTS.batch_size,
             learning_rate: float = _DEFAULTS.learning_rate, patience: int = _DEFAULTS.patience,
             label_fraction: float = _DEFAULTS.label_fraction, seed: int = 0, log=print) -> dict:
    """Fine-tune a classifier from a pretrained encoder and save it to ``out_dir``.

    Returns a summary: model_version, val_accuracy, val_loss, best_epoch,
    epochs_run, n_labeled, seconds.
    """
    import numpy as np

    from components.data import load_splits
    from components.models import load_encoder, save_classifier
    from components.training import best_epoch, finetune_classifier, subsample_labels

    splits = load_splits(dataset_dir)
    encoder, encoder_meta = load_encoder(encoder_dir)

    t0 = time.perf_counter()
    model, history = finetune_classifier(encoder, splits, epochs, batch_size, learning_rate, patience,
                                         label_fraction, seed, log=log)
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
        "seconds": seconds,
    }
    save_classifier(model, out_dir, {
        **summary,
        "class_names": list(splits.class_names),
        "label_counts": label_counts,
        "label_fraction": label_fraction,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "patience": patience,
        "pretrain": {k: encoder_meta.get(k) for k in ("objective", "epochs", "final_loss", "seed", "n_images")},
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "history": history,
    })
    return {**summary, "label_counts": label_counts}


def finetune_component(
    dataset: Input[Dataset],
    encoder: Input[Model],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    label_fraction: float,
    seed: int,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Fine-tune the pretrained encoder plus a linear head on the labeled train split.

    Args:
        dataset: The dataset artifact written by ingest.
        encoder: The encoder artifact written by pretrain.
        epochs: Maximum fine-tuning epochs; early stopping usually ends sooner.
        batch_size: Images per batch.
        learning_rate: AdamW learning rate of the head; the encoder uses a tenth of it.
        patience: Stop after this many epochs without a better validation loss.
        label_fraction: Share of the labeled train split to train on (stratified, at least one per class).
        seed: Seed of the head initialisation, label subsample, batch order and augmentations.
        model: Output directory for the classifier weights (safetensors) and metadata.
        metrics: Validation accuracy and loss, best epoch, label count and the step's cost.
    """
    import os

    from components.cost import log_metrics, measure
    from components.finetune import finetune

    os.makedirs(model.path, exist_ok=True)
    with measure() as cost:
        summary = finetune(dataset.path, encoder.path, model.path, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, patience=patience, label_fraction=label_fraction,
                           seed=seed, log=lambda line: print(line, flush=True))
    model.metadata.update({"model_version": summary["model_version"], "val_accuracy": summary["val_accuracy"]})
    log_metrics(metrics, {
        "val_accuracy": summary["val_accuracy"],
        "val_loss": summary["val_loss"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "n_labeled": summary["n_labeled"],
        **cost.as_metrics(),
    })
