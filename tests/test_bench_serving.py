"""benchmarks/serving.py: the pieces that attribute the latency tail (stall windows, access log, attribution)."""

import importlib.util
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    # Loaded by path: an installed package (opacus) ships a top-level 'benchmarks' that shadows this folder.
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stall_windows_merge_runs_of_slow_chunks_and_ignore_normal_ones(bench):
    fast = [(i * 50e-6, 20e-6) for i in range(1000)]  # 50 ms of 20 us chunks
    slow_run = [(0.100 + i * 1e-3, 0.9e-3) for i in range(10)]  # 10 ms at ~45x, gaps < 2 ms: one window
    later = [(0.200, 0.5e-3)]  # a lone slow chunk 90 ms later: a window of its own
    lengths = bench.stall_windows(sorted(fast + slow_run + later))
    assert len(lengths) == 2
    assert lengths[0] == pytest.approx(9.9, abs=0.01)
    assert lengths[1] == pytest.approx(0.5, abs=0.01)
    assert bench.stall_windows(fast) == []
    assert bench.stall_windows([]) == []


def test_access_log_requests_reads_posts_only_from_the_offset(bench, tmp_path):
    log = tmp_path / "access_log.log"
    old = '2026-11-30T06:03:20,046 - /127.0.0.1:40898 "POST /predictions/digits HTTP/1.1" 200 99\n'
    log.write_text(old + '2026-11-30T06:03:21,087 - /127.0.0.1:40320 "GET /ping HTTP/1.1" 200 2\n'
                   '2026-11-30T06:03:21,136 - /127.0.0.1:42108 "POST /predictions/digits HTTP/1.1" 200 26\n'
                   'a torn line "POST without a time\n')
    found = bench.access_log_requests(log, offset=len(old))
    end = datetime(2026, 11, 30, 6, 3, 21, 136000).timestamp()
    assert len(found) == 1
    start_s, end_s, latency_ms = found[0]
    assert latency_ms == 26
    assert end_s == pytest.approx(end + 0.001)
    assert start_s == pytest.approx(end - 0.026 - 0.001)


def test_tail_attribution_removes_the_requests_in_flight_during_a_stall(bench):
    # 1,000 requests of 10 ms, one every ms; 30 requests of 60 ms end just after a slow-down at t = 0.5 s.
    normal = [(t / 1000, t / 1000 + 0.010, 10) for t in range(1000)]
    stalled = [(0.45 + i * 1e-4, 0.51 + i * 1e-4, 60) for i in range(30)]
    result = bench.tail_attribution(normal + stalled, slow_times=[0.5], control_shift_s=0.3)
    assert result["p99_ms"] == 60
    assert result["outside_stalls_p99_ms"] == 10
    assert result["outside_stalls_pct"] == pytest.approx(100 * (1030 - 30 - 11) / 1030)
    # the same window 0.3 s later removes as many normal requests but none of the slow ones
    assert result["control_p99_ms"] == 60
    assert result["control_kept_pct"] == pytest.approx(100 * (1030 - 11) / 1030)


def test_tail_attribution_without_slow_samples_keeps_everything(bench):
    requests = [(0.0, 0.01, 10), (0.01, 0.05, 40)]
    result = bench.tail_attribution(requests, slow_times=[])
    assert result["outside_stalls_pct"] == 100
    assert result["outside_stalls_p99_ms"] == result["p99_ms"]
    assert bench.tail_attribution([], [])["requests"] == 0
