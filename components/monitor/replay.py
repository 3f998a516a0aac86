"""Replaying images to the serving endpoint as traffic (``components.core.replay``), and waiting until the request
log holds it."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pandas as pd

from components.core.replay import replay  # noqa: F401 - the monitor's replay (shared with the rollout)
from components.monitor.traffic import REPLAY_SOURCE, read_request_log, select_traffic


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
