"""Training loops shared by pretrain and finetune, in plain PyTorch.

Read it top to bottom:

1. the runtime: device, bf16 autocast on CUDA, optional ``torch.compile``, DDP
   under ``torchrun``; seeds;
2. augmentations (batched, plain torch, no torchvision);
3. self-supervised objectives: SimCLR NT-Xent (negatives gathered across DDP
   ranks) and masked-patch reconstruction;
4. batches, the learning-rate schedule, the loop state and its checkpoint;
5. ``pretrain_encoder``: self-supervised pretraining of the encoder;
6. ``finetune_classifier``: supervised fine-tuning (linear probe, partial or
   full) with early stopping.

Both loops keep everything they change in a ``LoopState`` plus the model,
optimizer and scheduler, and can hand all of it (with every RNG state) to a
``Checkpointer`` every N steps or epochs. A loop started with a checkpointer
that holds a checkpoint resumes from it, mid-epoch included, and ends with the
same weights, bit for bit, as a run that was never interrupted. Randomness goes
through explicit ``torch.Generator`` objects seeded from ``seed``, and the
batch order of epoch ``e`` is a pure function of ``(seed, e)``
(``DistributedSampler``), so the same seed gives the same weights on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.core.checkpoint import Checkpointer
from components.core.data import Splits
from components.core.models import Classifier, Encoder, EncoderSpec

OBJECTIVES = ("contrastive", "masked")
FINETUNE_MODES = ("linear_probe", "partial", "full")
Log = Callable[[str], None]
StepHook = Callable[[int], None]
# (model, images, labels, generator) -> (images, labels): an extra per-batch transform after augmentation,
# e.g. noise or adversarial examples; it may call the model.
BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
FAIL_AT_STEP_ENV = "MLOPS_FAIL_AT_STEP"


# ---------------------------------------------------------------------------
# 1. Runtime: device, precision, compile, DDP; seeds
# ---------------------------------------------------------------------------

def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Runtime:
    """Where and how a loop runs. ``make_runtime()`` fills it from the machine and torchrun's env."""

    device: torch.device = field(default_factory=pick_device)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    bf16: bool = False  # autocast to bfloat16 (CUDA only)
    compile: bool = False  # torch.compile the encoder / classifier forward
    compile_backend: str = "inductor"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) logs, checkpoints and writes outputs."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def maybe_compile(self, module: nn.Module) -> nn.Module:
        return torch.compile(module, backend=self.compile_backend) if self.compile else module


def make_runtime(compile: bool = False, device: str | torch.device | None = None) -> Runtime:
    """The runtime of this process.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group from
    the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``):
    NCCL on CUDA with one GPU per local rank, Gloo on CPU. Otherwise a single
    process on CUDA when available, else CPU. bf16 autocast is on whenever the
    device is a GPU that supports it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dev, backend = torch.device("cuda", local_rank), "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return Runtime(dev, dist.get_rank(), dist.get_world_size(), local_rank,
                       bf16=_bf16_ok(dev), compile=compile)
    dev = torch.device(device) if device is not None else pick_device()
    return Runtime(dev, bf16=_bf16_ok(dev), compile=compile)


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


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


def _aug_generator(seed: int, rt: Runtime) -> torch.Generator:
    """The augmentation generator, on the device; every DDP rank draws different augmentations."""
    return torch.Generator(device=rt.device).manual_seed(seed + 1 + 1_000_003 * rt.rank)


def _rand(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device)


class InjectedFailure(RuntimeError):
    """Raised on purpose by ``MLOPS_FAIL_AT_STEP`` (retry and resume drills)."""


def fail_at_step_hook(resumed_from_step: int, environ: dict[str, str] | None = None) -> StepHook | None:
    """A step hook that raises at step ``$MLOPS_FAIL_AT_STEP``, once: a resumed run does not fail again.

    For drills of KFP retries and pod restarts: set the variable on the step,
    watch it fail, and watch the retry resume from the last checkpoint.
    """
    raw = (environ if environ is not None else os.environ).get(FAIL_AT_STEP_ENV, "").strip()
    if not raw or resumed_from_step > 0:
        return None
    fail_at = int(raw)

    def hook(step: int) -> None:
        if step == fail_at:
            raise InjectedFailure(f"injected failure at step {step} ({FAIL_AT_STEP_ENV}={raw}); "
                                  "a retry resumes from the last checkpoint")
    return hook


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
    elastic_alpha: float = 0.0  # elastic distortion: largest displacement as a fraction of the image side
    elastic_grid: int = 3  # control points per side of the smooth random displacement field
    stroke_jitter: float = 0.0  # thicken or thin strokes: blend of up to this much dilation / erosion


NO_AUGMENTATION = AugmentPolicy()


def pretrain_policy(channels: int) -> AugmentPolicy:
    """Strong views for contrastive learning. Flips only for RGB: a flipped digit is another digit.

    Grayscale (handwriting) also gets elastic distortion and stroke-width
    jitter: the ways one writer's digit differs from another's. Together with
    60 pretraining epochs (``PretrainConfig.epochs``; 20 before) they lifted
    few-label digits accuracy after fine-tuning, mean over seeds 0-2: 5% of
    the labels 0.908 -> 0.932, 10% 0.947 -> 0.956 (at 20 epochs they did not
    help; 120 epochs added nothing). See ``benchmarks/label_efficiency.py``.
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


