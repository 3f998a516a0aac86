"""Pack a model artifact directory into a TorchServe model archive (.mar)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.models import METADATA_FILE, WEIGHTS_FILE

HANDLER_FILE = Path(__file__).with_name("handler.py")


def build_mar(model_dir: str | Path, export_dir: str | Path, model_name: str, version: str) -> Path:
    """Run torch-model-archiver on ``model_dir`` (model.safetensors + metadata.json); return the .mar path.

    The archiver of this Python environment is used (``python -m``), not
    whatever ``torch-model-archiver`` is first on PATH.
    """
    model_dir, export_dir = Path(model_dir).resolve(), Path(export_dir).resolve()
    weights, metadata = model_dir / WEIGHTS_FILE, model_dir / METADATA_FILE
    missing = [p.name for p in (weights, metadata) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a classifier artifact: {', '.join(missing)} missing (run finetune first)")
    if not model_name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"model name {model_name!r} must be letters, digits, '-' or '_' (it becomes part of the URL)")
    export_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "model_archiver.model_packaging",
        "--model-name", model_name,
        "--version", str(version),
        "--serialized-file", str(weights),
        "--extra-files", str(metadata),
        "--handler", str(HANDLER_FILE),
        "--export-path", str(export_dir),
        "--force",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    mar = export_dir / f"{model_name}.mar"
    if result.returncode != 0 or not mar.is_file():
        raise RuntimeError(
            f"torch-model-archiver failed (exit {result.returncode}) for {model_dir}:\n{(result.stderr or result.stdout)[-2000:]}"
        )
    return mar
