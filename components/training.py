"""Training loops shared by pretrain and finetune, in plain PyTorch.

Read it top to bottom:

1. devices and seeds;
2. augmentations (batched, plain torch, no torchvision);
3. self-supervised objectives: SimCLR NT-Xent and masked-patch reconstruction;
4. the learning-rate schedule and the explicit training state;
5. ``pretrain_encoder``: self-supervised pretraining of the encoder;
6. ``finetune_classifier``: supervised fine-tuning with early stopping.

Every loop keeps its whole state (model, optimizer, scheduler, epoch) in one
``TrainState`` so that checkpoint/resume can be added later without reshaping
the loops. Randomness goes through explicit ``torch.Generator`` objects seeded
from ``seed``, so the same seed gives the same weights on CPU.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.data import Splits
from components.models import Classifier, Encoder, EncoderSpec

OBJECTIVES = ("contrastive", "masked")
Log = Callable[[str], None]


# ---------------------------------------------------------------------------
# 1. Devices and seeds
# ---------------------------------------------------------------------------

def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA).

    On CPU the ops used here are deterministic, so the same seed gives the same
    weights. cuDNN autotuning is switched off so GPU runs stay repeatable too.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.benchmark = False


def _generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """One generator for batch order (CPU, data lives there) and one for augmentations (on the device)."""
    data_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    return data_gen, aug_gen


def _rand(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device)


# ---------------------------------------------------------------------------
# 2. Augmentations: batched, on tensors shaped [B, C, H, W] with pixels in [0, 1]
# ---------------------------------------------------------------------------

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


def pretrain_policy(channels: int) -> AugmentPolicy:
    """Strong views for contrastive learning. Flips only for RGB: a flipped digit is another digit."""
    return AugmentPolicy(
        max_rotate_deg=15.0, max_translate=0.12, min_scale=0.9, max_scale=1.25,
        noise_sigma=0.08, erase_prob=0.5, erase_max_side=0.5,
        hflip_prob=0.5 if channels == 3 else 0.0,
    )


def finetune_policy(channels: int) -> AugmentPolicy:
    """Light augmentation for supervised fine-tuning."""
    return AugmentPolicy(
        max_rotate_deg=8.0, max_translate=0.08, min_scale=0.95, max_scale=1.1,
        noise_sigma=0.02, erase_prob=0.1, erase_max_side=0.3,
        hflip_prob=0.5 if channels == 3 else 0.0,
    )


def random_affine(x: torch.Tensor, g: torch.Generator, max_rotate_deg: float, max_translate: float,
                  min_scale: float, max_scale: float) -> torch.Tensor:
    """Random rotation, translation and zoom (crop-resize) in one resampling."""
    b = x.shape[0]
    angle = (_rand((b,), g) * 2 - 1) * math.radians(max_rotate_deg)
    scale = min_scale + _rand((b,), g) * (max_scale - min_scale)
    # affine_grid works in [-1, 1] coordinates, so a shift of a fraction f of the side is 2 * f.
    shift = (_rand((b, 2), g) * 2 - 1) * 2 * max_translate
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # theta maps output coordinates to input coordinates: dividing by scale > 1 samples a smaller crop.
    theta = torch.stack([
        torch.stack([cos, -sin, shift[:, 0]], dim=1),
        torch.stack([sin, cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Digits have a black background, so zero padding is exact; photos look better reflected.
    padding = "zeros" if x.shape[1] == 1 else "reflection"
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def gaussian_noise(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype)
    return (x + sigma * noise).clamp(0.0, 1.0)


def random_erasing(x: torch.Tensor, g: torch.Generator, prob: float, max_side: float) -> torch.Tensor:
    """Blank one random rectangle (set to 0) in a random share ``prob`` of the images."""
    b, _, h, w = x.shape
    eh = (_rand((b,), g) * max_side * h).ceil().clamp(min=1)
    ew = (_rand((b,), g) * max_side * w).ceil().clamp(min=1)
    top = (_rand((b,), g) * (h - eh + 1)).floor()
    left = (_rand((b,), g) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1)))
    chosen = (_rand((b,), g) < prob).view(b, 1, 1)
    return x.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def random_hflip(x: torch.Tensor, g: torch.Generator, prob: float) -> torch.Tensor:
    flip = (_rand((x.shape[0],), g) < prob).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(dims=(3,)), x)


def augment(x: torch.Tensor, g: torch.Generator, policy: AugmentPolicy) -> torch.Tensor:
    """Apply a policy to a batch; keeps the shape and the [0, 1] pixel range."""
    if policy.hflip_prob > 0 and x.shape[1] == 1:
        raise ValueError("horizontal flips are not allowed for grayscale digits (a flipped digit is another digit)")
    if policy.max_rotate_deg or policy.max_translate or policy.min_scale != 1 or policy.max_scale != 1:
        x = random_affine(x, g, policy.max_rotate_deg, policy.max_translate, policy.min_scale, policy.max_scale)
    if policy.hflip_prob > 0:
        x = random_hflip(x, g, policy.hflip_prob)
    if policy.noise_sigma > 0:
        x = gaussian_noise(x, g, policy.noise_sigma)
    if policy.erase_prob > 0:
        x = random_erasing(x, g, policy.erase_prob, policy.erase_max_side)
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------
# 3. Self-supervised objectives
# ---------------------------------------------------------------------------

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
    order = _rand((batch, n_patches), g).argsort(dim=1)
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

    def forward(self, encoder: Encoder, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        views = torch.cat([augment(x, g, self.policy), augment(x, g, self.policy)])
        # One pass for both views: GroupNorm has no batch statistics, so nothing leaks between them.
        z1, z2 = self.projector(encoder(views)).chunk(2)
        return nt_xent_loss(z1, z2, self.temperature)


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

    def forward(self, encoder: Encoder, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = augment(x, g, self.policy)
        mask = random_patch_mask(x.shape[0], self.spec.image_size, self.patch, self.mask_ratio, g)
        pred = self.decoder(encoder(x * (1 - mask))).view_as(x)
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

    def forward(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.objective(self.encoder, x, g)


# ---------------------------------------------------------------------------
# 4. Schedule, state, batches
# ---------------------------------------------------------------------------

def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass
class TrainState:
    """Everything a loop changes; what a checkpoint would hold."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0  # epochs completed


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = epochs * steps_per_epoch
    warmup = max(1, min(steps_per_epoch, total // 10))  # about one epoch, at most a tenth of training
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))


