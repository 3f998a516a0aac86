"""DP-SGD overhead: time per epoch and digits test accuracy, DP-SGD at epsilon 8 vs non-private.

Same process, same data (the digits split ingest makes with seed 0: 810 train, 269 val,
359 test images), same pretrained encoder (the pipeline's pretrain defaults: contrastive,
20 epochs, CNN width 32), the project's fine-tune loop (``finetune_classifier``) for
every row; only the ``customize`` hook differs.

Rows:

1. **non-private, pipeline default** — what the pipeline ships without DP (the
   ``FinetuneConfig`` defaults: full fine-tuning after a linear-probe warm-up, AdamW,
   augmentation, early stopping). The accuracy baseline.
2. **non-private, DP recipe** — the DP recipe (``components.train.dp`` defaults: the embedding
   standardised with validation-split statistics, then GroupNorm scales/shifts + projection
   + head train, SGD momentum 0.9, lr 0.25, Poisson batches of expected size 256, 30 epochs,
   clip 1, no augmentation) with no clipping and no noise. The like-for-like baseline of the time
   overhead: the only difference to row 3 is DP itself. (Its accuracy is not a baseline:
   the learning rate is tuned for clipped gradients.)
3. **DP-SGD, epsilon 8** (delta 1e-5) — row 2 with per-example gradients (Opacus
   ``GradSampleModule``), clipping and calibrated noise.
4. / 5. The same pair with **every layer** trainable (timing only, ``ALL_EPOCHS`` epochs):
   the overhead when every layer needs per-example gradients.
6. **DP-SGD, epsilon 8, previous recipe** — the recipe this replaced (the same layers,
   lr 0.5, raw embedding), for comparison.

Time per epoch is the median over epochs and seeds of the loop's own per-epoch time
(training plus the validation pass it runs for early stopping). Accuracy is the mean over
``SEEDS`` seeds (seed of the head, batches and noise). One torch thread by default
(``THREADS``): small models on a shared machine run faster and steadier that way.

Run from the repo root: ``python benchmarks/dp_overhead.py``. The last line is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from components.core.settings import Settings  # noqa: E402
from components.robustness.robustness import accuracy  # noqa: E402
from components.train.augment import NO_AUGMENTATION  # noqa: E402
from components.train.dp import (  # noqa: E402
    DPFinetune,
    DPSettings,
    poisson_batches,
    sample_rate_and_steps,
    set_dp_trainable,
    standardize_embedding,
)
from components.train.loops import finetune_classifier, make_scheduler  # noqa: E402
from pipelines.config import DataConfig, FinetuneConfig, PretrainConfig  # noqa: E402

SEEDS = int(os.environ.get("SEEDS", "3"))
THREADS = int(os.environ.get("THREADS", "1"))
ALL_EPOCHS = int(os.environ.get("ALL_EPOCHS", "3"))
EPSILON, DELTA = 8.0, 1e-5


class SameRecipeWithoutDP:
    """Row 2/4: the DP recipe (trainable layers, SGD, Poisson batches, schedule) without clipping or noise."""

    def __init__(self, settings: DPSettings, n_train: int, seed: int, reference_images=None):
        self.settings, self.n_train, self.seed = settings, n_train, seed
        self.reference_images = reference_images
        self.sample_rate, self.steps_per_epoch = sample_rate_and_steps(n_train, settings.batch_size)

    def __call__(self, parts):
        if self.settings.standardize:
            standardize_embedding(parts.model, self.reference_images)
        params = set_dp_trainable(parts.model, self.settings.trainable)
        parts.optimizer = torch.optim.SGD(params, lr=self.settings.learning_rate, momentum=0.9)
        parts.scheduler = make_scheduler(parts.optimizer, self.settings.epochs, self.steps_per_epoch)
        parts.batches = lambda epoch: poisson_batches(self.n_train, self.sample_rate, self.steps_per_epoch,
                                                      self.seed, epoch)
        parts.forward, parts.policy = parts.model, NO_AUGMENTATION
        parts.encoder_params, parts.probe_epochs = [], 0
        return parts


def digits_splits(tmp: Path):
    """The pipeline's own ingest of the built-in digits (seed 0)."""
    from components.core.data import load_splits
    from components.ingest.ingest import ingest

    ingest("digits", tmp / "dataset", Settings(data=Settings(**dataclasses.asdict(DataConfig(seed=0)))))
    return load_splits(tmp / "dataset")


def pretrained_encoder(tmp: Path):
    from components.core.models import load_encoder
    from components.pretrain.pretrain import pretrain

    t0 = time.perf_counter()
    defaults = Settings(data=Settings(seed=0), pretrain=Settings(**dataclasses.asdict(PretrainConfig())))
    pretrain(tmp / "dataset", tmp / "encoder", defaults, log=lambda _: None)  # the pipeline's defaults
    print(f"pretrained the encoder (pipeline defaults) in {time.perf_counter() - t0:.0f} s", flush=True)
    return load_encoder(tmp / "encoder")[0]


