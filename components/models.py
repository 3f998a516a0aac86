"""Models shared by pretrain, finetune, evaluate, the audits and the serving handler.

Plain PyTorch (no torchvision): a small CNN encoder that works on 8x8 digits and
on 32x32 RGB images, and a classifier = encoder + linear head. Weights are
stored as safetensors with a JSON metadata file beside them, written
atomically, and never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
METADATA_FILE = "metadata.json"


@dataclass
class EncoderSpec:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    image_size: int = 8  # square input side in pixels
    width: int = 32  # channels of the first block; the second block doubles it
    embed_dim: int = 128  # size of the embedding the head and the monitor see


class Encoder(nn.Module):
    """Two conv blocks, global average pooling, a linear projection to ``embed_dim``.

    Global pooling makes the same weights work at any input size, so 8x8 digits
    and 32x32 photos share one architecture (only the stride pattern differs).
    """

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        w = spec.width
        # Pool once for small inputs, twice for larger ones, so 8x8 keeps 4x4 spatial detail.
        pools = 1 if spec.image_size <= 16 else 2
        layers: list[nn.Module] = [
            nn.Conv2d(spec.in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.GELU(),
        ]
        if pools == 2:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.project = nn.Linear(2 * w, spec.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.project(h.mean(dim=(2, 3)))


class Classifier(nn.Module):
    def __init__(self, spec: EncoderSpec, num_classes: int):
        super().__init__()
        self.encoder = Encoder(spec)
        self.head = nn.Linear(spec.embed_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_classifier(metadata: dict[str, Any]) -> Classifier:
    """Rebuild an untrained classifier from the ``metadata.json`` of a model artifact."""
    spec = EncoderSpec(**metadata["encoder"])
    return Classifier(spec, num_classes=len(metadata["class_names"]))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_encoder(encoder: Encoder, out_dir: str | Path, metadata: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(encoder.state_dict(), out / ENCODER_FILE)
    atomic_write_json(out / METADATA_FILE, {**metadata, "encoder": asdict(encoder.spec)})


def load_encoder(model_dir: str | Path) -> tuple[Encoder, dict[str, Any]]:
    d = Path(model_dir)
    meta = json.loads((d / METADATA_FILE).read_text())
    enc = Encoder(EncoderSpec(**meta["encoder"]))
    enc.load_state_dict(load_file(str(d / ENCODER_FILE)))
    return enc, meta


def save_classifier(model: Classifier, out_dir: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``metadata.json`` (must hold ``class_names``)."""
    if "class_names" not in metadata:
        raise ValueError("classifier metadata needs 'class_names'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), out / WEIGHTS_FILE)
    atomic_write_json(out / METADATA_FILE, {**metadata, "encoder": asdict(model.encoder.spec)})


def load_classifier(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Load a classifier artifact in eval mode. Safetensors only: nothing is unpickled."""
    d = Path(model_dir)
    meta_path, weights = d / METADATA_FILE, d / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{d} is not a model artifact: expected {WEIGHTS_FILE} and {METADATA_FILE}")
    meta = json.loads(meta_path.read_text())
    model = build_classifier(meta)
    model.load_state_dict(load_file(str(weights), device=str(device)))
    return model.to(device).eval(), meta
