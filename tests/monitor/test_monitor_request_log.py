"""Monitor: reading a window of the serving request log (time bounds, partial and bad lines, rotated files
outside the window) and selecting one model version's traffic."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from monitor_traffic import T0, log_records, write_log

from components.core.features import FEATURE_COLUMNS, image_features
from components.monitor.sampling import index_window, list_log_files
from components.monitor.traffic import read_request_log, select_traffic


def test_read_request_log_filters_the_time_window(tmp_path, held_out):
    feats = image_features(held_out[:20])
    write_log(tmp_path / "b.jsonl", log_records(feats.iloc[10:], T0 + timedelta(seconds=10)))
    write_log(tmp_path / "a.jsonl", log_records(feats.iloc[:10], T0), compact=True)
    (tmp_path / "notes.txt").write_text("not a log\n")  # only *.jsonl is read
    everything = read_request_log(tmp_path)
    assert len(everything) == 20 and everything["timestamp"].is_monotonic_increasing
    assert str(everything["timestamp"].dt.tz) == "UTC" and everything.attrs["files"] == 2
    # Half-open window [since, until); a naive datetime means UTC; 'Z' suffixes parse.
    window = read_request_log(tmp_path, since=T0 + timedelta(seconds=5), until=(T0 + timedelta(seconds=15)).replace(tzinfo=None))
    assert len(window) == 10
    assert window["timestamp"].min() == pd.Timestamp(T0 + timedelta(seconds=5))
    assert window["timestamp"].max() == pd.Timestamp(T0 + timedelta(seconds=14))
    other_tz = timezone(timedelta(hours=2))
    assert len(read_request_log(tmp_path, since=(T0 + timedelta(seconds=18)).astimezone(other_tz))) == 2
    assert len(read_request_log(tmp_path, until=T0)) == 0
    # Sub-millisecond bounds: the log has milliseconds, so 12:00:05.000 is before 12:00:05.0004.
    assert len(read_request_log(tmp_path, since=T0 + timedelta(seconds=5, microseconds=400))) == 14
    assert len(read_request_log(tmp_path, until=T0 + timedelta(seconds=5, microseconds=400))) == 6


def test_read_request_log_tolerates_partial_and_bad_lines(tmp_path, held_out):
    records = log_records(image_features(held_out[:6]), T0)
    zulu = dict(records[5], timestamp="2025-01-01T12:00:05Z")
    lines = [json.dumps(r) for r in records[:3]] + [
        "{not json",  # damaged line in the middle
        "[1, 2, 3]",  # JSON, but not a record
        json.dumps({k: v for k, v in records[3].items() if k != "timestamp"}),  # no timestamp
        json.dumps(dict(records[4], timestamp="yesterday")),  # unparseable timestamp
        "",  # blank lines are not errors
        json.dumps(zulu),
    ]
    partial = json.dumps(records[0])[:37]  # the server is still writing this request
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n" + partial)
    log = read_request_log(tmp_path)
    assert len(log) == 4
    assert log.attrs["partial_lines"] == 1 and log.attrs["bad_lines"] == 4
    assert log["timestamp"].iloc[-1] == pd.Timestamp("2025-01-01T12:00:05Z")


def test_read_request_log_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="request_log_dir"):
        read_request_log(tmp_path / "nope")
    empty = read_request_log(tmp_path)
    assert len(empty) == 0 and set(FEATURE_COLUMNS) <= set(empty.columns)
    (tmp_path / "empty.jsonl").write_text("")
    assert len(read_request_log(tmp_path)) == 0


def test_the_index_counts_exactly_what_parsing_every_line_counts(tmp_path, held_out):
    # The byte-level index (fixed offsets of timestamp and model version) must agree with json on
    # every layout: compact (the rotating writer), spaced, other key orders, 'Z' or other offsets.
    rng = np.random.default_rng(3)
    feats = image_features(held_out[:400])
    lines = []
    for i, record in enumerate(log_records(feats, T0 - timedelta(minutes=5), step_s=2.0)):
        record["model_version"] = ["1", "2", "1.0", 'we"ird'][i % 4]
        kind = rng.integers(0, 5)
        if kind == 1:
            record["timestamp"] = record["timestamp"].replace("+00:00", "Z")
        elif kind == 2:
            ts = datetime.fromisoformat(record["timestamp"]).astimezone(timezone(timedelta(hours=-3)))
            record["timestamp"] = ts.isoformat(timespec="milliseconds")
        elif kind == 3:
            record = {"model_version": record.pop("model_version"), **record}  # another key order
        lines.append(json.dumps(record, separators=(",", ":") if rng.integers(0, 2) else None))
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    parsed = [json.loads(line) for line in lines]
    times = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")) for r in parsed]
    for since, until in ((None, None), (T0, None), (T0 - timedelta(minutes=2), T0 + timedelta(minutes=3))):
        for version in (None, "1", "1.0", 'we"ird', "9"):
            index = index_window(list_log_files(tmp_path), since, until, version)
            in_window = [since is None or t >= since for t in times]
            in_window = [w and (until is None or t < until) for w, t in zip(in_window, times)]
            expected = sum(w and (version is None or r["model_version"] == version) for w, r in zip(in_window, parsed))
            assert index.rows_in_window == sum(in_window), (since, until, version)
            assert index.size == expected, (since, until, version)
            index.close()


def test_rotated_files_that_cannot_hold_the_window_are_not_read(tmp_path, held_out, monkeypatch):
    # serving/request_log.py names files by the time they were opened; their last write (mtime, an object's
    # upload time) bounds their last line: files last written before the window (+10 min slack), or
    # opened after it, are skipped (on s3:// not even downloaded). Files named otherwise are always read.
    import os

    monkeypatch.delenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", raising=False)
    rows = log_records(image_features(held_out[:3]), T0 + timedelta(minutes=30))
    names = {  # name: (last written, read?)
        "requests-h-1-20250101T090000Z-0001.jsonl": (T0 - timedelta(hours=2), False),  # closed by 10:00
        "requests-h-1-20250101T093000Z-0005.jsonl": (T0 + timedelta(minutes=10), True),  # a writer rotating slowly
        "requests-h-1-20250101T105500Z-0002.jsonl": (T0 + timedelta(minutes=5), True),
        "requests-h-1-20250101T123000Z-0003.jsonl": (T0 + timedelta(minutes=45), True),
        "requests-h-1-20250101T131500Z-0004.jsonl": (T0 + timedelta(minutes=80), False),  # opened after the window
        "requests-7.jsonl": (T0 - timedelta(days=9), True),  # an older writer's name: no time in it
    }
    for name, (written, _) in names.items():
        write_log(tmp_path / name, rows)
        os.utime(tmp_path / name, (written.timestamp(), written.timestamp()))
    files = list_log_files(tmp_path, T0, T0 + timedelta(hours=1))
    assert sorted(f.name for f in files) == sorted(n for n, (_, read) in names.items() if read)


def test_without_a_modification_time_the_rotation_age_bounds_a_files_span(monkeypatch):
    from components.monitor.sampling import _may_overlap

    monkeypatch.delenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", raising=False)
    window = (T0, T0 + timedelta(hours=1))
    assert not _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window)  # 1 h default: closed by 10:00
    assert _may_overlap("requests-h-1-20250101T105500Z-0002.jsonl", *window)
    monkeypatch.setenv("KFP_MLOPS_REQUEST_LOG_MAX_AGE_S", str(4 * 3600))  # serving rotates every 4 h
    assert _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window)
    assert not _may_overlap("requests-h-1-20250101T090000Z-0001.jsonl", *window, max_file_age_s=600)  # the config wins


@pytest.mark.parametrize("kwargs, versions, sources", [
    ({}, ["1", "2", "1"], ["client", "replay", None]),  # smoke tests are dropped by default
    ({"model_version": "1"}, ["1", "1"], ["client", None]),
    ({"model_version": 2}, ["2"], ["replay"]),  # numbers and strings name the same version
    ({"source": "replay"}, ["2"], ["replay"]),
    ({"source": "client"}, ["1", "1"], ["client", None]),  # rows without a source are client traffic
    ({"exclude_sources": ()}, ["1", "2", "1", "1"], ["client", "replay", None, "smoke-test"]),
], ids=["default", "version", "numeric-version", "replay-only", "client-only", "keep-smoke"])
def test_select_traffic(kwargs, versions, sources):
    log = pd.DataFrame({"model_version": ["1", "2", "1", "1"], "source": ["client", "replay", None, "smoke-test"]})
    kept = select_traffic(log, **kwargs)
    assert kept["model_version"].tolist() == versions and kept["source"].tolist() == sources
