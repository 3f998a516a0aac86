"""The two training loops, pretrain and fine-tune, in plain PyTorch, and what they share.

Read it top to bottom: batches and the learning-rate schedule; the loop state
and its checkpoint; the optimizer step both loops take; ``pretrain_encoder``
(self-supervised pretraining of the encoder); ``finetune_classifier``
(supervised fine-tuning: linear probe, partial or full, with early stopping).

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

import math
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
from components.core.progress import Progress
from components.train.augment import NO_AUGMENTATION, AugmentPolicy, augment, finetune_policy
from components.train.objectives import OBJECTIVES, PretrainModel, build_objective
from components.train.runtime import (
    Runtime,
    StepHook,
    all_ranks,
    fail_at_step_hook,
    global_mean,
    make_runtime,
    seed_everything,
)

FINETUNE_MODES = ("linear_probe", "partial", "full")
Log = Callable[[str], None]

# (model, images, labels, generator) -> (images, labels): an extra per-batch transform after augmentation,
# e.g. noise or adversarial examples; it may call the model.
BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------
# Batches and the learning-rate schedule
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


# ---------------------------------------------------------------------------
# The loop state and its checkpoint
# ---------------------------------------------------------------------------

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


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loop: LoopState,
              generators: dict[str, torch.Generator], rt: Runtime, best_weights: dict | None) -> dict[str, Any]:
    """The whole training state as a tree for the checkpointer (collective under DDP: every rank calls it)."""
    loop_state = {k: v for k, v in asdict(loop).items() if k != "resumed_from_step"}
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loop": loop_state,
        "rng": all_ranks(_rng_state(generators), rt),  # per rank: each draws its own augmentations
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


def _aug_generator(seed: int, rt: Runtime) -> torch.Generator:
    """The augmentation generator, on the device; every DDP rank draws different augmentations."""
    return torch.Generator(device=rt.device).manual_seed(seed + 1 + 1_000_003 * rt.rank)


# ---------------------------------------------------------------------------
# The optimizer step both loops take
# ---------------------------------------------------------------------------

def optimizer_step(loss: torch.Tensor, n_samples: int, optimizer: torch.optim.Optimizer, scheduler,
                   loop: LoopState, loss_sum: torch.Tensor, hooks: list[StepHook]) -> None:
    """Backpropagate ``loss``, step the optimizer and the schedule, count the step, then run the step hooks.

    ``loss_sum`` lives on the device and grows in place: no host sync per step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    loop.step += 1
    loop.batch += 1
    loss_sum += loss.detach().double() * n_samples
    loop.loss_count += n_samples
    for hook in hooks:
        hook(loop.step)


def checkpoint_if_due(checkpointer: Checkpointer | None, loop: LoopState, loss_sum: torch.Tensor,
                      snapshot: Callable[[], dict[str, Any]], *, epoch_end: bool) -> None:
    """Save the whole training state when the checkpointer's schedule says so.

    The epoch's running loss joins the loop state first (it lives on the device between checkpoints). Under
    DDP every rank calls this: the snapshot gathers every rank's RNG state.
    """
    if checkpointer and checkpointer.due(loop.step, loop.epoch, epoch_end=epoch_end):
        loop.loss_sum = loss_sum.item()
        checkpointer.save(snapshot(), loop.step, loop.epoch)


# ---------------------------------------------------------------------------
# Self-supervised pretraining
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
    generators = {"augment": aug_gen}
    loop, _ = _restore_if_any(checkpointer, model, optimizer, scheduler, generators, rt, log)
    model.use_compiled(rt)
    train_model: nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    hooks = _hooks(on_step, fail_at_step_hook(loop.resumed_from_step))

    def snapshot() -> dict[str, Any]:
        return _snapshot(model, optimizer, scheduler, loop, generators, rt, None)

    if rt.is_main:
        log(f"pretrain: {objective} on {len(data)} images {tuple(data.shape[1:])}, {spec.arch} encoder, {epochs} epochs, "
            f"batch {batch_size}, lr {learning_rate}, device {rt.device}"
            + (f", {rt.world_size} processes (DDP)" if rt.distributed else "") + (", bf16" if rt.bf16 else ""))
    loss_sum = torch.tensor(loop.loss_sum, dtype=torch.float64, device=rt.device)
    progress = Progress("pretrain epoch", epochs, log, start=loop.epoch, quiet=not rt.is_main)
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
            optimizer_step(loss, len(idx), optimizer, scheduler, loop, loss_sum, hooks)
            if loop.batch < len(batches):  # the epoch's last step is checkpointed at the epoch's end
                checkpoint_if_due(checkpointer, loop, loss_sum, snapshot, epoch_end=False)
        epoch_loss = global_mean(loss_sum, loop.loss_count, rt)
        loop.epoch += 1
        loop.batch, loop.loss_count, loop.loss_sum = 0, 0, 0.0
        loss_sum.zero_()
        seconds = time.perf_counter() - t0
        loop.history.append({"epoch": loop.epoch, "loss": epoch_loss, "lr": loop.epoch_lr, "seconds": seconds})
        progress.update(loop.epoch, f"loss {epoch_loss:.4f} ({seconds:.1f}s)")
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"pretraining loss became {epoch_loss} at epoch {loop.epoch}; lower the learning rate")
        checkpoint_if_due(checkpointer, loop, loss_sum, snapshot, epoch_end=True)
    return model.encoder.cpu().eval(), loop.history


# ---------------------------------------------------------------------------
# Supervised fine-tuning
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
    progress = Progress("finetune epoch", epochs, log, start=loop.epoch)  # the ETA is an upper bound: early stopping
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
            optimizer_step(loss, len(idx), optimizer, scheduler, loop, loss_sum, hooks)
            if loop.batch < len(batches):  # the epoch's last step is checkpointed after validation
                checkpoint_if_due(checkpointer, loop, loss_sum, snapshot, epoch_end=False)

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
        progress.update(loop.epoch, f"train_loss {train_loss:.4f} val_loss {val_loss:.4f} val_acc {val_acc:.4f}"
                                    f"{' *' if improved else ''} ({seconds:.1f}s)")
        checkpoint_if_due(checkpointer, loop, loss_sum, snapshot, epoch_end=True)
    if loop.since_best >= patience:
        progress.close(f"early stop after epoch {loop.epoch}: no better val loss for {patience} epochs; "
                       f"best epoch {loop.best_epoch}")
    model.load_state_dict(best_weights)
    return model.cpu().eval(), loop.history


def best_epoch(history: list[dict]) -> dict:
    """The history row whose weights finetune_classifier kept (the first lowest val loss)."""
    return min(history, key=lambda row: row["val_loss"])
