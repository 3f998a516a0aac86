"""Tests of the augmentations: shapes, pixel range, seeding, and which views digits and photos get."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.train.augment import (
    AugmentPolicy,
    augment,
    elastic_displacement,
    finetune_policy,
    pretrain_policy,
    random_stroke_width,
)


@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("make_policy", [pretrain_policy, finetune_policy])
def test_augment_keeps_shape_and_range_and_is_seeded(make_policy, channels, size):
    x = torch.rand(32, channels, size, size, generator=torch.Generator().manual_seed(0))
    policy = make_policy(channels)
    out = augment(x, torch.Generator().manual_seed(3), policy)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(3), policy))


def test_digits_are_never_flipped():
    assert pretrain_policy(1).hflip_prob == 0 and finetune_policy(1).hflip_prob == 0
    # Ink only in the left third: after augmentation the ink must still sit on the left.
    x = torch.zeros(256, 1, 8, 8)
    x[:, :, 1:7, 1:3] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), pretrain_policy(1))
    columns = torch.arange(8).float()
    ink = out.sum(dim=(1, 2))  # [B, W]
    centre = (ink * columns).sum(1) / ink.sum(1).clamp(min=1e-6)
    assert torch.all(centre < 3.5)
    with pytest.raises(ValueError, match="flips are not allowed for grayscale"):
        augment(x, torch.Generator(), AugmentPolicy(hflip_prob=0.5))


def test_elastic_distortion_moves_ink_locally_and_is_seeded():
    field = elastic_displacement(16, 8, torch.Generator().manual_seed(0), alpha=0.1, grid=3)
    assert field.shape == (16, 8, 8, 2)
    assert 0 < field.abs().max() <= 2 * 0.1 * 1.3  # bicubic may overshoot the lattice values a little
    assert (field[:, 1:] - field[:, :-1]).abs().max() < field.abs().max()  # smooth: neighbours move together
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 2:6, 3:5] = 1.0
    policy = AugmentPolicy(elastic_alpha=0.12)
    out = augment(x, torch.Generator().manual_seed(1), policy)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1), policy))
    assert not torch.allclose(out, x) and out.min() >= 0 and out.max() <= 1
    # A distortion, not a wipe-out: the ink stays roughly where and as much as it was.
    ink = out.sum(dim=(1, 2, 3))
    assert torch.all(ink > 0.4 * 8) and abs(ink.mean().item() - 8) < 0.15 * 8
    assert torch.equal(augment(x, torch.Generator().manual_seed(1), AugmentPolicy(elastic_alpha=0.0)), x)


def test_handwriting_views_are_distorted_elastically_and_photos_are_not():
    """The pretraining recipe: digits get elastic + stroke-width views (they lift few-label accuracy)."""
    assert pretrain_policy(1).elastic_alpha > 0 and pretrain_policy(1).stroke_jitter > 0
    assert pretrain_policy(3).elastic_alpha == 0 and pretrain_policy(3).stroke_jitter == 0
    assert finetune_policy(1).elastic_alpha == 0  # fine-tuning keeps its light policy (both benchmark arms)


def test_stroke_jitter_thickens_some_digits_and_thins_others():
    x = torch.zeros(256, 1, 8, 8)
    x[:, :, 1:7, 3:5] = 1.0  # a 2-pixel-wide bar
    out = random_stroke_width(x, torch.Generator().manual_seed(0), 0.5)
    ink, before = out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3))
    assert (ink > before).any() and (ink < before).any()
    assert out.min() >= 0 and out.max() <= 1
    # At most half-way to full dilation / erosion.
    thick = torch.nn.functional.max_pool2d(x, 3, 1, 1).sum(dim=(1, 2, 3))
    assert torch.all(ink <= before + 0.5 * (thick - before) + 1e-5)


def test_photos_may_be_flipped():
    assert pretrain_policy(3).hflip_prob > 0
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), AugmentPolicy(hflip_prob=0.5))
    flipped = np.array([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    unchanged = np.array([torch.equal(o, i) for o, i in zip(out, x)])
    assert flipped.any() and unchanged.any() and np.all(flipped | unchanged)