def elastic_displacement(batch: int, size: int, g: torch.Generator, alpha: float, grid: int) -> torch.Tensor:
    """A smooth random displacement field [B, size, size, 2] in ``affine_grid`` coordinates.

    Uniform random offsets on a ``grid`` x ``grid`` lattice, upsampled bicubically:
    the classic elastic distortion of handwriting (Simard et al., 2003), each
    pixel moving by at most about ``alpha`` of the image side.
    """
    coarse = _rand((batch, 2, grid, grid), g) * 2 - 1
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1) * 2 * alpha  # a fraction f of the side is 2 * f in [-1, 1] coordinates


def random_stroke_width(x: torch.Tensor, g: torch.Generator, amount: float) -> torch.Tensor:
    """Thicken (dilate) or thin (erode) the strokes of each image by a random blend in [-amount, amount]."""
    t = (_rand((x.shape[0], 1, 1, 1), g) * 2 - 1) * amount
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(t > 0, x + t * (thick - x), x - t * (thin - x))


def random_affine(x: torch.Tensor, g: torch.Generator, max_rotate_deg: float, max_translate: float,
                  min_scale: float, max_scale: float, elastic_alpha: float = 0.0,
                  elastic_grid: int = 3) -> torch.Tensor:
    """Random rotation, translation, zoom (crop-resize) and optional elastic distortion in one resampling."""
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

    def forward(self, encoder: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        views = torch.cat([augment(x, g, self.policy), augment(x, g, self.policy)])
        # One pass for both views: GroupNorm has no batch statistics, so nothing leaks between them.
        z1, z2 = self.projector(encoder(views)).float().chunk(2)  # the loss in fp32, also under bf16 autocast
        # Under DDP every rank scores its views against the views of all ranks (the global batch's
        # negatives), with gradients flowing back to the rank that made each view.
        return nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.temperature)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice.

    Every rank computes the same global loss, so after DDP averages the
    parameter gradients they equal those of one process on the global batch.
    Works on every backend (an all_reduce; Gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The rows of every DDP rank, rank order; ``x`` itself outside DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


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

    def use_compiled(self, rt: "Runtime") -> None:
        object.__setattr__(self, "encoder_fn", rt.maybe_compile(self.encoder))

    def forward(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.objective(self.encoder_fn, x, g)


# ---------------------------------------------------------------------------
# 4. Batches, schedule, loop state, checkpoints
# ---------------------------------------------------------------------------

def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _schedule(total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Warmup (about one epoch, at most a tenth of training), then cosine decay, per optimizer step."""
    return warmup_cosine(total_steps, max(1, min(steps_per_epoch, total_steps // 10)))


def make_scheduler(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(epochs * steps_per_epoch, steps_per_epoch))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True, drop_last: bool = False,
                  rank: int = 0, world_size: int = 1, min_samples: int = 0) -> list[torch.Tensor]:
    """This rank's index batches for one epoch: a pure function of (seed, epoch, rank).

    ``DistributedSampler`` shuffles with ``seed + epoch`` and deals every
    ``world_size``-th index to each rank; ``batch_size`` is the global batch, so
    each rank takes ``batch_size // world_size``. Because the order depends on
    nothing else, a resumed run sees the same batches as an uninterrupted one.
    ``min_samples``: a set smaller than this is passed over several times
    (fresh shuffles) so that an epoch of a few-label run still has enough steps.
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last and world_size > 1)
    passes = max(1, math.ceil(min_samples / n)) if min_samples > n else 1
    order: list[int] = []
    for p in range(passes):
        sampler.set_epoch(epoch * passes + p)
        order += list(sampler)
    local = max(1, batch_size // world_size)
    batches = list(torch.tensor(order, dtype=torch.long).split(local))
    if drop_last and len(batches) > 1 and len(batches[-1]) < local:
        batches.pop()  # a short last batch gives the contrastive loss few negatives
    return batches


def batch_indices(n: int, batch_size: int, g: torch.Generator | None = None, drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches over n items, shuffled when a generator is given (evaluation uses it unshuffled)."""
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


@dataclass
class LoopState:
    """Everything a loop changes besides model, optimizer and scheduler; what a checkpoint holds of it."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch: int = 0  # batches of the current epoch completed (a checkpoint may fall mid-epoch)
    epoch_lr: float = 0.0  # learning rate when the current epoch began (for the history)
    loss_sum: float = 0.0  # sum of per-sample losses in the current epoch so far
    loss_count: int = 0
    best_loss: float = math.inf  # early stopping (finetune)
    best_epoch: int = 0
    since_best: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0  # not saved: 0 in a fresh run


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ranks(obj: Any, rt: Runtime) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (one item outside DDP)."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)  # in-memory exchange between ranks; nothing is written pickled
    return out


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loop: LoopState,
              generators: dict[str, torch.Generator], rt: Runtime, best_weights: dict | None) -> dict[str, Any]:
    """The whole training state as a tree for the checkpointer (collective under DDP: every rank calls it)."""
    loop_state = {k: v for k, v in asdict(loop).items() if k != "resumed_from_step"}
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": loop_state,
        "rng": _all_ranks(_rng_state(generators), rt),  # per rank: each draws its own augmentations
        "best_weights": best_weights,
    }


def _restore(tree: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             generators: dict[str, torch.Generator], rt: Runtime) -> tuple[LoopState, dict | None]:
    model.load_state_dict(tree["model"])
    optimizer.load_state_dict(tree["optimizer"])
    scheduler.load_state_dict(tree["scheduler"])
    if len(tree["rng"]) != rt.world_size:
        raise ValueError(f"the checkpoint was written by {len(tree['rng'])} processes, this run has {rt.world_size}")
    _set_rng_state(tree["rng"][rt.rank], generators)
    loop = LoopState(**tree["loop"])
    best = tree.get("best_weights")
    return loop, ({k: v.to(rt.device) for k, v in best.items()} if best else None)


def _restore_if_any(checkpointer: Checkpointer | None, model, optimizer, scheduler, generators, rt: Runtime,
                    log: Log) -> tuple[LoopState, dict | None]:
    if checkpointer is None:
        return LoopState(), None
    if rt.distributed:  # one download per node, then every rank reads the same files
        import torch.distributed as dist

        if rt.local_rank == 0:
            checkpointer.pull()
        dist.barrier()
    ckpt = checkpointer.restore(pull=not rt.distributed)
    if ckpt is None:
        return LoopState(), None
    loop, best = _restore(ckpt.tree, model, optimizer, scheduler, generators, rt)
    loop.resumed_from_step = loop.step
    if rt.is_main:
        log(f"resumed from checkpoint {checkpointer.directory} at step {loop.step} "
            f"(epoch {loop.epoch} + {loop.batch} batches)")
    return loop, best


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _as_images(images: np.ndarray, what: str) -> torch.Tensor:
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{what} must be a non-empty array shaped [N, C, H, W], got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))


