"""Tests of the leakage check: exact and near-duplicate images shared by train and test."""

import numpy as np
import pytest

from components.privacy.leakage import average_hash, find_leaks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_leakage_finds_planted_exact_and_near_duplicates_and_not_distinct_images(splits):
    train, test = splits.train_x[:300].copy(), splits.test_x[:200].copy()
    rng = np.random.default_rng(0)
    test[10] = train[7]  # exact copy
    test[20] = np.clip(train[8] + rng.normal(0, 0.01, train[8].shape), 0, 1)  # re-encoded: faint noise
    test[30] = np.clip(train[9] + 0.02, 0, 1)  # a little brighter
    test[40] = np.round(train[11] * 255) / 255  # 8-bit quantised: still an exact copy
    result = find_leaks(train, test, max_distance=0.03)
    found = {p["test_index"]: p for p in result["pairs"]}
    assert set(found) == {10, 20, 30, 40}, result["pairs"]  # and no distinct digit is flagged
    assert found[10]["train_index"] == 7 and found[10]["kind"] == "exact" and found[10]["distance"] == 0.0
    assert found[40]["kind"] == "exact" and found[40]["train_index"] == 11
    assert found[20]["kind"] == "near" and found[20]["train_index"] == 8 and 0 < found[20]["distance"] <= 0.03
    assert found[30]["kind"] == "near" and found[30]["train_index"] == 9
    assert result["n_exact_duplicates"] == 2 and result["n_near_duplicates"] == 2 and result["n_leaks"] == 4
    assert [p["distance"] for p in result["pairs"]] == sorted(p["distance"] for p in result["pairs"])


def test_real_digits_splits_have_no_leaks_and_a_clear_margin(splits):
    result = find_leaks(splits.train_x, splits.test_x)
    assert result["n_leaks"] == 0
    assert result["nearest_distance"] > 2 * result["near_duplicate_distance"]  # distinct digits are far apart


def test_average_hash_ignores_brightness_and_separates_different_images(splits):
    x = splits.train_x[:50]
    h = average_hash(x)
    assert h.dtype == np.uint64 and len(np.unique(h)) > 40
    assert np.array_equal(average_hash(np.clip(x * 0.8 + 0.1, 0, 1)), h)  # contrast/brightness: same hash
    big = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)  # the same images at 32x32
    assert np.array_equal(average_hash(big), h)
