"""Robustness check: does the model still work when its inputs are a little off?

Perturbations of the test images, all kept inside the valid pixel range [0, 1]:

* **Gaussian noise** (sensor noise, bad scans): add N(0, sigma^2) to every pixel;
* **common corruptions** in the spirit of ImageNet-C / CIFAR-10-C (Hendrycks &
  Dietterich 2019), each at severities 1..5: Gaussian noise, Gaussian blur,
  contrast loss, brightness shift, pixelation;
* **FGSM** (Goodfellow et al. 2015): one step of size epsilon in the sign of the
  loss gradient with respect to the input — a cheap first-order attacker;
* **PGD** (Madry et al. 2018): ``steps`` FGSM-like steps of ``step_size`` from a
  random start inside the L-infinity ball, projected back after every step — the
  standard strong first-order attacker. At the same epsilon it does at least
  about as much damage as FGSM.

The gate blocks the release when an accuracy falls below its minimum or the mean
corruption accuracy drops (relative to clean accuracy) more than allowed; the
report says which limit blocked and by how much.

The same perturbations make training more robust: ``RobustTraining`` adds noise
and FGSM examples to fine-tuning batches (``finetune_augment_noise_sigma``,
``finetune_adversarial_epsilon``), the way to make a blocked model pass.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.train.adversarial import as_tensor, fgsm, model_device, pgd

# Severity 1..5 parameters of each corruption (pixels in [0, 1]); chosen so accuracy falls step by step.
CORRUPTION_LEVELS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.18, 0.26),  # noise standard deviation
    "gaussian_blur": (0.4, 0.55, 0.7, 0.85, 1.0),  # blur sigma in pixels of the stored image
    "contrast": (0.8, 0.65, 0.5, 0.4, 0.3),  # factor kept of each pixel's distance from the image mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to every pixel
    "pixelate": (0.9, 0.75, 0.5, 0.25, 0.125),  # side of the coarse image as a share of the side
}
MAX_SEVERITY = 5




@torch.no_grad()
def accuracy(model: nn.Module, x: Any, y: Any, batch_size: int = 512) -> float:
    """Share of images ``x`` ``[N, C, H, W]`` that ``model`` labels as ``y``, computed in batches."""
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined: the split has no images")
    device, correct = model_device(model), 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[i : i + batch_size]).sum())
    return correct / len(x)


# ---------------------------------------------------------------------------
# Random and common corruptions
# ---------------------------------------------------------------------------

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
    # grid look better than a finer one (measured on 8x8 digits: 3 px worse than 2 px).
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


# ---------------------------------------------------------------------------
# Adversarial attacks (L-infinity, white box)
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The check and the gate
# ---------------------------------------------------------------------------

def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def validate_robustness_limits(noise_sigma: float, fgsm_epsilon: float, min_noise_accuracy: float,
                               min_fgsm_accuracy: float, pgd_epsilon: float = 0.0, pgd_steps: int = 1,
                               pgd_step_size: float = 0.0, min_pgd_accuracy: float = 0.0,
                               min_corruption_accuracy: float = 0.0, max_corruption_drop: float = 1.0,
                               corruption_severities: int = MAX_SEVERITY) -> None:
    if _number("noise_sigma", noise_sigma) < 0:
        raise ValueError(f"noise_sigma must be >= 0 (standard deviation of pixel noise, pixels in [0, 1]), got {noise_sigma}")
    for name, value in (("fgsm_epsilon", fgsm_epsilon), ("pgd_epsilon", pgd_epsilon)):
        if not 0 <= _number(name, value) <= 1:
            raise ValueError(f"{name} must be in [0, 1] (L-infinity pixel budget, pixels in [0, 1]), got {value}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be a whole number >= 1, got {pgd_steps!r}")
    if _number("pgd_step_size", pgd_step_size) < 0:
        raise ValueError(f"pgd_step_size must be >= 0 (0 = 2.5 * pgd_epsilon / pgd_steps), got {pgd_step_size}")
    for name, value in (("min_noise_accuracy", min_noise_accuracy), ("min_fgsm_accuracy", min_fgsm_accuracy),
                        ("min_pgd_accuracy", min_pgd_accuracy), ("min_corruption_accuracy", min_corruption_accuracy)):
        if not 0 <= _number(name, value) <= 1:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {value}")
    if not 0 <= _number("max_corruption_drop", max_corruption_drop) <= 1:
        raise ValueError(f"max_corruption_drop must be a relative drop in [0, 1] (0.1 = at most 10% below clean "
                         f"accuracy; 1 = off), got {max_corruption_drop}")
    if isinstance(corruption_severities, bool) or not isinstance(corruption_severities, int) \
            or not 1 <= corruption_severities <= MAX_SEVERITY:
        raise ValueError(f"corruption_severities must be a whole number in 1..{MAX_SEVERITY}, got {corruption_severities!r}")


def _relative_drop(clean: float, perturbed: float) -> float:
    return (clean - perturbed) / clean if clean > 0 else 0.0


def corruption_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: float,
                     severities: int = MAX_SEVERITY, seed: int = 0) -> list[dict[str, Any]]:
    """One row per corruption and severity: ``corruption``, ``severity``, ``level``, ``accuracy``, ``relative_drop``."""
    rows = []
    for name, levels in CORRUPTION_LEVELS.items():
        for severity in range(1, severities + 1):
            acc = accuracy(model, corrupt(x, name, severity, seed), y)
            rows.append({"corruption": name, "severity": severity, "level": levels[severity - 1],
                         "accuracy": acc, "relative_drop": _relative_drop(clean, acc)})
    return rows


def robustness_check(
    dataset_dir: str,
    model_dir: str,
    noise_sigma: float,
    fgsm_epsilon: float,
    min_noise_accuracy: float,
    min_fgsm_accuracy: float,
    seed: int = 0,
    pgd_epsilon: float = 0.03,
    pgd_steps: int = 10,
    pgd_step_size: float = 0.0,
    pgd_random_start: bool = True,
    min_pgd_accuracy: float = 0.0,
    corruption_severities: int = MAX_SEVERITY,
    min_corruption_accuracy: float = 0.0,
    max_corruption_drop: float = 1.0,
    override: bool = False,
    override_reason: str = "",
) -> dict[str, Any]:
    """Accuracy of the model at ``model_dir`` on the clean and perturbed test split, and the verdict.

    Returns the accuracies (clean, noise, FGSM, PGD, mean corruption) and their relative drops
    from clean, the per-corruption table (``corruptions``), the limits, and the verdict of
    ``components.core.gates.decide``: ``passed``, ``passed_checks``, ``overridden``, ``blocked_by``, ``reason``.
    """
    from components.core.data import load_splits
    from components.core.gates import Limit, decide, validate_override
    from components.core.models import load_classifier

    validate_robustness_limits(noise_sigma, fgsm_epsilon, min_noise_accuracy, min_fgsm_accuracy, pgd_epsilon,
                               pgd_steps, pgd_step_size, min_pgd_accuracy, min_corruption_accuracy,
                               max_corruption_drop, corruption_severities)
    validate_override(override, override_reason)
    splits = load_splits(dataset_dir)
    model, _ = load_classifier(model_dir)
    x, y = torch.from_numpy(splits.test_x).float(), torch.from_numpy(splits.test_y).long()

    clean = accuracy(model, x, y)
    noisy = accuracy(model, gaussian_noise(x, noise_sigma, torch.Generator().manual_seed(seed)), y)
    fgsm_acc = accuracy(model, fgsm(model, x, y, fgsm_epsilon), y)
    pgd_acc = accuracy(model, pgd(model, x, y, pgd_epsilon, pgd_steps, pgd_step_size, pgd_random_start, seed), y)
    table = corruption_table(model, x, y, clean, corruption_severities, seed)
    corruption_mean = float(np.mean([row["accuracy"] for row in table]))
    corruption_drop = _relative_drop(clean, corruption_mean)

    limits = [
        Limit("min_noise_accuracy", "noise accuracy", noisy, min_noise_accuracy, "min", f"(sigma {noise_sigma})"),
        Limit("min_fgsm_accuracy", "FGSM accuracy", fgsm_acc, min_fgsm_accuracy, "min", f"(epsilon {fgsm_epsilon})"),
        Limit("min_pgd_accuracy", "PGD accuracy", pgd_acc, min_pgd_accuracy, "min",
              f"(epsilon {pgd_epsilon}, {pgd_steps} steps)"),
        Limit("min_corruption_accuracy", "mean corruption accuracy", corruption_mean, min_corruption_accuracy, "min",
              f"({len(CORRUPTION_LEVELS)} corruptions x severities 1-{corruption_severities})"),
        Limit("max_corruption_drop", "mean corruption relative drop", corruption_drop, max_corruption_drop, "max",
              f"(clean {clean:.3f} -> {corruption_mean:.3f})"),
    ]
    verdict = decide(limits, override, override_reason)
    per_corruption = {f"corruption_{name}_accuracy": float(np.mean([r["accuracy"] for r in table if r["corruption"] == name]))
                      for name in CORRUPTION_LEVELS}
    return {
        "clean_accuracy": clean,
        "noise_accuracy": noisy,
        "fgsm_accuracy": fgsm_acc,
        "pgd_accuracy": pgd_acc,
        "corruption_accuracy": corruption_mean,
        "noise_relative_drop": _relative_drop(clean, noisy),
        "fgsm_relative_drop": _relative_drop(clean, fgsm_acc),
        "pgd_relative_drop": _relative_drop(clean, pgd_acc),
        "corruption_relative_drop": corruption_drop,
        **per_corruption,
        "noise_sigma": float(noise_sigma),
        "fgsm_epsilon": float(fgsm_epsilon),
        "pgd_epsilon": float(pgd_epsilon),
        "pgd_steps": int(pgd_steps),
        "pgd_step_size": float(pgd_step_size or 2.5 * pgd_epsilon / pgd_steps),
        "pgd_random_start": bool(pgd_random_start),
        "corruption_severities": int(corruption_severities),
        "min_noise_accuracy": float(min_noise_accuracy),
        "min_fgsm_accuracy": float(min_fgsm_accuracy),
        "min_pgd_accuracy": float(min_pgd_accuracy),
        "min_corruption_accuracy": float(min_corruption_accuracy),
        "max_corruption_drop": float(max_corruption_drop),
        "n_test": int(len(y)),
        "seed": int(seed),
        "corruptions": table,
        **verdict,
    }


def robustness_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``robustness_check`` result for KFP Metrics (no tables, no text)."""
    from components.core.gates import verdict_metrics

    skip = {"seed", "corruptions", "reason", "blocked_by", "limits_checked", "override_reason"}
    numbers = {k: v for k, v in result.items() if k not in skip}
    return {**numbers, **verdict_metrics(result)}


