"""Monitor: noise vs real shifts (image features, predictions, embedding), the window guards, reading
and sampling the request log with its error bound, idempotent outputs (verdict, report, Prometheus),
the CLI, replay over HTTP, and (slow) clean vs shifted traffic through a real TorchServe and its logs."""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import settings_of
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from PIL import Image
from scipy import ndimage
from scipy.stats import ks_2samp
from sklearn.datasets import load_digits, load_sample_images

from components.core.data import REFERENCE_FILE, Splits, save_splits
from components.core.features import (
    EMBEDDING_COLUMNS,
    FEATURE_COLUMNS,
    MODEL_REFERENCE_FILE,
    PREDICTION_COLUMNS,
    image_features,
    model_reference_features,
    write_model_reference,
)
from components.core.models import Classifier, EncoderSpec, save_classifier
from components.monitor.component import monitor_component
from components.monitor.monitor import (
    EXCLUDED_SOURCES,
    MODEL_COLUMNS,
    PREDICTION_METHOD,
    REPLAY_SOURCE,
    STATUSES,
    _chi2_two_sample,
    check_window,
    drift_report,
    embedding_drift,
    last_window,
    monitor,
    parse_duration,
    prometheus_metrics,
    read_request_log,
    replay,
    result_dir,
    select_traffic,
)
from components.monitor.sampling import (
    dkw_epsilon,
    dkw_sample_size,
    index_window,
    list_log_files,
    read_index,
    read_window,
    window_seed,
)
from pipelines.config import MonitorConfig
from serving.client import encode_png

N_REFERENCE = 1100  # like ingest's train+val reference on digits
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def digits_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as [N, 1, 8, 8] in [0, 1] with labels, shuffled once (the file is ordered by writer)."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    return (data.images / 16.0).astype(np.float32)[:, None][order], data.target[order].astype(np.int64)


@pytest.fixture(scope="module")
def digits(digits_and_labels) -> np.ndarray:
    return digits_and_labels[0]


@pytest.fixture(scope="module")
def reference(digits) -> pd.DataFrame:
    ref = image_features(digits[:N_REFERENCE])
    ref["label"] = 0  # ingest adds the label column; the monitor must ignore it
    return ref


@pytest.fixture(scope="module")
def held_out(digits) -> np.ndarray:
    """697 digits the reference never saw: i.i.d. production traffic."""
    return digits[N_REFERENCE:]


