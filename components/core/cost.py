"""What a step cost: wall, CPU and GPU seconds and peak memory.

Every component wraps its work in ``measure()`` and logs the result into its
KFP ``Metrics`` output, so the costs show in the UI and in ``summary.json``.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator


@dataclass
class Cost:
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0  # wall time while a CUDA device was in use; 0 on CPU
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {f"cost_{k}": round(v, 3) for k, v in asdict(self).items()}


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def measure(gpu: bool = True) -> Iterator[Cost]:
    """Measure the block; the yielded Cost is filled in when the block ends (also on error). ``gpu=False``: a step
    that never touches torch, which is then not imported either (it takes seconds and hundreds of MB)."""
    cost = Cost()
    cuda = False
    try:
        if gpu:
            import torch

            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    t0, c0 = time.perf_counter(), os.times()
    try:
        yield cost
    finally:
        c1 = os.times()
        cost.wall_seconds = time.perf_counter() - t0
        cost.cpu_seconds = (c1.user - c0.user) + (c1.system - c0.system)
        cost.peak_rss_mb = _peak_rss_mb()
        if cuda:
            import torch

            torch.cuda.synchronize()
            cost.gpu_seconds = cost.wall_seconds
            cost.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


METRIC_TYPES = "metric_types"  # metadata key: which logged numbers were booleans or counts


def log_metrics(metrics, values: dict[str, float]) -> None:
    """Log numbers into a KFP Metrics artifact (skips non-finite and non-numeric values).

    KFP keeps every metric as a float; the metadata entry ``metric_types`` records which were booleans ("bool") or
    counts ("int"), so readers (``summary.json``) give them back their type."""
    import math

    import numpy as np

    types = metrics.metadata.get(METRIC_TYPES) or {}
    for k, v in values.items():
        kind = ("bool" if isinstance(v, (bool, np.bool_)) else
                "int" if isinstance(v, (int, np.integer)) else None)
        if kind == "bool" or isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
            metrics.log_metric(k, float(v))
            if kind:
                types[k] = kind
    if types:
        metrics.metadata[METRIC_TYPES] = types


def typed_metrics(metadata: dict) -> dict:
    """A Metrics artifact's metadata with booleans and counts as logged (see ``log_metrics``), without the types."""
    types = metadata.get(METRIC_TYPES) or {}
    out = {}
    for k, v in metadata.items():
        if k == METRIC_TYPES:
            continue
        kind = types.get(k)
        out[k] = bool(v) if kind == "bool" else int(v) if kind == "int" and float(v).is_integer() else v
    return out
