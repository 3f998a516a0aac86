"""Models shared by pretrain, finetune, evaluate, the audits and the serving handler.

Plain PyTorch (no torchvision). Three encoder families, sized by ``EncoderSpec``:

* ``cnn``: the small 4-conv CNN (the digits default: fast);
* ``resnet``: basic residual blocks in four stages (ResNet-10/18/34 layouts);
* ``vgg``: VGG-style stacks of 3x3 convs in five stages (VGG-11/13/16/19 layouts;
  the seed's example is VGG16), channels scaled by ``width``.

Every family ends in global average pooling and a linear projection to
``embed_dim``, so one set of weights works at any input size; stages only
downsample while the feature map is at least 4 pixels wide, so 8x8 digits and
32x32 photos both work. Normalisation is GroupNorm throughout: no batch
statistics, so contrastive views cannot leak through them, DDP needs no
SyncBatchNorm, and per-sample-gradient DP-SGD (Opacus) accepts the model.

A classifier is an encoder plus a linear head. Weights are stored as
safetensors with a JSON metadata file beside them, written atomically, and
never unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.core.localfiles import atomic_write_file, atomic_write_json

WEIGHTS_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
METADATA_FILE = "metadata.json"


ARCHS = ("cnn", "resnet", "vgg")
# Blocks per stage. ResNet: basic blocks in 4 stages (width x 1, 2, 4, 8 channels).
RESNET_LAYOUTS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# VGG: 3x3 convs per stage in 5 stages (width x 1, 2, 4, 8, 8 channels); VGG16 = 13 convs + 3 dense layers
# in the original, here 13 convs + the projection (the classifier head is separate).
VGG_LAYOUTS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
DEFAULT_DEPTH = {"cnn": 4, "resnet": 18, "vgg": 16}
VALID_DEPTHS = {"cnn": (4,), "resnet": tuple(RESNET_LAYOUTS), "vgg": tuple(VGG_LAYOUTS)}


@dataclass
class EncoderSpec:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    image_size: int = 8  # square input side in pixels
    width: int = 32  # channels of the first stage; later stages double it
    embed_dim: int = 128  # size of the embedding the head and the monitor see
    arch: str = "cnn"  # one of ARCHS
    depth: int = 0  # layers of the family (resnet 10/18/34, vgg 11/13/16/19); 0 = the family's default

    def __post_init__(self):
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch {self.arch!r} is unknown; choose one of {list(ARCHS)}")
        elif self.depth and self.depth not in VALID_DEPTHS[self.arch]:
            problems.append(f"depth {self.depth} is not a {self.arch} depth; choose one of "
                            f"{list(VALID_DEPTHS[self.arch])} or 0 for the default")
        for name in ("in_channels", "image_size", "width", "embed_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid encoder spec: " + "; ".join(problems))

    @property
    def resolved_depth(self) -> int:
        return self.depth or DEFAULT_DEPTH[self.arch]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderSpec":
        """The spec stored in a ``metadata.json``; fields it lacks (older artifacts) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"encoder metadata has unknown field(s) {sorted(unknown)}; it was written by a newer "
                             f"version of kfp-mlops (known: {sorted(known)})")
        return cls(**values)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs and a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        nn.init.zeros_(self.norm2.weight)  # each block starts as the identity: deep stacks train from step one
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def _stage_strides(image_size: int, stages: int) -> list[int]:
    """Halve the feature map at the start of every stage but the first, while it is at least 4 pixels wide."""
    strides, size = [], image_size
    for i in range(stages):
        down = i > 0 and size >= 4
        strides.append(2 if down else 1)
        size = size // 2 if down else size
    return strides


def _resnet_stages(spec: EncoderSpec) -> tuple[list[nn.Module], int]:
    layout = RESNET_LAYOUTS[spec.resolved_depth]
    widths = [spec.width * m for m in (1, 2, 4, 8)]
    stem = nn.Sequential(nn.Conv2d(spec.in_channels, widths[0], 3, padding=1, bias=False), _norm(widths[0]), nn.ReLU())
    stages: list[nn.Module] = []
    c_in = widths[0]
    for i, (blocks, c_out, stride) in enumerate(zip(layout, widths, _stage_strides(spec.image_size, 4))):
        layers: list[nn.Module] = [stem] if i == 0 else []
        for b in range(blocks):
            layers.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
            c_in = c_out
        stages.append(nn.Sequential(*layers))
    return stages, c_in


def _vgg_stages(spec: EncoderSpec) -> tuple[list[nn.Module], int]:
    layout = VGG_LAYOUTS[spec.resolved_depth]
    widths = [spec.width * m for m in (1, 2, 4, 8, 8)]
    stages: list[nn.Module] = []
    c_in = spec.in_channels
    for convs, c_out, stride in zip(layout, widths, _stage_strides(spec.image_size, 5)):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if stride == 2 else []
        for _ in range(convs):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.ReLU()]
            c_in = c_out
        stages.append(nn.Sequential(*layers))
    return stages, c_in


class Encoder(nn.Module):
    """Conv stages (``features``), global average pooling, a linear projection to ``embed_dim``.

    Global pooling makes the same weights work at any input size, so 8x8 digits
    and 32x32 photos share one architecture (only the stride pattern differs).
    """

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        if spec.arch == "cnn":
            channels = self._build_cnn(spec)
        else:
            stages, channels = _resnet_stages(spec) if spec.arch == "resnet" else _vgg_stages(spec)
            self.features = nn.Sequential(*stages)
        self.project = nn.Linear(channels, spec.embed_dim)

    def _build_cnn(self, spec: EncoderSpec) -> int:
        # The walking skeleton's layout, kept module for module so its artifacts still load.
        w = spec.width
        # Pool once for small inputs, twice for larger ones, so 8x8 keeps 4x4 spatial detail.
        pools = 1 if spec.image_size <= 16 else 2
        layers: list[nn.Module] = [
            nn.Conv2d(spec.in_channels, w, 3, padding=1), _norm(w), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1), _norm(w), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), _norm(2 * w), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), _norm(2 * w), nn.GELU(),
        ]
        if pools == 2:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        return 2 * w

    def stages(self) -> list[nn.Module]:
        """The conv stages, input to output (what partial fine-tuning unfreezes from the end)."""
        if self.spec.arch == "cnn":
            return [self.features[:7], self.features[7:]]  # slices share the modules (and parameters)
        return list(self.features)

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
    spec = EncoderSpec.from_dict(metadata["encoder"])
    return Classifier(spec, num_classes=len(metadata["class_names"]))


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes of the weights: same weights, same hash."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.dtype == torch.bfloat16
                      else tensor.numpy().tobytes())
    return digest.hexdigest()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def save_encoder(encoder: Encoder, out_dir: str | Path, metadata: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(encoder.state_dict(), out / ENCODER_FILE)
    atomic_write_json(out / METADATA_FILE, {**metadata, "encoder": asdict(encoder.spec)})


def load_encoder(model_dir: str | Path) -> tuple[Encoder, dict[str, Any]]:
    d = Path(model_dir)
    meta = json.loads((d / METADATA_FILE).read_text())
    enc = Encoder(EncoderSpec.from_dict(meta["encoder"]))
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
