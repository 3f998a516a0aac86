"""Calibration: does the confidence a classifier states match the accuracy it delivers?

Reliability bins (equal-width confidence bins) and the expected calibration error
(ECE) over them; the per-prediction confidences stay in the result for the report's
reliability diagram (``components.core.plots.reliability_diagram``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


def _bin_index(confidences: np.ndarray, n_bins: int) -> np.ndarray:
    # Bins are (k/n, (k+1)/n]; a confidence of exactly 0 goes to the first bin.
    return np.clip(np.ceil(np.asarray(confidences, dtype=np.float64) * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width confidence bin: its edges, how many predictions fell in it, their mean confidence and accuracy."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidences.shape != correct.shape or confidences.ndim != 1:
        raise ValueError(f"confidences {confidences.shape} and correct {correct.shape} must be 1-D and the same length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if len(confidences) and (confidences.min() < 0 or confidences.max() > 1):
        raise ValueError("confidences must lie in [0, 1] (they are probabilities)")
    index = _bin_index(confidences, n_bins)
    bins = []
    for k in range(n_bins):
        members = index == k
        count = int(members.sum())
        bins.append({
            "lower": k / n_bins, "upper": (k + 1) / n_bins, "count": count,
            "confidence": float(confidences[members].mean()) if count else 0.0,
            "accuracy": float(correct[members].mean()) if count else 0.0,
        })
    return bins


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap |accuracy - confidence| over equal-width confidence bins.

    0 means the confidence the model states is the accuracy it delivers; a model
    that says 90 % but is right 60 % of the time has an ECE of 0.3.
    """
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def calibration(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, the reliability bins and the mean confidence of a classifier's softmax outputs [N, K], plus each
    prediction's ``confidences`` and whether it was ``correct`` (the reliability diagram bins them its own way)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {
        "ece": expected_calibration_error(confidences, correct, n_bins),
        "n_bins": n_bins,
        "mean_confidence": float(confidences.mean()) if len(confidences) else 0.0,
        "bins": reliability_bins(confidences, correct, n_bins),
        "confidences": [round(float(c), 6) for c in confidences],
        "correct": [bool(c) for c in correct],
    }
