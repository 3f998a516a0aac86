"""Tests of the privacy gate (membership-inference audit) on real, tiny digits models."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kfp import dsl
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from components.data import Splits, save_splits
from components.models import Classifier, EncoderSpec, save_classifier
from components.privacy import (
    _balanced_indices,
    membership_inference_audit,
    privacy_check,
    privacy_component,
    render_privacy_report,
)
from pipelines.config import GateConfig

DEFAULT_MAX_AUC = GateConfig().max_mia_auc
MEMORISED_EXAMPLES = 50


def _digits_splits(seed: int = 0) -> Splits:
    """Digits split like ingest does: 45% train, 15% val, 20% test, 20% pool."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    idx = np.arange(len(x))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    rest, val = train_test_split(rest, test_size=0.15 / 0.8, random_state=seed, stratify=y[rest])
    train, pool = train_test_split(rest, test_size=0.2 / 0.65, random_state=seed, stratify=y[rest])
    return Splits(x[train], y[train], x[val], y[val], x[test], y[test], x[pool], [str(i) for i in range(10)])


def _train(x, y, epochs: int, weight_decay: float, val=None, patience: int = 0, batch_size: int = 64, seed: int = 0):
    """Plain AdamW loop; with ``val`` it early-stops on validation loss and keeps the best weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test files run in parallel on 2 cores; also makes the run reproducible
    try:
        return _fit(x, y, epochs, weight_decay, val, patience, batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(x, y, epochs, weight_decay, val, patience, batch_size, seed):
    torch.manual_seed(seed)
    model = Classifier(EncoderSpec(width=16, embed_dim=32), 10)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=weight_decay)
    best_loss, best_state, stale = math.inf, None, 0
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(batch_size):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is not None:
            model.eval()
            with torch.no_grad():
                val_loss = F.cross_entropy(model(torch.from_numpy(val[0])), torch.from_numpy(val[1])).item()
            if val_loss < best_loss:
                best_loss, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


@pytest.fixture(scope="module")
def splits() -> Splits:
    return _digits_splits()


@pytest.fixture(scope="module")
def normal_model(splits):
    """Early-stopped on validation loss, with weight decay: the pipeline's kind of model."""
    return _train(splits.train_x, splits.train_y, epochs=30, weight_decay=0.01,
                  val=(splits.val_x, splits.val_y), patience=5)


@pytest.fixture(scope="module")
def memorising_model(splits):
    """50 training images, 200 full-batch epochs, no regularisation: it memorises them."""
    x, y = splits.train_x[:MEMORISED_EXAMPLES], splits.train_y[:MEMORISED_EXAMPLES]
    return _train(x, y, epochs=200, weight_decay=0.0, batch_size=MEMORISED_EXAMPLES)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, splits, normal_model, memorising_model):
    """A dataset dir plus two model dirs. The memoriser's dataset lists only its 50 images as train."""
    root = tmp_path_factory.mktemp("privacy")
    names = splits.class_names
    save_splits(splits, root / "dataset")
    save_classifier(normal_model, root / "normal", {"class_names": names})
    small = copy.copy(splits)
    small.train_x, small.train_y = splits.train_x[:MEMORISED_EXAMPLES], splits.train_y[:MEMORISED_EXAMPLES]
    save_splits(small, root / "small_dataset")
    save_classifier(memorising_model, root / "memoriser", {"class_names": names})
    return root


def test_memorising_model_leaks_and_fails_while_normal_model_passes_default_gate(artifacts):
    normal = privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), DEFAULT_MAX_AUC)
    memorised = privacy_check(str(artifacts / "small_dataset"), str(artifacts / "memoriser"), DEFAULT_MAX_AUC)

    assert normal["nonmember_accuracy"] > 0.93  # a genuinely good model, not a trivially private one
    assert normal["passed"], normal["reason"]
    assert normal["mia_auc"] < DEFAULT_MAX_AUC - 0.04  # clear margin, not luck
    assert not memorised["passed"], memorised["reason"]
    assert memorised["mia_auc"] > DEFAULT_MAX_AUC + 0.1
    assert memorised["mia_auc"] > normal["mia_auc"] + 0.2
    assert memorised["member_accuracy"] == 1.0 and memorised["member_mean_loss"] < 0.05
    assert memorised["n_per_side"] == MEMORISED_EXAMPLES
    assert f"membership-inference AUC {memorised['mia_auc']:.3f} > max {DEFAULT_MAX_AUC:.3f}" in memorised["reason"]
    assert "<= max" in normal["reason"]


def test_attack_is_near_chance_when_model_saw_neither_side(splits, normal_model):
    # Two halves of the test split: the trained model saw neither, so no attack can tell them apart.
    half = len(splits.test_x) // 2
    trained = membership_inference_audit(normal_model, splits.test_x[:half], splits.test_y[:half],
                                         splits.test_x[half:], splits.test_y[half:])
    # An untrained model "trained on" nothing: train vs test is the same distribution to it.
    torch.manual_seed(123)
    untrained = Classifier(EncoderSpec(width=16, embed_dim=32), 10).eval()
    random_model = membership_inference_audit(untrained, splits.train_x, splits.train_y, splits.test_x, splits.test_y)
    for result in (trained, random_model):
        assert abs(result["loss_attack_auc"] - 0.5) < 0.1, result
        assert abs(result["confidence_attack_auc"] - 0.5) < 0.1, result
        assert result["mia_auc"] == max(result["loss_attack_auc"], result["confidence_attack_auc"])
        assert result["attack_accuracy"] < 0.62


