"""Two-sample Kolmogorov-Smirnov: drift when the p-value is at or below the threshold (as Evidently's ``ks``)."""

from __future__ import annotations

import numpy as np

from components.core.stattests.registry import StatTest, register


def ks(reference: np.ndarray, current: np.ndarray, threshold: float) -> tuple[float, bool]:
    from scipy.stats import ks_2samp

    p_value = float(ks_2samp(reference, current)[1])
    return p_value, p_value <= threshold


KS = register(StatTest(name="ks", display_name="K-S p_value", column_type="numerical", score="p_value", func=ks))
