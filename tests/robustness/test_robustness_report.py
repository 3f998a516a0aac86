"""Tests of the robustness step's report: the Markdown text and the HTML page with the accuracy curves."""

from report_checks import assert_offline_report, figure_traces

from components.robustness.report import render_robustness_html, render_robustness_report


def failing_result():
    return {"clean_accuracy": 0.98, "noise_accuracy": 0.97, "fgsm_accuracy": 0.4, "noise_relative_drop": 0.0102,
              "fgsm_relative_drop": 0.592, "noise_sigma": 0.1, "fgsm_epsilon": 0.03, "min_noise_accuracy": 0.85,
              "min_fgsm_accuracy": 0.7, "n_test": 360, "seed": 0, "passed": False, "passed_checks": False,
              "override": False, "overridden": False, "override_reason": "", "blocked_by": ["min_fgsm_accuracy"],
              "pgd_accuracy": 0.3, "pgd_relative_drop": 0.694, "pgd_epsilon": 0.03, "pgd_steps": 10,
              "pgd_step_size": 0.0075, "pgd_random_start": True, "min_pgd_accuracy": 0.0,
              "corruption_accuracy": 0.8, "corruption_relative_drop": 0.184, "min_corruption_accuracy": 0.5,
              "max_corruption_drop": 0.5, "corruptions": [{"corruption": "contrast", "severity": 2, "level": 0.65,
                                                           "accuracy": 0.9, "relative_drop": 0.0816}],
              "reason": "FGSM accuracy 0.400 < min 0.700 (epsilon 0.03)"}


def test_report_marks_the_failing_row():
    text = render_robustness_report(failing_result())
    assert "| contrast | 2 | 0.65 | 0.900 | 8.2% |" in text
    assert "| PGD (L∞ epsilon 0.03, 10 steps of 0.0075, random start) | 0.300 | 69.4% | 0.000 ✅ |" in text
    assert "FAILED" in text and "**FGSM accuracy 0.400 < min 0.700 (epsilon 0.03)**" in text
    assert "| Gaussian noise (sigma 0.1) | 0.970 | 1.0% | 0.850 ✅ |" in text
    assert "| FGSM (L∞ epsilon 0.03) | 0.400 | 59.2% | 0.700 ❌ |" in text


def test_html_report_draws_accuracy_against_severity_and_attack_strength():
    result = {**failing_result(), "attack_curve": [
        {"attack": "FGSM", "epsilon": 0.015, "accuracy": 0.7, "gate": False},
        {"attack": "FGSM", "epsilon": 0.03, "accuracy": 0.4, "gate": True},
        {"attack": "PGD", "epsilon": 0.03, "accuracy": 0.3, "gate": True}]}
    page = render_robustness_html(result)
    assert_offline_report(page, ["robustness-curves"])
    assert "<td>contrast</td>" in page and "<h1>Robustness check — FAILED</h1>" in page
    lines = {t["name"]: t for t in figure_traces(page, "robustness-curves")}
    assert lines["contrast"]["x"] == [0, 2] and lines["contrast"]["y"] == [0.98, 0.9]
    assert lines["FGSM"]["x"] == [0, 0.015, 0.03] and lines["FGSM"]["y"] == [0.98, 0.7, 0.4]
    assert lines["PGD"]["y"] == [0.98, 0.3]
