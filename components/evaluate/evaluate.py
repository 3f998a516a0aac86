"""Scoring a classifier on the test split: accuracy, macro F1, per-class scores, the confusion matrix,
calibration and saliency, written as ``evaluation.json`` beside the HTML report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.evaluate.calibration import calibration
from components.evaluate.report import REPORT_FILE, render_report_html
from components.evaluate.saliency import SALIENCY_EXAMPLES, saliency_examples
from components.evaluate.scores import classification_scores, confusion_matrix

RESULT_FILE = "evaluation.json"


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
    from components.train.loops import predict_logits
    from components.train.runtime import pick_device

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
    from components.core.localfiles import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_FILE, result)
    (out / REPORT_FILE).write_text(render_report_html(result), encoding="utf-8")
