"""Tests of the robustness gate (robustness_check and the KFP step) on a real, tiny digits model."""

import numpy as np
import pytest
from conftest import run_gate_in_local_pipeline, settings_of
from kfp import dsl
from report_checks import assert_offline_report, figure_traces

from components.core.data import save_splits
from components.core.models import save_classifier
from components.core.settings import Settings
from components.robustness.component import robustness_component
from components.robustness.corruptions import gaussian_noise
from components.robustness.robustness import accuracy, attack_curve, robustness_check
from components.train.adversarial import fgsm
from pipelines.config import DataConfig, GateConfig

DEFAULTS = GateConfig()
NOISE_AND_FGSM_LIMITS_ONLY = {"min_pgd_accuracy": 0.0, "min_corruption_accuracy": 0.0, "max_corruption_drop": 1.0}
FAST = {"pgd_steps": 3, "corruption_severities": 1}  # the cheap settings for tests that are about the gate logic

pytestmark = pytest.mark.usefixtures("one_thread")


def gate_settings(**gates) -> Settings:
    """The robustness gate's settings: the config's defaults with seed 0, and only the noise and FGSM limits on."""
    return settings_of(data=DataConfig(seed=0), gates=GateConfig(**{**NOISE_AND_FGSM_LIMITS_ONLY, **gates}))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, splits, regularised_model):
    root = tmp_path_factory.mktemp("robustness")
    save_splits(splits, root / "dataset")
    save_classifier(regularised_model, root / "model", {"class_names": splits.class_names})
    return root


def test_accuracy_is_batch_independent_and_accepts_numpy(regularised_model, splits, test_set):
    x, y = test_set
    assert accuracy(regularised_model, x, y, batch_size=13) == accuracy(regularised_model, splits.test_x, splits.test_y)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, y: gaussian_noise(x, -1.0), "noise sigma must be >= 0"),
        (lambda m, x, y: fgsm(m, x, y, 2.0), r"FGSM epsilon must be in \[0, 1\]"),
        (lambda m, x, y: accuracy(m, x[:0], y[:0]), "accuracy of an empty set is undefined"),
    ],
)
def test_primitives_reject_bad_arguments(regularised_model, test_set, call, message):
    with pytest.raises(ValueError, match=message):
        call(regularised_model, *test_set)


def test_normal_model_passes_the_default_gate(artifacts, splits):
    d = DEFAULTS
    result = robustness_check(str(artifacts / "dataset"), str(artifacts / "model"), gate_settings())
    assert result["passed"], result["reason"]
    assert result["noise_accuracy"] >= d.min_noise_accuracy + 0.05  # a clear margin, not luck
    assert result["fgsm_accuracy"] >= d.min_fgsm_accuracy + 0.1
    assert result["clean_accuracy"] >= result["noise_accuracy"] - 0.02
    assert result["clean_accuracy"] > result["fgsm_accuracy"]
    assert result["fgsm_relative_drop"] == pytest.approx(1 - result["fgsm_accuracy"] / result["clean_accuracy"])
    assert result["noise_relative_drop"] == pytest.approx(1 - result["noise_accuracy"] / result["clean_accuracy"])
    assert result["n_test"] == len(splits.test_y)


