"""Tests of the gate dialect every release gate speaks: limits, the verdict, the override, and the same verdict
from the evaluate, privacy and robustness steps."""

import pytest
from conftest import settings_of
from kfp import dsl

from components.core.gates import Limit, decide, verdict_metrics

VERDICT_METRICS = {"passed", "passed_checks", "override", "overridden"}


def test_a_limit_within_its_tolerance_holds():
    assert not Limit("min_a", "a", 0.3 - 1e-12, 0.3, "min").held  # exact by default
    assert Limit("min_a", "a", 0.3 - 1e-12, 0.3, "min", tolerance=1e-9).held
    assert Limit("max_b", "b", 0.5 + 1e-12, 0.5, "max", tolerance=1e-9).held
    assert not Limit("max_b", "b", 0.5 + 1e-6, 0.5, "max", tolerance=1e-9).held


def test_notes_end_a_passing_reason_and_stay_out_of_a_failing_one():
    held, crossed = Limit("min_a", "a", 0.9, 0.5, "min"), Limit("max_b", "b", 3, 0, "max")
    passing = decide([held], notes=("check c skipped: nothing to compare",))
    assert passing["reason"] == "a 0.900 >= min 0.500; check c skipped: nothing to compare"
    failing = decide([held, crossed], notes=("check c skipped: nothing to compare",))
    assert failing["reason"] == "b 3 > max 0" and failing["blocked_by"] == ["max_b"]


def _run_gate(step, tmp_path, dataset_dir, model_dir, cfg):
    """Run a gate step's component; returns (passed, metrics, report text)."""
    from components.evaluate.component import evaluate_component
    from components.privacy.component import privacy_component
    from components.robustness.component import robustness_component

    arts = {"dataset": dsl.Dataset(uri=str(dataset_dir)), "model": dsl.Model(uri=str(model_dir)),
            "metrics": dsl.Metrics(uri=str(tmp_path / step / "metrics"))}
    if step == "evaluate":
        arts["classification_metrics"] = dsl.ClassificationMetrics(uri=str(tmp_path / step / "confusion"))
        arts["report"] = dsl.HTML(uri=str(tmp_path / step / "report.html"))
    else:
        arts["report"] = dsl.Markdown(uri=str(tmp_path / step / "report.md"))
    component = {"evaluate": evaluate_component, "privacy": privacy_component, "robustness": robustness_component}[step]
    passed = component(cfg=cfg, **arts)
    return passed, arts["metrics"].metadata, (tmp_path / step / arts["report"].path.rsplit("/", 1)[1]).read_text()


def test_every_gate_gives_the_same_verdict_and_honours_the_same_override(tmp_path, dataset_dir, known_model):
    """One model blocked by each gate (one limit set out of reach) and released by the same override."""
    from pipelines.config import DataConfig, GateConfig, ServingConfig

    reason = "release manager: demo on the digits data"
    gates = GateConfig(min_test_accuracy=1.0, max_mia_auc=0.5, near_duplicate_distance=1.0, mia_reference_models=0,
                       min_fgsm_accuracy=1.0, pgd_steps=2, corruption_severities=1, champion_model="none",
                       override=True, override_reason=reason)
    cfg = settings_of(data=DataConfig(seed=0), gates=gates, serving=ServingConfig(home=""))
    for step in ("evaluate", "privacy", "robustness"):
        passed, metrics, report = _run_gate(step, tmp_path, dataset_dir, known_model[0], cfg)
        blocked_by = {k for k, v in metrics.items() if k.startswith("blocked_by_") and v == 1.0}
        assert passed is True, step
        assert {k: metrics[k] for k in VERDICT_METRICS} == {"passed": 1.0, "passed_checks": 0.0, "override": 1.0,
                                                            "overridden": 1.0}, step
        assert blocked_by, step
        assert "OVERRIDDEN" in report and reason in report, step


