"""Orchestration benchmark: how much of a local run (``mlops run``, subprocess runner) is spent outside its steps,
with kfp.local's plain subprocesses (every task a fresh Python: the baseline) and with the warm start
(``pipelines.warm_start``: every task a fork of a pre-imported parent).

    python benchmarks/orchestration.py                              # the default config, 3 rounds of each
    python benchmarks/orchestration.py --config examples/quick.yaml --rounds 3

Each round runs the baseline, then the warm start, each as a fresh process (``run_local``, ``--no-serve-after``
on free ports, a serving home of its own), on the same config. From each run's ``summary.json``: the run's
seconds, the steps' own seconds, the orchestration seconds and share (``orchestration``), and per step the
seconds outside the step (``overhead_seconds``). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
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


def one_run(spec: dict) -> None:
    """In a fresh process: one run of the pipeline as ``spec`` says (the benchmark's child)."""
    import dataclasses
    import os

    from pipelines.config import load
    from pipelines.local import run_local

    os.environ.setdefault("DO_NOT_TRACK", "1")
    cfg = load(spec["config"])
    inference, management, metrics = spec["ports"]
    cfg = dataclasses.replace(cfg, serving=dataclasses.replace(
        cfg.serving, home=spec["home"], inference_port=inference, management_port=management, metrics_port=metrics))
    run_local(cfg, runs_dir=spec["runs_dir"], run_id=spec["run_id"], serve_after=False, quiet=True,
              warm_start=spec["warm_start"])


def run_once(mode: str, config: str | None, work: Path, index: int) -> dict:
    run_id = f"{'warm' if MODES[mode] else 'baseline'}-{index}"
    spec = {"config": config, "ports": free_ports(3, set()), "home": str(work / f"serving-{run_id}"),
            "runs_dir": str(work / "runs"), "run_id": run_id, "warm_start": MODES[mode]}
    started = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--_one", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True)
    wall = time.monotonic() - started
    summary_file = work / "runs" / run_id / "summary.json"
    if done.returncode != 0 or not summary_file.is_file():
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
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        one_run(json.loads(args._one))
        return 0

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
    rows = [("run s", lambda s: s["seconds"]), ("steps s", lambda s: s["orchestration"]["steps_seconds"]),
            ("outside the steps s", lambda s: s["orchestration"]["seconds"]),
            ("share outside", lambda s: 100 * s["orchestration"]["share"])]
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
