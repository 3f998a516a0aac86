"""The KFP entry of the evaluate step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def evaluate_component(
    dataset: Input[Dataset],
    model: Input[Model],
    cfg: Settings,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
) -> bool:
    """Score the fine-tuned classifier on the test split, compare it with the model in production, and gate its release.

    The gate passes when the test accuracy reaches ``gates.min_test_accuracy`` AND the
    challenger is at least as accurate as the champion (the model in production,
    scored on the same test split) minus ``gates.max_regression``. With no champion,
    or one trained on other classes or image shapes, the champion check passes with
    the reason stated in the report and the log.

    Args:
        dataset: The dataset artifact written by ingest.
        model: The classifier artifact written by finetune (the challenger).
        cfg: The run's ``gates`` settings (accuracy floor, regression margin, where the champion is) and
            ``serving`` settings (the local serving home and the model store the champion may come from).
        metrics: Test accuracy, macro F1, ECE, the gate's numbers, the champion's accuracy and version, and the step's cost.
        classification_metrics: The confusion matrix, shown by the KFP UI.
        report: A self-contained HTML page: headline numbers, the release decision and champion comparison, per-class scores, confusion matrix, reliability diagram and saliency maps.

    Returns:
        True when both the accuracy floor and the champion check pass.
    """
    import os
    from pathlib import Path

    from components.core.cost import log_metrics, measure
    from components.evaluate.evaluate import evaluate_and_gate, render_report_html

    gates, serving = cfg.gates, cfg.serving
    home = Path(serving.home) if serving.home else None
    if home is not None and not home.is_absolute():
        home = Path.cwd() / home
    with measure() as cost:
        result = evaluate_and_gate(dataset.path, model.path, gates.min_test_accuracy, gates.max_regression,
                                   champion_model=gates.champion_model, serving_home=home,
                                   model_store_uri=serving.model_store_uri)
    gate, check = result["gate"], result["gate"]["champion"]
    log_metrics(metrics, {
        "test_accuracy": result["test_accuracy"], "macro_f1": result["macro_f1"], "n_test": result["n_test"],
        "ece": result["calibration"]["ece"], "min_test_accuracy": gate["min_test_accuracy"],
        "max_regression": check["max_regression"], "challenger_accuracy": check["challenger_accuracy"],
        "champion_accuracy": check.get("champion_accuracy"), "champion_compared": check["status"] == "compared",
        **cost.as_metrics(),
    })
    if check.get("champion_model_version"):
        metrics.metadata["champion_model_version"] = str(check["champion_model_version"])  # a hash: text, not a number
    classification_metrics.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    report.metadata.update({"passed": gate["passed"], "reason": gate["reason"]})
    parent = os.path.dirname(report.path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(render_report_html(result))
    also = "" if check["reason"] in gate["reason"] else f"; champion check: {check['reason']}"
    print(f"evaluation gate {'PASSED' if gate['passed'] else 'FAILED'}: {gate['reason']}{also} "
          f"(macro F1 {result['macro_f1']:.4f}, ECE {result['calibration']['ece']:.4f}, "
          f"{result['n_test']} test images)", flush=True)
    return gate["passed"]
