"""Serving benchmark: TorchServe as the project ships it against a plain FastAPI/uvicorn app.

    python benchmarks/serving.py                 # ~5 minutes on 2 cores; tables, then one JSON line
    python benchmarks/serving.py --duration 4 --rounds 1 --concurrency 1 32
    python benchmarks/serving.py --quick         # ~2 minutes: for iterating, not for the figures in the docs
    python benchmarks/serving.py --proxy-loops   # ~1 minute: the auth proxy alone, asyncio's loop against uvloop

What runs, all on loopback, all stopped at the end (also on Ctrl-C or errors):

1. A digits classifier trained here for a few seconds (sklearn digits, 8x8 grayscale).
2. TorchServe with that model, tuned as shipped (``serving/archive.py`` defaults:
   workers, dynamic batching; ``serving/server.py``: frontend threads, JVM options,
   quiet logs), request log ON, as ``mlops serve start`` runs it, measured twice:
   directly on its internal loopback port with its own key from ``key_file.json``
   ("ours") and, as clients call it, through the auth proxy in front of it on the
   public port with the client token ("ours-proxied"); a second TorchServe with
   the request log OFF, to show what logging costs; a third with TorchServe's own
   defaults (no batching, its log4j2 configuration, the JVM's defaults), to show what
   the tuning buys. "Directly" is the route a client of the proxy gets: at concurrency 1
   (nothing else in flight) the model's unbatched twin (``serving/unbatched_route.py``),
   at higher concurrencies the batched model; "ours-batched" is the batched model
   alone at the lower concurrencies, to show what the twin saves a lone request.
3. The peer: the same model and the same handler code behind FastAPI/uvicorn
   (``serving_bench/servers.py``: token check, raw body, ``handler.handle``), the
   server most teams write instead, with the request log on too.
4. One load generator in its own process (``wrk`` when installed, else an asyncio
   keep-alive client in a subprocess), the same PNG digit in every request, at
   each concurrency: requests/s and p50/p99 latency; CPU seconds per request of
   the server processes and of the load generator (from /proc), so the table
   says where the time goes.
5. The in-process ceiling: forward passes per second of the same model (batch 1,
   one thread), and the handler's own per-request cost split into decode, model
   and answer.

6. The tail: this machine's own slow-downs, probed for ``--noise-probe`` seconds with the
   servers idle before each top-concurrency round; then one more run of our server with a
   stall probe (a thread timing a tiny CPU task by its CPU time) next to TorchServe's access
   log, which splits the latency percentiles into requests in flight while the host slowed
   the CPU and the rest, with a control (the same windows shifted) to show the split is causal.

Every server first gets ``--jit-warmup`` seconds of unmeasured load (the Java
frontend needs it). The top concurrency runs ``--rounds`` times with the servers
interleaved and the median run is reported, so load from elsewhere on a shared
machine hits every server alike. Without wrk the Python load generator needs
most of a core itself, which the servers then lack: install wrk for the numbers.

A/B runs of a setting: ``--variant NAME=JSON`` adds a TorchServe with some shipped
settings changed, measured in the same interleaved rounds; the JSON line then gives
both servers' p99/p50 round by round (``variants``, ``ours_rounds_p99_over_p50``)::

    python benchmarks/serving.py --concurrency 32 --rounds 8 --duration 5 \
        --skip peer nolog defaults inprocess --variant 'c2={"vmargs": ""}'
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Run as a script, this file's folder would come first on sys.path and 'serving' would be this file:
# the project goes first, and this folder (for serving_bench) after everything else.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))

from serving_bench.inprocess import in_process  # noqa: E402
from serving_bench.load import measure, prometheus_sums, python_load, run_load  # noqa: E402
from serving_bench.proxy import proxy_loops, serve_fixed_answer, serve_proxy  # noqa: E402
from serving_bench.report import (  # noqa: E402
    Measurements,
    build_result,
    goals_lines,
    noise_line,
    print_summary,
    round_order,
    table,
)
from serving_bench.servers import VARIANT_KEYS, serve_peer, start_servers, stop_server, train_digits  # noqa: E402
from serving_bench.tail import attribute_tail, machine_noise  # noqa: E402

# The servers measured at the concurrencies below the top one, once each, in this order.
LOWER_CONCURRENCY_ORDER = ("ours", "ours-batched", "ours-proxied", "peer")
# --quick: the settings of a short iteration run (concurrency 1 and 32, two rounds, no side measurements).
QUICK = {"duration": 3.0, "warmup": 1.0, "rounds": 2, "jit_warmup": 5.0, "noise_probe": 1.0, "concurrency": [1, 32],
         "skip": ["nolog", "defaults", "inprocess", "attribution"]}


def build_parser() -> argparse.ArgumentParser:
    from serving import archive
    from serving.torchserve_config import (
        DEFAULT_JOB_QUEUE_SIZE,
        DEFAULT_NETTY_CLIENT_THREADS,
        DEFAULT_NETTY_THREADS,
        DEFAULT_VMARGS,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per measurement (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement (default 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--workers", type=int, default=archive.DEFAULT_WORKERS, help="TorchServe workers (default: shipped)")
    parser.add_argument("--batch-size", type=int, default=archive.DEFAULT_BATCH_SIZE)
    parser.add_argument("--max-batch-delay-ms", type=int, default=archive.DEFAULT_MAX_BATCH_DELAY_MS)
    parser.add_argument("--netty-threads", type=int, default=DEFAULT_NETTY_THREADS)
    parser.add_argument("--netty-client-threads", type=int, default=DEFAULT_NETTY_CLIENT_THREADS)
    parser.add_argument("--job-queue-size", type=int, default=DEFAULT_JOB_QUEUE_SIZE)
    parser.add_argument("--vmargs", default=DEFAULT_VMARGS, help="JVM options of the frontend (default: shipped)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="A/B: one more TorchServe with these settings changed from the shipped ones, measured in "
                             "the same interleaved rounds; JSON keys: " + ", ".join(VARIANT_KEYS) +
                             """ (e.g. --variant 'pgc={"vmargs": "-XX:+UseParallelGC"}'); repeatable""")
    parser.add_argument("--peer-workers", type=int, default=2, help="uvicorn worker processes of the peer (default 2 = cores)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at the top concurrency (default 3)")
    parser.add_argument("--jit-warmup", type=float, default=10.0, help="seconds of unmeasured load per server first (default 10)")
    parser.add_argument("--noise-probe", type=float, default=2.0,
                        help="seconds of the idle-machine noise probe before each round (default 2)")
    parser.add_argument("--load-gen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["peer", "nolog", "defaults", "proxied", "batched", "inprocess", "attribution"],
                        help="leave parts out (for quick tuning runs)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run for iterating: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                                                    if k != "skip") + " --skip " + " ".join(QUICK["skip"])
                             + " (flags given explicitly still win)")
    parser.add_argument("--proxy-loops", action="store_true",
                        help="only the auth proxy, in front of an upstream that answers at once: its CPU per request "
                             "and throughput with asyncio's and with uvloop's event loop, in interleaved rounds")
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_upstream", help=argparse.SUPPRESS)
    parser.add_argument("--_proxy", help=argparse.SUPPRESS)
    parser.add_argument("--_peer", help=argparse.SUPPRESS)
    return parser


def parse_variants(parser: argparse.ArgumentParser, specs: list[str], shipped: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``--variant NAME=JSON`` as "variant-NAME" -> the shipped settings with the JSON's changes."""
    variants: dict[str, dict[str, Any]] = {}
    for spec in specs:
        vname, _, text = spec.partition("=")
        try:
            changes = json.loads(text)
        except ValueError:
            changes = None
        if not vname or not isinstance(changes, dict) or set(changes) - set(VARIANT_KEYS):
            parser.error(f"--variant {spec!r}: expected NAME=JSON with keys from {', '.join(VARIANT_KEYS)}")
        variants[f"variant-{vname}"] = {**shipped, **changes}
    return variants


