"""Evaluate step: test-set accuracy, macro F1, per-class precision/recall and the
confusion matrix, a self-contained HTML report, and the accuracy gate.
"""

import html
from pathlib import Path
from typing import Any

import numpy as np
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

RESULT_FILE = "evaluation.json"
REPORT_FILE = "report.html"


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


def evaluate(dataset_dir: str | Path, model_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score a classifier artifact on the dataset's test split.

    Returns ``test_accuracy``, ``macro_f1``, ``per_class`` (list of
    ``{class, precision, recall, f1, support}``), ``confusion_matrix`` (list of
    lists, rows = true class, columns = predicted), ``class_names``, ``n_test``
    and ``model_version``. With ``out_dir``, also writes ``evaluation.json`` and
    ``report.html`` there.
    """
    from components.data import load_splits
    from components.models import atomic_write_json, load_classifier
    from components.training import pick_device, predict_logits

    splits = load_splits(dataset_dir)
    device = pick_device()
    model, meta = load_classifier(model_dir, device=device)
    if list(meta["class_names"]) != list(splits.class_names):
        raise ValueError(f"the model was trained on classes {meta['class_names']} but the dataset has "
                         f"{splits.class_names}; evaluate a model fine-tuned on this dataset")
    if len(splits.test_y) == 0:
        raise ValueError("the test split is empty; raise the test fraction at ingest")

    predictions = predict_logits(model, splits.test_x, device=device).argmax(dim=1).numpy()
    matrix = confusion_matrix(splits.test_y, predictions, len(splits.class_names))
    result = {
        **classification_scores(matrix, splits.class_names),
        "confusion_matrix": matrix.tolist(),
        "class_names": list(splits.class_names),
        "n_test": int(len(splits.test_y)),
        "model_version": meta.get("model_version", "unknown"),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RESULT_FILE, result)
        (out / REPORT_FILE).write_text(render_report_html(result))
    return result


def _cell_colour(share: float, diagonal: bool) -> str:
    # Correct predictions in green, mistakes in red; the stronger the share of the true class, the darker.
    rgb = "46, 160, 67" if diagonal else "215, 58, 73"
    return f"rgba({rgb}, {0.08 + 0.85 * share:.3f})" if share > 0 else "#fff"


def render_report_html(result: dict[str, Any]) -> str:
    """A self-contained HTML page (no external assets) showing an ``evaluate`` result."""
    esc = html.escape
    names = [str(n) for n in result["class_names"]]
    matrix = np.asarray(result["confusion_matrix"], dtype=np.int64)
    row_totals = matrix.sum(axis=1)

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

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
.headline {{ display: flex; gap: 2rem; margin-bottom: 1.5rem; }}
.headline div {{ border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8rem 1.2rem; }}
.headline b {{ display: block; font-size: 1.8rem; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: right; }}
th {{ background: #f6f8fa; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: 0.4rem; }}
</style>
</head>
<body>
<h1>Evaluation report</h1>
<p>Model version <code>{esc(str(result.get("model_version", "unknown")))}</code>, scored on the held-out test split.</p>
<div class="headline">
<div>Test accuracy<b>{result["test_accuracy"]:.2%}</b></div>
<div>Macro F1<b>{result["macro_f1"]:.3f}</b></div>
<div>Test images<b>{result["n_test"]}</b></div>
</div>
<table>
<caption>Per class</caption>
<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{class_rows}
</table>
<table>
<caption>Confusion matrix (rows: true class, columns: predicted; colour: share of the true class)</caption>
<tr><th>true \\ predicted</th>{header}</tr>
{chr(10).join(matrix_rows)}
</table>
</body>
</html>
"""


def evaluate_component(
    dataset: Input[Dataset],
    model: Input[Model],
    min_test_accuracy: float,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
) -> bool:
    """Score the fine-tuned classifier on the test split and gate its release on accuracy.

    Args:
        dataset: The dataset artifact written by ingest.
        model: The classifier artifact written by finetune.
        min_test_accuracy: The lowest test accuracy that passes the gate.
        metrics: Test accuracy, macro F1, test size and the step's cost.
        classification_metrics: The confusion matrix, shown by the KFP UI.
        report: A self-contained HTML page with headline numbers, per-class scores and the confusion matrix.

    Returns:
        True when the test accuracy reaches ``min_test_accuracy``.
    """
    import os

    from components.cost import log_metrics, measure
    from components.evaluate import evaluate, render_report_html

    with measure() as cost:
        result = evaluate(dataset.path, model.path)
    log_metrics(metrics, {"test_accuracy": result["test_accuracy"], "macro_f1": result["macro_f1"],
                          "n_test": result["n_test"], **cost.as_metrics()})
    classification_metrics.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    parent = os.path.dirname(report.path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(render_report_html(result))
    passed = result["test_accuracy"] >= min_test_accuracy
    print(f"evaluation gate {'PASSED' if passed else 'FAILED'}: test accuracy {result['test_accuracy']:.4f} "
          f"{'>=' if passed else '<'} min_test_accuracy {min_test_accuracy:.4f} "
          f"(macro F1 {result['macro_f1']:.4f}, {result['n_test']} test images)", flush=True)
    return passed
