"""Replaying images to the serving endpoint as traffic, and waiting until the request log holds it."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from components.monitor.traffic import REPLAY_SOURCE, read_request_log, select_traffic


def replay(endpoint: str, token_file: str | Path, images: np.ndarray, limit: int = 0,
           source: str = REPLAY_SOURCE) -> int:
    """Send images ``[N, C, H, W]`` to the endpoint as PNG, one request each; return how many were sent.

    ``limit`` 0 sends all. Requests carry ``X-Request-Source: <source>`` so the request log
    can tell them from real clients. Raises on the first failed request, saying which one.
    """
    from serving.client import encode_png, predict, read_token

    if limit < 0:
        raise ValueError(f"replay limit must be >= 0 (0 = all), got {limit}")
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"replay needs a non-empty batch of images shaped [N, C, H, W], got shape {images.shape}")
    token = read_token(token_file)
    n = len(images) if limit == 0 else min(limit, len(images))
    t0 = time.perf_counter()
    for i in range(n):
        try:
            predict(endpoint, encode_png(images[i]), token, source=source)
        except Exception as e:
            raise RuntimeError(f"replay failed at request {i + 1} of {n} to {endpoint}: {e}. "
                               "Check the server with 'mlops serve status'.") from e
        if (i + 1) % 100 == 0 or i + 1 == n:
            print(f"[monitor] replayed {i + 1}/{n} requests ({time.perf_counter() - t0:.1f}s)", flush=True)
    return n


def wait_for_log(log_dir: str | Path, since: datetime, expected_rows: int, model_version: str | None = None,
                 source: str | None = REPLAY_SOURCE, timeout_s: float = 15.0) -> int:
    """Wait until the request log holds ``expected_rows`` rows since ``since`` (the server may log
    after it answers); return the rows found, which may be fewer if ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            log = select_traffic(read_request_log(log_dir, since=since), model_version=model_version, source=source)
        except FileNotFoundError:  # the log writer creates the directory with its first line
            log = pd.DataFrame()
        if len(log) >= expected_rows or time.monotonic() >= deadline:
            return len(log)
        time.sleep(0.5)
