"""Monitor step: is production traffic still like the data the model was trained on?

Compares the served requests (the serving request log) with the references saved at
training time, and writes a verdict (JSON), Evidently's HTML report and Prometheus
text metrics. Three groups of checks, each with its own false-alarm control:

* **image features** (``FEATURE_COLUMNS``, reference ``reference.csv`` from ingest):
  Kolmogorov-Smirnov per feature (p < 0.05) through Evidently's ``DataDriftPreset``;
  the group drifts when at least ``drift_share`` of the 8 features drift.
* **predictions** (``predicted_class``, ``confidence``; reference ``reference_model.csv``
  written with the model): a two-sample chi-square test of homogeneity on the class
  counts and KS on the confidence, each at p < 0.005 (Bonferroni: 0.01 for the group).
  Evidently's own ``chisquare`` is a goodness-of-fit test that takes the reference's
  class shares as exact: with a 300-row reference and a 6,623-row window it called a
  clean window drifted (p < 1e-6, see tests/test_monitor.py), so a two-sample test is
  registered with Evidently instead.
* **embedding** (``emb_0..emb_7``, a fixed random projection of the encoder's
  embedding): Evidently's classifier drift method (``ModelDriftMethod``: a logistic
  SGD classifier told to separate reference from window rows, ROC AUC on a held-out
  half), fed the standardised projection and its squares (so a change of spread is
  separable, not only a shift of the mean). Its AUC gets an exact null instead of
  Evidently's 100-draw bootstrap: on the held-out half, under no drift, the AUC is a
  Mann-Whitney statistic with mean 0.5 and variance (n0 + n1 + 1) / (12 n0 n1);
  drift when the one-sided p-value < 0.01. (Evidently's ``EmbeddingsDrift`` metric runs
  t-SNE on 5,000 points for its plot, far over the time budget. The eight projections are
  not in the per-column table either: their KS tests would decide nothing, and each column
  costs the report ~0.3 s of plotting.)

The window is drifted when any group is. Without ``reference_model.csv`` the monitor
checks the image features only and says so in the verdict (``checks``, ``model_reference``).

Guards run first, because Evidently handles bad windows poorly on its own
(``check_window``): an empty or tiny window gives ``insufficient_data``; missing,
unexpected or retyped columns, or a column mostly NaN where the reference is not, give
``schema_drift``. Evidently always gets an explicit data definition.

Why KS and not Evidently's default for the image features: above 1000 reference rows
(ours has ~1100) Evidently switches to the normed Wasserstein distance with a fixed
0.1 threshold, which ignores the window size. Measured on sklearn digits (1100
reference rows, i.i.d. windows, 200 repeats), that default called a CLEAN window
drifted (>= half of the 8 features) in 100% of 30-row windows, 82% of 100-row windows
and 6% of 300-row windows; KS in 0% at 30/100/300 rows. About 20% of clean windows
still show one feature with p < 0.05 (the expected 8 x 5%), which is why one drifted
feature alone does not make a window drifted. Inverted, noised (sigma 0.1 and 0.3),
30-degree-rotated and uniform-noise images were called drifted in 100% of
100/200/500-row windows. Right-angle rotations keep every image feature except the
centre of mass (2 of 8 move); the model-side checks are what catch them.

Large windows are sampled (``components.monitor.sampling``): at most n = 6,623 rows by
default, drawn uniformly with a DKW error bound of eps = 0.02 at alpha = 0.01 on every
feature's CDF, seeded by (model version, window) so a rerun gives the same result.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, MODEL_REFERENCE_FILE, PREDICTION_COLUMNS
from components.monitor.sampling import DEFAULT_ALPHA, DEFAULT_EPSILON, parse_utc, read_window, window_seed

# Evidently phones home unless told not to; set before it is imported (lazily, below).
os.environ.setdefault("DO_NOT_TRACK", "1")

DRIFT_METHOD = "ks"  # see the module docstring for why not Evidently's size-dependent default
DRIFT_THRESHOLD = 0.05  # KS p-value below which a feature counts as drifted
PREDICTION_METHOD = "chi2_two_sample"  # registered with Evidently below
PREDICTION_ALPHA = 0.005  # per prediction test (class counts, confidence): 0.01 for the group
EMBEDDING_ALPHA = 0.01  # the classifier test on the embedding projection
EMBEDDING_METHOD = ("Evidently ModelDriftMethod (SGD logistic classifier on the standardised projection and its "
                    "squares, ROC AUC on a held-out half) with a Mann-Whitney p-value")
MOSTLY_NAN = 0.5  # a column NaN in more than this share of the window is schema drift
EXCLUDED_SOURCES = ("smoke-test",)  # request-log sources that are not traffic (see components.deploy.local)
REPLAY_SOURCE = "replay"  # the X-Request-Source of the monitor's own replayed requests
DEFAULT_SOURCE = "client"  # what the handler logs when a request names no source
REPORT_FILE = "drift_report.html"
VERDICT_FILE = "verdict.json"
METRICS_FILE = "drift.prom"  # Prometheus text format, for node-exporter's textfile collector

MODEL_COLUMNS = [*PREDICTION_COLUMNS, *EMBEDDING_COLUMNS]
CATEGORICAL_COLUMNS = ["predicted_class"]
# Every field the serving request log may carry; anything else is a schema change.
LOG_COLUMNS = ("timestamp", "model_version", "source", "predicted_label", *FEATURE_COLUMNS, *MODEL_COLUMNS)
GROUPS = {"image_features": FEATURE_COLUMNS, "prediction": PREDICTION_COLUMNS, "embedding": EMBEDDING_COLUMNS}

STATUSES = ("ok", "drift", "insufficient_data", "schema_drift")


@dataclass
class Verdict:
    """The monitor's answer for one window; ``to_dict()`` is what verdict.json holds."""

    status: str  # one of STATUSES
    message: str  # one human sentence saying what was found and what to do
    reference_rows: int
    current_rows: int
    drift_detected: bool = False  # the statistical tests ran and called the window drifted
    drifted_features: list[str] = field(default_factory=list)  # every column (image, prediction) its test flagged
    drift_share: float = 0.0  # observed share of drifted image features
    drift_share_threshold: float = 0.5
    checks: list[str] = field(default_factory=list)  # the groups tested: image_features[, prediction, embedding]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> decision and how it was made
    features: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> method, score, sample sizes
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
# Reading references and the serving request log


