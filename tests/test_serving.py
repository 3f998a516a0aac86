"""Serving: the TorchServe handler, the request log, the config, the archive and a real TorchServe.

Handler tests run the handler in-process with TorchServe's own Context. The
integration tests (slow) start the real TorchServe behind its auth proxy once
for the module, on free ports, with a classifier trained here for a few seconds
on sklearn digits; the crash tests near the end restart it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import requests
import torch
from conftest import settings_of
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, embedding_projection, image_features
from components.core.models import Classifier, EncoderSpec, save_classifier
from pipelines.config import ServingConfig
from serving import request_log as request_log_mod
from serving.archive import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_BATCH_DELAY_MS,
    DEFAULT_WORKERS,
    build_mar,
    model_config_yaml,
)
from serving.client import encode_png, predict, read_token
from serving.handler import REQUEST_LOG_ENV, ImageClassifierHandler
from serving.request_log import LogBatch, RequestLogger, RotatingJsonl, build_records, pid_alive
from serving.server import (
    LocalTorchServe,
    _is_auth_proxy,
    _is_torchserve,
    archive_workers,
    free_port,
    port_in_use,
    render_config,
)

DIGIT_NAMES = [str(i) for i in range(10)]
PNG = {"content-type": "image/png"}
JSON_TYPE = {"content-type": "application/json"}


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
    ctx.request_processor = [RequestProcessor(h) for h in (headers or [{"body": PNG}])]
    return ctx


def make_handler(model_dir: Path) -> ImageClassifierHandler:
    handler = ImageClassifierHandler()
    threads = torch.get_num_threads()
    handler.initialize(make_context(model_dir))
    torch.set_num_threads(threads)  # the handler pins one thread per worker; keep the test process as it was
    return handler


def handle(handler: ImageClassifierHandler, rows: list[dict], headers: list[dict]) -> tuple[list, Context]:
    """Run a batch through handle() as the worker does; answers parsed back from their JSON."""
    ctx = make_context(Path("."), headers)
    answers = handler.handle(rows, ctx)
    assert all(isinstance(a, str) for a in answers), "answers must be pre-serialised JSON strings"
    assert all(ctx.get_response_content_type(i) == "application/json" for i in range(len(rows)))
    return [json.loads(a) for a in answers], ctx


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


@pytest.fixture
def handler(gray_model, monkeypatch) -> ImageClassifierHandler:
    monkeypatch.delenv(REQUEST_LOG_ENV, raising=False)
    return make_handler(gray_model)


# ---------------------------------------------------------------- handler: decoding

def test_preprocess_png_round_trips_pixels(handler, digit_images):
    images, _ = digit_images
    batch = handler.preprocess([{"body": encode_png(images[0])}, {"data": bytearray(encode_png(images[1]))}])
    assert batch.shape == (2, 1, 8, 8) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch.numpy(), images[:2], atol=0.5 / 255 + 1e-6)


def test_preprocess_jpeg_rgb_to_gray_and_resize(handler):
    red = np.zeros((32, 24, 3), np.uint8)
    red[..., 0] = 255
    batch = handler.preprocess([{"body": jpeg_bytes(red)}])
    assert batch.shape == (1, 1, 8, 8)
    # ITU-R 601 luma of pure red is 0.299; JPEG adds a little error
    np.testing.assert_allclose(batch.numpy(), 0.299, atol=0.02)


def test_preprocess_gray_png_to_rgb_model(rgb_model, monkeypatch):
    monkeypatch.delenv(REQUEST_LOG_ENV, raising=False)
    batch = make_handler(rgb_model).preprocess([{"body": png_bytes("L", (40, 40), 128)}])
    assert batch.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(batch.numpy(), 128 / 255, atol=1e-6)


def test_preprocess_scales_16_bit_png(handler):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(buf, format="PNG")
    np.testing.assert_allclose(handler.preprocess([{"body": buf.getvalue()}]).numpy(), 128 / 255, atol=1e-6)


@pytest.mark.parametrize("form", ["base64-text", "json-image", "json-pixels-2d", "json-pixels-3d", "json-list",
                                  "json-bytes-undecoded", "json-without-content-type"])
def test_json_and_base64_bodies_decode_to_the_same_pixels(handler, digit_images, form):
    image = np.round(digit_images[0][0] * 255) / 255  # what a PNG carries
    png = encode_png(image)
    bodies = {
        "base64-text": (base64.b64encode(png).decode(), {"content-type": "text/plain"}),
        "json-image": ({"image": base64.b64encode(png).decode()}, JSON_TYPE),
        "json-pixels-2d": ({"pixels": image[0].tolist()}, JSON_TYPE),
        "json-pixels-3d": ({"pixels": image.tolist()}, JSON_TYPE),
        "json-list": (image.tolist(), JSON_TYPE),
        # TorchServe passes JSON it could not decode (or with TS_DECODE_INPUT_REQUEST=false) as bytes
        "json-bytes-undecoded": (json.dumps({"pixels": image.tolist()}).encode(), JSON_TYPE),
        "json-without-content-type": (json.dumps({"pixels": image.tolist()}).encode(), {}),
    }
    body, content_type = bodies[form]
    handler.context = make_context(Path("."), [{"body": content_type}])
    np.testing.assert_allclose(handler.preprocess([{"body": body}]).numpy(), image[None], atol=1e-6)


def _truncated_png() -> bytes:
    png = encode_png(np.random.default_rng(0).random((1, 32, 32)))
    return png[: len(png) // 2]


@pytest.mark.parametrize(
    "row, content_type, code, message",
    [
        ({"body": b""}, PNG, 400, "empty request body"),
        ({"body": b"this is not an image"}, PNG, 400, "is not a PNG or JPEG image"),
        ({"body": _truncated_png()}, PNG, 400, "broken or unsupported PNG/JPEG"),
        ({"body": png_bytes("L", (4, 4), 0)[:8] + b"\0" * 30}, PNG, 400, "PNG"),
        ({}, PNG, 400, "no image in the request"),
        ({"image": b"\x89PNG"}, PNG, 400, "no image in the request"),  # a form field, not the body
        ({"body": "%%% not base64 %%%"}, {"content-type": "text/plain"}, 400, "not base64"),
        ({"body": b"GIF89a" + b"\0" * 20}, PNG, 400, "is not a PNG or JPEG image"),
        ({"body": b"GIF89a" + b"\0" * 20}, {"content-type": "image/gif"}, 415, "unsupported content type 'image/gif'"),
        ({"body": b"<xml/>"}, {"content-type": "application/xml"}, 415, "unsupported content type"),
        ({"body": b"{not json"}, JSON_TYPE, 400, "not valid JSON"),
        ({"body": "just a string"}, JSON_TYPE, 400, "must be an object with 'image'"),
        ({"body": 42}, JSON_TYPE, 400, "unsupported JSON body of type int"),
        ({"body": {"instances": [1, 2]}}, JSON_TYPE, 400, "unknown JSON field(s) ['instances']"),
        ({"body": {}}, JSON_TYPE, 400, "exactly one of 'image'"),
        ({"body": {"image": "aGk=", "pixels": [[0]]}}, JSON_TYPE, 400, "exactly one of 'image'"),
        ({"body": {"image": 5}}, JSON_TYPE, 400, "'image' must be a base64 string"),
        ({"body": {"image": "***"}}, JSON_TYPE, 400, "'image' is text but not base64"),
        ({"body": {"pixels": [[0.5] * 8] * 7}}, JSON_TYPE, 400, "shape [7, 8]; this model takes [8, 8] or [1, 8, 8]"),
        ({"body": {"pixels": [[[0.5] * 8] * 8] * 3}}, JSON_TYPE, 400, "shape [3, 8, 8]"),
        ({"body": {"pixels": [[1, 2], [3]]}}, JSON_TYPE, 400, "ragged list or a non-number"),
        ({"body": {"pixels": [["a"] * 8] * 8}}, JSON_TYPE, 400, "ragged list or a non-number"),
        ({"body": {"pixels": [[255] * 8] * 8}}, JSON_TYPE, 400, "values must be finite numbers in [0, 1]"),
        ({"body": {"pixels": [[float("nan")] * 8] * 8}}, JSON_TYPE, 400, "values must be finite numbers in [0, 1]"),
        ({"body": {"pixels": [[0.5] * 8] * 8, "topk": 0}}, JSON_TYPE, 400, "topk must be an integer from 1 to 10"),
        ({"body": {"pixels": [[0.5] * 8] * 8, "topk": "x"}}, JSON_TYPE, 400, "topk must be an integer from 1 to 10"),
        ({"body": {"pixels": [[0.5] * 8] * 8, "topk": True}}, JSON_TYPE, 400, "topk must be an integer"),
        ({"body": {"pixels": [[0.5] * 8] * 8, "topk": 2.5}}, JSON_TYPE, 400, "topk must be an integer"),
    ],
    ids=["empty", "not-an-image", "truncated-png", "corrupt-png", "no-body", "form-field", "bad-base64", "gif-as-png",
         "gif-type", "xml-type", "bad-json", "json-string", "json-number", "json-unknown-field", "json-empty",
         "json-both", "json-image-not-str", "json-image-not-b64", "pixels-short", "pixels-channels", "pixels-ragged",
         "pixels-strings", "pixels-8bit", "pixels-nan", "topk-0", "topk-text", "topk-bool", "topk-fraction"],
)
def test_bad_input_is_a_4xx_with_a_message(handler, row, content_type, code, message):
    handler.context = make_context(Path("."), [{"body": content_type, "data": content_type}])
    answers = [json.loads(a) for a in handler.postprocess(handler.inference(handler.preprocess([row])))]
    assert answers == [{"code": code, "type": mock.ANY, "message": mock.ANY}]
    assert message in answers[0]["message"], answers[0]["message"]
    assert handler.context.get_response_status(0)[0] == code
    # Without a context (no way to answer per request, nor to know the content type) a 4xx is raised.
    handler.context = None
    with pytest.raises(PredictionException) as err:
        handler.preprocess([row])
    assert 400 <= err.value.error_code < 500


def huge_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of width x height: a few KiB for any size (the rows are compressed as streamed)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer, parts = zlib.compressobj(9), []
    for _ in range(0, height, 64):
        parts.append(packer.compress(row * 64))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def jpeg_of_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, format="JPEG", quality=10)
    return buf.getvalue()


# Small files with absurd pixel counts: 4 and 400 megapixels (Pillow itself refuses to open the second).
PIXEL_BOMBS = {"png-2000x2000": lambda: png_bytes("L", (2000, 2000), 0),
               "png-20000x20000": lambda: huge_png(20000, 20000),
               "jpeg-2000x2000": lambda: jpeg_of_size(2000, 2000),
               "png-1x1048577": lambda: huge_png(1, 1024 * 1024 + 1)}


@pytest.mark.parametrize("name", sorted(PIXEL_BOMBS))
def test_too_many_pixels_is_a_413_before_decoding(handler, name, monkeypatch):
    body = PIXEL_BOMBS[name]()
    assert len(body) < 200_000, "the point: a small file"
    decoded = mock.Mock(side_effect=AssertionError("decoded a refused image"))
    monkeypatch.setattr(Image.Image, "load", decoded)
    with pytest.raises(PredictionException, match="too large: the limit is 1048576 pixels") as err:
        handler.preprocess([{"body": body}])
    assert err.value.error_code == 413 and "8x8" in err.value.message
    handler.context = make_context(Path("."), [{"body": PNG}])
    answers = [json.loads(a) for a in handler.postprocess(handler.inference(handler.preprocess([{"body": body}])))]
    assert answers[0]["code"] == 413 and answers[0]["type"] in ("RequestEntityTooLarge", "ContentTooLarge")
    assert handler.context.get_response_status(0)[0] == 413


def test_a_megapixel_image_is_still_accepted(handler):
    batch = handler.preprocess([{"body": png_bytes("L", (1024, 1024), 255)}])
    np.testing.assert_allclose(batch.numpy(), 1.0)


def test_reason_phrase_is_safe_for_http(handler):
    """A client-chosen content type ends up in the message; the HTTP status line must stay one ASCII line."""
    answers, ctx = handle(handler, [{"body": b"x"}], [{"body": {"content-type": "image/\u00e9vil\r\nX-Injected: 1"}}])
    assert answers[0]["code"] == 415
    code, phrase = ctx.get_response_status(0)
    assert code == 415 and re.fullmatch(r"[\x20-\x7e]{1,200}", phrase)


# ---------------------------------------------------------------- handler: answers

def test_batch_gives_one_top_k_answer_per_request(handler, digit_images):
    images, _ = digit_images
    rows = [{"body": encode_png(im)} for im in images[:3]]
    answers, _ = handle(handler, rows, [{"body": PNG}, {"body": PNG, "X-Top-K": "5"}, {"body": PNG, "x-top-k": "10"}])
    assert [len(a["top_k"]) for a in answers] == [3, 5, 10]
    for a in answers:
        assert set(a) == {"label", "class_index", "confidence", "probabilities", "top_k", "model_version"}
        assert isinstance(a["class_index"], int) and a["label"] == DIGIT_NAMES[a["class_index"]]
        probs = [t["probability"] for t in a["top_k"]]
        assert probs == sorted(probs, reverse=True) and a["confidence"] == probs[0]
        assert a["top_k"][0] == {"label": a["label"], "class_index": a["class_index"], "probability": a["confidence"]}
        assert list(a["probabilities"]) == [t["label"] for t in a["top_k"]]
        assert a["model_version"] == "v-gray"  # the metadata's version wins over the manifest's
    assert sum(t["probability"] for t in answers[2]["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_topk_from_json_wins_over_the_header(handler, digit_images):
    body = {"pixels": digit_images[0][0][0].tolist(), "topk": 1}
    answers, _ = handle(handler, [{"body": body}], [{"body": JSON_TYPE, "X-Top-K": "7"}])
    assert len(answers[0]["top_k"]) == 1


def test_mixed_batch_fails_only_the_bad_requests(handler, digit_images):
    good = encode_png(digit_images[0][0])
    rows = [{"body": good}, {"body": b"junk"}, {"body": good}, {"body": good}]
    headers = [{"body": PNG}, {"body": PNG}, {"body": {"content-type": "text/html"}}, {"body": PNG}]
    answers, ctx = handle(handler, rows, headers)
    assert [ctx.get_response_status(i)[0] or 200 for i in range(4)] == [200, 400, 415, 200]
    assert answers[1]["code"] == 400 and answers[2]["code"] == 415
    assert answers[0] == answers[3] and answers[0]["label"] in DIGIT_NAMES


def test_batch_of_only_bad_requests_answers_each(handler):
    answers, ctx = handle(handler, [{"body": b""}, {"body": b"junk"}], [{"body": PNG}, {"body": PNG}])
    assert [a["code"] for a in answers] == [400, 400]
    assert "empty request body" in answers[0]["message"] and "not a PNG" in answers[1]["message"]


def test_describe_header_cannot_hijack_a_batch(handler, digit_images):
    """BaseHandler answers a whole batch with one 'describe' result when request 0 asks; ours ignores it."""
    png = encode_png(digit_images[0][0])
    answers, _ = handle(handler, [{"body": png}, {"body": png}], [{"body": PNG, "describe": "True"}, {"body": PNG}])
    assert len(answers) == 2 and all(a["label"] in DIGIT_NAMES for a in answers)


def test_explanations_give_a_saliency_map_per_request(handler, digit_images):
    images, _ = digit_images
    png = encode_png(images[0])
    rows = [{"body": png}, {"body": png}, {"body": png}]
    headers = [{"body": PNG, "explain": "True"}, {"body": PNG, "explain": "False"}, {"body": PNG, "explain": "True", "X-Target": "3"}]
    answers, _ = handle(handler, rows, headers)
    assert all(p.grad is None for p in handler.model.parameters())  # explaining leaves the model as it was
    assert "saliency" not in answers[1]  # prediction and explanation requests may share a batch
    own, targeted = answers[0], answers[2]
    assert own["target_index"] == own["class_index"] and targeted["target_index"] == 3 and targeted["target_label"] == "3"
    for a in (own, targeted):
        saliency = np.array(a["saliency"])
        assert a["method"] == "gradient" and saliency.shape == (8, 8)
        assert saliency.min() >= 0 and saliency.max() == pytest.approx(1.0)
    # The map is the input gradient of the target score: check it against autograd directly.
    x = handler.preprocess([{"body": png}]).clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(handler.model(x)[0, 3], x)
    expected = grad.abs()[0, 0]
    np.testing.assert_allclose(np.array(targeted["saliency"]), (expected / expected.max()).numpy(), atol=1e-4)


def test_explanation_with_a_bad_target_is_a_400(handler, digit_images):
    png = encode_png(digit_images[0][0])
    answers, ctx = handle(handler, [{"body": png}], [{"body": PNG, "explain": "True", "X-Target": "eleven"}])
    assert answers[0]["code"] == 400 and "target must be an integer from 0 to 9" in answers[0]["message"]


def test_base_handler_explain_route_is_the_same_path(handler, digit_images):
    """TorchServe calls explain_handle when request 0 is an explanation: the answers must not change shape."""
    png = encode_png(digit_images[0][0])
    answers, _ = handle(handler, [{"body": png}, {"body": png}], [{"body": PNG, "explain": "True"}, {"body": PNG}])
    assert "saliency" in answers[0] and "saliency" not in answers[1]


# ---------------------------------------------------------------- request log

def _log_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("requests-*.jsonl")) for line in f.read_text().splitlines()]


def test_request_log_has_prediction_features_and_embedding(gray_model, digit_images, tmp_path, monkeypatch):
    monkeypatch.setenv(REQUEST_LOG_ENV, str(tmp_path / "log"))
    handler = make_handler(gray_model)
    images, _ = digit_images
    rows = [{"body": encode_png(im)} for im in images[:4]]
    headers = [{"body": PNG, "X-Request-Source": "smoke-test", "Authorization": "Bearer secret"}, {"body": PNG},
               {"body": PNG}, {"body": PNG, "x-request-source": "bad value!"}]
    before = time.time()
    answers, _ = handle(handler, rows, headers)
    answers += handle(handler, rows[:1], [{"body": PNG}])[0]
    assert handler.request_log.flush(10)
    lines = _log_lines(tmp_path / "log")
    assert len(lines) == 5
    served = np.round(images[:4] * 255) / 255  # what the server sees after PNG encoding
    expected = image_features(served)
    with torch.inference_mode():
        embeddings = embedding_projection(handler.model.embed(torch.from_numpy(served.astype(np.float32))).numpy())
    for i, (line, answer) in enumerate(zip(lines, answers)):
        assert set(FEATURE_COLUMNS + EMBEDDING_COLUMNS) <= set(line)
        stamp = datetime.fromisoformat(line["timestamp"])
        assert stamp.utcoffset().total_seconds() == 0 and before - 1 <= stamp.timestamp() <= time.time() + 1
        assert line["model_version"] == "v-gray"
        assert line["predicted_class"] == answer["class_index"] and isinstance(line["predicted_class"], int)
        assert line["predicted_label"] == answer["label"]
        assert line["confidence"] == pytest.approx(answer["confidence"], rel=1e-5)  # 6 significant digits
        if i < 4:
            for col in FEATURE_COLUMNS:
                assert line[col] == pytest.approx(expected[col][i], abs=1e-5), col
            for j, col in enumerate(EMBEDDING_COLUMNS):
                assert line[col] == pytest.approx(embeddings[i, j], abs=1e-4), col
    assert [line["source"] for line in lines] == ["smoke-test", "client", "client", "client", "client"]
    assert "secret" not in "".join(f.read_text() for f in (tmp_path / "log").iterdir())  # headers are not logged
    handler.request_log.close()


def test_request_log_skips_failed_requests(gray_model, digit_images, tmp_path, monkeypatch):
    monkeypatch.setenv(REQUEST_LOG_ENV, str(tmp_path / "log"))
    handler = make_handler(gray_model)
    png = encode_png(digit_images[0][0])
    handle(handler, [{"body": png}, {"body": b"junk"}, {"body": png}], [{"body": PNG}] * 3)
    handle(handler, [{"body": png}], [{"body": PNG, "explain": "True", "X-Target": "nope"}])  # answered 400
    assert handler.request_log.flush(10)
    assert len(_log_lines(tmp_path / "log")) == 2
    handler.request_log.close()


def test_unwritable_request_log_does_not_fail_the_answer(gray_model, digit_images, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(REQUEST_LOG_ENV, str(tmp_path / "a-file" / "log"))
    handler = make_handler(gray_model)
    answers, _ = handle(handler, [{"body": encode_png(digit_images[0][0])}], [{"body": PNG}])
    assert answers[0]["label"] in DIGIT_NAMES
    assert handler.request_log.flush(10)
    assert handler.request_log.stats()["failed"] == 1
    handler.request_log.close()


def test_no_request_log_without_the_env(gray_model, digit_images, tmp_path, monkeypatch):
    monkeypatch.delenv(REQUEST_LOG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    handler = make_handler(gray_model)
    handle(handler, [{"body": encode_png(digit_images[0][0])}], [{"body": PNG}])
    assert handler.request_log is None and list(tmp_path.iterdir()) == []


def _log_batch(n: int, t: float = 1_700_000_000.0) -> LogBatch:
    rng = np.random.default_rng(n)
    return LogBatch(images=rng.random((n, 1, 8, 8), dtype=np.float32), embeddings=rng.random((n, 16), dtype=np.float32),
                    predicted=[1] * n, labels=["1"] * n, confidences=[0.5] * n, sources=["client"] * n,
                    timestamps=[t] * n, model_version="v")


def test_fast_lines_are_the_records_as_json(tmp_path):
    """format_lines (what the writer writes) and build_records (the dicts) agree, in time order, any mix of models."""
    batches = [_log_batch(3, t=1_700_000_002.0), _log_batch(2, t=1_700_000_001.0)]
    wide = _log_batch(2, t=1_700_000_000.5)
    wide.embeddings = np.ones((2, 24), np.float32)  # a second model (another embedding width) in the same block
    wide.confidences = [float("nan"), 0.25]  # a non-finite number falls back to json.dumps (NaN)
    wide.model_version, wide.labels = 'v"2\\', ["caf\u00e9", "x"]  # strings are JSON-escaped
    batches.append(wide)
    records = build_records(batches)
    parsed = [json.loads(line) for line in request_log_mod.format_lines(batches)]
    assert [r["timestamp"] for r in parsed] == sorted(r["timestamp"] for r in parsed)
    assert len(parsed) == len(records) == 7
    for got, want in zip(parsed, records):
        assert list(got) == list(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
            else:
                assert got[key] == value, key


def test_full_queue_drops_and_counts_without_blocking(tmp_path, monkeypatch):
    gate = threading.Event()
    real_format = request_log_mod.format_lines

    def stuck_format(batches):
        gate.wait(10)  # the writer is stuck (a slow disk, a hung upload)
        return real_format(batches)

    monkeypatch.setattr(request_log_mod, "format_lines", stuck_format)
    log = RequestLogger(str(tmp_path / "log"), queue_batches=2, poll_s=0.01)
    assert log.submit(_log_batch(3))
    deadline = time.monotonic() + 5
    while log.stats()["queued_batches"] and time.monotonic() < deadline:  # the writer took it and is now stuck
        time.sleep(0.01)
    start = time.perf_counter()
    accepted = [True] + [log.submit(_log_batch(3)) for _ in range(50)]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"submit blocked for {elapsed:.2f} s"
    stats = log.stats()
    assert sum(accepted) == 3 and stats["dropped"] == 3 * 48  # 1 being written + 2 waiting; the rest dropped
    gate.set()
    assert log.flush(10)
    log.close()
    assert len(_log_lines(tmp_path / "log")) == 3 * sum(accepted) == log.stats()["written"]


def test_rotation_by_size_and_by_age(tmp_path):
    now = [1_700_000_000.0]
    closed: list[Path] = []
    files = RotatingJsonl(tmp_path, max_bytes=100, max_age_s=60, on_closed=closed.append, clock=lambda: now[0])
    x, y, z = b"x" * 60 + b"\n", b"y" * 60 + b"\n", b"z" * 10 + b"\n"
    files.write([x, y, z])  # y would take the first file past 100 bytes: it starts the second
    now[0] += 30
    files.write([b"a\n"])
    now[0] += 31  # the second file is 61 s old
    assert files.maybe_rotate() and files.path is None  # rotated even without a write (a quiet server)
    files.write([b"b" * 150 + b"\n"])  # longer than max_bytes: a file of its own
    files.write([b"c\n"])
    files.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [p.name for p in closed] == names and len(names) == 4
    assert all(re.fullmatch(request_log_mod.FILE_PATTERN, n) for n in names)
    contents = [(tmp_path / n).read_bytes() for n in names]
    assert contents == [x, y + z + b"a\n", b"b" * 150 + b"\n", b"c\n"]


def test_logger_rotates_old_files_on_a_quiet_server(tmp_path):
    log = RequestLogger(str(tmp_path), max_age_s=0.5)
    log.submit(_log_batch(2))
    assert log.flush(5)
    deadline = time.monotonic() + 5
    while log._files.path is not None and time.monotonic() < deadline:  # the writer's 1 s tick closes it
        time.sleep(0.1)
    assert log._files.path is None
    log.submit(_log_batch(1))
    log.close()
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and len(_log_lines(tmp_path)) == 3


@pytest.mark.parametrize(
    "env, message",
    [
        ({REQUEST_LOG_ENV: "/x", request_log_mod.MAX_BYTES_ENV: "ten"}, "KFP_MLOPS_REQUEST_LOG_MAX_BYTES='ten' is not a number"),
        ({REQUEST_LOG_ENV: "/x", request_log_mod.MAX_AGE_ENV: "-1"}, "KFP_MLOPS_REQUEST_LOG_MAX_AGE_S must be positive"),
    ],
)
def test_request_log_settings_are_checked(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RequestLogger.from_env(env)


@pytest.fixture(scope="module")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.mark.slow
def test_s3_destination_uploads_closed_files_and_orphans(moto_server, tmp_path, monkeypatch):
    from s3server import s3_env

    from components.core import storage

    for name, value in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    storage.Storage().client.create_bucket(Bucket="logs")
    spool = tmp_path / "spool"
    spool.mkdir()
    # A file left by a worker that was SIGKILLed before it could upload (pid 2**22+1 does not exist).
    host = request_log_mod._host_tag()
    orphan = spool / f"requests-{host}-{2**22 + 1}-20260101T000000Z-0001.jsonl"
    orphan.write_text('{"timestamp": "2026-01-01T00:00:00+00:00"}\n')
    log = RequestLogger("s3://logs/requests/digits", max_bytes=1, spool_dir=spool)
    for _ in range(3):
        log.submit(_log_batch(2))
        assert log.flush(10)
    log.close()
    uris = storage.list_uris("s3://logs/requests/digits")
    assert len(uris) == 1 + 3 * 2 and any(u.endswith(orphan.name) for u in uris), uris  # max_bytes=1: a file a line
    lines = [line for u in uris for line in storage.read_bytes(u).decode().splitlines()]
    assert len(lines) == 1 + 3 * 2 and all(json.loads(line)["timestamp"] for line in lines)
    assert list(spool.iterdir()) == [] and log.stats()["uploaded_files"] == 7


def test_s3_upload_failure_keeps_the_file_for_later(tmp_path, monkeypatch):
    calls = []

    def failing_put(local, uri):
        calls.append(uri)
        raise ConnectionError("endpoint down")

    monkeypatch.setattr("components.core.storage.put_file", failing_put)
    log = RequestLogger("s3://logs/x", max_bytes=1, spool_dir=tmp_path)
    log.submit(_log_batch(1))
    log.close()
    assert calls and len(list(tmp_path.glob("*.jsonl"))) == 1
    assert log.stats()["upload_failures"] >= 1 and log.stats()["uploaded_files"] == 0


# ---------------------------------------------------------------- config and archive

def _properties(text: str) -> dict[str, str]:
    """Read a .properties text as java.util.Properties does (for the subset we write: backslash escapes)."""
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
    assert props["workflow_store"] == str((tmp_path / "workflow-store").resolve())  # not the model store
    assert props["load_models"] == "digits=digits.mar" and props["default_workers_per_model"] == "2"
    assert props["install_py_dep_per_model"] == "false" and props["metrics_mode"] == "prometheus"
    assert int(props["max_request_size"]) <= 64 * 2**20 and int(props["token_expiration_min"]) >= 60
    assert 1 <= int(props["job_queue_size"]) <= 10_000
    assert {"number_of_netty_threads", "netty_client_threads", "disable_system_metrics"} <= set(props)
    assert "-XX:TieredStopAtLevel=1" in props["vmargs"].split()  # C1 only: no C2 compile bursts (p99)
    assert not any("$" in v for v in props.values())


def test_allowed_urls_only_match_the_model_store(tmp_path):
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
        ({"job_queue_size": 0}, "job_queue_size >= 1"),
        ({"netty_threads": -1}, "netty threads must be >= 0"),
        ({"max_request_size": 10}, "max_request_size must be at least 1024"),
        ({"workflow_store": "<the model store>"}, "workflow_store must not be the model store"),
    ],
    ids=["port-clash", "port-range", "no-workers", "token-expiry", "injection", "queue", "netty", "request-size",
         "workflow-store"],
)
def test_config_rejects_bad_values(tmp_path, kwargs, message):
    kwargs = {k: tmp_path if v == "<the model store>" else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        render_config(tmp_path, "d=d.mar", **kwargs)


def test_shipped_serving_defaults_match_the_config():
    from pipelines.config import ServingConfig

    cfg = ServingConfig()
    assert (cfg.workers, cfg.batch_size, cfg.max_batch_delay_ms) == (DEFAULT_WORKERS, DEFAULT_BATCH_SIZE,
                                                                     DEFAULT_MAX_BATCH_DELAY_MS)


def test_build_mar_packs_weights_metadata_handler_and_model_config(gray_model, tmp_path):
    mar = build_mar(gray_model, tmp_path / "export", "digits", "v-gray", workers=2, batch_size=16, max_batch_delay_ms=4)
    assert mar == (tmp_path / "export" / "digits.mar").resolve()
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        model_yaml = z.read(manifest["model"]["configFile"]).decode()
    assert {"model.safetensors", "metadata.json", "handler.py"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
    assert manifest["model"]["serializedFile"] == "model.safetensors"
    assert manifest["model"]["modelVersion"] == "v-gray" and manifest["model"]["handler"] == "handler.py"
    import yaml

    assert yaml.safe_load(model_yaml) == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 16, "maxBatchDelay": 4,
                                          "responseTimeout": 60}
    assert archive_workers(mar) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"workers": 0}, "workers must be an integer from 1"), ({"batch_size": 2000}, "batch_size must be an integer"),
     ({"max_batch_delay_ms": 0}, "max_batch_delay_ms must be an integer from 1"),  # TorchServe: 0 = 100 ms
     ({"batch_size": 2.5}, "batch_size must be")],
)
def test_model_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_config_yaml(**kwargs)


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


def test_read_token_from_torchserve_key_file(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m-key", "expiration time": "x"},
                                    "inference": {"key": "i-key", "expiration time": "x"}, "API": {"key": "a-key"}}))
    assert read_token(key_file) == "i-key"
    assert read_token(key_file, "management") == "m-key" and read_token(key_file, "API") == "a-key"
    with pytest.raises(KeyError, match="no 'nope' key"):
        read_token(key_file, "nope")


@pytest.mark.parametrize("text", ["client-token-0123456789abcdef", "client-token-0123456789abcdef\n",
                                  "\n  client-token-0123456789abcdef  \r\nsecond-token-for-rotation\n",
                                  "client-token-0123456789abcdef\r\n"],
                         ids=["bare", "newline", "blank-line-then-two-tokens", "crlf"])
def test_read_token_from_a_plain_text_secret_file(tmp_path, text):
    """A Kubernetes Secret mounted as a file (the client token on Kubernetes): the first non-empty line."""
    token_file = tmp_path / "token"
    token_file.write_text(text)
    assert read_token(token_file) == "client-token-0123456789abcdef"


def test_read_token_plain_text_that_parses_as_json_is_still_a_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("12345678901234567890\n")  # a JSON number, not a key file
    assert read_token(token_file) == "12345678901234567890"


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"], ids=["empty", "newline", "whitespace"])
def test_read_token_empty_file_is_a_clear_error(tmp_path, text):
    token_file = tmp_path / "token"
    token_file.write_text(text)
    with pytest.raises(ValueError, match=f"token file {re.escape(str(token_file))} is empty"):
        read_token(token_file)


def test_read_token_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_token(tmp_path / "absent")


@pytest.mark.parametrize("target", ["local", "kubernetes"])
def test_deploy_component_passes_batching_and_workers_on(tmp_path, monkeypatch, target):
    """serving.batch_size / max_batch_delay_ms / workers reach the step that builds the .mar, on both targets."""
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    import components.deploy.kubernetes as k8s_mod
    import components.deploy.local as deploy_mod
    from components.deploy.component import deploy_component

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return {"endpoint": "http://x/predictions/digits", "model_version": "v", "token_file": "t",
                "smoke_test_images": 1, "smoke_test_accuracy": 1.0, "smoke_test_latency_ms_mean": 1.0}

    monkeypatch.setattr(deploy_mod, "deploy_local", fake)
    monkeypatch.setattr(k8s_mod, "deploy_kubernetes", fake)
    deploy_component(
        model=Model(name="model", uri=str(tmp_path / "m")), dataset=Dataset(name="dataset", uri=str(tmp_path / "d")),
        cfg=settings_of(serving=ServingConfig(
            home=str(tmp_path / "home"), host="127.0.0.1", inference_port=1, management_port=2, metrics_port=3,
            workers=3, model_name="digits", startup_timeout_s=1, batch_size=8, max_batch_delay_ms=7,
            deploy_target=target)),
        deployment=Artifact(name="deployment", uri=str(tmp_path / "out" / "deployment")),
        metrics=Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics")))
    assert (seen["workers"], seen["batch_size"], seen["max_batch_delay_ms"]) == (3, 8, 7)


def test_deploy_local_packs_the_given_batching_into_the_archive(gray_model, tmp_path, monkeypatch):
    """deploy_local builds the .mar with non-default batching; what the server would load carries it."""
    from components.deploy import local as deploy_mod

    built = {}
    real_build = build_mar

    def build(*args, **kwargs):
        built["mar"] = real_build(*args, **kwargs)
        return built["mar"]

    class StopHere(Exception):
        pass

    def start(self, mar, *args, **kwargs):
        raise StopHere

    monkeypatch.setattr("serving.archive.build_mar", build)
    monkeypatch.setattr(LocalTorchServe, "start", start)
    monkeypatch.setattr("components.core.data.load_splits", lambda d: type("S", (), {"test_y": [1], "test_x": [None]})())
    with pytest.raises(StopHere):
        deploy_mod.deploy_local(gray_model, tmp_path / "data", tmp_path / "home", workers=2, batch_size=8,
                                max_batch_delay_ms=7)
    with zipfile.ZipFile(built["mar"]) as z:
        config = z.read(json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["configFile"]).decode()
    import yaml

    assert {k: yaml.safe_load(config)[k] for k in ("minWorkers", "batchSize", "maxBatchDelay")} == \
        {"minWorkers": 2, "batchSize": 8, "maxBatchDelay": 7}


def test_pipeline_wires_serving_batching_into_the_deploy_task():
    """The compiled pipeline feeds the deploy task from the serving.* run parameters."""
    from pipelines.pipeline import build_pipeline

    spec = build_pipeline(retries=False).pipeline_spec
    tasks = {}

    def collect(component_spec):
        for name, task in component_spec.dag.tasks.items():
            tasks[name] = task
            sub = spec.components[task.component_ref.name]
            if sub.HasField("dag"):
                collect(sub)

    collect(spec.root)
    params = tasks["deploy"].inputs.parameters
    wired = {name: params[f"serving_{name}"].component_input_parameter
             for name in ("workers", "batch_size", "max_batch_delay_ms")}
    assert all(wired.values()), wired
    assert all(v.endswith(f"serving_{k}") for k, v in wired.items()), wired


def test_token_files_are_private_random_and_kept(tmp_path):
    from serving.server import ensure_token_file

    path = ensure_token_file(tmp_path / "token")
    token = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[A-Za-z0-9_-]{43}\n", token)
    path.chmod(0o644)
    assert ensure_token_file(path).read_text() == token and path.stat().st_mode & 0o777 == 0o600
    assert ensure_token_file(tmp_path / "other").read_text() != token
    path.write_text("\n")  # a token file left empty holds no token anyone could use: a new one
    assert len(ensure_token_file(path).read_text().strip()) == 43
    assert not list(tmp_path.glob(".*.tmp"))


def test_curl_example_reads_the_plain_token_file():
    from serving.server import curl_example

    line = curl_example({"token_file": "/srv/my home/token", "endpoint": "http://127.0.0.1:8080/predictions/digits"})
    assert line == ('curl -H "Authorization: Bearer $(cat \'/srv/my home/token\')" -H "Content-Type: image/png" '
                    "--data-binary @digit.png http://127.0.0.1:8080/predictions/digits")


def _decoy(*args: str) -> subprocess.Popen:
    """A process whose command line looks like an auth proxy's (a recycled pid, or another home's proxy)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-m", "serving.auth_proxy", *args])


