"""Per-image summary features: what the monitor compares between training and production.

Computed in exactly one place so that the reference (written by ingest at
training time) and the serving request log (written by the TorchServe handler)
can never disagree on a definition. Cheap enough to run on the request path.
"""

from __future__ import annotations

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
