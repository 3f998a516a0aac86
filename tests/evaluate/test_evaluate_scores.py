"""Tests of the evaluate step's scores: accuracy, macro F1 and per-class scores against scikit-learn, and
``evaluate`` on a real model (scores, calibration, saliency, the result file and the report)."""

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from components.evaluate.calibration import expected_calibration_error
from components.evaluate.evaluate import RESULT_FILE, evaluate
from components.evaluate.report import REPORT_FILE, render_report_html
from components.evaluate.scores import classification_scores, confusion_matrix
from components.train.loops import predict_logits


def test_scores_match_scikit_learn_with_a_class_never_predicted():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, size=200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 3, size=200))  # class 3 only by luck
    y_pred[y_pred == 3] = 0  # never predicted: precision must be 0, not NaN
    names = ["a", "b", "c", "d"]
    matrix = confusion_matrix(y_true, y_pred, 4)
    scores = classification_scores(matrix, names)
    assert np.array_equal(matrix, skm.confusion_matrix(y_true, y_pred, labels=range(4)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    assert [c["precision"] for c in scores["per_class"]] == pytest.approx(precision)
    assert [c["recall"] for c in scores["per_class"]] == pytest.approx(recall)
    assert [c["f1"] for c in scores["per_class"]] == pytest.approx(f1)
    assert [c["support"] for c in scores["per_class"]] == list(support)
    assert scores["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, labels=range(4), average="macro", zero_division=0))


def test_evaluate_matches_scikit_learn_on_a_known_model(tmp_path, dataset_dir, splits, known_model):
    model_dir, predictions = known_model
    result = evaluate(dataset_dir, model_dir, out_dir=tmp_path)
    assert 0.7 < result["test_accuracy"] < 1.0  # a real, imperfect model: the numbers mean something
    assert result["test_accuracy"] == pytest.approx(skm.accuracy_score(splits.test_y, predictions))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(splits.test_y, predictions, average="macro"))
    assert result["confusion_matrix"] == skm.confusion_matrix(splits.test_y, predictions).tolist()
    precision = skm.precision_score(splits.test_y, predictions, average=None)
    recall = skm.recall_score(splits.test_y, predictions, average=None)
    assert [c["precision"] for c in result["per_class"]] == pytest.approx(precision)
    assert [c["recall"] for c in result["per_class"]] == pytest.approx(recall)
    assert result["class_names"] == splits.class_names
    assert result["n_test"] == len(splits.test_y)
    assert result["model_version"] == "known-1"
    # Calibration from the same softmax outputs, recomputed independently.
    from components.core.models import load_classifier

    probabilities = torch.softmax(predict_logits(load_classifier(model_dir)[0], splits.test_x), 1).numpy()
    assert result["calibration"]["ece"] == pytest.approx(
        expected_calibration_error(probabilities.max(1), probabilities.argmax(1) == splits.test_y), rel=1e-4)
    assert 0 < result["calibration"]["ece"] < 0.5
    # Saliency for 8 images: 4 mistakes (the model makes dozens), then correct ones.
    examples = result["saliency"]
    assert len(examples) == 8 and [e["correct"] for e in examples] == [False] * 4 + [True] * 4
    assert all(splits.class_names[predictions[e["index"]]] == e["predicted"] for e in examples)
    assert json.loads((tmp_path / RESULT_FILE).read_text()) == result
    assert (tmp_path / REPORT_FILE).read_text() == render_report_html(result)