def test_stop_kills_this_homes_proxy_and_never_a_stranger(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ours = _decoy("--listen", "127.0.0.1:1", "--key-file", str(home / "key_file.json"))
    strangers = [_decoy("--key-file", str(tmp_path / "elsewhere" / "key_file.json")), subprocess.Popen(["sleep", "120"])]
    try:
        for stranger in strangers:
            (home / "state.json").write_text(json.dumps({"pid": stranger.pid, "proxy_pid": stranger.pid}))
            assert LocalTorchServe(home).status()["running"] is False
            assert LocalTorchServe(home).stop(quiet=True) == {"stopped": False, "home": str(home)}
            assert stranger.poll() is None, "a process that is not this home's was signalled"
        (home / "state.json").write_text(json.dumps({"pid": strangers[1].pid, "proxy_pid": ours.pid}))
        status = LocalTorchServe(home).status()
        assert status["running"] and status["proxy_running"] and not status["torchserve_running"]
        assert "TorchServe is not running" in status["problem"]
        assert LocalTorchServe(home).stop(quiet=True) == {"stopped": True, "pid": None, "proxy_pid": ours.pid,
                                                          "home": str(home)}
        assert ours.wait(10) == -signal.SIGTERM
        assert strangers[1].poll() is None
        assert json.loads((home / "state.json").read_text())["proxy_pid"] is None
    finally:
        for process in (ours, *strangers):
            process.kill()
            process.wait()


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
    """One real TorchServe behind its auth proxy for the module, on free ports, serving a classifier trained just now.

    ``token`` is the clients' token (the proxy's), ``source_token`` the pipeline's, ``keys`` TorchServe's own
    key_file.json. Tests that restart the server call ``_restart``, which refreshes these.
    """
    root = tmp_path_factory.mktemp("served")
    test_x, test_y = train_digits_classifier(root / "model")
    (root / "model" / "reference_model.csv").write_text("feature\n0.5\n")  # what finetune leaves next to the weights
    mar = build_mar(root / "model", root / "export", "digits", "test-1", batch_size=4, max_batch_delay_ms=5)
    server = LocalTorchServe(root / "home")
    start_args = dict(mar_path=mar, model_name="digits", request_log_dir=root / "requests", timeout_s=120,
                      model_version="test-1", request_log_max_bytes=2048, model_dir=root / "model",
                      dataset_dir=root / "dataset", inference_port=free_port(), management_port=free_port(),
                      metrics_port=free_port())
    served = {"server": server, "test_x": test_x, "test_y": test_y, "root": root, "start_args": start_args}
    try:
        _started(served, server.start(**start_args))
        yield served
    finally:
        server.stop(quiet=True)
        assert not server.status()["running"], "TorchServe or its proxy left running after the tests"


def _started(served: dict, record: dict) -> None:
    served.update(record=record, keys=json.loads(Path(record["key_file"]).read_text()),
                  token=read_token(record["token_file"]), source_token=read_token(record["source_token_file"]))


def _post(served, body: bytes | str, content_type: str = "image/png", path: str = "predictions", **headers):
    base = served["record"]["endpoint"].rsplit("/predictions", 1)[0]
    return requests.post(f"{base}/{path}/digits", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {served['token']}", "Content-Type": content_type, **headers})


def _describe(served) -> dict:  # TorchServe's management API, on loopback, with its own management key
    url = f"{served['record']['management_endpoint']}/models/digits"
    return requests.get(url, headers={"Authorization": f"Bearer {served['keys']['management']['key']}"}, timeout=10).json()[0]


@pytest.mark.slow
def test_served_model_predicts_digits(served):
    answers = [predict(served["record"]["endpoint"], encode_png(x), served["token"]) for x in served["test_x"][:20]]
    predicted = np.array([a["class_index"] for a in answers])
    assert (predicted == served["test_y"][:20]).mean() >= 0.8
    assert answers[0]["class_index"] == served["test_y"][0] and answers[0]["model_version"] == "test-1"
    assert len(answers[0]["top_k"]) == 3


@pytest.mark.slow
def test_served_json_topk_and_explanations(served):
    x = served["test_x"][3]
    by_pixels = _post(served, json.dumps({"pixels": x[0].tolist(), "topk": 5}), "application/json")
    by_base64 = _post(served, json.dumps({"image": base64.b64encode(encode_png(x)).decode()}), "application/json",
                      **{"X-Top-K": "2"})
    assert by_pixels.status_code == by_base64.status_code == 200, (by_pixels.text, by_base64.text)
    assert len(by_pixels.json()["top_k"]) == 5 and len(by_base64.json()["top_k"]) == 2
    assert by_pixels.json()["class_index"] == by_base64.json()["class_index"] == served["test_y"][3]
    explained = _post(served, encode_png(x), path="explanations", **{"X-Target": "1"})
    assert explained.status_code == 200, explained.text
    answer = explained.json()
    assert answer["target_index"] == 1 and np.array(answer["saliency"]).shape == (8, 8)
    assert answer["class_index"] == served["test_y"][3]


@pytest.mark.slow
def test_served_batching_and_workers_come_from_the_archive(served):
    model = _describe(served)
    assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"], model["maxWorkers"]) == (4, 5, 1, 1)
    # Concurrent requests are answered in batches, each with its own answer.
    from concurrent.futures import ThreadPoolExecutor

    images = served["test_x"][:16]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: predict(served["record"]["endpoint"], encode_png(im), served["token"]), images))
    assert [a["class_index"] for a in answers] == [predict(served["record"]["endpoint"], encode_png(im), served["token"])["class_index"]
                                                   for im in images]


