"""Which logged requests are traffic: the request sources, and selecting one model version's requests."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Callable

import pandas as pd

from components.core.replay import REPLAY_SOURCE  # noqa: F401 - the monitor's own replayed requests
from components.monitor.sampling import read_window

EXCLUDED_SOURCES = ("smoke-test",)  # request-log sources that are not traffic (see components.deploy.local)
DEFAULT_SOURCE = "client"  # what the handler logs when a request names no source


def read_request_log(log_dir: str | Path, since: datetime | None = None,
                     until: datetime | None = None) -> pd.DataFrame:
    """Every request logged in ``log_dir`` (``*.jsonl``, local or ``s3://``) with ``since <= timestamp < until``.

    Tolerant of a live log: a last line without a newline that does not parse is a request
    still being written (skipped, counted in ``df.attrs["partial_lines"]``); any other line
    that is not a JSON object with a valid ``timestamp`` is skipped and counted in
    ``df.attrs["bad_lines"]``. Naive ``since``/``until`` are taken as UTC. The ``timestamp``
    column comes back as UTC datetimes, rows sorted by time. Reads everything; the monitor
    itself samples large windows (``components.monitor.sampling.read_window``).
    """
    window = read_window(log_dir, since, until, epsilon=None)
    if window.bad_lines:
        print(f"[monitor] skipped {window.bad_lines} unreadable line(s) in {log_dir}", flush=True)
    df = window.frame
    df.attrs.update(files=window.files, bad_lines=window.bad_lines, partial_lines=window.partial_lines)
    return df


def _source_of(record: dict) -> str:
    value = record.get("source")
    return DEFAULT_SOURCE if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def select_traffic(log: pd.DataFrame, model_version: str | None = None, source: str | None = None,
                   exclude_sources: tuple[str, ...] = EXCLUDED_SOURCES) -> pd.DataFrame:
    """Keep the rows of one model version and/or one request source, dropping excluded sources.

    Rows logged without a ``source`` count as ``client`` traffic.
    """
    keep = pd.Series(True, index=log.index)
    if model_version is not None:
        versions = log["model_version"].astype(str) if "model_version" in log.columns else pd.Series("", index=log.index)
        keep &= versions == str(model_version)
    sources = log["source"].fillna(DEFAULT_SOURCE).astype(str) if "source" in log.columns else pd.Series(DEFAULT_SOURCE, index=log.index)
    if source is not None:
        keep &= sources == source
    if exclude_sources:
        keep &= ~sources.isin(list(exclude_sources))
    return log[keep]


def traffic_filter(source: str | None, exclude_sources: tuple[str, ...] | None) -> Callable[[dict], bool]:
    """``select_traffic``'s source rules for one parsed record (the version is filtered while indexing)."""
    excluded = set(exclude_sources or ())

    def keep(record: dict) -> bool:
        s = _source_of(record)
        return (source is None or s == source) and s not in excluded

    return keep
