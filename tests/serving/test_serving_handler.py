"""The TorchServe handler, run in-process with TorchServe's own Context: decoding, answers, refusals, and the
request log it writes."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from datetime import datetime
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import DIGIT_NAMES
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, embedding_projection, image_features
from components.core.models import Classifier, EncoderSpec, save_classifier
from serving.client import encode_png
from serving.handler import REQUEST_LOG_ENV, ImageClassifierHandler

PNG = {"content-type": "image/png"}
JSON_TYPE = {"content-type": "application/json"}


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


# ---------------------------------------------------------------- the request log, as the handler writes it

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


