"""benchmarks/gpu_check.sh: the GPU check runs its own code path tiny on CPU, and refuses clearly without a GPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cpu_dry_run_measures_every_encoder_and_ends_with_json():
    done = _run("--cpu-dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["dry_run"] is True
    assert [row["encoder"].split()[0] for row in figures["throughput"]] == ["cnn", "resnet10", "vgg11"]
    assert all(row["fp32_samples_per_s"] > 0 and row["bf16_samples_per_s"] > 0 for row in figures["throughput"])
    assert figures["pretrain_images_per_s"] > 0 and 0.0 <= figures["finetune_test_accuracy"] <= 1.0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the real check instead")
def test_without_a_gpu_it_exits_2_and_says_what_to_do():
    done = _run()
    assert done.returncode == 2
    assert "no NVIDIA GPU here" in done.stderr and "--cpu-dry-run" in done.stderr
