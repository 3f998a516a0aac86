"""Serving: the TorchServe handler, the config, the archive and a real TorchServe.

Handler tests run the handler in-process with TorchServe's own Context. The
integration tests (slow) start the real TorchServe once for the module, on
free ports, with a classifier trained here for a few seconds on sklearn digits.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import zipfile
from datetime import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException

from components.features import FEATURE_COLUMNS, image_features
from components.models import Classifier, EncoderSpec, save_classifier
from serving.archive import build_mar
from serving.client import encode_png, predict, read_token
from serving.handler import REQUEST_LOG_ENV, ImageClassifierHandler
from serving.server import LocalTorchServe, free_port, port_in_use, render_config

DIGIT_NAMES = [str(i) for i in range(10)]


def train_digits_classifier(out_dir: Path, steps: int = 300, max_seconds: float = 20.0,
                            model_version: str = "test-1") -> tuple[np.ndarray, np.ndarray]:
    """Train a small classifier on sklearn digits (plain loop, one thread); save it; return the held-out 200 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    train_x, train_y = torch.from_numpy(x[:-200]), torch.from_numpy(y[:-200])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread is several times faster for this tiny net
    try:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = Classifier(EncoderSpec(width=16, embed_dim=32), num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        start = time.monotonic()
        for _ in range(steps):
            idx = torch.randint(0, len(train_x), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.monotonic() - start > max_seconds:
                break
    finally:
        torch.set_num_threads(threads)
    save_classifier(model.eval(), out_dir, {"class_names": DIGIT_NAMES, "model_version": model_version})
    return x[-200:], y[-200:]


def make_context(model_dir: Path, headers: list[dict] | None = None) -> Context:
    """TorchServe's own Context, as the worker builds it, with per-request headers."""
    ctx = Context("digits", str(model_dir), {"model": {"modelName": "digits", "modelVersion": "9.9"}},
                  batch_size=1, gpu=None, mms_version="0.12.0", metrics=mock.MagicMock(), model_yaml_config={})
    ctx.request_processor = [RequestProcessor(h) for h in (headers or [{}])]
    return ctx


def make_handler(model_dir: Path) -> ImageClassifierHandler:
    handler = ImageClassifierHandler()
    threads = torch.get_num_threads()
    handler.initialize(make_context(model_dir))
    torch.set_num_threads(threads)  # the handler pins one thread per worker; keep the test process as it was
    return handler


def png_bytes(mode: str, size: tuple[int, int], color) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gray-model")
    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10), out, {"class_names": DIGIT_NAMES, "model_version": "v-gray"})
    return out


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rgb-model")
    spec = EncoderSpec(in_channels=3, image_size=16, width=8, embed_dim=16)
    save_classifier(Classifier(spec, 3), out, {"class_names": ["cat", "dog", "ship"]})
    return out


@pytest.fixture(scope="module")
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images[:20, None] / 16.0).astype(np.float32), digits.target[:20]


# ---------------------------------------------------------------- handler

def test_preprocess_png_round_trips_pixels(gray_model, digit_images):
    handler = make_handler(gray_model)
    images, _ = digit_images
    batch = handler.preprocess([{"data": encode_png(images[0])}, {"body": bytearray(encode_png(images[1]))}])
    assert batch.shape == (2, 1, 8, 8) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch.numpy(), images[:2], atol=0.5 / 255 + 1e-6)


def test_preprocess_jpeg_rgb_to_gray_and_resize(gray_model):
    handler = make_handler(gray_model)
    red = np.zeros((32, 24, 3), np.uint8)
    red[..., 0] = 255
    batch = handler.preprocess([{"data": jpeg_bytes(red)}])
    assert batch.shape == (1, 1, 8, 8)
    # ITU-R 601 luma of pure red is 0.299; JPEG adds a little error
    np.testing.assert_allclose(batch.numpy(), 0.299, atol=0.02)


def test_preprocess_gray_png_to_rgb_model(rgb_model):
    handler = make_handler(rgb_model)
    batch = handler.preprocess([{"data": png_bytes("L", (40, 40), 128)}])
    assert batch.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(batch.numpy(), 128 / 255, atol=1e-6)


def test_preprocess_scales_16_bit_png(gray_model):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(buf, format="PNG")
    batch = make_handler(gray_model).preprocess([{"data": buf.getvalue()}])
    np.testing.assert_allclose(batch.numpy(), 128 / 255, atol=1e-6)


def test_preprocess_accepts_base64_text(gray_model, digit_images):
    import base64

    handler = make_handler(gray_model)
    text = base64.b64encode(encode_png(digit_images[0][0])).decode()
    assert handler.preprocess([{"data": text}]).shape == (1, 1, 8, 8)


