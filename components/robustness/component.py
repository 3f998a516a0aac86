"""The KFP entry of the robustness step: its artifacts and settings in, the logic of this package called.

pipelines/kfp_steps.py writes the KFP function around it (one typed input per config field).
"""

from __future__ import annotations

from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.core.settings import Settings


def robustness_component(
    dataset: Input[Dataset],
    model: Input[Model],
    cfg: Settings,
    metrics: Output[Metrics],
    report: Output[HTML],
) -> bool:
    """Robustness gate: test accuracy under noise, common corruptions, FGSM and PGD.

    Args:
        dataset: the dataset artifact from ingest (the test split is used).
        model: the classifier artifact from finetune.
        cfg: the run's ``gates`` settings (perturbations, attacks, limits, override) and ``data.seed``
            (the Gaussian noise, the noise corruption and PGD's random start).
        metrics: every accuracy and relative drop, the limits, the verdict (passed, passed_checks,
            overridden, blocked_by_<limit>) and the step's cost.
        report: a self-contained HTML page: the verdict, the tables (perturbations, corruptions by
            severity) and the accuracy curves against corruption severity and attack strength.

    Returns:
        True when every limit holds, or when ``gates.override`` is set.
    """
    from components.core.cost import measure
    from components.core.gates import publish_verdict
    from components.robustness.report import render_robustness_html
    from components.robustness.robustness import robustness_check, robustness_metrics

    g = cfg.gates
    print(f"robustness: noise sigma {g.noise_sigma}, FGSM epsilon {g.fgsm_epsilon}, PGD epsilon {g.pgd_epsilon} "
          f"x {g.pgd_steps} steps, corruptions 1-{g.corruption_severities} on {model.path}", flush=True)
    with measure() as cost:  # the report is part of the step's work
        result = robustness_check(dataset.path, model.path, cfg)
        page = render_robustness_html(result)
    return publish_verdict("robustness", result, robustness_metrics(result), cost.as_metrics(), metrics, report.path,
                           page)
