"""Images sent to a serving endpoint as traffic, one PNG request each: the monitor's replay of the test split
and, during a local shadow or canary rollout, the client-like traffic that gives the rollout its evidence."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

REPLAY_SOURCE = "replay"  # the X-Request-Source of the monitor's replayed requests


def replay(endpoint: str, token_file: str | Path, images: np.ndarray, limit: int = 0, source: str = REPLAY_SOURCE,
           *, who: str = "monitor", until: Callable[[], bool] | None = None, repeat: bool = False,
           pause: Callable[[], float] | None = None, on_sent: Callable[[int], None] | None = None) -> int:
    """Send images ``[N, C, H, W]`` to the endpoint as PNG, one request each, in order; return how many were sent.

    ``limit`` 0 sends all (per pass). Requests carry ``X-Request-Source: <source>`` (the token must be a source
    token for the proxy to pass it on) so the request log can tell them from real clients. ``repeat`` starts
    over after the last image until ``until()`` is true (checked before each request, which also ends a single
    pass early); ``pause()``, when given, returns seconds to wait before the next request (0: none), e.g. while
    live traffic arrives; ``on_sent(n)`` is called after each answered request with the count so far. Raises on
    the first failed request, saying which one. ``who`` prefixes the progress lines.
    """
    import requests

    from serving.client import encode_png, read_token

    if limit < 0:
        raise ValueError(f"replay limit must be >= 0 (0 = all), got {limit}")
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"replay needs a non-empty batch of images shaped [N, C, H, W], got shape {images.shape}")
    if repeat and until is None:
        raise ValueError("replay with repeat=True needs until(), or it never ends")
    headers = {"Authorization": f"Bearer {read_token(token_file)}", "Content-Type": "image/png",
               "X-Request-Source": source}
    n = len(images) if limit == 0 else min(limit, len(images))
    bodies = [encode_png(images[i]) for i in range(n)]
    sent, t0 = 0, time.perf_counter()
    with requests.Session() as session:  # one kept-alive connection, as a client would hold
        while True:
            for body in bodies:
                if until is not None and until():
                    return sent
                wait = pause() if pause is not None else 0.0
                if wait > 0:
                    time.sleep(wait)
                    continue
                try:
                    response = session.post(endpoint, data=body, headers=headers, timeout=30)
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
                except Exception as e:
                    where = f"request {sent + 1}" + ("" if repeat else f" of {n}")
                    raise RuntimeError(f"replay failed at {where} to {endpoint}: {e}. "
                                       "Check the server with 'mlops serve status'.") from e
                sent += 1
                if on_sent is not None:
                    on_sent(sent)
                if sent % 100 == 0 or (not repeat and sent == n):
                    print(f"[{who}] replayed {sent}{'' if repeat else f'/{n}'} requests "
                          f"({time.perf_counter() - t0:.1f}s)", flush=True)
            if not repeat:
                return sent
