"""Pack a model artifact directory into a TorchServe model archive (.mar).

The archive carries its serving settings in TorchServe's model-config YAML
(``--config-file``): worker count, dynamic batching (``batchSize``,
``maxBatchDelay``) and the response timeout. TorchServe 0.12 reads them when it
loads the model at startup (``load_models``), with the model-management API
off, and they win over ``config.properties``; so the local server and the
Kubernetes pods serve a model with the same settings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from components.core.models import METADATA_FILE, WEIGHTS_FILE

HANDLER_FILE = Path(__file__).with_name("handler.py")

# Shipped defaults, chosen with benchmarks/serving.py (docs/benchmarks.md, "Serving").
DEFAULT_WORKERS = 1
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_DELAY_MS = 1
DEFAULT_RESPONSE_TIMEOUT_S = 60


def model_config_yaml(workers: int = DEFAULT_WORKERS, batch_size: int = DEFAULT_BATCH_SIZE,
                      max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS,
                      response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S) -> str:
    """TorchServe's per-model config (frontend parameters) for the archive."""
    # maxBatchDelay starts at 1: TorchServe 0.12 reads 0 in this file as "not set" and waits its default 100 ms.
    checks = {"workers": (workers, 1, 64), "batch_size": (batch_size, 1, 1024),
              "max_batch_delay_ms": (max_batch_delay_ms, 1, 10_000), "response_timeout_s": (response_timeout_s, 1, 3600)}
    for name, (value, low, high) in checks.items():
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return (
        "# TorchServe frontend parameters of this model (written by serving/archive.py)\n"
        f"minWorkers: {workers}\n"
        f"maxWorkers: {workers}\n"
        f"batchSize: {batch_size}\n"
        f"maxBatchDelay: {max_batch_delay_ms}\n"
        f"responseTimeout: {response_timeout_s}\n"
    )


def build_mar(model_dir: str | Path, export_dir: str | Path, model_name: str, version: str, *,
              workers: int = DEFAULT_WORKERS, batch_size: int = DEFAULT_BATCH_SIZE,
              max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS,
              response_timeout_s: int = DEFAULT_RESPONSE_TIMEOUT_S, handler: str | Path = HANDLER_FILE) -> Path:
    """Run torch-model-archiver on ``model_dir`` (model.safetensors + metadata.json); return the .mar path.

    ``workers``, ``batch_size`` (requests per batch, at most) and
    ``max_batch_delay_ms`` (how long the frontend waits to fill a batch) go into
    the archive's model config. The archiver of this Python environment is used
    (``python -m``), not whatever ``torch-model-archiver`` is first on PATH. ``handler`` is the
    handler module packed (the project's ``serving/handler.py``; the rollout drills pack faulty ones).
    """
    model_yaml = model_config_yaml(workers, batch_size, max_batch_delay_ms, response_timeout_s)
    model_dir, export_dir = Path(model_dir).resolve(), Path(export_dir).resolve()
    weights, metadata = model_dir / WEIGHTS_FILE, model_dir / METADATA_FILE
    missing = [p.name for p in (weights, metadata) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a classifier artifact: {', '.join(missing)} missing (run finetune first)")
    if not model_name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"model name {model_name!r} must be letters, digits, '-' or '_' (it becomes part of the URL)")
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(model_yaml)
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", model_name,
            "--version", str(version),
            "--serialized-file", str(weights),
            "--extra-files", str(metadata),
            "--handler", str(Path(handler).resolve()),
            "--config-file", str(config_file),
            "--export-path", str(export_dir),
            "--force",
        ]
        # The archiver stages the files in <temp dir>/<model name>: a directory of its own, so that two archives
        # of one model built at once (test workers, a rollout's challenger) cannot mix their files.
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
    mar = export_dir / f"{model_name}.mar"
    if result.returncode != 0 or not mar.is_file():
        raise RuntimeError(
            f"torch-model-archiver failed (exit {result.returncode}) for {model_dir}:\n{(result.stderr or result.stdout)[-2000:]}"
        )
    return mar


def archive_workers(mar_path: str | Path) -> int | None:
    """``minWorkers`` from the .mar's model config (what TorchServe will start), or None if it has none."""
    try:
        with zipfile.ZipFile(mar_path) as z:
            config_file = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"].get("configFile")
            text = z.read(config_file).decode() if config_file else ""
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    match = re.search(r"^minWorkers:\s*(\d+)\s*$", text, re.MULTILINE)
    return int(match.group(1)) if match else None
