"""The drift tests over the three groups of checks, run through Evidently, and the verdict they give.

* **image features** (``FEATURE_COLUMNS``, reference ``reference.csv`` from ingest): KS per
  feature through Evidently's ``DataDriftPreset``; the group drifts when at least
  ``drift_share`` of the features drift. One drifted feature alone does not make a window
  drifted: with 8 features at p < 0.05 a clean window often shows one by chance.
* **predictions** (``predicted_class``, ``confidence``; reference ``reference_model.csv``
  written with the model): two-sample chi-square on the class counts, KS on the confidence.
* **embedding** (``emb_0..emb_7``): the classifier test of :func:`embedding_drift`.

The window is drifted when any group is; the tests themselves are in ``stattests``.
Evidently always gets an explicit data definition.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from components.core.features import EMBEDDING_COLUMNS, FEATURE_COLUMNS, PREDICTION_COLUMNS
from components.core.stattests import (
    DRIFT_METHOD,
    DRIFT_THRESHOLD,
    PREDICTION_ALPHA,
    PREDICTION_METHOD,
    embedding_drift,
    is_p_value,
    register_stattests,
)
from components.monitor.guards import MIN_ROWS, check_window, nan_share
from components.monitor.verdict import Verdict, drift_message

CATEGORICAL_COLUMNS = ["predicted_class"]
GROUPS = {"image_features": FEATURE_COLUMNS, "prediction": PREDICTION_COLUMNS, "embedding": EMBEDDING_COLUMNS}


def _finite_or_none(x: Any) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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
            score_key = "p_value" if is_p_value(method) else "score"
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
                 min_rows: int = MIN_ROWS, model_reference: pd.DataFrame | None = None) -> tuple[dict[str, Any], Any]:
    """Run the guards, then Evidently's DataDriftPreset (and the embedding test with a model reference).

    Returns ``(verdict_dict, snapshot)``; the snapshot is None when a guard stopped the run.
    ``drift_share`` is the share of drifted image features at or above which that group
    drifts. ``method``/``threshold`` are Evidently's per-column test for the image features
    and its threshold; None lets Evidently pick (see ``stattests`` for why KS).
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

    register_stattests()
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
    shares = {c: {"reference": round(nan_share((reference if c in FEATURE_COLUMNS else model_reference)[c]), 4),
                  "current": round(nan_share(current[c]), 4)}
              for c in [*columns, *(EMBEDDING_COLUMNS if with_model else [])]}
    verdict = Verdict(status="drift" if detected else "ok",
                      message=drift_message(groups, features, detected, drift_share),
                      reference_rows=len(reference), current_rows=len(cur), drift_detected=detected,
                      drifted_features=drifted, drift_share=round(share, 4), drift_share_threshold=drift_share,
                      checks=checks, groups=groups, features=features, nan_share=shares)
    return verdict.to_dict(), snapshot
