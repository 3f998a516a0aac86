"""Monitor step: is production traffic still like the data the model was trained on?

Compares the per-image features of served requests (the serving request log) with
the training-time reference (``reference.csv`` written by ingest) using Evidently's
``DataDriftPreset``, and writes a verdict JSON plus an HTML report.

Two layers, because Evidently handles bad windows poorly on its own:

1. ``check_window`` guards the window first: an empty or tiny window gives
   ``insufficient_data``; missing, retyped (e.g. strings) or mostly-NaN feature columns
   give ``schema_drift`` naming the columns. Evidently is not called then.
2. ``drift_report`` runs the per-column drift tests and reads the per-column result
   (method, score, drifted flag) and the drifted share back out of the snapshot.

Why the drift test is set explicitly to Kolmogorov-Smirnov (p < 0.05): Evidently's
default for a numerical column depends on the reference size. Above 1000 reference rows
(ours has ~1100) it switches to the normed Wasserstein distance with a fixed 0.1
threshold, which ignores the window size. Measured on sklearn digits (1100 reference
rows, i.i.d. windows, 200 repeats), the Wasserstein default called a CLEAN window
drifted (>= half of the 8 features) in 100% of 30-row windows, 82% of 100-row windows
and 6% of 300-row windows. KS is a significance test, so it allows for the window
size: 0% of clean windows were called drifted at 30/100/300 rows. About 20% of clean
windows still show one feature with p < 0.05, which is the expected 8 x 5% and is why
one drifted feature alone does not make a window drifted. Inverted, noised (sigma 0.1
and 0.3), 30-degree-rotated and uniform-noise images were called drifted in 100% of
100/200/500-row windows. Right-angle rotations keep every feature except the centre of
mass, so they move only 2 of 8 features. KS names those two, but calling the whole
window drifted then needs ``drift_share <= 0.25``.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as real types.

import html
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.features import FEATURE_COLUMNS
from components.models import atomic_write_json

# Evidently phones home unless told not to; set before it is imported (lazily, below).
os.environ.setdefault("DO_NOT_TRACK", "1")

DRIFT_METHOD = "ks"  # see the module docstring for why not Evidently's size-dependent default
DRIFT_THRESHOLD = 0.05  # KS p-value below which a feature counts as drifted
MOSTLY_NAN = 0.5  # a feature NaN in more than this share of the window is schema drift
EXCLUDED_SOURCES = ("smoke-test",)  # request-log sources that are not traffic (see components.deploy)
REPLAY_SOURCE = "replay"  # the X-Request-Source of the monitor's own replayed requests
DEFAULT_SOURCE = "client"  # what the handler logs when a request names no source
REPORT_FILE = "drift_report.html"
VERDICT_FILE = "verdict.json"

STATUSES = ("ok", "drift", "insufficient_data", "schema_drift")


@dataclass
class Verdict:
    """The monitor's answer for one window; ``to_dict()`` is what verdict.json holds."""

    status: str  # one of STATUSES
    message: str  # one human sentence saying what was found and what to do
    reference_rows: int
    current_rows: int
    drift_detected: bool = False  # the statistical test ran and called the window drifted
    drifted_features: list[str] = field(default_factory=list)
    drift_share: float = 0.0  # observed share of drifted features
    drift_share_threshold: float = 0.5
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    nan_share: dict[str, dict[str, float]] = field(default_factory=dict)  # col -> {"reference", "current"}
    schema_problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; expected one of {STATUSES}")

    @property
    def alert(self) -> bool:
        """Whether someone should look: statistical drift or a broken schema."""
        return self.status in ("drift", "schema_drift")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alert": self.alert}


# ---------------------------------------------------------------------------
# Reading the serving request log


