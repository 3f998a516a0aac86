"""Random and common corruptions of images, all kept inside the valid pixel range [0, 1].

* **Gaussian noise** (sensor noise, bad scans): add N(0, sigma^2) to every pixel;
* **common corruptions** in the spirit of ImageNet-C / CIFAR-10-C (Hendrycks &
  Dietterich 2019), each at severities 1..5: Gaussian noise, Gaussian blur,
  contrast loss, brightness shift, pixelation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from components.train.adversarial import as_tensor

# Severity 1..5 parameters of each corruption (pixels in [0, 1]); chosen so accuracy falls step by step.
CORRUPTION_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise standard deviation
    "gaussian_blur": (0.4, 0.55, 0.7, 0.85, 1.0),  # blur sigma in pixels of the stored image
    "contrast": (0.8, 0.65, 0.5, 0.4, 0.3),  # factor kept of each pixel's distance from the image mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "pixelate": (0.9, 0.75, 0.5, 0.25, 0.125),  # side of the coarse image as a share of the side
}
MAX_SEVERITY = 5


def gaussian_noise(x: Any, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus N(0, sigma^2) pixel noise, clipped back to [0, 1]. ``generator`` makes it reproducible."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    x = as_tensor(x, torch.float32)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    return (x + sigma * noise).clamp(0.0, 1.0)


def gaussian_blur(x: Any, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (edges replicated)."""
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    x = as_tensor(x, torch.float32)
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c).clamp(0.0, 1.0)


def contrast(x: Any, factor: float) -> torch.Tensor:
    """Pull every pixel towards its image's mean: ``factor`` 1 keeps the image, 0 makes it flat grey."""
    if not 0 <= factor <= 1:
        raise ValueError(f"contrast factor must be in [0, 1], got {factor}")
    x = as_tensor(x, torch.float32)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0.0, 1.0)


def brightness(x: Any, shift: float) -> torch.Tensor:
    """Add ``shift`` to every pixel (clipped): an over-exposed scan."""
    return (as_tensor(x, torch.float32) + shift).clamp(0.0, 1.0)


def pixelate(x: Any, share: float) -> torch.Tensor:
    """Average down to ``share`` of the side, then blow back up with nearest-neighbour: blocky pixels."""
    if not 0 < share <= 1:
        raise ValueError(f"pixelate share must be in (0, 1], got {share}")
    x = as_tensor(x, torch.float32)
    h, w = x.shape[-2:]
    coarse = F.interpolate(x, size=(max(1, round(h * share)), max(1, round(w * share))), mode="area")
    # "nearest-exact" samples block centres; plain "nearest" shifts uneven blocks and can make a coarser
    # grid look better than a finer one.
    return F.interpolate(coarse, size=(h, w), mode="nearest-exact")


def corrupt(x: Any, corruption: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``x`` under one named corruption at ``severity`` 1..5 (see ``CORRUPTION_LEVELS``)."""
    if corruption not in CORRUPTION_LEVELS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {list(CORRUPTION_LEVELS)}")
    if not 1 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 1..{MAX_SEVERITY}, got {severity}")
    level = CORRUPTION_LEVELS[corruption][severity - 1]
    if corruption == "gaussian_noise":
        return gaussian_noise(x, level, torch.Generator().manual_seed(seed * 100 + severity))
    return {"gaussian_blur": gaussian_blur, "contrast": contrast, "brightness": brightness,
            "pixelate": pixelate}[corruption](x, level)

