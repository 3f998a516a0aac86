"""The in-process ceiling: the model and its handler with no server around them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .servers import handler_context


def pillow_asarray(body: bytes, channels: int, size: int):
    """The baseline decode: Pillow's usual path (open, convert, resize, ``np.asarray`` / 255), no checks."""
    import io

    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(body)).convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if channels == 1 else np.transpose(pixels, (2, 0, 1))


def decode_side_by_side(png: bytes, channels: int, size: int, rounds: int = 9, n: int = 2000) -> tuple[float, float]:
    """Median microseconds per image of the handler's ``decode_image`` and of ``pillow_asarray``, interleaved."""
    import statistics

    from serving.handler import decode_image

    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(rounds):
        for name, decode in (("ours", decode_image), ("baseline", pillow_asarray)):
            start = time.perf_counter()
            for _ in range(n):
                decode(png, channels, size)
            times[name].append(1e6 * (time.perf_counter() - start) / n)
    return statistics.median(times["ours"]), statistics.median(times["baseline"])


def encode_side_by_side(answer: dict, rounds: int = 9, n: int = 5000) -> tuple[float, float]:
    """Median microseconds to serialise one answer: the handler's encoder, and ``json.dumps`` (compact), interleaved."""
    import json
    import statistics

    from serving.handler import ANSWER_ENCODER

    if json.loads(ANSWER_ENCODER.encode(answer)) != answer:
        raise RuntimeError("the handler's encoder changed the answer")
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(rounds):
        for name, encode in (("ours", lambda: ANSWER_ENCODER.encode(answer).decode()),
                             ("baseline", lambda: json.dumps(answer, separators=(",", ":")))):
            start = time.perf_counter()
            for _ in range(n):
                encode()
            times[name].append(1e6 * (time.perf_counter() - start) / n)
    return statistics.median(times["ours"]), statistics.median(times["baseline"])


def frontend_batch_message(count: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A predict message as TorchServe's frontend writes it to a worker: ``count`` requests with these headers and
    ``body`` (``ts/protocol/otf_message_handler.py`` reads this frame format)."""
    import struct

    def sized(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    end = struct.pack("!i", -1)
    message = bytearray(b"I")
    for i in range(count):
        message += sized(f"{i:08x}-0000-0000-0000-000000000000".encode())
        for name, value in headers:
            message += sized(name) + sized(value)
        message += end + sized(b"body") + sized(b"image/png") + sized(body) + end
    return bytes(message + end)


def worker_reads_side_by_side(png: bytes, rounds: int = 7, batches: int = 100) -> tuple[float, float]:
    """Median microseconds per request for TorchServe's worker to read a batch of 32 from its socket, with the
    handler's buffered reader and with TorchServe's own (a recv() per field), interleaved."""
    import logging
    import socket
    import statistics

    from ts.protocol import otf_message_handler

    from serving.handler import read_exactly

    original = otf_message_handler._retrieve_buffer
    if original is read_exactly:
        raise RuntimeError("TorchServe's reader is already replaced in this process: measure before initialize()")
    headers = [(b"Host", b"127.0.0.1:8080"), (b"Content-Type", b"image/png"), (b"Authorization", b"Bearer " + b"k" * 43),
               (b"Content-Length", str(len(png)).encode())]
    message = frontend_batch_message(32, png, headers)
    frontend, worker = socket.socketpair()
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    logging.disable(logging.INFO)  # the reader logs a line per message
    try:
        for _ in range(rounds):
            for name, reader in (("ours", read_exactly), ("baseline", original)):
                otf_message_handler._retrieve_buffer = reader
                start = time.perf_counter()
                for _ in range(batches):
                    frontend.sendall(message)
                    _, batch = otf_message_handler.retrieve_msg(worker)
                    if len(batch) != 32 or batch[-1]["parameters"][0]["value"] != png:
                        raise RuntimeError("the worker read a different batch than was sent")
                times[name].append(1e6 * (time.perf_counter() - start) / (32 * batches))
    finally:
        otf_message_handler._retrieve_buffer = original
        logging.disable(logging.NOTSET)
        frontend.close()
        worker.close()
    return statistics.median(times["ours"]), statistics.median(times["baseline"])


def in_process(model_dir: Path, png: bytes, seconds: float = 2.0) -> dict[str, float]:
    """The ceiling: forward passes/s of the model (batch 1, one thread) and the handler's per-request cost split."""
    import torch
    from ts.context import RequestProcessor

    from serving.handler import ImageClassifierHandler

    reads_us, reads_baseline_us = worker_reads_side_by_side(png)  # before initialize() replaces the reader
    threads = torch.get_num_threads()
    context = handler_context(model_dir, "bench")
    saved = os.environ.pop("KFP_MLOPS_REQUEST_LOG_DIR", None)
    handler = ImageClassifierHandler()
    handler.initialize(context)  # sets one torch thread, as in a worker
    if saved is not None:
        os.environ["KFP_MLOPS_REQUEST_LOG_DIR"] = saved

    def rate(fn, batch: int = 1) -> float:
        for _ in range(50):
            fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * batch / (time.perf_counter() - start)

    x = handler.preprocess([{"body": png}])
    x8 = torch.cat([x] * 8)
    with torch.inference_mode():
        forward = rate(lambda: handler.model(x))
        forward8 = rate(lambda: handler.model(x8), 8)

    def request(rows: list) -> None:
        context.request_processor = [RequestProcessor({"body": {"content-type": "image/png"}}) for _ in rows]
        handler.handle(rows, context)

    one, eight = [{"body": png}], [{"body": png}] * 8
    handler_1 = rate(lambda: request(one))
    handler_8 = rate(lambda: request(eight), 8)
    # The work's own tail: back-to-back batches of 32 (what the worker runs at concurrency 32), no server, no
    # queue. Their p99/p50 is what the machine's noise alone does to this work.
    thirty_two, batch_s = [{"body": png}] * 32, []
    end = time.perf_counter() + 2 * seconds
    while (start := time.perf_counter()) < end:
        request(thirty_two)
        batch_s.append(time.perf_counter() - start)
    batch_s.sort()
    context.request_processor = [RequestProcessor({"body": {"content-type": "image/png"}})]
    decode = rate(lambda: handler.preprocess(one))
    infer = rate(lambda: handler.inference(x))
    out = handler.inference(x)
    answer = rate(lambda: handler.postprocess(out))
    ours_us, baseline_us = decode_side_by_side(png, handler.channels, handler.image_size)
    served = handler.context
    handler.context = None  # without a context, postprocess answers the dicts it would serialise
    handler.preprocess(one)
    encode_us, encode_baseline_us = encode_side_by_side(handler.postprocess(handler.inference(x))[0])
    handler.context = served
    torch.set_num_threads(threads)
    return {"decode_image_us": ours_us, "decode_image_baseline_us": baseline_us, "worker_read_us": reads_us,
            "worker_read_baseline_us": reads_baseline_us, "answer_encode_us": encode_us,
            "answer_encode_baseline_us": encode_baseline_us,
            "forward_b1_per_s": forward, "forward_b8_images_per_s": forward8, "handler_b1_per_s": handler_1,
            "handler_b8_requests_per_s": handler_8, "decode_us": 1e6 / decode, "model_us": 1e6 / infer,
            "answer_us": 1e6 / answer, "handler_b32_p50_ms": 1000 * batch_s[len(batch_s) // 2],
            "handler_b32_p99_ms": 1000 * batch_s[int(0.99 * (len(batch_s) - 1))]}
