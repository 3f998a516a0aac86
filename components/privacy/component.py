"""The KFP entry of the privacy step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def privacy_component(
    dataset: Input[Dataset],
    model: Input[Model],
    cfg: Settings,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """Privacy gate: membership-inference audit, train/test leakage and the DP budget of the fine-tuned model.

    Args:
        dataset: the dataset artifact from ingest (train split = members, test split = non-members).
        model: the classifier artifact from finetune.
        cfg: the run's ``gates`` settings (limits, reference models, override) and ``data.seed`` (member
            subsampling and reference models).
        metrics: attack AUCs and TPRs at 1% FPR, duplicate counts, DP epsilon, the limits, the verdict
            (passed, passed_checks, overridden, blocked_by_<limit>) and the step's cost.
        report: a self-contained HTML page: the verdict, the audit with its ROC curves, the duplicate list
            and the DP budget.

    Returns:
        True when every limit holds, or when ``gates.override`` is set.
    """
    from components.core.cost import measure
    from components.core.gates import publish_verdict
    from components.privacy.privacy import privacy_check, privacy_metrics
    from components.privacy.report import render_privacy_html

    print(f"privacy: membership-inference audit, leakage and DP check of {model.path}", flush=True)
    with measure() as cost:  # the report is part of the step's work
        result = privacy_check(dataset.path, model.path, cfg)
        page = render_privacy_html(result)
    return publish_verdict("privacy", result, privacy_metrics(result), cost.as_metrics(), metrics, report.path, page)
