"""The drift tests over the three groups of checks, the verdict they give, and Evidently's report of them.

* **image features** (``FEATURE_COLUMNS``, reference ``reference.csv`` from ingest): KS per
  feature; the group drifts when at least ``drift_share`` of the features drift. One drifted
  feature alone does not make a window drifted: with 8 features at p <= 0.05 a clean window
  often shows one by chance.
* **predictions** (``predicted_class``, ``confidence``; reference ``reference_model.csv``
  written with the model): two-sample chi-square on the class counts, KS on the confidence.
* **embedding** (``emb_0..emb_7``): the classifier test of :func:`embedding_drift`.

The window is drifted when any group is. :func:`drift_verdict` runs the registered tests of
``stattests`` on the window directly (milliseconds on a sample); :func:`evidently_snapshot`
runs Evidently's ``DataDriftPreset`` with the same tests for the HTML report, and
:func:`evidently_disagreements` says where its decisions differ from the verdict's (a test
keeps that empty). Evidently always gets an explicit data definition.
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
    get_stattest,
    register_with_evidently,
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


def _group_of(column: str) -> str:
    return next(g for g, cols in GROUPS.items() if column in cols)


def _finite_values(df: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype="float64")
    values = values[np.isfinite(values)]
    return values.astype(np.int64).astype(str) if column in CATEGORICAL_COLUMNS else values


def column_drift(reference: pd.DataFrame, current: pd.DataFrame, column: str, method: str,
                 threshold: float) -> dict[str, Any]:
    """One column's test on its finite values (NaN and infinities dropped, as Evidently does)."""
    test = get_stattest(method)
    ref, cur = _finite_values(reference, column), _finite_values(current, column)
    if len(ref) == 0 or len(cur) == 0:
        raise ValueError(f"column {column} has no finite values in the {'reference' if len(ref) == 0 else 'window'}; "
                         "the guards (check_window) should have stopped this window")
    score, drifted = test(ref, cur, threshold)
    return {"method": test.name, test.score if test.score == "p_value" else "score": _finite_or_none(score),
            "threshold": threshold, "drifted": drifted, "reference_rows": len(ref), "current_rows": len(cur),
            "group": _group_of(column)}


