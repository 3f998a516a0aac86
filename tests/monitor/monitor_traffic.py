"""Traffic for the monitor's tests: request-log records as the serving handler writes them, and the shifts
that production images undergo (inverted, noised, rotated, a different kind of image)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.datasets import load_sample_images

from components.core.features import FEATURE_COLUMNS, model_reference_features
from components.monitor.guards import MODEL_COLUMNS

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def served(model, images: np.ndarray) -> pd.DataFrame:
    """What the serving handler logs for these images: features, prediction, confidence, embedding projection."""
    return model_reference_features(model, images)


def log_records(features: pd.DataFrame, start: datetime, step_s: float = 1.0, model_version: str = "1",
                source: str = "client") -> list[dict]:
    """Request-log records as the serving handler writes them (model columns when the frame has them)."""
    model_columns = [c for c in MODEL_COLUMNS if c in features.columns]
    records = []
    for i, row in enumerate(features.to_dict(orient="records")):
        record = {"timestamp": (start + timedelta(seconds=i * step_s)).isoformat(timespec="milliseconds"),
                  "model_version": model_version, "source": source, "predicted_class": 3, "predicted_label": "3",
                  "confidence": 0.9, **{c: float(row[c]) for c in FEATURE_COLUMNS}}
        for c in model_columns:
            record[c] = int(row[c]) if c == "predicted_class" else float(row[c])
        records.append(record)
    return records


def write_log(path: Path, records: list[dict], tail: str = "", compact: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if compact else None
    path.write_text("".join(json.dumps(r, separators=separators) + "\n" for r in records) + tail)
    return path



# --- the shifts -------------------------------------------------------------------------------


def invert(x, rng):
    return 1.0 - x


def add_noise(x, rng):
    return np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0).astype(np.float32)


def rotate_30(x, rng):
    return np.clip(ndimage.rotate(x, 30, axes=(3, 2), reshape=False, order=1), 0.0, 1.0)


def rotate_90(x, rng):
    return np.rot90(x, 1, axes=(2, 3)).copy()


def photo_patches(x, rng):
    """A different kind of image: 8x8 grey thumbnails of patches of a photo."""
    photo = load_sample_images().images[0].mean(axis=2) / 255.0  # china.jpg, [427, 640]
    out = np.empty_like(x)
    for i in range(len(x)):
        r, c = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        out[i, 0] = photo[r:r + 32, c:c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return out
