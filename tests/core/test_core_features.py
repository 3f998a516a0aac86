"""The monitoring features shared by ingest (reference), finetune (model reference) and the serving handler."""

import numpy as np
import pytest

from components.core.features import (
    EMBEDDING_COLUMNS,
    FEATURE_COLUMNS,
    PREDICTION_COLUMNS,
    embedding_projection,
    image_features,
    model_reference_features,
)
from components.core.models import Classifier, EncoderSpec


def test_image_features_columns_and_known_values():
    img = np.zeros((1, 1, 4, 4), np.float32)
    img[0, 0, :, 2:] = 1.0  # right half lit
    f = image_features(img).iloc[0]
    assert list(image_features(img).columns) == FEATURE_COLUMNS
    assert f.pixel_mean == pytest.approx(0.5) and f.ink_fraction == pytest.approx(0.5)
    assert f.center_mass_x == pytest.approx(0.75) and f.center_mass_y == pytest.approx(0.5)


def test_blank_image_has_centred_mass():
    f = image_features(np.zeros((1, 1, 8, 8), np.float32)).iloc[0]
    assert (f.center_mass_x, f.center_mass_y) == (0.5, 0.5)


def test_rgb_is_averaged_to_gray():
    rgb = np.random.default_rng(0).random((3, 3, 8, 8)).astype(np.float32)
    gray = rgb.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(image_features(rgb).values, image_features(gray).values, atol=1e-2)


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        image_features(np.zeros((8, 8)))


def test_projection_is_deterministic_and_depends_on_input():
    z = np.random.default_rng(0).standard_normal((5, 128))
    np.testing.assert_array_equal(embedding_projection(z), embedding_projection(z.copy()))
    assert embedding_projection(z).shape == (5, len(EMBEDDING_COLUMNS))
    assert not np.allclose(embedding_projection(z), embedding_projection(z + 1.0))


def test_model_reference_features():
    model = Classifier(EncoderSpec(width=8, embed_dim=16), num_classes=3)
    x = np.random.default_rng(0).random((7, 1, 8, 8)).astype(np.float32)
    ref = model_reference_features(model, x, batch_size=3)
    assert list(ref.columns) == FEATURE_COLUMNS + PREDICTION_COLUMNS + EMBEDDING_COLUMNS
    assert len(ref) == 7 and ref.predicted_class.between(0, 2).all() and ref.confidence.between(1 / 3, 1).all()