def _hooks(*hooks: StepHook | None) -> list[StepHook]:
    return [h for h in hooks if h is not None]


# ---------------------------------------------------------------------------
# 5. Self-supervised pretraining
# ---------------------------------------------------------------------------

def pretrain_encoder(images: np.ndarray, spec: EncoderSpec, objective: str, epochs: int, batch_size: int,
                     learning_rate: float, temperature: float, seed: int, log: Log = print, *,
                     runtime: Runtime | None = None, checkpointer: Checkpointer | None = None,
                     on_step: StepHook | None = None) -> tuple[Encoder, list[dict]]:
    """Self-supervised pretraining of a fresh encoder on unlabeled images.

    ``batch_size`` is the global batch (split across DDP ranks). With a
    ``checkpointer`` the loop saves as it configures and resumes from its
    newest checkpoint. ``on_step(step)`` runs after every optimizer step.
    Returns the encoder (on CPU, eval mode; identical on every rank) and one
    history row per epoch (``epoch``, ``loss``, ``lr``, ``seconds``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown pretraining objective {objective!r}; choose one of {list(OBJECTIVES)}")
    _check_positive(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, temperature=temperature)
    data = _as_images(images, "pretraining images")
    if data.shape[1:] != (spec.in_channels, spec.image_size, spec.image_size):
        raise ValueError(f"images shaped {tuple(data.shape[1:])} do not fit the encoder spec "
                         f"({spec.in_channels}, {spec.image_size}, {spec.image_size})")
    rt = runtime or make_runtime()
    if len(data) < 2 * rt.world_size:
        raise ValueError(f"{len(data)} images cannot make contrastive pairs on {rt.world_size} process(es); "
                         "pretraining needs at least 2 images per process")

    # --- build: model, optimizer, schedule (the same on every rank: DDP checks the weights match)
    seed_everything(seed)
    model = PretrainModel(Encoder(spec), build_objective(objective, spec, temperature)).to(rt.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = len(epoch_batches(len(data), batch_size, seed, 0, drop_last=True,
                                        rank=rt.rank, world_size=rt.world_size))
    scheduler = make_scheduler(optimizer, epochs, steps_per_epoch)
    aug_gen = _aug_generator(seed, rt)
    loop, _ = _restore_if_any(checkpointer, model, optimizer, scheduler, {"augment": aug_gen}, rt, log)
    model.use_compiled(rt)
    train_model: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    hooks = _hooks(on_step, fail_at_step_hook(loop.resumed_from_step))

    if rt.is_main:
        log(f"pretrain: {objective} on {len(data)} images {tuple(data.shape[1:])}, {spec.arch} encoder, {epochs} epochs, "
            f"batch {batch_size}, lr {learning_rate}, device {rt.device}"
            + (f", {rt.world_size} processes (DDP)" if rt.distributed else "") + (", bf16" if rt.bf16 else ""))
    loss_sum = torch.tensor(loop.loss_sum, dtype=torch.float64, device=rt.device)
    while loop.epoch < epochs:
        t0 = time.perf_counter()
        batches = epoch_batches(len(data), batch_size, seed, loop.epoch, drop_last=True,
                                rank=rt.rank, world_size=rt.world_size)
        if loop.batch == 0:
            loop.epoch_lr = optimizer.param_groups[0]["lr"]
        model.train()
        for idx in batches[loop.batch:]:
            x = data[idx].to(rt.device, non_blocking=True)
            with rt.autocast():
                loss = train_model(x, aug_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loop.step += 1
            loop.batch += 1
            loss_sum += loss.detach().double() * len(idx)  # summed on the device: no sync per step
            loop.loss_count += len(idx)
            for hook in hooks:
                hook(loop.step)
            if checkpointer and loop.batch < len(batches) and checkpointer.due(loop.step, loop.epoch, epoch_end=False):
                loop.loss_sum = loss_sum.item()
                checkpointer.save(_snapshot(model, optimizer, scheduler, loop, {"augment": aug_gen}, rt, None),
                                  loop.step, loop.epoch)
        epoch_loss = _global_mean(loss_sum, loop.loss_count, rt)
        loop.epoch += 1
        loop.batch, loop.loss_count, loop.loss_sum = 0, 0, 0.0
        loss_sum.zero_()
        seconds = time.perf_counter() - t0
        loop.history.append({"epoch": loop.epoch, "loss": epoch_loss, "lr": loop.epoch_lr, "seconds": seconds})
        if rt.is_main:
            log(f"pretrain epoch {loop.epoch}/{epochs} loss {epoch_loss:.4f} ({seconds:.1f}s)")
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"pretraining loss became {epoch_loss} at epoch {loop.epoch}; lower the learning rate")
        if checkpointer and checkpointer.due(loop.step, loop.epoch, epoch_end=True):
            checkpointer.save(_snapshot(model, optimizer, scheduler, loop, {"augment": aug_gen}, rt, None),
                              loop.step, loop.epoch)
    return model.encoder.cpu().eval(), loop.history


def _global_mean(total: torch.Tensor, count: int, rt: Runtime) -> float:
    """Mean over every rank's samples (each rank's own mean outside DDP)."""
    if rt.distributed:
        import torch.distributed as dist

        both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        dist.all_reduce(both)
        return (both[0] / both[1]).item()
    return (total / count).item()


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


def set_trainable(model: Classifier, mode: str, unfreeze_blocks: int = 1) -> list[nn.Parameter]:
    """Freeze what ``mode`` keeps fixed; return the encoder parameters that still train.

    * ``linear_probe``: the encoder is frozen, only the head trains;
    * ``partial``: the head, the encoder's projection and its last ``unfreeze_blocks`` stages train;
    * ``full``: everything trains.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose one of {list(FINETUNE_MODES)}")
    stages = model.encoder.stages()
    if mode == "partial" and not 1 <= unfreeze_blocks <= len(stages):
        raise ValueError(f"unfreeze_blocks must be between 1 and {len(stages)} (the {model.encoder.spec.arch} "
                         f"encoder's stages), got {unfreeze_blocks}")
    for p in model.encoder.parameters():
        p.requires_grad_(mode == "full")
    if mode == "partial":
        for module in [*stages[-unfreeze_blocks:], model.encoder.project]:
            for p in module.parameters():
                p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return [p for p in model.encoder.parameters() if p.requires_grad]


