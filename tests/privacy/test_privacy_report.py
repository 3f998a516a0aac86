"""Tests of the privacy step's report: the Markdown text and the HTML page with the ROC figure."""

from report_checks import assert_offline_report, figure_traces

from components.privacy.report import render_privacy_html, render_privacy_report


def passing_result():
    return {"loss_attack_auc": 0.55, "confidence_attack_auc": 0.54, "mia_auc": 0.55, "strongest_attack": "loss",
              "tpr_at_1pct_fpr": 0.02, "attack_accuracy": 0.56, "member_mean_loss": 0.01, "nonmember_mean_loss": 0.05,
              "loss_attack_tpr_at_1pct_fpr": 0.02, "confidence_attack_tpr_at_1pct_fpr": 0.01,
              "member_mean_confidence": 0.99, "nonmember_mean_confidence": 0.98, "member_accuracy": 1.0,
              "nonmember_accuracy": 0.98, "n_per_side": 360, "n_members_trained": 810, "max_mia_auc": 0.65,
              "max_leaks": 0, "n_leaks": 0, "max_dp_epsilon": 10.0, "near_duplicate_distance": 0.03, "seed": 0,
              "reference_models": 0, "passed": True, "passed_checks": True, "override": False, "overridden": False,
              "override_reason": "", "blocked_by": [], "reason": "membership-inference AUC 0.550 <= max 0.650"}


def test_report_renders_a_passing_result():
    result = passing_result()
    text = render_privacy_report(result)
    assert text.startswith("# Privacy check — PASSED")
    assert "| **strongest (loss)** | **0.550** (max allowed 0.650) | **0.020** |" in text
    assert "No test image duplicates a train image." in text and "Not trained with differential privacy" in text
    assert "How to read it" in text


def test_html_report_draws_every_attack_roc_and_keeps_the_text():
    result = {**passing_result(), "roc": {
        "loss": {"fpr": [0.0, 0.005, 0.02, 1.0], "tpr": [0.0, 0.02, 0.1, 1.0], "auc": 0.55},
        "confidence": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.54, 1.0], "auc": 0.54}}}
    page = render_privacy_html(result)
    assert_offline_report(page, ["membership-roc"])
    assert "<h1>Privacy check — PASSED</h1>" in page and "<h2>How to read it</h2>" in page
    assert "<td><strong>strongest (loss)</strong></td>" in page
    names = [t["name"] for t in figure_traces(page, "membership-roc")]
    assert names == ["chance (AUC 0.5)", "loss threshold (AUC 0.550)", "loss threshold: TPR 0.020 at 1% FPR",
                     "confidence threshold (AUC 0.540)", "confidence threshold: TPR 0.000 at 1% FPR"]
    # a result without ROC points (an older run's) still gives the page, without the figure
    assert_offline_report(render_privacy_html(passing_result()), [])


def test_html_report_keeps_a_hostile_override_reason_inert():
    result = {**passing_result(), "passed_checks": False, "override": True, "overridden": True,
              "blocked_by": ["max_mia_auc"], "override_reason": "<script>alert(1)</script> <img src=x>"}
    page = render_privacy_html(result)
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_offline_report(page, [])
