"""Tests of the evaluate gate: the accuracy floor, the champion/challenger check, the override, and clear failures."""

import json

import pytest
from conftest import settings_of

from components.core.models import Classifier, EncoderSpec, save_classifier
from components.evaluate.evaluate import evaluate
from components.evaluate.gate import evaluate_and_gate
from pipelines.config import GateConfig, ServingConfig


def settings(home="", **gates):
    """The evaluate step's settings: ``gates`` fields (defaults otherwise) and ``serving.home`` ("" = none)."""
    return settings_of(gates=GateConfig(**gates), serving=ServingConfig(home=str(home)))


def test_worse_challenger_is_blocked_with_both_accuracies_in_the_reason(dataset_dir, weak_model, served_home):
    result = evaluate_and_gate(dataset_dir, weak_model, settings(served_home, min_test_accuracy=0.0, max_regression=0.005))
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
    result = evaluate_and_gate(dataset_dir, known_model[0],
                               settings(served_home, min_test_accuracy=0.5, max_regression=max_regression), explain=0)
    check = result["gate"]["champion"]
    assert check["champion_accuracy"] == check["challenger_accuracy"]
    assert result["gate"]["passed"] is passes and check["passed"] is passes


def test_better_challenger_within_the_accuracy_floor_passes(dataset_dir, known_model, weak_model, tmp_path):
    champion = {"max_regression": 0.0, "champion_model": str(weak_model)}
    result = evaluate_and_gate(dataset_dir, known_model[0], settings(min_test_accuracy=0.5, **champion), explain=0)
    assert result["gate"]["passed"] is True and result["gate"]["champion"]["status"] == "compared"
    blocked = evaluate_and_gate(dataset_dir, known_model[0], settings(min_test_accuracy=0.99, **champion), explain=0)
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
    result = evaluate_and_gate(dataset_dir, known_model[0], settings(tmp_path / "no-home", min_test_accuracy=0.5,
                                                                     max_regression=0.005, champion_model=spec),
                               explain=0)
    check = result["gate"]["champion"]
    assert check["status"] == status and check["passed"] is True and check["reason"].startswith(reason)
    assert result["gate"]["passed"] is True and reason in result["gate"]["reason"]
    assert "champion_accuracy" not in check


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
        call, kwargs, gates, home = evaluate_and_gate, {"explain": 0}, {"min_test_accuracy": 0.5, "max_regression": 0.0}, ""
        if setup == "bad_regression":
            gates["max_regression"] = 5.0
        elif setup == "missing_champion":
            gates["champion_model"] = str(tmp_path / "nowhere")
        elif setup == "corrupt_mar":
            (tmp_path / "m.mar").write_bytes(b"not a zip")
            gates["champion_model"] = str(tmp_path / "m.mar")
        else:
            (tmp_path / "state.json").write_text("{broken" if setup == "broken_state" else json.dumps({"model_name": "digits"}))
            home = tmp_path
        args = (dataset_dir, model_dir, settings(home, **gates))
    with pytest.raises(error, match=message):
        call(*args, **kwargs)



def test_overridden_gate_releases_a_blocked_model_and_records_why(dataset_dir, weak_model, served_home):
    result = evaluate_and_gate(dataset_dir, weak_model, settings(
        served_home, min_test_accuracy=0.99, max_regression=0.005, override=True,
        override_reason="release manager: demo build, accuracy accepted"), explain=0)
    gate = result["gate"]
    assert gate["passed"] is True and gate["passed_checks"] is False and gate["overridden"] is True
    assert gate["override"] is True and gate["override_reason"] == "release manager: demo build, accuracy accepted"
    assert gate["blocked_by"] == ["min_test_accuracy", "max_regression"]
    assert gate["limits_checked"] == ["min_test_accuracy", "max_regression"]
    assert gate["accuracy_passed"] is False and gate["champion"]["passed"] is False  # the failure stays on record
    assert "min_test_accuracy 0.9900" in gate["reason"] and "stays" in gate["reason"]


def test_override_of_a_passing_gate_changes_nothing(dataset_dir, known_model):
    result = evaluate_and_gate(dataset_dir, known_model[0], settings(
        min_test_accuracy=0.5, champion_model="none", override=True, override_reason="not needed"), explain=0)
    gate = result["gate"]
    assert gate["passed"] is True and gate["passed_checks"] is True and gate["overridden"] is False
    assert gate["blocked_by"] == [] and gate["limits_checked"] == ["min_test_accuracy"]  # no champion, no regression limit
    assert gate["reason"].endswith("; champion comparison disabled (champion_model='none')")


@pytest.mark.parametrize("override, reason, message", [
    (True, "", "override=True needs an override_reason"),
    (True, "   ", "override=True needs an override_reason"),
    ("yes", "x", "override must be true or false"),
])
def test_override_without_a_reason_is_refused(tmp_path, dataset_dir, known_model, override, reason, message):
    cfg = settings(min_test_accuracy=0.5, override=override, override_reason=reason)
    with pytest.raises(ValueError, match=message):
        evaluate_and_gate(dataset_dir, known_model[0], cfg, out_dir=tmp_path / "out", explain=0)
    assert not (tmp_path / "out").exists()  # refused before anything was scored or written
