"""The registry of drift tests: each test file registers one :class:`StatTest` under its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class StatTest:
    """One registered test: ``func(reference, current, threshold) -> (score, drifted)`` on 1-D arrays."""

    name: str  # the id the config, the verdict and Evidently's registry use
    display_name: str  # as Evidently's report labels it
    column_type: str  # "numerical" or "categorical"
    score: str  # "p_value" (small = drift) or "distance" (large = drift)
    func: Callable[[np.ndarray, np.ndarray, float], tuple[float, bool]]

    def __call__(self, reference: np.ndarray, current: np.ndarray, threshold: float) -> tuple[float, bool]:
        score, drifted = self.func(np.asarray(reference), np.asarray(current), threshold)
        return float(score), bool(drifted)


_REGISTRY: dict[str, StatTest] = {}


def register(test: StatTest) -> StatTest:
    if test.name in _REGISTRY and _REGISTRY[test.name] is not test:
        raise ValueError(f"a stattest named {test.name!r} is already registered")
    _REGISTRY[test.name] = test
    return test


def get_stattest(name: str) -> StatTest:
    """The registered test called ``name``; a clear error naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown drift test {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def registered() -> dict[str, StatTest]:
    return dict(_REGISTRY)
