"""Tests of the privacy step's Markdown report."""

from components.privacy.report import render_privacy_report


def test_report_renders_a_passing_result():
    result = {"loss_attack_auc": 0.55, "confidence_attack_auc": 0.54, "mia_auc": 0.55, "strongest_attack": "loss",
              "tpr_at_1pct_fpr": 0.02, "attack_accuracy": 0.56, "member_mean_loss": 0.01, "nonmember_mean_loss": 0.05,
              "loss_attack_tpr_at_1pct_fpr": 0.02, "confidence_attack_tpr_at_1pct_fpr": 0.01,
              "member_mean_confidence": 0.99, "nonmember_mean_confidence": 0.98, "member_accuracy": 1.0,
              "nonmember_accuracy": 0.98, "n_per_side": 360, "n_members_trained": 810, "max_mia_auc": 0.65,
              "max_leaks": 0, "n_leaks": 0, "max_dp_epsilon": 10.0, "near_duplicate_distance": 0.03, "seed": 0,
              "reference_models": 0, "passed": True, "passed_checks": True, "override": False, "overridden": False,
              "override_reason": "", "blocked_by": [], "reason": "membership-inference AUC 0.550 <= max 0.650"}
    text = render_privacy_report(result)
    assert text.startswith("# Privacy check — PASSED")
    assert "| **strongest (loss)** | **0.550** (max allowed 0.650) | **0.020** |" in text
    assert "No test image duplicates a train image." in text and "Not trained with differential privacy" in text
    assert "How to read it" in text
