"""Which window a scheduled check covers, and where its results go."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from components.monitor.sampling import parse_utc

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def result_dir(out_root: str | Path, model_version: str | None, since: datetime | None,
               until: datetime | None) -> str:
    """Where the results of one (model version, window) go: ``<root>/<version>/<since>--<until>``.

    A rerun of the same window writes the same directory (overwriting it with the same
    content), so results are never duplicated. Works for local paths and ``s3://`` prefixes.
    """
    def stamp(t: datetime | None, open_end: str) -> str:
        return open_end if t is None else parse_utc(t).strftime("%Y%m%dT%H%M%S") + f".{parse_utc(t).microsecond // 1000:03d}Z"

    version = re.sub(r"[^A-Za-z0-9_.-]", "_", str(model_version)) if model_version is not None else "all-versions"
    return f"{str(out_root).rstrip('/')}/{version}/{stamp(since, 'start')}--{stamp(until, 'open')}"


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``1d``, ``1w`` (or combined, ``1h30m``) -> timedelta."""
    value = str(text).strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {text!r} (examples: 15m, 1h, 1d, 1h30m)")
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


def last_window(period: timedelta, settle: timedelta = timedelta(0),
                now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last whole ``period`` (aligned to multiples of it since the Unix epoch, UTC) that ended at
    least ``settle`` ago: ``--last 1h`` run at 11:17 checks [10:00, 11:00). Reruns within the same
    period get the same window, hence the same results directory."""
    if period.total_seconds() <= 0 or settle.total_seconds() < 0:
        raise ValueError(f"the window needs a positive period and a settle time >= 0, got {period} and {settle}")
    reference = (parse_utc(now) if now is not None else datetime.now(timezone.utc)) - settle
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    periods = (reference - epoch) // period
    until = epoch + periods * period
    return until - period, until
