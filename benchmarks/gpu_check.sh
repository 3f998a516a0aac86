#!/usr/bin/env bash
# GPU check for an NVIDIA machine: bf16 training throughput of the encoders at 32x32 and one
# short pretrain + finetune run (with DDP over every GPU when there are several), printing
# samples/s and peak GPU memory. Run from the repo root:
#
#     bash benchmarks/gpu_check.sh            # needs a CUDA GPU; exits 2 with a message otherwise
#     bash benchmarks/gpu_check.sh --cpu-dry-run   # the same code, tiny and on CPU (checks the script)
#
# Uses .venv/bin/python (override with PYTHON=...). Ends with one JSON line of headline figures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODE=${1:-gpu}

if [[ ! -x "$PY" ]]; then
  echo "gpu_check: $PY not found; run 'make install' first (or set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [[ "$MODE" != "--cpu-dry-run" ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found); run this on a GPU node, or pass --cpu-dry-run" >&2
    exit 2
  fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: nvidia-smi works but torch.cuda.is_available() is False: this torch build is CPU-only" \
         "($("$PY" -c 'import torch; print(torch.__version__)')); install a CUDA build of torch" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
fi

export GPU_CHECK_MODE="$MODE"
exec "$PY" - <<'PYEOF'
import json, os, statistics, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import numpy as np
import torch
import torch.nn.functional as F

from components.core.models import Classifier, EncoderSpec

dry = os.environ["GPU_CHECK_MODE"] == "--cpu-dry-run"
device = torch.device("cpu" if dry else "cuda")
BATCH, STEPS, WARMUP = (16, 3, 1) if dry else (256, 50, 10)
ARCHS = [("cnn", 0, 32), ("resnet", 18, 32), ("vgg", 16, 32), ("vgg", 16, 64)] if not dry else [("cnn", 0, 8), ("resnet", 10, 8), ("vgg", 11, 8)]
print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if not dry else 'cpu (dry run)'}, "
      f"{torch.cuda.device_count() if not dry else 0} GPU(s)")


def throughput(arch, depth, width, bf16):
    torch.manual_seed(0)
    model = Classifier(EncoderSpec(3, 32, width=width, embed_dim=128, arch=arch, depth=depth), 10).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    if not dry:
        torch.cuda.reset_peak_memory_stats()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and not dry else torch.autocast("cpu", enabled=False)
    times = []
    for step in range(WARMUP + STEPS):
        if not dry:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with ctx:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not dry:
            torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if not dry else 0.0
    return BATCH / statistics.median(times), peak


rows = []
print(f"\nEncoder training throughput at 32x32x3, batch {BATCH}, AdamW, median of {STEPS} steps after {WARMUP} warm-up")
print(f"{'encoder':14s} {'params':>9s} {'fp32 img/s':>11s} {'bf16 img/s':>11s} {'bf16 x':>7s} {'peak MiB (bf16)':>16s}")
for arch, depth, width in ARCHS:
    params = sum(p.numel() for p in Classifier(EncoderSpec(3, 32, width, 128, arch, depth), 10).parameters())
    fp32, _ = throughput(arch, depth, width, bf16=False)
    bf16, peak = throughput(arch, depth, width, bf16=True)
    name = f"{arch}{depth or ''} w{width}"
    rows.append({"encoder": name, "fp32_samples_per_s": round(fp32), "bf16_samples_per_s": round(bf16),
                 "bf16_peak_mib": round(peak)})
    print(f"{name:14s} {params:9d} {fp32:11.0f} {bf16:11.0f} {bf16 / fp32:7.2f} {peak:16.0f}")

# One short pretrain + finetune through the step functions (DDP over every GPU when there are several).
from components.core.cost import measure
from components.finetune.finetune import finetune
from components.ingest.ingest import ingest
from components.core.models import load_classifier
from components.pretrain.pretrain import default_nproc_per_node, pretrain
from components.core.data import load_splits
from components.core.settings import Settings
from components.train.loops import predict_logits
from pipelines.config import DataConfig, FinetuneConfig, PretrainConfig
import dataclasses

def settings(**areas):  # config dataclasses as the steps receive them
    return Settings(**{name: Settings(**dataclasses.asdict(area)) for name, area in areas.items()})

work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
ingest("digits", work / "dataset", settings(data=DataConfig(seed=0, image_size=32)))  # digits upscaled to 32x32: the 32x32 code path
nproc = 1 if dry else default_nproc_per_node()
arch, depth = ("resnet", 10) if dry else ("resnet", 18)
p_epochs, f_epochs = (1, 1) if dry else (10, 10)
with measure() as cost_p:
    p = pretrain(work / "dataset", work / "encoder",
                 settings(data=DataConfig(seed=0), pretrain=PretrainConfig(
                     epochs=p_epochs, batch_size=256, learning_rate=2e-3, width=8 if dry else 32, embed_dim=128,
                     arch=arch, depth=depth)),
                 nproc_per_node=nproc, log=lambda line: print("  " + line, flush=True))
with measure() as cost_f:
    f = finetune(work / "dataset", work / "encoder", work / "model",
                 settings(data=DataConfig(seed=0), finetune=FinetuneConfig(epochs=f_epochs, batch_size=128)),
                 log=lambda line: print("  " + line, flush=True))
meta = json.loads((work / "encoder" / "metadata.json").read_text())
pre_rate = statistics.median(p["n_images"] / row["seconds"] for row in meta["history"][1:] or meta["history"])
model, _ = load_classifier(work / "model", device=device)
splits = load_splits(work / "dataset")
acc = float((predict_logits(model, splits.test_x).argmax(1).numpy() == splits.test_y).mean())
print(f"\npretrain ({arch}{depth}, {p['world_size']} process(es), {p_epochs} epochs): {pre_rate:.0f} images/s "
      f"(contrastive: 2 views each), {cost_p.wall_seconds:.1f} s, peak GPU {cost_p.peak_gpu_mb:.0f} MiB "
      "(this process; DDP ranks report their own)")
print(f"finetune ({f_epochs} epochs): val acc {f['val_accuracy']:.4f}, test acc {acc:.4f}, {cost_f.wall_seconds:.1f} s, "
      f"peak GPU {cost_f.peak_gpu_mb:.0f} MiB")
print(json.dumps({"throughput": rows, "pretrain_images_per_s": round(pre_rate), "pretrain_world_size": p["world_size"],
                  "pretrain_peak_gpu_mib": round(cost_p.peak_gpu_mb), "finetune_test_accuracy": round(acc, 4),
                  "dry_run": dry}))
PYEOF
