"""Serving benchmark, the pod against the host process: the same model behind the same auth proxy, served (1) by
the serving Deployment run as a pod on the local Docker engine, as rendered from the manifests
(components/deploy/pods: its CPU and memory limits, its ConfigMap's TorchServe settings, its release fetched
from an S3 server) and (2) by TorchServe as `mlops serve start` runs it on the host; with ``unlimited``, (3) the
same pod with its containers' resource limits taken out, which splits the limits' cost from the containers'.

    python benchmarks/serving_pod.py                 # about 4 minutes on 2 cores; a table, then one JSON line
    python benchmarks/serving_pod.py --duration 4 --rounds 1 --concurrency 1 32 --skip unlimited

The load, its generator (wrk when installed, else benchmarks/serving.py's asyncio client), the warm-up, the
interleaved rounds at the top concurrency and the table are benchmarks/serving.py's (serving_bench/); the pods'
CPU seconds come from /proc like the host's (a container's processes are this kernel's). Needs the images
(`make image`), a Docker engine, kubectl and moto (the dev extra).
"""

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))
sys.path.append(str(HERE.parent / "tests"))  # s3server: moto's S3 server, as the tests run it

from serving_bench.load import measure, run_load  # noqa: E402
from serving_bench.report import row_summary, table  # noqa: E402
from serving_bench.servers import VARIANT_KEYS, start_servers, stop_server, train_digits  # noqa: E402

