"""Monitor: sampling large windows with a DKW error bound, uniformly over lines, reproducibly."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monitor_traffic import T0, log_records, write_log
from scipy.stats import ks_2samp

from components.core.features import image_features
from components.monitor.sampling import (
    dkw_epsilon,
    dkw_sample_size,
    index_window,
    list_log_files,
    read_index,
    read_window,
    window_seed,
)


def test_dkw_sample_size_and_epsilon():
    assert dkw_sample_size(0.02, 0.01) == 6623 == math.ceil(math.log(2 / 0.01) / (2 * 0.02**2))
    assert dkw_sample_size(0.05, 0.05) == 738
    assert dkw_epsilon(6623, 0.01) <= 0.02 < dkw_epsilon(6622, 0.01) * 1.0001
    for bad in ((0.0, 0.01), (0.02, 1.0), (-1, 0.5)):
        with pytest.raises(ValueError, match="0 < epsilon < 1 and 0 < alpha < 1"):
            dkw_sample_size(*bad)


def write_big_log(path: Path, n: int, rng: np.random.Generator, source_of=None) -> np.ndarray:
    """n compact log lines, one a second from T0, with a skewed pixel_mean; returns the pixel_mean column."""
    values = rng.beta(2.0, 5.0, n)
    with open(path, "w") as f:
        for i, v in enumerate(values):
            record = {"timestamp": (T0 + timedelta(seconds=i)).isoformat(timespec="milliseconds"), "model_version": "1",
                      "source": source_of(i) if source_of else "client", "pixel_mean": float(v)}
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    return values


def _sup_cdf_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(ks_2samp(a, b).statistic)


def test_sampling_error_stays_within_the_dkw_bound(tmp_path):
    # The claim: with n = ln(2/alpha) / (2 eps^2) rows, sup|F_sample - F_window| <= eps with probability
    # >= 1 - alpha, so KS(reference, sample) is within eps of KS(reference, window). Checked on 200 samples.
    rng = np.random.default_rng(0)
    window = write_big_log(tmp_path / "big.jsonl", 20_000, rng)
    reference = rng.beta(2.2, 5.0, 1000)  # slightly different, so the KS statistic is not ~0
    eps, alpha, repeats = 0.05, 0.05, 200
    index = index_window(list_log_files(tmp_path))
    try:
        cdf_errors, ks_errors = [], []
        ks_window = _sup_cdf_distance(reference, window)
        for seed in range(repeats):
            sample = read_index(index, epsilon=eps, alpha=alpha, seed=seed)
            assert sample.sampled and len(sample.frame) == dkw_sample_size(eps, alpha) == 738
            values = sample.frame["pixel_mean"].to_numpy()
            cdf_errors.append(_sup_cdf_distance(values, window))
            ks_errors.append(abs(_sup_cdf_distance(reference, values) - ks_window))
    finally:
        index.close()
    # Binomial(200, 0.05): mean 10, P(> 20) < 0.2%.
    assert sum(e > eps for e in cdf_errors) <= 20, sorted(cdf_errors)[-25:]
    assert sum(e > eps for e in ks_errors) <= sum(e > eps for e in cdf_errors)  # the triangle inequality
    assert np.mean(cdf_errors) > eps / 4, "the bound is not vacuous: sampling does move the CDF"


def test_a_sample_below_the_bound_size_misses_it_more_often(tmp_path):
    # The negative control of the test above: a tenth of the rows breaks the bound far more often than alpha.
    rng = np.random.default_rng(1)
    window = write_big_log(tmp_path / "big.jsonl", 20_000, rng)
    index = index_window(list_log_files(tmp_path))
    try:
        eps = 0.05
        too_small = dkw_epsilon(74, 0.05)  # what read_index is asked for to draw 74 rows
        errors = [_sup_cdf_distance(read_index(index, epsilon=too_small, alpha=0.05, seed=s).frame["pixel_mean"].to_numpy(),
                                    window) for s in range(100)]
    finally:
        index.close()
    assert sum(e > eps for e in errors) > 30


def test_sampling_is_uniform_over_lines_not_bytes_and_rejects_excluded_sources(tmp_path):
    # Long and short lines, with the long ones all pixel_mean 1.0: a byte-offset sampler would
    # over-draw them. A third of the lines are smoke tests, which must never be sampled.
    lines = []
    for i in range(30_000):
        long = i % 2 == 0
        record = {"timestamp": (T0 + timedelta(milliseconds=10 * i)).isoformat(timespec="milliseconds"),
                  "model_version": "1", "source": "smoke-test" if i % 3 == 0 else "client",
                  "predicted_label": "x" * (600 if long else 1), "pixel_mean": 1.0 if long else 0.0}
        lines.append(json.dumps(record, separators=(",", ":")))
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    sample = read_window(tmp_path, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05, alpha=0.05)
    assert sample.sampled and len(sample.frame) == 738 and set(sample.frame["source"]) == {"client"}
    share_long = sample.frame["pixel_mean"].mean()
    assert abs(share_long - 0.5) < 4 * 0.5 / math.sqrt(738), share_long  # 4 sigma
    assert sample.rows_in_window == sample.rows_of_version == 30_000
    assert abs(sample.rows_selected - 20_000) < 20_000 * 0.1  # estimated from the accepted share
    assert sample.stats()["rows_selected_estimated"] is True
    again = read_window(tmp_path, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05, alpha=0.05)
    pd.testing.assert_frame_equal(sample.frame, again.frame)  # seeded by (version, window): reproducible
    other = read_window(tmp_path, T0, model_version="1", keep=lambda r: r["source"] != "smoke-test", epsilon=0.05,
                        alpha=0.05)
    assert window_seed("1", T0, None) != window_seed("1", None, None) and not other.frame.equals(sample.frame)


def test_small_windows_are_read_whole(tmp_path, held_out):
    write_log(tmp_path / "r.jsonl", log_records(image_features(held_out[:100]), T0))
    sample = read_window(tmp_path, epsilon=0.05, alpha=0.05)
    assert not sample.sampled and len(sample.frame) == 100 and sample.epsilon == 0.0
    assert sample.sampling()["bound"].startswith("exact")
