"""Label efficiency: does self-supervised pretraining pay off when labels are scarce?

Digits test accuracy at label fractions 0.05, 0.10 and 1.0 of the train split,
fine-tuned from the pretrained encoder vs trained from scratch, over several
seeds. Everything runs through the pipeline's own code with the default
config: ``ingest`` (the seeded split of that seed), ``pretrain`` (PretrainConfig
defaults: SimCLR on the unlabeled pool + train images, labels unused) and
``finetune_classifier`` (FinetuneConfig defaults). One pretrained encoder per
seed serves every fraction. "Scratch" is the same fine-tuning on a randomly
initialised encoder of the same architecture, with the encoder learning at the
head's rate (``encoder_lr_scale=1``: slowing down a random encoder only hurts
it). The validation split (269 labeled images, for early stopping) is the same
for both arms.

Run from the repo root: ``python benchmarks/label_efficiency.py`` (SEEDS=0,1,2,3,4
by default; ``SEEDS=0,1,2`` for a quicker look). To compare another recipe, override
config fields with JSON: ``PRETRAIN='{"epochs": 40}' FINETUNE='{"probe_epochs":
0}' python benchmarks/label_efficiency.py``. The last line is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.core.data import load_splits  # noqa: E402
from components.core.models import Encoder, load_encoder  # noqa: E402
from components.core.settings import Settings  # noqa: E402
from components.ingest.ingest import ingest  # noqa: E402
from components.pretrain.pretrain import pretrain  # noqa: E402
from components.train.loops import finetune_classifier, predict_logits, subsample_labels  # noqa: E402
from pipelines.config import DataConfig, FinetuneConfig, PretrainConfig  # noqa: E402

FRACTIONS = (0.05, 0.10, 1.0)
SEEDS = tuple(int(s) for s in os.environ.get("SEEDS", "0,1,2,3,4").split(","))
QUIET = lambda line: None  # noqa: E731


def test_accuracy(model, splits) -> float:
    return float((predict_logits(model, splits.test_x).argmax(1).numpy() == splits.test_y).mean())


def finetune_arm(encoder, splits, fraction, seed, f: FinetuneConfig, scratch: bool) -> float:
    model, _ = finetune_classifier(
        encoder, splits, f.epochs, f.batch_size, f.learning_rate, f.patience, fraction, seed, QUIET,
        mode=f.mode, unfreeze_blocks=f.unfreeze_blocks, min_epoch_samples=f.min_epoch_samples,
        probe_epochs=0 if scratch else f.probe_epochs,
        encoder_lr_scale=1.0 if scratch else f.encoder_lr_scale)
    return test_accuracy(model, splits)


def main() -> None:
    p = dataclasses.replace(PretrainConfig(), **json.loads(os.environ.get("PRETRAIN") or "{}"))
    f = dataclasses.replace(FinetuneConfig(), **json.loads(os.environ.get("FINETUNE") or "{}"))
    t_start, cpu_start = time.perf_counter(), os.times()
    results: dict[float, dict[str, list[float]]] = {fr: {"pretrained": [], "scratch": []} for fr in FRACTIONS}
    n_labels: dict[float, int] = {}
    timings = []
    n_test = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in SEEDS:
            t0 = time.perf_counter()
            data_dir, enc_dir = Path(tmp) / f"dataset-{seed}", Path(tmp) / f"encoder-{seed}"
            cfg = Settings(data=Settings(**dataclasses.asdict(DataConfig(seed=seed))),
                           pretrain=Settings(**dataclasses.asdict(p)))
            ingest("digits", data_dir, cfg)
            splits = load_splits(data_dir)
            n_test = len(splits.test_y)
            pretrain(data_dir, enc_dir, cfg, log=QUIET)
            t_pre = time.perf_counter() - t0
            encoder, _ = load_encoder(enc_dir)
            for fraction in FRACTIONS:
                n_labels[fraction] = len(subsample_labels(splits.train_y, fraction, seed))
                results[fraction]["pretrained"].append(finetune_arm(encoder, splits, fraction, seed, f, scratch=False))
                torch.manual_seed(seed)
                random_encoder = Encoder(encoder.spec)
                results[fraction]["scratch"].append(finetune_arm(random_encoder, splits, fraction, seed, f, scratch=True))
                print(f"seed {seed} fraction {fraction:.2f} ({n_labels[fraction]} labels): "
                      f"pretrained {results[fraction]['pretrained'][-1]:.4f} "
                      f"scratch {results[fraction]['scratch'][-1]:.4f}", flush=True)
            timings.append((seed, t_pre, time.perf_counter() - t0))
    wall = time.perf_counter() - t_start
    cpu_end = os.times()
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)

    summary = {}
    print(f"\nDigits test accuracy ({n_test} test images), mean ± std over seeds {list(SEEDS)}; "
          f"pretraining: {p.objective}, {p.arch} width {p.width}, {p.epochs} epochs, T {p.temperature}; fine-tuning: "
          f"mode {f.mode}, {f.probe_epochs} head-only epochs, encoder lr x{f.encoder_lr_scale}, "
          f"up to {f.epochs} epochs of >= {f.min_epoch_samples} samples, patience {f.patience}")
    print(f"{'labels':>14s} {'pretrained':>17s} {'scratch':>17s} {'gain':>7s}  beats scratch by > larger std?")
    for fraction in FRACTIONS:
        row = {}
        for arm in ("pretrained", "scratch"):
            values = np.array(results[fraction][arm])
            row[arm] = {"mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
                        "values": [round(float(v), 4) for v in values]}
        gain = row["pretrained"]["mean"] - row["scratch"]["mean"]
        margin = max(row["pretrained"]["std"], row["scratch"]["std"])
        row["gain"], row["gain_exceeds_larger_std"], row["n_labels"] = round(gain, 4), bool(gain > margin), n_labels[fraction]
        summary[f"{fraction:.2f}"] = row
        print(f"{fraction:5.0%} ({n_labels[fraction]:3d})   {row['pretrained']['mean']:.4f} ± {row['pretrained']['std']:.4f}"
              f"   {row['scratch']['mean']:.4f} ± {row['scratch']['std']:.4f} {gain:+7.4f}  "
              f"{'yes' if gain > margin else 'no'} (margin {margin:.4f})")
    for seed, t_pre, t_all in timings:
        print(f"seed {seed}: pretraining {t_pre:.0f} s, all {t_all:.0f} s")
    print(f"total {wall:.0f} s wall, {cpu:.0f} CPU s (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    low = [summary[k] for k in ("0.05", "0.10")]
    print(json.dumps({
        "fractions": summary,
        "goal_low_labels_met": all(r["gain_exceeds_larger_std"] for r in low),
        "goal_full_labels_met": summary["1.00"]["pretrained"]["mean"] >= 0.985,
        "seeds": list(SEEDS),
        "recipe": {"pretrain": dataclasses.asdict(p), "finetune": dataclasses.asdict(f)},
        "seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
    }))


if __name__ == "__main__":
    main()
