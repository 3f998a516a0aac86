"""Tests of DP-SGD fine-tuning (components.train.dp): layer fixes, accounting, sampling, the loop, the ε gate."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from components.core.data import Splits, save_splits
from components.core.models import Classifier, Encoder, EncoderSpec, load_classifier, save_encoder
from components.train.dp import (
    DP_TRAINABLE,
    DPFinetune,
    DPSettings,
    make_dp_compatible,
    noise_multiplier_for,
    poisson_batches,
    sample_rate_and_steps,
    set_dp_trainable,
    spent_epsilon,
    standardize_embedding,
    validate_dp_settings,
)

SPEC = EncoderSpec(width=8, embed_dim=16)


@pytest.fixture(scope="module")
def splits() -> Splits:
    """Digits, split roughly like ingest: a few hundred train images keep the DP tests fast."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, val, test = order[:400], order[400:600], order[600:900]
    return Splits(x[train], y[train], x[val], y[val], x[test], y[test], x[900:1000], [str(i) for i in range(10)])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, splits):
    root = tmp_path_factory.mktemp("dp")
    save_splits(splits, root / "dataset")
    torch.manual_seed(0)
    save_encoder(Encoder(SPEC), root / "encoder", {"objective": "none", "epochs": 0})
    return root


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test files run in parallel on 2 cores; also makes runs reproducible
    yield
    torch.set_num_threads(threads)


# --- layers DP-SGD can train ---

def test_project_models_need_no_fix_and_batchnorm_is_replaced_with_groupnorm():
    for arch, depth in (("cnn", 0), ("resnet", 10), ("vgg", 11)):
        model = Classifier(EncoderSpec(width=8, embed_dim=16, arch=arch, depth=depth), 10)
        fixed, replaced = make_dp_compatible(model)
        assert fixed is model and replaced == [], arch

    with_batchnorm = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    fixed, replaced = make_dp_compatible(with_batchnorm)
    assert replaced and "BatchNorm" in replaced[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())