def run(encoder, splits, seed: int, epochs: int, customize=None) -> dict:
    """One fine-tune through the project's loop; the DP rows set their own optimizer, batches and schedule."""
    c = FinetuneConfig()
    t0 = time.perf_counter()
    model, history = finetune_classifier(encoder, splits, epochs, c.batch_size, c.learning_rate,
                                         c.patience if customize is None else epochs, c.label_fraction, seed,
                                         log=lambda _: None, mode=c.mode, unfreeze_blocks=c.unfreeze_blocks,
                                         encoder_lr_scale=c.encoder_lr_scale, min_epoch_samples=c.min_epoch_samples,
                                         probe_epochs=c.probe_epochs, customize=customize)
    return {"accuracy": accuracy(model, splits.test_x, splits.test_y),
            "epoch_seconds": [row["seconds"] for row in history], "epochs": len(history),
            "total_seconds": time.perf_counter() - t0}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        splits = digits_splits(tmp)
        encoder = pretrained_encoder(tmp)
    n = len(splits.train_y)
    recipe = DPSettings(target_epsilon=EPSILON, delta=DELTA)
    every_layer = DPSettings(target_epsilon=EPSILON, delta=DELTA, trainable="all", epochs=ALL_EPOCHS)
    previous = DPSettings(target_epsilon=EPSILON, delta=DELTA, trainable="normalization", learning_rate=0.5,
                          standardize=False)
    ref = splits.val_x  # the embedding statistics come from the validation split, never from train
    rows: dict[str, list[dict]] = {name: [] for name in (
        "non-private, pipeline default", "non-private, DP recipe", f"DP-SGD eps {EPSILON:g}, DP recipe",
        "non-private, all layers", f"DP-SGD eps {EPSILON:g}, all layers", f"DP-SGD eps {EPSILON:g}, previous recipe")}
    names = list(rows)
    epsilons, calibration_seconds = [], []
    cpu_before = os.times()
    for seed in range(SEEDS):
        print(f"seed {seed}", flush=True)
        rows[names[0]].append(run(encoder, splits, seed, FinetuneConfig().epochs))  # the FinetuneConfig defaults
        rows[names[1]].append(run(encoder, splits, seed, recipe.epochs, SameRecipeWithoutDP(recipe, n, seed, ref)))
        t0 = time.perf_counter()
        dp = DPFinetune(recipe, n, seed, log=lambda _: None, reference_images=ref)
        calibration_seconds.append(time.perf_counter() - t0)
        rows[names[2]].append(run(encoder, splits, seed, recipe.epochs, dp))
        epsilons.append(dp.report(rows[names[2]][-1]["epochs"])["epsilon"])
        rows[names[3]].append(run(encoder, splits, seed, ALL_EPOCHS, SameRecipeWithoutDP(every_layer, n, seed, ref)))
        rows[names[4]].append(run(encoder, splits, seed, ALL_EPOCHS,
                                  DPFinetune(every_layer, n, seed, log=lambda _: None, reference_images=ref)))
        before = DPFinetune(previous, n, seed, log=lambda _: None)
        rows[names[5]].append(run(encoder, splits, seed, previous.epochs, before))
        epsilons.append(before.report(rows[names[5]][-1]["epochs"])["epsilon"])
    cpu = os.times()
    load = os.getloadavg()[0]

    epoch_s = {name: statistics.median([s for r in runs for s in r["epoch_seconds"]]) for name, runs in rows.items()}
    acc = {name: statistics.mean(r["accuracy"] for r in runs) for name, runs in rows.items()}
    acc_range = {name: (min(r["accuracy"] for r in runs), max(r["accuracy"] for r in runs)) for name, runs in rows.items()}
    print(f"\nDP-SGD overhead on digits ({n} train / {len(splits.test_y)} test images, 1x8x8), pretrained CNN "
          f"width 32, epsilon {EPSILON:g} delta {DELTA:g}, {SEEDS} seeds, {torch.get_num_threads()} torch thread(s)")
    print(f"{'variant':34s} {'s/epoch':>8s} {'vs row 2':>9s} {'test acc (mean)':>16s} {'min-max':>13s} {'epochs':>7s}")
    for i, name in enumerate(names, 1):
        timing_only = "all layers" in name
        accuracy_text = "(timing only)" if timing_only else f"{acc[name]:.4f}"
        spread = "" if timing_only else f"{acc_range[name][0]:.3f}-{acc_range[name][1]:.3f}"
        base = epoch_s[names[3]] if timing_only else epoch_s[names[1]]
        print(f"{i}. {name:31s} {epoch_s[name]:8.3f} {epoch_s[name] / base:9.2f} {accuracy_text:>16s} {spread:>13s} "
              f"{statistics.mean(r['epochs'] for r in rows[name]):7.1f}")
    print("(row 2's accuracy is not a baseline: its learning rate is tuned for DP's clipped gradients; rows 2/4 "
          "are the like-for-like timing baselines of rows 3/5)")
    print(f"epsilon spent (RDP accountant): max {max(epsilons):.3f}; noise calibration "
          f"{statistics.mean(calibration_seconds):.1f} s per run (not in s/epoch)")
    print(f"(load average during the runs: {load:.1f} on {os.cpu_count()} CPUs; this process used "
          f"{(cpu.user - cpu_before.user) + (cpu.system - cpu_before.system):.0f} CPU s; timings on a shared "
          f"machine are noisy)")
    dp_name = names[2]
    print(json.dumps({
        "slowdown": round(epoch_s[dp_name] / epoch_s[names[1]], 3),
        "accuracy_drop_eps8": round(acc[names[0]] - acc[dp_name], 4),
        "slowdown_all_layers": round(epoch_s[names[4]] / epoch_s[names[3]], 3),
        "slowdown_vs_pipeline_default": round(epoch_s[dp_name] / epoch_s[names[0]], 3),
        "dp_test_accuracy": round(acc[dp_name], 4),
        "plain_test_accuracy": round(acc[names[0]], 4),
        "dp_seconds_per_epoch": round(epoch_s[dp_name], 3),
        "plain_seconds_per_epoch": round(epoch_s[names[1]], 3),
        "dp_test_accuracy_previous_recipe": round(acc[names[5]], 4),
        "epsilon_spent": round(max(epsilons), 3),
        "delta": DELTA, "seeds": SEEDS, "threads": torch.get_num_threads(), "load_average": round(load, 2),
    }))


if __name__ == "__main__":
    main()