@dataclass
class FinetuneData:
    x: torch.Tensor  # the labeled train images actually used (after label_fraction)
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    kept: np.ndarray  # their indices into splits.train_x


def finetune_data(splits: Splits, label_fraction: float, seed: int) -> FinetuneData:
    keep = subsample_labels(splits.train_y, label_fraction, seed)
    return FinetuneData(
        _as_images(splits.train_x[keep], "train images"), torch.from_numpy(splits.train_y[keep].astype(np.int64)),
        _as_images(splits.val_x, "val images"), torch.from_numpy(splits.val_y.astype(np.int64)), keep)


@dataclass
class FinetuneParts:
    """What the fine-tune loop trains, built in one place (``build_finetune``).

    A variant (DP-SGD, adversarial training) changes pieces here through the
    ``customize`` argument of ``finetune_classifier`` instead of forking the loop:
    wrap ``forward`` and ``optimizer``, replace ``batches`` (e.g. Poisson
    sampling), set ``batch_transform``. ``model`` stays the plain classifier:
    it is what is checkpointed, early-stopped and returned.
    """

    model: Classifier
    forward: nn.Module  # what the loop calls: the model, torch.compile(model), or a wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Callable[[int], list[torch.Tensor]]  # epoch -> index batches into FinetuneData.x
    policy: AugmentPolicy
    batch_transform: BatchTransform | None = None
    encoder_params: list[nn.Parameter] = field(default_factory=list)  # the encoder parameters the mode trains
    probe_epochs: int = 0  # they start training after this many head-only epochs

    def start_epoch(self, epoch: int) -> None:
        """Linear probe, then fine-tune: the encoder waits (frozen) for the first ``probe_epochs`` epochs."""
        for p in self.encoder_params:
            p.requires_grad_(epoch >= self.probe_epochs)