@pytest.mark.parametrize("trainable", DP_TRAINABLE)
def test_set_dp_trainable_freezes_all_but_the_chosen_layers(trainable):
    model = Classifier(SPEC, 10)
    trained = set_dp_trainable(model, trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == len(names)
    head = {"head.weight", "head.bias"}
    projection = {"encoder.project.weight", "encoder.project.bias"}
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    norm_params = {f"{n}.{w}" for n in norms for w in ("weight", "bias")}
    expected = {"head": head, "projection": head | projection, "normalization": head | projection | norm_params,
                "all": {n for n, _ in model.named_parameters()}}[trainable]
    assert names == expected
    assert len(norm_params) == 8  # the cnn has four GroupNorms


# --- accounting and sampling ---

def test_noise_is_calibrated_to_the_target_and_spending_grows_with_steps():
    q, steps, delta, accountant = 0.3, 90, 1e-5, "rdp"
    sigma = noise_multiplier_for(8.0, delta, q, steps, accountant)
    spent = spent_epsilon(sigma, q, steps, delta, accountant)
    assert 7.8 <= spent <= 8.0 + 0.02  # the smallest noise that meets the target, within the solver's tolerance
    assert spent_epsilon(sigma, q, steps // 2, delta, accountant) < spent < spent_epsilon(sigma, q, 2 * steps, delta, accountant)
    assert spent_epsilon(sigma, q, 0, delta, accountant) == 0.0
    assert spent_epsilon(1.5 * sigma, q, steps, delta, accountant) < spent  # more noise, less spent
    # the PRV accountant is tighter than RDP for the same training: the same noise spends less
    assert 0.8 * spent < spent_epsilon(sigma, q, steps, delta, "prv") < spent


def test_poisson_batches_are_seeded_per_epoch_and_vary_in_size():
    n, q = 1000, 0.1
    rate, steps = sample_rate_and_steps(n, 100)
    assert rate == pytest.approx(q) and steps == 10
    batches = poisson_batches(n, rate, steps, seed=0, epoch=0)
    sizes = [len(b) for b in batches]
    assert len(batches) == 10 and len(set(sizes)) > 1  # Poisson: sizes vary
    assert 70 < np.mean(sizes) < 130
    assert all(b.unique().numel() == len(b) and b.min() >= 0 and b.max() < n for b in batches)
    again = poisson_batches(n, rate, steps, seed=0, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # a resumed run draws the same batches
    assert not torch.equal(poisson_batches(n, rate, steps, seed=0, epoch=1)[0], batches[0])
    assert sample_rate_and_steps(50, 256) == (1.0, 1)  # a batch larger than the data: every image, every step


@pytest.mark.parametrize(
    "overrides, n_train, message",
    [
        ({"target_epsilon": 0.0}, 400, "dp_epsilon must be > 0"),
        ({"target_epsilon": float("inf")}, 400, "dp_epsilon must be > 0"),
        ({"delta": 0.0}, 400, r"dp_delta must be in \(0, 1\)"),
        ({"delta": 0.01}, 400, "dp_delta 0.01 must be below 1/n = 2.50e-03 for 400 training images"),
        ({"max_grad_norm": -1.0}, 400, "dp_max_grad_norm must be > 0"),
        ({"batch_size": 8}, 400, "dp_batch_size must be a whole number >= 16"),
        ({"learning_rate": 0}, 400, "dp_learning_rate must be > 0"),
        ({"trainable": "encoder"}, 400, "dp_trainable must be one of"),
        ({"accountant": "gdp"}, 400, "the DP accountant must be one of"),
        ({"epochs": 0}, 400, "dp_epochs must be a whole number >= 1"),
    ],
)
def test_bad_dp_settings_fail_with_a_clear_message(overrides, n_train, message):
    settings = DPSettings(**{"target_epsilon": 8.0, **overrides})
    with pytest.raises(ValueError, match=message):
        validate_dp_settings(settings, n_train)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError, match="dp_epsilon must be > 0.*dp_batch_size must be"):
        validate_dp_settings(DPSettings(target_epsilon=-1.0, batch_size=2), 400)


# --- the loop: finetune() with dp_epsilon set, the metadata, the gate ---

@pytest.fixture(scope="module")
def dp_model(dirs):
    """DP-SGD through the project's finetune() (what the pipeline step calls), with adversarial examples too."""
    from conftest import settings_of

    from components.finetune.finetune import finetune
    from pipelines.config import DataConfig, FinetuneConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = settings_of(data=DataConfig(seed=0), finetune=FinetuneConfig(
            dp_epsilon=4.0, dp_delta=1e-4, dp_batch_size=64, dp_learning_rate=0.5, dp_epochs=4, dp_trainable="all",
            adversarial_epsilon=0.05, adversarial_fraction=0.5, patience=100))
        summary = finetune(dirs / "dataset", dirs / "encoder", dirs / "dp_model", cfg, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return summary, dirs / "dp_model"


def test_dp_finetune_spends_at_most_the_target_and_records_it(dp_model, splits):
    summary, model_dir = dp_model
    meta = json.loads((model_dir / "metadata.json").read_text())
    dp = meta["dp"]
    assert 3.5 < dp["epsilon"] <= 4.0 + 0.02  # every planned epoch ran: (nearly) the whole budget
    assert summary["dp_epsilon"] == dp["epsilon"]
    assert dp["delta"] == 1e-4 and dp["poisson_sampling"] is True and dp["trainable"] == "all"
    assert dp["standardized_embedding"] is True  # finetune() hands the validation images to the hook
    assert dp["sample_rate"] == pytest.approx(64 / 400) and dp["steps"] == 4 * int(400 / 64)
    assert dp["noise_multiplier"] > 0.5 and dp["replaced_layers"] == []
    assert dp["n_trainable_parameters"] == sum(p.numel() for p in Classifier(SPEC, 10).parameters())
    assert meta["robust_training"]["adversarial_epsilon"] == 0.05
    model, _ = load_classifier(model_dir)  # the artifact is a plain classifier: serving loads it as any other
    assert isinstance(model, Classifier)
    assert summary["epochs_run"] == 4


def test_privacy_gate_checks_the_spent_epsilon(dp_model, dirs):
    from conftest import settings_of

    from components.privacy.privacy import privacy_check
    from pipelines.config import DataConfig, GateConfig

    def gates(max_dp_epsilon: float):
        return settings_of(data=DataConfig(seed=0),
                           gates=GateConfig(max_mia_auc=1.0, max_dp_epsilon=max_dp_epsilon, mia_reference_models=0))

    _, model_dir = dp_model
    allowed = privacy_check(str(dirs / "dataset"), str(model_dir), gates(10.0))
    assert allowed["passed"] and allowed["dp_trained"] and "max_dp_epsilon" in allowed["limits_checked"]
    assert allowed["dp_epsilon"] == pytest.approx(json.loads((model_dir / "metadata.json").read_text())["dp"]["epsilon"])
    blocked = privacy_check(str(dirs / "dataset"), str(model_dir), gates(2.0))
    assert not blocked["passed"] and blocked["blocked_by"] == ["max_dp_epsilon"]
    assert f"DP epsilon spent {blocked['dp_epsilon']:.3f} > max 2.000" in blocked["reason"]


def test_dp_finetune_leaves_the_frozen_layers_untouched(dirs, splits):
    from components.core.models import load_encoder
    from components.train.loops import finetune_classifier

    encoder, _ = load_encoder(dirs / "encoder")
    dp = DPFinetune(DPSettings(target_epsilon=8.0, delta=1e-4, batch_size=64, epochs=1, trainable="projection",
                               standardize=False),
                    len(splits.train_y), seed=0, log=lambda line: None)
    model, history = finetune_classifier(encoder, splits, 1, 64, 0.01, 5, 1.0, 0, log=lambda line: None, customize=dp)
    for name, value in encoder.state_dict().items():
        changed = not torch.equal(model.encoder.state_dict()[name], value)
        assert changed == name.startswith("project."), name
    assert 7.5 < dp.report(len(history))["epsilon"] <= 8.0 + 0.02  # the one planned epoch ran: the whole budget


# --- the default recipe: a standardised embedding ---

def test_dp_defaults_are_the_measured_recipe_and_match_the_pipeline_config():
    from pipelines.config import FinetuneConfig

    s, c = DPSettings(target_epsilon=8.0), FinetuneConfig()
    assert (s.trainable, s.standardize, s.augment, s.learning_rate) == ("normalization", True, False, 0.25)
    assert (c.dp_delta, c.dp_max_grad_norm, c.dp_batch_size, c.dp_learning_rate, c.dp_epochs, c.dp_trainable) == \
        (s.delta, s.max_grad_norm, s.batch_size, s.learning_rate, s.epochs, s.trainable)


def test_standardize_embedding_folds_the_reference_statistics_into_the_projection(splits):
    torch.manual_seed(0)
    model = Classifier(SPEC, 10).eval()
    x_ref, x_other = torch.as_tensor(splits.val_x), torch.as_tensor(splits.test_x)
    with torch.no_grad():
        z_ref, z_other = model.encoder(x_ref), model.encoder(x_other)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = standardize_embedding(model, splits.val_x)
    assert summary["reference_images"] == len(splits.val_x)
    with torch.no_grad():
        s_ref, s_other = model.encoder(x_ref), model.encoder(x_other)
    assert s_ref.mean(0).abs().max() < 1e-4 and (s_ref.std(0) - 1).abs().max() < 1e-3
    mean, std = z_ref.mean(0), z_ref.std(0)
    torch.testing.assert_close(s_other, (z_other - mean) / std, atol=1e-4, rtol=1e-4)  # one affine map for all images
    assert isinstance(model.encoder.project, nn.Linear) and not model.training
    for name, value in model.state_dict().items():  # only the projection changed
        assert torch.equal(value, before[name]) != name.startswith("encoder.project."), name
    with pytest.raises(ValueError, match="at least 2 reference images"):
        standardize_embedding(model, splits.val_x[:1])


def test_standardisation_without_reference_images_is_logged_and_reported(splits):
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="at least 2 reference images"):
        DPFinetune(DPSettings(target_epsilon=8.0), 400, seed=0, reference_images=splits.val_x[:1])
    lines = []
    dp = DPFinetune(DPSettings(target_epsilon=8.0, delta=1e-4, epochs=1), 400, seed=0, log=lines.append)
    model = Classifier(SPEC, 10)
    before = model.encoder.project.weight.clone()
    parts = SimpleNamespace(model=model, forward=model, optimizer=None, scheduler=None, batches=None, policy=None)
    dp(parts)
    assert torch.equal(model.encoder.project.weight, before)
    assert any("not standardised" in line for line in lines)
    assert dp.report(1)["standardized_embedding"] is False


def test_a_dp_linear_probe_learns_far_more_on_the_standardised_embedding(dirs, splits):
    from components.core.models import load_encoder
    from components.robustness.robustness import accuracy
    from components.train.loops import finetune_classifier

    encoder, _ = load_encoder(dirs / "encoder")
    results = {}
    for standardize in (True, False):
        settings = DPSettings(target_epsilon=8.0, delta=1e-4, batch_size=64, epochs=8, learning_rate=0.5,
                              trainable="head", standardize=standardize)
        dp = DPFinetune(settings, len(splits.train_y), seed=0, log=lambda line: None, reference_images=splits.val_x)
        model, history = finetune_classifier(encoder, splits, settings.epochs, 64, 0.01, 100, 1.0, 0,
                                             log=lambda line: None, customize=dp)
        results[standardize] = accuracy(model, splits.test_x, splits.test_y)
        record = dp.report(len(history))
        assert record["epsilon"] <= 8.0 + 0.02 and record["standardized_embedding"] is standardize
        assert record["n_trainable_parameters"] == SPEC.embed_dim * 10 + 10  # the head alone
        for name, value in encoder.state_dict().items():  # the encoder is frozen; the fold moves the projection
            changed = not torch.equal(model.encoder.state_dict()[name], value)
            assert changed == (standardize and name.startswith("project.")), name
        if standardize:  # the frozen projection still standardises the validation embedding after training
            with torch.no_grad():
                z = model.encoder(torch.as_tensor(splits.val_x))
            assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1).abs().max() < 1e-3
    assert results[True] > results[False] + 0.05, results  # why it is the default: well-conditioned features
