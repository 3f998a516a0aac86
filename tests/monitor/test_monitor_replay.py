"""Monitor replay: images sent over real HTTP with the token, the step's component judging only its own
replayed window, and clean vs shifted traffic through a real TorchServe and its request log."""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import MONITOR_REFERENCE_ROWS, settings_of
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
from monitor_traffic import log_records, photo_patches, rotate_90, served, write_log
from PIL import Image

from components.core.data import REFERENCE_FILE, Splits, save_splits
from components.core.features import MODEL_REFERENCE_FILE, image_features
from components.monitor.component import monitor_component
from components.monitor.replay import replay, wait_for_log
from components.monitor.traffic import REPLAY_SOURCE, read_request_log
from pipelines.config import MonitorConfig, ServingConfig


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
        from components.core.ledger import Ledger

        ledger = Ledger(tmp_path / "ledger")  # the deploy step's released record of the served version
        released = ledger.append("released", {"model_name": "digits", "model_version": "7", "target": "local",
                                              "endpoint": serving.endpoint, "strategy": "replace"})
        record.write_text(json.dumps({"endpoint": serving.endpoint, "token_file": str(serving.token_file),
                                      "request_log_dir": str(serving.log_dir), "model_version": "7",
                                      "ledger": ledger.base, "released_record": released.id}))
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
    drift = Ledger(tmp_path / "ledger").latest("drift")  # the window, in the ledger, after the served release
    assert drift.parents == (released.id,) and result["ledger_record"] == drift.id
    assert drift.data["drift_detected"] is False and drift.data["window"] == result["window"]
    assert drift.data["report"] == report.uri and drift.data["verdict"] == verdict.uri
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
    from serving.processes import free_port
    from serving.server import LocalTorchServe

    images, labels = digits_and_labels
    first = slice(MONITOR_REFERENCE_ROWS, MONITOR_REFERENCE_ROWS + 16)  # held-out digits for the smoke test
    root = tmp_path_factory.mktemp("served")
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=empty, val_y=np.zeros(0, np.int64),
                       test_x=images[first], test_y=labels[first],
                       pool_x=empty, class_names=[str(i) for i in range(10)]), root / "dataset")
    home = root / "serving"
    try:
        serving = ServingConfig(home=str(home), inference_port=free_port(), management_port=free_port(),
                                metrics_port=free_port(), startup_timeout_s=180)
        record = deploy_local(model_dir, root / "dataset", settings_of(serving=serving).serving)
        yield record
    finally:
        LocalTorchServe(home).stop(quiet=True)


@pytest.mark.slow
def test_clean_and_shifted_traffic_through_the_real_server_and_its_log(real_server, reference, model_dir, held_out,
                                                                        run_cli, tmp_path):
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
                                     "--until", until.isoformat(), "--out", str(tmp_path / "out"),
                                     "--serving-home", str(tmp_path / "serving")])
        verdicts[name] = verdict = json.loads(stdout.strip().splitlines()[-1])
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
