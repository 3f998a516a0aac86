"""Differentially private fine-tuning: DP-SGD with Opacus, plugged into the fine-tune loop.

DP-SGD (Abadi et al. 2016) bounds what the trained weights can reveal about any
one training image: every example's gradient is clipped to ``max_grad_norm``,
Gaussian noise of ``noise_multiplier * max_grad_norm`` is added to the sum of each
batch, and batches are drawn by Poisson sampling (each image joins a step
independently with probability ``batch_size / n``), which is what the privacy
accountant assumes. The noise multiplier is solved for so that training for the
configured epochs spends at most the target (ε, δ); the accountant (Rényi DP by
default, PRV on request) then reports the ε actually spent, which goes into the
model's ``metadata.json`` (``dp``) and the step's metrics, and the privacy gate
checks it against ``gates.max_dp_epsilon``.

What trains under DP is a recipe choice (``trainable``), because noise grows with
the number of noised parameters and digits has few training images:

* ``normalization`` (default): the GroupNorm scales/shifts of the whole encoder, its
  projection and the head — few parameters, yet every layer can adapt
  (``benchmarks/dp_overhead.py`` compares the choices on digits);
* ``projection``: the projection and the head; ``head``: a linear probe; ``all``: every weight.

Before DP training starts, the embedding is standardised (``standardize``): the mean
and standard deviation of each embedding coordinate over *reference images* — the
validation split, never the train split — are folded into the projection layer, so
the head starts on zero-mean, unit-variance features (Tramer & Boneh 2021: DP
learning needs well-conditioned features). The model keeps its architecture, and
since no train image is touched this costs no privacy of the train split, like model
selection on the validation split. It lifts the test accuracy of a DP linear probe
(``head``) clearly and that of the default recipe a little.

This module does not fork the training loop: ``DPFinetune`` is a ``customize``
hook for ``components.train.loops.finetune_classifier`` that swaps in the per-sample
gradient model (``GradSampleModule``), the noisy optimizer (``DPOptimizer``), the
Poisson batches and a fresh schedule. Validation-based model selection (early
stopping on the validation split) is post-processing with respect to the train
split and costs no privacy of it.

Scope of the guarantee: the (ε, δ) covers the labeled train images used in
fine-tuning. The encoder comes from the pretrain step, which (by default) saw the
train images without labels and without DP; for an end-to-end guarantee pretrain
on public data only. Opacus runs with ``secure_mode=False`` (a seeded PRNG for the
noise, so runs are reproducible); production use should switch to a CSPRNG.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

DP_TRAINABLE = ("normalization", "projection", "head", "all")
ACCOUNTANTS = ("prv", "rdp")
MIN_DP_BATCH = 16  # an empty Poisson batch then has probability about exp(-16) = 1e-7 per step


@dataclass(frozen=True)
class DPSettings:
    """What DP-SGD fine-tuning needs; see the module docstring."""

    target_epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    batch_size: int = 256  # expected (Poisson) batch size
    learning_rate: float = 0.25  # SGD with momentum 0.9
    trainable: str = "normalization"
    epochs: int = 30  # the noise is calibrated for this many epochs
    accountant: str = "rdp"  # Renyi DP (Mironov 2017): fast; "prv" (Gopi et al. 2021) is tighter but slower
    augment: bool = False  # the fine-tune augmentation policy inside DP training (per-example, so allowed)
    standardize: bool = True  # standardise the embedding with the reference (validation) images' statistics


def validate_dp_settings(settings: DPSettings, n_train: int) -> None:
    """Raise ValueError naming every setting that is wrong and what to use instead."""
    s, problems = settings, []

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if not number(s.target_epsilon) or s.target_epsilon <= 0:
        problems.append(f"dp_epsilon must be > 0 (the privacy budget; 1-10 is usual), got {s.target_epsilon!r}")
    if not number(s.delta) or not 0 < s.delta < 1:
        problems.append(f"dp_delta must be in (0, 1), got {s.delta!r}")
    elif n_train > 0 and s.delta >= 1.0 / n_train:
        problems.append(f"dp_delta {s.delta:g} must be below 1/n = {1.0 / n_train:.2e} for {n_train} training images "
                        f"(a larger delta allows leaking whole records); use e.g. {10 ** math.floor(math.log10(0.1 / n_train)):g}")
    if not number(s.max_grad_norm) or s.max_grad_norm <= 0:
        problems.append(f"dp_max_grad_norm must be > 0 (per-example gradient clipping norm), got {s.max_grad_norm!r}")
    if isinstance(s.batch_size, bool) or not isinstance(s.batch_size, int) or s.batch_size < MIN_DP_BATCH:
        problems.append(f"dp_batch_size must be a whole number >= {MIN_DP_BATCH} (DP-SGD needs large batches), "
                        f"got {s.batch_size!r}")
    if not number(s.learning_rate) or s.learning_rate <= 0:
        problems.append(f"dp_learning_rate must be > 0, got {s.learning_rate!r}")
    if s.trainable not in DP_TRAINABLE:
        problems.append(f"dp_trainable must be one of {list(DP_TRAINABLE)}, got {s.trainable!r}")
    if s.accountant not in ACCOUNTANTS:
        problems.append(f"the DP accountant must be one of {list(ACCOUNTANTS)}, got {s.accountant!r}")
    if isinstance(s.epochs, bool) or not isinstance(s.epochs, int) or s.epochs < 1:
        problems.append(f"dp_epochs must be a whole number >= 1, got {s.epochs!r}")
    if problems:
        raise ValueError("invalid DP-SGD settings: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Model surgery: layers Opacus can train, parameters that train
# ---------------------------------------------------------------------------

def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model`` with every layer DP-SGD cannot train replaced (Opacus' ``ModuleValidator.fix``).

    BatchNorm mixes examples within a batch, so a per-example gradient does not exist;
    ``fix`` swaps it for GroupNorm. Returns the (possibly new) model and the problems that
    were fixed (empty for the project's encoders, which use GroupNorm throughout).
    """
    from opacus.validators import ModuleValidator

    problems = [str(e).split(".")[0] for e in ModuleValidator.validate(model, strict=False)]
    if not problems:
        return model, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = ModuleValidator.fix(model)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ValueError(f"the model has layers DP-SGD cannot train even after Opacus' fix: {remaining}")
    return fixed, problems


