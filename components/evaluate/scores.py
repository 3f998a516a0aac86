"""Classification scores from a confusion matrix: accuracy, macro F1, per-class precision/recall/F1/support."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts shaped [true class, predicted class]."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # A class never predicted (or absent) scores 0, as scikit-learn's zero_division=0 does.
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def classification_scores(matrix: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision/recall/F1/support from a confusion matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    precision = _safe_divide(hits, matrix.sum(axis=0))
    recall = _safe_divide(hits, matrix.sum(axis=1))
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    total = matrix.sum()
    return {
        "test_accuracy": float(hits.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, matrix.sum(axis=1))
        ],
    }
