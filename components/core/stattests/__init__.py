"""The monitor's statistical tests, one small file each, in one registry.

Each test takes a reference sample and a current one (NaN and infinities already dropped) and a
threshold, and returns ``(score, drifted)``. The monitor's verdict comes from these directly: numpy
and scipy on the sample, a few milliseconds, no Evidently import. Evidently's HTML report runs the
same tests, registered with it by name (:func:`register_with_evidently`), so its tables show the
numbers the verdict used; a test pins the two to each other.

* **Image features: Kolmogorov-Smirnov** (``ks``) per feature at p <= 0.05. Above 1000 reference
  rows Evidently's default switches to the normed Wasserstein distance with a fixed 0.1
  threshold, which ignores the window size: it calls small clean windows drifted
  (``test_evidently_default_method_calls_a_clean_small_window_drift``). KS keeps its
  false-alarm rate at every window size.
* **Predictions: a two-sample chi-square** test of homogeneity on the class counts
  (``chi2_two_sample``), and KS on the confidence, each at p < 0.005 (Bonferroni: 0.01 for the
  group). Evidently's own ``chisquare`` is a goodness-of-fit test that takes the reference's class
  shares as exact, so a large window against a small reference drifts on the reference's own
  sampling noise.
* **Embedding: a classifier test** (:func:`embedding_drift`, ``embedding_classifier.py``). Evidently's
  ``EmbeddingsDrift`` metric runs t-SNE for its plot, far over the time budget, and KS per projection
  column would decide nothing, so the projection is judged as a whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.core.stattests import ks as _ks  # noqa: F401  (registers "ks")
from components.core.stattests.chi2_two_sample import chi2_two_sample  # noqa: F401  (registers it)
from components.core.stattests.embedding_classifier import EMBEDDING_ALPHA, EMBEDDING_METHOD, embedding_drift  # noqa: F401
from components.core.stattests.registry import StatTest, get_stattest, register, registered  # noqa: F401

DRIFT_METHOD = "ks"  # the image features' per-column test, instead of Evidently's size-blind default
DRIFT_THRESHOLD = 0.05  # KS p-value at or below which a feature counts as drifted
PREDICTION_METHOD = "chi2_two_sample"  # the class counts' test
PREDICTION_ALPHA = 0.005  # per prediction test (class counts, confidence): 0.01 for the group


_evidently_registered = False


def register_with_evidently() -> None:
    """Make our tests known to Evidently by name, for its report (Evidently's own ``ks`` is the same scipy call)."""
    global _evidently_registered
    if _evidently_registered:
        return
    from evidently.legacy.calculations.stattests.registry import StatTest as EvidentlyStatTest
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest, register_stattest
    from evidently.legacy.core import ColumnType

    for test in registered().values():
        column_type = ColumnType.Numerical if test.column_type == "numerical" else ColumnType.Categorical
        try:
            get_registered_stattest(test.name, column_type)
            continue  # Evidently ships it (ks): its own implementation, pinned equal to ours by a test
        except Exception:
            pass

        def evidently_impl(reference_data: Any, current_data: Any, feature_type: Any, threshold: float,
                           test: StatTest = test) -> tuple[float, bool]:
            return test(reference_data.to_numpy(), current_data.to_numpy(), threshold)

        register_stattest(EvidentlyStatTest(name=test.name, display_name=test.display_name,
                                            allowed_feature_types=[column_type]), default_impl=evidently_impl)
    _evidently_registered = True


def confidence_drift(reference: Any, current: Any, alpha: float = PREDICTION_ALPHA) -> dict[str, Any]:
    """The monitor's confidence test (KS) on two samples of prediction confidence:
    ``{"method", "p_value", "alpha", "drifted"}``. Used by the rollout's criteria."""
    test = get_stattest("ks")
    reference, current = _finite(reference), _finite(current)
    p_value, drifted = test(reference, current, alpha)
    return {"method": test.display_name, "p_value": p_value, "alpha": alpha, "drifted": drifted}


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


