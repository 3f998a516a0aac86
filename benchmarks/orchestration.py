"""Orchestration benchmark: how much of a local run (``mlops run``, subprocess runner) is spent outside its steps,
with kfp.local's plain subprocesses (every task a fresh Python, ``--no-warm-start``: the baseline) and with the warm
start (``pipelines.warm_start``: every task a fork of a pre-imported parent, started first thing).

    python benchmarks/orchestration.py                              # the default config, 3 rounds of each
    python benchmarks/orchestration.py --config examples/quick.yaml --rounds 3

Each round runs the baseline, then the warm start, each as its own ``mlops run`` command (``--no-serve-after``, free
ports, a serving home of its own), on the same config. From each run's ``summary.json``: the run's seconds (from the
command's process start), the steps' own seconds, the orchestration seconds and share (``orchestration``), the
seconds before the first task, and per step the seconds outside the step (``overhead_seconds``); and the command's
wall time (it adds stopping the server, ``--no-serve-after``). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.processes import free_ports  # noqa: E402

MODES = {"baseline": False, "warm start": True}


def run_once(mode: str, config: str | None, work: Path, index: int) -> dict:
    run_id = f"{'warm' if MODES[mode] else 'baseline'}-{index}"
    inference, management, metrics = free_ports(3, set())
    argv = [sys.executable, "-m", "pipelines.cli", "run", "--run-id", run_id, "--runs-dir", str(work / "runs"),
            "--no-serve-after", "--serving-home", str(work / f"serving-{run_id}"),
            "--serving-inference-port", str(inference), "--serving-management-port", str(management),
            "--serving-metrics-port", str(metrics), *(["--config", config] if config else []),
            *([] if MODES[mode] else ["--no-warm-start"])]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DO_NOT_TRACK": "1"})
    wall = time.monotonic() - started
    summary_file = work / "runs" / run_id / "summary.json"
    if not summary_file.is_file():
        raise SystemExit(f"the {mode} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    if summary["status"] != "succeeded":
        raise SystemExit(f"the {mode} run {run_id} ended {summary['status']} (failed step "
                         f"{summary.get('failed_step')}, blocked by {summary.get('blocked_by')}): every step must run")
    return {**summary, "wall_seconds": wall}


def spread(values: list[float], fmt: str = "6.1f") -> str:
    return f"{min(values):{fmt}} {statistics.median(values):{fmt}} {max(values):{fmt}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="the run config (default: the built-in defaults, as make run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, interleaved (default 3)")
    args = parser.parse_args(argv)

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="kfp-mlops-orchestration-bench-") as tmp:
        for index in range(args.rounds):
            for mode in MODES:
                summary = run_once(mode, args.config, Path(tmp), index)
                results[mode].append(summary)
                o = summary["orchestration"]
                print(f"round {index + 1}/{args.rounds} {mode:10s} run {summary['seconds']:6.1f} s, steps "
                      f"{o['steps_seconds']:6.1f} s, outside {o['seconds']:5.1f} s ({o['share']:.1%})", flush=True)

    print(f"\n{'':22s} {'baseline (min med max)':>24s} {'warm start (min med max)':>26s}")
    rows = [("command wall s", lambda s: s["wall_seconds"]), ("run s", lambda s: s["seconds"]),
            ("steps s", lambda s: s["orchestration"]["steps_seconds"]),
            ("outside the steps s", lambda s: s["orchestration"]["seconds"]),
            ("share outside", lambda s: 100 * s["orchestration"]["share"]),
            ("  before 1st task s", lambda s: s["orchestration"].get("before_first_task", 0.0))]
    for step in results["baseline"][0]["steps"]:
        rows.append((f"  {step} overhead s", lambda s, step=step: s["steps"][step].get("overhead_seconds") or 0.0))
    for name, get in rows:
        unit = " %" if name == "share outside" else ""
        print(f"{name:22s} {spread([get(s) for s in results['baseline']]):>24s}{unit} "
              f"{spread([get(s) for s in results['warm start']]):>26s}{unit}")

    def med(mode: str, get) -> float:
        return round(statistics.median(get(s) for s in results[mode]), 3)

    share = {m: med(m, lambda s: s["orchestration"]["share"]) for m in MODES}
    print(json.dumps({"benchmark": "orchestration", "config": args.config or "defaults", "rounds": args.rounds,
                      "orchestration_share": {"baseline": share["baseline"], "warm_start": share["warm start"]},
                      "orchestration_seconds": {"baseline": med("baseline", lambda s: s["orchestration"]["seconds"]),
                                                "warm_start": med("warm start",
                                                                  lambda s: s["orchestration"]["seconds"])},
                      "run_seconds": {"baseline": med("baseline", lambda s: s["seconds"]),
                                      "warm_start": med("warm start", lambda s: s["seconds"])}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
