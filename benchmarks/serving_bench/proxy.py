"""The auth proxy alone: its CPU per request and throughput with each event loop, in front of an upstream that
answers at once (so TorchServe's own time and noise stay out of the comparison).

``python benchmarks/serving.py --proxy-loops`` runs it: every loop gets its own proxy process, all in front of
one fixed-answer upstream (uvloop, httptools), measured in interleaved rounds by the same load generator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import MODEL_NAME, ROOT, SCRIPT
from .load import process_tree_cpu_s, run_load

# What TorchServe answers a digit, in size and shape: the proxy relays it as it would the real one.
ANSWER_BODY = (b'{"label":"8","class_index":8,"confidence":0.93,"probabilities":{"8":0.93,"1":0.04,"9":0.01},'
               b'"top_k":[{"label":"8","class_index":8,"probability":0.93}],"model_version":"bench-1"}')
ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: bench\r\nconnection: keep-alive\r\n"
          b"content-length: " + str(len(ANSWER_BODY)).encode() + b"\r\n\r\n" + ANSWER_BODY)
LOOPS = ("asyncio", "uvloop")  # the standard library's event loop (the one the proxy ships with), and libuv's
POD_KEY = "bench-pod-key"
CLIENT_TOKEN = "bench-client-token-" + "x" * 24


def serve_fixed_answer(port: int) -> None:
    """The upstream: parses each request with httptools and answers ``ANSWER`` at once (keep-alive)."""
    import httptools
    import uvloop

    class FixedAnswer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport, self.parser = transport, httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(ANSWER)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(FixedAnswer, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


def serve_proxy(port: int, upstream_port: int, home: str, loop: str) -> None:
    """One auth proxy on ``port`` with the given event loop (``LOOPS``); otherwise as shipped."""
    from serving import auth_proxy

    if loop not in LOOPS:
        raise SystemExit(f"unknown event loop {loop!r}: one of {', '.join(LOOPS)}")
    if loop == "uvloop":
        import uvloop

        auth_proxy.run_event_loop = uvloop.run
    server = auth_proxy.AuthProxyServer(("127.0.0.1", port), auth_proxy.ProxyConfig(
        upstream=f"http://127.0.0.1:{upstream_port}", key_file=f"{home}/key_file.json", token_file=f"{home}/token"))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def proxy_loops(body: bytes, concurrency: int, rounds: int, duration_s: float, tool: str) -> dict[str, Any]:
    """Each loop's proxy, measured in ``rounds`` interleaved rounds; the table as it goes, then the JSON summary."""
    from serving.processes import free_port

    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="kfp-mlops-proxy-bench-") as home:
        Path(home, "key_file.json").write_text(json.dumps({"inference": {"key": POD_KEY}}))
        Path(home, "token").write_text(CLIENT_TOKEN + "\n")
        body_file = Path(home, "digit.png")
        body_file.write_bytes(body)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            upstream_port = free_port()
            processes.append(subprocess.Popen([sys.executable, str(SCRIPT), "--_upstream", str(upstream_port)],
                                              cwd=ROOT, env=env))
            _wait_for_port(upstream_port, processes[-1])
            proxies: dict[str, tuple[str, int]] = {}
            for loop in LOOPS:
                port = free_port()
                spec = json.dumps({"port": port, "upstream_port": upstream_port, "home": home, "loop": loop})
                processes.append(subprocess.Popen([sys.executable, str(SCRIPT), "--_proxy", spec], cwd=ROOT, env=env))
                _wait_for_port(port, processes[-1])
                proxies[loop] = (f"http://127.0.0.1:{port}/predictions/{MODEL_NAME}", processes[-1].pid)
            rows: dict[str, list[dict[str, float]]] = {loop: [] for loop in LOOPS}
            print(f"{'event loop':<10} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
                  f"{'proxy CPU ms/request':>20}", flush=True)
            for _ in range(rounds):
                for loop, (url, pid) in proxies.items():
                    run_load(url, body_file, CLIENT_TOKEN, concurrency, 1.0, tool)  # warm-up, unmeasured
                    before = process_tree_cpu_s(pid)["frontend"]
                    result = run_load(url, body_file, CLIENT_TOKEN, concurrency, duration_s, tool)
                    cpu_ms = 1000 * (process_tree_cpu_s(pid)["frontend"] - before) / max(1, result["requests"])
                    row = {"req_per_s": result["req_per_s"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                           "errors": result["non_2xx"] + result["socket_errors"], "cpu_ms_per_request": cpu_ms}
                    rows[loop].append(row)
                    print(f"{loop:<10} {concurrency:>4} {row['req_per_s']:>7.0f} {row['p50_ms']:>7.2f} "
                          f"{row['p99_ms']:>7.2f} {row['errors']:>6} {cpu_ms:>20.3f}", flush=True)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    summary: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds, "duration_s": duration_s,
                               "load_generator": tool}
    for loop, loop_rows in rows.items():
        cpu = [r["cpu_ms_per_request"] for r in loop_rows]
        rps = [r["req_per_s"] for r in loop_rows]
        summary[loop] = {"cpu_ms_per_request": [round(min(cpu), 4), round(statistics.median(cpu), 4), round(max(cpu), 4)],
                         "req_per_s": [round(min(rps), 1), round(statistics.median(rps), 1), round(max(rps), 1)],
                         "errors": sum(r["errors"] for r in loop_rows)}
    # Round by round, as measured side by side: the shipped loop's CPU per request over the standard loop's.
    summary["uvloop_cpu_over_asyncio_rounds"] = [
        round(u["cpu_ms_per_request"] / max(a["cpu_ms_per_request"], 1e-9), 3) for a, u in zip(rows["asyncio"], rows["uvloop"])]
    summary["uvloop_cpu_over_asyncio"] = round(statistics.median(summary["uvloop_cpu_over_asyncio_rounds"]), 3)
    summary["uvloop_throughput_over_asyncio"] = round(
        statistics.median(rows["uvloop"][i]["req_per_s"] / max(rows["asyncio"][i]["req_per_s"], 1e-9)
                          for i in range(rounds)), 3)
    return summary
