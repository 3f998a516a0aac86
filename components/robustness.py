"""Robustness check: does the model still work when its inputs are a little off?

Two perturbations of the test images, both kept inside the valid pixel range [0, 1]:

* **Gaussian noise** (sensor noise, bad scans): add N(0, sigma^2) to every pixel;
* **FGSM** (Goodfellow et al. 2015): the worst case of an L-infinity budget of
  ``epsilon`` for a first-order attacker — one step of size epsilon in the
  sign of the loss gradient with respect to the input.

The gate blocks the release when accuracy under either perturbation falls
below its limit.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as real types.
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output
from torch import nn


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model: nn.Module, x: Any, y: Any, batch_size: int = 512) -> float:
    """Share of images ``x`` ``[N, C, H, W]`` that ``model`` labels as ``y``, computed in batches."""
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined: the split has no images")
    device, correct = _device(model), 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == y[i : i + batch_size]).sum())
    return correct / len(x)


def gaussian_noise(x: Any, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` plus N(0, sigma^2) pixel noise, clipped back to [0, 1]. ``generator`` makes it reproducible."""
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    x = _as_tensor(x, torch.float32)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + sigma * noise).clamp(0.0, 1.0)


def fgsm(model: nn.Module, x: Any, y: Any, epsilon: float, batch_size: int = 512) -> torch.Tensor:
    """Fast gradient sign method: ``x + epsilon * sign(grad_x cross_entropy)``, clipped to [0, 1].

    The model is run in eval mode (so normalisation and dropout behave as at serving time) and
    restored to its previous mode afterwards; gradients are taken with respect to the input only,
    so the model's parameters and their ``.grad`` are left untouched.
    """
    if not 0 <= epsilon <= 1:
        raise ValueError(f"FGSM epsilon must be in [0, 1] (pixels are in [0, 1]), got {epsilon}")
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    device, was_training = _device(model), model.training
    model.eval()
    adversarial = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device).requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[i : i + batch_size].to(device))
            (grad,) = torch.autograd.grad(loss, xb)
            adversarial.append((xb.detach() + epsilon * grad.sign()).clamp(0.0, 1.0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(adversarial) if adversarial else x.clone()


def validate_robustness_limits(noise_sigma: float, fgsm_epsilon: float, min_noise_accuracy: float, min_fgsm_accuracy: float) -> None:
    def number(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    if number("noise_sigma", noise_sigma) < 0:
        raise ValueError(f"noise_sigma must be >= 0 (standard deviation of pixel noise, pixels in [0, 1]), got {noise_sigma}")
    if not 0 <= number("fgsm_epsilon", fgsm_epsilon) <= 1:
        raise ValueError(f"fgsm_epsilon must be in [0, 1] (L-infinity pixel budget, pixels in [0, 1]), got {fgsm_epsilon}")
    for name, value in (("min_noise_accuracy", min_noise_accuracy), ("min_fgsm_accuracy", min_fgsm_accuracy)):
        if not 0 <= number(name, value) <= 1:
            raise ValueError(f"{name} must be an accuracy in [0, 1], got {value}")


def _relative_drop(clean: float, perturbed: float) -> float:
    return (clean - perturbed) / clean if clean > 0 else 0.0


def robustness_check(
    dataset_dir: str,
    model_dir: str,
    noise_sigma: float,
    fgsm_epsilon: float,
    min_noise_accuracy: float,
    min_fgsm_accuracy: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of the model at ``model_dir`` on the clean, noisy and FGSM-perturbed test split.

    Returns the accuracies, their relative drops from clean, the limits, ``passed`` and ``reason``
    (every limit that blocked, with the numbers).
    """
    from components.data import load_splits
    from components.models import load_classifier

    validate_robustness_limits(noise_sigma, fgsm_epsilon, min_noise_accuracy, min_fgsm_accuracy)
    splits = load_splits(dataset_dir)
    model, _ = load_classifier(model_dir)
    x, y = torch.from_numpy(splits.test_x).float(), torch.from_numpy(splits.test_y).long()

    clean = accuracy(model, x, y)
    noisy = accuracy(model, gaussian_noise(x, noise_sigma, torch.Generator().manual_seed(seed)), y)
    adversarial = accuracy(model, fgsm(model, x, y, fgsm_epsilon), y)

    failures = []
    if noisy < min_noise_accuracy:
        failures.append(f"noise accuracy {noisy:.3f} < min {min_noise_accuracy:.3f} (sigma {noise_sigma})")
    if adversarial < min_fgsm_accuracy:
        failures.append(f"FGSM accuracy {adversarial:.3f} < min {min_fgsm_accuracy:.3f} (epsilon {fgsm_epsilon})")
    reason = "; ".join(failures) or (
        f"noise accuracy {noisy:.3f} >= min {min_noise_accuracy:.3f} and FGSM accuracy {adversarial:.3f} >= min {min_fgsm_accuracy:.3f}"
    )
    return {
        "clean_accuracy": clean,
        "noise_accuracy": noisy,
        "fgsm_accuracy": adversarial,
        "noise_relative_drop": _relative_drop(clean, noisy),
        "fgsm_relative_drop": _relative_drop(clean, adversarial),
        "noise_sigma": float(noise_sigma),
        "fgsm_epsilon": float(fgsm_epsilon),
        "min_noise_accuracy": float(min_noise_accuracy),
        "min_fgsm_accuracy": float(min_fgsm_accuracy),
        "n_test": int(len(y)),
        "seed": int(seed),
        "passed": not failures,
        "reason": reason,
    }


def render_robustness_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``robustness_check`` result for the KFP UI."""
    r = result
    verdict = "PASSED" if r["passed"] else "FAILED"

    def row(name: str, acc: float, drop: float | None, limit: float | None) -> str:
        ok = "" if limit is None else (" ✅" if acc >= limit else " ❌")
        return (
            f"| {name} | {acc:.3f} | {'—' if drop is None else f'{100 * drop:.1f}%'} | "
            f"{'—' if limit is None else f'{limit:.3f}'}{ok} |"
        )

    return f"""# Robustness check — {verdict}

**{r['reason']}**

Accuracy on the {r['n_test']} test images, clean and perturbed (pixels stay in [0, 1]):

| input | accuracy | relative drop | min allowed |
|---|---|---|---|
{row('clean', r['clean_accuracy'], None, None)}
{row(f"Gaussian noise (sigma {r['noise_sigma']})", r['noise_accuracy'], r['noise_relative_drop'], r['min_noise_accuracy'])}
{row(f"FGSM (L∞ epsilon {r['fgsm_epsilon']})", r['fgsm_accuracy'], r['fgsm_relative_drop'], r['min_fgsm_accuracy'])}

* **Gaussian noise** models sensor/scan noise: random, so a good model barely notices small sigma.
* **FGSM** is a worst-case first-order attack within the epsilon budget: one step along the sign of the
  loss gradient. It is a *lower bound* on the damage a real adversary can do (iterative attacks such as
  PGD do more), so passing it is necessary, not sufficient, for adversarial robustness.
"""


def robustness_component(
    dataset: Input[Dataset],
    model: Input[Model],
    noise_sigma: float,
    fgsm_epsilon: float,
    min_noise_accuracy: float,
    min_fgsm_accuracy: float,
    seed: int,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> bool:
    """Robustness gate: test accuracy under Gaussian pixel noise and under an FGSM attack.

    Args:
        dataset: the dataset artifact from ingest (the test split is used).
        model: the classifier artifact from finetune.
        noise_sigma: standard deviation of the Gaussian pixel noise (pixels are in [0, 1]).
        fgsm_epsilon: L-infinity size of the FGSM adversarial perturbation.
        min_noise_accuracy: the lowest accuracy under Gaussian noise that may be released.
        min_fgsm_accuracy: the lowest accuracy under FGSM that may be released.
        seed: seed of the Gaussian noise.
        metrics: clean/noise/FGSM accuracies, relative drops, the decision and the step's cost.
        report: Markdown table of the accuracies and the verdict.

    Returns:
        True when both perturbed accuracies are at or above their limits.
    """
    import os

    from components.cost import log_metrics, measure
    from components.robustness import render_robustness_report, robustness_check

    print(f"robustness: noise sigma {noise_sigma}, FGSM epsilon {fgsm_epsilon} on {model.path}", flush=True)
    with measure() as cost:
        result = robustness_check(
            dataset.path, model.path,
            noise_sigma=noise_sigma, fgsm_epsilon=fgsm_epsilon,
            min_noise_accuracy=min_noise_accuracy, min_fgsm_accuracy=min_fgsm_accuracy, seed=seed,
        )
    log_metrics(metrics, {k: v for k, v in result.items() if k != "seed"})
    log_metrics(metrics, cost.as_metrics())
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    with open(report.path, "w") as f:
        f.write(render_robustness_report(result))
    print(f"robustness: {'PASSED' if result['passed'] else 'FAILED'}: {result['reason']}", flush=True)
    return bool(result["passed"])