def drift_verdict(reference: pd.DataFrame, current: pd.DataFrame, drift_share: float = 0.5,
                  method: str = DRIFT_METHOD, threshold: float = DRIFT_THRESHOLD, min_rows: int = MIN_ROWS,
                  model_reference: pd.DataFrame | None = None) -> dict[str, Any]:
    """Run the guards, then the tests of each group; return the verdict (``Verdict.to_dict()``).

    ``drift_share`` is the share of drifted image features at or above which that group drifts;
    ``method``/``threshold`` the image features' registered per-column test and its threshold.
    ``model_reference`` (``reference_model.csv``) adds the prediction and embedding groups.
    """
    if not 0.0 < drift_share <= 1.0:
        raise ValueError(f"drift_share must be in (0, 1], got {drift_share}")
    get_stattest(method)  # an unknown name fails before any work
    with_model = model_reference is not None
    checks = ["image_features", *(["prediction", "embedding"] if with_model else [])]
    stopped = check_window(reference, current, min_rows=min_rows, model_reference=model_reference)
    if stopped is not None:
        stopped.drift_share_threshold = drift_share
        stopped.checks = checks
        return stopped.to_dict()

    features = {c: column_drift(reference, current, c, method, threshold) for c in FEATURE_COLUMNS}
    if with_model:
        features["predicted_class"] = column_drift(model_reference, current, "predicted_class", PREDICTION_METHOD,
                                                   PREDICTION_ALPHA)
        features["confidence"] = column_drift(model_reference, current, "confidence", "ks", PREDICTION_ALPHA)
    columns = list(features)

    image_drifted = [c for c in FEATURE_COLUMNS if features[c]["drifted"]]
    share = len(image_drifted) / len(FEATURE_COLUMNS)
    groups: dict[str, dict[str, Any]] = {"image_features": {
        "columns": list(FEATURE_COLUMNS), "drifted": share >= drift_share, "drifted_columns": image_drifted,
        "share": round(share, 4), "threshold": drift_share,
        "rule": f"drifted when at least {drift_share:.0%} of the features drift (per-feature test: {method})",
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
    shares = {c: {"reference": round(nan_share((reference if c in FEATURE_COLUMNS else model_reference)[c]), 4),
                  "current": round(nan_share(current[c]), 4)}
              for c in [*columns, *(EMBEDDING_COLUMNS if with_model else [])]}
    verdict = Verdict(status="drift" if detected else "ok",
                      message=drift_message(groups, features, detected, drift_share),
                      reference_rows=len(reference), current_rows=len(current), drift_detected=detected,
                      drifted_features=drifted, drift_share=round(share, 4), drift_share_threshold=drift_share,
                      checks=checks, groups=groups, features=features, nan_share=shares)
    return verdict.to_dict()


# ---------------------------------------------------------------------------
# Evidently's report of the same tests


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


def evidently_snapshot(reference: pd.DataFrame, current: pd.DataFrame, verdict: dict[str, Any],
                       model_reference: pd.DataFrame | None = None):
    """Evidently's ``DataDriftPreset`` on the window with the verdict's tests and thresholds (for the HTML report).

    None when the guards stopped the window (no test ran, so there is nothing to report).
    """
    if verdict["status"] not in ("ok", "drift"):
        return None
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    register_with_evidently()
    features = verdict["features"]
    with_model = model_reference is not None and "prediction" in verdict["groups"]
    columns = [*FEATURE_COLUMNS, *(PREDICTION_COLUMNS if with_model else [])]
    image = features[FEATURE_COLUMNS[0]]
    ref = _monitored_frame(reference, FEATURE_COLUMNS)
    if with_model:  # two references of different lengths side by side; Evidently drops NaN per column
        ref = pd.concat([ref, _monitored_frame(model_reference, PREDICTION_COLUMNS)], axis=1)
    cur = _monitored_frame(current, columns)
    definition = DataDefinition(numerical_columns=[c for c in columns if c not in CATEGORICAL_COLUMNS],
                                categorical_columns=[c for c in columns if c in CATEGORICAL_COLUMNS])
    preset = DataDriftPreset(
        columns=columns, drift_share=verdict["drift_share_threshold"], num_method=image["method"],
        num_threshold=image["threshold"], cat_method=PREDICTION_METHOD if with_model else None,
        per_column_threshold={c: PREDICTION_ALPHA for c in PREDICTION_COLUMNS} if with_model else None,
    )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Constant columns (pixel_min is always 0 on digits) make Evidently's correlation plots divide by 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report([preset], include_tests=True).run(Dataset.from_pandas(cur, data_definition=definition),
                                                        Dataset.from_pandas(ref, data_definition=definition))


def snapshot_columns(snapshot) -> dict[str, dict[str, Any]]:
    """Per column, Evidently's method, score and decision from a snapshot of :func:`evidently_snapshot`.

    ``snapshot.dict()`` holds one ``ValueDrift`` metric per column (value = drift score, config =
    method and threshold) and, with ``include_tests=True``, one test per ValueDrift metric whose FAIL
    status is Evidently's own "drift detected" decision for that column.
    """
    result = snapshot.dict()
    failed = {t["metric_config"]["metric_id"]: t["status"] == "FAIL" for t in result["tests"]}
    columns: dict[str, dict[str, Any]] = {}
    for metric in result["metrics"]:
        if metric["config"]["type"].endswith(":ValueDrift"):
            column = metric["config"]["column"]
            if metric["id"] not in failed:
                raise RuntimeError(f"Evidently returned no drift test for column {column}; was include_tests lost?")
            columns[column] = {"method": metric["config"]["method"], "score": _finite_or_none(metric["value"]),
                               "drifted": bool(failed[metric["id"]])}
    return columns


def evidently_disagreements(verdict: dict[str, Any], snapshot) -> list[str]:
    """Where Evidently's report decides a column differently from the verdict (or scores it differently)."""
    problems = []
    reported = snapshot_columns(snapshot)
    for column, ours in verdict["features"].items():
        theirs = reported.get(column)
        if theirs is None:
            problems.append(f"{column}: not in Evidently's report")
            continue
        score = ours.get("p_value", ours.get("score"))
        if theirs["drifted"] != ours["drifted"] or theirs["method"] != ours["method"] or not (
                score is None and theirs["score"] is None
                or score is not None and theirs["score"] is not None and math.isclose(score, theirs["score"],
                                                                                       rel_tol=1e-9, abs_tol=1e-300)):
            problems.append(f"{column}: verdict {ours['method']} {score} drifted={ours['drifted']}, Evidently "
                            f"{theirs['method']} {theirs['score']} drifted={theirs['drifted']}")
    return problems