def read_csv(location: str | Path) -> pd.DataFrame:
    """A CSV from a local path or an ``s3://`` URI."""
    if str(location).startswith("s3://"):
        from components.core import storage

        return pd.read_csv(io.BytesIO(storage.read_bytes(str(location))))
    return pd.read_csv(location)


def location_exists(location: str | Path) -> bool:
    """Whether a local file or an ``s3://`` object exists."""
    if str(location).startswith("s3://"):
        from components.core import storage

        return storage.exists(str(location))
    return Path(location).is_file()


def read_request_log(log_dir: str | Path, since: datetime | None = None,
                     until: datetime | None = None) -> pd.DataFrame:
    """Every request logged in ``log_dir`` (``*.jsonl``, local or ``s3://``) with ``since <= timestamp < until``.

    Tolerant of a live log: a last line without a newline that does not parse is a request
    still being written (skipped, counted in ``df.attrs["partial_lines"]``); any other line
    that is not a JSON object with a valid ``timestamp`` is skipped and counted in
    ``df.attrs["bad_lines"]``. Naive ``since``/``until`` are taken as UTC. The ``timestamp``
    column comes back as UTC datetimes, rows sorted by time. Reads everything; the monitor
    itself samples large windows (``components.monitor.sampling.read_window``).
    """
    window = read_window(log_dir, since, until, epsilon=None)
    if window.bad_lines:
        print(f"[monitor] skipped {window.bad_lines} unreadable line(s) in {log_dir}", flush=True)
    df = window.frame
    df.attrs.update(files=window.files, bad_lines=window.bad_lines, partial_lines=window.partial_lines)
    return df


def _source_of(record: dict) -> str:
    value = record.get("source")
    return DEFAULT_SOURCE if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


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


# ---------------------------------------------------------------------------
# Guards: is the window fit for a drift test at all?


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _nan_share(series: pd.Series) -> float:
    if len(series) == 0:
        return 0.0
    values = pd.to_numeric(series, errors="coerce")  # only called on numeric columns
    return float((~np.isfinite(values.to_numpy(dtype="float64"))).mean())


def _check_reference(reference: pd.DataFrame, columns: list[str], what: str, kind: str, fix: str) -> None:
    """A broken reference is a broken training artifact, not a property of the traffic: raise."""
    missing = [c for c in columns if c not in reference.columns]
    if missing:
        raise ValueError(f"the {what} lacks {kind} columns {missing}; {fix}")
    retyped = [c for c in columns if not _is_numeric(reference[c])]
    if retyped:
        raise ValueError(f"{what} {kind} columns {retyped} are not numeric; {fix}")
    if len(reference) == 0:
        raise ValueError(f"the {what} has no rows; {fix}")


def check_reference(reference: pd.DataFrame) -> None:
    _check_reference(reference, FEATURE_COLUMNS, "reference", "feature", "re-run ingest to rebuild reference.csv")


def check_model_reference(model_reference: pd.DataFrame) -> None:
    _check_reference(model_reference, MODEL_COLUMNS, "model reference", "model",
                     f"re-run finetune to rebuild {MODEL_REFERENCE_FILE} (or write it with write_model_reference)")


def _example(series: pd.Series) -> str:
    """A short example of an offending (non-numeric) value, for the message."""
    bad = series[series.notna() & pd.to_numeric(series, errors="coerce").isna()]
    return repr(bad.iloc[0])[:40] if len(bad) else repr(series.dropna().iloc[0])[:40] if series.notna().any() else "None"


