"""Monitor: noise vs real shifts. Clean windows stay "ok" at every size; inverted, noised, rotated and
foreign images drift, with the right features named, and the model-side checks catch what the image
features cannot see."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import MONITOR_REFERENCE_ROWS
from monitor_traffic import add_noise, invert, photo_patches, rotate_30, rotate_90, served
from PIL import Image

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, PREDICTION_COLUMNS, image_features
from components.core.stattests import PREDICTION_METHOD, chi2_two_sample, embedding_drift
from components.monitor.drift import drift_verdict, snapshot_columns
from serving.client import encode_png


def png_roundtrip(images: np.ndarray) -> np.ndarray:
    """What the served handler sees: the image encoded as 8-bit PNG and decoded again."""
    return np.stack([np.asarray(Image.open(io.BytesIO(encode_png(im))), dtype=np.float32)[None] / 255.0 for im in images])



# --- noise vs real shifts -----------------------------------------------------------------------


def test_iid_clean_windows_are_not_drift(reference, held_out):
    # Three disjoint windows of different sizes: KS keeps its false-alarm rate at every size.
    for start, size in ((0, 60), (60, 150), (210, 400)):
        verdict = drift_verdict(reference, image_features(held_out[start:start + size]))
        assert verdict["status"] == "ok", verdict["message"]
        assert verdict["drift_detected"] is False and verdict["alert"] is False
        assert verdict["drift_share"] < 0.5 and len(verdict["drifted_features"]) <= 1, verdict["drifted_features"]
        assert verdict["current_rows"] == size and verdict["reference_rows"] == MONITOR_REFERENCE_ROWS
        assert verdict["checks"] == ["image_features"] and set(verdict["groups"]) == {"image_features"}
        for col, result in verdict["features"].items():
            assert result["method"] == "ks" and result["threshold"] == 0.05
            assert result["drifted"] == (result["p_value"] <= 0.05), col  # the flag matches the p-value


def test_clean_windows_with_the_model_reference_are_not_drift(reference, model_reference, model, held_out):
    for start, size in ((0, 150), (150, 500)):
        verdict = drift_verdict(reference, served(model, held_out[start:start + size]), model_reference=model_reference)
        assert verdict["status"] == "ok", verdict["message"]
        assert verdict["checks"] == ["image_features", "prediction", "embedding"]
        assert not any(g["drifted"] for g in verdict["groups"].values()), verdict["groups"]
        assert "Predictions and embedding match the model reference" in verdict["message"]
        features = verdict["features"]
        assert set(features) == set(FEATURE_COLUMNS) | set(PREDICTION_COLUMNS)  # the embedding is tested as a whole
        assert features["predicted_class"]["method"] == PREDICTION_METHOD and features["confidence"]["method"] == "ks"
        assert features["predicted_class"]["threshold"] == features["confidence"]["threshold"] == 0.005
        assert features["confidence"]["reference_rows"] == len(model_reference) == 300
        # each column against its own reference
        assert features["pixel_mean"]["reference_rows"] == MONITOR_REFERENCE_ROWS
        assert all(f["current_rows"] == size for f in features.values())
        embedding = verdict["groups"]["embedding"]
        assert 0.3 < embedding["auc"] < 0.7 and embedding["p_value"] > 0.01
        assert embedding["current_rows"] == size and embedding["reference_rows"] == 300


def test_evidently_default_method_calls_a_clean_small_window_drift(reference, held_out):
    # Why the monitor uses KS: with > 1000 reference rows Evidently's default is the normed
    # Wasserstein distance with a fixed 0.1 threshold, blind to the window size.
    from evidently import Dataset, Report
    from evidently.presets import DataDriftPreset

    current = image_features(held_out[:60])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its correlation plot of the constant pixel_min
        snapshot = Report([DataDriftPreset(columns=FEATURE_COLUMNS)], include_tests=True).run(
            Dataset.from_pandas(current[FEATURE_COLUMNS]), Dataset.from_pandas(reference[FEATURE_COLUMNS]))
    columns = snapshot_columns(snapshot)
    assert columns["pixel_mean"]["method"] == "Wasserstein distance (normed)"
    assert sum(c["drifted"] for c in columns.values()) >= len(FEATURE_COLUMNS) / 2  # Evidently: dataset drift
    assert drift_verdict(reference, current)["status"] == "ok"  # the same window with KS


def test_evidently_chisquare_calls_a_clean_large_window_drift_the_two_sample_test_does_not(model_reference, model,
                                                                                           held_out):
    # Why predicted_class gets a two-sample test: Evidently's "chisquare" takes the 300-row reference's
    # class shares as exact, so a large clean window "differs" from them by the reference's own noise.
    from evidently.legacy.calculations.stattests.chisquare_stattest import _chi_stat_test

    rng = np.random.default_rng(0)
    window = served(model, held_out[rng.integers(0, len(held_out), 6623)])["predicted_class"].astype(str)
    ref = model_reference["predicted_class"].astype(str)
    p_evidently, _ = _chi_stat_test(ref, window, None, 0.005)
    p_two_sample, drifted = chi2_two_sample(ref.to_numpy(), window.to_numpy(), 0.005)
    assert p_evidently < 1e-6 and p_two_sample > 0.005 and not drifted, (p_evidently, p_two_sample)


def test_embedding_test_holds_its_false_alarm_rate_and_sees_mean_and_spread_shifts():
    rng = np.random.default_rng(0)

    def frame(n, shift=0.0, spread=1.0):
        return pd.DataFrame(rng.normal(shift, spread, (n, len(EMBEDDING_COLUMNS))), columns=EMBEDDING_COLUMNS)

    ref = frame(300)
    clean = [embedding_drift(ref, frame(600), alpha=0.05)["drifted"] for _ in range(60)]
    assert sum(clean) <= 8, f"{sum(clean)} of 60 clean windows flagged at alpha 0.05"  # expected 3; P(>8) < 0.01
    for shifted in (frame(600, shift=0.3), frame(600, spread=1.5)):
        result = embedding_drift(ref, shifted)
        assert result["drifted"] and result["p_value"] < 1e-4, result


@pytest.mark.parametrize("shift, must_name, must_not_name", [
    # Inversion keeps contrast and edges exactly (std(1-x) = std(x)) but flips brightness and ink.
    (invert, {"pixel_mean", "ink_fraction"}, {"pixel_std", "edge_strength"}),
    (add_noise, {"pixel_mean", "edge_strength"}, set()),
    (rotate_30, {"pixel_mean", "edge_strength", "pixel_max"}, set()),
    (photo_patches, {"pixel_mean", "pixel_std", "pixel_max", "edge_strength"}, set()),
], ids=["inverted", "noised", "rotated-30", "photo-patches"])
def test_shifted_windows_are_drift_with_the_right_features(reference, held_out, shift, must_name, must_not_name):
    current = image_features(shift(held_out[:200], np.random.default_rng(1)))
    verdict = drift_verdict(reference, current)
    drifted = set(verdict["drifted_features"])
    assert verdict["status"] == "drift" and verdict["drift_detected"] and verdict["alert"], verdict["message"]
    assert verdict["drift_share"] >= 0.5 and verdict["groups"]["image_features"]["drifted"]
    assert must_name <= drifted, f"expected {must_name} among {drifted}"
    assert not (must_not_name & drifted), f"{must_not_name & drifted} cannot change under this shift"
    for col in must_name:
        assert col in verdict["message"]
        assert verdict["features"][col]["p_value"] < 1e-6  # a real shift is not a borderline call


def test_right_angle_rotation_moves_only_the_centre_of_mass(reference, held_out):
    # A 90-degree turn permutes pixels: six features are exactly unchanged, so only 2 of 8 can
    # drift. Both are named; calling the window drifted needs a lower drift_share, or the model
    # reference (next test).
    window = held_out[:300]
    current = image_features(rotate_90(window, None))
    verdict = drift_verdict(reference, current)
    unrotated = drift_verdict(reference, image_features(window))
    assert verdict["status"] == "ok" and "center_mass_x" in verdict["drifted_features"]
    # whatever the unrotated window already flags by chance (KS at p < 0.05), rotation adds only the centre of mass
    added = set(verdict["drifted_features"]) - set(unrotated["drifted_features"])
    assert added <= {"center_mass_x", "center_mass_y"}
    assert "below the 50%" in verdict["message"]
    strict = drift_verdict(reference, current, drift_share=0.125)
    assert strict["status"] == "drift" and strict["drift_share_threshold"] == 0.125


@pytest.mark.parametrize("shift", [rotate_90, photo_patches], ids=["rotated-90", "photo-patches"])
def test_the_model_side_checks_catch_what_the_image_features_miss(reference, model_reference, model, held_out, shift):
    verdict = drift_verdict(reference, served(model, shift(held_out[:200], np.random.default_rng(2))),
                              model_reference=model_reference)
    assert verdict["status"] == "drift", verdict["message"]
    assert verdict["groups"]["prediction"]["drifted"] and verdict["groups"]["embedding"]["drifted"]
    assert verdict["groups"]["embedding"]["auc"] > 0.8 and verdict["groups"]["embedding"]["p_value"] < 1e-6
    assert "the predictions drifted" in verdict["message"] and "the embedding drifted" in verdict["message"]


def test_png_serving_sees_the_same_features_as_training(reference, held_out):
    # No train/serve skew: 8-bit PNG round trip leaves every feature exactly as computed at training time.
    served_features = image_features(png_roundtrip(held_out[:300]))
    np.testing.assert_array_equal(served_features.values, image_features(held_out[:300]).values)
    verdict = drift_verdict(reference, served_features)
    assert verdict["status"] == "ok" and not verdict["drift_detected"]
