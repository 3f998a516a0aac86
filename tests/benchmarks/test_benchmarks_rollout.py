"""benchmarks/rollout.py: the tables and the JSON it reports from its runs (the runs themselves start servers for
minutes: `python benchmarks/rollout.py --rounds 1 --duration 2 --warmup 1 --decisions 1` tries them)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    from test_benchmarks_serving import load_bench_module

    load_bench_module("load")  # serving_bench, as the script finds it beside itself
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("rollout_bench", ROOT / "benchmarks" / "rollout.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def _row(setup, concurrency, rps, round_=0, **more):
    return {"setup": setup, "concurrency": concurrency, "round": round_, "req_per_s": rps, "p50_ms": 2.0,
            "p99_ms": 9.0, "non_2xx": 0, "socket_errors": 0, "mirrored": more.get("mirrored", 0),
            "mirror_dropped": more.get("dropped", 0), "cpu_ms_per_request_proxy": 0.2,
            "cpu_ms_per_request_champion": 0.5, "cpu_ms_per_request_challenger": more.get("challenger", 0.0),
            "cpu_ms_per_request_challenger_proxy": 0.0}


def test_the_overhead_table_gives_medians_and_the_ratio_to_no_challenger(bench):
    rows = [_row("no challenger", 32, rps, i) for i, rps in enumerate((1000, 1200, 1100))]
    rows += [_row("shadow 0.1", 32, rps, i, mirrored=100, challenger=0.3) for i, rps in enumerate((900, 700, 800))]
    table, medians = bench.overhead_table(rows)
    base, shadow = medians
    assert (base["req_per_s"], base["throughput_vs_baseline"], base["runs"]) == (1100, 1.0, 3)
    assert shadow["req_per_s"] == 800 and shadow["throughput_vs_baseline"] == pytest.approx(800 / 1100)
    assert (shadow["req_per_s_min"], shadow["req_per_s_max"]) == (700, 900)
    assert "| shadow 0.1 | 32 | 800 (700-900) | 0.73x |" in table


def test_the_decision_table_gives_min_median_max_and_the_baseline(bench):
    rows = [{"strategy": "replace", "seconds": s} for s in (3.0, 6.0, 7.0)]
    rows += [{"strategy": "shadow", "seconds": 30.0 + i, "decision": d, "seconds_to_decision": 18.0 + i,
              "evidence_s": 10.0 + i, "switch_s": None if d == "rollback" else 10.0, "challenger_requests": 200,
              "replayed": 2000, "reason": "r"} for i, d in enumerate(("promote", "rollback", "promote"))]
    table, summary = bench.decision_table(rows)
    assert "| replace (baseline) | 3 | - | - | - | - | 3.0 / 6.0 / 7.0 |" in table
    assert "| shadow | 3 | 2 promote, 1 rollback | 18.0 / 19.0 / 20.0 | 10.0 / 11.0 / 12.0 | 10.0 / 10.0 / 10.0 |" in table
    assert "canary" not in table and summary["shadow"]["decision"] == ["promote", "rollback", "promote"]


def test_the_script_refuses_nonsense_settings(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    assert "--rounds and --decisions must be at least 1" in capsys.readouterr().err
