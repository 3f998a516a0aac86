"""TorchServe handler for the project's image classifier.

Packed into the .mar by ``serving/archive.py`` and run inside TorchServe's
Python worker, which uses the project's own environment, so ``components.*``
imports work here. Weights are read with safetensors (never unpickled).

Per request: PNG/JPEG bytes in, ``{"label", "class_index", "confidence",
"probabilities", "model_version"}`` out. Bad input is answered with a 400 and
a message, and the worker stays alive. When ``KFP_MLOPS_REQUEST_LOG_DIR`` is
set, every answered request adds one JSON line (prediction, the request's
``X-Request-Source`` as ``source``, and the monitoring features of the image)
to ``requests-<pid>.jsonl`` there; the monitor reads it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from components.features import FEATURE_COLUMNS, image_features
from components.models import METADATA_FILE, WEIGHTS_FILE, build_classifier

logger = logging.getLogger(__name__)

REQUEST_LOG_ENV = "KFP_MLOPS_REQUEST_LOG_DIR"
SOURCE_HEADER = "x-request-source"  # e.g. 'smoke-test' from the deploy step; logged so the monitor can tell traffic apart
DEFAULT_SOURCE = "client"
ACCEPTED_FORMATS = ("PNG", "JPEG")  # fewer image parsers on the request path, less attack surface
MAX_INPUT_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding them


def _request_body(row: Any) -> bytes:
    """The raw bytes of one request: TorchServe puts them under 'data' or 'body'."""
    body = row.get("data", row.get("body")) if isinstance(row, dict) else row
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):  # JSON clients often send base64 text
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise PredictionException("request body is text but not base64: send the PNG/JPEG bytes", 400) from None
    if body is None:
        raise PredictionException(
            "no image in the request: send the PNG/JPEG bytes as the raw body with 'Content-Type: image/png' "
            "(or image/jpeg); a form-encoded body, curl's default for --data-binary, is not supported", 400
        )
    raise PredictionException(
        f"unsupported request body of type {type(body).__name__}: send a PNG or JPEG image as the raw request body", 400
    )


def decode_image(body: bytes, channels: int, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> float32 array ``[channels, size, size]`` in [0, 1]; bad input -> PredictionException(400)."""
    if not body:
        raise PredictionException("empty request body: send a PNG or JPEG image", 400)
    try:
        image = Image.open(io.BytesIO(body), formats=ACCEPTED_FORMATS)  # lazy: reads the header only
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise PredictionException(f"image of {width}x{height} pixels is too large (limit {MAX_INPUT_PIXELS} pixels)", 400)
        image.load()
        if image.mode.startswith("I"):  # 16-bit grayscale PNG: convert() would clip it to white, so scale it
            image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8))
        image = image.convert("L" if channels == 1 else "RGB")
    except PredictionException:
        raise
    except UnidentifiedImageError:
        raise PredictionException(f"request body ({len(body)} bytes) is not a PNG or JPEG image", 400) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise PredictionException(f"request body is a broken or unsupported PNG/JPEG image ({err})", 400) from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else np.transpose(pixels, (2, 0, 1))


class ImageClassifierHandler(BaseHandler):
    """BaseHandler with safetensors loading, image decoding, labelled output and a request log."""

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        if self.device.type == "cpu":
            # A small CNN on small images: one thread per worker beats threads fighting over the cores
            # (TorchServe scales with workers instead).
            torch.set_num_threads(1)
        self.metadata = json.loads((model_dir / METADATA_FILE).read_text())
        model = build_classifier(self.metadata)
        model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE), device=str(self.device)))
        self.model = model.to(self.device).eval()
        self.manifest = getattr(context, "manifest", None) or {}
        self.class_names = [str(c) for c in self.metadata["class_names"]]
        self.channels = int(self.metadata["encoder"]["in_channels"])
        self.image_size = int(self.metadata["encoder"]["image_size"])
        self.model_version = str(
            self.metadata.get("model_version") or self.manifest.get("model", {}).get("modelVersion") or "unknown"
        )
        log_dir = os.environ.get(REQUEST_LOG_ENV)
        self.request_log_path = Path(log_dir) / f"requests-{os.getpid()}.jsonl" if log_dir else None
        # Filled by preprocess, read by postprocess (one batch at a time per worker).
        self._batch_errors: dict[int, str] = {}
        self._batch_images = np.zeros((0, self.channels, self.image_size, self.image_size), np.float32)
        self.initialized = True

    def preprocess(self, data):
        """Decode every request of the batch into one tensor ``[N, C, H, W]`` of the valid images.

        A batch with only bad requests raises PredictionException(400). In a
        mixed batch the bad requests get their own 400 and the others are
        still answered, so one broken client cannot fail its neighbours.
        """
        images, errors = [], {}
        for i, row in enumerate(data):
            try:
                images.append(decode_image(_request_body(row), self.channels, self.image_size))
            except PredictionException as err:
                errors[i] = err.message
        if not images:
            raise PredictionException("; ".join(sorted(set(errors.values()))), 400)
        self._batch_errors = errors
        self._batch_images = np.stack(images)
        return torch.from_numpy(self._batch_images).to(self.device)

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return torch.softmax(self.model(data), dim=1).cpu()

    def postprocess(self, data):
        """Probabilities of the valid images -> one response per request of the batch (errors in place)."""
        probabilities = data.numpy()
        responses, answered, valid = [], [], iter(range(len(probabilities)))
        for i in range(len(probabilities) + len(self._batch_errors)):
            if i in self._batch_errors:
                if self.context is not None:
                    self.context.set_response_status(400, self._batch_errors[i], idx=i)
                responses.append({"error": self._batch_errors[i], "code": 400})
                continue
            p = probabilities[next(valid)]
            best = int(p.argmax())
            responses.append({
                "label": self.class_names[best],
                "class_index": best,
                "confidence": float(p[best]),
                "probabilities": {name: float(q) for name, q in zip(self.class_names, p)},
                "model_version": self.model_version,
            })
            answered.append(i)
        self._log_requests([(i, responses[i]) for i in answered])
        return responses

    def _request_source(self, idx: int) -> str:
        """The X-Request-Source header of request idx if it is a short plain name, else 'client'."""
        try:
            headers = self.context.request_processor[idx].get_request_properties()
        except (AttributeError, IndexError, KeyError, TypeError):
            return DEFAULT_SOURCE
        value = next((str(v) for k, v in headers.items() if str(k).lower() == SOURCE_HEADER), "")
        return value if re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", value) else DEFAULT_SOURCE

    def _log_requests(self, predictions: list[tuple[int, dict[str, Any]]]) -> None:
        """Append one JSON line per answered request; one write per batch so readers see whole lines."""
        if self.request_log_path is None or not predictions:
            return
        features = image_features(self._batch_images).to_dict(orient="records")
        timestamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        lines = []
        for (idx, prediction), feats in zip(predictions, features):
            record = {
                "timestamp": timestamp,
                "model_version": prediction["model_version"],
                "predicted_class": prediction["class_index"],
                "predicted_label": prediction["label"],
                "confidence": prediction["confidence"],
                "source": self._request_source(idx),
                **{name: float(feats[name]) for name in FEATURE_COLUMNS},
            }
            lines.append(json.dumps(record) + "\n")
        try:
            self.request_log_path.parent.mkdir(parents=True, exist_ok=True)
            # O_APPEND + a single unbuffered write: a reader never sees half a batch's line.
            fd = os.open(self.request_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)
        except OSError as err:  # the answer matters more than its log line; the gap shows in model_log.log
            logger.error("request log %s not written: %s", self.request_log_path, err)
