"""Tests of the evaluate step's KFP component: metrics, confusion matrix, report, console line and the gate."""

import pytest
from conftest import settings_of
from kfp import dsl
from report_checks import assert_offline_report

from components.evaluate.component import evaluate_component
from components.evaluate.evaluate import evaluate
from pipelines.config import GateConfig, ServingConfig


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
    assert_offline_report(page, ["confusion-matrix", "reliability-diagram", "saliency"])
    assert "no model in production" in page and ("PASSED" if passes else "BLOCKED") in page
    out = capsys.readouterr().out
    assert ("PASSED" if passes else "BLOCKED") in out and f"{expected['test_accuracy']:.4f}" in out
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
    assert "BLOCKED" in page and "evaluate BLOCKED: " in capsys.readouterr().out


def test_component_is_a_valid_kfp_component():
    from pipelines.config import parameters
    from pipelines.pipeline import step_component

    spec = step_component("evaluate").component_spec
    assert set(spec.inputs) == {"dataset", "model"} | {p.key for p in parameters(("gates", "serving"))}
    assert set(spec.outputs) == {"metrics", "classification_metrics", "report", "Output"}


def test_component_override_releases_a_blocked_model_loudly(tmp_path, dataset_dir, weak_model, served_home, capsys):
    arts = _artifacts(tmp_path, dataset_dir, weak_model)
    passed = evaluate_component(cfg=settings_of(
        gates=GateConfig(min_test_accuracy=0.0, max_regression=0.005, override=True,
                         override_reason="release manager: <b>demo</b> on synthetic data"),
        serving=ServingConfig(home=str(served_home))), **arts)
    assert passed is True
    m = arts["metrics"].metadata
    assert m["passed"] == 1.0 and m["passed_checks"] == 0.0 and m["overridden"] == 1.0 and m["override"] == 1.0
    assert m["blocked_by_max_regression"] == 1.0 and m["blocked_by_min_test_accuracy"] == 0.0
    assert m["champion_compared"] == 1.0 and m["champion_accuracy"] > m["challenger_accuracy"]  # the numbers stay
    assert arts["report"].metadata["passed"] is True
    page = (tmp_path / "report" / "index.html").read_text()
    assert_offline_report(page, ["confusion-matrix", "reliability-diagram", "saliency"])
    assert "FAILED (OVERRIDDEN)" in page and "the checks FAILED but the gate let the release through" in page
    assert "release manager: &lt;b&gt;demo&lt;/b&gt; on synthetic data" in page and "Blocked by: max_regression" in page
    out = capsys.readouterr().out
    assert "evaluate OVERRIDDEN: " in out and "WARNING released despite failed checks" in out
    assert "release manager: <b>demo</b> on synthetic data" in out
