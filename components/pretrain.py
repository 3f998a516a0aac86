"""Pretrain step: self-supervised pretraining of the encoder on unlabeled images.

Sees the pool plus the train images with their labels unused. Writes an
encoder artifact (``encoder.safetensors`` + ``metadata.json``) that the
finetune step starts from.
"""

import time
from pathlib import Path

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pipelines.config import PretrainConfig

_DEFAULTS = PretrainConfig()


def pretrain(dataset_dir: str | Path, out_dir: str | Path, objective: str = _DEFAULTS.objective,
             epochs: int = _DEFAULTS.epochs, batch_size: int = _DEFAULTS.batch_size,
             learning_rate: float = _DEFAULTS.learning_rate, temperature: float = _DEFAULTS.temperature,
             width: int = _DEFAULTS.width, embed_dim: int = _DEFAULTS.embed_dim, seed: int = 0,
             log=print) -> dict:
    """Pretrain an encoder on the dataset's unlabeled images and save it to ``out_dir``.

    Returns a summary: objective, epochs, first and final loss, n_images, seconds.
    """
    from components.data import load_splits
    from components.models import EncoderSpec, save_encoder
    from components.training import pretrain_encoder

    splits = load_splits(dataset_dir)
    images = splits.unlabeled()
    channels, height, width_px = images.shape[1:]
    if height != width_px:
        raise ValueError(f"the encoder expects square images, got {height}x{width_px}; set an image size at ingest")
    spec = EncoderSpec(in_channels=int(channels), image_size=int(height), width=width, embed_dim=embed_dim)

    t0 = time.perf_counter()
    encoder, history = pretrain_encoder(images, spec, objective, epochs, batch_size, learning_rate,
                                        temperature, seed, log=log)
    seconds = time.perf_counter() - t0
    summary = {
        "objective": objective,
        "epochs": epochs,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "n_images": len(images),
        "seconds": seconds,
    }
    save_encoder(encoder, out_dir, {
        **summary,
        "seed": seed,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "temperature": temperature,
        "history": history,
    })
    return summary


def pretrain_component(
    dataset: Input[Dataset],
    objective: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    temperature: float,
    width: int,
    embed_dim: int,
    seed: int,
    encoder: Output[Model],
    metrics: Output[Metrics],
):
    """Self-supervised pretraining of the image encoder on the unlabeled pool plus train images.

    Args:
        dataset: The dataset artifact written by ingest.
        objective: 'contrastive' (SimCLR NT-Xent) or 'masked' (masked-image reconstruction).
        epochs: Pretraining epochs over the unlabeled images.
        batch_size: Images per batch (contrastive learning sees two views of each).
        learning_rate: AdamW learning rate.
        temperature: NT-Xent temperature (contrastive objective only).
        width: Channels of the first encoder block; later blocks double it.
        embed_dim: Size of the encoder's output embedding.
        seed: Seed of initialisation, batch order and augmentations.
        encoder: Output directory for the encoder weights (safetensors) and metadata.
        metrics: Pretraining loss, image count and the step's cost.
    """
    import os

    from components.cost import log_metrics, measure
    from components.pretrain import pretrain

    os.makedirs(encoder.path, exist_ok=True)
    with measure() as cost:
        summary = pretrain(dataset.path, encoder.path, objective=objective, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, temperature=temperature, width=width,
                           embed_dim=embed_dim, seed=seed, log=lambda line: print(line, flush=True))
    encoder.metadata.update({"objective": objective, "final_loss": summary["final_loss"]})
    log_metrics(metrics, {
        "pretrain_first_loss": summary["first_loss"],
        "pretrain_final_loss": summary["final_loss"],
        "pretrain_epochs": summary["epochs"],
        "n_images": summary["n_images"],
        **cost.as_metrics(),
    })