def _parse_utc(value: Any) -> datetime:
    """ISO-8601 string (``Z`` allowed) or datetime -> aware UTC datetime; naive means UTC."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def read_request_log(log_dir: str | Path, since: datetime | None = None,
                     until: datetime | None = None) -> pd.DataFrame:
    """Read every ``*.jsonl`` file in ``log_dir`` into one DataFrame, keeping ``since <= timestamp < until``.

    Tolerant of a live log: a last line without a newline that does not parse is a request
    still being written (skipped, counted in ``df.attrs["partial_lines"]``); any other line
    that is not a JSON object with a valid ``timestamp`` is skipped and counted in
    ``df.attrs["bad_lines"]``. Naive ``since``/``until`` are taken as UTC. The ``timestamp``
    column comes back as UTC datetimes, rows sorted by time.
    """
    log_path = Path(log_dir)
    if not log_path.is_dir():
        raise FileNotFoundError(
            f"request log directory {log_path} does not exist: check 'request_log_dir' in the deployment "
            "record, and that the server has handled at least one request"
        )
    lo = _parse_utc(since) if since is not None else None
    hi = _parse_utc(until) if until is not None else None
    rows: list[dict[str, Any]] = []
    bad_lines = partial_lines = 0
    files = sorted(log_path.glob("*.jsonl"))
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            is_unterminated_last = i == len(lines) - 1 and not line.endswith("\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                record["timestamp"] = _parse_utc(record["timestamp"])
            except (ValueError, KeyError, TypeError):
                # A half-written last line is normal while the server is logging; anything else is damage.
                if is_unterminated_last:
                    partial_lines += 1
                else:
                    bad_lines += 1
                continue
            if (lo is not None and record["timestamp"] < lo) or (hi is not None and record["timestamp"] >= hi):
                continue
            rows.append(record)
    if bad_lines:
        print(f"[monitor] skipped {bad_lines} unreadable line(s) in {log_path}", flush=True)
    df = pd.DataFrame.from_records(rows) if rows else pd.DataFrame(columns=["timestamp", *FEATURE_COLUMNS])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    df.attrs.update(files=len(files), bad_lines=bad_lines, partial_lines=partial_lines)
    return df


# ---------------------------------------------------------------------------
# Guards: is the window fit for a drift test at all?


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _nan_share(series: pd.Series) -> float:
    if len(series) == 0:
        return 0.0
    values = pd.to_numeric(series, errors="coerce")  # only called on numeric columns
    return float((~np.isfinite(values.to_numpy(dtype="float64"))).mean())


def _check_reference(reference: pd.DataFrame) -> None:
    """A broken reference is a broken training artifact, not a property of the traffic: raise."""
    missing = [c for c in FEATURE_COLUMNS if c not in reference.columns]
    if missing:
        raise ValueError(f"the reference lacks feature columns {missing}; re-run ingest to rebuild reference.csv")
    retyped = [c for c in FEATURE_COLUMNS if not _is_numeric(reference[c])]
    if retyped:
        raise ValueError(f"reference feature columns {retyped} are not numeric; re-run ingest to rebuild reference.csv")
    if len(reference) == 0:
        raise ValueError("the reference has no rows; re-run ingest to rebuild reference.csv")


def _example(series: pd.Series) -> str:
    """A short example of an offending (non-numeric) value, for the message."""
    bad = series[series.notna() & pd.to_numeric(series, errors="coerce").isna()]
    return repr(bad.iloc[0])[:40] if len(bad) else repr(series.dropna().iloc[0])[:40] if series.notna().any() else "None"


def check_window(reference: pd.DataFrame, current: pd.DataFrame, min_rows: int = 30) -> Verdict | None:
    """Guard a window before the drift test; return a Verdict that stops the run, or None if it is fit.

    Order matters: schema problems are reported even on a small window because they are
    the more urgent finding. Extra columns in ``current`` are ignored.
    """
    _check_reference(reference)
    n_ref, n_cur = len(reference), len(current)

    def stop(status: str, message: str, **extra: Any) -> Verdict:
        return Verdict(status=status, message=message, reference_rows=n_ref, current_rows=n_cur, **extra)

    if n_cur == 0:
        return stop("insufficient_data", "No requests in the window: nothing to compare. "
                    "Send traffic to the endpoint or widen the time window.")

    missing = [c for c in FEATURE_COLUMNS if c not in current.columns]
    if missing:
        return stop("schema_drift", f"Feature columns missing from the request log: {', '.join(missing)}. "
                    "The serving handler no longer logs them; check that it uses components.features.",
                    schema_problems=[f"missing: {c}" for c in missing])

    # A column of only nulls reads back as object dtype; that is a NaN problem, not a type change.
    retyped = {c: str(current[c].dtype) for c in FEATURE_COLUMNS
               if current[c].notna().any() and not _is_numeric(current[c])}
    if retyped:
        details = [f"{c} is {t} (e.g. {_example(current[c])}), expected numeric" for c, t in retyped.items()]
        return stop("schema_drift", f"Feature columns changed type: {'; '.join(details)}. "
                    "The serving handler logs them differently from the reference.",
                    schema_problems=[f"retyped: {d}" for d in details])

    nan_share = {c: {"reference": round(_nan_share(reference[c]), 4),
                     "current": round(_nan_share(current[c].astype("float64")), 4)} for c in FEATURE_COLUMNS}
    mostly_nan = [c for c, s in nan_share.items() if s["current"] > MOSTLY_NAN and s["reference"] <= MOSTLY_NAN]
    if mostly_nan:
        details = [f"{c} {nan_share[c]['current']:.0%} NaN vs {nan_share[c]['reference']:.0%} in the reference"
                   for c in mostly_nan]
        return stop("schema_drift", f"Feature columns are mostly missing: {'; '.join(details)}. "
                    "The serving handler fails to compute them for most requests.",
                    nan_share=nan_share, schema_problems=[f"mostly NaN: {d}" for d in details])

    usable = min(int(np.isfinite(current[c].astype("float64").to_numpy()).sum()) for c in FEATURE_COLUMNS)
    if usable < min_rows:
        return stop("insufficient_data", f"Only {usable} usable requests in the window, fewer than the "
                    f"{min_rows} needed for a meaningful drift test. Wait for more traffic or widen the window.",
                    nan_share=nan_share)
    return None


# ---------------------------------------------------------------------------
# The drift test


def _finite_or_none(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _is_p_value(method: str) -> bool:
    """KS and friends report a p-value (small = drift); distances report a score (large = drift).

    ``method`` is a registered id ("ks") or, when Evidently chose it, a display name ("K-S p_value").
    """
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    try:
        name = get_registered_stattest(method, ColumnType.Numerical).display_name
    except Exception:  # not an id: already a display name
        name = method
    return "p_value" in name


def _read_snapshot(snapshot, nonnull_ref: pd.Series, nonnull_cur: pd.Series) -> tuple[dict, float, int]:
    """Per-column (method, score, drifted) and the drifted share, as Evidently computed them.

    ``snapshot.dict()`` holds one ``ValueDrift`` metric per column (value = drift score,
    config = method and threshold), one ``DriftedColumnsCount`` (count and share), and with
    ``include_tests=True`` one test per ValueDrift metric whose FAIL status is Evidently's
    own "drift detected" decision for that column.
    """
    result = snapshot.dict()
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in result["tests"]}
    features: dict[str, dict[str, Any]] = {}
    share, count = None, None
    for metric in result["metrics"]:
        kind = metric["config"]["type"]
        if kind.endswith(":DriftedColumnsCount"):
            share, count = float(metric["value"]["share"]), int(metric["value"]["count"])
        elif kind.endswith(":ValueDrift"):
            column, method = metric["config"]["column"], metric["config"]["method"]
            if metric["id"] not in failed:
                raise RuntimeError(f"Evidently returned no drift test for column {column}; was include_tests lost?")
            score_key = "p_value" if _is_p_value(method) else "score"
            features[column] = {
                "method": method,
                score_key: _finite_or_none(metric["value"]),
                "threshold": _finite_or_none(metric["config"].get("threshold")),
                "drifted": bool(failed[metric["id"]]),
                "reference_rows": int(nonnull_ref[column]),
                "current_rows": int(nonnull_cur[column]),
            }
    if share is None or set(features) != set(FEATURE_COLUMNS):
        raise RuntimeError(f"unexpected Evidently snapshot layout: share={share}, columns={sorted(features)}")
    if count != sum(f["drifted"] for f in features.values()):  # the two views of the same decision must agree
        raise RuntimeError(f"Evidently counted {count} drifted columns but flagged {[c for c, f in features.items() if f['drifted']]}")
    return features, share, count


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float = 0.5,
                 method: str | None = DRIFT_METHOD, threshold: float | None = DRIFT_THRESHOLD,
                 min_rows: int = 30) -> tuple[dict[str, Any], Any]:
    """Run the guards, then Evidently's DataDriftPreset on FEATURE_COLUMNS.

    Returns ``(verdict_dict, snapshot)``; the snapshot is None when a guard stopped the run.
    ``drift_share`` is the share of drifted features at or above which the window is drifted.
    ``method``/``threshold`` are Evidently's per-column stattest and its threshold; None lets
    Evidently pick (see the module docstring for why the default here is KS).
    """
    if not 0.0 < drift_share <= 1.0:
        raise ValueError(f"drift_share must be in (0, 1], got {drift_share}")
    stopped = check_window(reference, current, min_rows=min_rows)
    if stopped is not None:
        stopped.drift_share_threshold = drift_share
        return stopped.to_dict(), None

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    # Only the feature columns, as float, with inf as NaN (Evidently drops NaN per column).
    ref = reference[FEATURE_COLUMNS].astype("float64").replace([np.inf, -np.inf], np.nan).reset_index(drop=True)
    cur = current[FEATURE_COLUMNS].astype("float64").replace([np.inf, -np.inf], np.nan).reset_index(drop=True)
    definition = DataDefinition(numerical_columns=list(FEATURE_COLUMNS))
    report = Report([DataDriftPreset(columns=list(FEATURE_COLUMNS), drift_share=drift_share,
                                     num_method=method, num_threshold=threshold)], include_tests=True)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Constant columns (pixel_min is always 0 on digits) make Evidently's correlation plots divide by 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(Dataset.from_pandas(cur, data_definition=definition),
                              Dataset.from_pandas(ref, data_definition=definition))
    features, share, count = _read_snapshot(snapshot, ref.notna().sum(), cur.notna().sum())

    drifted = [c for c in FEATURE_COLUMNS if features[c]["drifted"]]
    detected = share >= drift_share  # Evidently's own dataset-drift rule
    listed = ", ".join(drifted)
    if detected:
        message = (f"Drift: {count} of {len(features)} features drifted ({listed}), at or above the "
                   f"{drift_share:.0%} threshold. Production inputs no longer look like the training data; "
                   "inspect the report and consider retraining.")
    elif drifted:
        message = (f"No drift: {count} of {len(features)} features drifted ({listed}), below the "
                   f"{drift_share:.0%} needed to call the window drifted.")
    else:
        message = f"No drift: none of the {len(features)} features drifted."
    nan_share = {c: {"reference": round(_nan_share(ref[c]), 4), "current": round(_nan_share(cur[c]), 4)}
                 for c in FEATURE_COLUMNS}
    verdict = Verdict(status="drift" if detected else "ok", message=message, reference_rows=len(ref),
                      current_rows=len(cur), drift_detected=detected, drifted_features=drifted,
                      drift_share=round(share, 4), drift_share_threshold=drift_share, features=features,
                      nan_share=nan_share)
    return verdict.to_dict(), snapshot


# ---------------------------------------------------------------------------
# Writing the outputs


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def verdict_html(verdict: dict[str, Any]) -> str:
    """A small stand-alone page for a window the guards stopped (no Evidently report exists)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{s['reference']:.1%}</td><td>{s['current']:.1%}</td></tr>"
        for c, s in verdict.get("nan_share", {}).items()
    )
    problems = "".join(f"<li>{esc(p)}</li>" for p in verdict.get("schema_problems", []))
    log = verdict.get("log", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift monitor: {esc(verdict['status'])}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}td,th{{padding:2px 12px;text-align:left}}</style>