@pytest.mark.parametrize(
    "min_noise_accuracy, min_fgsm_accuracy, named, not_named",
    [
        (1.0, 0.0, "noise accuracy", "FGSM accuracy"),
        (0.0, 1.0, "FGSM accuracy", "noise accuracy"),
        (1.0, 1.0, "noise accuracy", None),
    ],
)
def test_gate_reason_names_the_limit_that_blocked(artifacts, min_noise_accuracy, min_fgsm_accuracy, named, not_named):
    result = robustness_check(str(artifacts / "dataset"), str(artifacts / "model"),
                              gate_settings(noise_sigma=0.3, fgsm_epsilon=0.1, min_noise_accuracy=min_noise_accuracy,
                                            min_fgsm_accuracy=min_fgsm_accuracy))
    assert not result["passed"]
    assert named in result["reason"] and f"< min {1.0:.3f}" in result["reason"]
    if not_named:
        assert not_named not in result["reason"]
    else:
        assert "FGSM accuracy" in result["reason"]  # both limits reported


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"noise_sigma": -0.1}, ValueError, "noise_sigma must be >= 0"),
        ({"noise_sigma": float("nan")}, ValueError, "noise_sigma must be a finite number"),
        ({"fgsm_epsilon": -0.01}, ValueError, r"fgsm_epsilon must be in \[0, 1\]"),
        ({"fgsm_epsilon": 1.5}, ValueError, r"fgsm_epsilon must be in \[0, 1\]"),
        ({"min_noise_accuracy": 1.2}, ValueError, r"min_noise_accuracy must be an accuracy in \[0, 1\]"),
        ({"min_fgsm_accuracy": -0.1}, ValueError, r"min_fgsm_accuracy must be an accuracy in \[0, 1\]"),
        ({"min_fgsm_accuracy": "0.5"}, ValueError, "min_fgsm_accuracy must be a finite number"),
        ({"dataset_dir": "missing"}, FileNotFoundError, "is not a dataset artifact"),
        ({"model_dir": "missing"}, FileNotFoundError, "is not a model artifact"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(artifacts, overrides, error, message):
    dirs = {"dataset_dir": "dataset", "model_dir": "model"}
    gates = {k: v for k, v in overrides.items() if k not in dirs}
    dirs.update({k: v for k, v in overrides.items() if k in dirs})
    with pytest.raises(error, match=message):
        robustness_check(str(artifacts / dirs["dataset_dir"]), str(artifacts / dirs["model_dir"]), gate_settings(**gates))


def test_full_check_reports_pgd_corruptions_and_relative_drops(artifacts):
    d = DEFAULTS
    result = robustness_check(str(artifacts / "dataset"), str(artifacts / "model"),
                              settings_of(data=DataConfig(seed=0), gates=GateConfig()))
    assert result["passed"] and result["passed_checks"] and not result["overridden"], result["reason"]
    assert result["pgd_accuracy"] <= result["fgsm_accuracy"] + 1e-9
    assert len(result["corruptions"]) == 5 * d.corruption_severities
    assert result["corruption_accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in result["corruptions"]]))
    assert result["corruption_relative_drop"] == pytest.approx(1 - result["corruption_accuracy"] / result["clean_accuracy"])
    assert result["pgd_step_size"] == pytest.approx(2.5 * d.pgd_epsilon / d.pgd_steps)
    assert result["blocked_by"] == [] and set(result["limits_checked"]) == {
        "min_noise_accuracy", "min_fgsm_accuracy", "min_pgd_accuracy", "min_corruption_accuracy", "max_corruption_drop"}


@pytest.mark.parametrize(
    "limits, blocked, text",
    [
        ({"min_noise_accuracy": 1.0}, ["min_noise_accuracy"], "noise accuracy"),
        ({"min_fgsm_accuracy": 1.0}, ["min_fgsm_accuracy"], "FGSM accuracy"),
        ({"min_pgd_accuracy": 1.0}, ["min_pgd_accuracy"], "PGD accuracy"),
        ({"min_corruption_accuracy": 1.0}, ["min_corruption_accuracy"], "mean corruption accuracy"),
        ({"max_corruption_drop": 0.0}, ["max_corruption_drop"], "mean corruption relative drop"),
        ({"min_pgd_accuracy": 1.0, "max_corruption_drop": 0.0}, ["min_pgd_accuracy", "max_corruption_drop"], "PGD accuracy"),
    ],
)
def test_each_limit_blocks_on_its_own_and_is_named(artifacts, limits, blocked, text):
    gates = {"min_noise_accuracy": 0.0, "min_fgsm_accuracy": 0.0, "min_pgd_accuracy": 0.0,
             "min_corruption_accuracy": 0.0, "max_corruption_drop": 1.0, **FAST, **limits}
    result = robustness_check(str(artifacts / "dataset"), str(artifacts / "model"),
                              gate_settings(noise_sigma=0.3, fgsm_epsilon=0.1, pgd_epsilon=0.1, **gates))
    assert not result["passed"] and not result["passed_checks"]
    assert result["blocked_by"] == blocked
    assert text in result["reason"]
    for name in {"min_noise_accuracy", "min_fgsm_accuracy", "min_pgd_accuracy", "min_corruption_accuracy",
                 "max_corruption_drop"} - set(blocked):
        assert name not in result["blocked_by"]


@pytest.mark.parametrize(
    "override, reason, message",
    [
        (True, "", "override=True needs an override_reason"),
        (True, "   ", "override=True needs an override_reason"),
        ("yes", "x", "override must be true or false"),
    ],
)
def test_override_needs_a_reason(artifacts, override, reason, message):
    with pytest.raises(ValueError, match=message):
        robustness_check(str(artifacts / "dataset"), str(artifacts / "model"),
                         gate_settings(noise_sigma=0.1, fgsm_epsilon=0.03, min_noise_accuracy=0.0, min_fgsm_accuracy=0.0,
                                       override=override, override_reason=reason, **FAST))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pgd_epsilon": 1.5}, r"pgd_epsilon must be in \[0, 1\]"),
        ({"pgd_steps": 0}, "pgd_steps must be a whole number >= 1"),
        ({"pgd_step_size": -0.1}, "pgd_step_size must be >= 0"),
        ({"min_pgd_accuracy": 2.0}, r"min_pgd_accuracy must be an accuracy in \[0, 1\]"),
        ({"min_corruption_accuracy": -1.0}, r"min_corruption_accuracy must be an accuracy in \[0, 1\]"),
        ({"max_corruption_drop": 1.5}, r"max_corruption_drop must be a relative drop in \[0, 1\]"),
        ({"corruption_severities": 6}, "corruption_severities must be a whole number in 1..5"),
        ({"corruption_severities": 0}, "corruption_severities must be a whole number in 1..5"),
    ],
)
def test_pgd_and_corruption_settings_are_validated(artifacts, overrides, message):
    with pytest.raises(ValueError, match=message):
        robustness_check(str(artifacts / "dataset"), str(artifacts / "model"),
                         gate_settings(noise_sigma=0.1, fgsm_epsilon=0.03, min_noise_accuracy=0.0, min_fgsm_accuracy=0.0,
                                       **overrides))