def _truncated_png() -> bytes:
    png = encode_png(np.random.default_rng(0).random((1, 32, 32)))
    return png[: len(png) // 2]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"data": b""}, "empty request body"),
        ({"body": b"this is not an image"}, "is not a PNG or JPEG image"),
        ({"data": _truncated_png()}, "broken or unsupported PNG/JPEG"),
        ({"data": png_bytes("L", (4, 4), 0)[:8] + b"\0" * 30}, "PNG"),
        ({}, "no image in the request"),
        ({"image": b"\x89PNG"}, "no image in the request"),  # a form field, not the body
        ({"data": {"instances": [1, 2]}}, "unsupported request body of type dict"),
        ({"data": "%%% not base64 %%%"}, "not base64"),
        ({"data": b"GIF89a" + b"\0" * 20}, "is not a PNG or JPEG image"),
    ],
    ids=["empty", "not-an-image", "truncated-png", "corrupt-png", "no-body", "form-field", "json-dict", "bad-base64", "gif"],
)
def test_bad_input_is_a_400_with_a_message(gray_model, row, message):
    handler = make_handler(gray_model)
    with pytest.raises(PredictionException) as err:
        handler.preprocess([row])
    assert err.value.error_code == 400
    assert message in err.value.message


def test_decompression_bomb_is_refused_before_decoding(gray_model):
    handler = make_handler(gray_model)
    huge = png_bytes("1", (5000, 5000), 0)  # tiny file, 25 M pixels
    with pytest.raises(PredictionException, match="too large") as err:
        handler.preprocess([{"data": huge}])
    assert err.value.error_code == 400


def test_handle_batch_gives_one_labelled_answer_per_request(gray_model, digit_images):
    handler = make_handler(gray_model)
    images, _ = digit_images
    rows = [{"data": encode_png(im)} for im in images[:3]]
    answers = handler.handle(rows, make_context(gray_model, [{}, {}, {}]))
    assert len(answers) == 3
    for a in answers:
        assert set(a) == {"label", "class_index", "confidence", "probabilities", "model_version"}
        assert isinstance(a["class_index"], int) and a["label"] == DIGIT_NAMES[a["class_index"]]
        assert list(a["probabilities"]) == DIGIT_NAMES
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert a["confidence"] == max(a["probabilities"].values())
        assert a["model_version"] == "v-gray"  # the metadata's version wins over the manifest's
    json.dumps(answers)  # TorchServe must be able to serialise them


def test_mixed_batch_fails_only_the_bad_request(gray_model, digit_images):
    handler = make_handler(gray_model)
    ctx = make_context(gray_model, [{}, {}, {}])
    good = encode_png(digit_images[0][0])
    answers = handler.handle([{"data": good}, {"data": b"junk"}, {"data": good}], ctx)
    assert "error" in answers[1] and ctx.get_response_status(1)[0] == 400
    assert answers[0]["class_index"] == answers[2]["class_index"]
    assert ctx.get_response_status(0)[0] in (None, 200)


def test_batch_of_only_bad_requests_raises_400(gray_model):
    handler = make_handler(gray_model)
    with pytest.raises(PredictionException) as err:
        handler.handle([{"data": b""}, {"data": b"junk"}], make_context(gray_model, [{}, {}]))
    assert err.value.error_code == 400


def test_request_log_has_prediction_and_every_feature(gray_model, digit_images, tmp_path, monkeypatch):
    monkeypatch.setenv(REQUEST_LOG_ENV, str(tmp_path / "log"))
    handler = make_handler(gray_model)
    images, _ = digit_images
    rows = [{"data": encode_png(im)} for im in images[:4]]
    answers = handler.handle(rows, make_context(gray_model, [{"X-Request-Source": "smoke-test"}, {}, {}, {"x-request-source": "bad value!"}]))
    answers += handler.handle(rows[:1], make_context(gray_model))
    files = list((tmp_path / "log").glob("requests-*.jsonl"))
    assert [f.name for f in files] == [f"requests-{os.getpid()}.jsonl"]
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(lines) == 5
    expected = image_features(np.round(images[:4] * 255) / 255)  # what the server sees after PNG encoding
    for i, (line, answer) in enumerate(zip(lines, answers)):
        assert set(FEATURE_COLUMNS) <= set(line)
        assert datetime.fromisoformat(line["timestamp"]).utcoffset().total_seconds() == 0
        assert line["model_version"] == "v-gray"
        assert line["predicted_class"] == answer["class_index"] and isinstance(line["predicted_class"], int)
        assert line["predicted_label"] == answer["label"] and line["confidence"] == answer["confidence"]
        if i < 4:
            for col in FEATURE_COLUMNS:
                assert line[col] == pytest.approx(expected[col][i], abs=1e-5), col
    assert [line["source"] for line in lines] == ["smoke-test", "client", "client", "client", "client"]