@pytest.mark.slow
def test_deployment_record_and_status(served):
    record, server, root = served["record"], served["server"], served["root"]
    expected_keys = {"endpoint", "management_endpoint", "metrics_endpoint", "token_file", "source_token_file",
                     "request_log_dir", "model_name", "model_version", "model_dir", "dataset_dir", "model_reference",
                     "home", "pid", "proxy_pid", "key_file", "torchserve_endpoint", "max_request_bytes"}
    assert expected_keys <= set(record)
    assert json.loads((Path(record["home"]) / "state.json").read_text()) == record
    assert record["endpoint"].startswith("http://127.0.0.1:") and record["endpoint"].endswith("/predictions/digits")
    assert record["endpoint"] != record["torchserve_endpoint"], "clients get the proxy, not TorchServe"
    assert (record["model_dir"], record["dataset_dir"]) == (str(root / "model"), str(root / "dataset"))
    assert record["model_reference"] == str(root / "model" / "reference_model.csv")
    home = Path(record["home"])
    assert (record["token_file"], record["source_token_file"], record["key_file"]) == \
        (str(home / "token"), str(home / "source-token"), str(home / "key_file.json"))
    for path in (record["token_file"], record["source_token_file"], record["key_file"]):
        assert Path(path).stat().st_mode & 0o777 == 0o600, path
    token, source_token = served["token"], served["source_token"]
    assert Path(record["token_file"]).read_text() == token + "\n" and len(token) >= 32
    assert len({token, source_token, served["keys"]["inference"]["key"]}) == 3
    status = server.status()
    assert status["running"] and status["healthy"] and status["problem"] is None
    assert (status["pid"], status["proxy_pid"], status["endpoint"]) == (record["pid"], record["proxy_pid"], record["endpoint"])
    assert (status["token_file"], status["model_dir"]) == (record["token_file"], record["model_dir"])