def check_window(reference: pd.DataFrame, current: pd.DataFrame, min_rows: int = 30,
                 model_reference: pd.DataFrame | None = None) -> Verdict | None:
    """Guard a window before the drift tests; return a Verdict that stops the run, or None if it is fit.

    The monitored columns are the image features, plus the prediction and embedding
    columns when there is a model reference. Order matters: schema problems are reported
    even on a small window because they are the more urgent finding. Columns the request
    log is known to carry (timestamp, source, ...) are allowed; any other is a schema change.
    """
    check_reference(reference)
    if model_reference is not None:
        check_model_reference(model_reference)
        ref_nan = {**{c: _nan_share(reference[c]) for c in FEATURE_COLUMNS},
                   **{c: _nan_share(model_reference[c]) for c in MODEL_COLUMNS}}
    else:
        ref_nan = {c: _nan_share(reference[c]) for c in FEATURE_COLUMNS}
    monitored = list(ref_nan)
    n_ref, n_cur = len(reference), len(current)

    def stop(status: str, message: str, **extra: Any) -> Verdict:
        return Verdict(status=status, message=message, reference_rows=n_ref, current_rows=n_cur, **extra)

    if n_cur == 0:
        return stop("insufficient_data", "No requests in the window: nothing to compare. "
                    "Send traffic to the endpoint or widen the time window.")

    missing = [c for c in monitored if c not in current.columns]
    if missing:
        hint = ("The serving handler no longer logs them; check that it uses components.core.features."
                if set(missing) & set(FEATURE_COLUMNS) else
                "The serving handler does not log the model's prediction and embedding (it predates them, or its "
                "log changed); update it, or monitor without the model reference (image features only).")
        return stop("schema_drift", f"Columns missing from the request log: {', '.join(missing)}. {hint}",
                    schema_problems=[f"missing: {c}" for c in missing])

    unexpected = [str(c) for c in current.columns if c not in LOG_COLUMNS]
    if unexpected:
        return stop("schema_drift", f"Unexpected columns in the request log: {', '.join(unexpected)}. The serving "
                    "handler logs fields the monitor does not know; update LOG_COLUMNS in components.monitor.monitor "
                    "together with the handler.",
                    schema_problems=[f"unexpected: {c}" for c in unexpected])

    # A column of only nulls reads back as object dtype; that is a NaN problem, not a type change.
    retyped = {c: str(current[c].dtype) for c in monitored if current[c].notna().any() and not _is_numeric(current[c])}
    if retyped:
        details = [f"{c} is {t} (e.g. {_example(current[c])}), expected numeric" for c, t in retyped.items()]
        return stop("schema_drift", f"Columns changed type: {'; '.join(details)}. "
                    "The serving handler logs them differently from the reference.",
                    schema_problems=[f"retyped: {d}" for d in details])

    nan_share = {c: {"reference": round(ref_nan[c], 4), "current": round(_nan_share(current[c].astype("float64")), 4)}
                 for c in monitored}
    mostly_nan = [c for c, s in nan_share.items() if s["current"] > MOSTLY_NAN and s["reference"] <= MOSTLY_NAN]
    if mostly_nan:
        details = [f"{c} {nan_share[c]['current']:.0%} NaN vs {nan_share[c]['reference']:.0%} in the reference"
                   for c in mostly_nan]
        return stop("schema_drift", f"Columns are mostly missing: {'; '.join(details)}. "
                    "The serving handler fails to compute them for most requests.",
                    nan_share=nan_share, schema_problems=[f"mostly NaN: {d}" for d in details])

    usable = min(int(np.isfinite(current[c].astype("float64").to_numpy()).sum()) for c in monitored)
    if usable < min_rows:
        return stop("insufficient_data", f"Only {usable} usable requests in the window, fewer than the "
                    f"{min_rows} needed for a meaningful drift test. Wait for more traffic or widen the window.",
                    nan_share=nan_share)
    return None


# ---------------------------------------------------------------------------
# The drift tests