def train_tiny_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 150) -> Classifier:
    """A small CNN trained for a second or two (one thread: faster on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = Classifier(EncoderSpec(width=8, embed_dim=16), num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x, y = torch.from_numpy(images), torch.from_numpy(labels)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(digits_and_labels, tmp_path_factory) -> Path:
    """A classifier trained on digits[:800] with its model reference on digits[800:1100] (its validation split)."""
    images, labels = digits_and_labels
    out = tmp_path_factory.mktemp("model")
    save_classifier(train_tiny_classifier(images[:800], labels[:800]), out,
                    {"class_names": [str(i) for i in range(10)], "model_version": "m1"})
    write_model_reference(out, images[800:N_REFERENCE])
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    from components.core.models import load_classifier

    return load_classifier(model_dir)[0]


@pytest.fixture(scope="module")
def model_reference(model_dir) -> pd.DataFrame:
    return pd.read_csv(model_dir / MODEL_REFERENCE_FILE)


def served(model, images: np.ndarray) -> pd.DataFrame:
    """What the serving handler logs for these images: features, prediction, confidence, embedding projection."""
    return model_reference_features(model, images)


def png_roundtrip(images: np.ndarray) -> np.ndarray:
    """What the served handler sees: the image encoded as 8-bit PNG and decoded again."""
    return np.stack([np.asarray(Image.open(io.BytesIO(encode_png(im))), dtype=np.float32)[None] / 255.0 for im in images])


# --- the shifts -------------------------------------------------------------------------------


def invert(x, rng):
    return 1.0 - x


def add_noise(x, rng):
    return np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0).astype(np.float32)


def rotate_30(x, rng):
    return np.clip(ndimage.rotate(x, 30, axes=(3, 2), reshape=False, order=1), 0.0, 1.0)


def rotate_90(x, rng):
    return np.rot90(x, 1, axes=(2, 3)).copy()


def photo_patches(x, rng):
    """A different kind of image: 8x8 grey thumbnails of patches of a photo."""
    photo = load_sample_images().images[0].mean(axis=2) / 255.0  # china.jpg, [427, 640]
    out = np.empty_like(x)
    for i in range(len(x)):
        r, c = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        out[i, 0] = photo[r:r + 32, c:c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return out


# --- noise vs real shifts -----------------------------------------------------------------------


def test_iid_clean_windows_are_not_drift(reference, held_out):
    # Three disjoint windows of different sizes: KS keeps its false-alarm rate at every size.
    for start, size in ((0, 60), (60, 150), (210, 400)):
        verdict, snapshot = drift_report(reference, image_features(held_out[start:start + size]))
        assert verdict["status"] == "ok", verdict["message"]
        assert verdict["drift_detected"] is False and verdict["alert"] is False
        assert verdict["drift_share"] < 0.5 and len(verdict["drifted_features"]) <= 1, verdict["drifted_features"]
        assert verdict["current_rows"] == size and verdict["reference_rows"] == N_REFERENCE
        assert verdict["checks"] == ["image_features"] and set(verdict["groups"]) == {"image_features"}
        assert snapshot is not None
        for col, result in verdict["features"].items():
            assert result["method"] == "ks" and result["threshold"] == 0.05
            assert result["drifted"] == (result["p_value"] < 0.05), col  # Evidently's flag matches its p-value


def test_clean_windows_with_the_model_reference_are_not_drift(reference, model_reference, model, held_out):
    for start, size in ((0, 150), (150, 500)):
        verdict, _ = drift_report(reference, served(model, held_out[start:start + size]), model_reference=model_reference)
        assert verdict["status"] == "ok", verdict["message"]
        assert verdict["checks"] == ["image_features", "prediction", "embedding"]
        assert not any(g["drifted"] for g in verdict["groups"].values()), verdict["groups"]
        assert "Predictions and embedding match the model reference" in verdict["message"]
        features = verdict["features"]
        assert set(features) == set(FEATURE_COLUMNS) | set(PREDICTION_COLUMNS)  # the embedding is tested as a whole
        assert features["predicted_class"]["method"] == PREDICTION_METHOD and features["confidence"]["method"] == "ks"
        assert features["predicted_class"]["threshold"] == features["confidence"]["threshold"] == 0.005
        assert features["confidence"]["reference_rows"] == len(model_reference) == 300
        assert features["pixel_mean"]["reference_rows"] == N_REFERENCE  # each column against its own reference
        assert all(f["current_rows"] == size for f in features.values())
        embedding = verdict["groups"]["embedding"]
        assert 0.3 < embedding["auc"] < 0.7 and embedding["p_value"] > 0.01
        assert embedding["current_rows"] == size and embedding["reference_rows"] == 300


def test_evidently_default_method_calls_a_clean_small_window_drift(reference, held_out):
    # Why drift_report sets KS explicitly: with > 1000 reference rows Evidently defaults to
    # the normed Wasserstein distance with a fixed 0.1 threshold, blind to the window size.
    verdict, _ = drift_report(reference, image_features(held_out[:60]), method=None, threshold=None)
    assert verdict["features"]["pixel_mean"]["method"] == "Wasserstein distance (normed)"
    assert verdict["status"] == "drift", verdict["message"]  # the same window is "ok" with KS (first test)


def test_evidently_chisquare_calls_a_clean_large_window_drift_the_two_sample_test_does_not(model_reference, model,
                                                                                           held_out):
    # Why predicted_class gets a two-sample test: Evidently's "chisquare" takes the 300-row reference's
    # class shares as exact, so a large clean window "differs" from them by the reference's own noise.
    from evidently.legacy.calculations.stattests.chisquare_stattest import _chi_stat_test

    rng = np.random.default_rng(0)
    window = served(model, held_out[rng.integers(0, len(held_out), 6623)])["predicted_class"].astype(str)
    ref = model_reference["predicted_class"].astype(str)
    p_evidently, _ = _chi_stat_test(ref, window, None, 0.005)
    p_two_sample, drifted = _chi2_two_sample(ref, window, None, 0.005)
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
    verdict, _ = drift_report(reference, current)
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
    verdict, _ = drift_report(reference, current)
    unrotated, _ = drift_report(reference, image_features(window))
    assert verdict["status"] == "ok" and "center_mass_x" in verdict["drifted_features"]
    # whatever the unrotated window already flags by chance (KS at p < 0.05), rotation adds only the centre of mass
    added = set(verdict["drifted_features"]) - set(unrotated["drifted_features"])
    assert added <= {"center_mass_x", "center_mass_y"}
    assert "below the 50%" in verdict["message"]
    strict, _ = drift_report(reference, current, drift_share=0.125)
    assert strict["status"] == "drift" and strict["drift_share_threshold"] == 0.125


@pytest.mark.parametrize("shift", [rotate_90, photo_patches], ids=["rotated-90", "photo-patches"])
def test_the_model_side_checks_catch_what_the_image_features_miss(reference, model_reference, model, held_out, shift):
    verdict, _ = drift_report(reference, served(model, shift(held_out[:200], np.random.default_rng(2))),
                              model_reference=model_reference)
    assert verdict["status"] == "drift", verdict["message"]
    assert verdict["groups"]["prediction"]["drifted"] and verdict["groups"]["embedding"]["drifted"]
    assert verdict["groups"]["embedding"]["auc"] > 0.8 and verdict["groups"]["embedding"]["p_value"] < 1e-6
    assert "the predictions drifted" in verdict["message"] and "the embedding drifted" in verdict["message"]


def test_png_serving_sees_the_same_features_as_training(reference, held_out):
    # No train/serve skew: 8-bit PNG round trip leaves every feature exactly as computed at training time.
    served_features = image_features(png_roundtrip(held_out[:300]))
    np.testing.assert_array_equal(served_features.values, image_features(held_out[:300]).values)
    verdict, _ = drift_report(reference, served_features)
    assert verdict["status"] == "ok" and not verdict["drift_detected"]


# --- guards -----------------------------------------------------------------------------------


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


# --- the request log --------------------------------------------------------------------------


def log_records(features: pd.DataFrame, start: datetime, step_s: float = 1.0, model_version: str = "1",
                source: str = "client") -> list[dict]:
    """Request-log records as the serving handler writes them (model columns when the frame has them)."""
    model_columns = [c for c in MODEL_COLUMNS if c in features.columns]
    records = []
    for i, row in enumerate(features.to_dict(orient="records")):
        record = {"timestamp": (start + timedelta(seconds=i * step_s)).isoformat(timespec="milliseconds"),
                  "model_version": model_version, "source": source, "predicted_class": 3, "predicted_label": "3",
                  "confidence": 0.9, **{c: float(row[c]) for c in FEATURE_COLUMNS}}
        for c in model_columns:
            record[c] = int(row[c]) if c == "predicted_class" else float(row[c])
        records.append(record)
    return records


def write_log(path: Path, records: list[dict], tail: str = "", compact: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if compact else None
    path.write_text("".join(json.dumps(r, separators=separators) + "\n" for r in records) + tail)
    return path


def test_read_request_log_filters_the_time_window(tmp_path, held_out):
    feats = image_features(held_out[:20])
    write_log(tmp_path / "b.jsonl", log_records(feats.iloc[10:], T0 + timedelta(seconds=10)))
    write_log(tmp_path / "a.jsonl", log_records(feats.iloc[:10], T0), compact=True)
    (tmp_path / "notes.txt").write_text("not a log\n")  # only *.jsonl is read
    everything = read_request_log(tmp_path)
    assert len(everything) == 20 and everything["timestamp"].is_monotonic_increasing
    assert str(everything["timestamp"].dt.tz) == "UTC" and everything.attrs["files"] == 2
    # Half-open window [since, until); a naive datetime means UTC; 'Z' suffixes parse.
    window = read_request_log(tmp_path, since=T0 + timedelta(seconds=5), until=(T0 + timedelta(seconds=15)).replace(tzinfo=None))
    assert len(window) == 10
    assert window["timestamp"].min() == pd.Timestamp(T0 + timedelta(seconds=5))
    assert window["timestamp"].max() == pd.Timestamp(T0 + timedelta(seconds=14))
    other_tz = timezone(timedelta(hours=2))
    assert len(read_request_log(tmp_path, since=(T0 + timedelta(seconds=18)).astimezone(other_tz))) == 2
    assert len(read_request_log(tmp_path, until=T0)) == 0
    # Sub-millisecond bounds: the log has milliseconds, so 12:00:05.000 is before 12:00:05.0004.
    assert len(read_request_log(tmp_path, since=T0 + timedelta(seconds=5, microseconds=400))) == 14
    assert len(read_request_log(tmp_path, until=T0 + timedelta(seconds=5, microseconds=400))) == 6


def test_read_request_log_tolerates_partial_and_bad_lines(tmp_path, held_out):
    records = log_records(image_features(held_out[:6]), T0)
    zulu = dict(records[5], timestamp="2025-01-01T12:00:05Z")
    lines = [json.dumps(r) for r in records[:3]] + [
        "{not json",  # damaged line in the middle
        "[1, 2, 3]",  # JSON, but not a record
        json.dumps({k: v for k, v in records[3].items() if k != "timestamp"}),  # no timestamp
        json.dumps(dict(records[4], timestamp="yesterday")),  # unparseable timestamp
        "",  # blank lines are not errors
        json.dumps(zulu),
    ]
    partial = json.dumps(records[0])[:37]  # the server is still writing this request
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n" + partial)
    log = read_request_log(tmp_path)
    assert len(log) == 4
    assert log.attrs["partial_lines"] == 1 and log.attrs["bad_lines"] == 4
    assert log["timestamp"].iloc[-1] == pd.Timestamp("2025-01-01T12:00:05Z")


def test_read_request_log_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="request_log_dir"):
        read_request_log(tmp_path / "nope")
    empty = read_request_log(tmp_path)
    assert len(empty) == 0 and set(FEATURE_COLUMNS) <= set(empty.columns)
    (tmp_path / "empty.jsonl").write_text("")
    assert len(read_request_log(tmp_path)) == 0


def test_the_index_counts_exactly_what_parsing_every_line_counts(tmp_path, held_out):
    # The byte-level index (fixed offsets of timestamp and model version) must agree with json on
    # every layout: compact (the rotating writer), spaced, other key orders, 'Z' or other offsets.
    rng = np.random.default_rng(3)
    feats = image_features(held_out[:400])
    lines = []
    for i, record in enumerate(log_records(feats, T0 - timedelta(minutes=5), step_s=2.0)):
        record["model_version"] = ["1", "2", "1.0", 'we"ird'][i % 4]
        kind = rng.integers(0, 5)
        if kind == 1:
            record["timestamp"] = record["timestamp"].replace("+00:00", "Z")
        elif kind == 2:
            ts = datetime.fromisoformat(record["timestamp"]).astimezone(timezone(timedelta(hours=-3)))
            record["timestamp"] = ts.isoformat(timespec="milliseconds")
        elif kind == 3:
            record = {"model_version": record.pop("model_version"), **record}  # another key order
        lines.append(json.dumps(record, separators=(",", ":") if rng.integers(0, 2) else None))
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    parsed = [json.loads(line) for line in lines]
    times = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) for r in parsed]
    for since, until in ((None, None), (T0, None), (T0 - timedelta(minutes=2), T0 + timedelta(minutes=3))):
        for version in (None, "1", "1.0", 'we"ird', "9"):
            index = index_window(list_log_files(tmp_path), since, until, version)
            in_window = [since is None or t >= since for t in times]
            in_window = [w and (until is None or t < until) for w, t in zip(in_window, times)]
            expected = sum(w and (version is None or r["model_version"] == version) for w, r in zip(in_window, parsed))
            assert index.rows_in_window == sum(in_window), (since, until, version)
            assert index.size == expected, (since, until, version)
            index.close()


def test_rotated_files_that_cannot_hold_the_window_are_not_read(tmp_path, held_out, monkeypatch):
    # serving/request_log.py names files by the time they were opened; their last write (mtime, an object's
    # upload time) bounds their last line: files last written before the window (+10 min slack), or
    # opened after it, are skipped (on s3:// not even downloaded). Files named otherwise are always read.
    import os

    monkeypatch.delenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", raising=False)
    rows = log_records(image_features(held_out[:3]), T0 + timedelta(minutes=30))
    names = {  # name: (last written, read?)
        "requests-h-1-20250101T090000Z-0001.jsonl": (T0 - timedelta(hours=2), False),  # closed by 10:00
        "requests-h-1-20250101T093000Z-0005.jsonl": (T0 + timedelta(minutes=10), True),  # a writer rotating slowly
        "requests-h-1-20250101T105500Z-0002.jsonl": (T0 + timedelta(minutes=5), True),
        "requests-h-1-20250101T123000Z-0003.jsonl": (T0 + timedelta(minutes=45), True),
        "requests-h-1-20250101T131500Z-0004.jsonl": (T0 + timedelta(minutes=80), False),  # opened after the window
        "requests-7.jsonl": (T0 - timedelta(days=9), True),  # an older writer's name: no time in it
    }
    for name, (written, _) in names.items():
        write_log(tmp_path / name, rows)
        os.utime(tmp_path / name, (written.timestamp(), written.timestamp()))
    files = list_log_files(tmp_path, T0, T0 + timedelta(hours=1))
    assert sorted(f.name for f in files) == sorted(n for n, (_, read) in names.items() if read)


def test_without_a_modification_time_the_rotation_age_bounds_a_files_span(monkeypatch):
    from components.monitor.sampling import _may_overlap

    monkeypatch.delenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", raising=False)
    window = (T0, T0 + timedelta(hours=1))
    assert not _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window)  # 1 h default: closed by 10:00
    assert _may_overlap("requests-h-1-20250101T105500Z-0002.jsonl", *window)
    monkeypatch.setenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", str(4 * 3600))  # serving rotates every 4 h
    assert _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window)
    assert not _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window, max_file_age_s=600)  # the config wins


# --- sampling with an error bound ---------------------------------------------------------------


def test_dkw_sample_size_and_epsilon():
    assert dkw_sample_size(0.02, 0.01) == 6623 == math.ceil(math.log(2 / 0.01) / (2 * 0.02**2))
    assert dkw_sample_size(0.05, 0.05) == 738
    assert dkw_epsilon(6623, 0.01) <= 0.02 < dkw_epsilon(6622, 0.01) * 1.0001
    for bad in ((0.0, 0.01), (0.02, 1.0), (-1, 0.5)):
        with pytest.raises(ValueError, match="0 < epsilon < 1 and 0 < alpha < 1"):
            dkw_sample_size(*bad)


def write_big_log(path: Path, n: int, rng: np.random.Generator, source_of=None) -> np.ndarray:
    """n compact log lines, one a second from T0, with a skewed pixel_mean; returns the pixel_mean column."""
    values = rng.beta(2.0, 5.0, n)
    with open(path, "w") as f:
        for i, v in enumerate(values):
            record = {"timestamp": (T0 + timedelta(seconds=i)).isoformat(timespec="milliseconds"), "model_version": "1",
                      "source": source_of(i) if source_of else "client", "pixel_mean": float(v)}
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    return values


def _sup_cdf_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(ks_2samp(a, b).statistic)


def test_sampling_error_stays_within_the_dkw_bound(tmp_path):
    # The claim: with n = ln(2/alpha) / (2 eps^2) rows, sup|F_sample - F_window| <= eps with probability
    # >= 1 - alpha, so KS(reference, sample) is within eps of KS(reference, window). Checked on 200 samples.
    rng = np.random.default_rng(0)
    window = write_big_log(tmp_path / "big.jsonl", 20_000, rng)
    reference = rng.beta(2.2, 5.0, 1000)  # slightly different, so the KS statistic is not ~0
    eps, alpha, repeats = 0.05, 0.05, 200
    index = index_window(list_log_files(tmp_path))
    try:
        cdf_errors, ks_errors = [], []
        ks_window = _sup_cdf_distance(reference, window)
        for seed in range(repeats):
            sample = read_index(index, epsilon=eps, alpha=alpha, seed=seed)
            assert sample.sampled and len(sample.frame) == dkw_sample_size(eps, alpha) == 738
            values = sample.frame["pixel_mean"].to_numpy()
            cdf_errors.append(_sup_cdf_distance(values, window))
            ks_errors.append(abs(_sup_cdf_distance(reference, values) - ks_window))
    finally:
        index.close()
    # Binomial(200, 0.05): mean 10, P(> 20) < 0.2%.
    assert sum(e > eps for e in cdf_errors) <= 20, sorted(cdf_errors)[-25:]
    assert sum(e > eps for e in ks_errors) <= sum(e > eps for e in cdf_errors)  # the triangle inequality
    assert np.mean(cdf_errors) > eps / 4, "the bound is not vacuous: sampling does move the CDF"


def test_a_sample_below_the_bound_size_misses_it_more_often(tmp_path):
    # The negative control of the test above: a tenth of the rows breaks the bound far more often than alpha.
    rng = np.random.default_rng(1)
    window = write_big_log(tmp_path / "big.jsonl", 20_000, rng)
    index = index_window(list_log_files(tmp_path))
    try:
        eps = 0.05
        too_small = dkw_epsilon(74, 0.05)  # what read_index is asked for to draw 74 rows
        errors = [_sup_cdf_distance(read_index(index, epsilon=too_small, alpha=0.05, seed=s).frame["pixel_mean"].to_numpy(),
                                    window) for s in range(100)]
    finally:
        index.close()
    assert sum(e > eps for e in errors) > 30


def test_sampling_is_uniform_over_lines_not_bytes_and_rejects_excluded_sources(tmp_path):
    # Long and short lines, with the long ones all pixel_mean 1.0: a byte-offset sampler would
    # over-draw them. A third of the lines are smoke tests, which must never be sampled.
    lines = []
    for i in range(30_000):
        long = i % 2 == 0
        record = {"timestamp": (T0 + timedelta(milliseconds=10 * i)).isoformat(timespec="milliseconds"),
                  "model_version": "1", "source": "smoke-test" if i % 3 == 0 else "client",
                  "predicted_label": "x" * (600 if long else 1), "pixel_mean": 1.0 if long else 0.0}
        lines.append(json.dumps(record, separators=(",", ":")))
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    sample = read_window(tmp_path, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05, alpha=0.05)
    assert sample.sampled and len(sample.frame) == 738 and set(sample.frame["source"]) == {"client"}
    share_long = sample.frame["pixel_mean"].mean()
    assert abs(share_long - 0.5) < 4 * 0.5 / math.sqrt(738), share_long  # 4 sigma
    assert sample.rows_in_window == sample.rows_of_version == 30_000
    assert abs(sample.rows_selected - 20_000) < 20_000 * 0.1  # estimated from the accepted share
    assert sample.stats()["rows_selected_estimated"] is True
    again = read_window(tmp_path, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05, alpha=0.05)
    pd.testing.assert_frame_equal(sample.frame, again.frame)  # seeded by (version, window): reproducible
    other = read_window(tmp_path, T0, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05,
                        alpha=0.05)
    assert window_seed("1", T0, None) != window_seed("1", None, None) and not other.frame.equals(sample.frame)


def test_small_windows_are_read_whole(tmp_path, held_out):
    write_log(tmp_path / "r.jsonl", log_records(image_features(held_out[:100]), T0))
    sample = read_window(tmp_path, epsilon=0.05, alpha=0.05)
    assert not sample.sampled and len(sample.frame) == 100 and sample.epsilon == 0.0
    assert sample.sampling()["bound"].startswith("exact")


# --- monitor(): the files it writes ---------------------------------------------------------


def test_monitor_writes_verdict_and_report_for_its_window_only(tmp_path, reference, held_out):
    reference_csv = tmp_path / REFERENCE_FILE
    reference.to_csv(reference_csv, index=False)
    logs = tmp_path / "requests"
    inverted = image_features(1.0 - held_out[:200])
    # Clean v1 traffic in the window; inverted traffic before it, from another model version
    # and from the smoke test inside it: none of that may leak into the verdict.
    write_log(logs / "old.jsonl", log_records(inverted.iloc[:100], T0 - timedelta(hours=1)))
    clean = log_records(image_features(held_out[:150]), T0, step_s=0.5)
    for record in clean[:30]:
        record["edge_strength"] = None  # some NaN: reported, and the test runs on the other rows
    write_log(logs / "live.jsonl",
              clean
              + log_records(inverted.iloc[100:150], T0, model_version="2")
              + log_records(inverted.iloc[150:], T0, source=EXCLUDED_SOURCES[0]),
              tail='{"timestamp": "2025-01-01T12:')
    out = tmp_path / "out"
    result = monitor(reference_csv, logs, out, since=T0, until=T0 + timedelta(hours=1), model_version="1")
    assert result["status"] == "ok", result["message"]
    assert result["current_rows"] == 150 and result["log"]["rows_in_window"] == 250
    assert result["log"]["rows_of_version"] == 200 and result["log"]["rows_selected"] == 150
    assert result["log"]["partial_lines"] == 1 and result["log"]["bad_lines"] == 0
    assert result["nan_share"]["edge_strength"] == {"reference": 0.0, "current": 0.2}
    assert result["features"]["edge_strength"]["current_rows"] == 120
    assert result["features"]["pixel_mean"]["current_rows"] == 150
    assert result["sampling"]["sampled"] is False and result["sampling"]["rows"] == 150
    # No model reference: image features only, and the verdict says so.
    assert result["checks"] == ["image_features"] and result["model_reference"]["found"] is False
    assert "image features only" in result["message"]
    saved = json.loads(Path(result["verdict_json"]).read_text())
    assert saved == {k: v for k, v in result.items() if k not in ("report_html", "verdict_json", "metrics_prom")}
    report = Path(result["report_html"]).read_text()
    assert Path(result["report_html"]) == out / "drift_report.html"
    assert "Dataset Drift" in report and all(c in report for c in FEATURE_COLUMNS)  # Evidently's report
    assert "Drift verdict: ok" in report  # our summary on top
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files

    # An empty window: the guard's verdict and a small page that explains it, no Evidently run.
    empty = monitor(reference_csv, logs, out, since=T0 + timedelta(days=1))
    assert empty["status"] == "insufficient_data" and empty["current_rows"] == 0
    page = Path(empty["report_html"]).read_text()
    assert "No requests in the window" in page and "insufficient data" in page
    other = monitor(reference_csv, logs, out, since=T0, until=T0 + timedelta(hours=1), model_version="9")
    assert other["status"] == "insufficient_data" and "250 other requests in the time window" in other["message"]
    assert json.loads(Path(empty["verdict_json"]).read_text())["status"] == "insufficient_data"
    assert 'kfp_mlops_drift_status{model_version="9",status="insufficient_data"} 1' in Path(
        other["metrics_prom"]).read_text()  # the last run into `out`


@pytest.mark.parametrize("kwargs, versions, sources", [
    ({}, ["1", "2", "1"], ["client", "replay", None]),  # smoke tests are dropped by default
    ({"model_version": "1"}, ["1", "1"], ["client", None]),
    ({"model_version": 2}, ["2"], ["replay"]),  # numbers and strings name the same version
    ({"source": "replay"}, ["2"], ["replay"]),
    ({"source": "client"}, ["1", "1"], ["client", None]),  # rows without a source are client traffic
    ({"exclude_sources": ()}, ["1", "2", "1", "1"], ["client", "replay", None, "smoke-test"]),
], ids=["default", "version", "numeric-version", "replay-only", "client-only", "keep-smoke"])
def test_select_traffic(kwargs, versions, sources):
    log = pd.DataFrame({"model_version": ["1", "2", "1", "1"], "source": ["client", "replay", None, "smoke-test"]})
    kept = select_traffic(log, **kwargs)
    assert kept["model_version"].tolist() == versions and kept["source"].tolist() == sources


def test_monitor_missing_reference_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="written by ingest"):
        monitor(tmp_path / "reference.csv", tmp_path, tmp_path / "out")


# --- the CLI: verdict on stdout, idempotent results, Prometheus metrics ------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    import contextlib

    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, reference, model_dir, model, held_out):
    """`mlops monitor --json` on a clean hour (twice) and a drifted hour of a log with model columns."""
    root = tmp_path_factory.mktemp("cli")
    reference.to_csv(root / "reference.csv", index=False)
    # Published next to the feature reference, the model reference is found without a flag.
    (root / MODEL_REFERENCE_FILE).write_bytes((model_dir / MODEL_REFERENCE_FILE).read_bytes())
    logs = root / "requests"
    write_log(logs / "requests-host-1-20250101T120000Z-0001.jsonl",
              log_records(served(model, held_out[:300]), T0, step_s=10, model_version="m1")
              + log_records(served(model, rotate_90(held_out[300:600], None)), T0 + timedelta(hours=1), step_s=10,
                            model_version="m1"), compact=True)
    common = ["monitor", "--json", "--log-dir", str(logs), "--reference", str(root / "reference.csv"),
              "--model-version", "m1", "--out", str(root / "out")]
    clean = ["--since", "2025-01-01T12:00:00Z", "--until", "2025-01-01T13:00:00Z"]
    drifted = ["--since", "2025-01-01T13:00:00Z", "--until", "2025-01-01T14:00:00Z"]
    runs = {"clean": run_cli(common + clean)}
    runs["clean_files"] = {p.name: p.read_bytes() for p in (root / "out" / "m1").glob("*/*")}
    runs["rerun"] = run_cli(common + clean)
    runs["drifted"] = run_cli(common + drifted)
    return root, runs


def _last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_prints_the_verdict_as_its_last_line(cli_runs):
    root, runs = cli_runs
    (code, stdout, _), (drift_code, drift_stdout, _) = runs["clean"], runs["drifted"]
    clean, drifted = _last_json_line(stdout), _last_json_line(drift_stdout)
    assert code == 0 and clean["drift_detected"] is False and clean["status"] == "ok", clean["message"]
    assert drift_code == 2 and drifted["drift_detected"] is True and drifted["status"] == "drift"
    assert {"predicted_class", "confidence"} <= set(drifted["drifted_features"])
    assert drifted["model_reference"] == {"path": str(root / MODEL_REFERENCE_FILE), "found": True, "rows": 300}
    for verdict in (clean, drifted):
        assert verdict["checks"] == ["image_features", "prediction", "embedding"]
        assert verdict["model_version"] == "m1" and verdict["current_rows"] == 300
        for column, result in verdict["features"].items():  # per feature: the method and the sample sizes
            assert result["method"] in ("ks", PREDICTION_METHOD) and result["current_rows"] == 300, column
            assert result["reference_rows"] == (N_REFERENCE if column in FEATURE_COLUMNS else 300)
        assert verdict["groups"]["embedding"]["method"].startswith("Evidently ModelDriftMethod")


def test_results_are_idempotent_per_model_version_and_window(cli_runs):
    root, runs = cli_runs
    first, second = _last_json_line(runs["clean"][1]), _last_json_line(runs["rerun"][1])
    assert first == second
    window_dirs = sorted(p.relative_to(root / "out").as_posix() for p in (root / "out").glob("*/*"))
    assert window_dirs == ["m1/20250101T120000.000Z--20250101T130000.000Z",
                           "m1/20250101T130000.000Z--20250101T140000.000Z"]  # a rerun adds nothing
    clean_dir = root / "out" / window_dirs[0]
    assert Path(first["verdict_json"]).parent == clean_dir
    rerun_files = {p.name: p.read_bytes() for p in clean_dir.iterdir()}
    assert set(rerun_files) == {"drift_report.html", "verdict.json", "drift.prom"}
    for name, content in rerun_files.items():  # byte for byte, the Evidently HTML included
        assert content == runs["clean_files"][name], name


PROM_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """A strict reader of the text exposition format: HELP/TYPE before a family's samples, valid names,
    labels and values, one family in one block, a final newline."""
    assert text.endswith("\n") and "\n\n" not in text
    samples, typed, helped, seen_families = {}, {}, set(), []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge" and name not in typed
            typed[name] = kind
            seen_families.append(name)
        else:
            match = PROM_SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name == seen_families[-1], f"{name} outside its family's block"
            labels = match["labels"] or ""
            pairs = PROM_LABEL.findall(labels)
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, f"bad labels: {labels!r}"
            unescaped = {k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\") for k, v in pairs}
            value = match["value"]
            assert value in ("NaN", "+Inf", "-Inf") or re.fullmatch(r"-?\d+(\.\d+)?(e[-+]?\d+)?", value), value
            key = (name, frozenset(unescaped.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = float(value)
    assert set(typed) == helped
    return samples


def test_prometheus_metrics_are_valid_text_format(cli_runs):
    root, runs = cli_runs
    drifted = _last_json_line(runs["drifted"][1])
    samples = parse_prometheus(Path(drifted["metrics_prom"]).read_text())
    version = ("model_version", "m1")

    def value(name, **labels):
        return samples[(f"kfp_mlops_drift_{name}", frozenset({version, *labels.items()}))]

    assert value("detected") == 1 and value("alert") == 1
    assert value("status", status="drift") == 1 and sum(value("status", status=s) for s in STATUSES) == 1
    assert value("group_drifted", group="embedding") == 1 and value("group_drifted", group="prediction") == 1
    assert value("feature_drifted", feature="predicted_class", method=PREDICTION_METHOD) == 1
    assert value("feature_p_value", feature="pixel_std", method="ks") == pytest.approx(
        drifted["features"]["pixel_std"]["p_value"])
    assert value("embedding_auc") == pytest.approx(drifted["groups"]["embedding"]["auc"])
    assert value("checked_requests") == 300 and value("window_requests") == 300
    assert value("window_end_timestamp_seconds") == datetime(2025, 1, 1, 14, tzinfo=timezone.utc).timestamp()
    # Label values are escaped: quotes, backslashes and newlines survive the round trip.
    odd = dict(drifted, model_version='v"1\\x\ny')
    assert ("kfp_mlops_drift_detected", frozenset({("model_version", 'v"1\\x\ny')})) in parse_prometheus(
        prometheus_metrics(odd))


@pytest.mark.parametrize("argv, message", [
    (["--last", "1h", "--since", "2025-01-01T00:00:00Z"], "give --last, or --since/--until, not both"),
    (["--settle", "1h"], "--settle only applies to --last"),
    (["--last", "an hour"], "not a duration: 'an hour'"),
], ids=["last-and-since", "settle-alone", "bad-duration"])
def test_cli_rejects_contradictory_windows(tmp_path, argv, message):
    code, _, err = run_cli(["monitor", "--log-dir", str(tmp_path), "--reference", str(tmp_path / "r.csv"), *argv])
    assert code == 1 and message in err, err


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
                                           ("2W", 1209600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


def test_last_window_is_the_last_whole_period_after_settling():
    now = datetime(2025, 1, 1, 11, 17, 5, tzinfo=timezone.utc)
    assert last_window(timedelta(hours=1), now=now) == (datetime(2025, 1, 1, 10, tzinfo=timezone.utc),
                                                        datetime(2025, 1, 1, 11, tzinfo=timezone.utc))
    assert last_window(timedelta(hours=1), timedelta(hours=1), now=now)[0] == datetime(2025, 1, 1, 9, tzinfo=timezone.utc)
    assert last_window(timedelta(days=1), now=now) == (datetime(2024, 12, 31, tzinfo=timezone.utc),
                                                       datetime(2025, 1, 1, tzinfo=timezone.utc))
    # reruns within the period get the same window (and so the same results directory)
    assert last_window(timedelta(hours=1), now=now + timedelta(minutes=40)) == last_window(timedelta(hours=1), now=now)
    with pytest.raises(ValueError, match="positive period"):
        last_window(timedelta(0))


def test_result_dir_is_keyed_by_version_and_window():
    assert result_dir("runs/monitor", "abc", T0, T0 + timedelta(hours=1)) == \
        "runs/monitor/abc/20250101T120000.000Z--20250101T130000.000Z"
    assert result_dir("s3://b/verdicts/", None, None, T0) == "s3://b/verdicts/all-versions/start--20250101T120000.000Z"
    assert result_dir("out", "a/b c", T0, None).startswith("out/a_b_c/")


# --- replay over real HTTP ------------------------------------------------------------------


class FakeServing:
    """A loopback stand-in for TorchServe: checks the bearer token, decodes the PNG and, like the
    real handler, logs one JSONL line of features per answered request (with ``model``: also its
    prediction, confidence and embedding projection)."""

    def __init__(self, root: Path, token: str = "s3cret", model_version: str = "1", model=None):
        self.token, self.model_version, self.requests, self.rejected = token, model_version, 0, 0
        self.model = model
        self.log_dir = root / "requests"
        self.token_file = root / "key_file.json"
        self.token_file.write_text(json.dumps({"inference": {"key": token}, "management": {"key": "m"}}))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    fake.rejected += 1
                    return self._reply(401, {"message": "bad token"})
                if self.headers.get("Content-Type") != "image/png" or not body.startswith(b"\x89PNG"):
                    return self._reply(400, {"message": "expected a PNG"})
                fake.requests += 1
                pixels = np.asarray(Image.open(io.BytesIO(body)), dtype=np.float32)[None, None] / 255.0
                logged = served(fake.model, pixels) if fake.model is not None else image_features(pixels)
                record = log_records(logged, datetime.now(timezone.utc), model_version=fake.model_version,
                                     source=self.headers.get("X-Request-Source", "client"))[0]
                fake.log_dir.mkdir(exist_ok=True)
                with open(fake.log_dir / "requests.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                self._reply(200, {"label": "3", "class_index": 3, "confidence": 0.9, "model_version": fake.model_version})

            def _reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/predictions/digits"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_replay_sends_pngs_with_the_token(tmp_path, held_out):
    with FakeServing(tmp_path) as serving:
        assert replay(serving.endpoint, serving.token_file, held_out[:5], limit=3) == 3
        assert serving.requests == 3
        assert replay(serving.endpoint, serving.token_file, held_out[:5]) == 5  # limit 0 = all
        assert serving.requests == 8
        log = read_request_log(serving.log_dir)
        assert len(log) == 8 and set(log["source"]) == {REPLAY_SOURCE}

        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({"inference": {"key": "guess"}}))
        with pytest.raises(RuntimeError, match=r"request 1 of 2 .*HTTP 401"):
            replay(serving.endpoint, wrong, held_out[:2])
        assert serving.rejected == 1  # stopped at the first failure
    with pytest.raises(ValueError, match=">= 0"):
        replay("http://127.0.0.1:9", serving.token_file, held_out[:2], limit=-1)
    with pytest.raises(FileNotFoundError, match="token file .* not found"):
        replay("http://127.0.0.1:9", tmp_path / "missing.json", held_out[:2])


@pytest.mark.slow
@pytest.mark.parametrize("with_model", [False, True], ids=["features-only", "with-model"])
def test_monitor_component_replays_the_test_split_and_judges_only_that(tmp_path, digits, model, model_dir, with_model):
    splits = Splits(train_x=digits[:900], train_y=np.zeros(900, np.int64), val_x=digits[900:1100],
                    val_y=np.zeros(200, np.int64), test_x=digits[1100:1300], test_y=np.zeros(200, np.int64),
                    pool_x=digits[1300:1310], class_names=[str(i) for i in range(10)])
    dataset_dir = tmp_path / "dataset"
    save_splits(splits, dataset_dir)
    image_features(np.concatenate([splits.train_x, splits.val_x])).assign(label=0).to_csv(
        dataset_dir / REFERENCE_FILE, index=False)

    with FakeServing(tmp_path, model_version="7", model=model if with_model else None) as serving:
        # Earlier inverted client traffic of the same version: outside the replay's window.
        write_log(serving.log_dir / "requests.jsonl",
                  log_records(image_features(1.0 - digits[:100]), datetime.now(timezone.utc) - timedelta(minutes=5),
                              model_version="7"))
        record = tmp_path / "deployment.json"
        record.write_text(json.dumps({"endpoint": serving.endpoint, "token_file": str(serving.token_file),
                                      "request_log_dir": str(serving.log_dir), "model_version": "7"}))
        outputs = tmp_path / "outputs"
        report = HTML(name="drift_report", uri=str(outputs / "drift_report.html"))
        verdict = Artifact(name="verdict", uri=str(outputs / "verdict.json"))
        metrics = Metrics(name="metrics", uri=str(outputs / "metrics"))
        monitor_component(dataset=Dataset(name="dataset", uri=str(dataset_dir)),
                          deployment=Artifact(name="deployment", uri=str(record)),
                          cfg=settings_of(monitor=MonitorConfig(drift_share=0.5, replay_limit=150)),
                          drift_report=report, verdict=verdict, metrics=metrics,
                          model=Model(name="model", uri=str(model_dir)) if with_model else None)
        assert serving.requests == 150

    result = json.loads(Path(verdict.path).read_text())
    assert result["status"] == "ok", result["message"]
    assert result["current_rows"] == 150 and result["log"]["source"] == REPLAY_SOURCE
    assert "Dataset Drift" in Path(report.path).read_text()
    assert metrics.metadata["requests_replayed"] == 150 and metrics.metadata["current_rows"] == 150
    assert metrics.metadata["drift_detected"] == 0.0 and metrics.metadata["cost_wall_seconds"] > 0
    assert metrics.metadata["image_features_drifted"] == 0.0
    if with_model:  # the model's reference_model.csv adds the prediction and embedding checks
        assert result["checks"] == ["image_features", "prediction", "embedding"] and metrics.metadata["checks"] == 3
        assert metrics.metadata["embedding_drifted"] == 0.0 and metrics.metadata["prediction_drifted"] == 0.0
    else:
        assert metrics.metadata["checks"] == 1 and result["model_reference"]["found"] is False


# --- end to end: a real TorchServe, its request log, the CLI ----------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, digits_and_labels, model_dir):
    """One real TorchServe for the module (components.deploy.local.deploy_local, free ports) serving the tiny model."""
    from components.deploy.local import deploy_local
    from serving.server import LocalTorchServe, free_port

    images, labels = digits_and_labels
    root = tmp_path_factory.mktemp("served")
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=empty, val_y=np.zeros(0, np.int64),
                       test_x=images[N_REFERENCE:N_REFERENCE + 16], test_y=labels[N_REFERENCE:N_REFERENCE + 16],
                       pool_x=empty, class_names=[str(i) for i in range(10)]), root / "dataset")
    home = root / "serving"
    try:
        record = deploy_local(model_dir, root / "dataset", home, inference_port=free_port(),
                              management_port=free_port(), metrics_port=free_port(), startup_timeout_s=180)
        yield record
    finally:
        LocalTorchServe(home).stop(quiet=True)


@pytest.mark.slow
def test_clean_and_shifted_traffic_through_the_real_server_and_its_log(real_server, reference, model_dir, held_out,
                                                                        tmp_path):
    from components.monitor.monitor import wait_for_log

    record = real_server
    reference.to_csv(tmp_path / "reference.csv", index=False)
    windows = {
        "clean": held_out[16:216],
        "inverted": 1.0 - held_out[216:416],
        "rotated-90": rotate_90(held_out[416:616], None),
        "photo": photo_patches(held_out[:200], np.random.default_rng(5)),
    }
    verdicts = {}
    for name, images in windows.items():
        # Windows back to back on one clock: each holds exactly its own requests (the deploy step's
        # smoke test, before the first, is excluded by its source anyway).
        since = datetime.now(timezone.utc)
        sent = replay(record["endpoint"], record["source_token_file"], images, source=f"e2e-{name}")
        assert wait_for_log(record["request_log_dir"], since, sent, model_version=record["model_version"],
                            source=f"e2e-{name}", timeout_s=60) == sent
        until = datetime.now(timezone.utc) + timedelta(milliseconds=1)
        code, stdout, err = run_cli(["monitor", "--json", "--log-dir", record["request_log_dir"],
                                     "--reference", str(tmp_path / "reference.csv"),
                                     "--model-reference", str(model_dir / MODEL_REFERENCE_FILE),
                                     "--model-version", record["model_version"], "--since", since.isoformat(),
                                     "--until", until.isoformat(), "--out", str(tmp_path / "out")])
        verdicts[name] = verdict = _last_json_line(stdout)
        assert verdict["current_rows"] == sent == 200 and verdict["log"]["rows_in_window"] == 200, (name, err)
        assert set(verdict["checks"]) == {"image_features", "prediction", "embedding"}
        assert code == (0 if name == "clean" else 2), (name, verdict["message"])

    clean = verdicts["clean"]
    assert clean["status"] == "ok" and not any(g["drifted"] for g in clean["groups"].values()), clean["message"]
    for name in ("inverted", "rotated-90", "photo"):
        verdict = verdicts[name]
        assert verdict["status"] == "drift" and verdict["groups"]["embedding"]["drifted"], (name, verdict["message"])
        assert verdict["groups"]["prediction"]["drifted"], name
    assert verdicts["inverted"]["groups"]["image_features"]["drifted"]
    assert verdicts["photo"]["groups"]["image_features"]["drifted"]
    # A right-angle turn keeps 6 of 8 image features exactly: only the model-side checks see it.
    assert not verdicts["rotated-90"]["groups"]["image_features"]["drifted"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.mark.slow
def test_monitor_reads_logs_and_references_from_s3_and_writes_results_there(moto, cli_runs, monkeypatch, tmp_path):
    from s3server import s3_env

    from components.core import storage
    from components.core.storage import Storage

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_env(moto.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the downloaded-log cache
    Storage().client.create_bucket(Bucket="mon")
    root, runs = cli_runs
    storage.put_dir(root / "requests", "s3://mon/request-logs")
    storage.put_file(root / "reference.csv", "s3://mon/monitoring/reference.csv")
    storage.put_file(root / MODEL_REFERENCE_FILE, f"s3://mon/monitoring/{MODEL_REFERENCE_FILE}")
    argv = ["monitor", "--json", "--log-dir", "s3://mon/request-logs", "--reference", "s3://mon/monitoring/reference.csv",
            "--model-version", "m1", "--since", "2025-01-01T13:00:00Z", "--until", "2025-01-01T14:00:00Z"]
    code, stdout, err = run_cli(argv)
    verdict = _last_json_line(stdout)
    local = _last_json_line(runs["drifted"][1])
    assert code == 2 and verdict["status"] == "drift", err
    key = "s3://mon/monitoring/verdicts/m1/20250101T130000.000Z--20250101T140000.000Z"
    assert verdict["verdict_json"] == f"{key}/verdict.json"  # results next to the s3:// reference by default
    assert verdict["model_reference"]["found"] is True  # found next to the reference
    same = ("features", "groups", "drifted_features", "current_rows", "sampling", "nan_share")
    assert {k: verdict[k] for k in same} == {k: local[k] for k in same}  # the same answer as from local files
    assert json.loads(storage.read_bytes(f"{key}/verdict.json"))["status"] == "drift"
    first = sorted(storage.list_uris("s3://mon/monitoring/verdicts"))
    assert first == [f"{key}/{name}" for name in ("drift.prom", "drift_report.html", "verdict.json")]
    assert run_cli(argv)[0] == 2 and sorted(storage.list_uris("s3://mon/monitoring/verdicts")) == first
