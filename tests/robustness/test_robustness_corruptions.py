"""Tests of the random and common corruptions (noise, blur, contrast, brightness, pixelate) and their severities."""

import pytest
import torch

from components.robustness.corruptions import (
    CORRUPTION_LEVELS,
    MAX_SEVERITY,
    brightness,
    contrast,
    corrupt,
    gaussian_blur,
    gaussian_noise,
    pixelate,
)
from components.robustness.robustness import accuracy, corruption_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaussian_noise_zero_sigma_is_clean_and_outputs_stay_in_range(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    assert torch.equal(gaussian_noise(x, 0.0, torch.Generator().manual_seed(0)), x)
    assert accuracy(model, gaussian_noise(x, 0.0), y) == accuracy(model, x, y)
    heavy = gaussian_noise(x, 1.0, torch.Generator().manual_seed(0))
    assert heavy.min() >= 0.0 and heavy.max() <= 1.0
    assert not torch.equal(heavy, x)
    # reproducible with the same seed, different with another
    again = gaussian_noise(x, 1.0, torch.Generator().manual_seed(0))
    other = gaussian_noise(x, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(heavy, again) and not torch.equal(heavy, other)
    assert accuracy(model, heavy, y) < accuracy(model, gaussian_noise(x, 0.1, torch.Generator().manual_seed(0)), y)


def test_corruptions_at_the_mildest_setting_keep_the_image_and_stay_in_range(test_set):
    x = test_set[0][:32]
    assert torch.equal(contrast(x, 1.0), x)
    assert torch.equal(pixelate(x, 1.0), x)
    assert torch.equal(brightness(x, 0.0), x)
    flat = torch.full((2, 1, 8, 8), 0.4)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat)  # blurring a flat image changes nothing
    assert torch.allclose(contrast(x, 0.0), x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))
    assert len(torch.unique(pixelate(x[:1], 0.5))) <= 16  # 4x4 blocks on an 8x8 image
    for name in CORRUPTION_LEVELS:
        for severity in range(1, MAX_SEVERITY + 1):
            out = corrupt(x, name, severity, seed=1)
            assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0, (name, severity)
            assert not torch.equal(out, x), (name, severity)
    assert torch.equal(corrupt(x, "gaussian_noise", 2, seed=1), corrupt(x, "gaussian_noise", 2, seed=1))


def test_accuracy_falls_with_corruption_severity(regularised_model, test_set):
    model, (x, y) = regularised_model, test_set
    clean = accuracy(model, x, y)
    table = corruption_table(model, x, y, clean)
    assert len(table) == len(CORRUPTION_LEVELS) * MAX_SEVERITY
    from scipy.stats import spearmanr

    for name in CORRUPTION_LEVELS:
        accs = [row["accuracy"] for row in table if row["corruption"] == name]
        assert accs[0] >= accs[-1] + 0.1, (name, accs)  # the worst severity clearly hurts more than the mildest
        # monotone-ish: accuracy ranks follow severity. (Pixelating an 8x8 image to 6 px aliases more than
        # to 4 px, so a strict order is not a property of the corruption; the rank correlation is.)
        assert spearmanr(range(MAX_SEVERITY), accs).statistic <= -0.85, (name, accs)
        if name != "pixelate":
            assert all(later <= earlier + 0.03 for earlier, later in zip(accs, accs[1:])), (name, accs)
    for row in table:
        assert row["relative_drop"] == pytest.approx((clean - row["accuracy"]) / clean)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: corrupt(x, "fog", 1), "unknown corruption 'fog'"),
        (lambda x: corrupt(x, "contrast", 0), "severity must be in 1..5"),
        (lambda x: gaussian_blur(x, 0.0), "blur sigma must be > 0"),
        (lambda x: contrast(x, 1.5), r"contrast factor must be in \[0, 1\]"),
        (lambda x: pixelate(x, 0.0), r"pixelate share must be in \(0, 1\]"),
    ],
)
def test_corruption_arguments_are_checked(test_set, call, message):
    with pytest.raises(ValueError, match=message):
        call(test_set[0][:4])
