"""Monitor: the request log's columnar copies read like the JSON lines they copy, sampled without a scan."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.monitor.columnar import ColumnarFile
from components.monitor.sampling import list_log_files, read_window
from components.monitor.traffic import EXCLUDED_SOURCES, traffic_filter
from serving.request_log import LogBatch, RequestLogger

T0 = float(int(time.time()) - 600)  # near now: the files' names and times (now) must not rule the window out


def _served(directory: Path, batches: int = 40, max_bytes: int = 20_000) -> None:
    """A log written by the serving writer itself: two model versions, three sources, a NaN, several files."""
    log = RequestLogger(str(directory), max_bytes=max_bytes, poll_s=0.01)
    rng = np.random.default_rng(3)
    for i in range(batches):
        n = 5 + i % 7
        log.submit(LogBatch(images=rng.random((n, 1, 8, 8), dtype=np.float32),
                            embeddings=rng.normal(size=(n, 16)).astype(np.float32),
                            predicted=[int(k) for k in rng.integers(0, 10, n)], labels=[str(i % 10)] * n,
                            confidences=[float("nan") if i == 3 else float(c) for c in rng.random(n)],
                            sources=[("client", "replay", "smoke-test")[(i + j) % 3] for j in range(n)],
                            timestamps=[T0 + 30.0 * i + 0.001 * j for j in range(n)],
                            model_version="v2" if i % 4 == 0 else "v1"))
    assert log.flush(10)
    log.close()


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[Path, Path]:
    """The same requests twice: as the writer leaves them (lines and copies), and as JSON lines alone."""
    both = tmp_path_factory.mktemp("both")
    _served(both)
    lines = tmp_path_factory.mktemp("lines")
    for path in both.glob("*.jsonl"):
        shutil.copy(path, lines / path.name)
    assert len(list(both.glob("*.npz"))) == len(list(both.glob("*.jsonl"))) > 3
    return both, lines


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


@pytest.mark.parametrize("version", [None, "v1", "v2", "v9"])
@pytest.mark.parametrize("epsilon", [None, 0.4])
def test_columnar_copies_read_exactly_like_their_lines(logs, version, epsilon):
    both, lines = logs
    assert all(p.suffix == ".npz" for p in list_log_files(both))
    # The window cuts files in two at both ends (requests every 30 s, files of ~20 kB).
    since, until = _at(95.0005), _at(1000.0)
    kwargs = dict(since=since, until=until, model_version=version, epsilon=epsilon, alpha=0.1,
                  keep=traffic_filter(None, EXCLUDED_SOURCES))
    fast, slow = read_window(both, **kwargs), read_window(lines, **kwargs)
    assert fast.stats() == slow.stats() and fast.sampling() == slow.sampling()
    if version != "v9":
        # Sampled, rows_selected is estimated from the draws (10 here), which may all be of kept sources.
        assert fast.rows_in_window >= fast.rows_selected > 0
        if epsilon is None:
            assert fast.rows_in_window > fast.rows_selected  # the smoke-test requests are left out
    pd.testing.assert_frame_equal(fast.frame, slow.frame)
    if epsilon is not None and version != "v9":
        assert fast.sampled  # the same rows drawn from either copy


def test_each_file_is_read_from_its_copy_or_else_its_lines(logs, tmp_path):
    both, _ = logs
    for path in both.iterdir():
        shutil.copy(path, tmp_path / path.name)
    copies = sorted(tmp_path.glob("*.npz"))
    copies[0].unlink()  # a file closed before copies existed, or by another writer: lines only
    stamp = _at(61).isoformat(timespec="milliseconds")
    (tmp_path / "replayed.jsonl").write_text(f'{{"timestamp": "{stamp}", "model_version": "v1"}}\n')
    listed = list_log_files(tmp_path)
    assert copies[0].with_suffix(".jsonl") in listed and tmp_path / "replayed.jsonl" in listed
    assert [p for p in listed if p.suffix == ".npz"] == copies[1:]
    assert not any(p.with_suffix(".jsonl") in listed for p in copies[1:])
    assert read_window(tmp_path, epsilon=None).rows_in_window == read_window(both, epsilon=None).rows_in_window + 1


def test_an_unreadable_copy_says_which_file_and_what_to_do(tmp_path):
    bad = tmp_path / "requests-h-1-20231114T221320Z-0001.npz"
    bad.write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(ValueError, match="delete it to read the JSON lines beside it"):
        read_window(tmp_path, epsilon=None)
    np.savez_compressed(bad, format=np.array([1]))
    with pytest.raises(ValueError, match="compressed"):
        ColumnarFile(bad)


def test_a_sample_reads_only_the_drawn_rows(logs, monkeypatch):
    """Drawing n rows asks the copies for n rows (in blocks of at least 256 draws), never for the whole window."""
    both, _ = logs
    asked = []
    real = ColumnarFile.records
    monkeypatch.setattr(ColumnarFile, "records", lambda self, rows: asked.append(len(rows)) or real(self, rows))
    window = read_window(both, epsilon=0.3, alpha=0.1, keep=traffic_filter(None, EXCLUDED_SOURCES))
    assert window.sampled and window.draws <= sum(asked) <= max(256, window.draws) < window.rows_of_version
