"""Robustness check: does the model still work when its inputs are a little off?

Perturbations of the test images, all kept inside the valid pixel range [0, 1]:

* **Gaussian noise** and the **common corruptions** (``corruptions``): noise, blur,
  contrast loss, brightness shift and pixelation, each at severities 1..5;
* **FGSM** (Goodfellow et al. 2015): one step of size epsilon in the sign of the
  loss gradient with respect to the input — a cheap first-order attacker;
* **PGD** (Madry et al. 2018): ``steps`` FGSM-like steps of ``step_size`` from a
  random start inside the L-infinity ball, projected back after every step — the
  standard strong first-order attacker. At the same epsilon it does at least
  about as much damage as FGSM.

The attacks live in ``components.train.adversarial``, beside ``RobustTraining``,
which adds noise and FGSM examples to fine-tuning batches
(``finetune.augment_noise_sigma``, ``finetune.adversarial_epsilon``): the way to
make a blocked model pass.

The gate blocks the release when an accuracy falls below its minimum or the mean
corruption accuracy drops (relative to clean accuracy) more than allowed; the
report says which limit blocked and by how much.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from components.core.data import load_splits
from components.core.gates import Limit, decide, validate_override, verdict_metrics
from components.core.models import load_classifier
from components.core.settings import Settings
from components.robustness.corruptions import CORRUPTION_LEVELS, MAX_SEVERITY, corrupt, gaussian_noise
from components.train.adversarial import as_tensor, fgsm, model_device, pgd


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


# Multiples of each attack's gate epsilon measured for the report's accuracy-against-strength curve (1 is the gate's
# own measurement, reused; the gate looks at its epsilon only). FGSM costs one gradient per image, so its curve is
# cheap; PGD costs pgd_steps gradients per image, so another PGD point would cost as much as the gate's own PGD.
ATTACK_STRENGTHS = {"FGSM": (0.25, 0.5, 1.0, 2.0), "PGD": (1.0,)}


def attack_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: Any, seed: int, fgsm_accuracy: float,
                 pgd_accuracy: float) -> list[dict[str, Any]]:
    """Accuracy under FGSM and PGD at ``ATTACK_STRENGTHS`` times their gate epsilons (capped at 1), one row each:
    ``attack``, ``epsilon``, ``accuracy``, ``gate`` (the gate's own point). PGD keeps its steps; an explicit step
    size scales with epsilon, 0 stays 2.5 epsilon / steps."""
    rows = []
    for attack, gate_epsilon, gate_accuracy in (("FGSM", g.fgsm_epsilon, fgsm_accuracy),
                                                ("PGD", g.pgd_epsilon, pgd_accuracy)):
        done: set[float] = set()
        for scale in sorted(ATTACK_STRENGTHS[attack], key=lambda s: s != 1.0):  # the gate's point first: kept
            epsilon = min(1.0, float(gate_epsilon) * scale)
            if epsilon in done:
                continue
            done.add(epsilon)
            if scale == 1.0:
                acc = gate_accuracy
            elif attack == "FGSM":
                acc = accuracy(model, fgsm(model, x, y, epsilon), y)
            else:
                acc = accuracy(model, pgd(model, x, y, epsilon, g.pgd_steps, g.pgd_step_size * scale,
                                          g.pgd_random_start, seed), y)
            rows.append({"attack": attack, "epsilon": epsilon, "accuracy": acc, "gate": scale == 1.0})
    return sorted(rows, key=lambda r: (r["attack"], r["epsilon"]))


def robustness_check(dataset_dir: str, model_dir: str, cfg: Settings) -> dict[str, Any]:
    """Accuracy of the model at ``model_dir`` on the clean and perturbed test split, and the verdict.

    ``cfg.gates`` holds the perturbations, the attacks, the limits and the override;
    ``cfg.data.seed`` seeds the Gaussian noise, the noise corruption and PGD's random start.
    Returns the accuracies (clean, noise, FGSM, PGD, mean corruption) and their relative drops
    from clean, the per-corruption table (``corruptions``), accuracy against attack strength (``attack_curve``,
    see :func:`attack_curve`), the limits, and the verdict of
    ``components.core.gates.decide``: ``passed``, ``passed_checks``, ``overridden``, ``blocked_by``, ``reason``.
    """
    g, seed = cfg.gates, cfg.data.seed
    validate_robustness_limits(g.noise_sigma, g.fgsm_epsilon, g.min_noise_accuracy, g.min_fgsm_accuracy, g.pgd_epsilon,
                               g.pgd_steps, g.pgd_step_size, g.min_pgd_accuracy, g.min_corruption_accuracy,
                               g.max_corruption_drop, g.corruption_severities)
    validate_override(g.override, g.override_reason)
    splits = load_splits(dataset_dir)
    model, _ = load_classifier(model_dir)
    x, y = torch.from_numpy(splits.test_x).float(), torch.from_numpy(splits.test_y).long()

    clean = accuracy(model, x, y)
    noisy = accuracy(model, gaussian_noise(x, g.noise_sigma, torch.Generator().manual_seed(seed)), y)
    fgsm_acc = accuracy(model, fgsm(model, x, y, g.fgsm_epsilon), y)
    pgd_acc = accuracy(model, pgd(model, x, y, g.pgd_epsilon, g.pgd_steps, g.pgd_step_size, g.pgd_random_start, seed), y)
    table = corruption_table(model, x, y, clean, g.corruption_severities, seed)
    curve = attack_curve(model, x, y, g, seed, fgsm_acc, pgd_acc)
    corruption_mean = float(np.mean([row["accuracy"] for row in table]))
    corruption_drop = _relative_drop(clean, corruption_mean)

    limits = [
        Limit("min_noise_accuracy", "noise accuracy", noisy, g.min_noise_accuracy, "min", f"(sigma {g.noise_sigma})"),
        Limit("min_fgsm_accuracy", "FGSM accuracy", fgsm_acc, g.min_fgsm_accuracy, "min", f"(epsilon {g.fgsm_epsilon})"),
        Limit("min_pgd_accuracy", "PGD accuracy", pgd_acc, g.min_pgd_accuracy, "min",
              f"(epsilon {g.pgd_epsilon}, {g.pgd_steps} steps)"),
        Limit("min_corruption_accuracy", "mean corruption accuracy", corruption_mean, g.min_corruption_accuracy, "min",
              f"({len(CORRUPTION_LEVELS)} corruptions x severities 1-{g.corruption_severities})"),
        Limit("max_corruption_drop", "mean corruption relative drop", corruption_drop, g.max_corruption_drop, "max",
              f"(clean {clean:.3f} -> {corruption_mean:.3f})"),
    ]
    verdict = decide(limits, g.override, g.override_reason)
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
        "noise_sigma": float(g.noise_sigma),
        "fgsm_epsilon": float(g.fgsm_epsilon),
        "pgd_epsilon": float(g.pgd_epsilon),
        "pgd_steps": int(g.pgd_steps),
        "pgd_step_size": float(g.pgd_step_size or 2.5 * g.pgd_epsilon / g.pgd_steps),
        "pgd_random_start": bool(g.pgd_random_start),
        "corruption_severities": int(g.corruption_severities),
        "min_noise_accuracy": float(g.min_noise_accuracy),
        "min_fgsm_accuracy": float(g.min_fgsm_accuracy),
        "min_pgd_accuracy": float(g.min_pgd_accuracy),
        "min_corruption_accuracy": float(g.min_corruption_accuracy),
        "max_corruption_drop": float(g.max_corruption_drop),
        "n_test": int(len(y)),
        "seed": int(seed),
        "corruptions": table,
        "attack_curve": curve,
        **verdict,
    }


def robustness_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``robustness_check`` result for KFP Metrics (no tables, no text)."""
    skip = {"seed", "corruptions", "attack_curve", "reason", "blocked_by", "limits_checked", "override_reason"}
    numbers = {k: v for k, v in result.items() if k not in skip}
    return {**numbers, **verdict_metrics(result)}
