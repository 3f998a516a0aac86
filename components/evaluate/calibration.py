"""Calibration: does the confidence a classifier states match the accuracy it delivers?

Reliability bins (equal-width confidence bins), the expected calibration error
(ECE) over them, and the reliability diagram as inline SVG for the report.
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
    """ECE, the reliability bins and the mean confidence of a classifier's softmax outputs [N, K]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {
        "ece": expected_calibration_error(confidences, correct, n_bins),
        "n_bins": n_bins,
        "mean_confidence": float(confidences.mean()) if len(confidences) else 0.0,
        "bins": reliability_bins(confidences, correct, n_bins),
    }


def render_reliability_svg(bins: list[dict[str, float]], ece: float, size: int = 320) -> str:
    """A reliability diagram as inline SVG: accuracy per confidence bin against the diagonal of perfect calibration.

    Blue bars are the accuracy of each non-empty bin, red outlines the gap to the
    bin's mean confidence; hover a bar for its numbers.
    """
    pad, plot = 40, size - 60  # left/bottom margin for the axes, square plotting area
    x0, y0 = pad, 10  # top-left corner of the plot

    def px(v: float) -> float:
        return x0 + v * plot

    def py(v: float) -> float:
        return y0 + (1 - v) * plot

    parts = [f'<svg class="reliability" width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
             f'aria-label="Reliability diagram, ECE {ece:.4f}">',
             f'<rect x="{x0}" y="{y0}" width="{plot}" height="{plot}" fill="#fff" stroke="#d0d7de"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{px(tick):.1f}" y1="{py(0):.1f}" x2="{px(tick):.1f}" y2="{py(0) + 4:.1f}" stroke="#57606a"/>'
                     f'<text x="{px(tick):.1f}" y="{py(0) + 16:.1f}" font-size="10" text-anchor="middle">{tick:g}</text>'
                     f'<line x1="{px(0) - 4:.1f}" y1="{py(tick):.1f}" x2="{px(0):.1f}" y2="{py(tick):.1f}" stroke="#57606a"/>'
                     f'<text x="{px(0) - 6:.1f}" y="{py(tick) + 3:.1f}" font-size="10" text-anchor="end">{tick:g}</text>')
    for b in bins:
        if not b["count"]:
            continue
        left, width = px(b["lower"]), (b["upper"] - b["lower"]) * plot
        tip = (f"confidence {b['lower']:.2f}-{b['upper']:.2f}: {b['count']} predictions, "
               f"mean confidence {b['confidence']:.3f}, accuracy {b['accuracy']:.3f}")
        parts.append(f'<rect class="bar" x="{left:.1f}" y="{py(b["accuracy"]):.1f}" width="{width:.1f}" '
                     f'height="{b["accuracy"] * plot:.1f}" fill="#0969da" fill-opacity="0.75" stroke="#fff">'
                     f'<title>{tip}</title></rect>')
        low, high = sorted((b["accuracy"], b["confidence"]))
        if high - low > 1e-9:
            parts.append(f'<rect class="gap" x="{left:.1f}" y="{py(high):.1f}" width="{width:.1f}" '
                         f'height="{(high - low) * plot:.1f}" fill="#cf222e" fill-opacity="0.2" stroke="#cf222e"/>')
    parts += [
        f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#57606a" stroke-dasharray="4 3"/>',
        f'<text x="{px(0.5):.1f}" y="{size - 8}" font-size="11" text-anchor="middle">confidence (max softmax probability)</text>',
        f'<text x="12" y="{py(0.5):.1f}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {py(0.5):.1f})">accuracy</text>',
        f'<text x="{px(0) + 6}" y="{y0 + 16}" font-size="12">ECE {ece:.4f}</text>',
        "</svg>",
    ]
    return "\n".join(parts)
