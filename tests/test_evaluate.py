"""Tests of the evaluate step: scores against scikit-learn, calibration, saliency, the HTML report,
the champion/challenger gate, the KFP component and its gate."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import settings_of
from kfp import dsl
from PIL import Image
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression
from torch import nn

from components.core.data import Splits, save_splits
from components.core.models import Classifier, EncoderSpec, save_classifier
from components.evaluate.champion import (
    ChampionNotComparable,
    check_comparable,
    extract_mar,
    from_serving_home,
    resolve_champion,
)
from components.evaluate.component import evaluate_component
from components.evaluate.evaluate import (
    REPORT_FILE,
    RESULT_FILE,
    calibration,
    classification_scores,
    confusion_matrix,
    evaluate,
    evaluate_and_gate,
    expected_calibration_error,
    heatmap_rgb,
    pick_examples,
    png_data_uri,
    reliability_bins,
    render_reliability_svg,
    render_report_html,
    saliency_maps,
)
from components.train.training import predict_logits
from pipelines.config import GateConfig, ServingConfig


def _probe_model(splits: Splits, width: int, seed: int = 0, train_limit: int | None = None) -> Classifier:
    """A classifier without training: a random encoder with a logistic-regression head on its features."""
    torch.manual_seed(seed)
    model = Classifier(EncoderSpec(1, 8, width=width, embed_dim=4 * width), num_classes=10).eval()
    x, y = splits.train_x[:train_limit], splits.train_y[:train_limit]
    with torch.no_grad():
        features = model.embed(torch.from_numpy(x)).numpy()
    mean, std = features.mean(0), features.std(0) + 1e-6
    probe = LogisticRegression(max_iter=1000).fit((features - mean) / std, y)
    with torch.no_grad():  # fold the standardisation into the linear head
        model.head.weight.copy_(torch.from_numpy(probe.coef_ / std).float())
        model.head.bias.copy_(torch.from_numpy(probe.intercept_ - (probe.coef_ * mean / std).sum(1)).float())
    return model


@pytest.fixture(scope="module")
def known_model(tmp_path_factory, splits):
    """A good-but-imperfect classifier (test accuracy ~0.9)."""
    model = _probe_model(splits, width=32)
    out = tmp_path_factory.mktemp("model")
    save_classifier(model, out, {"class_names": splits.class_names, "model_version": "known-1"})
    predictions = predict_logits(model, splits.test_x).argmax(1).numpy()
    return out, predictions


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory, splits):
    """A clearly worse classifier: a narrow encoder probed with 60 labels."""
    out = tmp_path_factory.mktemp("weak")
    save_classifier(_probe_model(splits, width=8, seed=1, train_limit=60), out,
                    {"class_names": splits.class_names, "model_version": "weak-1"})
    return out


@pytest.fixture(scope="module")
def served_home(tmp_path_factory, known_model):
    """A serving home as deploy leaves it: the .mar in the model store and state.json (server not running)."""
    from serving.archive import build_mar

    home = tmp_path_factory.mktemp("serving")
    build_mar(known_model[0], home / "model-store", "digits", "known-1")
    (home / "state.json").write_text(json.dumps({"model_name": "digits", "model_version": "known-1", "pid": None,
                                                 "endpoint": "http://127.0.0.1:1/predictions/digits"}))
    return home


# ---------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def test_ece_of_a_perfectly_calibrated_predictor_is_zero():
    # In every bin, the share of correct predictions equals the stated confidence exactly.
    confidences, correct = [], []
    for conf, n_right, n in [(0.3, 3, 10), (0.5, 5, 10), (0.8, 8, 10), (1.0, 20, 20)]:
        confidences += [conf] * n
        correct += [1] * n_right + [0] * (n - n_right)
    assert expected_calibration_error(np.array(confidences), np.array(correct)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_sampled_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidences = rng.uniform(0.1, 1.0, size=200_000)
    correct = rng.random(200_000) < confidences  # right exactly as often as it claims
    assert expected_calibration_error(confidences, correct) < 0.005


@pytest.mark.parametrize("confidences,correct,expected", [
    ([0.9] * 10, [1] * 6 + [0] * 4, 0.3),  # says 90 %, is right 60 %
    ([0.95] * 10 + [0.55] * 10, [1] * 5 + [0] * 5 + [1] * 5 + [0] * 5, 0.5 * 0.45 + 0.5 * 0.05),
    ([1.0] * 4, [0] * 4, 1.0),  # certain and always wrong
])
def test_ece_of_an_overconfident_predictor_has_the_known_value(confidences, correct, expected):
    assert expected_calibration_error(np.array(confidences), np.array(correct)) == pytest.approx(expected)


def test_reliability_bins_are_equal_width_and_count_everything():
    bins = reliability_bins(np.array([0.0, 1 / 15, 1 / 15 + 1e-9, 0.5, 1.0]), np.array([1, 0, 1, 1, 0]))
    assert len(bins) == 15 and bins[0]["lower"] == 0 and bins[-1]["upper"] == 1
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]  # right edge inclusive, 0 in bin 0
    assert bins[0]["accuracy"] == 0.5 and bins[0]["confidence"] == pytest.approx(1 / 30)


def test_calibration_from_probabilities():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])  # right, wrong, right, right
    result = calibration(probabilities, labels)
    assert result["n_bins"] == 15 and result["mean_confidence"] == pytest.approx(0.75)
    assert result["ece"] == pytest.approx(expected_calibration_error(np.array([0.9, 0.8, 0.6, 0.7]), np.array([1, 0, 1, 1])))
    assert result["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)  # every confidence in its own bin


def test_reliability_diagram_is_svg_with_one_bar_per_filled_bin():
    bins = reliability_bins(np.array([0.21, 0.25, 0.5, 0.95, 0.96, 0.97]), np.array([0, 1, 1, 1, 1, 0]))
    svg = render_reliability_svg(bins, ece=0.123, size=320)
    root = ET.fromstring(svg)  # well-formed
    assert root.tag == "svg" and "ECE 0.1230" in svg
    bars = [r for r in root.iter("rect") if r.get("class") == "bar"]
    filled = [b for b in bins if b["count"]]
    assert len(bars) == len(filled) == 3
    plot = 320 - 60
    for bar, b in zip(bars, filled):  # bar height is the bin's accuracy on the plot scale
        assert float(bar.get("height")) == pytest.approx(b["accuracy"] * plot, abs=0.1)
        assert f"{b['count']} predictions" in bar.find("title").text
    assert sum(1 for r in root.iter("rect") if r.get("class") == "gap") == 3  # every filled bin is off the diagonal here


# ---------------------------------------------------------------------------
# Saliency
# ---------------------------------------------------------------------------


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


def test_png_data_uri_and_heatmap():
    heat = heatmap_rgb(np.array([[0.0, 1.0], [2.0, 4.0]]))
    assert heat.dtype == np.uint8 and heat.shape == (2, 2, 3)
    assert tuple(heat[0, 0]) == (0, 0, 4) and tuple(heat[1, 1]) == (252, 255, 164)  # darkest and brightest
    assert heat[0, 1].sum() < heat[1, 0].sum() < heat[1, 1].sum()  # brighter with the value
    uri = png_data_uri(np.random.default_rng(0).random((3, 8, 8)), size=96)
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,"))))
    assert image.format == "PNG" and image.size == (96, 96) and image.mode == "RGB"
    gray = Image.open(io.BytesIO(base64.b64decode(png_data_uri(np.zeros((1, 32, 32))).split(",", 1)[1])))
    assert gray.size == (96, 96) and gray.mode == "L"


# ---------------------------------------------------------------------------
# evaluate() on a real model
# ---------------------------------------------------------------------------


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


def _assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://|<link|<script|@import|url\(|href\s*=", page, re.IGNORECASE)
    for source in re.findall(r"""src\s*=\s*["']?([^"'\s>]*)""", page):  # images are inline data only
        assert source.startswith("data:image/png;base64,"), source[:80]


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
    _assert_self_contained(page)
    assert "75.00%" in page and "0.733" in page and "abc123" in page
    assert "&lt;dog&gt;" in page and "<dog>" not in page  # class names are escaped
    # Every matrix cell is coloured: correct ones green, mistakes red, zeros plain.
    assert page.count("rgba(46, 160, 67") == 2 and page.count("rgba(215, 58, 73") == 1
    assert ">1</td>" in page and ">2</td>" in page


def test_full_report_is_self_contained_and_escapes_names(tmp_path, splits, known_model):
    """Calibration, saliency and gate sections with hostile class names and a hostile champion path."""
    names = [f'<evil>"{d}"</evil>' for d in range(10)]
    hostile = Splits(splits.train_x, splits.train_y, splits.val_x, splits.val_y, splits.test_x, splits.test_y,
                     splits.pool_x, names)
    save_splits(hostile, tmp_path / "data")
    model, _ = __import__("components.core.models", fromlist=["load_classifier"]).load_classifier(known_model[0])
    save_classifier(model, tmp_path / "model", {"class_names": names, "model_version": "<v1>"})
    weird = tmp_path / "<script>alert(1)</script>"
    save_classifier(model, weird, {"class_names": names, "model_version": "<v0>"})
    result = evaluate_and_gate(tmp_path / "data", tmp_path / "model", 0.5, 0.0, champion_model=str(weird))
    page = render_report_html(result)
    _assert_self_contained(page)
    assert "<evil>" not in page and "&lt;evil&gt;&quot;3&quot;&lt;/evil&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;v0&gt;" in page and "&lt;v1&gt;" in page
    assert page.count("data:image/png;base64,") == 16  # 8 images + 8 saliency maps
    assert 'class="reliability"' in page and "Release gate: <span" in page and "PASSED" in page
    assert "Champion (in production) vs challenger" in page


# ---------------------------------------------------------------------------
# Champion lookup
# ---------------------------------------------------------------------------


def test_champion_is_found_in_a_serving_home_from_its_mar(tmp_path, served_home, known_model):
    found = from_serving_home(served_home, tmp_path)
    assert found.status == "found" and found.source == str(served_home / "model-store" / "digits.mar")
    assert found.serving is False  # recorded, not running: still the champion
    for name in ("model.safetensors", "metadata.json"):
        assert (found.model_dir / name).read_bytes() == (known_model[0] / name).read_bytes()


def test_champion_prefers_the_recorded_model_dir(tmp_path, known_model):
    (tmp_path / "state.json").write_text(json.dumps({"model_name": "digits", "model_dir": str(known_model[0])}))
    found = from_serving_home(tmp_path, tmp_path / "work")
    assert found.model_dir == known_model[0]


def test_mar_extraction_reads_only_the_model(tmp_path, served_home):
    import zipfile

    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(served_home / "model-store" / "digits.mar") as good, zipfile.ZipFile(evil, "w") as out:
        for name in good.namelist():
            out.writestr(name, good.read(name))
        out.writestr("../../escaped.txt", "x")
    extract_mar(evil, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metadata.json", "model.safetensors"]
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_explicit_champion_as_mar_dir_and_storage_release(tmp_path, served_home, known_model):
    from components.core.storage import publish

    mar = served_home / "model-store" / "digits.mar"
    weights = (known_model[0] / "model.safetensors").read_bytes()
    publish(known_model[0], str(tmp_path / "release"))
    for spec in (str(mar), str(known_model[0]), str(served_home / "model-store"), str(tmp_path / "release"),
                 str(tmp_path / "release" / "latest")):
        found = resolve_champion(spec, None, tmp_path / f"work-{uuid.uuid4().hex[:6]}")
        assert found.status == "found", spec
        assert (found.model_dir / "model.safetensors").read_bytes() == weights, spec
    assert resolve_champion("none", served_home, tmp_path).status == "disabled"
    nothing = resolve_champion("", tmp_path / "empty-home", tmp_path)
    assert nothing.status == "no_champion" and nothing.reason.startswith("no model in production")


@pytest.mark.slow
def test_champion_from_an_s3_release(tmp_path, known_model, monkeypatch):
    """The same release lookup against a real S3 API (moto server on loopback)."""
    pytest.importorskip("moto")
    from s3server import MotoServer, s3_env

    from components.core.storage import Storage, publish

    with MotoServer() as server:
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        Storage().client.create_bucket(Bucket="models")
        publish(known_model[0], "s3://models/digits")
        found = resolve_champion("s3://models/digits/latest", None, tmp_path)
    assert found.status == "found" and found.source.startswith("s3://models/digits (release ")
    assert (found.model_dir / "model.safetensors").read_bytes() == (known_model[0] / "model.safetensors").read_bytes()


def test_champion_for_other_classes_or_images_is_not_comparable(tmp_path, splits):
    save_classifier(Classifier(EncoderSpec(1, 8, width=8, embed_dim=16), 10), tmp_path / "letters",
                    {"class_names": list("abcdefghij")})
    save_classifier(Classifier(EncoderSpec(3, 32, width=8, embed_dim=16), 10), tmp_path / "rgb",
                    {"class_names": splits.class_names})
    with pytest.raises(ChampionNotComparable, match=r"predicts classes \['a', 'b'.*but this test split has \['0'"):
        check_comparable(tmp_path / "letters", splits)
    with pytest.raises(ChampionNotComparable, match="takes 3-channel 32px images but this test split has 1-channel 8px"):
        check_comparable(tmp_path / "rgb", splits)


# ---------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------


def test_worse_challenger_is_blocked_with_both_accuracies_in_the_reason(dataset_dir, weak_model, served_home):
    result = evaluate_and_gate(dataset_dir, weak_model, min_test_accuracy=0.0, max_regression=0.005,
                               serving_home=served_home)
    gate, check = result["gate"], result["gate"]["champion"]
    assert check["status"] == "compared" and check["champion_model_version"] == "known-1"
    assert check["champion_accuracy"] - check["challenger_accuracy"] > 0.05  # really worse
    assert gate["passed"] is False and gate["accuracy_passed"] is True
    assert f"challenger accuracy {check['challenger_accuracy']:.4f}" in gate["reason"]
    assert f"champion accuracy {check['champion_accuracy']:.4f}" in gate["reason"]
    assert "stays" in gate["reason"]


@pytest.mark.parametrize("max_regression,passes", [(0.0, True), (0.005, True), (-0.001, False)])
def test_challenger_equal_to_champion_passes_unless_an_improvement_is_demanded(dataset_dir, known_model, served_home,
                                                                               max_regression, passes):
    result = evaluate_and_gate(dataset_dir, known_model[0], 0.5, max_regression, serving_home=served_home, explain=0)
    check = result["gate"]["champion"]
    assert check["champion_accuracy"] == check["challenger_accuracy"]
    assert result["gate"]["passed"] is passes and check["passed"] is passes


def test_better_challenger_within_the_accuracy_floor_passes(dataset_dir, known_model, weak_model, tmp_path):
    result = evaluate_and_gate(dataset_dir, known_model[0], 0.5, 0.0, champion_model=str(weak_model), explain=0)
    assert result["gate"]["passed"] is True and result["gate"]["champion"]["status"] == "compared"
    blocked = evaluate_and_gate(dataset_dir, known_model[0], 0.99, 0.0, champion_model=str(weak_model), explain=0)
    assert blocked["gate"]["passed"] is False  # better than the champion is not enough: the floor still holds
    assert blocked["gate"]["reason"].startswith(f"test accuracy {blocked['test_accuracy']:.4f} < min_test_accuracy 0.9900")


@pytest.mark.parametrize("champion,status,reason", [
    ("", "no_champion", "no model in production"),
    ("none", "disabled", "champion comparison disabled"),
    ("letters", "not_comparable", "champion not comparable, check skipped: it predicts classes"),
])
def test_without_a_comparable_champion_the_gate_passes_with_a_reason(tmp_path, dataset_dir, known_model, champion,
                                                                     status, reason):
    save_classifier(Classifier(EncoderSpec(1, 8, width=8, embed_dim=16), 10), tmp_path / "letters",
                    {"class_names": list("abcdefghij")})
    spec = str(tmp_path / champion) if champion == "letters" else champion
    result = evaluate_and_gate(dataset_dir, known_model[0], 0.5, 0.005, champion_model=spec,
                               serving_home=tmp_path / "no-home", explain=0)
    check = result["gate"]["champion"]
    assert check["status"] == status and check["passed"] is True and check["reason"].startswith(reason)
    assert result["gate"]["passed"] is True and reason in result["gate"]["reason"]
    assert "champion_accuracy" not in check


# ---------------------------------------------------------------------------
# The KFP component
# ---------------------------------------------------------------------------


def _artifacts(tmp_path, dataset_dir, model_dir):
    return dict(
        dataset=dsl.Dataset(uri=str(dataset_dir)),
        model=dsl.Model(uri=str(model_dir)),
        metrics=dsl.Metrics(uri=str(tmp_path / "metrics")),
        classification_metrics=dsl.ClassificationMetrics(uri=str(tmp_path / "classification_metrics")),
        report=dsl.HTML(uri=str(tmp_path / "report" / "index.html")),
    )


@pytest.mark.parametrize("margin,passes", [(-0.01, True), (0.0, True), (0.001, False), (1.0, False)])  # floor capped at 1
def test_component_logs_metrics_report_and_gates(tmp_path, dataset_dir, known_model, capsys, margin, passes):
    model_dir, _ = known_model
    expected = evaluate(dataset_dir, model_dir)
    arts = _artifacts(tmp_path, dataset_dir, model_dir)
    assert arts["report"].path == str(tmp_path / "report" / "index.html")  # a local uri is its own path

    floor = min(1.0, expected["test_accuracy"] + margin)
    passed = evaluate_component(cfg=settings_of(gates=GateConfig(min_test_accuracy=floor),
                                                serving=ServingConfig(home=str(tmp_path / "no-serving-home"))), **arts)

    assert passed is passes
    logged = arts["metrics"].metadata
    assert logged["test_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert logged["challenger_accuracy"] == pytest.approx(expected["test_accuracy"])
    assert logged["macro_f1"] == pytest.approx(expected["macro_f1"])
    assert logged["ece"] == pytest.approx(expected["calibration"]["ece"])
    assert logged["min_test_accuracy"] == pytest.approx(floor)
    assert logged["max_regression"] == 0.005 and logged["champion_compared"] == 0.0
    assert "champion_accuracy" not in logged and "champion_model_version" not in logged
    assert logged["n_test"] == expected["n_test"]
    assert logged["cost_wall_seconds"] >= 0 and logged["cost_peak_rss_mb"] > 0
    matrix = arts["classification_metrics"].metadata["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == expected["class_names"]
    assert [row["row"] for row in matrix["rows"]] == expected["confusion_matrix"]
    page = (tmp_path / "report" / "index.html").read_text()
    _assert_self_contained(page)
    assert "no model in production" in page and ("PASSED" if passes else "BLOCKED") in page
    out = capsys.readouterr().out
    assert ("PASSED" if passes else "FAILED") in out and f"{expected['test_accuracy']:.4f}" in out
    assert "no model in production" in out


def test_component_compares_with_the_served_champion(tmp_path, dataset_dir, weak_model, served_home, capsys):
    arts = _artifacts(tmp_path, dataset_dir, weak_model)
    passed = evaluate_component(cfg=settings_of(gates=GateConfig(min_test_accuracy=0.0, max_regression=0.005),
                                                serving=ServingConfig(home=str(served_home))), **arts)
    assert passed is False
    logged = arts["metrics"].metadata
    assert logged["champion_model_version"] == "known-1" and logged["champion_compared"] == 1.0
    assert logged["champion_accuracy"] > logged["challenger_accuracy"] + 0.05
    assert arts["report"].metadata["passed"] is False
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Champion (in production) vs challenger" in page and "known-1" in page and "weak-1" in page
    assert "BLOCKED" in page and "FAILED" in capsys.readouterr().out


def test_component_is_a_valid_kfp_component():
    from pipelines.config import parameters
    from pipelines.pipeline import step_component

    spec = step_component("evaluate").component_spec
    assert set(spec.inputs) == {"dataset", "model"} | {p.key for p in parameters(("gates", "serving"))}
    assert set(spec.outputs) == {"metrics", "classification_metrics", "report", "Output"}


@pytest.mark.parametrize("setup,error,message", [
    ("no_model", FileNotFoundError, "is not a model artifact"),
    ("no_dataset", FileNotFoundError, "is not a dataset artifact"),
    ("other_classes", ValueError, "trained on classes"),
    ("bad_regression", ValueError, r"max_regression must be in \[-1, 1\]"),
    ("missing_champion", FileNotFoundError, "champion_model .* does not exist: give a model directory"),
    ("stale_state", FileNotFoundError, "records a deployment of model 'digits' .* cannot be found"),
    ("corrupt_mar", ValueError, "is not a readable model archive"),
    ("broken_state", ValueError, "state.json is not valid JSON"),
])
def test_evaluate_fails_clearly(tmp_path, dataset_dir, known_model, setup, error, message):
    model_dir, _ = known_model
    call = evaluate
    args, kwargs = (dataset_dir, model_dir), {}
    if setup == "no_model":
        args = (dataset_dir, tmp_path / "missing")
    elif setup == "no_dataset":
        args = (tmp_path, model_dir)
    elif setup == "other_classes":
        other = Classifier(EncoderSpec(1, 8, width=8, embed_dim=32), num_classes=10)
        save_classifier(other, tmp_path / "other", {"class_names": list("abcdefghij")})
        args = (dataset_dir, tmp_path / "other")
    else:
        call, kwargs = evaluate_and_gate, {"min_test_accuracy": 0.5, "max_regression": 0.0, "explain": 0}
        if setup == "bad_regression":
            kwargs["max_regression"] = 5.0
        elif setup == "missing_champion":
            kwargs["champion_model"] = str(tmp_path / "nowhere")
        elif setup == "corrupt_mar":
            (tmp_path / "m.mar").write_bytes(b"not a zip")
            kwargs["champion_model"] = str(tmp_path / "m.mar")
        else:
            (tmp_path / "state.json").write_text("{broken" if setup == "broken_state" else json.dumps({"model_name": "digits"}))
            kwargs["serving_home"] = tmp_path
    with pytest.raises(error, match=message):
        call(*args, **kwargs)
