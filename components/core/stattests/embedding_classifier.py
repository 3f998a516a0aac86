"""Multivariate drift of the embedding projection: can a classifier tell window rows from reference rows?

The steps of Evidently's ``ModelDriftMethod``, done here with scikit-learn so that the check does not
import Evidently (seconds in a fresh process): an SGD logistic classifier trained on a random half of
the pooled rows (seed 42), its ROC AUC on the other half. A test pins the AUC to Evidently's own.
With no drift the classifier is independent of the held-out half's labels, so the AUC is a
Mann-Whitney U / (n0 n1) with mean 0.5 and variance (n0 + n1 + 1) / (12 n0 n1): its one-sided p-value
decides, a size-aware rule where Evidently's fixed AUC 0.55 and its bootstrap are not. Inputs are
standardised with the reference's mean and spread, plus their squares, so a change in spread (noise)
is as visible to the linear classifier as a shift.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

from components.core.features import EMBEDDING_COLUMNS

EMBEDDING_METHOD = ("Evidently ModelDriftMethod (SGD logistic classifier on the standardised projection and its "
                    "squares, ROC AUC on a held-out half) with a Mann-Whitney p-value")
EMBEDDING_ALPHA = 0.01  # p-value below which the embedding drifts
SPLIT_SEED = 42  # ModelDriftMethod's split and classifier seed


def _finite_rows(df: pd.DataFrame) -> np.ndarray:
    values = df[EMBEDDING_COLUMNS].to_numpy(dtype="float64")
    return values[np.isfinite(values).all(axis=1)]


def classifier_auc(reference: np.ndarray, current: np.ndarray) -> tuple[float, np.ndarray]:
    """ROC AUC of telling reference rows (label 1) from current rows (0) on the held-out half, and that half."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    pooled = np.concatenate([reference, current])
    labels = np.concatenate([np.ones(len(reference), dtype=np.int64), np.zeros(len(current), dtype=np.int64)])
    rows = np.arange(len(pooled))
    train, test = train_test_split(rows, test_size=0.5, random_state=SPLIT_SEED, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SGD convergence notes on tiny windows
        classifier = SGDClassifier(loss="log_loss", random_state=SPLIT_SEED).fit(pooled[train], labels[train])
    if len(np.unique(labels[test])) < 2:
        return 0.5, test
    return float(roc_auc_score(labels[test], classifier.predict_proba(pooled[test])[:, 1])), test


def embedding_drift(reference: pd.DataFrame, current: pd.DataFrame, alpha: float = EMBEDDING_ALPHA) -> dict[str, Any]:
    """The embedding group's verdict: AUC, its p-value against chance, drifted when p < ``alpha``."""
    from scipy.stats import norm

    ref, cur = _finite_rows(reference), _finite_rows(current)
    m, n = len(ref), len(cur)
    mean, spread = ref.mean(axis=0), ref.std(axis=0)
    spread[spread == 0.0] = 1.0

    def design(values: np.ndarray) -> np.ndarray:
        z = (values - mean) / spread
        return np.concatenate([z, z**2], axis=1)

    auc, test_rows = classifier_auc(design(ref), design(cur))
    n_ref_test = int((test_rows < m).sum())
    n_cur_test = len(test_rows) - n_ref_test
    if n_ref_test == 0 or n_cur_test == 0:
        p_value = 1.0
    else:
        sd = math.sqrt((n_ref_test + n_cur_test + 1) / (12.0 * n_ref_test * n_cur_test))
        p_value = float(norm.sf((auc - 0.5) / sd))
    return {
        "columns": list(EMBEDDING_COLUMNS),
        "method": EMBEDDING_METHOD,
        "auc": round(auc, 6),
        "p_value": p_value,
        "threshold": alpha,
        "drifted": bool(p_value < alpha),
        "reference_rows": m,
        "current_rows": n,
        "held_out_rows": {"reference": n_ref_test, "current": n_cur_test},
    }
