"""Generated malformed requests against one real TorchServe: never a 5xx, never a dead worker.

Hypothesis builds groups of requests (broken PNG/JPEG bytes, random bytes, hostile
JSON, wrong shapes, odd content types and headers), sends each group concurrently
together with one good request, so the server's dynamic batching mixes bad and good
requests in the same batch. Every answer must be < 500, the good request must get
its label, and afterwards the same worker process must still be serving.

Form bodies (``application/x-www-form-urlencoded``, ``multipart/form-data``) never reach
TorchServe: its Java frontend would decode them itself, before the handler, and answer a
broken one (``a=%zz``) with its own 500. The auth proxy in front of it (locally as on
Kubernetes) refuses them with a 415; the generated requests include them, and one test
sends nothing but forms.
"""

from __future__ import annotations

import base64
import io
import json
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from components.core.models import Classifier, EncoderSpec, save_classifier
from serving.archive import build_mar
from serving.client import encode_png, read_token
from serving.processes import free_port
from serving.server import LocalTorchServe

pytestmark = pytest.mark.slow

GROUP_SIZE = 5  # malformed requests per generated example (plus one good one)
EXAMPLES = 220
SENT = {"malformed": 0, "good": 0}
CONTENT_TYPES = ["image/png", "image/jpeg", "application/json", "text/plain", "application/octet-stream", "",
                 "image/gif", "application/xml", "text/html; charset=utf-8", "application/json; charset=latin-1",
                 "IMAGE/PNG", "image/png; q=1", "application/json;", "*/*"]
FORM_TYPES = ["multipart/form-data", "multipart/form-data; boundary=xyz", "application/x-www-form-urlencoded",
              "Application/X-WWW-Form-Urlencoded"]
SENT["form"] = 0


def is_form(content_type: str) -> bool:
    """What TorchServe's frontend decodes as a form itself (Netty's HttpPostRequestDecoder)."""
    lowered = content_type.lower()
    return "multipart/form-data" in lowered or lowered.split(";")[0].strip() == "application/x-www-form-urlencoded"
ascii_text = st.text(alphabet=string.printable.strip() + " ", max_size=40)
header_values = ascii_text.map(str.strip)  # HTTP clients refuse surrounding whitespace in a header value


def _png(shape=(8, 8), seed=0) -> bytes:
    return encode_png(np.random.default_rng(seed).random((1, *shape)))


def _jpeg(size=(12, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


GOOD_PNG = _png()


@st.composite
def corrupted_image(draw) -> bytes:
    base = draw(st.sampled_from([GOOD_PNG, _png((40, 30), 1), _jpeg()]))
    data = bytearray(base)
    how = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data += draw(st.binary(min_size=1, max_size=200))
    else:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=64)) + data[at + 8:]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True) | ascii_text,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(ascii_text, children, max_size=4),
    max_leaves=30,
)


@st.composite
def near_valid_json(draw) -> bytes:
    kind = draw(st.sampled_from(["pixels", "image", "random", "topk", "deep", "broken"]))
    if kind == "pixels":
        h, w = draw(st.integers(0, 10)), draw(st.integers(0, 10))
        value = draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-300, 300) | ascii_text)
        body = {"pixels": [[value] * w for _ in range(h)]}
    elif kind == "image":
        body = {"image": draw(st.sampled_from([base64.b64encode(draw(corrupted_image())).decode(), draw(ascii_text)]))}
    elif kind == "topk":
        body = {"pixels": [[0.5] * 8] * 8, "topk": draw(json_values)}
    elif kind == "deep":
        depth = draw(st.integers(50, 3000))
        return ("[" * depth + "]" * depth).encode()  # nesting the JSON decoder may not survive
    elif kind == "broken":
        return draw(st.binary(max_size=100)) + b'{"pixels": [['
    else:
        body = draw(json_values)
    return json.dumps(body).encode()


ANY_CONTENT_TYPE = st.sampled_from(CONTENT_TYPES + FORM_TYPES) | header_values
assert not any(is_form(t) for t in CONTENT_TYPES) and all(is_form(t) for t in FORM_TYPES)