def test_the_evaluate_verdict_has_the_keys_of_every_gate(dataset_dir, known_model):
    from components.evaluate.gate import evaluate_and_gate
    from pipelines.config import GateConfig, ServingConfig

    result = evaluate_and_gate(dataset_dir, known_model[0], settings_of(
        gates=GateConfig(min_test_accuracy=0.5, champion_model="none"), serving=ServingConfig(home="")), explain=0)
    common = set(decide([Limit("min_a", "a", 1.0, 0.5, "min")]))
    assert common <= set(result["gate"])
    assert set(verdict_metrics(result["gate"])) == VERDICT_METRICS | {"blocked_by_min_test_accuracy"}


@pytest.mark.parametrize("override, reason", [(True, ""), (True, "  ")])
def test_an_override_without_a_reason_is_refused_by_the_dialect(override, reason):
    with pytest.raises(ValueError, match="override=True needs an override_reason"):
        decide([Limit("min_a", "a", 0.1, 0.5, "min")], override, reason)


def test_a_blocked_gate_says_why_and_what_to_try(tmp_path, dataset_dir, known_model, capsys):
    """Each gate blocked without an override: the console line names the failing number, its limit and the
    settings to try; the metrics keep the reason and remedy in words and booleans/counts as such."""
    from components.core.cost import typed_metrics
    from components.core.gates import REMEDIES
    from pipelines.config import DataConfig, GateConfig, ServingConfig

    gates = GateConfig(min_test_accuracy=1.0, max_mia_auc=0.5, near_duplicate_distance=1.0, mia_reference_models=0,
                       min_fgsm_accuracy=1.0, pgd_steps=2, corruption_severities=1, champion_model="none")
    cfg = settings_of(data=DataConfig(seed=0), gates=gates, serving=ServingConfig(home=""))
    for step in ("evaluate", "privacy", "robustness"):
        capsys.readouterr()
        passed, metadata, _ = _run_gate(step, tmp_path / "blocked", dataset_dir, known_model[0], cfg)
        metrics = typed_metrics(dict(metadata))
        failed = sorted(k.removeprefix("blocked_by_") for k, v in metrics.items() if k.startswith("blocked_by_") and v)
        assert passed is False and failed, step
        assert metrics["passed"] is False and metrics["passed_checks"] is False, step
        assert all(type(metrics[f"blocked_by_{name}"]) is bool for name in failed), step
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{step} BLOCKED: "))
        assert line == f"{step} BLOCKED: {metrics['reason']} ({metrics['remedy']})", step
        assert all(REMEDIES[name] in metrics["remedy"] for name in failed), step
        assert " < " in metrics["reason"] or " > " in metrics["reason"], step  # the number against its limit
        if "n_test" in metrics:
            assert type(metrics["n_test"]) is int, step


def test_every_remedy_names_settings_that_exist():
    """The advice points at real config fields (area.field), so it cannot drift from the config silently."""
    import dataclasses
    import re

    from components.core.gates import REMEDIES
    from pipelines.config import Config

    areas = {f.name: {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else
                                                             getattr(Config(), f.name).__class__)}
             for f in dataclasses.fields(Config)}
    area_names = "|".join(areas)
    named = {m for text in REMEDIES.values() for m in re.findall(rf"\b({area_names})\.([a-z_]+)", text)}
    assert named
    for area, field in named:
        assert field in areas.get(area, set()), f"{area}.{field} in REMEDIES is no config field"
    for name in REMEDIES:
        assert name in areas["gates"], f"REMEDIES has advice for {name}, which is no gate limit"


def test_metric_types_survive_kfp_floats():
    from components.core.cost import log_metrics, typed_metrics

    metrics = dsl.Metrics(uri="unused")
    log_metrics(metrics, {"passed": True, "n_test": 359, "accuracy": 0.98, "bad": float("nan"), "text": "x"})
    assert metrics.metadata["passed"] == 1.0 and metrics.metadata["n_test"] == 359.0  # what KFP stores
    assert "bad" not in metrics.metadata and "text" not in metrics.metadata
    assert typed_metrics(dict(metrics.metadata)) == {"passed": True, "n_test": 359, "accuracy": 0.98}