ROOT = HERE.parent
CLIENT_TOKEN = "benchmark-client-token-0123456789"
SOURCE_TOKEN = "benchmark-source-token-0123456789"
TARGETS = ("host", "pod", "pod-unlimited")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overlay", default=str(ROOT / "manifests" / "overlays" / "dev"),
                        help="the kustomize overlay whose serving Deployment runs as the pod (default: dev)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load per measurement (default 8)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement (default 2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds at the top concurrency (default 3)")
    parser.add_argument("--jit-warmup", type=float, default=10.0, help="seconds of unmeasured load per server first (default 10)")
    parser.add_argument("--load-gen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=["unlimited"], help="leave the unlimited pod out")
    return parser


def shipped_settings() -> dict[str, Any]:
    """benchmarks/serving.py's defaults: TorchServe as the project ships it."""
    from serving import archive
    from serving.torchserve_config import (
        DEFAULT_JOB_QUEUE_SIZE,
        DEFAULT_NETTY_CLIENT_THREADS,
        DEFAULT_NETTY_THREADS,
        DEFAULT_VMARGS,
    )

    settings = {"workers": archive.DEFAULT_WORKERS, "batch_size": archive.DEFAULT_BATCH_SIZE,
                "max_batch_delay_ms": archive.DEFAULT_MAX_BATCH_DELAY_MS, "netty_threads": DEFAULT_NETTY_THREADS,
                "netty_client_threads": DEFAULT_NETTY_CLIENT_THREADS, "job_queue_size": DEFAULT_JOB_QUEUE_SIZE,
                "vmargs": DEFAULT_VMARGS, "env": {}}
    assert set(settings) == set(VARIANT_KEYS)
    return settings


def unlimited(deployment: dict) -> dict:
    """The Deployment with every container's resources removed (nothing else changed)."""
    out = copy.deepcopy(deployment)
    spec = out["spec"]["template"]["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        container.pop("resources", None)
    return out


def java_frontend(container_pid: int) -> int:
    """TorchServe's Java frontend among a container's processes (its PID 1 is tini): the table's "main" process,
    as for the host's TorchServe."""
    from serving.processes import descendants

    for pid in descendants(container_pid):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "java":
                return pid
        except OSError:
            continue
    raise RuntimeError(f"no java process under PID {container_pid}: did TorchServe start in the pod?")


def start_pods(args, work: Path, s3_endpoint: str, started: list) -> dict[str, dict[str, Any]]:
    """The serving pod (and the unlimited one), ready; their targets: the Service's port on the pod's IP."""
    from components.core import names
    from components.deploy import pods

    objects = pods.render(args.overlay)
    deployment = pods.find(objects, "Deployment", names.SERVING_DEPLOYMENT)
    configmaps = pods.config_maps(objects)
    configmaps[names.STORAGE_CONFIG_MAP]["S3_ENDPOINT_URL"] = s3_endpoint.encode()
    keys = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    secrets = {"kfp-mlops-serving-s3": keys, names.SERVING_TOKEN_SECRET: {"token": CLIENT_TOKEN},
               names.SERVING_SOURCE_TOKEN_SECRET: {"token": SOURCE_TOKEN}}
    port = pods.find(objects, "Service", names.SERVING_DEPLOYMENT)["spec"]["ports"][0]["targetPort"]
    variants = {"pod": deployment}
    if "unlimited" not in args.skip:
        variants["pod-unlimited"] = unlimited(deployment)
    targets = {}
    for name, workload in variants.items():
        print(f"[bench] starting the {name} from {args.overlay}", flush=True)
        pod = pods.start_pod(workload, name=f"bench-{name}-{uuid.uuid4().hex[:6]}",
                             configmaps=configmaps, secrets=secrets)
        started.append(pod)
        pod.wait_ready(timeout_s=300)
        limits = {c["name"]: (c.get("resources") or {}).get("limits")
                  for c in workload["spec"]["template"]["spec"]["containers"]}
        targets[name] = {"url": pod.url(port, "/predictions/digits"), "token": CLIENT_TOKEN,
                         "pid": java_frontend(pod.inspect("torchserve")["State"]["Pid"]),
                         "proxy_pid": pod.inspect("auth-proxy")["State"]["Pid"], "label": name, "limits": limits}
    return targets


def measure_all(args, targets: dict[str, dict[str, Any]], body_file: Path, tool: str) -> dict[tuple[str, int], list]:
    runs: dict[tuple[str, int], list] = {}
    top = max(args.concurrency)

    def run(name: str, c: int) -> None:
        t = targets[name]
        row = measure(name, t["url"], t["pid"], body_file, t["token"], c, args.duration, args.warmup, tool,
                      t.get("proxy_pid"))
        runs.setdefault((name, c), []).append(row)
        print(table([row]).splitlines()[-1], flush=True)

    for name, t in targets.items():
        print(f"[bench] warming up {name} for {args.jit_warmup:.0f} s", flush=True)
        run_load(t["url"], body_file, t["token"], top, args.jit_warmup, tool)
    print(table([]), flush=True)
    for c in sorted(args.concurrency):
        if c != top:
            for name in targets:
                run(name, c)
    for _ in range(args.rounds):  # interleaved: load from elsewhere on the machine hits every target alike
        for name in targets:
            run(name, top)
    return runs


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rows, key=lambda r: r["req_per_s"])[len(rows) // 2]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        raise SystemExit("--rounds must be at least 1 and --duration positive")
    tool = ("wrk" if shutil.which("wrk") else "python") if args.load_gen == "auto" else args.load_gen
    from s3server import MotoServer, s3_env

    from components.core.blobs import Storage
    from components.core.releases import publish
    from components.deploy import pods

    work = Path(tempfile.mkdtemp(prefix="kfp-mlops-bench-pod-"))
    servers: list[Any] = []
    started: list[Any] = []
    try:
        gateway = pods.ensure_network()
        with MotoServer(host=gateway) as s3:
            os.environ.update({**s3_env(s3.endpoint), "NO_PROXY": f"127.0.0.1,localhost,{gateway}"})
            print(f"[bench] training a digits model in {work} ...", flush=True)
            body_file = work / "digit.png"
            body_file.write_bytes(train_digits(work / "model"))
            # The host's TorchServe and its auth proxy, as `mlops serve start` runs them; its .mar is what the
            # pod's init container fetches.
            host = start_servers(work, shipped_settings(), {}, ["nolog", "defaults", "peer"], 0, servers)
            Storage().client.create_bucket(Bucket="kfp-mlops")
            publish(work / "export", "s3://kfp-mlops/models/digits")
            targets = {"host": {**host["ours-proxied"], "label": "host"}}
            targets.update(start_pods(args, work, s3.endpoint, started))
            runs = measure_all(args, targets, body_file, tool)
            for pod in started:
                pod.stop(grace_period_s=5)
            started.clear()
    finally:
        for pod in started:
            pod.stop(grace_period_s=5)
        for server in servers:
            stop_server(server)
        shutil.rmtree(work, ignore_errors=True)

    top = max(args.concurrency)
    rows = [median_row(runs[(name, c)]) for c in sorted(args.concurrency) for name in targets if (name, c) in runs]
    print(f"\nmedians ({args.rounds} rounds at concurrency {top}; {tool}):\n{table(rows)}")
    result: dict[str, Any] = {"benchmark": "serving_pod", "load_generator": tool, "duration_s": args.duration,
                              "rounds": args.rounds, "targets": {}}
    for name in targets:
        top_runs = runs[(name, top)]
        result["targets"][name] = {
            "limits": targets[name].get("limits"),
            **{f"c{c}": row_summary(median_row(runs[(name, c)])) for c in sorted(args.concurrency)},
            f"c{top}_rounds_req_per_s": [round(r["req_per_s"], 1) for r in top_runs],
            f"c{top}_rounds_p99_ms": [round(r["p99_ms"], 2) for r in top_runs],
        }
    host_rps = statistics.median(r["req_per_s"] for r in runs[("host", top)])
    for name in targets:
        if name != "host":
            result[f"{name}_over_host_c{top}"] = round(
                statistics.median(r["req_per_s"] for r in runs[(name, top)]) / host_rps, 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
