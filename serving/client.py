"""A small client for the served model: PNG encoding, token lookup, predictions.

Used by the deploy step's smoke test, the monitor's replay and the tests, so
all of them speak to the endpoint the same way.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """Encode one image shaped ``[C, H, W]`` (or ``[H, W]``) with pixels in [0, 1] as PNG bytes."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    if x.ndim not in (2, 3):
        raise ValueError(f"expected an image shaped [C, H, W] or [H, W], got {np.shape(image)}")
    pixels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def read_token(token_file: str | Path, kind: str = "inference") -> str:
    """The bearer token in ``token_file``: a plain-text token file or TorchServe's ``key_file.json``.

    A plain-text file (the local server's ``token`` and ``source-token``, a Kubernetes Secret
    mounted as a file: the token, optionally more lines for rotation) gives its first non-empty
    line, stripped. TorchServe's own key file is JSON: the ``kind`` key ('inference',
    'management' or 'API') is returned; only the auth proxy and health checks use it.
    """
    path = Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found: has the server been started ('mlops serve status' "
                                "shows its token file), or is the Secret mounted there?")
    text = path.read_text()
    try:
        keys = json.loads(text)
    except ValueError:
        keys = None
    if isinstance(keys, dict):
        try:
            return keys[kind]["key"]
        except (KeyError, TypeError):
            raise KeyError(f"{path} has no '{kind}' key; it holds {sorted(keys)}") from None
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise ValueError(f"token file {path} is empty: expected TorchServe's key_file.json or a token on its first line")
    return token


def predict(endpoint: str, body: bytes, token: str, timeout: float = 30.0,
            content_type: str = "image/png", source: str | None = None) -> Any:
    """POST one request body to the prediction endpoint with the bearer token; raise on HTTP errors.

    ``source`` (e.g. 'smoke-test', 'replay') is sent as ``X-Request-Source`` and lands in the
    request log, so the monitor can tell synthetic traffic from real clients.
    """
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    if source:
        headers["X-Request-Source"] = source
    response = requests.post(endpoint, data=body, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"prediction request to {endpoint} failed with HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


SMOKE_SOURCE = "smoke-test"  # request-log 'source' of the smoke test's requests, so the monitor can skip them


def smoke_test(endpoint: str, token_file: str | Path | None, images, labels, class_names: list[str],
               model_version: str | None = None, *, token: str | None = None,
               send: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Send each image as PNG to the endpoint; return counts, accuracy, latency and what went wrong.

    ``token_file``: a plain-text token file (the local server's ``source-token``, so the
    proxy passes ``X-Request-Source`` on) or TorchServe's ``key_file.json``; ``token`` (e.g.
    the cluster's client token) replaces reading it; ``send`` replaces
    ``serving.client.predict`` (same signature; tests inject one).
    """
    token = token if token is not None else read_token(token_file)
    send = send or predict
    problems: list[str] = []
    correct, latencies = 0, []
    for i, (image, label) in enumerate(zip(images, labels)):
        t0 = time.perf_counter()
        try:
            answer = send(endpoint, encode_png(image), token, source=SMOKE_SOURCE)
        except Exception as err:  # noqa: BLE001 - every failure is reported, none hidden
            problems.append(f"image {i}: {err}")
            continue
        latencies.append(time.perf_counter() - t0)
        missing = {"label", "class_index", "confidence", "probabilities", "model_version"} - set(answer if isinstance(answer, dict) else {})
        if missing:
            problems.append(f"image {i}: response lacks {sorted(missing)}: {str(answer)[:200]}")
            continue
        if model_version is not None and answer["model_version"] != model_version:
            problems.append(f"image {i}: served model_version {answer['model_version']!r}, expected {model_version!r}")
        if answer["label"] != class_names[answer["class_index"]]:
            problems.append(f"image {i}: label {answer['label']!r} does not match class_index {answer['class_index']}")
        correct += int(answer["class_index"] == int(label))
    n = len(labels)
    return {
        "images": n,
        "answered": len(latencies),
        "accuracy": correct / n if n else 0.0,
        "latency_ms_mean": 1000 * sum(latencies) / len(latencies) if latencies else None,
        "problems": problems,
    }
