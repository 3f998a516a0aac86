"""Tests of calibration: reliability bins, the expected calibration error, and what the reliability diagram needs."""

import numpy as np
import pytest

from components.evaluate.calibration import (
    calibration,
    expected_calibration_error,
    reliability_bins,
)


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # In every bin, the share of correct predictions equals the stated confidence exactly.
    confidences, correct = [], []
    for conf, n_right, n in [(0.3, 3, 10), (0.5, 5, 10), (0.8, 8, 10), (1.0, 20, 20)]:
        confidences += [conf] * n
        correct += [1] * n_right + [0] * (n - n_right)
    assert expected_calibration_error(np.array(confidences), np.array(correct)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_sampled_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, size=200_000)
    correct = rng.random(200_000) < confidences  # right exactly as often as it claims
    assert expected_calibration_error(confidences, correct) < 0.005


@pytest.mark.parametrize("confidences,correct,expected", [
    ([0.9] * 10, [1] * 6 + [0] * 4, 0.3),  # says 90 %, is right 60 %
    ([0.95] * 10 + [0.55] * 10, [1] * 5 + [0] * 5 + [1] * 5 + [0] * 5, 0.5 * 0.45 + 0.5 * 0.05),
    ([1.0] * 4, [0] * 4, 1.0),  # certain and always wrong
])
def test_ece_of_an_overconfident_predictor_has_the_known_value(confidences, correct, expected):
    assert expected_calibration_error(np.array(confidences), np.array(correct)) == pytest.approx(expected)


def test_reliability_bins_are_equal_width_and_count_everything():
    bins = reliability_bins(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0]), np.array([1, 0, 1, 1, 0]))
    assert len(bins) == 15 and bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]  # right edge inclusive, 0 in bin 0
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(1 / 30)


def test_calibration_from_probabilities():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])  # right, wrong, right, right
    result = calibration(probabilities, labels)
    assert result["n_bins"] == 15 and result["mean_confidence"] == pytest.approx(0.75)
    assert result["ece"] == pytest.approx(expected_calibration_error(np.array([0.9, 0.8, 0.6, 0.7]), np.array([1, 0, 1, 1])))
    assert result["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)  # every confidence in its own bin


def test_calibration_keeps_each_prediction_for_the_diagram():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    result = calibration(probabilities, np.array([0, 0, 0]))
    assert result["confidences"] == [0.9, 0.8, 0.6] and result["correct"] == [True, False, True]