def test_unwritable_request_log_does_not_fail_the_answer(gray_model, digit_images, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(REQUEST_LOG_ENV, str(tmp_path / "a-file" / "log"))
    handler = make_handler(gray_model)
    answers = handler.handle([{"data": encode_png(digit_images[0][0])}], make_context(gray_model))
    assert answers[0]["label"] in DIGIT_NAMES


def test_no_request_log_without_the_env(gray_model, digit_images, tmp_path, monkeypatch):
    monkeypatch.delenv(REQUEST_LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    handler = make_handler(gray_model)
    handler.handle([{"data": encode_png(digit_images[0][0])}], make_context(gray_model))
    assert handler.request_log_path is None and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- config and archive

def _properties(text: str) -> dict[str, str]:
    """Read a .properties text as java.util.Properties does (for the subset we write: backslash escapes)."""
    import re

    pairs = [line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): re.sub(r"\\(.)", r"\1", v.strip()) for k, v in pairs}


def test_config_is_locked_down(tmp_path):
    props = _properties(render_config(tmp_path / "store", "digits=digits.mar", inference_port=9080,
                                      management_port=9081, metrics_port=9082, grpc_inference_port=9070,
                                      grpc_management_port=9071, workers=2))
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_envvars_config"] == "false"  # TS_* variables cannot turn the above around
    assert props["inference_address"] == "http://127.0.0.1:9080"
    assert props["management_address"] == "http://127.0.0.1:9081"
    assert props["metrics_address"] == "http://127.0.0.1:9082"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["model_store"] == str((tmp_path / "store").resolve())
    assert props["load_models"] == "digits=digits.mar" and props["default_workers_per_model"] == "2"
    assert props["install_py_dep_per_model"] == "false" and props["metrics_mode"] == "prometheus"
    assert int(props["max_request_size"]) <= 64 * 2**20 and int(props["token_expiration_min"]) >= 60
    assert not any("$" in v for v in props.values())


def test_allowed_urls_only_match_the_model_store(tmp_path):
    import re

    store = (tmp_path / "my.store").resolve()
    pattern = _properties(render_config(store, "d=d.mar"))["allowed_urls"]
    assert re.fullmatch(pattern, f"file://{store}/d.mar")
    for url in ("file:///etc/passwd", f"file://{tmp_path}/myXstore/d.mar", "https://example.com/d.mar"):
        assert not re.fullmatch(pattern, url), url


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"inference_port": 8081}, "must be distinct"),
        ({"metrics_port": 70000}, "must be distinct"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"token_expiration_min": 0}, "token_expiration_min must be at least 1"),
        ({"host": "127.0.0.1\nenable_model_api=true"}, "may not contain line breaks"),
    ],
    ids=["port-clash", "port-range", "no-workers", "token-expiry", "injection"],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_config(tmp_path, "d=d.mar", **kwargs)


def test_build_mar_packs_weights_metadata_and_handler(gray_model, tmp_path):
    mar = build_mar(gray_model, tmp_path / "export", "digits", "v-gray")
    assert mar == (tmp_path / "export" / "digits.mar").resolve()
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert {"model.safetensors", "metadata.json", "handler.py"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
    assert manifest["model"]["serializedFile"] == "model.safetensors"
    assert manifest["model"]["modelVersion"] == "v-gray" and manifest["model"]["handler"] == "handler.py"


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing-weights", FileNotFoundError, "model.safetensors missing"),
        ("bad-name", ValueError, "must be letters, digits"),
    ],
)
def test_build_mar_failures(gray_model, tmp_path, case, error, message):
    model_dir, name = gray_model, "digits"
    if case == "missing-weights":
        model_dir = tmp_path / "half"
        model_dir.mkdir()
        (model_dir / "metadata.json").write_text("{}")
    else:
        name = "../evil"
    with pytest.raises(error, match=message):
        build_mar(model_dir, tmp_path / "export", name, "1")


def test_stop_without_a_server_is_a_noop(tmp_path, capsys):
    assert LocalTorchServe(tmp_path).stop() == {"stopped": False, "home": str(tmp_path.resolve())}
    assert "nothing to stop" in capsys.readouterr().out
    assert LocalTorchServe(tmp_path).status()["running"] is False


def test_start_refuses_a_taken_port(tmp_path):
    mar = tmp_path / "digits.mar"
    mar.write_bytes(b"not used")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"inference port {port} already in use"):
            LocalTorchServe(tmp_path / "home").start(mar, "digits", inference_port=port, management_port=free_port(),
                                                     metrics_port=free_port(), timeout_s=5)
    assert not (tmp_path / "home" / "state.json").exists()


