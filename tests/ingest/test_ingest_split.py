"""Ingest's checks and split: the built-in digits source, duplicates, the stratified split and the data card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.core.data import (
    data_card,
    data_card_markdown,
    drop_duplicates,
    load_source,
    split,
    split_indices,
    validate,
)

FRACTIONS = dict(test_fraction=0.2, val_fraction=0.15, pool_fraction=0.2)


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def test_digits_source(digits):
    images, labels, class_names = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert labels.dtype == np.int64 and class_names == [str(d) for d in range(10)]
    assert images.min() == 0.0 and images.max() == 1.0


# ---------------------------------------------------------------------------
# Validation and splitting
# ---------------------------------------------------------------------------


def test_same_label_duplicates_are_removed(digits):
    images, labels, names = digits
    images = np.concatenate([images, images[[5, 5, 9]]])
    labels = np.concatenate([labels, labels[[5, 5, 9]]])
    report = validate(images, labels, names)
    assert report["duplicates_removed"] == 3 and report["duplicate_indices"] == [1797, 1798, 1799]
    clean_x, clean_y = drop_duplicates(images, labels, report)
    assert len(clean_x) == len(clean_y) == 1797
    assert len({x.tobytes() for x in clean_x}) == 1797


def test_split_sizes_stratified_and_disjoint(digits):
    images, labels, names = digits
    idx = split_indices(labels, seed=0, **FRACTIONS)
    n = len(labels)
    sizes = {k: len(v) for k, v in idx.items()}
    for name, fraction in (("test", 0.2), ("val", 0.15), ("pool", 0.2)):
        assert abs(sizes[name] - fraction * n) <= 10, sizes  # per-class rounding, at most 1 per class
    assert sum(sizes.values()) == n
    all_idx = np.concatenate(list(idx.values()))
    assert len(np.unique(all_idx)) == n  # no image in two splits, none lost

    splits = split(images, labels, names, seed=0, **FRACTIONS)
    class_share = np.bincount(labels) / n
    for y in (splits.train_y, splits.val_y, splits.test_y):
        np.testing.assert_allclose(np.bincount(y, minlength=10) / len(y), class_share, atol=0.02)
    seen: set[bytes] = set()
    for x in (splits.train_x, splits.val_x, splits.test_x, splits.pool_x):
        rows = {im.tobytes() for im in x}
        assert not rows & seen
        seen |= rows


def test_split_is_shuffled_and_reproducible(digits):
    images, labels, names = digits
    idx = split_indices(labels, seed=0, **FRACTIONS)
    # Digits are ordered by writer: the test split must come from the whole range, in shuffled order.
    assert idx["test"].min() < 0.05 * len(labels) and idx["test"].max() > 0.95 * len(labels)
    assert not np.all(np.diff(idx["test"]) > 0)
    a = split(images, labels, names, seed=0, **FRACTIONS)
    assert not np.array_equal(a.train_x, images[: len(a.train_x)])
    np.testing.assert_array_equal(a.test_x, images[idx["test"]])

    b = split(images, labels, names, seed=0, **FRACTIONS)
    for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "pool_x"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = split(images, labels, names, seed=1, **FRACTIONS)
    assert not np.array_equal(a.test_y, c.test_y)


def test_data_card(digits):
    images, labels, names = digits
    splits = split(images, labels, names, seed=3, **FRACTIONS)
    card = data_card(splits, "digits", 3, validate(images, labels, names))
    assert sum(card["counts"].values()) == 1797 and card["seed"] == 3
    assert card["image_shape"] == [1, 8, 8] and card["n_classes"] == 10
    for name in ("train", "val", "test"):
        assert sum(card["class_balance"][name].values()) == card["counts"][name]
    stats = card["pixel_stats"]["train"][0]
    assert stats["min"] == 0.0 and stats["max"] == 1.0 and 0.2 < stats["mean"] < 0.4
    json.dumps(card)  # JSON-friendly
    md = data_card_markdown(card)
    assert "| Split | Images | Share |" in md and "| Class | train | val | test |" in md
    assert "| 9 |" in md and "| pool | 0 |" in md