@st.composite
def malformed_request(draw, content_types=ANY_CONTENT_TYPE) -> dict:
    body = draw(st.one_of(corrupted_image(), near_valid_json(), st.binary(max_size=300),
                          st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF",
                                           b"a=%zz", b"data=%89PNG", b"--xyz\r\nContent-Disposition: form-data; name=data\r\n\r\n"])))
    headers = {"Content-Type": draw(content_types)}
    for name in ("X-Top-K", "X-Target", "X-Request-Source", "describe", "explain"):
        if draw(st.booleans()):
            headers[name] = draw(header_values)
    path = draw(st.sampled_from(["predictions", "explanations"]))
    return {"body": body, "headers": headers, "path": path}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real TorchServe (shipped batching settings, request log on) for every generated request."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    save_classifier(Classifier(EncoderSpec(width=8, embed_dim=16), 10).eval(), root / "model",
                    {"class_names": [str(i) for i in range(10)], "model_version": "fuzz-1"})
    mar = build_mar(root / "model", root / "export", "digits", "fuzz-1")
    ts = LocalTorchServe(root / "home")
    try:
        record = ts.start(mar, "digits", inference_port=free_port(), management_port=free_port(),
                          metrics_port=free_port(), request_log_dir=root / "requests", timeout_s=120)
        keys = json.loads(Path(record["key_file"]).read_text())  # TorchServe's own: its management API
        token = read_token(record["token_file"])  # the clients' token: what the auth proxy accepts
        session = requests.Session()
        base = record["endpoint"].rsplit("/predictions/", 1)[0]
        good = session.post(record["endpoint"], data=GOOD_PNG, timeout=30,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"})
        assert good.status_code == 200, good.text
        yield {"ts": ts, "record": record, "keys": keys, "token": token, "base": base, "good_label": good.json()["label"],
               "workers": _worker_pids(record, keys)}
    finally:
        ts.stop(quiet=True)
        assert not ts.status()["running"]


def _worker_pids(record, keys) -> list[int]:
    described = requests.get(f"{record['management_endpoint']}/models/digits", timeout=10,
                             headers={"Authorization": f"Bearer {keys['management']['key']}"}).json()[0]
    return sorted(w["pid"] for w in described["workers"] if w["status"] == "READY")


def _send(server, request: dict) -> requests.Response:
    headers = {**request["headers"], "Authorization": f"Bearer {server['token']}"}
    return requests.post(f"{server['base']}/{request['path']}/digits", data=request["body"], headers=headers, timeout=30)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(group=st.lists(malformed_request(), min_size=GROUP_SIZE, max_size=GROUP_SIZE))
def test_malformed_requests_never_get_a_5xx(server, group):
    good = {"body": GOOD_PNG, "headers": {"Content-Type": "image/png"}, "path": "predictions"}
    with ThreadPoolExecutor(len(group) + 1) as pool:  # concurrent: the frontend batches them together
        responses = list(pool.map(lambda r: _send(server, r), [*group, good]))
    SENT["malformed"] += len(group)
    SENT["good"] += 1
    for request, response in zip(group, responses):
        assert response.status_code < 500, (request, response.status_code, response.text[:500])
        if response.status_code >= 400 and response.status_code != 413:
            assert response.json().get("message"), response.text[:300]  # says what was wrong
    assert responses[-1].status_code == 200 and responses[-1].json()["label"] == server["good_label"], responses[-1].text


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=malformed_request(content_types=st.sampled_from(FORM_TYPES)))
def test_form_bodies_are_refused_before_torchserve(server, request):
    response = _send(server, request)
    SENT["form"] += 1
    assert response.status_code == 415 and "form bodies" in response.json()["message"], response.text


def test_server_is_healthy_afterwards(server):
    """Runs after the generated requests: same worker processes, /ping healthy, correct answers."""
    assert SENT["malformed"] >= 1000, f"only {SENT['malformed']} malformed requests were sent"
    status = server["ts"].status()
    assert status["running"] and status["healthy"], status
    assert _worker_pids(server["record"], server["keys"]) == server["workers"]  # no worker died and was replaced
    response = _send(server, {"body": GOOD_PNG, "headers": {"Content-Type": "image/png"}, "path": "predictions"})
    assert response.status_code == 200 and response.json()["label"] == server["good_label"]