def measure_rounds(args: argparse.Namespace, variants: dict[str, Any], targets: dict[str, dict[str, Any]],
                   body_file: Path, tool: str):
    """Warm every server up, measure the lower concurrencies, then the top one in interleaved rounds.

    Returns the rows by (server, concurrency), the machine's noise before each round, and TorchServe's
    frontend counters before and after the rounds.
    """
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    noise_rounds: list[dict[str, float]] = []
    top = max(args.concurrency)

    def run(name: str, c: int) -> None:
        t = targets[name]
        url = t.get("url_alone") if c == 1 and t.get("url_alone") else t["url"]  # the route the proxy would take
        row = measure(t["label"], url, t["pid"], body_file, t["token"], c, args.duration, args.warmup, tool,
                      t.get("proxy_pid"))
        runs.setdefault((name, c), []).append(row)
        print(table([row]).splitlines()[-1], flush=True)

    # Java compiles its hot paths after tens of thousands of requests: before that the frontend
    # costs 3-5 times more CPU per request. Every server gets the same warm-up, unmeasured.
    for name, t in targets.items():
        print(f"[bench] warming up {t['label']} for {args.jit_warmup:.0f} s", flush=True)
        run_load(t["url"], body_file, t["token"], top, args.jit_warmup, tool)
    print(table([]), flush=True)
    for c in sorted(args.concurrency):
        if c != top:
            for name in LOWER_CONCURRENCY_ORDER:
                if name in targets and (name != "ours-batched" or c == 1):  # above 1, "ours" is the batched model
                    run(name, c)
    # The top concurrency in rounds, the servers interleaved: load from elsewhere on the machine
    # then hits every server alike, and the median of the rounds is reported.
    before = prometheus_sums(targets["ours"]["metrics"])
    for _ in range(args.rounds):
        noise_rounds.append(machine_noise(args.noise_probe))
        print(noise_line(noise_rounds[-1]), flush=True)
        for name in round_order(variants):
            if name in targets:
                run(name, top)
    after = prometheus_sums(targets["ours"]["metrics"])
    return runs, noise_rounds, before, after


