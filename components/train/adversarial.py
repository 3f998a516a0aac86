"""Adversarial examples and robust training: FGSM and PGD attacks, and the batch perturbations of
fine-tuning that make a model withstand them (noise and FGSM examples).

The robustness step measures the attacks; the finetune step trains with ``RobustTraining``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _input_gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)  # w.r.t. the input only: parameters and their .grad stay untouched
    return grad.sign()



def fgsm(model: nn.Module, x: Any, y: Any, epsilon: float, batch_size: int = 512) -> torch.Tensor:
    """Fast gradient sign method: ``x + epsilon * sign(grad_x cross_entropy)``, clipped to [0, 1].

    The model is run in eval mode (so normalisation and dropout behave as at serving time) and
    restored to its previous mode afterwards; gradients are taken with respect to the input only,
    so the model's parameters and their ``.grad`` are left untouched.
    """
    if not 0 <= epsilon <= 1:
        raise ValueError(f"FGSM epsilon must be in [0, 1] (pixels are in [0, 1]), got {epsilon}")
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    device, was_training = model_device(model), model.training
    model.eval()
    adversarial = []
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            adversarial.append((xb + epsilon * _input_gradient_sign(model, xb, yb)).clamp(0.0, 1.0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(adversarial) if adversarial else x.clone()



def pgd(model: nn.Module, x: Any, y: Any, epsilon: float, steps: int = 10, step_size: float = 0.0,
        random_start: bool = True, seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball of radius ``epsilon`` (Madry et al. 2018).

    Starts from a uniform random point in the ball (``random_start``) or from ``x``, takes
    ``steps`` signed-gradient steps of ``step_size`` (0 = ``2.5 * epsilon / steps``, Madry's
    choice, enough to reach the ball's edge from anywhere), and projects back onto the ball and
    onto [0, 1] after each. Eval mode and untouched parameters, as ``fgsm``.
    """
    if not 0 <= epsilon <= 1:
        raise ValueError(f"PGD epsilon must be in [0, 1] (pixels are in [0, 1]), got {epsilon}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"PGD steps must be a whole number >= 1, got {steps!r}")
    if not step_size >= 0:
        raise ValueError(f"PGD step size must be >= 0 (0 = 2.5 * epsilon / steps), got {step_size}")
    step_size = step_size or 2.5 * epsilon / steps
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    device, was_training = model_device(model), model.training
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    adversarial = []
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            start = torch.zeros_like(xb, device="cpu")
            if random_start:
                start = torch.rand(xb.shape, generator=generator) * 2 * epsilon - epsilon
            xa = (xb + start.to(device)).clamp(0.0, 1.0)
            for _ in range(steps):
                xa = xa + step_size * _input_gradient_sign(model, xa, yb)
                xa = torch.min(torch.max(xa, xb - epsilon), xb + epsilon).clamp(0.0, 1.0)
            adversarial.append(xa.detach().cpu())
    finally:
        model.train(was_training)
    return torch.cat(adversarial) if adversarial else x.clone()



@dataclass(frozen=True)
class RobustTraining:
    """Extra perturbations of fine-tuning batches, applied after the usual augmentation.

    * ``noise_sigma`` > 0: every image gets Gaussian noise with its own sigma drawn from
      U(0, noise_sigma), so the model sees clean-ish and very noisy images alike;
    * ``adversarial_epsilon`` > 0: a share ``adversarial_fraction`` of each batch is replaced
      by FGSM examples with a random start ("fast adversarial training", Wong et al. 2020),
      made against the current weights.
    """

    noise_sigma: float = 0.0
    adversarial_epsilon: float = 0.0
    adversarial_fraction: float = 0.5

    def __post_init__(self):
        validate_robust_training(self.noise_sigma, self.adversarial_epsilon, self.adversarial_fraction)

    @property
    def active(self) -> bool:
        return self.noise_sigma > 0 or (self.adversarial_epsilon > 0 and self.adversarial_fraction > 0)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Perturb a batch ``x`` (on the generator's device) for the current ``model``."""
        if self.noise_sigma > 0:
            sigma = torch.rand((len(x), 1, 1, 1), generator=g, device=g.device) * self.noise_sigma
            noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
            x = (x + sigma.to(x.device) * noise.to(x.device)).clamp(0.0, 1.0)
        if self.adversarial_epsilon > 0 and self.adversarial_fraction > 0:
            chosen = (torch.rand((len(x),), generator=g, device=g.device) < self.adversarial_fraction).to(x.device)
            if chosen.any():
                eps = self.adversarial_epsilon
                start = (torch.rand(x.shape, generator=g, device=g.device) * 2 - 1).to(x.device) * eps
                xs = (x[chosen] + start[chosen]).clamp(0.0, 1.0)
                was_training = model.training
                # Under DP-SGD the model is Opacus' GradSampleModule: this backward must not leave
                # per-example gradients behind, so its hooks are off while the attack runs.
                hooks = getattr(model, "disable_hooks", None) and getattr(model, "hooks_enabled", False)
                if hooks:
                    model.disable_hooks()
                model.eval()
                try:
                    step = _input_gradient_sign(model, xs, y[chosen])
                finally:
                    model.train(was_training)
                    if hooks:
                        model.enable_hooks()
                xa = xs + 1.25 * eps * step  # Wong et al.: step 1.25 eps from the random start, then project
                xa = torch.min(torch.max(xa, x[chosen] - eps), x[chosen] + eps).clamp(0.0, 1.0)
                x = x.clone()
                x[chosen] = xa.detach()
        return x

    def batch_transform(self, forward: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``FinetuneParts.batch_transform`` signature of the fine-tune loop."""
        return self(forward, x, y, g), y

    def customize(self, parts):
        """A ``customize`` hook for ``components.train.loops.finetune_classifier``."""
        parts.batch_transform = self.batch_transform
        return parts



def validate_robust_training(noise_sigma: float, adversarial_epsilon: float, adversarial_fraction: float) -> None:
    checks = (("augment_noise_sigma", noise_sigma, 0.0, 1.0), ("adversarial_epsilon", adversarial_epsilon, 0.0, 1.0),
              ("adversarial_fraction", adversarial_fraction, 0.0, 1.0))
    for name, value, low, high in checks:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{name} must be a number in [{low:g}, {high:g}] (pixels are in [0, 1]), got {value!r}")



def robust_training(noise_sigma: float = 0.0, adversarial_epsilon: float = 0.0,
                    adversarial_fraction: float = 0.5) -> "RobustTraining | None":
    """The batch perturbation for fine-tuning, or None when both are off (plain training)."""
    policy = RobustTraining(noise_sigma, adversarial_epsilon, adversarial_fraction)
    return policy if policy.active else None
