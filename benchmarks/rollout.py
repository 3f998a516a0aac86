"""Rollout benchmark: what a shadow or canary rollout costs on one machine.

    python benchmarks/rollout.py                 # ~10 minutes on 2 cores; tables, then one JSON line
    python benchmarks/rollout.py --rounds 1 --duration 4 --decisions 1 --concurrency 32

What runs, all on loopback, all stopped at the end (also on Ctrl-C or errors):

1. Two digits classifiers trained here (the same small CNN; the challenger trained longer) with their model
   references, and a seeded split of sklearn's digits whose test split the rollouts replay.
2. The champion served by ``deploy_local`` from a temporary home, as ``mlops run`` serves it (TorchServe behind
   its auth proxy, request log on).
3. **Mirroring overhead**: the same load (one ``wrk`` process, else the serving benchmark's asyncio client; one
   PNG digit; keep-alive; ``--concurrency``) through the champion's auth proxy with no challenger (the
   baseline: what every request costs today) and with a shadow challenger at share 0.1 (the default) and 1.0:
   the challenger's own server running beside it from ``<home>/challenger``, the rollout file naming it. The
   three take turns in ``--rounds`` rounds after ``--warmup`` seconds of unmeasured load each; medians. On one
   machine the challenger's TorchServe shares the CPU with the champion's, so the figure is the whole cost of
   shadowing here, not the proxy's alone (its CPU is reported apart).
4. **Time to a decision**: ``deploy_local`` with the rollout settings at their defaults (min_requests 200,
   share 0.1, replay of the test split on), ``--decisions`` times for shadow and for canary, the two models
   taking turns as challenger; the baseline is ``deploy_local`` replacing the model (stop, start, smoke test).
   Reported: seconds to the decision (challenger start, smoke test, warm-up and evidence), the evidence phase
   alone, and the switch of a promotion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))
os.environ.setdefault("DO_NOT_TRACK", "1")

from serving_bench.load import process_tree_cpu_s, run_load  # noqa: E402

SHADOW_SHARES = (0.1, 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="load concurrency (default 1 32)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of measured load per run (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the load runs (default 3)")
    parser.add_argument("--warmup", type=float, default=10.0, help="unmeasured load per setup first (default 10)")
    parser.add_argument("--decisions", type=int, default=3, help="rollouts per strategy timed (default 3)")
    parser.add_argument("--load-gen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=("overhead", "decision"))
    return parser


# ----------------------------------------------------------------------------- the models and the data

def prepare(work: Path) -> dict[str, Any]:
    """Two models with their references, a dataset, and a PNG digit; the models' versions."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from components.core.data import Splits, save_splits
    from components.core.features import write_model_reference
    from components.core.models import Classifier, EncoderSpec, save_classifier
    from serving.client import encode_png

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.images[order][:, None] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    train, val, test = slice(0, 1100), slice(1100, 1400), slice(1400, None)
    empty = np.zeros((0, 1, 8, 8), np.float32)
    save_splits(Splits(train_x=empty, train_y=np.zeros(0, np.int64), val_x=x[val], val_y=y[val], test_x=x[test],
                       test_y=y[test], pool_x=empty, class_names=[str(i) for i in range(10)]), work / "dataset")
    torch.set_num_threads(1)
    models = {}
    for name, steps in (("bench-a", 600), ("bench-b", 800)):
        torch.manual_seed(0)
        model = Classifier(EncoderSpec(width=16, embed_dim=32), num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_classifier(model.eval(), work / name, {"class_names": [str(i) for i in range(10)], "model_version": name})
        write_model_reference(work / name, x[val])
        models[name] = work / name
    (work / "digit.png").write_bytes(encode_png(x[test][0]))
    return {"models": models, "dataset": work / "dataset", "body_file": work / "digit.png"}


def settings(home: Path, **rollout: Any):
    """The serving and rollout settings a deploy step gets (``cfg.serving``, ``cfg.rollout``), on free ports."""
    import dataclasses

    from components.core.settings import Settings
    from pipelines.config import RolloutConfig, ServingConfig
    from serving.processes import free_ports

    inference, management, metrics = free_ports(3, set())
    serving = ServingConfig(home=str(home), inference_port=inference, management_port=management,
                            metrics_port=metrics)
    return (Settings(**dataclasses.asdict(serving)),
            Settings(**dataclasses.asdict(RolloutConfig(**rollout))))


# ----------------------------------------------------------------------------- mirroring overhead

def overhead(args: argparse.Namespace, work: Path, data: dict[str, Any], tool: str) -> list[dict[str, Any]]:
    import requests

    from components.deploy.local import deploy_local
    from components.deploy.rollout.local import _wait_until_taken
    from serving.archive import build_mar
    from serving.client import read_token
    from serving.processes import LOOPBACK, free_ports
    from serving.rollout_router import write_rollout_file
    from serving.server import CHALLENGER_DIR, LocalTorchServe

    home = work / "overhead"
    serving, _ = settings(home)
    champion = LocalTorchServe(home)
    challenger = LocalTorchServe(home / CHALLENGER_DIR)
    try:
        record = deploy_local(data["models"]["bench-a"], data["dataset"], serving)
        token, source = read_token(record["token_file"]), read_token(record["source_token_file"])
        mar = build_mar(data["models"]["bench-b"], work / "export-b", "digits", "bench-b")
        inference, management, metrics = free_ports(3, set())
        side = challenger.start(mar, "digits", host=LOOPBACK, inference_port=inference, management_port=management,
                                metrics_port=metrics, request_log_dir=home / CHALLENGER_DIR / "requests",
                                model_version="bench-b")

        def setup(share: float | None) -> None:
            if share is None:
                champion.rollout_file.unlink(missing_ok=True)
                _wait_until_taken(record["endpoint"], source, None)
                return
            write_rollout_file(champion.rollout_file, {"version": "bench-b", "mode": "shadow", "share": share,
                                                       "upstream": f"http://{LOOPBACK}:{inference}",
                                                       "token_file": side["source_token_file"]})
            _wait_until_taken(record["endpoint"], source, "bench-b", "shadow", share)

        setups = {"no challenger": None, **{f"shadow {share:g}": share for share in SHADOW_SHARES}}
        top = max(args.concurrency)
        for name, share in setups.items():
            setup(share)
            print(f"[bench] warming up: {name}, {args.warmup:g} s", flush=True)
            run_load(record["endpoint"], data["body_file"], token, top, args.warmup, tool)
        rows = []
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for name, share in setups.items():
                    setup(share)
                    pids = {"proxy": record["proxy_pid"], "champion": record["pid"], "challenger": side["pid"],
                            "challenger_proxy": side["proxy_pid"]}
                    before = {k: sum(process_tree_cpu_s(p).values()) for k, p in pids.items()}
                    result = run_load(record["endpoint"], data["body_file"], token, concurrency, args.duration, tool)
                    after = {k: sum(process_tree_cpu_s(p).values()) for k, p in pids.items()}
                    evidence = {} if share is None else requests.get(
                        record["endpoint"].rsplit("/predictions/", 1)[0] + "/rollout",
                        headers={"Authorization": f"Bearer {source}"}, timeout=10).json()
                    requests_ = max(1, result["requests"])
                    rows.append({"setup": name, "concurrency": concurrency, "round": round_,
                                 "req_per_s": result["req_per_s"], "p50_ms": result["p50_ms"],
                                 "p99_ms": result["p99_ms"], "non_2xx": result["non_2xx"],
                                 "socket_errors": result["socket_errors"],
                                 "mirrored": evidence.get("challenger", {}).get("requests", 0),
                                 "mirror_dropped": evidence.get("mirror_dropped", 0),
                                 **{f"cpu_ms_per_request_{k}": 1000 * (after[k] - before[k]) / requests_ for k in pids}})
                    print(f"[bench] round {round_ + 1}, c={concurrency}, {name}: {result['req_per_s']:.0f} req/s, "
                          f"p99 {result['p99_ms']:.1f} ms", flush=True)
        return rows
    finally:
        champion.stop(quiet=True)
        challenger.stop(quiet=True)


def overhead_table(rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    medians = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        base = None
        for setup in dict.fromkeys(r["setup"] for r in rows):
            runs = [r for r in rows if r["setup"] == setup and r["concurrency"] == concurrency]
            m = {"setup": setup, "concurrency": concurrency, "runs": len(runs),
                 **{k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("setup", "concurrency",
                                                                                           "round")},
                 "req_per_s_min": min(r["req_per_s"] for r in runs), "req_per_s_max": max(r["req_per_s"] for r in runs)}
            base = base or m
            m["throughput_vs_baseline"] = m["req_per_s"] / base["req_per_s"] if base["req_per_s"] else 0.0
            medians.append(m)
    lines = ["| setup | concurrency | req/s (min-max) | vs no challenger | p50 ms | p99 ms | proxy CPU ms/req | "
             "challenger CPU ms/req | mirrored | dropped |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in medians:
        lines.append(f"| {m['setup']} | {m['concurrency']} | {m['req_per_s']:,.0f} ({m['req_per_s_min']:,.0f}-"
                     f"{m['req_per_s_max']:,.0f}) | {m['throughput_vs_baseline']:.2f}x | {m['p50_ms']:.1f} | "
                     f"{m['p99_ms']:.1f} | {m['cpu_ms_per_request_proxy']:.3f} | "
                     f"{m['cpu_ms_per_request_challenger'] + m['cpu_ms_per_request_challenger_proxy']:.3f} | "
                     f"{m['mirrored']:,.0f} | {m['mirror_dropped']:,.0f} |")
    return "\n".join(lines), medians


# ----------------------------------------------------------------------------- time to a decision

def decisions(args: argparse.Namespace, work: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    from components.deploy.local import deploy_local
    from serving.server import LocalTorchServe

    home = work / "decisions"
    serving, _ = settings(home)
    rows: list[dict[str, Any]] = []
    try:
        for i in range(args.decisions):
            model = data["models"]["bench-a" if i % 2 == 0 else "bench-b"]
            started = time.perf_counter()
            record = deploy_local(model, data["dataset"], serving)
            rows.append({"strategy": "replace", "seconds": time.perf_counter() - started})
            print(f"[bench] replace: {rows[-1]['seconds']:.1f} s", flush=True)
        for strategy in ("shadow", "canary"):
            for i in range(args.decisions):
                served = LocalTorchServe(home).status()["model_version"]
                challenger = "bench-b" if served == "bench-a" else "bench-a"
                _, rollout = settings(home, strategy=strategy)
                started = time.perf_counter()
                record = deploy_local(data["models"][challenger], data["dataset"], serving, rollout)
                result = record["rollout"]
                rows.append({"strategy": strategy, "seconds": time.perf_counter() - started,
                             "decision": result["decision"], "seconds_to_decision": result["seconds_to_decision"],
                             "evidence_s": result["evidence"]["elapsed_s"], "switch_s": result.get("switch_seconds"),
                             "challenger_requests": result["evidence"]["challenger"]["requests"],
                             "replayed": result.get("requests_replayed", 0), "reason": result["reason"]})
                print(f"[bench] {strategy}: {result['decision']} after {result['seconds_to_decision']:.1f} s "
                      f"({result['reason'][:100]})", flush=True)
    finally:
        LocalTorchServe(home).stop(quiet=True)
    return rows


def _spread(values: list[float]) -> str:
    values = sorted(values)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values[0]:.1f} / {statistics.median(values):.1f} / {values[-1]:.1f}"


def decision_table(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = ["| strategy | runs | decisions | s to the decision (min / median / max) | evidence phase s | "
             "switch s | whole deploy s |", "|---|---:|---|---:|---:|---:|---:|"]
    summary = {}
    for strategy in ("replace", "shadow", "canary"):
        runs = [r for r in rows if r["strategy"] == strategy]
        if not runs:
            continue
        if strategy == "replace":
            lines.append(f"| replace (baseline) | {len(runs)} | - | - | - | - | {_spread([r['seconds'] for r in runs])} |")
            summary[strategy] = {"seconds": [round(r["seconds"], 2) for r in runs]}
            continue
        switches = [r["switch_s"] for r in runs if r["switch_s"] is not None]
        decided = ", ".join(f"{sum(r['decision'] == d for r in runs)} {d}" for d in ("promote", "rollback")
                            if any(r["decision"] == d for r in runs))
        lines.append(f"| {strategy} | {len(runs)} | {decided} | {_spread([r['seconds_to_decision'] for r in runs])} | "
                     f"{_spread([r['evidence_s'] for r in runs])} | {_spread(switches) if switches else '-'} | "
                     f"{_spread([r['seconds'] for r in runs])} |")
        summary[strategy] = {k: [r[k] for r in runs] for k in ("seconds_to_decision", "evidence_s", "switch_s",
                                                               "decision", "challenger_requests", "replayed")}
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.decisions < 1:
        parser.error("--rounds and --decisions must be at least 1 and --duration positive")
    tool = ("wrk" if shutil.which("wrk") else "python") if args.load_gen == "auto" else args.load_gen
    if tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --load-gen python")
    work = Path(tempfile.mkdtemp(prefix="kfp-mlops-rollout-bench-"))
    result: dict[str, Any] = {"benchmark": "rollout", "load_generator": tool, "duration_s": args.duration,
                              "rounds": args.rounds, "decisions_per_strategy": args.decisions,
                              "load_average": os.getloadavg()}
    try:
        print(f"[bench] training two digits models in {work} ...", flush=True)
        data = prepare(work)
        if "overhead" not in args.skip:
            table, medians = overhead_table(overhead(args, work, data, tool))
            print("\nMirroring overhead (medians over the rounds)\n" + table, flush=True)
            result["overhead"] = medians
        if "decision" not in args.skip:
            table, summary = decision_table(decisions(args, work, data))
            print("\nTime to a decision (defaults: min_requests 200, share 0.1, replay on)\n" + table, flush=True)
            result["decisions"] = summary
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