def set_dp_trainable(model: nn.Module, trainable: str) -> list[nn.Parameter]:
    """Freeze everything but what ``trainable`` names (see the module docstring); return what trains."""
    if trainable not in DP_TRAINABLE:
        raise ValueError(f"dp_trainable must be one of {list(DP_TRAINABLE)}, got {trainable!r}")
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable != "all":
        chosen: list[nn.Module] = [model.head]
        if trainable in ("projection", "normalization"):
            chosen.append(model.encoder.project)
        if trainable == "normalization":
            chosen += [m for m in model.encoder.modules() if isinstance(m, nn.GroupNorm) and m.affine]
        for module in chosen:
            for p in module.parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def standardize_embedding(model: nn.Module, images: Any, eps: float = 1e-6) -> dict[str, float]:
    """Fold ``(z - mean) / std`` of the embeddings of ``images`` into ``model.encoder.project``.

    Afterwards the embeddings of ``images`` have zero mean and unit standard deviation per
    coordinate; the architecture is unchanged (a plain ``Linear`` with new weights). Pass
    images outside the DP guarantee (the validation split): the statistics then cost no
    privacy of the train split. Returns a summary of what was folded in.
    """
    if images is None or len(images) < 2:
        raise ValueError("standardising the embedding needs at least 2 reference images (the validation split)")
    project = model.encoder.project
    device = project.weight.device
    was_training = model.training
    model.eval()
    x = torch.as_tensor(images, dtype=torch.float32)
    z = torch.cat([model.encoder(x[i:i + 512].to(device)) for i in range(0, len(x), 512)]).double()
    mean, std = z.mean(0), z.std(0).clamp_min(eps)
    project.weight.copy_((project.weight.double() / std[:, None]).to(project.weight.dtype))
    project.bias.copy_(((project.bias.double() - mean) / std).to(project.bias.dtype))
    model.train(was_training)
    return {"reference_images": int(len(x)), "mean_abs_shift": float(mean.abs().mean()),
            "mean_std": float(std.mean())}


# ---------------------------------------------------------------------------
# Sampling and accounting
# ---------------------------------------------------------------------------

def sample_rate_and_steps(n_train: int, batch_size: int) -> tuple[float, int]:
    """Poisson sampling rate ``q = batch_size / n`` (at most 1) and the steps that make one epoch (``1/q``)."""
    q = min(1.0, batch_size / n_train)
    return q, max(1, int(1 / q))


