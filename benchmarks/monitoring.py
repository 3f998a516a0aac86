"""Monitoring benchmark: our drift monitor against raw Evidently on the same windows, up to one million requests.

    python benchmarks/monitoring.py              # ~5-10 minutes on 2 cores; a table, then one JSON line
    python benchmarks/monitoring.py --sizes 10000 100000 --evidently-budget 60

What runs:

1. A digits classifier trained here for a second (sklearn digits), and the "production
   distribution": uniform over all 1,797 digit images. The training-time references are
   i.i.d. draws from it (1,100 rows of image features as ingest writes them, 300 rows of the
   model reference as finetune writes them), so a clean window is exactly the null
   hypothesis. The shifted window draws from the same images inverted.
2. For each size N, a request log with a clean hour and, two hours later, a shifted hour of
   N requests each, written as ``serving/request_log.py`` writes it: compact JSON lines
   (features, prediction, confidence, embedding projection) in 16 MiB rotated files named
   ``requests-<host>-<pid>-<start>-<seq>.jsonl``.
3. Ours: ``components.monitor.monitor.monitor`` on each hour, the log read from disk (page cache
   warm: it was just written), in this process (imports done), plus once at the largest
   size as a fresh ``mlops monitor --json`` process (imports included).
4. Raw Evidently: ``Report([DataDriftPreset()])`` with its defaults on the same windows:
   - the feature table (the 8 image features), end to end like ours: the window's log files
     read with pyarrow's JSON reader (multithreaded; the fastest reader at hand: 14 s for 1M
     lines where ``json`` per line takes ~60 s; pandas if pyarrow is missing), filtered to the
     window and version, then
     Evidently. Read and compute times are reported apart;
   - the raw pixel table (64 columns; pixels are not in the log, so held in memory: compute
     only). Sizes whose predicted time (a line through the two largest measured sizes;
     Evidently sorts, so the real time is somewhat higher) exceeds ``--evidently-budget``
     seconds are extrapolated and labelled so.

The verdicts compared: ours ``drift_detected`` against Evidently's dataset drift (at least
half of the columns drifted) for every window where Evidently ran.
The machine is shared: timings vary +-20 % or more between runs; the load average is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, MODEL_REFERENCE_FILE  # noqa: E402
from components.monitor.sampling import DEFAULT_ALPHA, DEFAULT_EPSILON, dkw_sample_size  # noqa: E402

MODEL_VERSION = "bench-1"
DAY = datetime(2026, 1, 1, tzinfo=timezone.utc)
FILE_BYTES = 16 * 1024 * 1024  # serving/request_log.py's default rotation size


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ---------------------------------------------------------------------------
# The data: a model, the production distribution, its references


def train_model(images: np.ndarray, labels: np.ndarray):
    import torch

    from components.core.models import Classifier, EncoderSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(width=8, embed_dim=16), num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def setup(work: Path) -> dict:
    """Pools of served rows (clean and inverted digits) with their log-line bodies, and the references."""
    from sklearn.datasets import load_digits

    from components.core.features import model_reference_features
    from components.core.models import save_classifier

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    model = train_model(images[:1000], digits.target[:1000].astype(np.int64))
    pools = {}
    for kind, pool_images in (("clean", images), ("shifted", 1.0 - images)):
        table = model_reference_features(model, pool_images)  # what the handler logs per image
        bodies = []
        for row in table.to_dict(orient="records"):
            record = {"model_version": MODEL_VERSION, "source": "client", "predicted_class": int(row["predicted_class"]),
                      "predicted_label": str(int(row["predicted_class"])), "confidence": float(row["confidence"]),
                      **{c: float(row[c]) for c in FEATURE_COLUMNS}, **{c: float(row[c]) for c in EMBEDDING_COLUMNS}}
            bodies.append(json.dumps(record, separators=(",", ":"))[1:])  # everything after the opening brace
        pools[kind] = {"table": table, "pixels": pool_images.reshape(len(pool_images), -1), "bodies": bodies}
    rng = np.random.default_rng(0)
    ref_rows = rng.integers(0, len(images), 1100)
    model_rows = rng.integers(0, len(images), 300)
    clean = pools["clean"]["table"]
    reference = clean.iloc[ref_rows][FEATURE_COLUMNS].reset_index(drop=True)
    reference.to_csv(work / "reference.csv", index=False)
    clean.iloc[model_rows].reset_index(drop=True).to_csv(work / MODEL_REFERENCE_FILE, index=False)
    save_classifier(model, work / "model", {"class_names": [str(i) for i in range(10)], "model_version": MODEL_VERSION})
    return {"pools": pools, "reference": reference, "reference_pixels": pools["clean"]["pixels"][ref_rows]}


def write_window(log_dir: Path, pool: dict, n: int, start: datetime, seed: int) -> np.ndarray:
    """n requests spread over the hour from ``start``, in rotated files; returns the pool rows drawn."""
    rows = np.random.default_rng(seed).integers(0, len(pool["bodies"]), n)
    offsets = (np.arange(n) * (3_600_000 / n)).astype("int64").astype("timedelta64[ms]")
    stamps = (np.datetime64(start.replace(tzinfo=None), "ms") + offsets).astype(str)
    bodies = pool["bodies"]
    seq, chunk, size, first = 0, [], 0, None
    for i in range(n):
        line = f'{{"timestamp":"{stamps[i]}+00:00",{bodies[rows[i]]}\n'
        first = first or stamps[i]
        chunk.append(line)
        size += len(line)
        if size >= FILE_BYTES or i == n - 1:
            seq += 1
            name_stamp = datetime.fromisoformat(first).strftime("%Y%m%dT%H%M%SZ")
            (log_dir / f"requests-bench-1-{name_stamp}-{seq:04d}.jsonl").write_text("".join(chunk))
            chunk, size, first = [], 0, None
    return rows


# ---------------------------------------------------------------------------
# The two monitors


def ours(work: Path, log_dir: Path, since: datetime) -> tuple[float, dict]:
    from components.monitor.monitor import monitor
    from pipelines.config import MonitorConfig

    t0 = time.perf_counter()
    verdict = monitor(work / "reference.csv", log_dir, work / "out", MonitorConfig(), since=since,
                      until=since + timedelta(hours=1), model_version=MODEL_VERSION,
                      model_reference_csv=work / MODEL_REFERENCE_FILE)
    return time.perf_counter() - t0, verdict


def ours_cold_cli(work: Path, log_dir: Path, since: datetime) -> float:
    command = [sys.executable, "-m", "pipelines.cli", "monitor", "--json", "--log-dir", str(log_dir),
               "--reference", str(work / "reference.csv"), "--model-reference", str(work / MODEL_REFERENCE_FILE),
               "--model-version", MODEL_VERSION, "--since", since.isoformat(),
               "--until", (since + timedelta(hours=1)).isoformat(), "--out", str(work / "cli-out")]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DO_NOT_TRACK": "1"})
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 2):
        raise RuntimeError(f"mlops monitor failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def raw_read(log_dir: Path, since: datetime) -> tuple[float, pd.DataFrame]:
    """The baseline's reading: the window's files (same name-based choice as ours) with pyarrow, then filtered."""
    from components.monitor.sampling import list_log_files

    until = since + timedelta(hours=1)
    files = list_log_files(log_dir, since, until)
    t0 = time.perf_counter()
    try:
        import pyarrow as pa
        import pyarrow.json as pj

        table = pa.concat_tables([pj.read_json(f) for f in files])
        frame = table.select(["timestamp", "model_version", *FEATURE_COLUMNS]).to_pandas()
    except ImportError:  # pyarrow is optional here: pandas reads the same lines, slower
        frame = pd.concat([pd.read_json(f, lines=True, dtype=False) for f in files], ignore_index=True)
    stamps = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    frame = frame[(stamps >= since) & (stamps < until) & (frame["model_version"] == MODEL_VERSION)]
    return time.perf_counter() - t0, frame[FEATURE_COLUMNS].reset_index(drop=True)


def raw_evidently(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[float, bool, float]:
    """Evidently as documented: DataDriftPreset with its defaults; dataset drift = share of drifted columns >= 0.5."""
    from evidently import Dataset, Report
    from evidently.presets import DataDriftPreset

    t0 = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset()]).run(Dataset.from_pandas(current), Dataset.from_pandas(reference))
    seconds = time.perf_counter() - t0
    share = next(float(m["value"]["share"]) for m in snapshot.dict()["metrics"]
                 if m["config"]["type"].endswith(":DriftedColumnsCount"))
    return seconds, share >= 0.5, share


# ---------------------------------------------------------------------------


def summarize(rows: list[dict], cold_cli_s: float, agree: bool, load_average: float) -> dict:
    """The JSON line. Speedups are per window (the same window, measured minutes apart), the smallest counts."""
    largest = max(r["rows"] for r in rows)
    at_largest = [r for r in rows if r["rows"] == largest]
    ours = max(r["ours_s"] for r in at_largest)

    def speedup(baseline) -> float:
        return round(min(baseline(r) / r["ours_s"] for r in at_largest), 1)

    return {
        "seconds_1m": round(ours, 2) if largest == 1_000_000 else None,
        "speedup_vs_evidently": speedup(lambda r: r["ev_read_s"] + r["ev_features_s"]),
        "verdicts_agree": bool(agree),
        "verdicts_compared": sum(r[k] is not None for r in rows for k in ("ev_features_drift", "ev_pixels_drift")),
        "largest_window": largest,
        "seconds_largest": round(ours, 2),
        "seconds_largest_cold_cli": round(cold_cli_s, 2),
        "evidently_features_read_plus_run_seconds_largest": round(max(r["ev_read_s"] + r["ev_features_s"] for r in at_largest), 1),
        "evidently_features_largest_extrapolated": any(r["ev_features_extrapolated"] for r in at_largest),
        "speedup_vs_evidently_run_only": speedup(lambda r: r["ev_features_s"]),
        "evidently_pixels_seconds_largest": round(max(r["ev_pixels_s"] for r in at_largest), 1),
        "evidently_pixels_largest_extrapolated": any(r["ev_pixels_extrapolated"] for r in at_largest),
        "speedup_vs_evidently_pixels": speedup(lambda r: r["ev_pixels_s"]),
        "sample_rows": dkw_sample_size(DEFAULT_EPSILON, DEFAULT_ALPHA),
        "epsilon": DEFAULT_EPSILON,
        "alpha": DEFAULT_ALPHA,
        "rows": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(load_average, 2),
    }


def predict(measured: dict[int, float], n: int) -> float:
    """Seconds at n rows: a line through the two largest measured sizes (fixed cost + cost per row), 0 if none."""
    if not measured:
        return 0.0
    sizes = sorted(measured)
    if len(sizes) == 1:
        return measured[sizes[0]] * n / sizes[0]
    (n1, t1), (n2, t2) = ((k, measured[k]) for k in sizes[-2:])
    return t2 + max((t2 - t1) / (n2 - n1), 0.0) * (n - n2)


def fmt_s(value: float | None, extrapolated: bool = False) -> str:
    if value is None:
        return "-"
    return f"~{value:.0f}*" if extrapolated else f"{value:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--evidently-budget", type=float, default=240.0,
                        help="run raw Evidently at a size only if its predicted time is below this many seconds")
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kfp-mlops-bench-monitor-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(work, sizes, args.evidently_budget)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, sizes: list[int], budget: float) -> int:
    log(f"setup in {work}")
    data = setup(work)
    pixel_names = [f"px_{i}" for i in range(64)]
    ref_features = data["reference"]
    ref_pixels = pd.DataFrame(data["reference_pixels"], columns=pixel_names)
    rows, evidently_times, read_times = [], {"features": {}, "pixels": {}}, {}
    windows = {"clean": DAY.replace(hour=10), "shifted": DAY.replace(hour=13)}
    # Warm up both (lazy imports inside Evidently and scipy, first-call caches): steady state is compared;
    # a fresh process is measured separately (the cold CLI run).
    (work / "warm").mkdir()
    write_window(work / "warm", data["pools"]["clean"], 500, windows["clean"], seed=99)
    ours(work, work / "warm", windows["clean"])
    raw_read(work / "warm", windows["clean"])
    raw_evidently(ref_features, ref_features.iloc[:500])
    raw_evidently(ref_pixels, ref_pixels.iloc[:500])
    shutil.rmtree(work / "warm")
    # A second, small pixel-table size, so that extrapolating it is a fit through two points, not one.
    small = data["pools"]["clean"]["pixels"][np.random.default_rng(7).integers(0, 1797, 2000)]
    evidently_times["pixels"][2000] = raw_evidently(ref_pixels, pd.DataFrame(small, columns=pixel_names))[0]
    agree = True
    cold = None
    for n in sizes:
        log_dir = work / f"log-{n}"
        log_dir.mkdir()
        t0 = time.perf_counter()
        drawn = {kind: write_window(log_dir, data["pools"][kind], n, start, seed=n + i)
                 for i, (kind, start) in enumerate(windows.items())}
        log(f"{n:,} requests per window written ({sum(p.stat().st_size for p in log_dir.iterdir()) / 1e6:.0f} MB "
            f"for both) in {time.perf_counter() - t0:.0f} s")
        for kind, start in windows.items():
            seconds, verdict = ours(work, log_dir, start)
            row = {"rows": n, "window": kind, "ours_s": seconds, "ours_drift": verdict["drift_detected"],
                   "checked": verdict["current_rows"], "sampled": verdict["sampling"]["sampled"]}
            pool = data["pools"][kind]
            for table, ref in (("features", ref_features), ("pixels", ref_pixels)):
                measured = evidently_times[table]
                predicted = predict(measured, n)
                if predicted <= budget:
                    if table == "features":
                        read_s, current = raw_read(log_dir, start)
                        assert len(current) == n, f"the baseline read {len(current)} rows of {n}"
                        read_times[n] = max(read_times.get(n, 0.0), read_s)
                        row["ev_read_s"] = read_s
                    else:
                        current = pd.DataFrame(pool["pixels"][drawn[kind]], columns=pixel_names)
                    ev_s, ev_drift, _ = raw_evidently(ref, current)
                    del current
                    measured[n] = max(measured.get(n, 0.0), ev_s)
                    row.update({f"ev_{table}_s": ev_s, f"ev_{table}_drift": ev_drift, f"ev_{table}_extrapolated": False})
                    agree &= ev_drift == verdict["drift_detected"]
                else:
                    row.update({f"ev_{table}_s": predicted, f"ev_{table}_drift": None, f"ev_{table}_extrapolated": True})
                    if table == "features":
                        row["ev_read_s"] = predict(read_times, n)
            rows.append(row)
            log(f"{n:,} {kind}: ours {seconds:.1f} s ({'drift' if row['ours_drift'] else 'ok'}); evidently features "
                f"read {fmt_s(row['ev_read_s'], row['ev_features_extrapolated'])} s + "
                f"{fmt_s(row['ev_features_s'], row['ev_features_extrapolated'])} s, pixels "
                f"{fmt_s(row['ev_pixels_s'], row['ev_pixels_extrapolated'])} s")
        if n == sizes[-1]:
            cold = ours_cold_cli(work, log_dir, windows["clean"])
        shutil.rmtree(log_dir)

    largest = sizes[-1]

    def verdict_text(x):
        return "-" if x is None else ("drift" if x else "ok")

    print()
    header = (f"{'requests':>10} {'window':>8} {'ours s':>7} {'checked':>8} {'Evidently features: read + run s':>33} "
              f"{'Evidently pixels s':>19} {'verdict ours / features / pixels':>34}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ex = r["ev_features_extrapolated"]
        features = f"{fmt_s(r['ev_read_s'], ex)} + {fmt_s(r['ev_features_s'], ex)}"
        verdicts = " / ".join(verdict_text(r[k]) for k in ("ours_drift", "ev_features_drift", "ev_pixels_drift"))
        print(f"{r['rows']:>10,} {r['window']:>8} {r['ours_s']:>7.1f} {r['checked']:>8,} {features:>33} "
              f"{fmt_s(r['ev_pixels_s'], r['ev_pixels_extrapolated']):>19} {verdicts:>34}")
    print("\n* extrapolated: a line through the two largest sizes Evidently ran at (it sorts each column, so in fact "
          "somewhat more).")
    print(f"Ours: the window read from its log files + sampled (n = {dkw_sample_size(DEFAULT_EPSILON, DEFAULT_ALPHA):,}, "
          f"DKW eps {DEFAULT_EPSILON}, alpha {DEFAULT_ALPHA}) + Evidently DataDriftPreset on 10 columns + the embedding "
          f"test + HTML, JSON and .prom written; imports done. A fresh `mlops monitor --json` process at {largest:,} "
          f"took {cold:.1f} s (interpreter and imports included).")
    print("Evidently features: the same log files read with pyarrow, then DataDriftPreset() on the 8 image features. "
          "Evidently pixels: DataDriftPreset() on the 64 pixel columns, in memory (compute only).")
    load = os.getloadavg()
    print(f"Machine: {os.cpu_count()} cores, load average {load[0]:.1f} (shared with other jobs: timings vary).")

    result = summarize(rows, cold, agree, load[0])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
