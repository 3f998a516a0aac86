"""The request log's writer: its lines, the bounded hand-over, rotation, settings and s3:// uploads."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving import request_log as request_log_mod
from serving.request_log import LogBatch, RequestLogger, RotatingJsonl, build_records
from serving.request_spool import FILE_PATTERN, REQUEST_LOG_ENV, host_tag


def _log_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("requests-*.jsonl")) for line in f.read_text().splitlines()]


def _log_batch(n: int, t: float = 1_700_000_000.0) -> LogBatch:
    rng = np.random.default_rng(n)
    return LogBatch(images=rng.random((n, 1, 8, 8), dtype=np.float32), embeddings=rng.random((n, 16), dtype=np.float32),
                    predicted=[1] * n, labels=["1"] * n, confidences=[0.5] * n, sources=["client"] * n,
                    timestamps=[t] * n, model_version="v")


def test_fast_lines_are_the_records_as_json(tmp_path):
    """format_lines (what the writer writes) and build_records (the dicts) agree, in time order, any mix of models."""
    batches = [_log_batch(3, t=1_700_000_002.0), _log_batch(2, t=1_700_000_001.0)]
    wide = _log_batch(2, t=1_700_000_000.5)
    wide.embeddings = np.ones((2, 24), np.float32)  # a second model (another embedding width) in the same block
    wide.confidences = [float("nan"), 0.25]  # a non-finite number falls back to json.dumps (NaN)
    wide.model_version, wide.labels = 'v"2\\', ["caf\u00e9", "x"]  # strings are JSON-escaped
    batches.append(wide)
    records = build_records(batches)
    parsed = [json.loads(line) for line in request_log_mod.format_lines(batches)]
    assert [r["timestamp"] for r in parsed] == sorted(r["timestamp"] for r in parsed)
    assert len(parsed) == len(records) == 7
    for got, want in zip(parsed, records):
        assert list(got) == list(want)
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
            else:
                assert got[key] == value, key


def test_full_queue_drops_and_counts_without_blocking(tmp_path, monkeypatch):
    gate = threading.Event()
    real_format = request_log_mod.format_block

    def stuck_format(batches):
        gate.wait(10)  # the writer is stuck (a slow disk, a hung upload)
        return real_format(batches)

    monkeypatch.setattr(request_log_mod, "format_block", stuck_format)
    log = RequestLogger(str(tmp_path / "log"), queue_batches=2, poll_s=0.01)
    assert log.submit(_log_batch(3))
    deadline = time.monotonic() + 5
    while log.stats()["queued_batches"] and time.monotonic() < deadline:  # the writer took it and is now stuck
        time.sleep(0.01)
    start = time.perf_counter()
    accepted = [True] + [log.submit(_log_batch(3)) for _ in range(50)]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"submit blocked for {elapsed:.2f} s"
    stats = log.stats()
    assert sum(accepted) == 3 and stats["dropped"] == 3 * 48  # 1 being written + 2 waiting; the rest dropped
    gate.set()
    assert log.flush(10)
    log.close()
    assert len(_log_lines(tmp_path / "log")) == 3 * sum(accepted) == log.stats()["written"]


def test_rotation_by_size_and_by_age(tmp_path):
    now = [1_700_000_000.0]
    closed: list[Path] = []
    files = RotatingJsonl(tmp_path, max_bytes=100, max_age_s=60, on_closed=closed.append, clock=lambda: now[0])
    x, y, z = b"x" * 60 + b"\n", b"y" * 60 + b"\n", b"z" * 10 + b"\n"
    files.write([x, y, z])  # y would take the first file past 100 bytes: it starts the second
    now[0] += 30
    files.write([b"a\n"])
    now[0] += 31  # the second file is 61 s old
    assert files.maybe_rotate() and files.path is None  # rotated even without a write (a quiet server)
    files.write([b"b" * 150 + b"\n"])  # longer than max_bytes: a file of its own
    files.write([b"c\n"])
    files.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [p.name for p in closed] == names and len(names) == 4
    assert all(re.fullmatch(FILE_PATTERN, n) for n in names)
    contents = [(tmp_path / n).read_bytes() for n in names]
    assert contents == [x, y + z + b"a\n", b"b" * 150 + b"\n", b"c\n"]


def test_logger_rotates_old_files_on_a_quiet_server(tmp_path):
    log = RequestLogger(str(tmp_path), max_age_s=0.5)
    log.submit(_log_batch(2))
    assert log.flush(5)
    deadline = time.monotonic() + 5
    while log._files.path is not None and time.monotonic() < deadline:  # the writer's 1 s tick closes it
        time.sleep(0.1)
    assert log._files.path is None
    log.submit(_log_batch(1))
    log.close()
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and len(_log_lines(tmp_path)) == 3


@pytest.mark.parametrize(
    "env, message",
    [
        ({REQUEST_LOG_ENV: "/x", request_log_mod.MAX_BYTES_ENV: "ten"}, "KFP_MLOPS_REQUEST_LOG_MAX_BYTES='ten' is not a number"),
        ({REQUEST_LOG_ENV: "/x", request_log_mod.MAX_AGE_ENV: "-1"}, "KFP_MLOPS_REQUEST_LOG_MAX_AGE_S must be positive"),
    ],
)
def test_request_log_settings_are_checked(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RequestLogger.from_env(env)


@pytest.fixture(scope="module")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.mark.slow
def test_s3_destination_uploads_closed_files_and_orphans(moto_server, tmp_path, monkeypatch):
    from s3server import s3_env

    from components.core import blobs

    for name, value in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    blobs.Storage().client.create_bucket(Bucket="logs")
    spool = tmp_path / "spool"
    spool.mkdir()
    # A file left by a worker that was SIGKILLed before it could upload (pid 2**22+1 does not exist).
    host = host_tag()
    orphan = spool / f"requests-{host}-{2**22 + 1}-20260101T000000Z-0001.jsonl"
    orphan.write_text('{"timestamp": "2026-01-01T00:00:00+00:00"}\n')
    orphan.with_suffix(".npz").write_bytes(b"its columnar copy")  # killed after writing it, before sending both
    log = RequestLogger("s3://logs/requests/digits", max_bytes=1, spool_dir=spool)
    for _ in range(3):
        log.submit(_log_batch(2))
        assert log.flush(10)
    log.close()
    listed = blobs.list_uris("s3://logs/requests/digits")
    uris = [u for u in listed if u.endswith(".jsonl")]
    copies = [u for u in listed if u.endswith(".npz")]  # each closed file's columnar copy goes beside it
    assert len(uris) == 1 + 3 * 2 and any(u.endswith(orphan.name) for u in uris), uris  # max_bytes=1: a file a line
    assert sorted(u[:-len(".npz")] for u in copies) == sorted(u[:-len(".jsonl")] for u in uris)
    lines = [line for u in uris for line in blobs.read_bytes(u).decode().splitlines()]
    assert blobs.read_bytes(next(u for u in copies if orphan.stem in u)) == b"its columnar copy"
    assert len(lines) == 1 + 3 * 2 and all(json.loads(line)["timestamp"] for line in lines)
    assert list(spool.iterdir()) == [] and log.stats()["uploaded_files"] == 7 + 7


def test_s3_upload_failure_keeps_the_file_for_later(tmp_path, monkeypatch):
    calls = []

    def failing_put(local, uri):
        calls.append(uri)
        raise ConnectionError("endpoint down")

    monkeypatch.setattr("components.core.blobs.put_file", failing_put)
    log = RequestLogger("s3://logs/x", max_bytes=1, spool_dir=tmp_path)
    log.submit(_log_batch(1))
    log.close()
    assert calls and len(list(tmp_path.glob("*.jsonl"))) == 1
    assert log.stats()["upload_failures"] >= 1 and log.stats()["uploaded_files"] == 0




def _varied_batches(k: int, t0: float = 1_700_000_000.0) -> list[LogBatch]:
    batches = []
    for i in range(k):
        b = _log_batch(3 + i % 4, t=t0 + 0.37 * i)
        b.sources = [("client", "replay", "smoke-test")[(i + j) % 3] for j in range(len(b.predicted))]
        b.predicted = [(i + j) % 10 for j in range(len(b.predicted))]
        b.labels = [str(p) for p in b.predicted]
        b.confidences = [float("nan") if (i, j) == (1, 0) else 0.1 + 0.8 * ((i * 7 + j) % 10) / 10
                         for j in range(len(b.predicted))]
        b.model_version = "v1" if i % 5 else "v2"
        batches.append(b)
    return batches


def test_closed_files_get_a_columnar_copy_holding_the_same_requests(tmp_path):
    from components.monitor.columnar import ColumnarFile

    log = RequestLogger(str(tmp_path), max_bytes=6000, poll_s=0.01)
    for batch in _varied_batches(20):
        assert log.submit(batch)
    assert log.flush(10)
    log.close()
    jsonl = sorted(tmp_path.glob("requests-*.jsonl"))
    assert len(jsonl) > 2 and sorted(tmp_path.glob("requests-*.npz")) == [p.with_suffix(".npz") for p in jsonl]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    for path in jsonl:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        copy = ColumnarFile(path.with_suffix(".npz"))
        records = copy.records(np.arange(copy.rows))
        copy.close()
        assert len(records) == len(lines)
        for line, record in zip(lines, records):
            assert record["timestamp"].isoformat(timespec="milliseconds") == line["timestamp"]
            assert list(record) == list(line)
            for key, value in line.items():
                if key != "timestamp":  # the very numbers the line carries, NaN included
                    assert value == record[key] or (value != value and record[key] != record[key]), key


def test_a_columnar_copy_that_cannot_be_written_leaves_the_lines_whole(tmp_path, monkeypatch):
    import serving.request_columns as columns_mod

    def disk_full(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(columns_mod.np, "savez", disk_full)
    log = RequestLogger(str(tmp_path), poll_s=0.01)
    log.submit(_log_batch(4))
    assert log.flush(10)
    log.close()
    assert [p.suffix for p in tmp_path.iterdir() if p.name.startswith("requests-")] == [".jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half file under any name
    assert len(_log_lines(tmp_path)) == 4


def test_a_file_with_a_block_written_without_columns_keeps_its_lines_only(tmp_path):
    wide = _log_batch(2, t=1_700_000_001.0)
    wide.embeddings = np.ones((2, 24), np.float32)  # another model in the same file: the same projected columns
    files = RotatingJsonl(tmp_path)
    files.write(*request_log_mod.format_block([_log_batch(3), wide]))
    files.write(request_log_mod.format_lines([_log_batch(2, t=1_700_000_002.0)]))  # lines only
    files.close()
    assert [p.suffix for p in tmp_path.iterdir()] == [".jsonl"]
    files.write(*request_log_mod.format_block([_log_batch(3, t=1_700_000_005.0), wide]))  # the next file: columns
    files.close()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".jsonl", ".jsonl", ".npz"]
