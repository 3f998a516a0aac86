"""Tests of the attacks the robustness gate measures (FGSM, PGD) and of robust training against them."""

import numpy as np
import pytest
import torch

from components.core.models import EncoderSpec
from components.robustness.corruptions import gaussian_noise
from components.robustness.robustness import accuracy
from components.train.adversarial import RobustTraining, fgsm, pgd, robust_training

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fgsm_epsilon_zero_is_clean_and_larger_epsilon_hurts(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    clean = accuracy(model, x, y)
    assert clean > 0.93
    assert torch.equal(fgsm(model, x, y, 0.0), x)
    assert accuracy(model, fgsm(model, x, y, 0.0), y) == clean
    small, large = accuracy(model, fgsm(model, x, y, 0.03), y), accuracy(model, fgsm(model, x, y, 0.15), y)
    assert clean > small > large
    assert large < clean - 0.2


def test_fgsm_follows_the_gradient_not_random_signs(regularised_model, test_set):
    # A sign flipped by mistake (descending the loss) would *raise* accuracy; random signs barely hurt.
    model, (x, y) = regularised_model, test_set
    epsilon = 0.1
    random_signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    random_accuracy = accuracy(model, (x + epsilon * random_signs).clamp(0, 1), y)
    assert accuracy(model, fgsm(model, x, y, epsilon), y) < random_accuracy - 0.1


def test_fgsm_stays_in_budget_and_pixel_range_and_is_batch_independent(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    adversarial = fgsm(model, x, y, 0.3)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert (adversarial - x).abs().max() <= 0.3 + 1e-6
    assert (adversarial != x).float().mean() > 0.5  # it did perturb
    # The sign of a mean loss's gradient does not depend on how the images are batched.
    small_batches = fgsm(model, x, y, 0.3, batch_size=7)
    assert (small_batches == adversarial).float().mean() > 0.99


def test_fgsm_keeps_model_mode_and_leaves_parameter_gradients_alone(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    model.zero_grad(set_to_none=True)  # training left gradients behind
    model.train()
    try:
        seen_modes = []
        hook = model.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
        fgsm(model, x[:10], y[:10], 0.1)
        hook.remove()
        assert seen_modes == [False]  # attacked in eval mode
        assert model.training  # the caller's mode is restored
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_pgd_is_at_least_as_strong_as_fgsm_at_the_same_epsilon(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    for epsilon in (0.05, 0.1):
        fgsm_acc = accuracy(model, fgsm(model, x, y, epsilon), y)
        pgd_acc = accuracy(model, pgd(model, x, y, epsilon, steps=10), y)
        assert pgd_acc <= fgsm_acc, (epsilon, pgd_acc, fgsm_acc)
    assert accuracy(model, pgd(model, x, y, 0.1, steps=10), y) < accuracy(model, x, y) - 0.2


def test_pgd_stays_in_budget_is_seeded_and_keeps_model_state(regularised_model, test_set):
    model, x, y = regularised_model, test_set[0][:64], test_set[1][:64]
    model.zero_grad(set_to_none=True)
    adversarial = pgd(model, x, y, 0.1, steps=5, seed=3)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert (adversarial - x).abs().max() <= 0.1 + 1e-6
    assert torch.equal(adversarial, pgd(model, x, y, 0.1, steps=5, seed=3))
    assert not torch.equal(adversarial, pgd(model, x, y, 0.1, steps=5, seed=4))  # the random start differs
    assert torch.equal(pgd(model, x, y, 0.0, steps=3), x)  # no budget, no change
    assert not model.training and all(p.grad is None for p in model.parameters())
    # without a random start PGD is deterministic whatever the seed
    assert torch.equal(pgd(model, x, y, 0.1, steps=2, random_start=False, seed=1),
                       pgd(model, x, y, 0.1, steps=2, random_start=False, seed=2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: RobustTraining(noise_sigma=-0.1), r"augment_noise_sigma must be a number in \[0, 1\]"),
        (lambda: RobustTraining(adversarial_epsilon=2.0), r"adversarial_epsilon must be a number in \[0, 1\]"),
        (lambda: RobustTraining(adversarial_fraction=1.5), r"adversarial_fraction must be a number in \[0, 1\]"),
    ],
)
def test_robust_training_arguments_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_robust_training_perturbs_within_budget_and_is_off_by_default(regularised_model, test_set):
    model, x, y = regularised_model, test_set[0][:200], test_set[1][:200]
    assert robust_training() is None and robust_training(0.0, 0.0, 0.5) is None
    assert robust_training(0.1) is not None and robust_training(0.0, 0.05) is not None
    adversarial = RobustTraining(adversarial_epsilon=0.1, adversarial_fraction=0.5)
    out = adversarial(model, x, y, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.35 < changed < 0.65  # about half the batch became adversarial
    assert (out - x).abs().max() <= 0.1 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert accuracy(model, out, y) < accuracy(model, x, y)  # they are harder, not random
    noisy = RobustTraining(noise_sigma=0.3)(model, x, y, torch.Generator().manual_seed(0))
    per_image = (noisy - x).flatten(1).std(dim=1)
    assert per_image.max() > 3 * per_image.min()  # each image draws its own sigma
    assert not model.training and all(p.grad is None for p in model.parameters())


def _finetune_small(splits, customize=None, seed: int = 0):
    """The project's fine-tune loop on a small random-init encoder (no pretraining needed for the comparison)."""
    from components.core.models import Encoder
    from components.train.loops import finetune_classifier

    torch.manual_seed(seed)
    encoder = Encoder(EncoderSpec(width=8, embed_dim=32))
    model, _ = finetune_classifier(encoder, splits, epochs=15, batch_size=64, learning_rate=0.02, patience=15,
                                   label_fraction=1.0, seed=seed, log=lambda line: None, encoder_lr_scale=1.0,
                                   probe_epochs=0, customize=customize)
    return model


def test_noise_augmented_training_raises_noise_accuracy_over_plain_training(splits, test_set):
    """Three seeds: the gain of one pair of small models varies too much from seed to seed to compare on its own."""
    x, y = test_set
    noisy = gaussian_noise(x, 0.4, torch.Generator().manual_seed(0))
    gains = []
    for seed in range(3):
        plain = _finetune_small(splits, seed=seed)
        robust = _finetune_small(splits, customize=RobustTraining(noise_sigma=0.3).customize, seed=seed)
        gains.append(accuracy(robust, noisy, y) - accuracy(plain, noisy, y))
        assert accuracy(robust, x, y) > 0.9  # still a good model on clean images
    assert min(gains) > 0 and float(np.mean(gains)) > 0.04, gains
