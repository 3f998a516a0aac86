"""Runner benchmark: the whole pipeline with ``mlops run --runner docker`` against the default ``subprocess`` runner,
on the same config, per step: the step's own time (``seconds``, measured inside the step), how long kfp.local took
for the task start to finish (``task_seconds``) and the difference, the orchestration overhead (``overhead_seconds``:
for docker, creating and starting the container and reading its outputs back; for subprocess, starting a Python).

    python benchmarks/runner.py                         # 3 rounds of each, interleaved; ~10 minutes on 2 cores
    python benchmarks/runner.py --rounds 1 --config examples/quick.yaml

Each round runs the subprocess runner, then the docker runner, as fresh ``mlops run`` processes with
``--no-serve-after`` on free ports and a serving home of their own, so neither inherits the other's warm server.
Needs a Docker engine and the images (``make image``); the docker runner refuses an image whose step code differs
from this checkout's. Prints a table, then one JSON line.
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

RUNNERS = ("subprocess", "docker")


def run_once(runner: str, config: str, work: Path, index: int) -> dict:
    """One ``mlops run``; its summary plus the wall time of the whole command."""
    inference, management, metrics = free_ports(3, set())
    run_id = f"{runner}-{index}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--runner", runner, "--config", config, "--no-serve-after",
         "--runs-dir", str(work / "runs"), "--run-id", run_id, "--serving-home", str(work / f"serving-{run_id}"),
         "--serving-inference-port", str(inference), "--serving-management-port", str(management),
         "--serving-metrics-port", str(metrics)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DO_NOT_TRACK": "1"})
    wall = time.monotonic() - started
    summary_file = work / "runs" / run_id / "summary.json"
    if done.returncode != 0 or not summary_file.is_file():
        raise SystemExit(f"mlops run --runner {runner} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return {**json.loads(summary_file.read_text()), "wall_seconds": wall}


def spread(values: list[float]) -> str:
    return f"{min(values):6.1f} {statistics.median(values):6.1f} {max(values):6.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/quick.yaml", help="the run config (default: examples/quick.yaml)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each runner, interleaved (default 3)")
    args = parser.parse_args(argv)

    results: dict[str, list[dict]] = {r: [] for r in RUNNERS}
    with tempfile.TemporaryDirectory(prefix="kfp-mlops-runner-bench-") as tmp:
        for index in range(args.rounds):
            for runner in RUNNERS:
                summary = run_once(runner, args.config, Path(tmp), index)
                results[runner].append(summary)
                print(f"round {index + 1}/{args.rounds} {runner:10s} {summary['wall_seconds']:6.1f} s wall, "
                      f"pipeline {summary['seconds']:6.1f} s", flush=True)

    steps = list(results["subprocess"][0]["steps"])
    print(f"\n{'step':12s} {'runner':10s} {'own s (min med max)':>21s} {'task s (min med max)':>21s} "
          f"{'overhead s (min med max)':>25s}")
    overhead: dict[str, dict[str, float]] = {r: {} for r in RUNNERS}
    for step in steps:
        for runner in RUNNERS:
            own = [s["steps"][step]["seconds"] for s in results[runner]]
            task = [s["steps"][step]["task_seconds"] for s in results[runner]]
            extra = [s["steps"][step]["overhead_seconds"] for s in results[runner]]
            overhead[runner][step] = statistics.median(extra)
            print(f"{step:12s} {runner:10s} {spread(own):>21s} {spread(task):>21s} {spread(extra):>25s}")
    for runner in RUNNERS:
        walls = [s["wall_seconds"] for s in results[runner]]
        pipeline = [s["seconds"] for s in results[runner]]
        print(f"{'whole run':12s} {runner:10s} pipeline {spread(pipeline)}  command wall {spread(walls)}")

    per_step = {step: round(overhead["docker"][step] - overhead["subprocess"][step], 2) for step in steps}
    headline = {
        "benchmark": "runner", "config": args.config, "rounds": args.rounds,
        "pipeline_seconds_median": {r: round(statistics.median(s["seconds"] for s in results[r]), 1) for r in RUNNERS},
        "wall_seconds_median": {r: round(statistics.median(s["wall_seconds"] for s in results[r]), 1)
                                for r in RUNNERS},
        "overhead_seconds_median": {r: {k: round(v, 2) for k, v in overhead[r].items()} for r in RUNNERS},
        "docker_extra_overhead_per_step_median": per_step,
        "docker_extra_overhead_mean_per_step": round(statistics.mean(per_step.values()), 2),
    }
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
