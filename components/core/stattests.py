"""The statistical tests behind the three groups of checks, and how Evidently knows them.

* **Image features: Kolmogorov-Smirnov** per feature at p < 0.05. Above 1000 reference
  rows Evidently's default switches to the normed Wasserstein distance with a fixed 0.1
  threshold, which ignores the window size: it calls small clean windows drifted
  (``test_evidently_default_method_calls_a_clean_small_window_drift``). KS keeps its
  false-alarm rate at every window size.
* **Predictions: a two-sample chi-square** test of homogeneity on the class counts, and KS
  on the confidence, each at p < 0.005 (Bonferroni: 0.01 for the group). Evidently's own
  ``chisquare`` is a goodness-of-fit test that takes the reference's class shares as
  exact, so a large window against a small reference drifts on the reference's own
  sampling noise; the two-sample test is registered with Evidently by name instead.
* **Embedding: a classifier test** (:func:`embedding_drift`). Evidently's ``EmbeddingsDrift``
  metric runs t-SNE for its plot, far over the time budget, and KS per projection column
  would decide nothing, so the projection is judged as a whole and left out of the
  per-column report.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from components.core.features import EMBEDDING_COLUMNS

DRIFT_METHOD = "ks"  # the image features' per-column test, instead of Evidently's size-blind default
DRIFT_THRESHOLD = 0.05  # KS p-value below which a feature counts as drifted
PREDICTION_METHOD = "chi2_two_sample"  # registered with Evidently by register_stattests
PREDICTION_ALPHA = 0.005  # per prediction test (class counts, confidence): 0.01 for the group
EMBEDDING_ALPHA = 0.01  # the classifier test on the embedding projection
EMBEDDING_METHOD = ("Evidently ModelDriftMethod (SGD logistic classifier on the standardised projection and its "
                    "squares, ROC AUC on a held-out half) with a Mann-Whitney p-value")


def chi2_two_sample(reference_data: pd.Series, current_data: pd.Series, feature_type: Any,
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


def register_stattests() -> None:
    """Make the two-sample chi-square known to Evidently by name (its reports refer to tests by name)."""
    global _registered
    if _registered:
        return
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(StatTest(name=PREDICTION_METHOD, display_name="chi-square two-sample p_value",
                               allowed_feature_types=[ColumnType.Categorical]), default_impl=chi2_two_sample)
    _registered = True


def is_p_value(method: str) -> bool:
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


def embedding_drift(reference: pd.DataFrame, current: pd.DataFrame, alpha: float = EMBEDDING_ALPHA) -> dict[str, Any]:
    """Multivariate drift of the embedding projection: can a classifier tell window rows from reference rows?

    Evidently's ``ModelDriftMethod`` trains its SGD logistic classifier on a random half of
    the pooled rows and reports the ROC AUC on the other half. With no drift the classifier
    is independent of that half's labels, so the AUC is a Mann-Whitney U / (n0 n1) with
    mean 0.5 and variance (n0 + n1 + 1) / (12 n0 n1): its one-sided p-value decides
    (``alpha``), a size-aware rule where Evidently's fixed AUC 0.55 and its bootstrap are
    not. Inputs are standardised with the reference's mean and spread, plus their squares,
    so a change in spread (noise) is as visible to the linear classifier as a shift.
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


def confidence_drift(reference: Any, current: Any, alpha: float = PREDICTION_ALPHA) -> dict[str, Any]:
    """The monitor's confidence test (Evidently's registered KS) on two samples of prediction confidence:
    ``{"method", "p_value", "alpha", "drifted"}``. Used by the monitor's report and the rollout's criteria."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    reference, current = pd.Series(np.asarray(reference, dtype=float)), pd.Series(np.asarray(current, dtype=float))
    test = get_stattest(reference, current, ColumnType.Numerical, "ks")
    result = test(reference, current, ColumnType.Numerical, alpha)
    return {"method": test.display_name, "p_value": float(result.drift_score), "alpha": alpha,
            "drifted": bool(result.drifted)}
