"""Tests of the membership-inference audit (loss, confidence and reference-calibrated attacks) on tiny digits models."""

import numpy as np
import pytest
import torch
from conftest import MEMORISED_EXAMPLES, train_classifier

from components.core.models import Classifier, EncoderSpec
from components.privacy.membership import _balanced_indices, membership_inference_audit, train_reference_models

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attack_is_near_chance_when_model_saw_neither_side(splits, regularised_model):
    # Two halves of the test split: the trained model saw neither, so no attack can tell them apart.
    half = len(splits.test_x) // 2
    trained = membership_inference_audit(regularised_model, splits.test_x[:half], splits.test_y[:half],
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


def test_audit_balances_sides_and_reports_every_number(splits, regularised_model):
    result = membership_inference_audit(regularised_model, splits.train_x, splits.train_y,
                                        splits.test_x[:40], splits.test_y[:40], seed=3)
    assert result["n_per_side"] == 40
    for key in ("loss_attack_auc", "confidence_attack_auc", "mia_auc", "tpr_at_1pct_fpr", "attack_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["attack_accuracy"] >= 0.5  # the best threshold is never worse than a coin
    assert result["strongest_attack"] in ("loss", "confidence")
    # numpy arrays and tensors give the same answer
    as_tensors = membership_inference_audit(regularised_model, torch.from_numpy(splits.train_x),
                                            torch.from_numpy(splits.train_y), torch.from_numpy(splits.test_x[:40]),
                                            torch.from_numpy(splits.test_y[:40]), seed=3)
    assert as_tensors["mia_auc"] == pytest.approx(result["mia_auc"])


@pytest.mark.parametrize(
    "members, nonmembers, message",
    [(1, 10, "at least 2 members and 2 non-members"), (10, 0, "at least 2 members and 2 non-members")],
)
def test_audit_rejects_too_few_examples(splits, regularised_model, members, nonmembers, message):
    with pytest.raises(ValueError, match=message):
        membership_inference_audit(regularised_model, splits.test_x[:members], splits.test_y[:members],
                                   splits.test_x[:nonmembers], splits.test_y[:nonmembers])


def test_reference_models_are_fresh_and_seeded(splits):
    make = lambda: Classifier(EncoderSpec(width=8, embed_dim=16), 10)  # noqa: E731
    a = train_reference_models(make, splits.val_x[:64], splits.val_y[:64], 2, epochs=2, seed=0)
    b = train_reference_models(make, splits.val_x[:64], splits.val_y[:64], 2, epochs=2, seed=0)
    assert len(a) == 2 and not any(m.training for m in a)
    assert all(torch.equal(x, y) for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()))
    assert not torch.equal(a[0].head.weight, a[1].head.weight)  # each reference model has its own seed


@pytest.fixture(scope="module")
def dp_model(splits):
    """DP-SGD (epsilon 8) on the whole train split, from an encoder trained on the validation split only.

    The validation split plays public pretraining data: the encoder never saw a member, so the
    epsilon covers everything the model knows about the train images.
    """
    from components.train.dp import DPFinetune, DPSettings
    from components.train.loops import finetune_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        public = train_classifier(splits.val_x, splits.val_y, epochs=15, weight_decay=0.01)
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
