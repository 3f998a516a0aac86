"""Tests of the evaluation report: a self-contained HTML page that shows the numbers and figures and escapes every
name."""

import numpy as np
from conftest import settings_of
from report_checks import assert_offline_report, figure_traces

from components.core.data import Splits, save_splits
from components.core.models import save_classifier
from components.evaluate.gate import evaluate_and_gate
from components.evaluate.report import render_report_html
from pipelines.config import GateConfig, ServingConfig


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
    assert_offline_report(page, ["confusion-matrix"])  # no calibration or saliency in the result: no such figures
    assert "75.00%" in page and "0.733" in page and "abc123" in page
    assert "&lt;dog&gt;" in page and "<dog>" not in page  # class names are escaped
    correct, mistakes = figure_traces(page, "confusion-matrix")
    assert correct["customdata"] == [[1, 1], [0, 2]] and correct["x"] == ["cat", "&lt;dog&gt;"]
    assert correct["text"] == [["1", ""], ["", "2"]] and mistakes["text"] == [["", "1"], ["", ""]]


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
    result = evaluate_and_gate(tmp_path / "data", tmp_path / "model", settings_of(
        gates=GateConfig(min_test_accuracy=0.5, max_regression=0.0, champion_model=str(weird)),
        serving=ServingConfig(home="")))
    page = render_report_html(result)
    assert_offline_report(page, ["confusion-matrix", "reliability-diagram", "saliency"])
    assert "<evil>" not in page and "&lt;evil&gt;&quot;3&quot;&lt;/evil&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;v0&gt;" in page and "&lt;v1&gt;" in page
    assert "Release gate: <span" in page and "PASSED" in page
    saliency = figure_traces(page, "saliency")
    assert len(saliency) == 16  # 8 images, each in grey under its map
    first = result["saliency"][0]
    np.testing.assert_allclose(saliency[0]["z"], first["image"])
    np.testing.assert_allclose(saliency[1]["z"], np.asarray(first["saliency"]) / np.max(first["saliency"]), rtol=1e-6)
    reliability = {t["name"]: t for t in figure_traces(page, "reliability-diagram")}
    assert sum(reliability["predictions per bin"]["y"]) == result["n_test"]
    assert min(reliability["predictions per bin"]["y"]) >= 20
    assert "Champion (in production) vs challenger" in page


def test_report_says_when_an_override_was_set_but_not_needed(dataset_dir, known_model):
    result = evaluate_and_gate(dataset_dir, known_model[0], settings_of(
        gates=GateConfig(min_test_accuracy=0.5, champion_model="none", override=True, override_reason="just in case"),
        serving=ServingConfig(home="")), explain=0)
    page = render_report_html(result)
    assert "Release gate: <span" in page and "PASSED" in page and "OVERRIDDEN" not in page
    assert "(override was set but not needed: every limit held)" in page
