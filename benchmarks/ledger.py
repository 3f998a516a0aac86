"""The release ledger's costs: appends, a fresh reader loading every record, and ``mlops releases list``'s view,
on a local directory and on an S3 API (moto's server on loopback, started here).

Ours: the view reads a ``pinned()`` ledger (one listing for the whole command; on S3 the records are fetched in
parallel). Baseline: the same view with a listing per read, as a plain ``Ledger`` does outside ``pinned()``.
Prints a table, then one JSON line.

    .venv/bin/python benchmarks/ledger.py [--records 300]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.core.ledger import Ledger  # noqa: E402
from pipelines.releases import release_rows  # noqa: E402


def fill(base: str, records: int) -> list[float]:
    """``records`` appends (a release, then two drift windows after it, and so on); each one's seconds."""
    ledger, seconds, released = Ledger(base), [], None
    for i in range(records):
        started = time.perf_counter()
        if i % 3 == 0:
            released = ledger.append("released", {"model_name": "digits", "model_version": f"{i:064x}",
                                                  "target": "local", "endpoint": "http://x", "strategy": "replace"})
        else:
            ledger.append("drift", {"model_version": f"{i - i % 3:064x}", "window": {"n": i},
                                    "drift_detected": False}, parents=[released])
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(base: str, records: int) -> dict:
    appends = fill(base, records)
    started = time.perf_counter()
    loaded = len(Ledger(base).records())
    read_s = time.perf_counter() - started
    fresh = Ledger(base)
    started = time.perf_counter()
    with fresh.pinned():
        rows = release_rows(fresh)
    ours_s = time.perf_counter() - started
    baseline = Ledger(base)
    baseline.records()  # the same records already loaded: only the listings differ
    started = time.perf_counter()
    assert release_rows(baseline) == rows
    baseline_s = time.perf_counter() - started
    return {"records": loaded, "versions": len(rows), "append_ms_median": round(statistics.median(appends) * 1e3, 2),
            "read_all_s": round(read_s, 3), "list_s": round(ours_s, 3), "list_baseline_s": round(baseline_s, 3),
            "speedup": round(baseline_s / ours_s, 1)}


def moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{endpoint}/moto-api/", timeout=1):
                return process, endpoint
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto's server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["local"] = measure(str(Path(tmp) / "ledger"), args.records)
    process, endpoint = moto()
    try:
        os.environ.update({"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_REGION": "us-east-1", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                           "AWS_CONFIG_FILE": os.devnull, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
        from components.core.blobs import Storage

        bucket = f"ledger-bench-{uuid.uuid4().hex[:8]}"
        Storage().client.create_bucket(Bucket=bucket)
        results["s3"] = measure(f"s3://{bucket}/ledger", args.records)
    finally:
        process.terminate()
        process.wait(10)
    print(f"{'where':<6} {'records':>7} {'append ms':>9} {'read all s':>10} {'list s':>7} {'baseline s':>10} {'x':>6}")
    for where, r in results.items():
        print(f"{where:<6} {r['records']:>7} {r['append_ms_median']:>9} {r['read_all_s']:>10} {r['list_s']:>7} "
              f"{r['list_baseline_s']:>10} {r['speedup']:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