def run_benchmark(args: argparse.Namespace, shipped: dict[str, Any], variants: dict[str, dict[str, Any]],
                  tool: str) -> Measurements:
    """Train the model, start every server, measure, stop them (also on errors), then the in-process ceiling."""
    work = Path(tempfile.mkdtemp(prefix="kfp-mlops-bench-"))
    servers: list[Any] = []
    try:
        print(f"[bench] training a digits model in {work} ...", flush=True)
        png = train_digits(work / "model")
        body_file = work / "digit.png"
        body_file.write_bytes(png)
        targets = start_servers(work, shipped, variants, args.skip, args.peer_workers, servers)
        runs, noise_rounds, before, after = measure_rounds(args, variants, targets, body_file, tool)
        attribution = None
        if "attribution" not in args.skip:
            attribution = attribute_tail(targets["ours"], body_file, max(args.concurrency), args.duration, tool)
        for server in servers:
            stop_server(server)
        servers.clear()
        ceiling = {} if "inprocess" in args.skip else in_process(work / "model", png)
        log_lines = sum(len(f.read_text().splitlines()) for f in (work / "requests").glob("*.jsonl"))
    finally:
        for server in servers:
            try:
                stop_server(server)
            except Exception as err:  # noqa: BLE001 - keep stopping the others
                print(f"[bench] could not stop {server}: {err}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    return Measurements(concurrency=args.concurrency, rounds=args.rounds, duration_s=args.duration,
                        load_generator=tool, targets=list(targets), variants=variants, runs=runs,
                        noise_rounds=noise_rounds, counters_before=before, counters_after=after,
                        attribution=attribution, ceiling=ceiling, request_log_lines=log_lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # QUICK as defaults, so explicit flags still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args._peer:  # the peer server's process
        spec = json.loads(args._peer)
        serve_peer(spec["port"], spec["workers"])
        return 0
    if args._load:  # the load-generator subprocess of the python fallback
        spec = json.loads(args._load)
        result = python_load(spec["url"], Path(spec["body_file"]).read_bytes(), spec["token"], spec["concurrency"],
                             spec["duration_s"])
        Path(spec["out"]).write_text(json.dumps(result))
        return 0
    if args._upstream:  # the fixed-answer upstream of --proxy-loops
        serve_fixed_answer(int(args._upstream))
        return 0
    if args._proxy:  # one auth proxy of --proxy-loops
        spec = json.loads(args._proxy)
        serve_proxy(spec["port"], spec["upstream_port"], spec["home"], spec["loop"])
        return 0
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    shipped = {**{k: getattr(args, k) for k in VARIANT_KEYS if k != "env"}, "env": {}}
    variants = parse_variants(parser, args.variant, shipped)
    tool = ("wrk" if shutil.which("wrk") else "python") if args.load_gen == "auto" else args.load_gen
    if tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --load-gen python")

    if args.proxy_loops:
        from sklearn.datasets import load_digits

        from serving.client import encode_png

        png = encode_png((load_digits().images[-1][None] / 16.0).astype("float32"))
        print(json.dumps({"proxy_loops": proxy_loops(png, max(args.concurrency), args.rounds, args.duration, tool)}))
        return 0
    measured = run_benchmark(args, shipped, variants, tool)
    print_summary(measured)
    settings = {**shipped, "peer_workers": args.peer_workers, "duration_s": args.duration, "rounds": args.rounds}
    result = build_result(measured, settings)
    print(goals_lines(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
