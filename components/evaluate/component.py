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
    the reason stated in the report and the log. ``gates.override`` with
    ``gates.override_reason`` releases a blocked model, as in the other gates.

    Args:
        dataset: The dataset artifact written by ingest.
        model: The classifier artifact written by finetune (the challenger).
        cfg: The run's ``gates`` settings (accuracy floor, regression margin, where the champion is, override) and
            ``serving`` settings (the local serving home and the model store the champion may come from).
        metrics: Test accuracy, macro F1, ECE, the gate's numbers, the champion's accuracy and version, the verdict
            (passed, passed_checks, overridden, blocked_by_<limit>) and the step's cost.
        classification_metrics: The confusion matrix, shown by the KFP UI.
        report: A self-contained HTML page: headline numbers, the release decision and champion comparison, per-class scores, confusion matrix, reliability diagram and saliency maps.

    Returns:
        True when both the accuracy floor and the champion check pass, or when ``gates.override`` is set.
    """
    from components.core.cost import measure
    from components.core.gates import publish_verdict
    from components.evaluate.gate import evaluate_and_gate, evaluate_metrics
    from components.evaluate.report import render_report_html

    with measure() as cost:  # the report is part of the step's work
        result = evaluate_and_gate(dataset.path, model.path, cfg)
        page = render_report_html(result)
    gate, check = result["gate"], result["gate"]["champion"]
    if check.get("champion_model_version"):
        metrics.metadata["champion_model_version"] = str(check["champion_model_version"])  # a hash: text, not a number
    classification_metrics.log_confusion_matrix(result["class_names"], result["confusion_matrix"])
    report.metadata.update({"passed": gate["passed"], "reason": gate["reason"]})
    also = "" if check["reason"] in gate["reason"] else f"; champion check: {check['reason']}"
    print(f"evaluate: macro F1 {result['macro_f1']:.4f}, ECE {result['calibration']['ece']:.4f}, "
          f"{result['n_test']} test images{also}", flush=True)
    return publish_verdict("evaluate", gate, evaluate_metrics(result), cost.as_metrics(), metrics, report.path, page)
