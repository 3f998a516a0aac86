"""TorchServe handler for the project's image classifier.

Packed into the .mar by ``serving/archive.py`` and run inside TorchServe's
Python worker, which uses the project's own environment, so ``components.*``
imports work here. Weights are read with safetensors (never unpickled).

It subclasses ``BaseHandler`` and overrides only what differs: ``initialize``
(safetensors), ``preprocess`` (decoding and validating each request),
``inference`` (probabilities and embeddings), ``postprocess`` (labelled top-k
answers, explanations, the request log), and ``explain_handle`` /
``get_insights`` (saliency maps for ``/explanations/<model>``).

Accepted request bodies (``POST /predictions/<model>``):

* PNG or JPEG bytes (``Content-Type: image/png`` or ``image/jpeg``; also
  ``application/octet-stream``). Up to ``MAX_INPUT_PIXELS`` pixels (more is a 413,
  refused from the image header, before decoding); resized to the model's input
  size, converted to its channels.
* JSON (``Content-Type: application/json``), one object per request:
  ``{"image": "<base64 of PNG/JPEG bytes>"}`` or
  ``{"pixels": <nested list>}`` with pixel values in [0, 1] (floats), shaped
  exactly ``[H, W]`` (one-channel models) or ``[C, H, W]``, where C, H and W
  are the model's channels and image size (``[8, 8]`` or ``[1, 8, 8]`` for the
  digits model); no resizing. A bare list is taken as ``pixels``. Optional
  fields: ``"topk"`` and, for explanations, ``"target"``.
* base64 text of PNG/JPEG bytes (``text/plain``).

Options, as JSON fields or request headers (TorchServe 0.12 does not pass
query parameters to handlers): ``topk`` / ``X-Top-K`` (1..number of classes,
default ``DEFAULT_TOPK``) and, for explanations, ``target`` / ``X-Target`` (the
class to explain, by index or label; default the predicted class).

Answer (JSON)::

    {"label": "7", "class_index": 7, "confidence": 0.98,
     "probabilities": {"7": 0.98, "1": 0.01, "9": 0.004},          # the top k, best first
     "top_k": [{"label": "7", "class_index": 7, "probability": 0.98}, ...],
     "model_version": "3"}

Explanations add ``"target_index"``, ``"target_label"``, ``"method": "gradient"``
and ``"saliency"``: an ``[H, W]`` list in [0, 1], the magnitude of the gradient
of the target class's score with respect to each input pixel (max over
channels), scaled so the largest is 1.

Bad input never kills the worker and never answers 5xx: each bad request of a
batch gets its own 4xx (400 bad body, 413 too many pixels, 415 unsupported
content type) with a message, and the good requests of the same batch are still
answered.

The request log (``serving/request_log.py``) is written by a background
thread when ``KFP_MLOPS_REQUEST_LOG_DIR`` is set (a directory or an ``s3://``
prefix); the request path only queues references to arrays it already has. On
SIGTERM and at exit the worker writes, closes and uploads it before it ends; the
pod flushes it earlier still, in its preStop hook (``docs/serving.md``, "Shutdown and drain").
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
import sys
import time
import weakref
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError  # noqa: F401 - the two plugins: registered
from safetensors.torch import load_file
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from components.core.models import METADATA_FILE, WEIGHTS_FILE, build_classifier
from serving.request_log import REQUEST_LOG_ENV, LogBatch, RequestLogger, close_on_shutdown

logger = logging.getLogger(__name__)

__all__ = ["ImageClassifierHandler", "decode_image", "decode_pixels", "REQUEST_LOG_ENV", "BadRequest"]

SOURCE_HEADER = "x-request-source"  # e.g. 'smoke-test' from the deploy step; logged so the monitor can tell traffic apart
DEFAULT_SOURCE = "client"
DEFAULT_TOPK = 3
ACCEPTED_FORMATS = ("PNG", "JPEG")  # fewer image parsers on the request path, less attack surface
# Pillow's own (signature check, opener) of each accepted format, as Image.open picks one, without its search of
# the plugin registry and its bomb check (a warning up to 2 * MAX_IMAGE_PIXELS, which MAX_INPUT_PIXELS undercuts).
# With the raw-bytes conversion in decode_image, a model-sized PNG decodes in about 0.7 of the time of Pillow's
# usual path (benchmarks/serving.py, in-process decode).
IMAGE_OPENERS = tuple((Image.OPEN[name][1], Image.OPEN[name][0]) for name in ACCEPTED_FORMATS)
# Refused from the header, before decoding: a small, very compressible PNG can declare billions of pixels, and
# decoding one costs the worker memory and CPU for every pixel although the model only sees a few. One
# megapixel is far above any model input here and bounds a decode to a few MiB.
MAX_INPUT_PIXELS = 1024 * 1024
MAX_JSON_VALUES = 3 * 1024 * 1024  # pixels in a JSON list; far above any model input here
IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "application/octet-stream"}
JSON_TYPES = {"application/json"}
TEXT_TYPES = {"text/plain"}
OPTION_HEADERS = {"x-top-k": "topk", "x-target": "target"}  # request header -> option (a JSON field wins)
ANSWER_ENCODER = msgspec.json.Encoder()
SUPPORTED_TYPES = "image/png, image/jpeg, application/json (base64 'image' or 'pixels') or text/plain (base64)"


# TorchServe's loader wants exactly one class in this module (the handler), so client errors are plain
# PredictionExceptions: a request the client must fix, answered with its 4xx code and message.
BadRequest = PredictionException


def bad_request(message: str, code: int = 400) -> PredictionException:
    return PredictionException(message, code)


def _safe_phrase(text: str) -> str:
    """An HTTP reason phrase: printable ASCII, one line, short (the client's bytes must not break the response)."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:200]


def _too_many_pixels(image: str, size: int) -> PredictionException:
    return bad_request(f"{image} is too large: the limit is {MAX_INPUT_PIXELS} pixels (e.g. 1024x1024); "
                       f"the model takes {size}x{size}, so resize it before sending", 413)


def decode_image(body: bytes, channels: int, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> float32 array ``[channels, size, size]`` in [0, 1]; bad input -> BadRequest (400, or 413
    for more than ``MAX_INPUT_PIXELS`` pixels)."""
    if not body:
        raise bad_request("empty request body: send a PNG or JPEG image")
    try:
        opener = next((factory for accepts, factory in IMAGE_OPENERS if accepts(body[:16])), None)
        if opener is None:
            raise UnidentifiedImageError
        image = opener(io.BytesIO(body), None)  # lazy: reads the header only
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise _too_many_pixels(f"image of {width}x{height} pixels", size)
        image.load()
        if image.mode.startswith("I"):  # 16-bit grayscale PNG: convert() would clip it to white, so scale it
            image = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8))
        mode = "L" if channels == 1 else "RGB"
        if image.mode != mode:  # convert() copies even when the mode is already right
            image = image.convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        # The raw bytes, then one conversion in place (np.asarray(image) goes through the array interface).
        pixels = np.frombuffer(image.tobytes(), np.uint8).astype(np.float32)
        pixels /= np.float32(255)
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise bad_request(f"request body ({len(body)} bytes) is not a PNG or JPEG image") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises many types on hostile files; all are the client's problem
        raise bad_request(f"request body is a broken or unsupported PNG/JPEG image ({type(err).__name__}: {err})"[:300]) from None
    return pixels.reshape(1, size, size) if channels == 1 else pixels.reshape(size, size, 3).transpose(2, 0, 1)


# TorchServe's Python worker reads every field of every request of a batch with a recv() of its own (about 25
# system calls for a request with four headers). The handler gives that reader a buffer: one recv() takes whatever
# the frontend has sent, up to READ_AHEAD bytes, and the fields are cut from it; reading a batch of 32 then takes
# about 0.4 of the time (benchmarks/serving.py, in-process worker reads). Only for the TorchServe release it was
# written against.
READ_AHEAD = 64 * 1024
BUFFERED_READER_TORCHSERVE = "0.12.0"
_read_ahead: "weakref.WeakKeyDictionary[Any, bytearray]" = weakref.WeakKeyDictionary()  # socket -> bytes read ahead


def read_exactly(conn, length: int) -> bytearray:
    """``length`` bytes from the frontend's connection, as ``otf_message_handler._retrieve_buffer`` returns them,
    read ahead in blocks of up to ``READ_AHEAD`` bytes; ends the worker when the frontend has gone, as it does."""
    buffered = _read_ahead.get(conn)
    if buffered is None:
        buffered = _read_ahead[conn] = bytearray()
    while len(buffered) < length:
        data = conn.recv(max(READ_AHEAD, length - len(buffered)))
        if not data:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        buffered += data
    field = buffered[:length]
    del buffered[:length]  # CPython drops a bytearray's head by moving its start, without copying the rest
    return field


def buffer_worker_reads() -> bool:
    """Route TorchServe's message reader through ``read_exactly``; whether it is (only on the release it fits)."""
    import ts
    from ts.protocol import otf_message_handler

    current = otf_message_handler._retrieve_buffer
    if current is read_exactly:
        return True
    if getattr(ts, "__version__", None) != BUFFERED_READER_TORCHSERVE or current.__code__.co_varnames[:2] != ("conn", "length"):
        logger.warning("TorchServe %s: its worker's reads stay unbuffered (the buffer fits %s only)",
                       getattr(ts, "__version__", "?"), BUFFERED_READER_TORCHSERVE)
        return False
    otf_message_handler._retrieve_buffer = read_exactly  # between two messages: nothing is read ahead yet
    logger.info("TorchServe's worker reads the frontend's messages through a %d KiB buffer", READ_AHEAD // 1024)
    return True


def decode_pixels(value: Any, channels: int, size: int) -> np.ndarray:
    """A nested list of pixel values in [0, 1], shaped [H, W] or [C, H, W] exactly -> float32 [C, H, W]."""
    expected = (f"[{size}, {size}] or " if channels == 1 else "") + f"[{channels}, {size}, {size}]"
    try:
        array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise bad_request(f"'pixels' must be a nested list of numbers shaped {expected} (a ragged list or a "
                         "non-number was sent)") from None
    if array.size > MAX_JSON_VALUES:
        raise bad_request(f"'pixels' has {array.size} values; the model takes {channels * size * size}")
    sent = list(array.shape)
    if array.ndim == 2 and channels == 1:
        array = array[None]
    if array.shape != (channels, size, size):
        raise bad_request(f"'pixels' has shape {sent}; this model takes {expected}")
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise bad_request("'pixels' values must be finite numbers in [0, 1] (scale 8-bit values by 1/255)")
    return array


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {str(value)[:40]!r}") from None
    if not math.isfinite(number) or number != int(number) or not low <= int(number) <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {str(value)[:40]!r}")
    return int(number)


class ImageClassifierHandler(BaseHandler):
    """BaseHandler with safetensors loading, image/JSON decoding, top-k answers, saliency and a request log."""

    def initialize(self, context):
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        if self.device.type == "cpu":
            # A small CNN on small images: one thread per worker beats threads fighting over the cores
            # (TorchServe scales with workers and batching instead).
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
        buffer_worker_reads()
        self.request_log = RequestLogger.from_env()
        if self.request_log is not None:
            close_on_shutdown(self.request_log)
        self._quiet_per_request_log_lines()
        # Per batch, filled by preprocess and read by postprocess (a worker runs one batch at a time).
        self._errors: dict[int, BadRequest] = {}
        self._topk: dict[int, int] = {}
        self._targets: dict[int, Any] = {}
        self._valid: list[int] = []
        self._images = np.zeros((0, self.channels, self.image_size, self.image_size), np.float32)
        self._warm_up()
        self.initialized = True

    def _warm_up(self) -> None:
        """The model and the request log's row computation once on a blank image, answered to no one and logged
        nowhere, before the worker reports ready: otherwise a fresh worker's first requests pay the lazy set-up of
        the first calls (tens of ms), which a rollout's latency evidence counts against a just-started challenger."""
        blank = torch.zeros((1, self.channels, self.image_size, self.image_size), device=self.device)
        with torch.inference_mode():  # the model itself: a subclass's inference may need state set after this
            embeddings = self.model.embed(blank)
            self.model.head(embeddings)
        if self.request_log is not None:
            from components.core.features import embedding_projection, image_features

            image_features(blank.cpu().numpy())
            embedding_projection(embeddings.cpu().numpy())

    @staticmethod
    def _quiet_per_request_log_lines() -> None:
        """Drop the worker's 'Backend received inference' INFO line (one per batch, parsed by the Java frontend)."""
        class _DropPerBatchLine(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return not str(record.msg).startswith("Backend received inference")

        for h in logging.getLogger().handlers:
            if not any(isinstance(f, _DropPerBatchLine) for f in h.filters):
                h.addFilter(_DropPerBatchLine())

    def _is_describe(self):
        """Never: BaseHandler would answer a whole batch with one 'describe' result when any client sends the
        header 'describe: True', failing its neighbours (503); the management API's describe is enough."""
        return False

    # ------------------------------------------------------------------ decoding

    def _content_type(self, idx: int, key: str) -> str:
        try:
            declared = self.context.get_request_header(idx, key) if self.context is not None else None
        except (AttributeError, IndexError, KeyError, TypeError):
            declared = None
        if isinstance(declared, dict):
            declared = declared.get("content-type")
        return str(declared or "").split(";")[0].strip().lower()

    def _decode_row(self, idx: int, row: Any) -> tuple[np.ndarray, int, Any]:
        """One request -> (image [C, H, W], topk, explanation target or None)."""
        if not isinstance(row, dict):
            row = {"body": row}
        key = "body" if "body" in row else "data"  # raw body; 'data' is a multipart form field of that name
        body = row.get(key)
        if body is None:
            raise bad_request(
                "no image in the request: send PNG/JPEG bytes as the raw body with 'Content-Type: image/png' "
                "(or image/jpeg), or JSON with 'image' (base64) or 'pixels'; curl's --data-binary without a "
                "Content-Type header sends a form, which is not supported"
            )
        content_type = self._content_type(idx, key)
        options = self._header_options(idx)
        known = IMAGE_TYPES | JSON_TYPES | TEXT_TYPES | {""}
        if content_type not in known:
            raise bad_request(f"unsupported content type {content_type[:60]!r}: send {SUPPORTED_TYPES}", 415)
        if isinstance(body, (bytes, bytearray)):
            body = bytes(body)
            looks_like_json = content_type == "" and body.lstrip()[:1] in (b"{", b"[")
            if content_type in JSON_TYPES or looks_like_json:  # JSON the worker could not decode, or no type given
                try:
                    body = json.loads(body.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as err:
                    raise bad_request(f"request body is not valid JSON ({err})"[:300]) from None
            elif content_type in TEXT_TYPES:
                body = body.decode("utf-8", "replace")
        if isinstance(body, str):
            if content_type in JSON_TYPES:
                raise bad_request("JSON body must be an object with 'image' (base64 PNG/JPEG) or 'pixels', or a list of pixels")
            body = self._base64(body, "request body")
        if isinstance(body, bytes):
            image = decode_image(body, self.channels, self.image_size)
        elif isinstance(body, list):
            image = decode_pixels(body, self.channels, self.image_size)
        elif isinstance(body, dict):
            unknown = set(body) - {"image", "pixels", "topk", "target"}
            if unknown:
                raise bad_request(f"unknown JSON field(s) {sorted(map(str, unknown))[:5]}: use 'image' (base64 "
                                 "PNG/JPEG) or 'pixels', and optionally 'topk', 'target'")
            options.update({k: body[k] for k in ("topk", "target") if k in body})
            if ("image" in body) == ("pixels" in body):
                raise bad_request("JSON body needs exactly one of 'image' (base64 PNG/JPEG) and 'pixels' (nested list)")
            if "image" in body:
                if not isinstance(body["image"], str):
                    raise bad_request("'image' must be a base64 string of PNG/JPEG bytes")
                image = decode_image(self._base64(body["image"], "'image'"), self.channels, self.image_size)
            else:
                image = decode_pixels(body["pixels"], self.channels, self.image_size)
        else:
            raise bad_request(f"unsupported JSON body of type {type(body).__name__}: send an object with 'image' or 'pixels'")
        n = len(self.class_names)
        topk = _as_int(options["topk"], "topk", 1, n) if "topk" in options else min(DEFAULT_TOPK, n)
        return image, topk, options.get("target")

    def _header_options(self, idx: int) -> dict[str, str]:
        """``X-Top-K`` and ``X-Target`` request headers (TorchServe 0.12 does not pass query parameters on)."""
        try:
            headers = self.context.request_processor[idx].get_request_properties() if self.context is not None else {}
        except (AttributeError, IndexError, KeyError, TypeError):
            return {}
        options = {}
        for key, value in headers.items():
            name = str(key).lower()
            if name in OPTION_HEADERS and isinstance(value, str):
                options[OPTION_HEADERS[name]] = value
        return options

    @staticmethod
    def _base64(text: str, what: str) -> bytes:
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{what} is text but not base64 of a PNG/JPEG image") from None

    def preprocess(self, data):
        """Decode every request of the batch into one tensor ``[N, C, H, W]`` of the valid ones.

        A bad request is remembered with its error (answered in postprocess)
        instead of failing the batch, so one broken client cannot fail its
        neighbours. Called with a single bad request and no context (as in a
        unit test), it raises the BadRequest itself.
        """
        images, self._errors, self._topk, self._targets, self._valid = [], {}, {}, {}, []
        for i, row in enumerate(data):
            try:
                image, topk, target = self._decode_row(i, row)
            except BadRequest as err:
                self._errors[i] = err
                continue
            except Exception as err:  # noqa: BLE001 - anything else about one request is still that request's fault
                self._errors[i] = bad_request(f"request could not be read ({type(err).__name__})")
                continue
            images.append(image)
            self._topk[i], self._targets[i] = topk, target
            self._valid.append(i)
        if not images and self.context is None:
            raise next(iter(self._errors.values()))
        shape = (0, self.channels, self.image_size, self.image_size)
        self._images = np.stack(images) if images else np.zeros(shape, np.float32)
        return torch.from_numpy(self._images).to(self.device)

    # ------------------------------------------------------------------ model

    def inference(self, data, *args, **kwargs):
        """``(probabilities [N, K], embeddings [N, D])`` of the valid images."""
        if len(data) == 0:
            return torch.zeros((0, len(self.class_names))), torch.zeros((0, self.model.head.in_features))
        with torch.inference_mode():
            embeddings = self.model.embed(data)
            probabilities = torch.softmax(self.model.head(embeddings), dim=1)
        return probabilities.cpu(), embeddings.cpu()

    def explain_handle(self, data_preprocess, raw_data):
        """/explanations/<model>: the same answers as predictions, plus saliency maps (see postprocess)."""
        return self.postprocess(self.inference(data_preprocess))

    def get_insights(self, tensor_data, _, target=0):
        """Saliency maps ``[N, H, W]`` in [0, 1]: |d score[target] / d pixel|, max over channels, scaled per image."""
        x = tensor_data.detach().clone().requires_grad_(True)
        targets = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1).expand(len(x))
        with torch.enable_grad():
            scores = self.model(x).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(scores, x)
        saliency = grad.abs().amax(dim=1)
        peak = saliency.flatten(1).amax(dim=1).clamp_min(1e-12)
        return (saliency / peak[:, None, None]).cpu().numpy()

    def _is_explain_row(self, idx: int) -> bool:
        try:
            return self.context is not None and self.context.get_request_header(idx, "explain") == "True"
        except (AttributeError, IndexError, KeyError, TypeError):
            return False

    def _target_index(self, value: Any, predicted: int) -> int:
        if value is None:
            return predicted
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value in self.class_names:
            return self.class_names.index(value)
        return _as_int(value, "target", 0, len(self.class_names) - 1)

    # ------------------------------------------------------------------ answers

    def postprocess(self, data):
        """One JSON answer per request of the batch, in order (errors in place, with their status)."""
        probabilities, embeddings = data
        p = probabilities.numpy()
        order = np.argsort(-p, axis=1, kind="stable")
        now = time.time()
        answers: list[Any] = [None] * (len(self._valid) + len(self._errors))
        explain: dict[int, int] = {}  # batch row -> target class
        for row, i in enumerate(self._valid):
            best = int(order[row, 0])
            top = [int(c) for c in order[row, : self._topk[i]]]
            answers[i] = {
                "label": self.class_names[best],
                "class_index": best,
                "confidence": float(p[row, best]),
                "probabilities": {self.class_names[c]: float(p[row, c]) for c in top},
                "top_k": [{"label": self.class_names[c], "class_index": c, "probability": float(p[row, c])} for c in top],
                "model_version": self.model_version,
            }
            if self._is_explain_row(i):
                try:
                    explain[row] = self._target_index(self._targets[i], best)
                except BadRequest as err:
                    self._errors[i] = err
        if explain:
            rows = sorted(explain)
            maps = self.get_insights(torch.from_numpy(self._images[rows]).to(self.device), None, [explain[r] for r in rows])
            for row, saliency in zip(rows, maps):
                i = self._valid[row]
                if i in self._errors:
                    continue
                target = explain[row]
                answers[i].update(target_index=target, target_label=self.class_names[target], method="gradient",
                                  saliency=np.round(saliency, 4).tolist())
        self._log(p, embeddings, now)
        for i, err in self._errors.items():
            answers[i] = {"code": err.error_code, "type": HTTPStatus(err.error_code).phrase.replace(" ", ""),
                          "message": err.message}
            if self.context is not None:
                self.context.set_response_status(err.error_code, _safe_phrase(err.message), idx=i)
        if self.context is None:
            return answers
        out = []
        for i, answer in enumerate(answers):
            # Serialised here, compactly, by msgspec (a tenth of json.dumps's time for an answer, the same values):
            # TorchServe would pretty-print dicts (indent=2) on the hot path.
            self.context.set_response_content_type(i, "application/json")
            out.append(ANSWER_ENCODER.encode(answer).decode())
        return out

    # ------------------------------------------------------------------ request log

    def _request_source(self, idx: int) -> str:
        """The X-Request-Source header of request idx if it is a short plain name, else 'client'."""
        try:
            headers = self.context.request_processor[idx].get_request_properties()
        except (AttributeError, IndexError, KeyError, TypeError):
            return DEFAULT_SOURCE
        value = next((str(v) for k, v in headers.items() if str(k).lower() == SOURCE_HEADER), "")
        return value if re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", value) else DEFAULT_SOURCE

    def _log(self, probabilities: np.ndarray, embeddings: torch.Tensor, now: float) -> None:
        """Hand the answered requests to the request log's queue: references only, no work, never blocks."""
        if self.request_log is None:
            return
        keep = [row for row, i in enumerate(self._valid) if i not in self._errors]
        if not keep:
            return
        predicted = probabilities[keep].argmax(axis=1)
        self.request_log.submit(LogBatch(
            images=self._images[keep] if len(keep) < len(self._valid) else self._images,
            embeddings=embeddings.numpy()[keep] if len(keep) < len(self._valid) else embeddings.numpy(),
            predicted=predicted.tolist(),
            labels=[self.class_names[c] for c in predicted],
            confidences=probabilities[keep, predicted].tolist(),
            sources=[self._request_source(self._valid[row]) for row in keep],
            timestamps=[now] * len(keep),
            model_version=self.model_version,
        ))

