"""Tests of the privacy gate (membership-inference audit) on real, tiny digits models."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import settings_of
from kfp import dsl

from components.core.data import save_splits
from components.core.models import Classifier, EncoderSpec, save_classifier
from components.privacy.component import privacy_component
from components.privacy.privacy import (
    _balanced_indices,
    average_hash,
    find_leaks,
    membership_inference_audit,
    privacy_check,
    render_privacy_report,
    train_reference_models,
    training_members,
)
from pipelines.config import DataConfig, GateConfig

DEFAULT_MAX_AUC = GateConfig().max_mia_auc
MEMORISED_EXAMPLES = 50

pytestmark = pytest.mark.usefixtures("one_thread")


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
        cfg=settings_of(data=DataConfig(seed=0), gates=GateConfig(max_mia_auc=DEFAULT_MAX_AUC)),
        metrics=metrics, report=report,
    )
    assert passed is False
    assert metrics.metadata["passed"] == 0.0
    assert metrics.metadata["mia_auc"] > DEFAULT_MAX_AUC
    assert metrics.metadata["max_mia_auc"] == DEFAULT_MAX_AUC
    assert metrics.metadata["cost_wall_seconds"] > 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "FAILED" in text and "membership-inference AUC" in text and "| loss threshold |" in text


def test_component_compiles_as_a_kfp_component():
    from pipelines.pipeline import step_component

    inputs = step_component("privacy").component_spec.inputs
    assert {"dataset", "model", "gates_max_mia_auc", "data_seed"} <= set(inputs)


def test_report_renders_a_passing_result():
    result = {"loss_attack_auc": 0.55, "confidence_attack_auc": 0.54, "mia_auc": 0.55, "strongest_attack": "loss",
              "tpr_at_1pct_fpr": 0.02, "attack_accuracy": 0.56, "member_mean_loss": 0.01, "nonmember_mean_loss": 0.05,
              "loss_attack_tpr_at_1pct_fpr": 0.02, "confidence_attack_tpr_at_1pct_fpr": 0.01,
              "member_mean_confidence": 0.99, "nonmember_mean_confidence": 0.98, "member_accuracy": 1.0,
              "nonmember_accuracy": 0.98, "n_per_side": 360, "n_members_trained": 810, "max_mia_auc": 0.65,
              "max_leaks": 0, "n_leaks": 0, "max_dp_epsilon": 10.0, "near_duplicate_distance": 0.03, "seed": 0,
              "reference_models": 0, "passed": True, "passed_checks": True, "override": False, "overridden": False,
              "override_reason": "", "blocked_by": [], "reason": "membership-inference AUC 0.550 <= max 0.650"}
    text = render_privacy_report(result)
    assert text.startswith("# Privacy check — PASSED")
    assert "| **strongest (loss)** | **0.550** (max allowed 0.650) | **0.020** |" in text
    assert "No test image duplicates a train image." in text and "Not trained with differential privacy" in text
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
    from pipelines.config import Config
    from pipelines.pipeline import config_arguments, step_component

    component = step_component("privacy", image="python:3.11")
    cfg = Config(data=DataConfig(seed=0), gates=GateConfig(max_mia_auc=DEFAULT_MAX_AUC))

    @dsl.pipeline
    def audit(dataset_uri: str, model_uri: str) -> bool:
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset)
        model = dsl.importer(artifact_uri=model_uri, artifact_class=dsl.Model)
        return component(dataset=dataset.output, model=model.output,
                         **config_arguments("privacy", cfg)).outputs["Output"]

    task = audit(dataset_uri=str(artifacts / "small_dataset"), model_uri=str(artifacts / "memoriser"))
    assert task.output is False


# --- reference-calibrated attack, members actually trained on, DP vs memorisation ---

def test_reference_attack_exposes_the_memoriser_and_not_the_normal_model(artifacts):
    memorised = privacy_check(str(artifacts / "small_dataset"), str(artifacts / "memoriser"), DEFAULT_MAX_AUC,
                              reference_models=2)
    normal = privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), DEFAULT_MAX_AUC, reference_models=2)
    assert memorised["reference_models"] == 2 and memorised["reference_attack_auc"] > DEFAULT_MAX_AUC + 0.1
    assert memorised["mia_auc"] == max(memorised["loss_attack_auc"], memorised["confidence_attack_auc"],
                                       memorised["reference_attack_auc"])
    assert normal["reference_attack_auc"] < DEFAULT_MAX_AUC - 0.03 and normal["passed"], normal["reason"]
    assert 0.0 <= memorised["reference_attack_tpr_at_1pct_fpr"] <= 1.0


def test_reference_models_are_fresh_and_seeded(splits):
    make = lambda: Classifier(EncoderSpec(width=8, embed_dim=16), 10)  # noqa: E731
    a = train_reference_models(make, splits.val_x[:64], splits.val_y[:64], 2, epochs=2, seed=0)
    b = train_reference_models(make, splits.val_x[:64], splits.val_y[:64], 2, epochs=2, seed=0)
    assert len(a) == 2 and not any(m.training for m in a)
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))
    assert not torch.equal(a[0].head.weight, a[1].head.weight)  # each reference model has its own seed


def test_members_are_the_images_the_model_trained_on(splits):
    from components.train.training import subsample_labels

    assert np.array_equal(training_members(splits, {}), np.arange(len(splits.train_y)))
    few = training_members(splits, {"label_fraction": 0.1, "seed": 3})
    assert np.array_equal(few, subsample_labels(splits.train_y, 0.1, 3)) and 70 < len(few) < 90
    assert np.array_equal(training_members(splits, {"train_indices": [5, 1, 2]}), [5, 1, 2])


@pytest.fixture(scope="module")
def dp_model(splits):
    """DP-SGD (epsilon 8) on the whole train split, from an encoder trained on the validation split only.

    The validation split plays public pretraining data: the encoder never saw a member, so the
    epsilon covers everything the model knows about the train images.
    """
    from components.train.dp import DPFinetune, DPSettings
    from components.train.training import finetune_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        public = _fit(splits.val_x, splits.val_y, epochs=15, weight_decay=0.01, val=None, patience=0,
                      batch_size=64, seed=0)
        dp = DPFinetune(DPSettings(target_epsilon=8.0, delta=1e-4, batch_size=128, learning_rate=0.5, epochs=8,
                                   trainable="projection"), len(splits.train_y), seed=0, log=lambda line: None)
        model, history = finetune_classifier(public.encoder, splits, 8, 64, 0.005, 100, 1.0, 0,
                                             log=lambda line: None, customize=dp)
        return model, dp.report(len(history))
    finally:
        torch.set_num_threads(threads)


def test_dp_model_has_lower_attack_auc_than_the_memoriser(splits, dp_model, memorising_model):
    model, report = dp_model
    dp = membership_inference_audit(model, splits.train_x, splits.train_y, splits.test_x, splits.test_y)
    memorised = membership_inference_audit(memorising_model, splits.train_x[:MEMORISED_EXAMPLES],
                                           splits.train_y[:MEMORISED_EXAMPLES], splits.test_x, splits.test_y)
    assert report["epsilon"] <= 8.0 + 0.02
    assert dp["nonmember_accuracy"] > 0.9  # it learned the task ...
    assert dp["mia_auc"] < 0.56  # ... without the members standing out
    assert dp["mia_auc"] < memorised["mia_auc"] - 0.3


# --- leakage: exact and near duplicates between train and test ---

def test_leakage_finds_planted_exact_and_near_duplicates_and_not_distinct_images(splits):
    train, test = splits.train_x[:300].copy(), splits.test_x[:200].copy()
    rng = np.random.default_rng(0)
    test[10] = train[7]  # exact copy
    test[20] = np.clip(train[8] + rng.normal(0, 0.01, train[8].shape), 0, 1)  # re-encoded: faint noise
    test[30] = np.clip(train[9] + 0.02, 0, 1)  # a little brighter
    test[40] = np.round(train[11] * 255) / 255  # 8-bit quantised: still an exact copy
    result = find_leaks(train, test, max_distance=0.03)
    found = {p["test_index"]: p for p in result["pairs"]}
    assert set(found) == {10, 20, 30, 40}, result["pairs"]  # and no distinct digit is flagged
    assert found[10]["train_index"] == 7 and found[10]["kind"] == "exact" and found[10]["distance"] == 0.0
    assert found[40]["kind"] == "exact" and found[40]["train_index"] == 11
    assert found[20]["kind"] == "near" and found[20]["train_index"] == 8 and 0 < found[20]["distance"] <= 0.03
    assert found[30]["kind"] == "near" and found[30]["train_index"] == 9
    assert result["n_exact_duplicates"] == 2 and result["n_near_duplicates"] == 2 and result["n_leaks"] == 4
    assert [p["distance"] for p in result["pairs"]] == sorted(p["distance"] for p in result["pairs"])


def test_real_digits_splits_have_no_leaks_and_a_clear_margin(splits):
    result = find_leaks(splits.train_x, splits.test_x)
    assert result["n_leaks"] == 0
    assert result["nearest_distance"] > 2 * result["near_duplicate_distance"]  # distinct digits are far apart


def test_average_hash_ignores_brightness_and_separates_different_images(splits):
    x = splits.train_x[:50]
    h = average_hash(x)
    assert h.dtype == np.uint64 and len(np.unique(h)) > 40
    assert np.array_equal(average_hash(np.clip(x * 0.8 + 0.1, 0, 1)), h)  # contrast/brightness: same hash
    big = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)  # the same images at 32x32
    assert np.array_equal(average_hash(big), h)


def test_leaks_block_the_gate_and_are_listed_in_the_report(artifacts, splits, tmp_path):
    leaky = copy.copy(splits)
    leaky.test_x = splits.test_x.copy()
    leaky.test_x[:3] = splits.train_x[:3]
    save_splits(leaky, tmp_path / "leaky")
    blocked = privacy_check(str(tmp_path / "leaky"), str(artifacts / "normal"), DEFAULT_MAX_AUC, max_leaks=0)
    allowed = privacy_check(str(tmp_path / "leaky"), str(artifacts / "normal"), DEFAULT_MAX_AUC, max_leaks=3)
    assert not blocked["passed"] and blocked["blocked_by"] == ["max_leaks"] and blocked["n_exact_duplicates"] == 3
    assert "train/test duplicates 3 > max 0 (3 exact, 0 near)" in blocked["reason"]
    assert allowed["passed"], allowed["reason"]
    text = render_privacy_report(blocked)
    assert "| 0 | 0 | exact | 0.0000 | 0 |" in text and "| 2 | 2 | exact |" in text


def test_override_releases_a_blocked_model_and_says_so(artifacts, tmp_path):
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    report = dsl.Markdown(uri=str(tmp_path / "report.md"))
    passed = privacy_component(
        dataset=dsl.Dataset(uri=str(artifacts / "small_dataset")), model=dsl.Model(uri=str(artifacts / "memoriser")),
        cfg=settings_of(data=DataConfig(seed=0), gates=GateConfig(
            max_mia_auc=DEFAULT_MAX_AUC, mia_reference_models=0, override=True,
            override_reason="DPO sign-off #42: synthetic data only")),
        metrics=metrics, report=report,
    )
    assert passed is True
    m = metrics.metadata
    assert m["passed"] == 1.0 and m["passed_checks"] == 0.0 and m["overridden"] == 1.0
    assert m["blocked_by_max_mia_auc"] == 1.0 and m["blocked_by_max_leaks"] == 0.0
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Privacy check — FAILED (OVERRIDDEN)") and "DPO sign-off #42: synthetic data only" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_dp_epsilon": 0.0}, "max_dp_epsilon must be a number > 0"),
        ({"max_leaks": -1}, "max_leaks must be a whole number >= 0"),
        ({"max_leaks": 1.5}, "max_leaks must be a whole number >= 0"),
        ({"near_duplicate_distance": 2.0}, r"near_duplicate_distance must be an RMS pixel distance in \[0, 1\]"),
        ({"reference_models": -1}, "reference_models must be a whole number in 0..64"),
        ({"override": True}, "override=True needs an override_reason"),
    ],
)
def test_new_limits_are_validated(artifacts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        privacy_check(str(artifacts / "dataset"), str(artifacts / "normal"), DEFAULT_MAX_AUC, **kwargs)


@pytest.mark.slow
def test_overfit_example_config_is_blocked_by_the_privacy_gate(tmp_path):
    """examples/overfit.yaml through the real step functions (what `mlops run` runs, minus kfp.local)."""
    from pathlib import Path

    from components.finetune.finetune import finetune
    from components.ingest.ingest import ingest
    from components.pretrain.pretrain import pretrain
    from pipelines import config

    cfg = config.load(Path(__file__).parent.parent / "examples" / "overfit.yaml")
    p, f, g = cfg.pretrain, cfg.finetune, cfg.gates
    assert f.patience >= f.epochs and f.label_fraction <= 0.1  # no early stopping, few labels
    quiet = lambda line: None  # noqa: E731
    ingest(cfg.data.source, tmp_path / "dataset", seed=cfg.data.seed)
    pretrain(tmp_path / "dataset", tmp_path / "encoder", objective=p.objective, epochs=p.epochs,
             batch_size=p.batch_size, learning_rate=p.learning_rate, width=p.width, embed_dim=p.embed_dim, log=quiet)
    finetune(tmp_path / "dataset", tmp_path / "encoder", tmp_path / "model", epochs=f.epochs, batch_size=f.batch_size,
             learning_rate=f.learning_rate, patience=f.patience, label_fraction=f.label_fraction, log=quiet,
             encoder_lr_scale=f.encoder_lr_scale, min_epoch_samples=f.min_epoch_samples)
    result = privacy_check(str(tmp_path / "dataset"), str(tmp_path / "model"), g.max_mia_auc,
                           reference_models=g.mia_reference_models, max_leaks=g.max_leaks)
    assert not result["passed"] and result["blocked_by"] == ["max_mia_auc"], result["reason"]
    assert result["mia_auc"] > g.max_mia_auc + 0.1  # far over the limit (measured 0.85), not a near miss
    assert result["member_accuracy"] == 1.0
