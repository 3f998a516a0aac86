"""Self-supervised objectives: SimCLR NT-Xent (negatives gathered across DDP ranks) and masked-patch
reconstruction, each a module that turns a batch of unlabeled images into a loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.core.models import Encoder, EncoderSpec
from components.train.augment import augment, finetune_policy, pretrain_policy, uniform
from components.train.runtime import Runtime, gather_with_grad

OBJECTIVES = ("contrastive", "masked")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view must pick its partner among the other 2N - 1 views.

    ``z1[i]`` and ``z2[i]`` are projections of two views of image ``i``.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent_loss needs two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))  # a view is not its own partner
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def random_patch_mask(batch: int, image_size: int, patch: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """A [B, 1, H, W] float mask, 1 on hidden pixels: ``ratio`` of the square patches per image."""
    per_side = math.ceil(image_size / patch)
    n_patches = per_side * per_side
    n_hidden = min(n_patches, max(1, round(ratio * n_patches)))
    order = uniform((batch, n_patches), g).argsort(dim=1)
    mask = torch.zeros(batch, n_patches, device=g.device)
    mask.scatter_(1, order[:, :n_hidden], 1.0)
    mask = mask.view(batch, 1, per_side, per_side)
    mask = mask.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)
    return mask[:, :, :image_size, :image_size]


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden pixels only (mask == 1); visible pixels cost nothing."""
    mask = mask.expand_as(pred)
    squared = (pred - target) ** 2 * mask
    return squared.sum() / mask.sum().clamp(min=1.0)


class ContrastiveObjective(nn.Module):
    """SimCLR: two augmented views per image, a projection head, NT-Xent on the projections."""

    def __init__(self, spec: EncoderSpec, temperature: float, projection_dim: int = 64):
        super().__init__()
        self.temperature = temperature
        self.policy = pretrain_policy(spec.in_channels)
        self.projector = nn.Sequential(
            nn.Linear(spec.embed_dim, spec.embed_dim), nn.GELU(), nn.Linear(spec.embed_dim, projection_dim),
        )

    def forward(self, encoder: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        views = torch.cat([augment(x, g, self.policy), augment(x, g, self.policy)])
        # One pass for both views: GroupNorm has no batch statistics, so nothing leaks between them.
        z1, z2 = self.projector(encoder(views)).float().chunk(2)  # the loss in fp32, also under bf16 autocast
        # Under DDP every rank scores its views against the views of all ranks (the global batch's
        # negatives), with gradients flowing back to the rank that made each view.
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.temperature)


class MaskedObjective(nn.Module):
    """Hide random patches, reconstruct every pixel from the embedding, score the hidden ones."""

    def __init__(self, spec: EncoderSpec, mask_ratio: float = 0.5, hidden: int = 256):
        super().__init__()
        self.spec = spec
        self.mask_ratio = mask_ratio
        self.patch = max(2, spec.image_size // 8)  # 2x2 patches on 8x8 digits, 4x4 on 32x32 photos
        self.policy = finetune_policy(spec.in_channels)
        pixels = spec.in_channels * spec.image_size * spec.image_size
        self.decoder = nn.Sequential(nn.Linear(spec.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, pixels), nn.Sigmoid())

    def forward(self, encoder: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = augment(x, g, self.policy)
        mask = random_patch_mask(x.shape[0], self.spec.image_size, self.patch, self.mask_ratio, g)
        pred = self.decoder(encoder(x * (1 - mask))).float().view_as(x)
        return masked_reconstruction_loss(pred, x, mask)


def build_objective(objective: str, spec: EncoderSpec, temperature: float) -> nn.Module:
    if objective == "contrastive":
        return ContrastiveObjective(spec, temperature)
    if objective == "masked":
        return MaskedObjective(spec)
    raise ValueError(f"unknown pretraining objective {objective!r}; choose one of {list(OBJECTIVES)}")


class PretrainModel(nn.Module):
    """The encoder plus the objective's extra head (projector or decoder); forward returns the loss."""

    def __init__(self, encoder: Encoder, objective: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        # What forward runs: the encoder, or a torch.compile'd view of it (not a registered
        # submodule, so the state_dict keys stay those of the plain encoder).
        object.__setattr__(self, "encoder_fn", encoder)

    def use_compiled(self, rt: Runtime) -> None:
        object.__setattr__(self, "encoder_fn", rt.maybe_compile(self.encoder))

    def forward(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.objective(self.encoder_fn, x, g)
