"""Chi-square test of homogeneity: are two SAMPLES' category counts from one distribution?

Unlike Evidently's ``chisquare`` (goodness of fit against the reference shares taken as exact), it
allows for the reference being a sample too, so a large window against a small reference is not
called drifted for the reference's own sampling noise. Drift when p < threshold.
"""

from __future__ import annotations

import numpy as np

from components.core.stattests.registry import StatTest, register


def chi2_two_sample(reference: np.ndarray, current: np.ndarray, threshold: float) -> tuple[float, bool]:
    from scipy.stats import chi2_contingency

    reference, current = np.asarray(reference).astype(str), np.asarray(current).astype(str)
    if len(reference) == 0 or len(current) == 0:
        return 1.0, False
    keys, codes = np.unique(np.concatenate([reference, current]), return_inverse=True)
    if len(keys) < 2:
        return 1.0, False
    table = np.stack([np.bincount(codes[:len(reference)], minlength=len(keys)),
                      np.bincount(codes[len(reference):], minlength=len(keys))]).astype(float)
    p_value = float(chi2_contingency(table, correction=False)[1])
    return p_value, p_value < threshold


CHI2_TWO_SAMPLE = register(StatTest(name="chi2_two_sample", display_name="chi-square two-sample p_value",
                                    column_type="categorical", score="p_value", func=chi2_two_sample))
