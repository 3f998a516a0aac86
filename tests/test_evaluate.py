"""Tests of the evaluate step: scores against scikit-learn, the HTML report, the KFP component and its gate."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from kfp import dsl
from sklearn import metrics as skm
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from components.data import Splits, save_splits
from components.evaluate import (
    REPORT_FILE,
    RESULT_FILE,
    classification_scores,
    confusion_matrix,
    evaluate,
    evaluate_component,
    render_report_html,
)
from components.models import Classifier, EncoderSpec, save_classifier
from components.training import predict_logits


def digits_splits(seed: int = 0) -> Splits:
    """Digits split like ingest does it (test 0.2, val 0.15, pool 0.2, stratified), without depending on ingest."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    n = len(y)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=round(0.2 * n), stratify=y, random_state=seed)
    rest_x, val_x, rest_y, val_y = train_test_split(rest_x, rest_y, test_size=round(0.15 * n), stratify=rest_y, random_state=seed)
    train_x, pool_x, train_y, _ = train_test_split(rest_x, rest_y, test_size=round(0.2 * n), stratify=rest_y, random_state=seed)
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, pool_x, [str(d) for d in range(10)])


@pytest.fixture(scope="module")
def splits() -> Splits:
    return digits_splits()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("digits")
    save_splits(splits, out)
    return out


@pytest.fixture(scope="module")
def known_model(tmp_path_factory, splits):
    """A good-but-imperfect classifier without training: a random encoder with a logistic-regression head."""
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(1, 8, width=32, embed_dim=128), num_classes=10).eval()
    with torch.no_grad():
        features = model.embed(torch.from_numpy(splits.train_x)).numpy()
    mean, std = features.mean(0), features.std(0) + 1e-6
    probe = LogisticRegression(max_iter=1000).fit((features - mean) / std, splits.train_y)
    with torch.no_grad():  # fold the standardisation into the linear head
        model.head.weight.copy_(torch.from_numpy(probe.coef_ / std).float())
        model.head.bias.copy_(torch.from_numpy(probe.intercept_ - (probe.coef_ * mean / std).sum(1)).float())
    out = tmp_path_factory.mktemp("model")
    save_classifier(model, out, {"class_names": splits.class_names, "model_version": "known-1"})
    predictions = predict_logits(model, splits.test_x).argmax(1).numpy()
    return out, predictions


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
    assert scores["test_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))


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
    assert json.loads((tmp_path / RESULT_FILE).read_text()) == result
    assert (tmp_path / REPORT_FILE).read_text() == render_report_html(result)


def test_report_is_self_contained_and_shows_the_numbers():
    result = {
        "test_accuracy": 0.75, "macro_f1": 0.7333, "n_test": 4, "model_version": "abc123",
        "class_names": ["cat", "<dog>"],
        "per_class": [
            {"class": "cat", "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
            {"class": "<dog>", "precision": 0.6667, "recall": 1.0, "f1": 0.8, "support": 2},
        ],
        "confusion_matrix": [[1, 1], [0, 2]],
    }
    page = render_report_html(result)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "75.00%" in page and "0.733" in page and "abc123" in page
    assert "&lt;dog&gt;" in page and "<dog>" not in page  # class names are escaped
    assert not re.search(r"(src|href)\s*=|<link|@import|url\(", page)  # no external assets
    # Every matrix cell is coloured: correct ones green, mistakes red, zeros plain.
    assert page.count("rgba(46, 160, 67") == 2 and page.count("rgba(215, 58, 73") == 1
    assert ">1</td>" in page and ">2</td>" in page


def _artifacts(tmp_path, dataset_dir, model_dir):
    return dict(
        dataset=dsl.Dataset(uri=str(dataset_dir)),
        model=dsl.Model(uri=str(model_dir)),
        metrics=dsl.Metrics(uri=str(tmp_path / "metrics")),
        classification_metrics=dsl.ClassificationMetrics(uri=str(tmp_path / "classification_metrics")),
        report=dsl.HTML(uri=str(tmp_path / "report" / "index.html")),
    )


@pytest.mark.parametrize("margin,passes", [(-0.01, True), (0.0, True), (0.001, False), (1.0, False)])
def test_component_logs_metrics_report_and_gates(tmp_path, dataset_dir, known_model, capsys, margin, passes):
    model_dir, _ = known_model
    expected = evaluate(dataset_dir, model_dir)
    arts = _artifacts(tmp_path, dataset_dir, model_dir)
    assert arts["report"].path == str(tmp_path / "report" / "index.html")  # a local uri is its own path

    passed = evaluate_component(min_test_accuracy=expected["test_accuracy"] + margin, **arts)

    assert passed is passes
    logged = arts["metrics"].metadata
    assert logged["test_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert logged["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert logged["n_test"] == expected["n_test"]
    assert logged["cost_wall_seconds"] >= 0
    matrix = arts["classification_metrics"].metadata["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == expected["class_names"]
    assert [row["row"] for row in matrix["rows"]] == expected["confusion_matrix"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert page == render_report_html(expected)
    out = capsys.readouterr().out
    assert ("PASSED" if passes else "FAILED") in out and f"{expected['test_accuracy']:.4f}" in out


def test_component_is_a_valid_kfp_component():
    component = dsl.component(evaluate_component, base_image="python:3.11", install_kfp_package=False)
    spec = component.component_spec
    assert set(spec.inputs) == {"dataset", "model", "min_test_accuracy"}
    assert set(spec.outputs) == {"metrics", "classification_metrics", "report", "Output"}


@pytest.mark.parametrize("setup,error,message", [
    ("no_model", FileNotFoundError, "is not a model artifact"),
    ("no_dataset", FileNotFoundError, "is not a dataset artifact"),
    ("other_classes", ValueError, "trained on classes"),
])
def test_evaluate_fails_clearly(tmp_path, dataset_dir, known_model, setup, error, message):
    model_dir, _ = known_model
    if setup == "no_model":
        args = (dataset_dir, tmp_path / "missing")
    elif setup == "no_dataset":
        args = (tmp_path, model_dir)
    else:
        other = Classifier(EncoderSpec(1, 8, width=8, embed_dim=32), num_classes=10)
        save_classifier(other, tmp_path / "other", {"class_names": list("abcdefghij")})
        args = (dataset_dir, tmp_path / "other")
    with pytest.raises(error, match=message):
        evaluate(*args)
