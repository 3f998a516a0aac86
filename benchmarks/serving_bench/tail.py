"""Where the latency tail comes from: the machine's own slow-downs, probed while the servers are idle and,
during one more run, next to TorchServe's access log."""

from __future__ import annotations

import statistics
import threading
import time
from bisect import bisect_left
from datetime import datetime
from pathlib import Path
from typing import Any

from .load import run_load


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
