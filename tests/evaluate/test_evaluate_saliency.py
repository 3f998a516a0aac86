"""Tests of saliency: vanilla and SmoothGrad maps, and the examples picked for the report."""

import numpy as np
import pytest
import torch
from torch import nn

from components.evaluate.saliency import pick_examples, saliency_examples, saliency_maps
from components.train.loops import predict_logits


@pytest.mark.parametrize("samples", [0, 8])
def test_saliency_of_a_linear_model_is_its_weights(samples):
    # For logits = W x + b the gradient of logit k is W[k] everywhere, so vanilla and SmoothGrad both return |W[k]|.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 4, 6))
    images = torch.rand(7, 3, 5, 4)
    targets = torch.arange(7) % 6
    maps = saliency_maps(model, images, targets=targets, samples=samples)
    assert maps.shape == (7, 5, 4)
    expected = model[1].weight.detach()[targets].reshape(7, 3, 5, 4).abs().amax(dim=1).numpy()
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # weights untouched


def test_saliency_of_the_classifier_defaults_to_the_predicted_class(splits, known_model):
    from components.core.models import load_classifier

    model, _ = load_classifier(known_model[0])
    model.train()
    x = splits.test_x[:5]
    maps = saliency_maps(model, x, samples=0)
    predicted = predict_logits(model, x).argmax(1)
    assert maps.shape == (5, 8, 8) and np.all(maps >= 0) and np.all(maps.max(axis=(1, 2)) > 0)
    np.testing.assert_allclose(maps, saliency_maps(model, x, targets=predicted, samples=0), rtol=1e-6)
    assert model.training  # mode restored
    smooth = saliency_maps(model, x, samples=16, seed=3)
    np.testing.assert_array_equal(smooth, saliency_maps(model, x, samples=16, seed=3))  # seeded
    assert not np.allclose(smooth, maps)


def test_pick_examples_takes_confident_mistakes_then_one_correct_per_class():
    y_true = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    y_pred = np.array([0, 0, 1, 2, 2, 2, 1, 0])  # mistakes at 3, 6, 7
    confidences = np.array([0.9, 0.99, 0.8, 0.7, 0.6, 0.95, 0.5, 0.9])
    assert pick_examples(y_true, y_pred, confidences, n=4) == [7, 3, 1, 5]  # 2 mistakes by confidence, then classes 0, 2
    assert pick_examples(y_true, y_pred, confidences, n=6) == [7, 3, 6, 1, 5, 2]
    assert sorted(pick_examples(y_true, y_pred, confidences, n=20)) == list(range(8))


def test_examples_carry_the_grey_image_and_its_map(splits, known_model):
    from components.core.models import load_classifier

    model, _ = load_classifier(known_model[0])
    x, y = splits.test_x[:12], splits.test_y[:12]
    probabilities = torch.softmax(predict_logits(model, x), dim=1).numpy()
    examples = saliency_examples(model, x, y, probabilities, [str(d) for d in range(10)], n=3)
    assert len(examples) == 3
    maps = saliency_maps(model, x[[e["index"] for e in examples]], targets=probabilities.argmax(1)[[e["index"] for e in examples]])
    for e, expected in zip(examples, maps):
        np.testing.assert_allclose(e["image"], x[e["index"]].mean(axis=0), atol=1e-4)
        np.testing.assert_allclose(e["saliency"], expected, atol=1e-6)
        assert e["predicted"] == str(probabilities[e["index"]].argmax()) and e["true"] == str(y[e["index"]])