def build_finetune(encoder: Encoder, num_classes: int, data: FinetuneData, *, epochs: int, batch_size: int,
                   learning_rate: float, seed: int, mode: str, unfreeze_blocks: int, encoder_lr_scale: float,
                   augment_train: bool, min_epoch_samples: int, probe_epochs: int, rt: Runtime) -> FinetuneParts:
    """The model (a copy of ``encoder`` + a fresh head), the optimizer over what trains, the schedule, the batches.

    Both learning rates warm up and decay along a cosine; the encoder's
    schedule starts when it starts training (after ``probe_epochs``, capped at
    ``epochs - 1`` so that the encoder always gets at least one epoch).
    """
    model = Classifier(encoder.spec, num_classes=num_classes)
    model.encoder.load_state_dict(encoder.state_dict())
    encoder_params = set_trainable(model, mode, unfreeze_blocks)
    model.to(rt.device)
    groups = [{"params": list(model.head.parameters()), "lr": learning_rate}]
    if encoder_params:  # the pretrained encoder moves slower than the fresh head: keep what pretraining learned
        groups.append({"params": encoder_params, "lr": learning_rate * encoder_lr_scale})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    batches = lambda epoch: epoch_batches(len(data.x), batch_size, seed, epoch,  # noqa: E731
                                          min_samples=min_epoch_samples)
    steps_per_epoch = len(batches(0))
    probe_epochs = min(probe_epochs, epochs - 1) if encoder_params else 0
    head_factor = _schedule(epochs * steps_per_epoch, steps_per_epoch)
    probe_steps, tune_steps = probe_epochs * steps_per_epoch, (epochs - probe_epochs) * steps_per_epoch
    tune_factor = _schedule(tune_steps, steps_per_epoch)
    encoder_factor = lambda step: 0.0 if step < probe_steps else tune_factor(step - probe_steps)  # noqa: E731
    factors = [head_factor, encoder_factor][:len(groups)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    policy = finetune_policy(encoder.spec.in_channels) if augment_train else NO_AUGMENTATION
    return FinetuneParts(model, rt.maybe_compile(model), optimizer, scheduler, batches, policy,
                         encoder_params=encoder_params, probe_epochs=probe_epochs)


def finetune_classifier(encoder: Encoder, splits: Splits, epochs: int, batch_size: int, learning_rate: float,
                        patience: int, label_fraction: float, seed: int, log: Log = print, *,
                        mode: str = "full", unfreeze_blocks: int = 1, encoder_lr_scale: float = 0.1,
                        min_epoch_samples: int = 0, probe_epochs: int = 0, augment_train: bool = True,
                        runtime: Runtime | None = None,
                        checkpointer: Checkpointer | None = None, on_step: StepHook | None = None,
                        customize: Callable[[FinetuneParts], FinetuneParts] | None = None,
                        ) -> tuple[Classifier, list[dict]]:
    """Fine-tune encoder + a new linear head on the labeled train split.

    ``mode``: ``full`` (default), ``partial`` or ``linear_probe`` (see
    ``set_trainable``); the encoder's learning rate is ``encoder_lr_scale``
    times the head's. ``min_epoch_samples``: labeled sets smaller than this
    are repeated within an epoch, so a run on a few dozen labels still takes
    enough optimizer steps. ``probe_epochs``: train the head alone first
    (linear probe, then fine-tune: the fresh head cannot scramble the
    pretrained features while it is still random). Early stopping watches the
    validation loss (its patience restarts when the encoder starts training)
    and the best weights are restored. Returns the classifier (on CPU, eval mode) and one
    history row per epoch (``epoch``, ``train_loss``, ``val_loss``,
    ``val_accuracy``, ``lr``, ``seconds``, ``n_train``).
    """
    _check_positive(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=patience,
                    encoder_lr_scale=encoder_lr_scale)
    spec = encoder.spec
    if splits.image_shape != (spec.in_channels, spec.image_size, spec.image_size):
        raise ValueError(f"dataset images shaped {splits.image_shape} do not fit the encoder "
                         f"({spec.in_channels}, {spec.image_size}, {spec.image_size}); pretrain on this dataset first")
    if len(splits.val_x) == 0:
        raise ValueError("the validation split is empty; early stopping needs it (raise the val fraction)")
    data = finetune_data(splits, label_fraction, seed)
    rt = runtime or make_runtime()

    # --- build (one place; `customize` may swap pieces), then resume if a checkpoint exists
    seed_everything(seed)
    parts = build_finetune(encoder, len(splits.class_names), data, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, mode=mode, unfreeze_blocks=unfreeze_blocks,
                           encoder_lr_scale=encoder_lr_scale, augment_train=augment_train,
                           min_epoch_samples=min_epoch_samples, probe_epochs=probe_epochs, rt=rt)
    if customize is not None:
        parts = customize(parts)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    aug_gen = _aug_generator(seed, rt)
    generators = {"augment": aug_gen}
    loop, best_weights = _restore_if_any(checkpointer, model, optimizer, scheduler, generators, rt, log)
    hooks = _hooks(on_step, fail_at_step_hook(loop.resumed_from_step))
    x, y = data.x, data.y

    def snapshot() -> dict[str, Any]:
        return _snapshot(model, optimizer, scheduler, loop, generators, rt, best_weights)

    log(f"finetune: {len(x)} labeled images ({label_fraction:.0%} of train), {len(data.val_x)} val, mode {mode}, "
        f"up to {epochs} epochs, patience {patience}, device {rt.device}" + (", bf16" if rt.bf16 else ""))
    loss_sum = torch.tensor(loop.loss_sum, dtype=torch.float64, device=rt.device)
    while loop.epoch < epochs and loop.since_best < patience:
        t0 = time.perf_counter()
        batches = parts.batches(loop.epoch)
        parts.start_epoch(loop.epoch)
        if loop.batch == 0:
            loop.epoch_lr = optimizer.param_groups[0]["lr"]
        model.train()
        for idx in batches[loop.batch:]:
            xb, yb = x[idx].to(rt.device, non_blocking=True), y[idx].to(rt.device, non_blocking=True)
            xb = augment(xb, aug_gen, parts.policy)
            if parts.batch_transform is not None:
                xb, yb = parts.batch_transform(parts.forward, xb, yb, aug_gen)
            with rt.autocast():
                loss = F.cross_entropy(parts.forward(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loop.step += 1
            loop.batch += 1
            loss_sum += loss.detach().double() * len(idx)
            loop.loss_count += len(idx)
            for hook in hooks:
                hook(loop.step)
            if checkpointer and loop.batch < len(batches) and checkpointer.due(loop.step, loop.epoch, epoch_end=False):
                loop.loss_sum = loss_sum.item()
                checkpointer.save(snapshot(), loop.step, loop.epoch)

        # --- end of epoch: validate, early-stopping bookkeeping, checkpoint
        train_loss = (loss_sum / loop.loss_count).item()
        val_loss, val_acc = validate(model, data.val_x, data.val_y, rt.device)
        loop.epoch += 1
        loop.batch, loop.loss_count, loop.loss_sum = 0, 0, 0.0
        loss_sum.zero_()
        improved = val_loss < loop.best_loss
        if improved:
            loop.best_loss, loop.best_epoch, loop.since_best = val_loss, loop.epoch, 0
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            loop.since_best += 1
        if loop.epoch == parts.probe_epochs:
            loop.since_best = 0  # the encoder starts training next epoch: give it the full patience
        seconds = time.perf_counter() - t0
        loop.history.append({"epoch": loop.epoch, "train_loss": train_loss, "val_loss": val_loss,
                             "val_accuracy": val_acc, "lr": loop.epoch_lr, "seconds": seconds, "n_train": len(x)})
        log(f"finetune epoch {loop.epoch}/{epochs} train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_acc {val_acc:.4f}{' *' if improved else ''} ({seconds:.1f}s)")
        if checkpointer and checkpointer.due(loop.step, loop.epoch, epoch_end=True):
            checkpointer.save(snapshot(), loop.step, loop.epoch)
    if loop.since_best >= patience:
        log(f"early stop: no better val loss for {patience} epochs; best epoch {loop.best_epoch}")
    model.load_state_dict(best_weights)
    return model.cpu().eval(), loop.history


def best_epoch(history: list[dict]) -> dict:
    """The history row whose weights finetune_classifier kept (the first lowest val loss)."""
    return min(history, key=lambda row: row["val_loss"])