def poisson_batches(n: int, sample_rate: float, steps: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """One epoch of Poisson batches: each index joins each step with probability ``sample_rate``.

    A pure function of (seed, epoch), so a resumed run draws the same batches. Batch sizes vary
    (that is the point: the accountant's amplification by sampling assumes it). An empty draw —
    probability about exp(-batch_size), negligible with ``MIN_DP_BATCH`` — is skipped.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = [torch.nonzero(torch.rand(n, generator=g) < sample_rate).flatten() for _ in range(steps)]
    return [b for b in batches if len(b) > 0]


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier for which ``steps`` steps at ``sample_rate`` spend at most (ε, δ)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PRV warns about its own numerical precision at tiny budgets
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant, epsilon_tolerance=0.01))


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε spent by ``steps`` DP-SGD steps at this noise and sampling rate (0 when no step was taken)."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


# ---------------------------------------------------------------------------
# The customize hook for finetune_classifier
# ---------------------------------------------------------------------------

class DPFinetune:
    """Turns ``finetune_classifier`` into DP-SGD; call ``report(epochs_run)`` afterwards.

    Use: ``dp = DPFinetune(settings, n_train, seed)``, then
    ``finetune_classifier(..., epochs=settings.epochs, customize=dp)``, then ``dp.report(len(history))``.
    ``n_train`` is the number of labeled images fine-tuning uses (after ``label_fraction``).
    ``then`` is an optional second customize hook applied after this one (e.g. robust training).
    ``reference_images``: the images whose embedding statistics ``settings.standardize``
    folds into the projection — the validation split, never the train split. Without
    them the embedding stays as it is (logged; the report says ``standardized_embedding: false``).
    """

    def __init__(self, settings: DPSettings, n_train: int, seed: int,
                 log: Callable[[str], None] = print, then: Callable | None = None,
                 reference_images: Any = None):
        validate_dp_settings(settings, n_train)
        if settings.standardize and reference_images is not None and len(reference_images) < 2:
            raise ValueError(f"standardising the embedding needs at least 2 reference images (the validation "
                             f"split), got {len(reference_images)}")
        self.settings, self.n_train, self.seed, self.log, self.then = settings, n_train, seed, log, then
        self.reference_images = reference_images
        self.standardized: dict[str, float] | None = None
        self.epochs = settings.epochs
        self.sample_rate, self.steps_per_epoch = sample_rate_and_steps(n_train, settings.batch_size)
        self.noise_multiplier = noise_multiplier_for(settings.target_epsilon, settings.delta, self.sample_rate,
                                                     self.epochs * self.steps_per_epoch, settings.accountant)
        self.replaced_layers: list[str] = []
        self.n_trainable = 0

    def __call__(self, parts):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from components.train.augment import NO_AUGMENTATION
        from components.train.loops import make_scheduler

        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("DP-SGD fine-tuning runs in one process; run it without torchrun (WORLD_SIZE=1)")
        s = self.settings
        # Frozen first layers mean no input needs a gradient; Opacus' hooks then warn on every step. Harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        model, self.replaced_layers = make_dp_compatible(parts.model)
        if self.replaced_layers:
            self.log(f"finetune (DP): replaced layers DP-SGD cannot train: {self.replaced_layers}")
        if s.standardize and self.reference_images is not None:  # validation statistics: no train image touched
            self.standardized = standardize_embedding(model, self.reference_images)
        elif s.standardize:
            self.log("finetune (DP): no reference images given: the embedding is not standardised")
        params = set_dp_trainable(model, s.trainable)
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.SGD(params, lr=s.learning_rate, momentum=0.9)
        scheduler = make_scheduler(optimizer, self.epochs, self.steps_per_epoch)
        device = next(model.parameters()).device
        noise_gen = torch.Generator(device=device).manual_seed(self.seed + 7)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=s.max_grad_norm,
                                   expected_batch_size=s.batch_size, loss_reduction="mean", generator=noise_gen)
        if hasattr(parts, "encoder_params"):  # no linear-probe warm-up phase: DP decides what trains, throughout
            parts.encoder_params, parts.probe_epochs = [], 0
        parts.model = model  # the plain classifier: what is checkpointed, selected and saved
        parts.forward = GradSampleModule(model)  # hooks on model's own modules: per-example gradients
        parts.optimizer = dp_optimizer
        parts.scheduler = scheduler
        parts.batches = lambda epoch: poisson_batches(self.n_train, self.sample_rate, self.steps_per_epoch,
                                                      self.seed, epoch)
        if not s.augment:
            parts.policy = NO_AUGMENTATION
        self.log(f"finetune (DP-SGD): target epsilon {s.target_epsilon} delta {s.delta:g}, noise multiplier "
                 f"{self.noise_multiplier:.3f}, clip {s.max_grad_norm}, Poisson rate {self.sample_rate:.3f} "
                 f"(expected batch {s.batch_size}) x {self.steps_per_epoch} steps/epoch, trains {s.trainable} "
                 f"({self.n_trainable} parameters)"
                 + (f", embedding standardised with {self.standardized['reference_images']} validation images"
                    if self.standardized else ""))
        return self.then(parts) if self.then is not None else parts

    def report(self, epochs_run: int) -> dict[str, Any]:
        """The privacy spent after ``epochs_run`` epochs, for the model metadata and metrics."""
        steps = epochs_run * self.steps_per_epoch  # empty (skipped) draws still count: conservative
        s = self.settings
        return {
            "epsilon": spent_epsilon(self.noise_multiplier, self.sample_rate, steps, s.delta, s.accountant),
            "target_epsilon": s.target_epsilon,
            "delta": s.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": s.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": s.batch_size,
            "steps": steps,
            "epochs_run": epochs_run,
            "n_train": self.n_train,
            "trainable": s.trainable,
            "n_trainable_parameters": self.n_trainable,
            "learning_rate": s.learning_rate,
            "accountant": s.accountant,
            "poisson_sampling": True,
            "augment": s.augment,
            "standardized_embedding": self.standardized is not None,  # with validation-split statistics
            "replaced_layers": self.replaced_layers,
            "secure_mode": False,
            "scope": "fine-tuning on the labeled train images; the pretrained encoder is outside the guarantee",
        }
