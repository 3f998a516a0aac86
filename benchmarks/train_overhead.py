"""Training-loop overhead: samples/s of our fine-tune loop vs a bare PyTorch loop.

Same process, same model (the default digits CNN), same data (the digits train
split, all labels), same batch size, same optimizer and schedule. Both loops do
the same arithmetic per epoch: augment each batch with the fine-tune policy,
forward, cross-entropy, backward, AdamW step, warmup-cosine LR step, and one
no-grad pass over the validation split (what early stopping needs). Ours adds
everything the pipeline relies on: seeded ``DistributedSampler`` batch order,
loss accumulation, early-stopping bookkeeping with a copy of the best weights,
history rows, step hooks, and (third row) a full checkpoint every epoch
(model, optimizer, scheduler, RNG states, loop state, best weights; fsynced).

One warm-up run of each variant, then REPEATS rounds that run the variants in
turn (so background load hits them alike); the figures are medians. Run from
the repo root: ``python benchmarks/train_overhead.py``. The last line is JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.core.checkpoint import Checkpointer  # noqa: E402
from components.core.data import Splits  # noqa: E402
from components.core.models import Classifier, Encoder, EncoderSpec  # noqa: E402
from components.train.augment import augment, finetune_policy  # noqa: E402
from components.train.loops import finetune_classifier, warmup_cosine  # noqa: E402

EPOCHS = 3
BATCH = 64
LR = 5e-3
REPEATS = int(os.environ.get("REPEATS", "5"))


def digits() -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    rest_x, val_x, rest_y, val_y = train_test_split(rest_x, rest_y, test_size=0.15 / 0.8, stratify=rest_y, random_state=0)
    train_x, pool_x, train_y, _ = train_test_split(rest_x, rest_y, test_size=0.2 / 0.65, stratify=rest_y, random_state=0)
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, pool_x, [str(i) for i in range(10)])


def bare_loop(encoder: Encoder, splits: Splits) -> float:
    """The loop a person writes by hand; returns seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Classifier(encoder.spec, 10)
    model.encoder.load_state_dict(encoder.state_dict())
    optimizer = torch.optim.AdamW([{"params": model.head.parameters(), "lr": LR},
                                   {"params": model.encoder.parameters(), "lr": LR / 10}], weight_decay=1e-4)
    x, y = torch.from_numpy(splits.train_x), torch.from_numpy(splits.train_y)
    val_x, val_y = torch.from_numpy(splits.val_x), torch.from_numpy(splits.val_y)
    steps = math.ceil(len(x) / BATCH)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(EPOCHS * steps, steps))
    g, policy = torch.Generator().manual_seed(1), finetune_policy(1)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(BATCH):
            loss = F.cross_entropy(model(augment(x[idx], g, policy)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            F.cross_entropy(model(val_x), val_y).item()
    return time.perf_counter() - t0


def our_loop(encoder: Encoder, splits: Splits, checkpoint: bool) -> float:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(tmp, every_epochs=1, log=lambda _: None) if checkpoint else None
        finetune_classifier(encoder, splits, EPOCHS, BATCH, LR, patience=EPOCHS + 1, label_fraction=1.0, seed=0,
                            log=lambda _: None, checkpointer=ckpt)
    return time.perf_counter() - t0


def main() -> None:
    splits = digits()
    torch.manual_seed(0)
    encoder = Encoder(EncoderSpec(in_channels=1, image_size=8, width=32, embed_dim=128))
    samples = EPOCHS * len(splits.train_x)
    variants = {
        "bare PyTorch loop": lambda: bare_loop(encoder, splits),
        "ours (no checkpoints)": lambda: our_loop(encoder, splits, checkpoint=False),
        "ours (checkpoint every epoch)": lambda: our_loop(encoder, splits, checkpoint=True),
    }
    for run in variants.values():  # warm-up: first-call allocations, lazy imports
        run()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    cpu_before = os.times()
    for _ in range(REPEATS):
        for name, run in variants.items():
            seconds[name].append(run())
    cpu = os.times()
    busy = os.getloadavg()[0]

    rate = {name: samples / statistics.median(s) for name, s in seconds.items()}
    bare = rate["bare PyTorch loop"]
    print(f"Fine-tune loop throughput: digits train split ({len(splits.train_x)} images, 1x8x8), batch {BATCH}, "
          f"{EPOCHS} epochs per run, CNN width 32, {torch.get_num_threads()} torch threads, {REPEATS} repeats")
    print(f"{'variant':32s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'samples/s':>10s} {'vs bare':>8s}")
    for name, s in seconds.items():
        print(f"{name:32s} {statistics.median(s):9.3f} {min(s):7.3f} {max(s):7.3f} {rate[name]:10.0f} "
              f"{rate[name] / bare:8.3f}")
    print(f"(load average during the runs: {busy:.1f} on {os.cpu_count()} CPUs; this process used "
          f"{(cpu.user - cpu_before.user) + (cpu.system - cpu_before.system):.1f} CPU s)")
    print(json.dumps({
        "ratio": round(rate["ours (checkpoint every epoch)"] / bare, 4),
        "ratio_without_checkpoints": round(rate["ours (no checkpoints)"] / bare, 4),
        "ours_samples_per_s": round(rate["ours (checkpoint every epoch)"], 1),
        "bare_samples_per_s": round(bare, 1),
        "batch_size": BATCH, "epochs": EPOCHS, "repeats": REPEATS, "load_average": round(busy, 2),
    }))


if __name__ == "__main__":
    main()
