"""Serving benchmark: TorchServe as the project ships it against a plain FastAPI/uvicorn app.

    python benchmarks/serving.py                 # ~5 minutes on 2 cores; tables, then one JSON line
    python benchmarks/serving.py --duration 4 --rounds 1 --concurrency 1 32

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
   the tuning buys.
3. The peer: the same model and the same handler code behind FastAPI/uvicorn
   (``create_peer_app`` below: token check, raw body, ``handler.handle``), the
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
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder would come first on sys.path and 'serving' would be this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

MODEL_NAME = "digits"
# What a --variant may change (A/B runs of the shipped TorchServe settings).
VARIANT_KEYS = ("workers", "batch_size", "max_batch_delay_ms", "netty_threads", "netty_client_threads",
                "job_queue_size", "vmargs", "env")  # env: variables for the server's processes, e.g. {"KFP_MLOPS_GC_FREEZE": "0"}
PEER_ENV = {"model_dir": "BENCH_PEER_MODEL_DIR", "token": "BENCH_PEER_TOKEN"}


# ----------------------------------------------------------------------------- the model

def train_digits(out_dir: Path, seconds: float = 8.0) -> bytes:
    """A small classifier on sklearn digits (one thread, a few seconds); returns one test digit as PNG."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from components.core.models import Classifier, EncoderSpec, save_classifier
    from serving.client import encode_png

    digits = load_digits()
    x = torch.from_numpy((digits.images[:, None] / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(width=16, embed_dim=32), num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.monotonic()
    for _ in range(300):
        idx = torch.randint(0, len(x) - 200, (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if time.monotonic() - start > seconds:
            break
    save_classifier(model.eval(), out_dir, {"class_names": [str(i) for i in range(10)], "model_version": "bench-1"})
    return encode_png(x[-1].numpy())


# ----------------------------------------------------------------------------- the peer

class _NoMetrics:
    """TorchServe's Context wants a metrics object; the peer records none (as most hand-written servers)."""

    def add_time(self, *args, **kwargs) -> None:
        pass


def create_peer_app():
    """FastAPI app serving the same handler as TorchServe: ``POST /predictions/<model>`` with a bearer token."""
    from fastapi import FastAPI, Request, Response
    from ts.context import Context, RequestProcessor

    from serving.handler import ImageClassifierHandler

    model_dir = os.environ[PEER_ENV["model_dir"]]
    expected = f"Bearer {os.environ[PEER_ENV['token']]}"
    context = Context(MODEL_NAME, model_dir, {"model": {"modelName": MODEL_NAME}}, batch_size=1, gpu=None,
                      mms_version="peer", metrics=_NoMetrics(), model_yaml_config={})
    handler = ImageClassifierHandler()
    handler.initialize(context)
    app = FastAPI()

    @app.post("/predictions/{model_name}")
    async def predict(model_name: str, request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return Response('{"code":401,"message":"Token Authorization failed"}', 401, media_type="application/json")
        if model_name != MODEL_NAME:
            return Response('{"code":404,"message":"Model not found"}', 404, media_type="application/json")
        body = await request.body()
        headers = dict(request.headers)
        headers["body"] = {"content-type": request.headers.get("content-type", "")}
        context.request_processor = [RequestProcessor(headers)]
        answer = handler.handle([{"body": body}], context)[0]  # CPU-bound and ~1 ms: inline beats a thread pool
        status = context.get_response_status(0)[0] or 200
        return Response(answer, status, media_type="application/json")

    return app


def serve_peer(port: int, workers: int) -> None:
    """uvicorn in ``workers`` forked processes sharing one listening socket (as ``uvicorn --workers`` does).

    Forked here instead of ``uvicorn --workers benchmarks.serving:...`` because an installed package
    (opacus) ships a top-level ``benchmarks`` package that shadows this folder for import strings.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            config = uvicorn.Config(create_peer_app, factory=True, access_log=False, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])  # as uvicorn's own workers get it (a TCP socket: TCP_NODELAY)
            os._exit(0)
        children.append(pid)

    def stop(*_: Any) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


class _ServerProcess:
    """A server the benchmark started in a session of its own (``self.process``); stopped with its children."""

    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


class PeerServer(_ServerProcess):
    """The FastAPI peer (``create_peer_app``) under uvicorn, ``workers`` processes, on a free loopback port."""

    def __init__(self, model_dir: Path, token: str, workers: int, log_dir: Path | None):
        from serving.server import free_port

        self.port, self.workers, self.token = free_port(), workers, token
        self.url = f"http://127.0.0.1:{self.port}/predictions/{MODEL_NAME}"
        env = {**os.environ, PEER_ENV["model_dir"]: str(model_dir), PEER_ENV["token"]: token, "OMP_NUM_THREADS": "1"}
        env.pop("KFP_MLOPS_REQUEST_LOG_DIR", None)
        if log_dir:
            env["KFP_MLOPS_REQUEST_LOG_DIR"] = str(log_dir)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_peer", json.dumps({"port": self.port, "workers": workers})]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout_s: float = 60) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the FastAPI peer exited with {self.process.returncode}")
            try:
                if requests.post(self.url, data=b"", timeout=1, headers={"Authorization": f"Bearer {self.token}"}).status_code == 400:
                    time.sleep(0.5 * self.workers)  # the other workers finish loading too
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError("the FastAPI peer did not answer within 60 s")



# ----------------------------------------------------------------------------- load generation

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
            subprocess.run([sys.executable, __file__, "--_load", args], check=True, timeout=duration_s + 30)
        result = json.loads(out.read_text())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["req_per_s"] = result["requests"] / result["duration_s"] if result["duration_s"] else 0.0
    result["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


# ----------------------------------------------------------------------------- measuring servers

def process_tree_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of pid and its descendants, by role: 'frontend' = pid itself, 'workers' = the rest."""
    from serving.server import _children

    tick = os.sysconf("SC_CLK_TCK")

    def cpu(p: int) -> float:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick

    return {"frontend": cpu(pid), "workers": sum(cpu(c) for c in _children(pid))}


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


def in_process(model_dir: Path, png: bytes, seconds: float = 2.0) -> dict[str, float]:
    """The ceiling: forward passes/s of the model (batch 1, one thread) and the handler's per-request cost split."""
    import torch
    from ts.context import Context, RequestProcessor

    from serving.handler import ImageClassifierHandler

    threads = torch.get_num_threads()
    context = Context(MODEL_NAME, str(model_dir), {"model": {"modelName": MODEL_NAME}}, batch_size=1, gpu=None,
                      mms_version="bench", metrics=_NoMetrics(), model_yaml_config={})
    saved = os.environ.pop("KFP_MLOPS_REQUEST_LOG_DIR", None)
    handler = ImageClassifierHandler()
    handler.initialize(context)  # sets one torch thread, as in a worker
    if saved is not None:
        os.environ["KFP_MLOPS_REQUEST_LOG_DIR"] = saved

    def rate(fn, batch: int = 1) -> float:
        for _ in range(50):
            fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n * batch / (time.perf_counter() - start)

    x = handler.preprocess([{"body": png}])
    x8 = torch.cat([x] * 8)
    with torch.inference_mode():
        forward = rate(lambda: handler.model(x))
        forward8 = rate(lambda: handler.model(x8), 8)

    def request(rows: list) -> None:
        context.request_processor = [RequestProcessor({"body": {"content-type": "image/png"}}) for _ in rows]
        handler.handle(rows, context)

    one, eight = [{"body": png}], [{"body": png}] * 8
    handler_1 = rate(lambda: request(one))
    handler_8 = rate(lambda: request(eight), 8)
    # The work's own tail: back-to-back batches of 32 (what the worker runs at concurrency 32), no server, no
    # queue. Their p99/p50 is what the machine's noise alone does to this work.
    thirty_two, batch_s = [{"body": png}] * 32, []
    end = time.perf_counter() + 2 * seconds
    while (start := time.perf_counter()) < end:
        request(thirty_two)
        batch_s.append(time.perf_counter() - start)
    batch_s.sort()
    context.request_processor = [RequestProcessor({"body": {"content-type": "image/png"}})]
    decode = rate(lambda: handler.preprocess(one))
    infer = rate(lambda: handler.inference(x))
    out = handler.inference(x)
    answer = rate(lambda: handler.postprocess(out))
    torch.set_num_threads(threads)
    return {"forward_b1_per_s": forward, "forward_b8_images_per_s": forward8, "handler_b1_per_s": handler_1,
            "handler_b8_requests_per_s": handler_8, "decode_us": 1e6 / decode, "model_us": 1e6 / infer,
            "answer_us": 1e6 / answer, "handler_b32_p50_ms": 1000 * batch_s[len(batch_s) // 2],
            "handler_b32_p99_ms": 1000 * batch_s[int(0.99 * (len(batch_s) - 1))]}


# ----------------------------------------------------------------------------- the machine's own noise

def _cpu_chunk() -> None:
    """~20 us of pure-Python arithmetic: no memory traffic, no system calls, no locks."""
    total = 0
    for i in range(400):
        total += i * i


def stall_windows(chunks: list[tuple[float, float]], slow_factor: float = 3.0, merge_s: float = 0.002) -> list[float]:
    """Lengths (ms) of the windows in which the machine ran slow: runs of chunks ``(start_s, took_s)``
    slower than ``slow_factor`` x the median chunk, merged when less than ``merge_s`` apart."""
    if not chunks:
        return []
    median = statistics.median(took for _, took in chunks)
    windows: list[list[float]] = []
    for start, took in chunks:
        if took > slow_factor * median:
            if windows and start - windows[-1][1] < merge_s:
                windows[-1][1] = start + took
            else:
                windows.append([start, start + took])
    return [1000 * (end - start) for start, end in windows]


def machine_noise(seconds: float = 2.0) -> dict[str, float]:
    """How much this machine slows down on its own, measured while the servers are idle.

    The same tiny CPU task is timed back to back: on a quiet machine every run takes
    the same time; on a shared virtual machine the host sometimes gives it only a
    fraction of a core for tens of milliseconds (both cores at once, idle or not),
    and everything running then (frontend, worker, load generator) goes that much
    slower. Every request in flight during such a stall waits about as long as the
    stall lasts, so stalls of 20-50 ms set the p99 of a server whose p50 is ~10 ms.
    """
    chunks = []
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        _cpu_chunk()
        chunks.append((start, time.perf_counter() - start))
    lengths = stall_windows(chunks)
    stalls = sorted(ms for ms in lengths if ms >= 5.0)  # shorter ones are interrupts and the like
    return {"slowed_pct": 100 * sum(lengths) / 1000 / seconds, "stalls_per_s": len(stalls) / seconds,
            "stall_p90_ms": stalls[int(0.9 * (len(stalls) - 1))] if stalls else 0.0,
            "stall_max_ms": stalls[-1] if stalls else 0.0}


def noise_line(noise: dict[str, float]) -> str:
    return (f"machine noise (servers idle): slowed {noise['slowed_pct']:.1f} % of the time, {noise['stalls_per_s']:.1f} "
            f"stalls >= 5 ms a second (p90 {noise['stall_p90_ms']:.0f} ms, max {noise['stall_max_ms']:.0f} ms)")


class StallProbe:
    """While the load runs: a thread times a ~20 us CPU chunk about every millisecond by its own CPU time.

    ``time.thread_time`` does not advance while the thread waits for a core in this
    machine's scheduler (our own load), but does while the host runs the virtual CPU
    slowly, so a chunk taking ``factor`` x its median CPU time marks a host slow-down.
    It costs ~3 % of one core (only used in the extra attribution run).
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (wall time at the start, CPU seconds taken)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            wall, cpu = time.time(), time.thread_time()
            _cpu_chunk()
            self.samples.append((wall, time.thread_time() - cpu))
            time.sleep(0.001)

    def __enter__(self) -> "StallProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def slow_times(self, factor: float = 3.0) -> list[float]:
        if not self.samples:
            return []
        median = statistics.median(cpu for _, cpu in self.samples)
        return sorted(wall for wall, cpu in self.samples if cpu > factor * median)


def access_log_requests(path: Path, offset: int = 0) -> list[tuple[float, float, int]]:
    """``(start_s, end_s, latency_ms)`` of each POST in TorchServe's access log after byte ``offset``.

    A line reads ``<ISO8601 local time, ms> - /client "POST ..." <status> <latency ms>``, logged
    when the answer went out; the frontend's latency counts from the request's arrival.
    """
    found = []
    with path.open("rb") as f:
        f.seek(offset)
        for line in f.read().decode("utf-8", "replace").splitlines():
            if '"POST ' not in line:
                continue
            try:
                end = datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S,%f").timestamp()  # naive = local, as the JVM's
                latency_ms = int(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
            found.append((end - latency_ms / 1000 - 0.001, end + 0.001, latency_ms))  # +-1 ms: the log's resolution
    return found


def tail_attribution(requests: list[tuple[float, float, int]], slow_times: list[float],
                     control_shift_s: float = 0.37) -> dict[str, float]:
    """Latency percentiles of all requests, and of those not in flight at any of ``slow_times``.

    The control removes requests by the same windows shifted by ``control_shift_s``: if the slow-downs
    cause the tail, removing their requests lowers the p99 and removing the shifted ones does not.
    """
    def kept(times: list[float]) -> list[int]:
        return sorted(ms for start, end, ms in requests
                      if not ((i := bisect_left(times, start)) < len(times) and times[i] <= end))

    def pct(values: list[int], q: float) -> float:
        return float(values[int(q * (len(values) - 1))]) if values else 0.0

    everything = sorted(ms for _, _, ms in requests)
    clean = kept(slow_times)
    control = kept(sorted(t + control_shift_s for t in slow_times))
    n = max(1, len(everything))
    return {"requests": len(everything), "p50_ms": pct(everything, 0.5), "p99_ms": pct(everything, 0.99),
            "outside_stalls_pct": 100 * len(clean) / n, "outside_stalls_p50_ms": pct(clean, 0.5),
            "outside_stalls_p99_ms": pct(clean, 0.99), "control_kept_pct": 100 * len(control) / n,
            "control_p99_ms": pct(control, 0.99)}


def attribute_tail(target: dict[str, Any], body_file: Path, concurrency: int, duration_s: float,
                   tool: str) -> dict[str, float]:
    """One more run of our server (not in the medians) with a StallProbe: how much of the tail is the host's."""
    log = Path(target["access_log"])
    offset = log.stat().st_size if log.exists() else 0
    with StallProbe() as probe:
        row = run_load(target["url"], body_file, target["token"], concurrency, duration_s, tool)
    time.sleep(1.0)  # the access log is written by an asynchronous logger
    slow = probe.slow_times()
    return {**tail_attribution(access_log_requests(log, offset), slow), "probe_samples": len(probe.samples),
            "probe_slow_samples": len(slow), "client_p50_ms": row["p50_ms"], "client_p99_ms": row["p99_ms"]}


def attribution_lines(a: dict[str, float], concurrency: int) -> str:
    return (f"tail attribution, one more run at concurrency {concurrency} with a stall probe (latency as TorchServe's "
            f"access log records it, whole ms):\n"
            f"  all {a['requests']} requests: p50 {a['p50_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms (p99/p50 "
            f"{_ratio(a['p99_ms'], a['p50_ms']):.1f}; the client saw {a['client_p50_ms']:.1f} / {a['client_p99_ms']:.1f} ms)\n"
            f"  the {a['outside_stalls_pct']:.1f} % not in flight while the host slowed the CPU "
            f"({a['probe_slow_samples']} of {a['probe_samples']} probe samples): p50 {a['outside_stalls_p50_ms']:.0f} ms, "
            f"p99 {a['outside_stalls_p99_ms']:.0f} ms (p99/p50 {_ratio(a['outside_stalls_p99_ms'], a['outside_stalls_p50_ms']):.1f})\n"
            f"  control, the same windows 0.37 s later: {a['control_kept_pct']:.1f} % kept, p99 {a['control_p99_ms']:.0f} ms")


# ----------------------------------------------------------------------------- report

def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / max(denominator, 1e-9), 2)


def tail_ratio(row: dict[str, Any]) -> float:
    """p99 / p50 of one load run."""
    return _ratio(row["p99_ms"], row["p50_ms"])


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run; CPU ms/request: the server's main process (TorchServe: the Java frontend; the peer:
    uvicorn's supervisor), its Python worker processes, and the load generator."""
    head = (f"{'server':<40} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>7} {'errors':>6}"
            f" | CPU ms/request: {'main':>6} {'workers':>7} {'proxy':>6} {'load gen':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['server']:<40} {r['concurrency']:>4} {r['req_per_s']:>7.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{tail_ratio(r):>7.1f} {r['non_2xx'] + r['socket_errors']:>6}"
            f" | {'':>15} {r['cpu_ms_frontend']:>6.3f} {r['cpu_ms_workers']:>7.3f} {r.get('cpu_ms_proxy', 0.0):>6.3f}"
            f" {r['cpu_ms_loadgen']:>8.3f}"
        )
    return "\n".join(lines)


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {"req_per_s": round(row["req_per_s"], 1), "p50_ms": round(row["p50_ms"], 3), "p99_ms": round(row["p99_ms"], 3),
            "errors": row["non_2xx"] + row["socket_errors"], "cpu_ms_per_request": {
                "main": round(row["cpu_ms_frontend"], 3), "workers": round(row["cpu_ms_workers"], 3),
                "proxy": round(row.get("cpu_ms_proxy", 0.0), 3),
                "load_generator": round(row["cpu_ms_loadgen"], 3)}}


def main(argv: list[str] | None = None) -> int:
    from serving import archive
    from serving.client import read_token
    from serving.server import (
        DEFAULT_JOB_QUEUE_SIZE,
        DEFAULT_NETTY_CLIENT_THREADS,
        DEFAULT_NETTY_THREADS,
        DEFAULT_VMARGS,
        LocalTorchServe,
        free_port,
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
    parser.add_argument("--skip", nargs="*", default=[], choices=["peer", "nolog", "defaults", "proxied", "inprocess", "attribution"],
                        help="leave parts out (for quick tuning runs)")
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_peer", help=argparse.SUPPRESS)
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
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    base_settings = {"workers": args.workers, "batch_size": args.batch_size, "max_batch_delay_ms": args.max_batch_delay_ms,
                     "netty_threads": args.netty_threads, "netty_client_threads": args.netty_client_threads,
                     "job_queue_size": args.job_queue_size, "vmargs": args.vmargs, "env": {}}
    variants: dict[str, dict[str, Any]] = {}
    for spec in args.variant:
        vname, _, text = spec.partition("=")
        try:
            changes = json.loads(text)
        except ValueError:
            changes = None
        if not vname or not isinstance(changes, dict) or set(changes) - set(VARIANT_KEYS):
            parser.error(f"--variant {spec!r}: expected NAME=JSON with keys from {', '.join(VARIANT_KEYS)}")
        variants[f"variant-{vname}"] = {**base_settings, **changes}
    tool = ("wrk" if shutil.which("wrk") else "python") if args.load_gen == "auto" else args.load_gen
    if tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk), use --load-gen python")

    work = Path(tempfile.mkdtemp(prefix="kfp-mlops-bench-"))
    servers: list[Any] = []
    targets: dict[str, dict[str, Any]] = {}  # name -> url, pid, token, label
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    attribution: dict[str, float] | None = None
    noise_rounds: list[dict[str, float]] = []  # the machine's own slow-downs, probed before each top-concurrency round
    top = max(args.concurrency)
    try:
        print(f"[bench] training a digits model in {work} ...", flush=True)
        png = train_digits(work / "model")
        body_file = work / "digit.png"
        body_file.write_bytes(png)
        mar = archive.build_mar(work / "model", work / "export", MODEL_NAME, "bench-1", workers=args.workers,
                                batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms)
        label = f"torchserve {args.workers}w b{args.batch_size}/{args.max_batch_delay_ms}ms"
        setups = [("ours", mar, work / "requests", label, {})]
        if "nolog" not in args.skip:
            setups.append(("ours-nolog", mar, None, label + ", request log off", {}))
        if "defaults" not in args.skip:
            # TorchServe as it comes (the same hardening and handler): no batching, its own log4j2
            # configuration, Netty threads, job queue and JVM options at their defaults, request log on.
            plain = archive.build_mar(work / "model", work / "export-defaults", MODEL_NAME, "bench-1", workers=1,
                                      batch_size=1, max_batch_delay_ms=100)
            setups.append(("defaults", plain, work / "requests-defaults", "torchserve, TorchServe's defaults",
                           {"log_config": None, "job_queue_size": 100, "vmargs": ""}))
        ours_server = {k: base_settings[k] for k in ("netty_client_threads", "job_queue_size", "vmargs")}
        setups[0][4].update(ours_server)
        if len(setups) > 1 and setups[1][0] == "ours-nolog":
            setups[1][4].update(ours_server)
        for vname, settings in variants.items():
            vmar = archive.build_mar(work / "model", work / f"export-{vname}", MODEL_NAME, "bench-1",
                                     workers=settings["workers"], batch_size=settings["batch_size"],
                                     max_batch_delay_ms=settings["max_batch_delay_ms"])
            changed = {k: v for k, v in settings.items() if v != base_settings[k]}
            setups.append((vname, vmar, work / f"requests-{vname}", f"{vname[8:]}: {json.dumps(changed)}"[:40],
                           {k: settings[k] for k in ("netty_threads", "netty_client_threads", "job_queue_size", "vmargs",
                                                     "env")}))
        for name, archive_file, log_dir, server_label, extra in setups:
            extra = {"netty_threads": args.netty_threads, **extra}
            env = extra.pop("env", {})
            server = LocalTorchServe(work / f"home-{name}")
            servers.append(server)
            saved_env = dict(os.environ)
            os.environ.update(env)  # the server's processes inherit it (LocalTorchServe.start copies os.environ)
            try:
                record = server.start(archive_file, MODEL_NAME, inference_port=free_port(), management_port=free_port(),
                                      metrics_port=free_port(), workers=args.workers, request_log_dir=log_dir, **extra)
            finally:
                os.environ.clear()
                os.environ.update(saved_env)
            # Each server is measured directly: TorchServe's own loopback port, with its inference key.
            targets[name] = {"url": record["torchserve_endpoint"], "pid": record["pid"],
                             "metrics": record["metrics_endpoint"], "record": record,
                             "token": read_token(record["key_file"], "inference"),
                             "label": server_label, "access_log": server.logs / "access_log.log"}
        if "proxied" not in args.skip:
            # What clients call: the public endpoint, the auth proxy that LocalTorchServe (and each
            # serving pod on Kubernetes) runs in front of TorchServe. Same TorchServe as "ours".
            ours = targets["ours"]["record"]
            targets["ours-proxied"] = {"url": ours["endpoint"], "pid": ours["pid"], "proxy_pid": ours["proxy_pid"],
                                       "token": read_token(ours["token_file"]), "label": label + ", behind auth proxy"}
        if "peer" not in args.skip:
            peer = PeerServer(work / "model", "peer-token", args.peer_workers, work / "peer-requests")
            servers.append(peer)
            targets["peer"] = {"url": peer.url, "pid": peer.pid, "token": peer.token,
                               "label": f"fastapi/uvicorn {args.peer_workers}w"}

        def run(name: str, c: int) -> None:
            t = targets[name]
            row = measure(t["label"], t["url"], t["pid"], body_file, t["token"], c, args.duration, args.warmup, tool,
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
                for name in ("ours", "peer"):
                    if name in targets:
                        run(name, c)
        # The top concurrency in rounds, the servers interleaved: load from elsewhere on the machine
        # then hits every server alike, and the median of the rounds is reported.
        before = prometheus_sums(targets["ours"]["metrics"])
        for _ in range(args.rounds):
            noise_rounds.append(machine_noise(args.noise_probe))
            print(noise_line(noise_rounds[-1]), flush=True)
            for name in ("ours", *variants, "ours-proxied", "ours-nolog", "defaults", "peer"):
                if name in targets:
                    run(name, top)
        after = prometheus_sums(targets["ours"]["metrics"])
        if "attribution" not in args.skip:
            attribution = attribute_tail(targets["ours"], body_file, top, args.duration, tool)
        for server in servers:
            server.stop() if isinstance(server, _ServerProcess) else server.stop(quiet=True)
        servers.clear()
        ceiling = {} if "inprocess" in args.skip else in_process(work / "model", png)
        log_lines = sum(len(f.read_text().splitlines()) for f in (work / "requests").glob("*.jsonl"))
    finally:
        for server in servers:
            try:
                server.stop() if isinstance(server, _ServerProcess) else server.stop(quiet=True)
            except Exception as err:  # noqa: BLE001 - keep stopping the others
                print(f"[bench] could not stop {server}: {err}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    def median_row(name: str, c: int) -> dict[str, Any] | None:
        rows = sorted(runs.get((name, c), []), key=lambda r: r["req_per_s"])
        return rows[len(rows) // 2] if rows else None  # the median run (upper median for an even count)

    summary_rows = [r for c in sorted(args.concurrency) for name in ("ours", *variants, "ours-proxied", "ours-nolog", "defaults", "peer")
                    if (r := median_row(name, c)) is not None]
    print(f"\nmedians ({args.rounds} interleaved rounds at concurrency {top}, {args.duration:.0f} s each; "
          f"load generator: {tool}, one process):")
    print(table(summary_rows))
    ours_top = median_row("ours", top)
    n = max(1.0, after.get("ts_inference_requests_total", 0) - before.get("ts_inference_requests_total", 0))
    queue_ms = (after.get("ts_queue_latency_microseconds", 0) - before.get("ts_queue_latency_microseconds", 0)) / n / 1000
    backend_ms = (after.get("ts_inference_latency_microseconds", 0) - before.get("ts_inference_latency_microseconds", 0)) / n / 1000
    if ceiling:
        print(f"\nin-process, one thread: forward {ceiling['forward_b1_per_s']:.0f}/s at batch 1, "
              f"{ceiling['forward_b8_images_per_s']:.0f} images/s at batch 8; whole handler "
              f"{ceiling['handler_b1_per_s']:.0f} requests/s at batch 1, {ceiling['handler_b8_requests_per_s']:.0f} at batch 8 "
              f"(decode {ceiling['decode_us']:.0f} us, model {ceiling['model_us']:.0f} us, answer {ceiling['answer_us']:.0f} us)")
    print(f"torchserve at concurrency {top}: mean {queue_ms:.2f} ms queued in the frontend, "
          f"{backend_ms:.2f} ms in the backend (batch wait + worker)")
    noise = {k: round(statistics.median(r[k] for r in noise_rounds), 2) for k in noise_rounds[0]}
    print(noise_line(noise).replace("machine noise", "machine noise, median of the rounds"))
    if attribution:
        print(attribution_lines(attribution, top))
    if ceiling:
        print(f"the work alone, in process: batches of 32 requests back to back, p50 {ceiling['handler_b32_p50_ms']:.2f} ms, "
              f"p99 {ceiling['handler_b32_p99_ms']:.2f} ms (p99/p50 "
              f"{ceiling['handler_b32_p99_ms'] / ceiling['handler_b32_p50_ms']:.1f}: the machine's noise floor for this work)")
    result: dict[str, Any] = {
        f"throughput_c{top}": round(ours_top["req_per_s"], 1),
        f"p50_ms_c{top}": round(ours_top["p50_ms"], 3),
        f"p99_ms_c{top}": round(ours_top["p99_ms"], 3),
        "p99_over_p50": tail_ratio(ours_top),
        "load_generator": tool,
        "settings": {**base_settings, "peer_workers": args.peer_workers, "duration_s": args.duration, "rounds": args.rounds},
        "ours": {str(c): _summary(r) for c in sorted(args.concurrency) if (r := median_row("ours", c))},
        "ours_rounds_c_top": [round(r["req_per_s"], 1) for r in runs[("ours", top)]],
        "frontend_queue_ms_mean": round(queue_ms, 3),
        "backend_ms_mean": round(backend_ms, 3),
        "request_log_lines": log_lines,
        "machine_noise": {**noise, "rounds_slowed_pct": [round(r["slowed_pct"], 2) for r in noise_rounds],
                          "rounds_stalls_per_s": [round(r["stalls_per_s"], 2) for r in noise_rounds]},
        "ours_rounds_p99_over_p50": [tail_ratio(r) for r in runs[("ours", top)]],
    }
    if attribution:
        result["tail_attribution"] = {k: round(v, 2) for k, v in attribution.items()}
        result["server_p99_over_p50_outside_host_stalls"] = _ratio(attribution["outside_stalls_p99_ms"],
                                                                   attribution["outside_stalls_p50_ms"])
    if variants:
        ours_rounds = runs[("ours", top)]
        result["variants"] = {}
        for vname, settings in variants.items():
            rows = runs[(vname, top)]
            row = median_row(vname, top)
            result["variants"][vname[8:]] = {
                "settings": {k: v for k, v in settings.items() if v != base_settings[k]}, **_summary(row),
                "p99_over_p50": tail_ratio(row),
                # round by round against the shipped server measured just before it
                "rounds_p99_over_p50": [tail_ratio(r) for r in rows],
                "shipped_rounds_p99_over_p50": [tail_ratio(r) for r in ours_rounds],
                "rounds_req_per_s": [round(r["req_per_s"], 1) for r in rows],
            }
    if "peer" in targets:
        peer_top = median_row("peer", top)
        result[f"peer_throughput_c{top}"] = round(peer_top["req_per_s"], 1)
        result["ratio_vs_peer"] = _ratio(ours_top["req_per_s"], peer_top["req_per_s"])
        result["peer_p99_over_p50"] = tail_ratio(peer_top)
        result["peer"] = {str(c): _summary(r) for c in sorted(args.concurrency) if (r := median_row("peer", c))}
        result["peer_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("peer", top)]]
    if "ours-proxied" in targets:
        proxied = median_row("ours-proxied", top)
        result[f"throughput_c{top}_proxied"] = round(proxied["req_per_s"], 1)
        result["p99_over_p50_proxied"] = tail_ratio(proxied)
        result["proxied"] = {str(top): _summary(proxied)}
        result["proxied_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("ours-proxied", top)]]
        if "peer" in targets:
            result["ratio_vs_peer_proxied"] = _ratio(proxied["req_per_s"], median_row("peer", top)["req_per_s"])
    if "defaults" in targets:
        plain = median_row("defaults", top)
        result[f"torchserve_defaults_throughput_c{top}"] = round(plain["req_per_s"], 1)
        result["torchserve_defaults"] = {str(top): _summary(plain)}
    if "ours-nolog" in targets:
        off = median_row("ours-nolog", top)
        result[f"throughput_c{top}_log_off"] = round(off["req_per_s"], 1)
        result[f"p99_ms_c{top}_log_off"] = round(off["p99_ms"], 3)
        result["logging_cost_pct"] = round(100 * (off["req_per_s"] - ours_top["req_per_s"]) / off["req_per_s"], 1)
        result["log_off_rounds_c_top"] = [round(r["req_per_s"], 1) for r in runs[("ours-nolog", top)]]
    if ceiling:
        result["inprocess_per_s"] = round(ceiling["forward_b1_per_s"], 1)
        result["inprocess"] = {k: round(v, 2) for k, v in ceiling.items()}
        result["inprocess_b32_p99_over_p50"] = round(ceiling["handler_b32_p99_ms"] / ceiling["handler_b32_p50_ms"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