def test_component_runs_with_kfp_artifacts_and_writes_report(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "out" / "report.html"))
    assert report.path == str(tmp_path / "out" / "report.html")  # a local uri is the path itself
    d = DEFAULTS
    passed = robustness_component(
        dataset=dsl.Dataset(uri=str(artifacts / "dataset")), model=dsl.Model(uri=str(artifacts / "model")),
        cfg=gate_settings(), metrics=metrics, report=report,
    )
    assert passed is True
    for key in ("clean_accuracy", "noise_accuracy", "fgsm_accuracy", "noise_relative_drop", "fgsm_relative_drop",
                "cost_wall_seconds"):
        assert key in metrics.metadata, key
    assert metrics.metadata["passed"] == 1.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert_offline_report(page, ["robustness-curves"])
    assert "<h1>Robustness check — PASSED</h1>" in page
    assert f"<td>FGSM (L∞ epsilon {d.fgsm_epsilon})</td>\n<td>{metrics.metadata['fgsm_accuracy']:.3f}</td>" in page
    lines = {t["name"]: t for t in figure_traces(page, "robustness-curves")}
    clean = metrics.metadata["clean_accuracy"]
    assert set(lines) == {"gaussian_noise", "gaussian_blur", "contrast", "brightness", "pixelate", "FGSM", "PGD"}
    assert lines["contrast"]["x"] == list(range(d.corruption_severities + 1)) and lines["contrast"]["y"][0] == clean
    fgsm = lines["FGSM"]
    assert fgsm["x"] == [0, d.fgsm_epsilon / 4, d.fgsm_epsilon / 2, d.fgsm_epsilon, 2 * d.fgsm_epsilon]
    assert fgsm["y"][0] == clean and fgsm["y"][3] == metrics.metadata["fgsm_accuracy"]  # the gate's own point
    assert lines["PGD"]["x"] == [0, d.pgd_epsilon]
    assert lines["PGD"]["y"][1] == metrics.metadata["pgd_accuracy"]