# ---------------------------------------------------------------- the real TorchServe

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One real TorchServe for the module, on free ports, serving a classifier trained just now."""
    root = tmp_path_factory.mktemp("served")
    test_x, test_y = train_digits_classifier(root / "model")
    mar = build_mar(root / "model", root / "export", "digits", "test-1")
    server = LocalTorchServe(root / "home")
    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    try:
        record = server.start(mar, "digits", workers=1, request_log_dir=root / "requests", timeout_s=120,
                              model_version="test-1", **ports)
        yield {"server": server, "record": record, "test_x": test_x, "test_y": test_y, "root": root}
    finally:
        server.stop(quiet=True)
        assert not server.status()["running"], "TorchServe left running after the tests"


@pytest.mark.slow
def test_served_model_predicts_digits(served):
    record = served["record"]
    token = read_token(record["token_file"])
    answers = [predict(record["endpoint"], encode_png(x), token) for x in served["test_x"][:20]]
    predicted = np.array([a["class_index"] for a in answers])
    assert (predicted == served["test_y"][:20]).mean() >= 0.8
    assert answers[0]["class_index"] == served["test_y"][0] and answers[0]["model_version"] == "test-1"


@pytest.mark.slow
def test_deployment_record_and_status(served):
    record, server = served["record"], served["server"]
    expected_keys = {"endpoint", "management_endpoint", "metrics_endpoint", "token_file", "request_log_dir",
                     "model_name", "model_version", "home", "pid"}
    assert expected_keys <= set(record)
    assert json.loads((Path(record["home"]) / "state.json").read_text()) == record
    assert record["endpoint"].startswith("http://127.0.0.1:") and record["endpoint"].endswith("/predictions/digits")
    assert Path(record["token_file"]).is_file() and Path(record["token_file"]).stat().st_mode & 0o077 == 0
    status = server.status()
    assert status["running"] and status["pid"] == record["pid"] and status["endpoint"] == record["endpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Bearer "], ids=["no-token", "wrong-token", "empty-token"])
def test_prediction_without_the_right_token_is_refused(served, auth):
    record = served["record"]
    headers = {"Content-Type": "image/png", **({"Authorization": auth} if auth else {})}
    response = requests.post(record["endpoint"], data=encode_png(served["test_x"][0]), headers=headers, timeout=10)
    assert 400 <= response.status_code < 500
    assert "Token Authorization failed" in response.text


@pytest.mark.slow
def test_model_registration_is_refused(served, tmp_path):
    record = served["record"]
    keys = json.loads(Path(record["token_file"]).read_text())
    # With the management key the model API itself says no (405); the token-API key is not a management key.
    for key, refusal in ((keys["management"]["key"], "not allowed"), (keys["API"]["key"], "Token Authorization failed")):
        response = requests.post(f"{record['management_endpoint']}/models",
                                 params={"url": "digits.mar", "model_name": "intruder"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert 400 <= response.status_code < 500 and refusal in response.text, response.text
    listing = requests.get(f"{record['management_endpoint']}/models",
                           headers={"Authorization": f"Bearer {keys['management']['key']}"}, timeout=10).json()
    assert [m["modelName"] for m in listing["models"]] == ["digits"]


@pytest.mark.slow
def test_corrupt_body_is_a_4xx_and_the_worker_survives(served):
    record = served["record"]
    token = read_token(record["token_file"])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    for body in (b"definitely not a png", b""):
        response = requests.post(record["endpoint"], data=body, headers=headers, timeout=10)
        assert response.status_code == 400, response.text
        assert "PNG or JPEG" in response.json()["message"]
    answer = predict(record["endpoint"], encode_png(served["test_x"][1]), token)
    assert answer["class_index"] == served["test_y"][1]


@pytest.mark.slow
def test_metrics_endpoint_and_request_log(served):
    record = served["record"]
    token = read_token(record["token_file"])
    predict(record["endpoint"], encode_png(served["test_x"][2]), token, source="replay")
    metrics = requests.get(record["metrics_endpoint"], timeout=10)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
    lines = [json.loads(line) for f in Path(record["request_log_dir"]).glob("requests-*.jsonl")
             for line in f.read_text().splitlines()]
    assert lines and all(set(FEATURE_COLUMNS) <= set(line) for line in lines)
    assert lines[-1]["source"] == "replay" and lines[-1]["model_version"] == "test-1"


@pytest.mark.slow
def test_stop_really_stops(served):
    """Runs last in this module: stops the shared server and checks nothing is left."""
    record, server = served["record"], served["server"]
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == record["pid"]]
    assert workers, "expected at least one Python worker under the TorchServe frontend"
    assert server.stop()["stopped"] is True
    assert not server.status()["running"]
    for pid in [record["pid"], *workers]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    port = int(record["endpoint"].split(":")[2].split("/")[0])
    assert not port_in_use("127.0.0.1", port)
    assert not Path(record["token_file"]).exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(record["endpoint"].rsplit("/predictions", 1)[0] + "/ping", timeout=5)


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
