"""Monitor: noise vs real shifts, the window guards, log reading, the written outputs and replay over real HTTP."""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pandas as pd
import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits, load_sample_images

from components.data import REFERENCE_FILE, Splits, save_splits
from components.features import FEATURE_COLUMNS, image_features
from components.monitor import (
    EXCLUDED_SOURCES,
    REPLAY_SOURCE,
    check_window,
    drift_report,
    monitor,
    monitor_component,
    read_request_log,
    replay,
    select_traffic,
)
from serving.client import encode_png

N_REFERENCE = 1100  # like ingest's train+val reference on digits
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """sklearn digits as [N, 1, 8, 8] in [0, 1], shuffled once (the file is ordered by writer)."""
    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    return images[np.random.default_rng(0).permutation(len(images))]


@pytest.fixture(scope="module")
def reference(digits) -> pd.DataFrame:
    ref = image_features(digits[:N_REFERENCE])
    ref["label"] = 0  # ingest adds the label column; the monitor must ignore it
    return ref


@pytest.fixture(scope="module")
def held_out(digits) -> np.ndarray:
    """697 digits the reference never saw: i.i.d. production traffic."""
    return digits[N_REFERENCE:]


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


def photo_patches(x, rng):
    """A different kind of image: 8x8 grey thumbnails of patches of a photo."""
    photo = load_sample_images().images[0].mean(axis=2) / 255.0  # china.jpg, [427, 640]
    out = np.empty_like(x)
    for i in range(len(x)):
        r, c = rng.integers(0, photo.shape[0] - 32), rng.integers(0, photo.shape[1] - 32)
        out[i, 0] = photo[r:r + 32, c:c + 32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    return out


def test_iid_clean_windows_are_not_drift(reference, held_out):
    # Three disjoint windows of different sizes: KS keeps its false-alarm rate at every size.
    for start, size in ((0, 60), (60, 150), (210, 400)):
        verdict, snapshot = drift_report(reference, image_features(held_out[start:start + size]))
        assert verdict["status"] == "ok", verdict["message"]
        assert verdict["drift_detected"] is False and verdict["alert"] is False
        assert verdict["drift_share"] < 0.5 and len(verdict["drifted_features"]) <= 1, verdict["drifted_features"]
        assert verdict["current_rows"] == size and verdict["reference_rows"] == N_REFERENCE
        assert snapshot is not None
        for col, result in verdict["features"].items():
            assert result["method"] == "ks" and result["threshold"] == 0.05
            assert result["drifted"] == (result["p_value"] < 0.05), col  # Evidently's flag matches its p-value


def test_evidently_default_method_calls_a_clean_small_window_drift(reference, held_out):
    # Why drift_report sets KS explicitly: with > 1000 reference rows Evidently defaults to
    # the normed Wasserstein distance with a fixed 0.1 threshold, blind to the window size.
    verdict, _ = drift_report(reference, image_features(held_out[:60]), method=None, threshold=None)
    assert verdict["features"]["pixel_mean"]["method"] == "Wasserstein distance (normed)"
    assert verdict["status"] == "drift", verdict["message"]  # the same window is "ok" with KS (first test)


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
    assert verdict["drift_share"] >= 0.5
    assert must_name <= drifted, f"expected {must_name} among {drifted}"
    assert not (must_not_name & drifted), f"{must_not_name & drifted} cannot change under this shift"
    for col in must_name:
        assert col in verdict["message"]
        assert verdict["features"][col]["p_value"] < 1e-6  # a real shift is not a borderline call


def test_right_angle_rotation_moves_only_the_centre_of_mass(reference, held_out):
    # A 90-degree turn permutes pixels: six features are exactly unchanged, so only 2 of 8 can
    # drift. Both are named; calling the window drifted needs a lower drift_share.
    window = held_out[:300]
    current = image_features(np.rot90(window, 1, axes=(2, 3)).copy())
    verdict, _ = drift_report(reference, current)
    unrotated, _ = drift_report(reference, image_features(window))
    assert verdict["status"] == "ok" and "center_mass_x" in verdict["drifted_features"]
    # whatever the unrotated window already flags by chance (KS at p < 0.05), rotation adds only the centre of mass
    added = set(verdict["drifted_features"]) - set(unrotated["drifted_features"])
    assert added <= {"center_mass_x", "center_mass_y"}
    assert "below the 50%" in verdict["message"]
    strict, _ = drift_report(reference, current, drift_share=0.125)
    assert strict["status"] == "drift" and strict["drift_share_threshold"] == 0.125


def test_png_serving_sees_the_same_features_as_training(reference, held_out):
    # No train/serve skew: 8-bit PNG round trip leaves every feature exactly as computed at training time.
    served = image_features(png_roundtrip(held_out[:300]))
    np.testing.assert_array_equal(served.values, image_features(held_out[:300]).values)
    verdict, _ = drift_report(reference, served)
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


@pytest.mark.parametrize("rows, mutate, status, message", [
    (0, None, "insufficient_data", "No requests in the window"),
    (10, None, "insufficient_data", "Only 10 usable requests"),
    (29, None, "insufficient_data", "fewer than the 30 needed"),
    (100, lambda df: df.drop(columns=["edge_strength"]), "schema_drift", "missing from the request log: edge_strength"),
    (100, lambda df: df.drop(columns=FEATURE_COLUMNS[:2]), "schema_drift", "pixel_mean, pixel_std"),
    (100, _with("pixel_std", lambda df: df["pixel_std"].map(lambda v: f"{v:.3f}")), "schema_drift", "pixel_std is object"),
    (100, _with("ink_fraction", lambda df: [*df["ink_fraction"].iloc[:-1], "n/a"]), "schema_drift", "'n/a'"),
    (100, _with("pixel_max", True), "schema_drift", "pixel_max is bool"),
    (100, _nan_first("center_mass_x", 0.8), "schema_drift", "center_mass_x 80% NaN vs 0% in the reference"),
    (100, _with("center_mass_y", None), "schema_drift", "center_mass_y 100% NaN"),  # JSON null everywhere
    (40, _nan_first("edge_strength", 0.3), "insufficient_data", "Only 28 usable requests"),
    (100, _nan_first("edge_strength", 0.2), None, None),  # some NaN: reported, not fatal
    (100, _with("predicted_label", "7"), None, None),  # extra (string) columns are ignored
    (100, lambda df: df[FEATURE_COLUMNS[::-1]], None, None),  # column order does not matter
], ids=["empty", "too-few", "one-short", "missing-column", "missing-two", "retyped-strings", "one-string",
        "retyped-bool", "mostly-nan", "all-null", "nan-leaves-too-few", "some-nan", "extra-columns", "reordered"])
def test_check_window_guards(reference, held_out, rows, mutate, status, message):
    current = image_features(held_out[:rows]) if rows else pd.DataFrame(columns=FEATURE_COLUMNS)
    if mutate is not None:
        current = mutate(current)
    verdict = check_window(reference, current)
    if status is None:
        assert verdict is None
        return
    assert verdict.status == status and message in verdict.message, verdict.message
    assert verdict.drift_detected is False and verdict.current_rows == rows
    assert verdict.alert == (status == "schema_drift")


@pytest.mark.parametrize("mutate, message", [
    (lambda ref: ref.drop(columns=["pixel_min"]), "reference lacks feature columns ['pixel_min']"),
    (lambda ref: ref.assign(pixel_min="0"), "reference feature columns ['pixel_min'] are not numeric"),
    (lambda ref: ref.iloc[:0], "reference has no rows"),
], ids=["missing", "retyped", "empty"])
def test_broken_reference_raises(reference, held_out, mutate, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_window(mutate(reference), image_features(held_out[:50]))


# --- the request log --------------------------------------------------------------------------


def log_records(features: pd.DataFrame, start: datetime, step_s: float = 1.0, model_version: str = "1",
                source: str = "client") -> list[dict]:
    """Request-log records as the serving handler writes them."""
    return [
        {"timestamp": (start + timedelta(seconds=i * step_s)).isoformat(timespec="milliseconds"),
         "model_version": model_version, "predicted_class": 3, "predicted_label": "3", "confidence": 0.9,
         "source": source, **{c: float(row[c]) for c in FEATURE_COLUMNS}}
        for i, (_, row) in enumerate(features.iterrows())
    ]


def write_log(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_request_log_filters_the_time_window(tmp_path, held_out):
    feats = image_features(held_out[:20])
    write_log(tmp_path / "b.jsonl", log_records(feats.iloc[10:], T0 + timedelta(seconds=10)))
    write_log(tmp_path / "a.jsonl", log_records(feats.iloc[:10], T0))
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
    assert result["log"]["partial_lines"] == 1 and result["log"]["bad_lines"] == 0
    assert result["nan_share"]["edge_strength"] == {"reference": 0.0, "current": 0.2}
    assert result["features"]["edge_strength"]["current_rows"] == 120
    assert result["features"]["pixel_mean"]["current_rows"] == 150
    saved = json.loads(Path(result["verdict_json"]).read_text())
    assert saved == {k: v for k, v in result.items() if k not in ("report_html", "verdict_json")}
    report = Path(result["report_html"]).read_text()
    assert Path(result["report_html"]) == out / "drift_report.html"
    assert "Dataset Drift" in report and all(c in report for c in FEATURE_COLUMNS)  # Evidently's report
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files

    # An empty window: the guard's verdict and a small page that explains it, no Evidently run.
    empty = monitor(reference_csv, logs, out, since=T0 + timedelta(days=1))
    assert empty["status"] == "insufficient_data" and empty["current_rows"] == 0
    page = Path(empty["report_html"]).read_text()
    assert "No requests in the window" in page and "insufficient data" in page
    other = monitor(reference_csv, logs, out, since=T0, until=T0 + timedelta(hours=1), model_version="9")
    assert other["status"] == "insufficient_data" and "250 other requests in the time window" in other["message"]
    assert json.loads(Path(empty["verdict_json"]).read_text())["status"] == "insufficient_data"


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


# --- replay over real HTTP ------------------------------------------------------------------


class FakeServing:
    """A loopback stand-in for TorchServe: checks the bearer token, decodes the PNG and, like the
    real handler, logs one JSONL line of features per answered request."""

    def __init__(self, root: Path, token: str = "s3cret", model_version: str = "1"):
        self.token, self.model_version, self.requests, self.rejected = token, model_version, 0, 0
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
                record = log_records(image_features(pixels), datetime.now(timezone.utc), model_version=fake.model_version,
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
    with pytest.raises(FileNotFoundError, match="key file"):
        replay("http://127.0.0.1:9", tmp_path / "missing.json", held_out[:2])


@pytest.mark.slow
def test_monitor_component_replays_the_test_split_and_judges_only_that(tmp_path, digits):
    splits = Splits(train_x=digits[:900], train_y=np.zeros(900, np.int64), val_x=digits[900:1100],
                    val_y=np.zeros(200, np.int64), test_x=digits[1100:1300], test_y=np.zeros(200, np.int64),
                    pool_x=digits[1300:1310], class_names=[str(i) for i in range(10)])
    dataset_dir = tmp_path / "dataset"
    save_splits(splits, dataset_dir)
    image_features(np.concatenate([splits.train_x, splits.val_x])).assign(label=0).to_csv(
        dataset_dir / REFERENCE_FILE, index=False)

    with FakeServing(tmp_path, model_version="7") as serving:
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
                          drift_share=0.5, replay_limit=150, drift_report=report, verdict=verdict, metrics=metrics)
        assert serving.requests == 150

    result = json.loads(Path(verdict.path).read_text())
    assert result["status"] == "ok", result["message"]
    assert result["current_rows"] == 150 and result["log"]["source"] == REPLAY_SOURCE
    assert "Dataset Drift" in Path(report.path).read_text()
    assert metrics.metadata["requests_replayed"] == 150 and metrics.metadata["current_rows"] == 150
    assert metrics.metadata["drift_detected"] == 0.0 and metrics.metadata["cost_wall_seconds"] > 0