def batch_indices(n: int, batch_size: int, g: torch.Generator | None, drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches over n items, shuffled when a generator is given."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # a short last batch gives the contrastive loss few negatives
    return batches


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _as_images(images: np.ndarray, what: str) -> torch.Tensor:
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{what} must be a non-empty array shaped [N, C, H, W], got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


# ---------------------------------------------------------------------------
# 5. Self-supervised pretraining
# ---------------------------------------------------------------------------

def pretrain_one_epoch(state: TrainState, images: torch.Tensor, batch_size: int,
                       data_gen: torch.Generator, aug_gen: torch.Generator, device: torch.device) -> float:
    """One pass over the unlabeled images; returns the mean loss."""
    state.model.train()
    total, seen = 0.0, 0
    for idx in batch_indices(len(images), batch_size, data_gen, drop_last=True):
        x = images[idx].to(device, non_blocking=True)
        loss = state.model(x, aug_gen)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    state.epoch += 1
    return total / seen


def pretrain_encoder(images: np.ndarray, spec: EncoderSpec, objective: str, epochs: int, batch_size: int,
                     learning_rate: float, temperature: float, seed: int,
                     log: Log = print) -> tuple[Encoder, list[dict]]:
    """Self-supervised pretraining of a fresh encoder on unlabeled images.

    Returns the encoder (on CPU, eval mode) and one history row per epoch
    (``epoch``, ``loss``, ``lr``, ``seconds``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {objective!r}; choose one of {list(OBJECTIVES)}")
    _check_positive(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, temperature=temperature)
    data = _as_images(images, "pretraining images")
    if data.shape[1:] != (spec.in_channels, spec.image_size, spec.image_size):
        raise ValueError(f"images shaped {tuple(data.shape[1:])} do not fit the encoder spec "
                         f"({spec.in_channels}, {spec.image_size}, {spec.image_size})")

    seed_everything(seed)
    device = pick_device()
    data_gen, aug_gen = _generators(seed, device)
    model = PretrainModel(Encoder(spec), build_objective(objective, spec, temperature)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = len(batch_indices(len(data), batch_size, None, drop_last=True))
    state = TrainState(model, optimizer, make_scheduler(optimizer, epochs, steps_per_epoch))

    log(f"pretrain: {objective} on {len(data)} images {tuple(data.shape[1:])}, {epochs} epochs, "
        f"batch {batch_size}, lr {learning_rate}, device {device}")
    history = []
    while state.epoch < epochs:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        loss = pretrain_one_epoch(state, data, batch_size, data_gen, aug_gen, device)
        seconds = time.perf_counter() - t0
        history.append({"epoch": state.epoch, "loss": loss, "lr": lr, "seconds": seconds})
        log(f"pretrain epoch {state.epoch}/{epochs} loss {loss:.4f} ({seconds:.1f}s)")
        if not math.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss} at epoch {state.epoch}; lower the learning rate")
    return model.encoder.cpu().eval(), history


# ---------------------------------------------------------------------------
# 6. Supervised fine-tuning
# ---------------------------------------------------------------------------

def subsample_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the labels, at least one per class present."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep))


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of a classifier for a batch of images, on CPU, without augmentation."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = images if isinstance(images, torch.Tensor) else _as_images(images, "images")
    was_training = model.training
    model.eval()
    out = [model(x[idx].to(device)).float().cpu() for idx in batch_indices(len(x), batch_size, None)]
    model.train(was_training)
    return torch.cat(out)


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a labeled split."""
    logits = predict_logits(model, x, device=device)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def finetune_one_epoch(state: TrainState, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                       data_gen: torch.Generator, aug_gen: torch.Generator, policy: AugmentPolicy,
                       device: torch.device) -> float:
    """One pass over the labeled train images; returns the mean training loss."""
    state.model.train()
    total, seen = 0.0, 0
    for idx in batch_indices(len(x), batch_size, data_gen):
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        loss = F.cross_entropy(state.model(augment(xb, aug_gen, policy)), yb)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    state.epoch += 1
    return total / seen


def finetune_classifier(encoder: Encoder, splits: Splits, epochs: int, batch_size: int, learning_rate: float,
                        patience: int, label_fraction: float, seed: int,
                        log: Log = print) -> tuple[Classifier, list[dict]]:
    """Fine-tune encoder + a new linear head on the labeled train split.

    The pretrained encoder moves ten times slower than the fresh head. Early
    stopping watches the validation loss and the best weights are restored.
    Returns the classifier (on CPU, eval mode) and one history row per epoch
    (``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``, ``lr``,
    ``seconds``, ``n_train``).
    """
    _check_positive(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=patience)
    spec = encoder.spec
    if splits.image_shape != (spec.in_channels, spec.image_size, spec.image_size):
        raise ValueError(f"dataset images shaped {splits.image_shape} do not fit the encoder "
                         f"({spec.in_channels}, {spec.image_size}, {spec.image_size}); pretrain on this dataset first")
    if len(splits.val_x) == 0:
        raise ValueError("the validation split is empty; early stopping needs it (raise the val fraction)")
    keep = subsample_labels(splits.train_y, label_fraction, seed)
    x, y = _as_images(splits.train_x[keep], "train images"), torch.from_numpy(splits.train_y[keep].astype(np.int64))
    val_x, val_y = _as_images(splits.val_x, "val images"), torch.from_numpy(splits.val_y.astype(np.int64))

    seed_everything(seed)
    device = pick_device()
    data_gen, aug_gen = _generators(seed, device)
    model = Classifier(spec, num_classes=len(splits.class_names))
    model.encoder.load_state_dict(encoder.state_dict())
    model.to(device)
    optimizer = torch.optim.AdamW([
        {"params": model.encoder.parameters(), "lr": learning_rate / 10},  # keep what pretraining learned
        {"params": model.head.parameters(), "lr": learning_rate},
    ], weight_decay=1e-4)
    state = TrainState(model, optimizer, make_scheduler(optimizer, epochs, len(batch_indices(len(x), batch_size, None))))
    policy = finetune_policy(spec.in_channels)

    log(f"finetune: {len(x)} labeled images ({label_fraction:.0%} of train), {len(val_x)} val, "
        f"up to {epochs} epochs, patience {patience}, device {device}")
    history: list[dict] = []
    best_loss, best_weights, since_best = math.inf, None, 0
    while state.epoch < epochs:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[1]["lr"]
        train_loss = finetune_one_epoch(state, x, y, batch_size, data_gen, aug_gen, policy, device)
        val_loss, val_acc = validate(model, val_x, val_y, device)
        seconds = time.perf_counter() - t0
        history.append({"epoch": state.epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_accuracy": val_acc, "lr": lr, "seconds": seconds, "n_train": len(x)})
        improved = val_loss < best_loss
        if improved:
            best_loss, since_best = val_loss, 0
            best_weights = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
        log(f"finetune epoch {state.epoch}/{epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f}{' *' if improved else ''} ({seconds:.1f}s)")
        if since_best >= patience:
            log(f"early stop: no better val loss for {patience} epochs; best epoch {state.epoch - since_best}")
            break
    model.load_state_dict(best_weights)
    return model.cpu().eval(), history


def best_epoch(history: list[dict]) -> dict:
    """The history row whose weights finetune_classifier kept (the first lowest val loss)."""
    return min(history, key=lambda row: row["val_loss"])
