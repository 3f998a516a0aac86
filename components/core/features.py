"""Per-image summary features: what the monitor compares between training and production.

Computed in exactly one place so that the reference (written by ingest at
training time) and the serving request log (written by the TorchServe handler)
can never disagree on a definition. Cheap enough to run on the request path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

FEATURE_COLUMNS = [
    "pixel_mean",  # overall brightness
    "pixel_std",  # contrast
    "pixel_min",
    "pixel_max",
    "ink_fraction",  # share of pixels brighter than 0.5: how much of the image is "drawn"
    "edge_strength",  # mean absolute gradient: sharpness / noise
    "center_mass_x",  # horizontal centre of brightness in [0, 1]
    "center_mass_y",  # vertical centre of brightness in [0, 1]
]


def image_features(images: np.ndarray) -> pd.DataFrame:
    """Summary features of a batch of images shaped ``[N, C, H, W]`` with pixels in ``[0, 1]``."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected images shaped [N, C, H, W], got shape {x.shape}")
    # Served images arrive as 8-bit PNG/JPEG: quantise the float training images the same way,
    # or thresholded features (ink_fraction) shift between training and production for no reason.
    x = np.rint(np.clip(x, 0.0, 1.0) * 255.0) / 255.0
    gray = x.mean(axis=1)  # [N, H, W]
    n, h, w = gray.shape
    flat = gray.reshape(n, -1)
    gx = np.abs(np.diff(gray, axis=2)).reshape(n, -1).mean(axis=1) if w > 1 else np.zeros(n, np.float32)
    gy = np.abs(np.diff(gray, axis=1)).reshape(n, -1).mean(axis=1) if h > 1 else np.zeros(n, np.float32)
    total = flat.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h
    cx = np.where(total > 0, (gray.sum(axis=1) * xs).sum(axis=1) / safe_total, 0.5)
    cy = np.where(total > 0, (gray.sum(axis=2) * ys).sum(axis=1) / safe_total, 0.5)
    return pd.DataFrame(
        {
            "pixel_mean": flat.mean(axis=1),
            "pixel_std": flat.std(axis=1),
            "pixel_min": flat.min(axis=1),
            "pixel_max": flat.max(axis=1),
            "ink_fraction": (flat > 0.5).mean(axis=1),
            "edge_strength": (gx + gy) / 2,
            "center_mass_x": cx,
            "center_mass_y": cy,
        },
        columns=FEATURE_COLUMNS,
    ).astype("float64")


# --- model-side features: what the served model saw and said ---------------------------------

EMBEDDING_DIM = 8  # columns emb_0 .. emb_7: a fixed random projection of the encoder's embedding
EMBEDDING_COLUMNS = [f"emb_{i}" for i in range(EMBEDDING_DIM)]
PREDICTION_COLUMNS = ["predicted_class", "confidence"]
MODEL_REFERENCE_FILE = "reference_model.csv"  # written into the model artifact at training time


def embedding_projection(embeddings: np.ndarray, dim: int = EMBEDDING_DIM) -> np.ndarray:
    """Project ``[N, D]`` embeddings to ``[N, dim]`` with a fixed Gaussian matrix.

    The matrix depends only on ``(D, dim)`` (seeded), so the handler and the
    training-time reference project identically without storing anything.
    Random projections keep distances roughly (Johnson-Lindenstrauss), which
    is what an embedding-drift test needs, at a cost of 8 numbers a request.
    """
    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"expected embeddings shaped [N, D], got {z.shape}")
    rng = np.random.default_rng(z.shape[1] * 1000 + dim)
    matrix = rng.standard_normal((z.shape[1], dim)) / np.sqrt(dim)
    return z @ matrix


def model_reference_features(model, images: np.ndarray, batch_size: int = 512) -> pd.DataFrame:
    """Image features plus the model's prediction, confidence and projected embedding for each image.

    ``model`` is a ``components.core.models.Classifier``. Written once at training time
    (on held-out images) as the reference for prediction and embedding drift.
    """
    import torch

    x = np.asarray(images, dtype=np.float32)
    # the same 8-bit quantisation the served images go through
    x = np.rint(np.clip(x, 0.0, 1.0) * 255.0) / 255.0
    was_training = model.training
    model.eval()
    embeddings, probs = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start:start + batch_size].astype(np.float32))
            z = model.embed(batch)
            embeddings.append(z.numpy())
            probs.append(torch.softmax(model.head(z), dim=1).numpy())
    model.train(was_training)
    z = np.concatenate(embeddings) if embeddings else np.zeros((0, model.head.in_features))
    p = np.concatenate(probs) if probs else np.zeros((0, model.head.out_features))
    out = image_features(x)
    out["predicted_class"] = p.argmax(axis=1).astype("int64") if len(p) else np.zeros(0, "int64")
    out["confidence"] = p.max(axis=1) if len(p) else np.zeros(0)
    projected = embedding_projection(z)
    for i, col in enumerate(EMBEDDING_COLUMNS):
        out[col] = projected[:, i]
    return out


def write_model_reference(model_dir: str | Path, images: np.ndarray) -> Path:
    """Write ``reference_model.csv`` into a model artifact: the training-time reference for prediction
    and embedding drift, from held-out images (the validation split) the model did not train on.

    Finetune calls it after saving the classifier: ``write_model_reference(out_dir, splits.val_x)``.
    """
    from components.core.localfiles import atomic_write_text
    from components.core.models import load_classifier

    images = np.asarray(images)
    if images.ndim != 4 or len(images) < 30:
        raise ValueError(f"the model reference needs at least 30 held-out images shaped [N, C, H, W], got "
                         f"shape {images.shape}; use the validation split")
    model, _ = load_classifier(model_dir)
    path = Path(model_dir) / MODEL_REFERENCE_FILE
    table = model_reference_features(model, images).to_csv(index=False)
    atomic_write_text(path, table)
    return path