def test_attack_curve_reuses_the_gate_points_and_measures_the_others(regularised_model, test_set):
    x, y = test_set
    g = Settings(fgsm_epsilon=0.6, pgd_epsilon=0.0, pgd_steps=2, pgd_step_size=0.0, pgd_random_start=False)
    rows = attack_curve(regularised_model, x, y, g, 0, fgsm_accuracy=0.123, pgd_accuracy=0.456)
    points = [(r["attack"], r["epsilon"], r["gate"]) for r in rows]
    # FGSM at 0.15, 0.3, 0.6 (the gate's) and 1.0 (2 x 0.6, capped); PGD at the gate's epsilon only
    assert points == [("FGSM", 0.15, False), ("FGSM", 0.3, False), ("FGSM", 0.6, True), ("FGSM", 1.0, False),
                      ("PGD", 0.0, True)]
    assert rows[2]["accuracy"] == 0.123 and rows[4]["accuracy"] == 0.456  # reused, not measured again
    assert rows[1]["accuracy"] == accuracy(regularised_model, fgsm(regularised_model, x, y, 0.3), y)
    assert rows[3]["accuracy"] == accuracy(regularised_model, fgsm(regularised_model, x, y, 1.0), y)


def test_component_compiles_as_a_kfp_component():
    from pipelines.pipeline import step_component

    assert {"dataset", "model", "gates_noise_sigma", "gates_fgsm_epsilon", "gates_min_noise_accuracy",
            "gates_min_fgsm_accuracy", "data_seed"} <= set(step_component("robustness").component_spec.inputs)


def test_override_releases_a_blocked_model_loudly(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.HTML(uri=str(tmp_path / "report.html"))
    passed = robustness_component(
        dataset=dsl.Dataset(uri=str(artifacts / "dataset")), model=dsl.Model(uri=str(artifacts / "model")),
        cfg=gate_settings(noise_sigma=0.1, fgsm_epsilon=0.03, min_noise_accuracy=0.0, min_fgsm_accuracy=1.0, pgd_steps=2,
                          corruption_severities=1, override=True,
                          override_reason="release manager: demo on synthetic data"),
        metrics=metrics, report=report,
    )
    assert passed is True
    m = metrics.metadata
    assert m["passed"] == 1.0 and m["passed_checks"] == 0.0 and m["overridden"] == 1.0 and m["override"] == 1.0
    assert m["blocked_by_min_fgsm_accuracy"] == 1.0 and m["blocked_by_min_noise_accuracy"] == 0.0
    page = (tmp_path / "report.html").read_text()
    assert "<h1>Robustness check — FAILED (OVERRIDDEN)</h1>" in page
    assert "OVERRIDDEN" in page and "release manager: demo on synthetic data" in page


@pytest.mark.slow
def test_component_runs_in_a_local_kfp_pipeline(artifacts, tmp_path):
    """KFP copies only the function's source: this proves the body is self-contained and the output is the bool."""
    from pipelines.config import Config

    d = DEFAULTS
    cfg = Config(data=DataConfig(seed=0), gates=GateConfig(
        noise_sigma=d.noise_sigma, fgsm_epsilon=d.fgsm_epsilon, min_noise_accuracy=d.min_noise_accuracy,
        min_fgsm_accuracy=1.0, min_pgd_accuracy=0.0, min_corruption_accuracy=0.0, max_corruption_drop=1.0))
    output = run_gate_in_local_pipeline("robustness", cfg, artifacts / "dataset", artifacts / "model", tmp_path / "root")
    assert output is False  # min_fgsm_accuracy 1.0 cannot be met