</head><body>
<h1>Drift monitor: {esc(verdict['status'].replace('_', ' '))}</h1>
<p>{esc(verdict['message'])}</p>
<p>No drift test was run for this window. Reference rows: {verdict['reference_rows']};
current rows: {verdict['current_rows']}; request log: {esc(str(log.get('dir', '')))}
(window {esc(str(log.get('since')))} to {esc(str(log.get('until')))}).</p>
{f'<h2>Problems</h2><ul>{problems}</ul>' if problems else ''}
{f'<h2>Missing values per feature</h2><table><tr><th>feature</th><th>reference</th><th>current</th></tr>{rows}</table>' if rows else ''}
</body></html>
"""


def select_traffic(log: pd.DataFrame, model_version: str | None = None, source: str | None = None,
                   exclude_sources: tuple[str, ...] = EXCLUDED_SOURCES) -> pd.DataFrame:
    """Keep the rows of one model version and/or one request source, dropping excluded sources.

    Rows logged without a ``source`` (older handlers) count as ``client`` traffic.
    """
    keep = pd.Series(True, index=log.index)
    if model_version is not None:
        versions = log["model_version"].astype(str) if "model_version" in log.columns else pd.Series("", index=log.index)
        keep &= versions == str(model_version)
    sources = log["source"].fillna(DEFAULT_SOURCE).astype(str) if "source" in log.columns else pd.Series(DEFAULT_SOURCE, index=log.index)
    if source is not None:
        keep &= sources == source
    if exclude_sources:
        keep &= ~sources.isin(list(exclude_sources))
    return log[keep]


def monitor(reference_csv: str | Path, log_dir: str | Path, out_dir: str | Path, drift_share: float = 0.5,
            since: datetime | None = None, until: datetime | None = None,
            model_version: str | None = None, source: str | None = None,
            exclude_sources: tuple[str, ...] = EXCLUDED_SOURCES) -> dict[str, Any]:
    """Compare the request log (optionally one time window / model version / source) with the reference.

    The deploy step's smoke-test requests are excluded by default (``exclude_sources``):
    they are a fixed handful of test images, not traffic. ``source`` keeps only one
    source (the pipeline's monitor step keeps only its own ``replay`` requests).
    Writes ``drift_report.html`` (Evidently's report, or a short page saying why no test ran)
    and ``verdict.json`` into ``out_dir``; returns the verdict plus ``report_html`` and
    ``verdict_json`` paths. This is what the scheduled ``mlops monitor`` job calls.
    """
    reference_path = Path(reference_csv)
    if not reference_path.is_file():
        raise FileNotFoundError(f"reference {reference_path} not found: it is reference.csv in the dataset "
                                "artifact written by ingest")
    reference = pd.read_csv(reference_path)
    current = read_request_log(log_dir, since=since, until=until)
    rows_in_window, log_stats = len(current), dict(current.attrs)
    current = select_traffic(current, model_version=model_version, source=source, exclude_sources=exclude_sources)

    verdict, snapshot = drift_report(reference, current, drift_share=drift_share)
    filtered_out = rows_in_window - len(current)
    if verdict["status"] == "insufficient_data" and filtered_out:
        verdict["message"] += (f" ({filtered_out} other requests in the time window were of another model "
                               "version or an excluded source.)")
    verdict["log"] = {
        "dir": str(log_dir),
        "since": _parse_utc(since).isoformat() if since is not None else None,
        "until": _parse_utc(until).isoformat() if until is not None else None,
        "model_version": None if model_version is None else str(model_version),
        "source": source,
        "exclude_sources": list(exclude_sources or ()),
        "files": log_stats["files"],
        "rows_in_window": rows_in_window,
        "bad_lines": log_stats["bad_lines"],
        "partial_lines": log_stats["partial_lines"],
    }
    verdict["reference_csv"] = str(reference_path)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report_path, verdict_path = out / REPORT_FILE, out / VERDICT_FILE
    if snapshot is not None:
        _atomic_write_text(report_path, snapshot.get_html_str(as_iframe=False))
    else:
        _atomic_write_text(report_path, verdict_html(verdict))
    atomic_write_json(verdict_path, verdict)
    print(f"[monitor] {verdict['status']}: {verdict['message']}", flush=True)
    return {**verdict, "report_html": str(report_path), "verdict_json": str(verdict_path)}


# ---------------------------------------------------------------------------
# Replaying traffic


def replay(endpoint: str, token_file: str | Path, images: np.ndarray, limit: int = 0,
           source: str = REPLAY_SOURCE) -> int:
    """Send images ``[N, C, H, W]`` to the endpoint as PNG, one request each; return how many were sent.

    ``limit`` 0 sends all. Requests carry ``X-Request-Source: <source>`` so the request log
    can tell them from real clients. Raises on the first failed request, saying which one.
    """
    from serving.client import encode_png, predict, read_token

    if limit < 0:
        raise ValueError(f"replay limit must be >= 0 (0 = all), got {limit}")
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"replay needs a non-empty batch of images shaped [N, C, H, W], got shape {images.shape}")
    token = read_token(token_file)
    n = len(images) if limit == 0 else min(limit, len(images))
    t0 = time.perf_counter()
    for i in range(n):
        try:
            predict(endpoint, encode_png(images[i]), token, source=source)
        except Exception as e:
            raise RuntimeError(f"replay failed at request {i + 1} of {n} to {endpoint}: {e}. "
                               "Check the server with 'mlops serve status'.") from e
        if (i + 1) % 100 == 0 or i + 1 == n:
            print(f"[monitor] replayed {i + 1}/{n} requests ({time.perf_counter() - t0:.1f}s)", flush=True)
    return n


def wait_for_log(log_dir: str | Path, since: datetime, expected_rows: int, model_version: str | None = None,
                 source: str | None = REPLAY_SOURCE, timeout_s: float = 15.0) -> int:
    """Wait until the request log holds ``expected_rows`` rows since ``since`` (the server may log
    after it answers); return the rows found, which may be fewer if ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        log = select_traffic(read_request_log(log_dir, since=since), model_version=model_version, source=source)
        if len(log) >= expected_rows or time.monotonic() >= deadline:
            return len(log)
        time.sleep(0.5)


# ---------------------------------------------------------------------------
# KFP component


def monitor_component(
    dataset: Input[Dataset],
    deployment: Input[Artifact],
    drift_share: float,
    replay_limit: int,
    drift_report: Output[HTML],
    verdict: Output[Artifact],
    metrics: Output[Metrics],
):
    """Replay the test split to the deployed endpoint, then check the logged traffic for drift.

    Args:
        dataset: Dataset artifact from ingest (splits.npz and the reference.csv of training features).
        deployment: Deployment record JSON from deploy (endpoint, token_file, request_log_dir, model_version).
        drift_share: Share of drifted features at or above which the window is called drifted.
        replay_limit: Test images to replay to the endpoint; 0 replays all.
        drift_report: Output HTML: Evidently's drift report, or a page saying why no test ran.
        verdict: Output JSON with status, drifted features and per-feature test results.
        metrics: Output metrics: drift_detected, drift_share, row counts, replayed requests and cost.
    """
    import json
    import os
    import shutil
    import tempfile
    from datetime import datetime, timedelta, timezone
    from pathlib import Path

    from components.cost import log_metrics, measure
    from components.data import REFERENCE_FILE, load_splits
    from components.monitor import REPLAY_SOURCE, monitor, replay, wait_for_log

    with measure() as cost:
        record_path = Path(deployment.path)
        if not record_path.is_file():
            raise FileNotFoundError(f"deployment record {record_path} not found: the deploy step writes it")
        record = json.loads(record_path.read_text())
        missing = [k for k in ("endpoint", "token_file", "request_log_dir", "model_version") if k not in record]
        if missing:
            raise KeyError(f"deployment record {record_path} lacks {missing}; re-run deploy")
        splits = load_splits(dataset.path)

        # The window is this replay's own requests: from just before it (1 s of slack for clock
        # granularity), of the deployed model version, tagged with the replay source, so neither
        # the smoke test nor earlier replays or clients mix in.
        since = datetime.now(timezone.utc) - timedelta(seconds=1)
        sent = replay(record["endpoint"], record["token_file"], splits.test_x, limit=replay_limit, source=REPLAY_SOURCE)
        logged = wait_for_log(record["request_log_dir"], since, sent, model_version=record["model_version"],
                              source=REPLAY_SOURCE)
        if logged < sent:
            print(f"[monitor] only {logged} of {sent} replayed requests reached the log", flush=True)
        until = datetime.now(timezone.utc) + timedelta(seconds=1)

        with tempfile.TemporaryDirectory() as tmp:
            result = monitor(Path(dataset.path) / REFERENCE_FILE, record["request_log_dir"], tmp,
                             drift_share=drift_share, since=since, until=until,
                             model_version=record["model_version"], source=REPLAY_SOURCE)
            for src, dst in ((result["report_html"], drift_report.path), (result["verdict_json"], verdict.path)):
                os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
                shutil.copyfile(src, dst)

    log_metrics(metrics, {
        "drift_detected": result["drift_detected"],
        "drift_alert": result["alert"],
        "drift_share": result["drift_share"],
        "drift_share_threshold": drift_share,
        "drifted_features": len(result["drifted_features"]),
        "current_rows": result["current_rows"],
        "reference_rows": result["reference_rows"],
        "requests_replayed": sent,
        "requests_logged": logged,
        "log_bad_lines": result["log"]["bad_lines"],
        **cost.as_metrics(),
    })
    print(f"[monitor] verdict {result['status']} written to {verdict.path}", flush=True)
