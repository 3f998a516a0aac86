"""Where a training loop runs: device, bf16 autocast on CUDA, optional ``torch.compile``, DDP under
``torchrun``; seeding; the collectives the loops need; and the fault-injection hook for retry drills."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

StepHook = Callable[[int], None]
FAIL_AT_STEP_ENV = "MLOPS_FAIL_AT_STEP"


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


# ---------------------------------------------------------------------------
# Collectives (each is the identity, or a one-item list, outside DDP)
# ---------------------------------------------------------------------------

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


def global_mean(total: torch.Tensor, count: int, rt: Runtime) -> float:
    """Mean over every rank's samples (each rank's own mean outside DDP)."""
    if rt.distributed:
        import torch.distributed as dist

        both = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        dist.all_reduce(both)
        return (both[0] / both[1]).item()
    return (total / count).item()


def all_ranks(obj: Any, rt: Runtime) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (one item outside DDP)."""
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)  # in-memory exchange between ranks; nothing is written pickled
    return out


# ---------------------------------------------------------------------------
# Fault injection: retry and resume drills
# ---------------------------------------------------------------------------

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
