"""Monitor guards: empty, tiny, retyped, mostly-NaN or reshaped windows stop before any drift test, with a
message saying what to do; broken references raise."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from monitor_traffic import served

from components.core.features import (
    EMBEDDING_COLUMNS,
    FEATURE_COLUMNS,
    MODEL_REFERENCE_FILE,
    PREDICTION_COLUMNS,
    image_features,
    write_model_reference,
)
from components.core.models import Classifier, EncoderSpec, save_classifier
from components.monitor.guards import MODEL_COLUMNS, check_window


def _with(col, values):
    def mutate(df):
        df = df.copy()
        df[col] = values(df) if callable(values) else values
        return df
    return mutate


def _nan_first(col, share):
    def mutate(df):
        df = df.copy()
        df[col] = df[col].astype("float64")
        df.loc[df.index[: int(len(df) * share)], col] = np.nan
        return df
    return mutate


def _log_fields(df):
    return df.assign(timestamp="2025-01-01T12:00:00.000+00:00", model_version="1", source="client", predicted_label="3")


@pytest.mark.parametrize("rows, with_model, mutate, status, message", [
    (0, False, None, "insufficient_data", "No requests in the window"),
    (10, False, None, "insufficient_data", "Only 10 usable requests"),
    (29, True, None, "insufficient_data", "fewer than the 30 needed"),
    (100, False, lambda df: df.drop(columns=["edge_strength"]), "schema_drift", "missing from the request log: edge_strength"),
    (100, False, lambda df: df.drop(columns=FEATURE_COLUMNS[:2]), "schema_drift", "pixel_mean, pixel_std"),
    (100, True, lambda df: df.drop(columns=EMBEDDING_COLUMNS), "schema_drift",
     "missing from the request log: emb_0, emb_1, emb_2, emb_3, emb_4, emb_5, emb_6, emb_7. The serving handler does "
     "not log the model's prediction and embedding"),
    (100, True, lambda df: df.drop(columns=["confidence"]), "schema_drift", "missing from the request log: confidence"),
    (100, False, lambda df: df.drop(columns=MODEL_COLUMNS), None, None),  # no model reference: not needed
    (100, False, _with("pixel_std", lambda df: df["pixel_std"].map(lambda v: f"{v:.3f}")), "schema_drift", "pixel_std is object"),
    (100, False, _with("ink_fraction", lambda df: [*df["ink_fraction"].iloc[:-1], "n/a"]), "schema_drift", "'n/a'"),
    (100, False, _with("pixel_max", True), "schema_drift", "pixel_max is bool"),
    (100, True, _with("predicted_class", lambda df: df["predicted_class"].map(str)), "schema_drift", "predicted_class is object"),
    (100, True, _with("emb_3", "x"), "schema_drift", "emb_3 is object (e.g. 'x'), expected numeric"),
    (100, False, _with("pixel_mean_v2", 0.5), "schema_drift", "Unexpected columns in the request log: pixel_mean_v2"),
    (100, False, _nan_first("center_mass_x", 0.8), "schema_drift", "center_mass_x 80% NaN vs 0% in the reference"),
    (100, False, _with("center_mass_y", None), "schema_drift", "center_mass_y 100% NaN"),  # JSON null everywhere
    (100, True, _nan_first("confidence", 0.6), "schema_drift", "confidence 60% NaN vs 0% in the reference"),
    (40, False, _nan_first("edge_strength", 0.3), "insufficient_data", "Only 28 usable requests"),
    (40, True, _nan_first("emb_7", 0.3), "insufficient_data", "Only 28 usable requests"),
    (100, True, _nan_first("edge_strength", 0.2), None, None),  # some NaN: reported, not fatal
    (100, False, _with("predicted_label", "7"), None, None),  # fields the request log carries are fine
    (100, True, _log_fields, None, None),
    (100, True, lambda df: df[list(df.columns)[::-1]], None, None),  # column order does not matter
], ids=["empty", "too-few", "one-short", "missing-column", "missing-two", "missing-embedding", "missing-confidence",
        "no-model-columns-needed", "retyped-strings", "one-string", "retyped-bool", "class-as-string", "emb-string",
        "unexpected-column", "mostly-nan", "all-null", "confidence-mostly-nan", "nan-leaves-too-few",
        "emb-nan-leaves-too-few", "some-nan", "log-fields", "all-log-fields", "reordered"])
def test_check_window_guards(reference, model_reference, model, held_out, rows, with_model, mutate, status, message):
    current = served(model, held_out[:rows]) if rows else pd.DataFrame(columns=FEATURE_COLUMNS + MODEL_COLUMNS)
    if mutate is not None:
        current = mutate(current)
    verdict = check_window(reference, current, model_reference=model_reference if with_model else None)
    if status is None:
        assert verdict is None
        return
    assert verdict.status == status and message in verdict.message, verdict.message
    assert verdict.drift_detected is False and verdict.current_rows == rows
    assert verdict.alert == (status == "schema_drift")


@pytest.mark.parametrize("which, mutate, message", [
    ("features", lambda ref: ref.drop(columns=["pixel_min"]), "reference lacks feature columns ['pixel_min']"),
    ("features", lambda ref: ref.assign(pixel_min="0"), "reference feature columns ['pixel_min'] are not numeric"),
    ("features", lambda ref: ref.iloc[:0], "reference has no rows"),
    ("model", lambda ref: ref.drop(columns=["emb_2"]), "model reference lacks model columns ['emb_2']; re-run finetune"),
    ("model", lambda ref: ref.assign(confidence="high"), "model reference model columns ['confidence'] are not numeric"),
    ("model", lambda ref: ref.iloc[:0], "model reference has no rows"),
], ids=["missing", "retyped", "empty", "model-missing", "model-retyped", "model-empty"])
def test_broken_reference_raises(reference, model_reference, held_out, which, mutate, message):
    ref, model_ref = (mutate(reference), None) if which == "features" else (reference, mutate(model_reference))
    with pytest.raises(ValueError, match=re.escape(message)):
        check_window(ref, image_features(held_out[:50]), model_reference=model_ref)


def test_write_model_reference_needs_held_out_images(tmp_path, digits):
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), tmp_path, {"class_names": list("0123456789")})
    path = write_model_reference(tmp_path, digits[:40])
    written = pd.read_csv(path)
    assert path.name == MODEL_REFERENCE_FILE and len(written) == 40
    assert set(FEATURE_COLUMNS + PREDICTION_COLUMNS + EMBEDDING_COLUMNS) <= set(written.columns)
    with pytest.raises(ValueError, match="at least 30 held-out images"):
        write_model_reference(tmp_path, digits[:10])
