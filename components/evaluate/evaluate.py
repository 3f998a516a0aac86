"""Evaluate step: test-set accuracy, macro F1, per-class precision/recall, the
confusion matrix, calibration (ECE and a reliability diagram), saliency maps, a
comparison with the model in production (champion/challenger) and the release gate.

Everything lands in one self-contained HTML report (inline SVG and PNG data
URIs, no external assets) that the KFP UI shows as the step's HTML artifact.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FILE = "evaluation.json"
REPORT_FILE = "report.html"
ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017
SALIENCY_EXAMPLES = 8  # test images explained in the report: mistakes first, then correct ones
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15  # noise std as a share of the pixel range [0, 1]
GATE_EPSILON = 1e-9  # accuracies are k/n fractions: "equal" must compare equal despite float rounding


# ---------------------------------------------------------------------------
# Classification scores
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Saliency
# ---------------------------------------------------------------------------


def saliency_maps(model, images, targets=None, samples: int = SMOOTHGRAD_SAMPLES, noise: float = SMOOTHGRAD_NOISE,
                  seed: int = 0) -> np.ndarray:
    """Gradient of the target logit with respect to each input pixel, as |grad| maxed over channels: [N, H, W].

    ``targets`` defaults to the predicted class of each image. ``samples=0`` is
    the vanilla gradient; ``samples>0`` is SmoothGrad (Smilkov et al. 2017):
    the mean gradient over that many copies with Gaussian noise of std
    ``noise`` (pixels are in [0, 1]), which removes most of the speckle of a
    single gradient. Model weights are left untouched (no .grad is written).
    """
    import torch

    device = next(model.parameters()).device
    x = (images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))).float().to(device)
    if x.ndim != 4:
        raise ValueError(f"images must be shaped [N, C, H, W], got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if targets is None:
                targets = model(x).argmax(dim=1)
        targets = torch.as_tensor(targets, dtype=torch.long, device=device)
        n = len(x)
        if samples > 0:
            g = torch.Generator(device="cpu").manual_seed(seed)
            jitter = torch.randn((samples, *x.shape), generator=g).to(device) * noise
            batch = (x.unsqueeze(0) + jitter).reshape(samples * n, *x.shape[1:])
            batch_targets = targets.repeat(samples)
        else:
            batch, batch_targets = x, targets
        batch = batch.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(batch)
            chosen = logits.gather(1, batch_targets[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, batch)
        if samples > 0:
            grad = grad.reshape(samples, n, *x.shape[1:]).mean(dim=0)
        return grad.abs().amax(dim=1).cpu().numpy()
    finally:
        model.train(was_training)


def pick_examples(y_true: np.ndarray, y_pred: np.ndarray, confidences: np.ndarray, n: int = SALIENCY_EXAMPLES) -> list[int]:
    """Test images worth explaining: up to half the most confident mistakes, the rest the most confident correct ones
    of as many different classes as possible. Deterministic."""
    y_true, y_pred, confidences = np.asarray(y_true), np.asarray(y_pred), np.asarray(confidences)
    order = np.argsort(-confidences, kind="stable")
    wrong = [int(i) for i in order if y_true[i] != y_pred[i]]
    right = [int(i) for i in order if y_true[i] == y_pred[i]]
    chosen = wrong[: n // 2]
    seen_classes: set[int] = set()
    for i in right:  # one per class first, then whatever is most confident
        if len(chosen) >= n:
            break
        if int(y_true[i]) not in seen_classes:
            seen_classes.add(int(y_true[i]))
            chosen.append(i)
    for i in right + wrong:
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


# Anchor colours of a perceptually ordered dark-to-bright heat map (close to matplotlib's "inferno").
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def heatmap_rgb(values: np.ndarray) -> np.ndarray:
    """Map a 2-D array to uint8 RGB [H, W, 3], scaled so its maximum is the brightest colour."""
    values = np.asarray(values, dtype=np.float64)
    top = values.max() if values.size else 0.0
    t = np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)
    pos = t * (len(_HEAT) - 1)
    low = np.clip(np.floor(pos).astype(int), 0, len(_HEAT) - 2)
    frac = (pos - low)[..., None]
    return np.round(_HEAT[low] * (1 - frac) + _HEAT[low + 1] * frac).astype(np.uint8)


def png_data_uri(pixels: np.ndarray, size: int = 96) -> str:
    """A ``data:image/png;base64,...`` URI of an image, upscaled with nearest neighbour to about ``size`` pixels.

    ``pixels``: uint8 [H, W, 3] RGB, or float [C, H, W] / [H, W] in [0, 1] (C = 1 or 3).
    """
    from PIL import Image

    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        if a.ndim == 3 and a.shape[0] in (1, 3):
            a = a.transpose(1, 2, 0)
        a = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
    image = Image.fromarray(a)
    scale = max(1, size // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def saliency_examples(model, x: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                      n: int = SALIENCY_EXAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """SmoothGrad maps of the predicted logit for ``n`` picked test images, ready for the report."""
    if n <= 0 or len(x) == 0:
        return []
    y_pred, confidences = probabilities.argmax(axis=1), probabilities.max(axis=1)
    chosen = pick_examples(y_true, y_pred, confidences, n)
    maps = saliency_maps(model, x[chosen], targets=y_pred[chosen], seed=seed)
    return [{
        "index": i,
        "true": class_names[int(y_true[i])],
        "predicted": class_names[int(y_pred[i])],
        "confidence": float(confidences[i]),
        "correct": bool(y_true[i] == y_pred[i]),
        "image_png": png_data_uri(x[i]),
        "saliency_png": png_data_uri(heatmap_rgb(saliency)),
    } for i, saliency in zip(chosen, maps)]


# ---------------------------------------------------------------------------
# Scoring a model
# ---------------------------------------------------------------------------


def evaluate(dataset_dir: str | Path, model_dir: str | Path, out_dir: str | Path | None = None,
             explain: int = SALIENCY_EXAMPLES) -> dict[str, Any]:
    """Score a classifier artifact on the dataset's test split.

    Returns ``test_accuracy``, ``macro_f1``, ``per_class`` (list of
    ``{class, precision, recall, f1, support}``), ``confusion_matrix`` (list of
    lists, rows = true class, columns = predicted), ``calibration`` (``ece``,
    ``bins``, ...), ``saliency`` (``explain`` picked test images with PNG data
    URIs of the image and its SmoothGrad map), ``class_names``, ``n_test`` and
    ``model_version``. With ``out_dir``, also writes ``evaluation.json`` and
    ``report.html`` there.
    """
    import torch

    from components.core.data import load_splits
    from components.core.models import load_classifier
    from components.train.training import pick_device, predict_logits

    splits = load_splits(dataset_dir)
    device = pick_device()
    model, meta = load_classifier(model_dir, device=device)
    if list(meta["class_names"]) != list(splits.class_names):
        raise ValueError(f"the model was trained on classes {meta['class_names']} but the dataset has "
                         f"{splits.class_names}; evaluate a model fine-tuned on this dataset")
    if len(splits.test_y) == 0:
        raise ValueError("the test split is empty; raise the test fraction at ingest")

    probabilities = torch.softmax(predict_logits(model, splits.test_x, device=device), dim=1).numpy()
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(splits.test_y, predictions, len(splits.class_names))
    result = {
        **classification_scores(matrix, splits.class_names),
        "confusion_matrix": matrix.tolist(),
        "calibration": calibration(probabilities, splits.test_y),
        "saliency": saliency_examples(model, splits.test_x, splits.test_y, probabilities, list(splits.class_names), explain),
        "class_names": list(splits.class_names),
        "n_test": int(len(splits.test_y)),
        "model_version": str(meta.get("model_version", "unknown")),
    }
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def write_result(result: dict[str, Any], out_dir: str | Path) -> None:
    """The result as JSON (written atomically) and the HTML report next to it."""
    from components.core.models import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_FILE, result)
    (out / REPORT_FILE).write_text(render_report_html(result), encoding="utf-8")


# ---------------------------------------------------------------------------
# Champion/challenger and the release gate
# ---------------------------------------------------------------------------


def compare_with_champion(challenger: dict[str, Any], champion: dict[str, Any] | None, max_regression: float,
                          champion_info: dict[str, Any] | None = None, skip_reason: str = "") -> dict[str, Any]:
    """The champion check: may the challenger replace the model in production?

    ``champion`` is the champion's ``evaluate`` result on the same test split,
    or None (none in production, not comparable, or disabled: ``skip_reason``
    says which). It passes when the challenger's accuracy is at least the
    champion's minus ``max_regression`` (a negative ``max_regression`` demands
    an improvement of at least that much).
    """
    info = champion_info or {}
    check: dict[str, Any] = {"max_regression": float(max_regression),
                             "challenger_accuracy": challenger["test_accuracy"],
                             "challenger_model_version": challenger.get("model_version", "unknown"),
                             "challenger_macro_f1": challenger.get("macro_f1"),
                             "challenger_ece": (challenger.get("calibration") or {}).get("ece")}
    if champion is None:
        return {**check, "status": info.get("status", "no_champion"), "passed": True,
                "reason": skip_reason or "no model in production", **{k: v for k, v in info.items() if k != "status"}}
    threshold = champion["test_accuracy"] - max_regression
    passed = challenger["test_accuracy"] >= threshold - GATE_EPSILON
    version = champion.get("model_version", "unknown")
    if passed:
        reason = (f"challenger accuracy {challenger['test_accuracy']:.4f} >= champion accuracy "
                  f"{champion['test_accuracy']:.4f} - max_regression {max_regression:.4f} (champion version {version})")
    else:
        reason = (f"challenger accuracy {challenger['test_accuracy']:.4f} is below champion accuracy "
                  f"{champion['test_accuracy']:.4f} - max_regression {max_regression:.4f} = {threshold:.4f}: "
                  f"the model in production (version {version}) stays")
    return {
        **check, **info, "status": "compared", "passed": passed, "reason": reason,
        "champion_accuracy": champion["test_accuracy"], "champion_macro_f1": champion["macro_f1"],
        "champion_ece": champion["calibration"]["ece"], "champion_model_version": version,
    }


def release_gate(result: dict[str, Any], min_test_accuracy: float, champion_check: dict[str, Any]) -> dict[str, Any]:
    """The evaluate gate: accuracy >= ``min_test_accuracy`` AND the champion check passed."""
    accuracy_ok = result["test_accuracy"] >= min_test_accuracy - GATE_EPSILON
    accuracy_reason = (f"test accuracy {result['test_accuracy']:.4f} {'>=' if accuracy_ok else '<'} "
                       f"min_test_accuracy {min_test_accuracy:.4f}")
    passed = accuracy_ok and champion_check["passed"]
    failing = [r for ok, r in ((accuracy_ok, accuracy_reason), (champion_check["passed"], champion_check["reason"])) if not ok]
    return {
        "passed": passed,
        "reason": "; ".join(failing) if failing else f"{accuracy_reason}; {champion_check['reason']}",
        "min_test_accuracy": float(min_test_accuracy),
        "accuracy_passed": accuracy_ok,
        "champion": champion_check,
    }


def evaluate_and_gate(dataset_dir: str | Path, model_dir: str | Path, min_test_accuracy: float, max_regression: float,
                      champion_model: str = "serving", serving_home: str | Path | None = None,
                      out_dir: str | Path | None = None, explain: int = SALIENCY_EXAMPLES,
                      model_store_uri: str = "") -> dict[str, Any]:
    """Score the challenger, find and score the champion on the same test split, and decide the release.

    ``champion_model``: ``"serving"`` (the model served from ``serving_home``), ``"store"``
    (the latest release in ``model_store_uri``), ``"none"`` to skip the comparison, or a
    model dir, a .mar or a storage release (local dir or ``s3://`` base URI, optionally
    ending in ``/latest``); see :func:`components.evaluate.champion.resolve_champion`.
    Returns the ``evaluate`` result plus ``gate`` (see :func:`release_gate`).
    """
    import tempfile

    from components.core.data import load_splits
    from components.evaluate.champion import ChampionNotComparable, check_comparable, resolve_champion

    if not -1.0 <= max_regression <= 1.0:
        raise ValueError(f"max_regression must be in [-1, 1] (an accuracy difference), got {max_regression}")
    if not 0.0 <= min_test_accuracy <= 1.0:
        raise ValueError(f"min_test_accuracy must be in [0, 1], got {min_test_accuracy}")
    result = evaluate(dataset_dir, model_dir, explain=explain)
    with tempfile.TemporaryDirectory(prefix="champion-") as work:
        found = resolve_champion(champion_model, serving_home, Path(work), model_store_uri=model_store_uri)
        if found.model_dir is None:
            check = compare_with_champion(result, None, max_regression, found.info(), found.reason)
        else:
            try:
                check_comparable(found.model_dir, load_splits(dataset_dir))
            except ChampionNotComparable as err:
                check = compare_with_champion(result, None, max_regression, {**found.info(), "status": "not_comparable"},
                                              f"champion not comparable, check skipped: {err}")
            else:
                print(f"[evaluate] scoring the champion from {found.source} on the same test split", flush=True)
                champion = evaluate(dataset_dir, found.model_dir, explain=0)
                check = compare_with_champion(result, champion, max_regression, found.info())
    result["gate"] = release_gate(result, min_test_accuracy, check)
    if out_dir is not None:
        write_result(result, out_dir)
    return result


# ---------------------------------------------------------------------------
# The HTML report
# ---------------------------------------------------------------------------


def _cell_colour(share: float, diagonal: bool) -> str:
    # Correct predictions in green, mistakes in red; the stronger the share of the true class, the darker.
    rgb = "46, 160, 67" if diagonal else "215, 58, 73"
    return f"rgba({rgb}, {0.08 + 0.85 * share:.3f})" if share > 0 else "#fff"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _render_gate(gate: dict[str, Any]) -> str:
    esc = html.escape
    check = gate["champion"]
    verdict = "PASSED" if gate["passed"] else "BLOCKED"
    rows = [f"<tr><th>minimum test accuracy</th><td>{gate['min_test_accuracy']:.4f}</td>"
            f"<td>{'passed' if gate['accuracy_passed'] else 'FAILED'}</td></tr>",
            f"<tr><th>champion check (max regression {check['max_regression']:.4f})</th>"
            f"<td>{esc(str(check['status']))}</td><td>{'passed' if check['passed'] else 'FAILED'}</td></tr>"]
    details = f'<p>Champion check: {esc(check["reason"])}</p>' if check["reason"] not in gate["reason"] else ""
    out = [f'<h2>Release gate: <span class="{verdict.lower()}">{verdict}</span></h2>',
           f'<p class="reason">{esc(gate["reason"])}</p>',
           "<table><caption>Conditions</caption><tr><th>condition</th><th>value</th><th>result</th></tr>",
           *rows, "</table>", details]
    if check["status"] == "compared":
        def row(name: str, champ: Any, chall: Any, fmt: str, higher_is_better: bool = True) -> str:
            if not all(isinstance(v, (int, float)) for v in (champ, chall)):
                return f"<tr><th>{name}</th><td>{_number(champ, fmt)}</td><td>{_number(chall, fmt)}</td><td>–</td></tr>"
            delta = chall - champ
            good = delta >= 0 if higher_is_better else delta <= 0
            return (f"<tr><th>{name}</th><td>{_number(champ, fmt)}</td><td>{_number(chall, fmt)}</td>"
                    f'<td class="{"better" if good else "worse"}">{delta:+.4f}</td></tr>')
        out += [
            "<table><caption>Champion (in production) vs challenger (this run), same test split</caption>",
            "<tr><th></th><th>champion</th><th>challenger</th><th>challenger - champion</th></tr>",
            f"<tr><th>model version</th><td><code>{esc(str(check['champion_model_version']))}</code></td>"
            f"<td><code>{esc(str(check['challenger_model_version']))}</code></td><td></td></tr>",
            row("test accuracy", check["champion_accuracy"], check["challenger_accuracy"], ".4f"),
            row("macro F1", check["champion_macro_f1"], check["challenger_macro_f1"], ".4f"),
            row("ECE (lower is better)", check["champion_ece"], check["challenger_ece"], ".4f",
                higher_is_better=False),
            "</table>",
        ]
    if check.get("source"):
        out.append(f'<p class="note">Champion looked up at <code>{esc(str(check["source"]))}</code>.</p>')
    return "\n".join(out)


def _render_saliency(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return ""
    esc = html.escape
    cards = []
    for e in examples:
        label = f"true {e['true']}, predicted {e['predicted']} ({e['confidence']:.0%})"
        cards.append(
            f'<figure class="{"correct" if e["correct"] else "wrong"}">'
            f'<img src="{e["image_png"]}" alt="test image {e["index"]}: {esc(label)}">'
            f'<img src="{e["saliency_png"]}" alt="saliency of test image {e["index"]}">'
            f'<figcaption>#{e["index"]}: {esc(label)}</figcaption></figure>'
        )
    return ("<h2>Saliency</h2>\n<p>SmoothGrad: how strongly each pixel moves the predicted class's logit "
            f"(mean |gradient| over {SMOOTHGRAD_SAMPLES} noisy copies; bright = influential). "
            "Red frames are mistakes, green ones correct predictions.</p>\n"
            f'<div class="saliency">{"".join(cards)}</div>')


def render_report_html(result: dict[str, Any]) -> str:
    """A self-contained HTML page (no external assets) showing an ``evaluate`` / ``evaluate_and_gate`` result."""
    esc = html.escape
    names = [str(n) for n in result["class_names"]]
    matrix = np.asarray(result["confusion_matrix"], dtype=np.int64)
    row_totals = matrix.sum(axis=1)
    calib = result.get("calibration")

    class_rows = "\n".join(
        f"<tr><th>{esc(str(c['class']))}</th><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for c in result["per_class"]
    )
    header = "".join(f"<th>{esc(n)}</th>" for n in names)
    matrix_rows = []
    for i, name in enumerate(names):
        cells = []
        for j in range(len(names)):
            share = matrix[i, j] / row_totals[i] if row_totals[i] else 0.0
            cells.append(f'<td style="background:{_cell_colour(share, i == j)}" '
                         f'title="true {esc(name)}, predicted {esc(names[j])}: {share:.1%} of the class">{matrix[i, j]}</td>')
        matrix_rows.append(f"<tr><th>{esc(name)}</th>{''.join(cells)}</tr>")

    gate_html = _render_gate(result["gate"]) if result.get("gate") else ""
    ece_box = f'<div>ECE ({calib["n_bins"]} bins)<b>{calib["ece"]:.4f}</b></div>' if calib else ""
    calibration_html = "" if not calib else (
        "<h2>Calibration</h2>\n"
        f"<p>Expected calibration error {calib['ece']:.4f} over {calib['n_bins']} equal-width confidence bins "
        f"(mean confidence {calib['mean_confidence']:.3f}, accuracy {result['test_accuracy']:.3f}). "
        "Bars below the dashed diagonal: over-confident; above: under-confident.</p>\n"
        + render_reliability_svg(calib["bins"], calib["ece"])
    )

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
.headline {{ display: flex; gap: 2rem; margin-bottom: 1.5rem; flex-wrap: wrap; }}
.headline div {{ border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8rem 1.2rem; }}
.headline b {{ display: block; font-size: 1.8rem; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: right; }}
th {{ background: #f6f8fa; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: 0.4rem; }}
.passed, .better {{ color: #1a7f37; }}
.blocked, .worse {{ color: #cf222e; }}
.reason {{ font-family: ui-monospace, monospace; background: #f6f8fa; padding: 0.5rem; }}
.saliency {{ display: flex; flex-wrap: wrap; gap: 1rem; }}
.saliency figure {{ margin: 0; padding: 0.4rem; border: 3px solid; border-radius: 6px; max-width: 210px; }}
.saliency figure.correct {{ border-color: #2da44e; }}
.saliency figure.wrong {{ border-color: #cf222e; }}
.saliency img {{ width: 96px; height: 96px; image-rendering: pixelated; margin-right: 4px; }}
.saliency figcaption {{ font-size: 0.8rem; }}
</style>
</head>
<body>
<h1>Evaluation report</h1>
<p>Model version <code>{esc(str(result.get("model_version", "unknown")))}</code>, scored on the held-out test split.</p>
<div class="headline">
<div>Test accuracy<b>{result["test_accuracy"]:.2%}</b></div>
<div>Macro F1<b>{result["macro_f1"]:.3f}</b></div>
{ece_box}
<div>Test images<b>{result["n_test"]}</b></div>
</div>
{gate_html}
<h2>Per class</h2>
<table>
<caption>Precision, recall and F1 per class</caption>
<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{class_rows}
</table>
<table>
<caption>Confusion matrix (rows: true class, columns: predicted; colour: share of the true class)</caption>
<tr><th>true \\ predicted</th>{header}</tr>
{chr(10).join(matrix_rows)}
</table>
{calibration_html}
{_render_saliency(result.get("saliency") or [])}
</body>
</html>
"""


# ---------------------------------------------------------------------------
# The KFP component
# ---------------------------------------------------------------------------
