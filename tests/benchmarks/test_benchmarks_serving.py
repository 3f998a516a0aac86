"""benchmarks/serving.py: the pieces that attribute the latency tail (stall windows, access log, attribution),
the report it prints, and the script's own start."""

import importlib
import importlib.util
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "benchmarks" / "serving_bench"


def load_bench_module(name: str):
    """``serving_bench.<name>``, the package loaded by path: an installed package (opacus) ships a top-level
    'benchmarks' that shadows the project's folder, and the script's own folder holds a 'serving.py'."""
    if "serving_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serving_bench", PACKAGE / "__init__.py",
                                                      submodule_search_locations=[str(PACKAGE)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["serving_bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"serving_bench.{name}")


@pytest.fixture(scope="module")
def bench():
    return load_bench_module("tail")


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


def _row(server: str, concurrency: int, req_per_s: float, p50_ms: float = 5.0, p99_ms: float = 10.0) -> dict:
    return {"server": server, "concurrency": concurrency, "req_per_s": req_per_s, "p50_ms": p50_ms, "p99_ms": p99_ms,
            "non_2xx": 0, "socket_errors": 0, "cpu_ms_frontend": 0.5, "cpu_ms_workers": 0.7, "cpu_ms_proxy": 0.0,
            "cpu_ms_loadgen": 1.0}


def test_the_report_takes_the_median_round_and_compares_every_server_that_ran(capsys):
    report = load_bench_module("report")
    settings = {"workers": 1, "batch_size": 32, "vmargs": "-Xshipped", "env": {}}
    variants = {"variant-v": {**settings, "vmargs": ""}}
    runs = {("ours", 1): [_row("ours", 1, 200)],
            ("ours", 32): [_row("ours", 32, 900), _row("ours", 32, 1000, p99_ms=40), _row("ours", 32, 800)],
            ("variant-v", 32): [_row("v", 32, 500)] * 3, ("ours-nolog", 32): [_row("nolog", 32, 1250)] * 3,
            ("peer", 32): [_row("peer", 32, 400)] * 3}
    noise = [{"slowed_pct": 1.0, "stalls_per_s": 2.0, "stall_p90_ms": 6.0, "stall_max_ms": 9.0}] * 3
    measured = report.Measurements(
        concurrency=[1, 32], rounds=3, duration_s=8.0, load_generator="python",
        targets=["ours", "variant-v", "ours-nolog", "peer"], variants=variants, runs=runs, noise_rounds=noise,
        counters_before={"ts_inference_requests_total": 0.0}, counters_after={"ts_inference_requests_total": 100.0,
                                                                              "ts_queue_latency_microseconds": 2e5},
        attribution=None, ceiling={}, request_log_lines=7)
    result = report.build_result(measured, {**settings, "rounds": 3})
    assert result["throughput_c32"] == 900 and result["p99_over_p50"] == 2.0, "the median round, not the best"
    assert result["ours_rounds_c_top"] == [900, 1000, 800]
    assert result["ratio_vs_peer"] == 2.25 and result["peer_throughput_c32"] == 400
    assert result["logging_cost_pct"] == round(100 * (1250 - 900) / 1250, 1)
    assert result["variants"]["v"]["settings"] == {"vmargs": ""} and result["variants"]["v"]["req_per_s"] == 500
    assert result["frontend_queue_ms_mean"] == 2.0 and result["request_log_lines"] == 7
    assert set(result["ours"]) == {"1", "32"} and "proxied" not in result and "inprocess" not in result
    report.print_summary(measured)
    out = capsys.readouterr().out
    assert "medians (3 interleaved rounds at concurrency 32, 8 s each; load generator: python" in out
    assert "machine noise, median of the rounds (servers idle): slowed 1.0 %" in out


def test_the_goals_and_where_a_lone_request_loses_its_time(capsys):
    report = load_bench_module("report")
    runs = {("ours", 1): [_row("ours", 1, 500, p50_ms=1.5)], ("ours-batched", 1): [_row("b", 1, 250, p50_ms=3.5)],
            ("ours-proxied", 1): [_row("proxied", 1, 200, p50_ms=4.0)], ("peer", 1): [_row("peer", 1, 600, p50_ms=1.25)],
            ("ours", 32): [_row("ours", 32, 3000)] * 3, ("ours-proxied", 32): [_row("proxied", 32, 2400)] * 3,
            ("peer", 32): [_row("peer", 32, 1500)] * 3}
    quiet = [{"slowed_pct": 8.0, "stalls_per_s": 1.0, "stall_p90_ms": 30.0, "stall_max_ms": 40.0}] * 3
    measured = report.Measurements(
        concurrency=[1, 32], rounds=3, duration_s=8.0, load_generator="wrk",
        targets=["ours", "ours-batched", "ours-proxied", "peer"], variants={}, runs=runs, noise_rounds=quiet,
        counters_before={}, counters_after={}, attribution=None, ceiling={}, request_log_lines=0)
    result = report.build_result(measured, {"rounds": 3})
    assert result["c1_p50_ms"] == {"ours": 1.5, "ours-batched": 3.5, "ours-proxied": 4.0, "peer": 1.25}
    assert result["c1_p50_over_peer"] == 1.2 and result["c1_p50_over_peer_proxied"] == 3.2
    assert result["c1_batch_gathering_ms"] == 2.0 and result["c1_p50_over_peer_batched_model_only"] == 2.8
    assert result["c1_rest_over_peer_ms"] == 0.25
    goals = result["goals"]
    assert goals["ratio_vs_peer"] == {"value": 2.0, "goal": ">= 2.0", "met": True}
    assert goals["ratio_vs_peer_proxied"]["met"] is True and goals["c1_p50_over_peer"]["met"] is True
    assert goals["c1_p50_over_peer_proxied"]["met"] is False
    assert goals["server_p99_over_p50_outside_host_stalls"]["met"] is None, "not measured: no attribution ran"
    assert "goals_note" not in result
    lines = report.goals_lines(result)
    assert "c1_p50_over_peer_proxied = 3.2 (goal <= 1.5): NOT met" in lines
    assert "the unbatched twin saves a lone request 2.00 ms of p50" in lines
    busy = [{**quiet[0], "slowed_pct": 85.0}] * 3
    result = report.build_result(report.Measurements(**{**measured.__dict__, "noise_rounds": busy}), {"rounds": 3})
    assert "not to be trusted: the machine was slowed 85 %" in result["goals_note"]


def test_the_script_starts_and_documents_its_flags():
    """Run as a script, its folder holds 'serving.py': the project's 'serving' package must still be the one imported."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--help"], capture_output=True,
                          text=True, cwd=ROOT / "benchmarks", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--duration", "--rounds", "--concurrency", "--skip", "--variant", "--load-gen", "--quick",
                 "--proxy-loops"):
        assert flag in proc.stdout, flag