def test_balanced_sampling_subsamples_the_larger_side_reproducibly():
    members, nonmembers = _balanced_indices(100, 30, seed=7)
    assert len(members) == len(nonmembers) == 30
    assert len(set(members.tolist())) == 30 and members.min() >= 0 and members.max() < 100
    np.testing.assert_array_equal(nonmembers, np.arange(30))  # the smaller side is used whole
    again, _ = _balanced_indices(100, 30, seed=7)
    other, _ = _balanced_indices(100, 30, seed=8)
    np.testing.assert_array_equal(members, again)
    assert not np.array_equal(members, other)
    small, large = _balanced_indices(10, 40, seed=0)
    assert len(small) == len(large) == 10 and len(set(large.tolist())) == 10


def test_audit_balances_sides_and_reports_every_number(splits, normal_model):
    result = membership_inference_audit(normal_model, splits.train_x, splits.train_y,
                                        splits.test_x[:40], splits.test_y[:40], seed=3)
    assert result["n_per_side"] == 40
    for key in ("loss_attack_auc", "confidence_attack_auc", "mia_auc", "tpr_at_1pct_fpr", "attack_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["attack_accuracy"] >= 0.5  # the best threshold is never worse than a coin
    assert result["strongest_attack"] in ("loss", "confidence")
    # numpy arrays and tensors give the same answer
    as_tensors = membership_inference_audit(normal_model, torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y),
                                            torch.from_numpy(splits.test_x[:40]), torch.from_numpy(splits.test_y[:40]), seed=3)
    assert as_tensors["mia_auc"] == pytest.approx(result["mia_auc"])


def test_component_runs_with_kfp_artifacts_and_writes_report(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.Markdown(uri=str(tmp_path / "out" / "report.md"))
    assert report.path == str(tmp_path / "out" / "report.md")  # a local uri is the path itself

    passed = privacy_component(
        dataset=dsl.Dataset(uri=str(artifacts / "small_dataset")), model=dsl.Model(uri=str(artifacts / "memoriser")),
        max_mia_auc=DEFAULT_MAX_AUC, seed=0, metrics=metrics, report=report,
    )
    assert passed is False
    assert metrics.metadata["passed"] == 0.0
    assert metrics.metadata["mia_auc"] > DEFAULT_MAX_AUC
    assert metrics.metadata["max_mia_auc"] == DEFAULT_MAX_AUC
    assert metrics.metadata["cost_wall_seconds"] > 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "FAILED" in text and "membership-inference AUC" in text and "| loss threshold |" in text


def test_component_compiles_as_a_kfp_component():
    component = dsl.component(privacy_component, base_image="python:3.11", install_kfp_package=False)
    inputs = component.component_spec.inputs
    assert {"dataset", "model", "max_mia_auc", "seed"} <= set(inputs)


def test_report_renders_a_passing_result():
    result = {"loss_attack_auc": 0.55, "confidence_attack_auc": 0.54, "mia_auc": 0.55, "strongest_attack": "loss",
              "tpr_at_1pct_fpr": 0.02, "attack_accuracy": 0.56, "member_mean_loss": 0.01, "nonmember_mean_loss": 0.05,
              "member_mean_confidence": 0.99, "nonmember_mean_confidence": 0.98, "member_accuracy": 1.0,
              "nonmember_accuracy": 0.98, "n_per_side": 360, "max_mia_auc": 0.65, "seed": 0, "passed": True,
              "reason": "membership-inference AUC 0.550 <= max 0.650"}
    text = render_privacy_report(result)
    assert text.startswith("# Privacy check") and "PASSED" in text
    assert "| **strongest (loss)** | **0.550** (max allowed 0.650) |" in text
    assert "How to read it" in text


@pytest.mark.parametrize(
    "max_mia_auc, dataset, model, error, message",
    [
        (0.4, "dataset", "normal", ValueError, "max_mia_auc must be in [0.5, 1]"),
        (1.2, "dataset", "normal", ValueError, "max_mia_auc must be in [0.5, 1]"),
        (float("nan"), "dataset", "normal", ValueError, "max_mia_auc must be a number in [0.5, 1]"),
        ("0.6", "dataset", "normal", ValueError, "max_mia_auc must be a number in [0.5, 1]"),
        (0.65, "missing", "normal", FileNotFoundError, "is not a dataset artifact"),
        (0.65, "dataset", "missing", FileNotFoundError, "is not a model artifact"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(artifacts, max_mia_auc, dataset, model, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        privacy_check(str(artifacts / dataset), str(artifacts / model), max_mia_auc)


@pytest.mark.parametrize(
    "members, nonmembers, message",
    [(1, 10, "at least 2 members and 2 non-members"), (10, 0, "at least 2 members and 2 non-members")],
)
def test_audit_rejects_too_few_examples(splits, normal_model, members, nonmembers, message):
    with pytest.raises(ValueError, match=message):
        membership_inference_audit(normal_model, splits.test_x[:members], splits.test_y[:members],
                                   splits.test_x[:nonmembers], splits.test_y[:nonmembers])


@pytest.mark.slow
def test_component_runs_in_a_local_kfp_pipeline(artifacts, tmp_path):
    """KFP copies only the function's source: this proves the body is self-contained and the output is the bool."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    component = dsl.component(privacy_component, base_image="python:3.11", install_kfp_package=False)

    @dsl.pipeline
    def audit(dataset_uri: str, model_uri: str) -> bool:
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        return component(dataset=dataset.output, model=model.output, max_mia_auc=DEFAULT_MAX_AUC, seed=0).outputs["Output"]

    task = audit(dataset_uri=str(artifacts / "small_dataset"), model_uri=str(artifacts / "memoriser"))
    assert task.output is False
