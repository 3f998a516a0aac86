"""Monitor windows: durations, the last whole period, and the results directory of a window."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from monitor_traffic import T0

from components.monitor.windows import last_window, parse_duration, result_dir


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("1d", 86400), ("1h30m", 5400),
                                           ("2W", 1209600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text).total_seconds() == seconds


def test_last_window_is_the_last_whole_period_after_settling():
    now = datetime(2025, 1, 1, 11, 17, 5, tzinfo=timezone.utc)
    assert last_window(timedelta(hours=1), now=now) == (datetime(2025, 1, 1, 10, tzinfo=timezone.utc),
                                                        datetime(2025, 1, 1, 11, tzinfo=timezone.utc))
    assert last_window(timedelta(hours=1), timedelta(hours=1), now=now)[0] == datetime(2025, 1, 1, 9, tzinfo=timezone.utc)
    assert last_window(timedelta(days=1), now=now) == (datetime(2024, 12, 31, tzinfo=timezone.utc),
                                                       datetime(2025, 1, 1, tzinfo=timezone.utc))
    # reruns within the period get the same window (and so the same results directory)
    assert last_window(timedelta(hours=1), now=now + timedelta(minutes=40)) == last_window(timedelta(hours=1), now=now)
    with pytest.raises(ValueError, match="positive period"):
        last_window(timedelta(0))


def test_result_dir_is_keyed_by_version_and_window():
    assert result_dir("runs/monitor", "abc", T0, T0 + timedelta(hours=1)) == \
        "runs/monitor/abc/20250101T120000.000Z--20250101T130000.000Z"
    assert result_dir("s3://b/verdicts/", None, None, T0) == "s3://b/verdicts/all-versions/start--20250101T120000.000Z"
    assert result_dir("out", "a/b c", T0, None).startswith("out/a_b_c/")
