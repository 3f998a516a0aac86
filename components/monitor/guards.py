"""Guards: is a window fit for a drift test at all, and are the references it is compared with sound?

Evidently handles bad windows poorly on its own, so these run first. An empty or tiny
window gives ``insufficient_data``; missing, unexpected or retyped columns, or a column
mostly NaN where the reference is not, give ``schema_drift``. A broken reference is a
broken training artifact, not a property of the traffic, so it raises instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, MODEL_REFERENCE_FILE, PREDICTION_COLUMNS
from components.monitor.verdict import Verdict

MOSTLY_NAN = 0.5  # a column NaN in more than this share of the window is schema drift
MIN_ROWS = 30  # usable requests a drift test needs to mean anything

MODEL_COLUMNS = [*PREDICTION_COLUMNS, *EMBEDDING_COLUMNS]
# Every field the serving request log may carry; anything else is a schema change.
LOG_COLUMNS = ("timestamp", "model_version", "source", "predicted_label", *FEATURE_COLUMNS, *MODEL_COLUMNS)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def nan_share(series: pd.Series) -> float:
    """Share of the (numeric) column that is NaN or infinite."""
    if len(series) == 0:
        return 0.0
    values = pd.to_numeric(series, errors="coerce")
    return float((~np.isfinite(values.to_numpy(dtype="float64"))).mean())


def _check_reference(reference: pd.DataFrame, columns: list[str], what: str, kind: str, fix: str) -> None:
    missing = [c for c in columns if c not in reference.columns]
    if missing:
        raise ValueError(f"the {what} lacks {kind} columns {missing}; {fix}")
    retyped = [c for c in columns if not _is_numeric(reference[c])]
    if retyped:
        raise ValueError(f"{what} {kind} columns {retyped} are not numeric; {fix}")
    if len(reference) == 0:
        raise ValueError(f"the {what} has no rows; {fix}")


def check_reference(reference: pd.DataFrame) -> None:
    """Raise unless the image-feature reference (``reference.csv``) has every feature, numeric, and rows."""
    _check_reference(reference, FEATURE_COLUMNS, "reference", "feature", "re-run ingest to rebuild reference.csv")


def check_model_reference(model_reference: pd.DataFrame) -> None:
    """Raise unless the model reference has every prediction and embedding column, numeric, and rows."""
    _check_reference(model_reference, MODEL_COLUMNS, "model reference", "model",
                     f"re-run finetune to rebuild {MODEL_REFERENCE_FILE} (or write it with write_model_reference)")


def _example(series: pd.Series) -> str:
    """A short example of an offending (non-numeric) value, for the message."""
    bad = series[series.notna() & pd.to_numeric(series, errors="coerce").isna()]
    return repr(bad.iloc[0])[:40] if len(bad) else repr(series.dropna().iloc[0])[:40] if series.notna().any() else "None"


def check_window(reference: pd.DataFrame, current: pd.DataFrame, min_rows: int = MIN_ROWS,
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
        ref_nan = {**{c: nan_share(reference[c]) for c in FEATURE_COLUMNS},
                   **{c: nan_share(model_reference[c]) for c in MODEL_COLUMNS}}
    else:
        ref_nan = {c: nan_share(reference[c]) for c in FEATURE_COLUMNS}
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
                    "handler logs fields the monitor does not know; update LOG_COLUMNS in components.monitor.guards "
                    "together with the handler.",
                    schema_problems=[f"unexpected: {c}" for c in unexpected])

    # A column of only nulls reads back as object dtype; that is a NaN problem, not a type change.
    retyped = {c: str(current[c].dtype) for c in monitored if current[c].notna().any() and not _is_numeric(current[c])}
    if retyped:
        details = [f"{c} is {t} (e.g. {_example(current[c])}), expected numeric" for c, t in retyped.items()]
        return stop("schema_drift", f"Columns changed type: {'; '.join(details)}. "
                    "The serving handler logs them differently from the reference.",
                    schema_problems=[f"retyped: {d}" for d in details])

    shares = {c: {"reference": round(ref_nan[c], 4), "current": round(nan_share(current[c].astype("float64")), 4)}
              for c in monitored}
    mostly_nan = [c for c, s in shares.items() if s["current"] > MOSTLY_NAN and s["reference"] <= MOSTLY_NAN]
    if mostly_nan:
        details = [f"{c} {shares[c]['current']:.0%} NaN vs {shares[c]['reference']:.0%} in the reference"
                   for c in mostly_nan]
        return stop("schema_drift", f"Columns are mostly missing: {'; '.join(details)}. "
                    "The serving handler fails to compute them for most requests.",
                    nan_share=shares, schema_problems=[f"mostly NaN: {d}" for d in details])

    usable = min(int(np.isfinite(current[c].astype("float64").to_numpy()).sum()) for c in monitored)
    if usable < min_rows:
        return stop("insufficient_data", f"Only {usable} usable requests in the window, fewer than the "
                    f"{min_rows} needed for a meaningful drift test. Wait for more traffic or widen the window.",
                    nan_share=shares)
    return None
