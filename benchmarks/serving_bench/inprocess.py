"""The in-process ceiling: the model and its handler with no server around them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .servers import handler_context


def in_process(model_dir: Path, png: bytes, seconds: float = 2.0) -> dict[str, float]:
    """The ceiling: forward passes/s of the model (batch 1, one thread) and the handler's per-request cost split."""
    import torch
    from ts.context import RequestProcessor

    from serving.handler import ImageClassifierHandler

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
    torch.set_num_threads(threads)
    return {"forward_b1_per_s": forward, "forward_b8_images_per_s": forward8, "handler_b1_per_s": handler_1,
            "handler_b8_requests_per_s": handler_8, "decode_us": 1e6 / decode, "model_us": 1e6 / infer,
            "answer_us": 1e6 / answer, "handler_b32_p50_ms": 1000 * batch_s[len(batch_s) // 2],
            "handler_b32_p99_ms": 1000 * batch_s[int(0.99 * (len(batch_s) - 1))]}