@pytest.mark.slow
def test_the_curl_example_works_as_printed(served, tmp_path):
    """The line 'mlops serve status' prints, run by a shell in a directory holding digit.png."""
    from serving.server import curl_example

    (tmp_path / "digit.png").write_bytes(encode_png(served["test_x"][2]))
    line = curl_example(served["record"])
    assert "key_file.json" not in line
    done = subprocess.run(["bash", "-c", line + " --silent --show-error"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["class_index"] == served["test_y"][2]


@pytest.mark.slow
def test_mlops_serve_status_says_where_and_how(served, capsys):
    from pipelines.cli import main

    home = served["record"]["home"]
    assert main(["serve", "status", "--serving-home", home]) == 0
    out = capsys.readouterr().out
    assert "healthy, 1 worker(s) ready" in out and served["record"]["endpoint"] in out
    assert served["record"]["token_file"] in out and "curl -H" in out
    assert main(["serve", "status", "--json", "--serving-home", home]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] and status["healthy"] and status["workers_ready"] == 1 and status["problem"] is None


def test_mlops_serve_without_a_server_or_a_run(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["serve", "status", "--serving-home", str(tmp_path / "home")]) == 1
    assert "No TorchServe is running" in capsys.readouterr().out
    assert main(["serve", "stop", "--serving-home", str(tmp_path / "home")]) == 0
    assert main(["serve", "start", "--serving-home", str(tmp_path / "home"), "--runs-dir", str(tmp_path / "runs")]) == 1
    assert "run 'mlops run' first" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Bearer ", "Basic abc", "torchserve-key"],
                         ids=["no-token", "wrong-token", "empty-token", "basic", "torchserve-key"])
def test_prediction_without_the_right_token_is_refused_by_the_proxy(served, auth):
    """401 from the auth proxy, before the body is read; TorchServe's own key is no client token."""
    record = served["record"]
    if auth == "torchserve-key":
        auth = f"Bearer {served['keys']['inference']['key']}"
    headers = {"Content-Type": "image/png", **({"Authorization": auth} if auth else {})}
    for path in ("predictions", "explanations"):
        url = record["endpoint"].replace("/predictions/", f"/{path}/")
        response = requests.post(url, data=encode_png(served["test_x"][0]), headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert "token" in response.json()["message"].lower() and "Token Authorization failed" not in response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.slow
def test_torchserve_itself_still_wants_its_key(served):
    """Behind the proxy TorchServe keeps token authorization on: its loopback port refuses the clients' token."""
    record = served["record"]
    response = requests.post(record["torchserve_endpoint"], data=encode_png(served["test_x"][0]), timeout=10,
                             headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
    assert 400 <= response.status_code < 500 and "Token Authorization failed" in response.text
    direct = requests.post(record["torchserve_endpoint"], data=encode_png(served["test_x"][0]), timeout=10,
                           headers={"Authorization": f"Bearer {served['keys']['inference']['key']}",
                                    "Content-Type": "image/png"})
    assert direct.status_code == 200 and direct.json()["class_index"] == served["test_y"][0]


@pytest.mark.slow
def test_other_apis_need_their_own_key(served):
    """The inference key opens neither the management API nor the token API."""
    record, token = served["record"], served["keys"]["inference"]["key"]
    for url in (f"{record['management_endpoint']}/models", f"{record['management_endpoint']}/models/digits"):
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code >= 400 and "Token Authorization failed" in response.text


@pytest.mark.slow
def test_model_and_workflow_registration_is_refused(served):
    record, keys = served["record"], served["keys"]
    mgmt = record["management_endpoint"]
    # With the management key the model API itself says no; the token-API key is not a management key.
    for key, refusal in ((keys["management"]["key"], "not allowed"), (keys["API"]["key"], "Token Authorization failed")):
        response = requests.post(f"{mgmt}/models", params={"url": "digits.mar", "model_name": "intruder"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert 400 <= response.status_code < 500 and refusal in response.text, response.text
    management = {"Authorization": f"Bearer {keys['management']['key']}"}
    # (Scaling workers, PUT /models/digits?min_worker=N, stays possible for the holder of the management key:
    # TorchServe 0.12 has no switch for it. That key is in an owner-only file and the API is on loopback.)
    for method, path in (("DELETE", "/models/digits"), ("DELETE", "/models/digits/test-1"),
                         ("POST", "/workflows?url=digits.mar"), ("POST", "/models?url=file:///etc/passwd"),
                         ("POST", "/models?url=https://example.com/evil.mar")):
        response = requests.request(method, f"{mgmt}{path}", headers=management, timeout=10)
        assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text)
    listing = requests.get(f"{mgmt}/models", headers=management, timeout=10).json()
    assert [m["modelName"] for m in listing["models"]] == ["digits"]
    assert len(_describe(served)["workers"]) == 1


@pytest.mark.slow
def test_every_api_listens_on_loopback_only(served):
    """Nothing TorchServe or the proxy opened is reachable from another host: each listening socket is on 127.0.0.1."""
    pids = [served["record"]["pid"], served["record"]["proxy_pid"], *[w["pid"] for w in _describe(served)["workers"]]]
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A = LISTEN
                listening.append(fields[1])
    ports = {int(addr.split(":")[1], 16) for addr in listening}
    record = served["record"]
    expected = {int(u.rsplit(":", 1)[1].split("/")[0]) for u in (record["endpoint"], record["management_endpoint"],
                                                                  record["metrics_endpoint"], record["torchserve_endpoint"])}
    assert expected <= ports, (expected, ports)
    loopback = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
    assert listening and all(addr.split(":")[0] in loopback for addr in listening), listening


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, content_type, code, message",
    [
        (b"definitely not a png", "image/png", 400, "not a PNG or JPEG"),
        (b"", "image/png", 400, "empty request body"),
        (b"GIF89a", "image/gif", 415, "unsupported content type"),
        (b'{"pixels": [[0.5]]}', "application/json", 400, "this model takes [8, 8] or [1, 8, 8]"),
        (b'{"pixels": ', "application/json", 400, "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * (11 * 2**20), "image/png", 413, "10485760"),  # the proxy's limit
    ],
    ids=["corrupt", "empty", "gif", "wrong-shape", "truncated-json", "oversize"],
)
def test_bad_requests_are_4xx_and_the_worker_survives(served, body, content_type, code, message):
    pid_before = [w["pid"] for w in _describe(served)["workers"]]
    response = _post(served, body, content_type)
    assert response.status_code == code, response.text[:300]
    assert message in response.json()["message"]
    answer = predict(served["record"]["endpoint"], encode_png(served["test_x"][1]), served["token"])
    assert answer["class_index"] == served["test_y"][1]
    assert [w["pid"] for w in _describe(served)["workers"]] == pid_before


def _noise_png(width: int, height: int) -> bytes:
    """Random RGB noise: incompressible, so a PNG of about 3 bytes per pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.mark.slow
def test_an_oversized_image_gets_a_413_not_a_reset(served):
    """A 2000x2000 photo-like PNG (over 10 MiB): the proxy answers 413 with the limit, without reading it."""
    body = _noise_png(2000, 2000)
    limit = served["record"]["max_request_bytes"]
    assert len(body) > limit == 10 * 2**20
    with requests.Session() as session:  # a client that keeps its connection, and a fresh one per request
        for send in (session.post, requests.post, session.post, requests.post):
            response = send(served["record"]["endpoint"], data=body, timeout=30,
                            headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
            assert response.status_code == 413, response.text[:300]
            message = response.json()["message"]
            assert str(limit) in message, message
        answer = session.post(served["record"]["endpoint"], data=encode_png(served["test_x"][1]), timeout=30,
                              headers={"Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"})
    assert answer.status_code == 200 and answer.json()["class_index"] == served["test_y"][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PIXEL_BOMBS))
def test_a_small_file_with_too_many_pixels_gets_a_413_from_the_handler(served, name):
    pid_before = [w["pid"] for w in _describe(served)["workers"]]
    response = _post(served, PIXEL_BOMBS[name](), "image/jpeg" if name.startswith("jpeg") else "image/png")
    assert response.status_code == 413, response.text[:300]
    assert "the limit is 1048576 pixels" in response.json()["message"]
    answer = predict(served["record"]["endpoint"], encode_png(served["test_x"][1]), served["token"])
    assert answer["class_index"] == served["test_y"][1]
    assert [w["pid"] for w in _describe(served)["workers"]] == pid_before


@pytest.mark.slow
def test_only_the_source_token_may_tag_requests(served):
    """X-Request-Source (how the monitor tells its replay from clients) passes only with the pipeline's token."""
    record, png = served["record"], encode_png(served["test_x"][4])
    log_dir = Path(record["request_log_dir"])
    clients_before = sum(line["source"] == "client" for line in _log_lines(log_dir))
    for _ in range(3):  # first: the log is written in order, so these are in before the tagged ones below
        predict(record["endpoint"], png, served["token"], source="spoofed-by-client")
    for _ in range(3):
        predict(record["endpoint"], png, served["source_token"], source="tagged-by-pipeline")
    deadline = time.monotonic() + 15  # written by the worker's background thread
    while time.monotonic() < deadline and sum(line["source"] == "tagged-by-pipeline" for line in _log_lines(log_dir)) < 3:
        time.sleep(0.2)
    sources = [line["source"] for line in _log_lines(log_dir)]
    assert sources.count("tagged-by-pipeline") == 3
    assert "spoofed-by-client" not in sources and sources.count("client") >= clients_before + 3


@pytest.mark.slow
def test_metrics_endpoint_and_rotated_request_log(served):
    record = served["record"]
    for x in served["test_x"][:30]:
        predict(record["endpoint"], encode_png(x), served["source_token"], source="replay")
    metrics = requests.get(record["metrics_endpoint"], timeout=10)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
    log_dir = Path(record["request_log_dir"])
    deadline = time.monotonic() + 15  # written by the worker's background thread
    while time.monotonic() < deadline and sum(line.get("source") == "replay" for line in _log_lines(log_dir)) < 30:
        time.sleep(0.2)
    lines = _log_lines(log_dir)
    assert sum(line["source"] == "replay" for line in lines) == 30
    assert all(set(FEATURE_COLUMNS + EMBEDDING_COLUMNS) <= set(line) for line in lines)
    assert lines[-1]["model_version"] == "test-1"
    sizes = [f.stat().st_size for f in log_dir.glob("requests-*.jsonl")]
    assert len(sizes) >= 3 and all(500 < size <= 2048 for size in sizes), sizes  # rotated at 2 KiB, whole lines


@pytest.mark.slow
def test_killed_worker_recovers_under_load(served):
    """SIGKILL the worker while requests are in flight: TorchServe starts a new one and later requests succeed."""
    record, png = served["record"], encode_png(served["test_x"][5])
    old_pid = _describe(served)["workers"][0]["pid"]
    expected = predict(record["endpoint"], png, served["token"])
    stop, codes = threading.Event(), []

    def load():
        session = requests.Session()
        while not stop.is_set():
            try:
                codes.append(session.post(record["endpoint"], data=png, timeout=30, headers={
                    "Authorization": f"Bearer {served['token']}", "Content-Type": "image/png"}).status_code)
            except requests.RequestException:
                codes.append(-1)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers = _describe(served)["workers"]
            if workers and workers[0]["pid"] != old_pid and workers[0]["status"] == "READY":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no new READY worker within 60 s: {_describe(served)['workers']}")
        served_before = len(codes)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert codes.count(200) > 0 and len(codes) > served_before
    assert all(c == 200 for c in codes[served_before + 8:]), codes[served_before:]  # after recovery: all fine
    answers = [predict(record["endpoint"], png, served["token"]) for _ in range(5)]
    assert all(a == expected for a in answers)  # the new worker loaded the same model


@pytest.mark.slow
def test_a_proxy_that_cannot_start_fails_the_start_clearly_and_leaves_nothing(served, tmp_path):
    """A client token file someone filled with a weak token: the proxy refuses it; start says why and cleans up."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("short\n")
    server = LocalTorchServe(home)
    ports = {"inference_port": free_port(), "management_port": free_port(), "metrics_port": free_port()}
    with pytest.raises(RuntimeError, match=r"(?s)the auth proxy \(pid \d+\) exited during startup.*shorter than"):
        server.start(served["start_args"]["mar_path"], "digits", timeout_s=60, **ports)
    state = json.loads((home / "state.json").read_text())
    assert state["pid"] is None and state["proxy_pid"] is None and not server.status()["running"]
    assert not any(port_in_use("127.0.0.1", p) for p in ports.values())


def _restart(served: dict) -> dict:
    _started(served, served["server"].start(**served["start_args"]))
    return served["record"]


def _wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_crashed_proxy_shows_in_status_and_start_replaces_the_rest(served, capsys):
    server, old = served["server"], served["record"]
    token, png = served["token"], encode_png(served["test_x"][6])
    os.kill(old["proxy_pid"], signal.SIGKILL)
    _wait_until(lambda: not _is_auth_proxy(old["proxy_pid"], server.home))
    status = server.status()
    assert status["running"] and status["torchserve_running"] and not status["proxy_running"]
    assert not status["healthy"] and "the auth proxy is not running" in status["problem"] and status["proxy_pid"] is None
    with pytest.raises(requests.ConnectionError):
        requests.get(old["endpoint"].rsplit("/predictions", 1)[0] + "/healthz", timeout=5)

    new = _restart(served)
    assert "crashed server" in capsys.readouterr().out
    assert not _is_torchserve(old["pid"]), "the surviving TorchServe was stopped before the new one started"
    assert new["endpoint"] == old["endpoint"] and new["proxy_pid"] != old["proxy_pid"] and server.status()["healthy"]
    assert served["token"] == token, "clients keep their token across restarts"
    assert predict(new["endpoint"], png, token)["class_index"] == served["test_y"][6]


@pytest.mark.slow
def test_a_crashed_torchserve_gets_an_http_answer_and_start_replaces_the_rest(served):
    server, old = served["server"], served["record"]
    token, png = served["token"], encode_png(served["test_x"][6])
    workers = [w["pid"] for w in _describe(served)["workers"]]
    os.kill(old["pid"], signal.SIGKILL)
    _wait_until(lambda: not _is_torchserve(old["pid"]))
    status = server.status()
    assert status["running"] and status["proxy_running"] and not status["torchserve_running"]
    assert not status["healthy"] and "TorchServe is not running" in status["problem"] and status["pid"] is None
    response = requests.post(old["endpoint"], data=png, timeout=30,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
    assert response.status_code == 502 and response.json()["message"], response.text

    new = _restart(served)
    assert not _is_auth_proxy(old["proxy_pid"], server.home), "the surviving proxy was stopped"
    assert not any(pid_alive(w) for w in workers), "the crashed frontend's workers are gone"
    assert new["pid"] != old["pid"] and server.status()["healthy"]
    assert predict(new["endpoint"], png, token)["class_index"] == served["test_y"][6]


@pytest.mark.slow
def test_stop_really_stops(served):
    """Runs last in this module: stops the shared server and checks nothing is left."""
    record, server = served["record"], served["server"]
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == record["pid"]]
    assert workers, "expected at least one Python worker under the TorchServe frontend"
    stopped = server.stop()
    assert stopped == {"stopped": True, "pid": record["pid"], "proxy_pid": record["proxy_pid"], "home": record["home"]}
    status = server.status()
    assert not status["running"] and not status["torchserve_running"] and not status["proxy_running"]
    for pid in [record["pid"], record["proxy_pid"], *workers]:
        assert not pid_alive(pid)
    for url in (record["endpoint"], record["torchserve_endpoint"]):
        assert not port_in_use("127.0.0.1", int(url.split(":")[2].split("/")[0]))
    assert not Path(record["key_file"]).exists()
    assert Path(record["token_file"]).read_text() == served["token"] + "\n", "the clients' token outlives the server"
    with pytest.raises(requests.ConnectionError):
        requests.get(record["endpoint"].rsplit("/predictions", 1)[0] + "/ping", timeout=5)
    assert server.stop(quiet=True) == {"stopped": False, "home": record["home"]}


def _parent(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
