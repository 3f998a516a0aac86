"""Augmentations: batched, plain torch (no torchvision), on tensors shaped [B, C, H, W] with pixels in [0, 1].

Every random draw goes through an explicit ``torch.Generator``, so a seeded
generator gives the same views on every run (and a resumed loop, which restores
the generator, the same views as an uninterrupted one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentPolicy:
    """How strongly to perturb a batch. Every sample draws its own random parameters."""

    max_rotate_deg: float = 0.0  # uniform in [-max, max]
    max_translate: float = 0.0  # shift as a fraction of the image side, per axis
    min_scale: float = 1.0  # zoom factor range; > 1 zooms in, i.e. a random crop resized back
    max_scale: float = 1.0
    noise_sigma: float = 0.0  # std of additive Gaussian pixel noise
    erase_prob: float = 0.0  # chance of blanking one random rectangle
    erase_max_side: float = 0.0  # its largest side as a fraction of the image side
    hflip_prob: float = 0.0  # horizontal flips: only for photos, never digits
    elastic_alpha: float = 0.0  # elastic distortion: largest displacement as a fraction of the image side
    elastic_grid: int = 3  # control points per side of the smooth random displacement field
    stroke_jitter: float = 0.0  # thicken or thin strokes: blend of up to this much dilation / erosion


NO_AUGMENTATION = AugmentPolicy()


def pretrain_policy(channels: int) -> AugmentPolicy:
    """Strong views for contrastive learning. Flips only for RGB: a flipped digit is another digit.

    Grayscale (handwriting) also gets elastic distortion and stroke-width
    jitter: the ways one writer's digit differs from another's. With the
    default pretraining length they lift few-label accuracy after fine-tuning
    (``benchmarks/label_efficiency.py`` measures it).
    """
    grayscale = channels == 1
    return AugmentPolicy(
        max_rotate_deg=15.0, max_translate=0.12, min_scale=0.9, max_scale=1.25,
        noise_sigma=0.08, erase_prob=0.5, erase_max_side=0.5,
        hflip_prob=0.5 if channels == 3 else 0.0,
        elastic_alpha=0.12 if grayscale else 0.0,
        stroke_jitter=0.5 if grayscale else 0.0,
    )


def finetune_policy(channels: int) -> AugmentPolicy:
    """Light augmentation for supervised fine-tuning."""
    return AugmentPolicy(
        max_rotate_deg=8.0, max_translate=0.08, min_scale=0.95, max_scale=1.1,
        noise_sigma=0.02, erase_prob=0.1, erase_max_side=0.3,
        hflip_prob=0.5 if channels == 3 else 0.0,
    )


def uniform(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``g``, on ``g``'s device."""
    return torch.rand(shape, generator=g, device=g.device)


def elastic_displacement(batch: int, size: int, g: torch.Generator, alpha: float, grid: int) -> torch.Tensor:
    """A smooth random displacement field [B, size, size, 2] in ``affine_grid`` coordinates.

    Uniform random offsets on a ``grid`` x ``grid`` lattice, upsampled bicubically:
    the classic elastic distortion of handwriting (Simard et al., 2003), each
    pixel moving by at most about ``alpha`` of the image side.
    """
    coarse = uniform((batch, 2, grid, grid), g) * 2 - 1
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1) * 2 * alpha  # a fraction f of the side is 2 * f in [-1, 1] coordinates


def random_stroke_width(x: torch.Tensor, g: torch.Generator, amount: float) -> torch.Tensor:
    """Thicken (dilate) or thin (erode) the strokes of each image by a random blend in [-amount, amount]."""
    t = (uniform((x.shape[0], 1, 1, 1), g) * 2 - 1) * amount
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(t > 0, x + t * (thick - x), x - t * (thin - x))


def random_affine(x: torch.Tensor, g: torch.Generator, max_rotate_deg: float, max_translate: float,
                  min_scale: float, max_scale: float, elastic_alpha: float = 0.0,
                  elastic_grid: int = 3) -> torch.Tensor:
    """Random rotation, translation, zoom (crop-resize) and optional elastic distortion in one resampling."""
    b = x.shape[0]
    angle = (uniform((b,), g) * 2 - 1) * math.radians(max_rotate_deg)
    scale = min_scale + uniform((b,), g) * (max_scale - min_scale)
    # affine_grid works in [-1, 1] coordinates, so a shift of a fraction f of the side is 2 * f.
    shift = (uniform((b, 2), g) * 2 - 1) * 2 * max_translate
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input coordinates: dividing by scale > 1 samples a smaller crop.
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0]], dim=1),
        torch.stack([sin, cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic_alpha > 0:
        grid = grid + elastic_displacement(b, x.shape[-1], g, elastic_alpha, elastic_grid)
    # Digits have a black background, so zero padding is exact; photos look better reflected.
    padding = "zeros" if x.shape[1] == 1 else "reflection"
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def gaussian_noise(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(0.0, 1.0)


def random_erasing(x: torch.Tensor, g: torch.Generator, prob: float, max_side: float) -> torch.Tensor:
    """Blank one random rectangle (set to 0) in a random share ``prob`` of the images."""
    b, _, h, w = x.shape
    eh = (uniform((b,), g) * max_side * h).ceil().clamp(min=1)
    ew = (uniform((b,), g) * max_side * w).ceil().clamp(min=1)
    top = (uniform((b,), g) * (h - eh + 1)).floor()
    left = (uniform((b,), g) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))
    chosen = (uniform((b,), g) < prob).view(b, 1, 1)
    return x.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def random_hflip(x: torch.Tensor, g: torch.Generator, prob: float) -> torch.Tensor:
    flip = (uniform((x.shape[0],), g) < prob).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(dims=(3,)), x)


def augment(x: torch.Tensor, g: torch.Generator, policy: AugmentPolicy) -> torch.Tensor:
    """Apply a policy to a batch; keeps the shape and the [0, 1] pixel range."""
    if policy == NO_AUGMENTATION:
        return x
    if policy.hflip_prob > 0 and x.shape[1] == 1:
        raise ValueError("horizontal flips are not allowed for grayscale digits (a flipped digit is another digit)")
    if (policy.max_rotate_deg or policy.max_translate or policy.min_scale != 1 or policy.max_scale != 1
            or policy.elastic_alpha > 0):
        x = random_affine(x, g, policy.max_rotate_deg, policy.max_translate, policy.min_scale, policy.max_scale,
                          policy.elastic_alpha, policy.elastic_grid)
    if policy.stroke_jitter > 0:
        x = random_stroke_width(x, g, policy.stroke_jitter)
    if policy.hflip_prob > 0:
        x = random_hflip(x, g, policy.hflip_prob)
    if policy.noise_sigma > 0:
        x = gaussian_noise(x, g, policy.noise_sigma)
    if policy.erase_prob > 0:
        x = random_erasing(x, g, policy.erase_prob, policy.erase_max_side)
    return x.clamp(0.0, 1.0)