def render_robustness_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``robustness_check`` result for the KFP UI."""
    from components.core.gates import verdict_banner, verdict_word

    r = result

    def row(name: str, acc: float, drop: float | None, limit: float | None) -> str:
        ok = "" if limit is None else (" ✅" if acc >= limit else " ❌")
        return (
            f"| {name} | {acc:.3f} | {'—' if drop is None else f'{100 * drop:.1f}%'} | "
            f"{'—' if limit is None else f'{limit:.3f}'}{ok} |"
        )

    corruption_rows = "\n".join(
        f"| {c['corruption']} | {c['severity']} | {c['level']:g} | {c['accuracy']:.3f} | {100 * c['relative_drop']:.1f}% |"
        for c in r.get("corruptions", [])
    )
    drop_ok = "✅" if r["corruption_relative_drop"] <= r["max_corruption_drop"] else "❌"
    return f"""# Robustness check — {verdict_word(r)}

{verdict_banner(r)}

Accuracy on the {r['n_test']} test images, clean and perturbed (pixels stay in [0, 1]):

| input | accuracy | relative drop | min allowed |
|---|---|---|---|
{row('clean', r['clean_accuracy'], None, None)}
{row(f"Gaussian noise (sigma {r['noise_sigma']})", r['noise_accuracy'], r['noise_relative_drop'], r['min_noise_accuracy'])}
{row(f"FGSM (L∞ epsilon {r['fgsm_epsilon']})", r['fgsm_accuracy'], r['fgsm_relative_drop'], r['min_fgsm_accuracy'])}
{row(f"PGD (L∞ epsilon {r['pgd_epsilon']}, {r['pgd_steps']} steps of {r['pgd_step_size']:.4f}{', random start' if r['pgd_random_start'] else ''})", r['pgd_accuracy'], r['pgd_relative_drop'], r['min_pgd_accuracy'])}
{row(f"common corruptions (mean of {len(r.get('corruptions', []))})", r['corruption_accuracy'], r['corruption_relative_drop'], r['min_corruption_accuracy'])}

Mean corruption relative drop {100 * r['corruption_relative_drop']:.1f}% (max allowed {100 * r['max_corruption_drop']:.1f}%) {drop_ok}

## Common corruptions by severity

| corruption | severity | parameter | accuracy | relative drop |
|---|---|---|---|---|
{corruption_rows}

Parameters: noise and brightness in pixel units, blur sigma in pixels, contrast as the factor kept,
pixelate as the share of the side the image is averaged down to.

## How to read it
* **Gaussian noise** and the **corruptions** model what cameras, scanners and compression do; a good
  model loses little at severity 1-2. A steep fall at one corruption names what to augment with.
* **FGSM** is a one-step worst case within the epsilon budget; **PGD** iterates it from a random start
  and is the standard strong first-order attack, so its accuracy is at most about FGSM's. Both are
  white-box *lower bounds* on the damage a real adversary can do.
* A blocked model can be retrained with `finetune.augment_noise_sigma` (noise) or
  `finetune.adversarial_epsilon` (FGSM adversarial training).
"""
