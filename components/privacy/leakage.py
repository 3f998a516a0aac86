"""Leakage: exact and near-duplicate images shared by train and test.

Duplicates inflate test accuracy and mean the "unseen" test set was seen.
Near-duplicates are found with a perceptual (average) hash as a cheap pre-filter,
then confirmed by the RMS pixel distance after removing each image's mean brightness.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.train.adversarial import as_tensor

HASH_SIDE = 8  # average hash of an 8x8 grayscale thumbnail: 64 bits


def average_hash(images: Any) -> np.ndarray:
    """64-bit average hash per image: grey 8x8 thumbnail, one bit per pixel above the thumbnail's mean.

    Robust to brightness/contrast changes, small noise and resizing; two images whose hashes
    differ in few bits *may* be near-duplicates (to be confirmed by pixel distance).
    """
    x = as_tensor(images, torch.float32)
    grey = x.mean(dim=1, keepdim=True)
    thumb = F.adaptive_avg_pool2d(grey, (HASH_SIDE, HASH_SIDE)).flatten(1)
    bits = (thumb > thumb.mean(dim=1, keepdim=True)).numpy().astype(np.uint64)
    weights = (np.uint64(1) << np.arange(HASH_SIDE * HASH_SIDE, dtype=np.uint64))
    return (bits * weights).sum(axis=1, dtype=np.uint64)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between every hash in ``a`` and every hash in ``b``: ``[len(a), len(b)]``."""
    xor = a[:, None] ^ b[None, :]
    return np.bitwise_count(xor).astype(np.int64)


def find_leaks(train_x: Any, test_x: Any, max_distance: float = 0.03, max_hash_bits: int = 12,
               chunk: int = 256) -> dict[str, Any]:
    """Exact and near-duplicate images shared by train and test.

    * **exact**: identical after rounding to 8-bit pixels (what a re-saved PNG keeps);
    * **near**: average hashes within ``max_hash_bits`` of 64 (the pre-filter that keeps this
      cheap on large sets) and RMS pixel distance, after subtracting each image's mean (so a
      brightness shift does not hide a copy), at most ``max_distance`` (pixels in [0, 1]).

    Each test image is counted once, with its closest train match. Returns ``n_exact``,
    ``n_near``, ``n_leaks`` (their sum), ``pairs`` (sorted by distance: ``test_index``,
    ``train_index``, ``distance``, ``hash_bits``, ``kind``), the thresholds, and
    ``nearest_distance`` (the smallest train-test distance among hash candidates, to show
    the margin when nothing leaks).
    """
    if not max_distance >= 0:
        raise ValueError(f"near-duplicate distance must be >= 0 (RMS pixel distance, pixels in [0, 1]), got {max_distance}")
    if not 0 <= max_hash_bits <= HASH_SIDE * HASH_SIDE:
        raise ValueError(f"max_hash_bits must be in 0..{HASH_SIDE * HASH_SIDE}, got {max_hash_bits}")
    train = as_tensor(train_x, torch.float32)
    test = as_tensor(test_x, torch.float32)
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train and test images differ in shape: {tuple(train.shape[1:])} vs {tuple(test.shape[1:])}")
    pairs: list[dict[str, Any]] = []
    nearest = math.inf
    if len(train) and len(test):
        # exact: byte-identical after 8-bit rounding
        as_bytes = lambda t: [row.tobytes() for row in (t.clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()]
        first_in_train: dict[bytes, int] = {}
        for i, key in enumerate(as_bytes(train)):
            first_in_train.setdefault(key, i)
        exact = {i: first_in_train[key] for i, key in enumerate(as_bytes(test)) if key in first_in_train}

        train_hash, test_hash = average_hash(train), average_hash(test)
        centred = lambda t: (t - t.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)
        train_c, test_c = centred(train), centred(test)
        dims = train_c.shape[1]
        for start in range(0, len(test), chunk):
            bits = _hamming(test_hash[start : start + chunk], train_hash)
            rows, cols = np.nonzero(bits <= max_hash_bits)
            if len(rows) == 0:
                continue
            # distances of candidate pairs only, in blocks to bound memory on large sets
            dist = np.empty(len(rows), dtype=np.float64)
            for b in range(0, len(rows), 65536):
                r, c = rows[b : b + 65536], cols[b : b + 65536]
                diff = test_c[start + torch.from_numpy(r)] - train_c[torch.from_numpy(c)]
                dist[b : b + 65536] = (diff.pow(2).sum(dim=1) / dims).sqrt().numpy()
            nearest = min(nearest, float(dist.min()))
            order = np.lexsort((dist, rows))  # by test image, closest candidate first
            first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
            for j in first:
                i = rows[j]
                t = start + int(i)
                if t in exact or dist[j] <= max_distance:
                    kind = "exact" if t in exact else "near"
                    train_index = exact[t] if t in exact else int(cols[j])
                    pairs.append({"test_index": t, "train_index": train_index,
                                  "distance": 0.0 if kind == "exact" else float(dist[j]),
                                  "hash_bits": int(bits[i, train_index]), "kind": kind})
        # An exact copy (after 8-bit rounding) can still miss the hash pre-filter when rounding flips
        # bits close to the thumbnail mean: list every exact match regardless.
        listed = {p["test_index"] for p in pairs}
        for t, j in exact.items():
            if t not in listed:
                bits_apart = int(np.bitwise_count(test_hash[t] ^ train_hash[j]))
                pairs.append({"test_index": t, "train_index": j, "distance": 0.0, "hash_bits": bits_apart, "kind": "exact"})
    pairs.sort(key=lambda p: (p["distance"], p["test_index"]))
    n_exact = sum(p["kind"] == "exact" for p in pairs)
    return {
        "n_exact_duplicates": n_exact,
        "n_near_duplicates": len(pairs) - n_exact,
        "n_leaks": len(pairs),
        "pairs": pairs,
        "near_duplicate_distance": float(max_distance),
        "max_hash_bits": int(max_hash_bits),
        "nearest_distance": nearest if math.isfinite(nearest) else None,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
    }