def _finite_or_none(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _chi2_two_sample(reference_data: pd.Series, current_data: pd.Series, feature_type: Any,
                     threshold: float) -> tuple[float, bool]:
    """Chi-square test of homogeneity: are two SAMPLES' category counts from one distribution?

    Unlike Evidently's ``chisquare`` (goodness of fit against the reference shares taken as
    exact), it allows for the reference being a sample too, so a large window against a
    small reference is not called drifted for the reference's own sampling noise.
    """
    from scipy.stats import chi2_contingency

    ref_counts, cur_counts = reference_data.value_counts(), current_data.value_counts()
    keys = sorted(set(ref_counts.index) | set(cur_counts.index), key=str)
    if len(keys) < 2 or len(reference_data) == 0 or len(current_data) == 0:
        return 1.0, False
    table = np.array([[ref_counts.get(k, 0) for k in keys], [cur_counts.get(k, 0) for k in keys]], dtype=float)
    p_value = float(chi2_contingency(table, correction=False)[1])
    return p_value, p_value < threshold


_registered = False


def _register_stattests() -> None:
    """Make the two-sample chi-square known to Evidently by name (its reports refer to tests by name)."""
    global _registered
    if _registered:
        return
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(StatTest(name=PREDICTION_METHOD, display_name="chi-square two-sample p_value",
                               allowed_feature_types=[ColumnType.Categorical]), default_impl=_chi2_two_sample)
    _registered = True


def _is_p_value(method: str) -> bool:
    """KS and friends report a p-value (small = drift); distances report a score (large = drift).

    ``method`` is a registered id ("ks") or, when Evidently chose it, a display name ("K-S p_value").
    """
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    for column_type in (ColumnType.Numerical, ColumnType.Categorical):
        try:
            return "p_value" in get_registered_stattest(method, column_type).display_name
        except Exception:  # not an id for this column type (or at all)
            continue
    return "p_value" in method  # already a display name


def _read_snapshot(snapshot, columns: list[str], nonnull_ref: pd.Series,
                   nonnull_cur: pd.Series) -> tuple[dict, float, int]:
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
    if share is None or set(features) != set(columns):
        raise RuntimeError(f"unexpected Evidently snapshot layout: share={share}, columns={sorted(features)}")
    if count != sum(f["drifted"] for f in features.values()):  # the two views of the same decision must agree
        raise RuntimeError(f"Evidently counted {count} drifted columns but flagged {[c for c, f in features.items() if f['drifted']]}")
    return features, share, count


def embedding_drift(reference: pd.DataFrame, current: pd.DataFrame, alpha: float = EMBEDDING_ALPHA) -> dict[str, Any]:
    """Multivariate drift of the embedding projection: can a classifier tell window rows from reference rows?

    Evidently's ``ModelDriftMethod`` trains its SGD logistic classifier on a random half of
    the pooled rows and reports the ROC AUC on the other half. With no drift the classifier
    is independent of that half's labels, so the AUC is a Mann-Whitney U / (n0 n1) with
    mean 0.5 and variance (n0 + n1 + 1) / (12 n0 n1): its one-sided p-value decides
    (``alpha``), a size-aware rule where Evidently's fixed AUC 0.55 is not. Inputs are
    standardised with the reference's mean and spread, plus their squares, so a change
    in spread (noise) is as visible to the linear classifier as a shift.
    """
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import ModelDriftMethod
    from scipy.stats import norm
    from sklearn.model_selection import train_test_split

    def finite(df: pd.DataFrame) -> pd.DataFrame:
        return df[EMBEDDING_COLUMNS].astype("float64").replace([np.inf, -np.inf], np.nan).dropna()

    ref, cur = finite(reference), finite(current)
    m, n = len(ref), len(cur)
    mean, spread = ref.mean(), ref.std(ddof=0).replace(0.0, 1.0)

    def design(df: pd.DataFrame) -> pd.DataFrame:
        z = ((df - mean) / spread).reset_index(drop=True)
        return pd.concat([z, (z**2).add_suffix("_sq")], axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SGD convergence notes on tiny windows
        auc, _, _ = ModelDriftMethod(threshold=1.0, bootstrap=False)(design(cur), design(ref))
    # The same split ModelDriftMethod made (it splits the pooled reference-then-current rows with seed 42).
    _, test_rows = train_test_split(np.arange(m + n), test_size=0.5, random_state=42, shuffle=True)
    n_ref_test = int((test_rows < m).sum())
    n_cur_test = len(test_rows) - n_ref_test
    if n_ref_test == 0 or n_cur_test == 0:
        p_value = 1.0
    else:
        sd = math.sqrt((n_ref_test + n_cur_test + 1) / (12.0 * n_ref_test * n_cur_test))
        p_value = float(norm.sf((float(auc) - 0.5) / sd))
    return {
        "columns": list(EMBEDDING_COLUMNS),
        "method": EMBEDDING_METHOD,
        "auc": round(float(auc), 6),
        "p_value": p_value,
        "threshold": alpha,
        "drifted": bool(p_value < alpha),
        "reference_rows": m,
        "current_rows": n,
        "held_out_rows": {"reference": n_ref_test, "current": n_cur_test},
    }


def _monitored_frame(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The monitored columns as Evidently gets them: floats (inf as NaN), the class index as a category string."""
    out = {}
    for c in columns:
        values = pd.to_numeric(df[c], errors="coerce").astype("float64").replace([np.inf, -np.inf], np.nan)
        if c in CATEGORICAL_COLUMNS:
            out[c] = pd.Series([None if math.isnan(v) else str(int(v)) for v in values], dtype=object)
        else:
            out[c] = values.reset_index(drop=True)
    return pd.DataFrame(out, columns=columns)


def _group_of(column: str) -> str:
    return next(g for g, cols in GROUPS.items() if column in cols)


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float = 0.5,
                 method: str | None = DRIFT_METHOD, threshold: float | None = DRIFT_THRESHOLD,
                 min_rows: int = 30, model_reference: pd.DataFrame | None = None) -> tuple[dict[str, Any], Any]:
    """Run the guards, then Evidently's DataDriftPreset (and the embedding test with a model reference).

    Returns ``(verdict_dict, snapshot)``; the snapshot is None when a guard stopped the run.
    ``drift_share`` is the share of drifted image features at or above which that group
    drifts. ``method``/``threshold`` are Evidently's per-column test for the image features
    and its threshold; None lets Evidently pick (see the module docstring for why KS).
    ``model_reference`` (``reference_model.csv``) adds the prediction and embedding groups.
    """
    if not 0.0 < drift_share <= 1.0:
        raise ValueError(f"drift_share must be in (0, 1], got {drift_share}")
    with_model = model_reference is not None
    checks = ["image_features", *(["prediction", "embedding"] if with_model else [])]
    stopped = check_window(reference, current, min_rows=min_rows, model_reference=model_reference)
    if stopped is not None:
        stopped.drift_share_threshold = drift_share
        stopped.checks = checks
        return stopped.to_dict(), None

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    _register_stattests()
    # Per-column tests: image features and predictions. The embedding is judged as a whole (embedding_drift).
    columns = [*FEATURE_COLUMNS, *(PREDICTION_COLUMNS if with_model else [])]
    ref = _monitored_frame(reference, FEATURE_COLUMNS)
    if with_model:  # two references of different lengths side by side; Evidently drops NaN per column
        ref = pd.concat([ref, _monitored_frame(model_reference, PREDICTION_COLUMNS)], axis=1)
    cur = _monitored_frame(current, columns)
    definition = DataDefinition(numerical_columns=[c for c in columns if c not in CATEGORICAL_COLUMNS],
                                categorical_columns=[c for c in columns if c in CATEGORICAL_COLUMNS])
    preset = DataDriftPreset(
        columns=columns, drift_share=drift_share, num_method=method, num_threshold=threshold,
        cat_method=PREDICTION_METHOD if with_model else None,
        per_column_threshold={c: PREDICTION_ALPHA for c in PREDICTION_COLUMNS} if with_model else None,
    )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Constant columns (pixel_min is always 0 on digits) make Evidently's correlation plots divide by 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = Report([preset], include_tests=True).run(Dataset.from_pandas(cur, data_definition=definition),
                                                            Dataset.from_pandas(ref, data_definition=definition))
    features, _, _ = _read_snapshot(snapshot, columns, ref.notna().sum(), cur.notna().sum())
    for column, result in features.items():
        result["group"] = _group_of(column)

    image_drifted = [c for c in FEATURE_COLUMNS if features[c]["drifted"]]
    share = len(image_drifted) / len(FEATURE_COLUMNS)
    groups: dict[str, dict[str, Any]] = {"image_features": {
        "columns": list(FEATURE_COLUMNS), "drifted": share >= drift_share, "drifted_columns": image_drifted,
        "share": round(share, 4), "threshold": drift_share,
        "rule": f"drifted when at least {drift_share:.0%} of the features drift (per-feature test: "
                f"{features[FEATURE_COLUMNS[0]]['method']})",
    }}
    if with_model:
        predicted = [c for c in PREDICTION_COLUMNS if features[c]["drifted"]]
        groups["prediction"] = {
            "columns": list(PREDICTION_COLUMNS), "drifted": bool(predicted), "drifted_columns": predicted,
            "threshold": PREDICTION_ALPHA,
            "rule": f"drifted when the class counts ({PREDICTION_METHOD}) or the confidence (ks) differ "
                    f"at p < {PREDICTION_ALPHA}",
        }
        groups["embedding"] = embedding_drift(model_reference, current)
    detected = any(g["drifted"] for g in groups.values())
    drifted = [c for c in columns if features[c]["drifted"]]
    # NaN shares of each reference on its own (the shorter one is padded with NaN above).
    nan_share = {c: {"reference": round(_nan_share((reference if c in FEATURE_COLUMNS else model_reference)[c]), 4),
                     "current": round(_nan_share(current[c]), 4)}
                 for c in [*columns, *(EMBEDDING_COLUMNS if with_model else [])]}
    verdict = Verdict(status="drift" if detected else "ok", message=_message(groups, features, detected, drift_share),
                      reference_rows=len(reference), current_rows=len(cur), drift_detected=detected,
                      drifted_features=drifted, drift_share=round(share, 4), drift_share_threshold=drift_share,
                      checks=checks, groups=groups, features=features, nan_share=nan_share)
    return verdict.to_dict(), snapshot


def _message(groups: dict[str, dict[str, Any]], features: dict[str, dict[str, Any]], detected: bool,
             drift_share: float) -> str:
    image = groups["image_features"]
    k, total, listed = len(image["drifted_columns"]), len(image["columns"]), ", ".join(image["drifted_columns"])
    if detected:
        reasons = []
        if image["drifted"]:
            reasons.append(f"{k} of {total} image features drifted ({listed}), at or above the {drift_share:.0%} threshold")
        if groups.get("prediction", {}).get("drifted"):
            tests = ", ".join(f"{c} p={features[c]['p_value']:.2g}" for c in groups["prediction"]["drifted_columns"])
            reasons.append(f"the predictions drifted ({tests})")
        if groups.get("embedding", {}).get("drifted"):
            e = groups["embedding"]
            reasons.append(f"the embedding drifted (classifier AUC {e['auc']:.3f}, p={e['p_value']:.2g})")
        if not image["drifted"] and k:
            reasons.append(f"{k} of {total} image features drifted ({listed}), below the {drift_share:.0%} threshold")
        return ("Drift: " + "; ".join(reasons) + ". Production inputs no longer look like the training data; "
                "inspect the report and consider retraining.")
    if k:
        message = (f"No drift: {k} of {total} image features drifted ({listed}), below the {drift_share:.0%} "
                   "needed to call the window drifted.")
    else:
        message = f"No drift: none of the {total} image features drifted."
    if "embedding" in groups:
        message += " Predictions and embedding match the model reference."
    return message


# ---------------------------------------------------------------------------
# Writing the outputs


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


# a uuid4 as Evidently writes it, dashed (8-4-4-4-12) or as 32 hex digits
_RANDOM_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{8}(?:(?:-[0-9a-f]{4}){3}-|[0-9a-f]{12})[0-9a-f]{12}(?![0-9a-f])")


# Evidently's page embeds its JavaScript library (3.5 of 4.3 MB) between these: no per-report ids in it.
_STATIC_JS = ("<script>var global = globalThis</script>", "<script>")


def stable_ids(text: str, seed: int = 0) -> str:
    """Replace Evidently's random uuid4 element ids by ids derived from their order: same report, same bytes.

    Each distinct id maps to one replacement everywhere, so the page's internal references hold.
    The static library part of the page is skipped (scanning it took 0.3 s).
    """
    mapping: dict[str, str] = {}

    def replace(match: re.Match) -> str:
        old = match.group(0)
        if old not in mapping:
            new = hashlib.sha256(f"{seed}:{len(mapping)}".encode()).hexdigest()[:32]
            mapping[old] = f"{new[:8]}-{new[8:12]}-{new[12:16]}-{new[16:20]}-{new[20:32]}" if "-" in old else new
        return mapping[old]

    start = text.find(_STATIC_JS[0])
    end = text.rfind(_STATIC_JS[1])
    if 0 <= start < end:
        return _RANDOM_ID.sub(replace, text[:start]) + text[start:end] + _RANDOM_ID.sub(replace, text[end:])
    return _RANDOM_ID.sub(replace, text)


def _summary_html(verdict: dict[str, Any]) -> str:
    """The verdict on top of Evidently's report: the decision per group, sampling and the window."""
    esc = html.escape
    rows = []
    for name, group in verdict.get("groups", {}).items():
        if name == "embedding":
            how = f"classifier AUC {group['auc']:.3f}, p = {group['p_value']:.3g} (drift if p &lt; {group['threshold']})"
        elif name == "prediction":
            how = "; ".join(f"{c}: p = {verdict['features'][c]['p_value']:.3g}" for c in group["columns"]
                            if verdict["features"][c].get("p_value") is not None) + f" (drift if p &lt; {group['threshold']})"
        else:
            how = f"{len(group['drifted_columns'])} of {len(group['columns'])} drifted (drift if &ge; {group['threshold']:.0%})"
        rows.append(f"<tr><td>{esc(name)}</td><td>{'DRIFT' if group['drifted'] else 'ok'}</td><td>{how}</td></tr>")
    sampling = verdict.get("sampling", {})
    window = verdict.get("window", {})
    model_ref = verdict.get("model_reference") or {}
    note = f"<p>{esc(model_ref['note'])}</p>" if model_ref.get("note") else ""
    return f"""<div style="font-family:sans-serif;max-width:60em;margin:1em auto;padding:0.5em 1em;border:1px solid #ccc">
<h2>Drift verdict: {esc(verdict['status'].replace('_', ' '))}</h2>
<p>{esc(verdict['message'])}</p>
<table><tr><th align="left">check</th><th align="left">decision</th><th align="left">how</th></tr>{''.join(rows)}</table>
<p>Model version {esc(str(verdict.get('model_version') or 'all'))}; window {esc(str(window.get('since')))} to
{esc(str(window.get('until')))}; {verdict['current_rows']} requests checked of {sampling.get('window_rows', verdict['current_rows'])}
({esc(str(sampling.get('bound', '')))}; epsilon {sampling.get('epsilon', 0)}, alpha {sampling.get('alpha', '')}).</p>{note}
</div>
"""


def report_html(snapshot, verdict: dict[str, Any], seed: int = 0) -> str:
    """Evidently's report with stable element ids, the verdict summary on top."""
    page = stable_ids(snapshot.get_html_str(as_iframe=False), seed)
    at = page.find("<body>")
    summary = _summary_html(verdict)
    return page[:at + 6] + summary + page[at + 6:] if at >= 0 else summary + page


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


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_value(value: Any) -> str:
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(x) if not x.is_integer() or abs(x) >= 1e15 else str(int(x))


def prometheus_metrics(verdict: dict[str, Any]) -> str:
    """The verdict as Prometheus text exposition (node-exporter textfile collector): gauges labelled by model version.

    No window labels (one series per window would grow without bound): the window's ends are
    values (``..._window_start_timestamp_seconds``), so the file describes the latest check.
    """
    base = {"model_version": verdict.get("model_version") or "all"}
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, Any], Any]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        full = f"kfp_mlops_drift_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_prom_label(v)}"' for k, v in {**base, **labels}.items())
            lines.append(f"{full}{{{text}}} {_prom_value(value)}")

    features = verdict.get("features", {})
    groups = verdict.get("groups", {})
    log, sampling, window = verdict.get("log", {}), verdict.get("sampling", {}), verdict.get("window", {})
    gauge("detected", "1 if the drift tests called the last checked window drifted.", [({}, verdict["drift_detected"])])
    gauge("alert", "1 if the last check needs a person: drift or schema drift.", [({}, verdict["alert"])])
    gauge("status", "Outcome of the last check, one series per possible status.",
          [({"status": s}, verdict["status"] == s) for s in STATUSES])
    gauge("image_feature_share", "Share of image features whose own test drifted.", [({}, verdict["drift_share"])])
    gauge("group_drifted", "1 if the group's test called it drifted.",
          [({"group": g}, info["drifted"]) for g, info in groups.items()])
    gauge("feature_drifted", "1 if the column's own test flagged it.",
          [({"feature": c, "method": r["method"]}, r["drifted"]) for c, r in features.items()])
    gauge("feature_p_value", "p-value of the column's test (small = drift).",
          [({"feature": c, "method": r["method"]}, r.get("p_value")) for c, r in features.items()])
    gauge("feature_score", "Distance of the column's test (large = drift).",
          [({"feature": c, "method": r["method"]}, r.get("score")) for c, r in features.items()])
    gauge("embedding_auc", "ROC AUC of the classifier telling window from reference embeddings (0.5 = alike).",
          [({}, groups.get("embedding", {}).get("auc"))])
    gauge("embedding_p_value", "p-value of the embedding classifier test.", [({}, groups.get("embedding", {}).get("p_value"))])
    gauge("window_requests", "Requests logged in the window (any version or source).", [({}, log.get("rows_in_window"))])
    gauge("selected_requests", "Requests of the model version and sources (estimated when sampled).",
          [({}, log.get("rows_selected"))])
    gauge("checked_requests", "Requests the tests used (the sample).", [({}, verdict["current_rows"])])
    gauge("reference_rows", "Rows of the image-feature reference.", [({}, verdict["reference_rows"])])
    gauge("sample_epsilon", "DKW bound on each feature's CDF error from sampling (0 = whole window).",
          [({}, sampling.get("epsilon"))])
    gauge("window_start_timestamp_seconds", "Start of the checked window (Unix time).",
          [({}, parse_utc(window["since"]).timestamp() if window.get("since") else None)])
    gauge("window_end_timestamp_seconds", "End of the checked window (Unix time).",
          [({}, parse_utc(window["until"]).timestamp() if window.get("until") else None)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The monitor


def _traffic_filter(source: str | None, exclude_sources: tuple[str, ...] | None):
    """``select_traffic``'s source rules for one parsed record (the version is filtered while indexing)."""
    excluded = set(exclude_sources or ())

    def keep(record: dict) -> bool:
        s = _source_of(record)
        return (source is None or s == source) and s not in excluded

    return keep


def load_model_reference(location: str | Path | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The model reference and what the verdict says about it; a missing one degrades to image features only."""
    if location is None:
        return None, {"path": None, "found": False,
                      "note": f"No model reference ({MODEL_REFERENCE_FILE}) given: prediction and embedding drift "
                              "were not checked, image features only. Pass the one finetune wrote into the model "
                              "artifact (--model-reference)."}
    if not location_exists(location):
        return None, {"path": str(location), "found": False,
                      "note": f"Model reference {location} not found: prediction and embedding drift were not "
                              "checked, image features only. Finetune writes it into the model artifact; re-run "
                              "training or call components.monitor.monitor.write_model_reference."}
    frame = read_csv(location)
    check_model_reference(frame)
    return frame, {"path": str(location), "found": True, "rows": len(frame)}


def monitor(reference_csv: str | Path, log_dir: str | Path, out_dir: str | Path, drift_share: float = 0.5,
            since: datetime | None = None, until: datetime | None = None,
            model_version: str | None = None, source: str | None = None,
            exclude_sources: tuple[str, ...] = EXCLUDED_SOURCES, model_reference_csv: str | Path | None = None,
            sample_epsilon: float | None = DEFAULT_EPSILON, sample_alpha: float = DEFAULT_ALPHA,
            log_cache_dir: str | Path | None = None, log_file_max_age_s: float | None = None) -> dict[str, Any]:
    """Compare the request log (one time window / model version / source) with the training references.

    ``reference_csv`` is the image-feature reference (``reference.csv`` from ingest) and
    ``model_reference_csv`` the model's (``reference_model.csv``, prediction + embedding);
    either may be local or ``s3://``, as may ``log_dir``. Without a model reference only the
    image features are checked, and the verdict says so. The deploy step's smoke-test
    requests are excluded by default (``exclude_sources``); ``source`` keeps only one source.
    Windows larger than 4 x ``dkw_sample_size(sample_epsilon, sample_alpha)`` requests are
    sampled (None reads everything), with a seed from (model version, window): the same
    inputs give the same files, byte for byte. ``log_file_max_age_s`` is the log writer's
    rotation age, so rotated files outside the window are skipped. Writes ``drift_report.html``, ``verdict.json``
    and ``drift.prom`` into ``out_dir``; returns the verdict plus their paths.
    """
    if not location_exists(reference_csv):
        raise FileNotFoundError(f"reference {reference_csv} not found: it is reference.csv in the dataset "
                                "artifact written by ingest")
    reference = read_csv(reference_csv)
    model_reference, model_reference_info = load_model_reference(model_reference_csv)
    lo = parse_utc(since) if since is not None else None
    hi = parse_utc(until) if until is not None else None
    version = None if model_version is None else str(model_version)

    t0 = time.perf_counter()
    window = read_window(log_dir, lo, hi, model_version=version, keep=_traffic_filter(source, exclude_sources),
                         epsilon=sample_epsilon, alpha=sample_alpha, cache_dir=log_cache_dir,
                         max_file_age_s=log_file_max_age_s)
    t_read = time.perf_counter() - t0
    verdict, snapshot = drift_report(reference, window.frame, drift_share=drift_share, model_reference=model_reference)
    stats = window.stats()
    filtered_out = stats["rows_in_window"] - stats["rows_selected"]
    if verdict["status"] == "insufficient_data" and filtered_out:
        verdict["message"] += (f" ({filtered_out} other requests in the time window were of another model "
                               "version or an excluded source.)")
    if model_reference is None and verdict["status"] in ("ok", "drift"):
        verdict["message"] += " " + model_reference_info["note"]
    verdict["model_version"] = version
    verdict["window"] = {"since": lo.isoformat() if lo else None, "until": hi.isoformat() if hi else None}
    verdict["log"] = {"dir": str(log_dir), "since": verdict["window"]["since"], "until": verdict["window"]["until"],
                      "model_version": version, "source": source, "exclude_sources": list(exclude_sources or ()),
                      **stats}
    verdict["sampling"] = window.sampling()
    verdict["reference_csv"] = str(reference_csv)
    verdict["model_reference"] = model_reference_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report_html": out / REPORT_FILE, "verdict_json": out / VERDICT_FILE, "metrics_prom": out / METRICS_FILE}
    seed = window_seed(version, lo, hi)
    page = report_html(snapshot, verdict, seed) if snapshot is not None else verdict_html(verdict)
    _atomic_write_text(paths["report_html"], page)
    _atomic_write_text(paths["verdict_json"], _json_text(verdict))
    _atomic_write_text(paths["metrics_prom"], prometheus_metrics(verdict))
    print(f"[monitor] {verdict['status']}: {verdict['message']} ({verdict['current_rows']} of "
          f"{stats['rows_selected']} requests checked, read in {t_read:.1f}s, "
          f"all in {time.perf_counter() - t0:.1f}s)", flush=True)
    return {**verdict, **{k: str(v) for k, v in paths.items()}}


def result_dir(out_root: str | Path, model_version: str | None, since: datetime | None,
               until: datetime | None) -> str:
    """Where the results of one (model version, window) go: ``<root>/<version>/<since>--<until>``.

    A rerun of the same window writes the same directory (overwriting it with the same
    content), so results are never duplicated. Works for local paths and ``s3://`` prefixes.
    """
    def stamp(t: datetime | None, open_end: str) -> str:
        return open_end if t is None else parse_utc(t).strftime("%Y%m%dT%H%M%S") + f".{parse_utc(t).microsecond // 1000:03d}Z"

    version = re.sub(r"[^A-Za-z0-9_.-]", "_", str(model_version)) if model_version is not None else "all-versions"
    return f"{str(out_root).rstrip('/')}/{version}/{stamp(since, 'start')}--{stamp(until, 'open')}"


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h``, ``1d``, ``1w`` (or combined, ``1h30m``) -> timedelta."""
    value = str(text).strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {text!r} (examples: 15m, 1h, 1d, 1h30m)")
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


def last_window(period: timedelta, settle: timedelta = timedelta(0),
                now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last whole ``period`` (aligned to multiples of it since the Unix epoch, UTC) that ended at
    least ``settle`` ago: ``--last 1h`` run at 11:17 checks [10:00, 11:00). Reruns within the same
    period get the same window, hence the same results directory."""
    if period.total_seconds() <= 0 or settle.total_seconds() < 0:
        raise ValueError(f"the window needs a positive period and a settle time >= 0, got {period} and {settle}")
    reference = (parse_utc(now) if now is not None else datetime.now(timezone.utc)) - settle
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    periods = (reference - epoch) // period
    until = epoch + periods * period
    return until - period, until




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
        try:
            log = select_traffic(read_request_log(log_dir, since=since), model_version=model_version, source=source)
        except FileNotFoundError:  # the log writer creates the directory with its first line
            log = pd.DataFrame()
        if len(log) >= expected_rows or time.monotonic() >= deadline:
            return len(log)
        time.sleep(0.5)


# ---------------------------------------------------------------------------
# KFP component
