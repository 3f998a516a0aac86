"""Load generation and what it costs: one load generator process per run (wrk, else an asyncio client), and
the CPU seconds of the servers' processes from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import SCRIPT

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "image/png"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
done = function(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local e = summary.errors
  out:write(string.format('{"requests":%d,"duration_s":%.6f,"p50_ms":%.4f,"p99_ms":%.4f,"mean_ms":%.4f,' ..
    '"non_2xx":%d,"socket_errors":%d}', summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3, e.status, e.connect + e.read + e.write + e.timeout))
  out:close()
end
"""


async def _client(host: str, port: int, request: bytes, stop_at: float, latencies: list[float], counts: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            counts["non_2xx"] += not 200 <= status < 300
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    except (OSError, asyncio.IncompleteReadError):
        counts["socket_errors"] += 1
    finally:
        writer.close()


def python_load(url: str, body: bytes, token: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Keep-alive HTTP/1.1 load at a fixed concurrency (the fallback when wrk is not installed)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: image/png\r\n"
               f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0}

    async def main() -> float:
        start = time.perf_counter()
        stop_at = start + duration_s
        await asyncio.gather(*(_client(parts.hostname, parts.port, request, stop_at, latencies, counts)
                               for _ in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()
    pick = (lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]) if latencies else (lambda q: 0.0)
    return {"requests": len(latencies), "duration_s": elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else 0.0, **counts}


def run_load(url: str, body_file: Path, token: str, concurrency: int, duration_s: float, tool: str) -> dict[str, Any]:
    """One load run in its own process; adds req_per_s and the generator's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        if tool == "wrk":
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT)
            env = {**os.environ, "BENCH_BODY": str(body_file), "BENCH_TOKEN": token, "BENCH_OUT": str(out)}
            subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s", "-s", str(script), url],
                           env=env, check=True, stdout=subprocess.DEVNULL, timeout=duration_s + 30)
        else:
            args = json.dumps({"url": url, "body_file": str(body_file), "token": token, "concurrency": concurrency,
                               "duration_s": duration_s, "out": str(out)})
            subprocess.run([sys.executable, str(SCRIPT), "--_load", args], check=True, timeout=duration_s + 30)
        result = json.loads(out.read_text())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["req_per_s"] = result["requests"] / result["duration_s"] if result["duration_s"] else 0.0
    result["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


# ----------------------------------------------------------------------------- measuring servers

def process_tree_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of pid and its descendants, by role: 'frontend' = pid itself, 'workers' = the rest."""
    from serving.processes import descendants

    tick = os.sysconf("SC_CLK_TCK")

    def cpu(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    return {"frontend": cpu(pid), "workers": sum(cpu(c) for c in descendants(pid))}


def measure(name: str, url: str, pid: int, body_file: Path, token: str, concurrency: int, duration_s: float,
            warmup_s: float, tool: str, proxy_pid: int | None = None) -> dict[str, Any]:
    run_load(url, body_file, token, concurrency, warmup_s, tool)  # warm the JIT, caches, connections
    before = process_tree_cpu_s(pid)
    proxy_before = process_tree_cpu_s(proxy_pid)["frontend"] if proxy_pid else 0.0
    result = run_load(url, body_file, token, concurrency, duration_s, tool)
    after = process_tree_cpu_s(pid)
    proxy_after = process_tree_cpu_s(proxy_pid)["frontend"] if proxy_pid else 0.0
    n = max(1, result["requests"])
    result.update(server=name, concurrency=concurrency,
                  cpu_ms_frontend=1000 * (after["frontend"] - before["frontend"]) / n,
                  cpu_ms_workers=1000 * (after["workers"] - before["workers"]) / n,
                  cpu_ms_proxy=1000 * (proxy_after - proxy_before) / n,
                  cpu_ms_loadgen=1000 * result["loadgen_cpu_s"] / n)
    return result


def prometheus_sums(metrics_url: str) -> dict[str, float]:
    """TorchServe's cumulative frontend counters (requests, queue and inference microseconds)."""
    import requests

    sums: dict[str, float] = {}
    for line in requests.get(metrics_url, timeout=10).text.splitlines():
        for name in ("ts_inference_requests_total", "ts_queue_latency_microseconds", "ts_inference_latency_microseconds"):
            if line.startswith(name + "{"):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums
