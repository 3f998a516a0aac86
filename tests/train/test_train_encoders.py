"""Tests of the encoder families the loops train (cnn, resnet, vgg) and of loading older artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from components.core.models import METADATA_FILE, Encoder, EncoderSpec, load_classifier

TINY = EncoderSpec(in_channels=1, image_size=8, width=8, embed_dim=16)


ARCH_CASES = [("cnn", 0), ("resnet", 10), ("resnet", 18), ("vgg", 11), ("vgg", 16)]


@pytest.mark.parametrize("arch,depth", ARCH_CASES)
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
def test_every_encoder_family_embeds_digits_and_photos(arch, depth, channels, size):
    from components.core.models import Classifier

    spec = EncoderSpec(channels, size, width=8, embed_dim=16, arch=arch, depth=depth)
    model = Classifier(spec, num_classes=3)
    x = torch.rand(2, channels, size, size)
    assert model.embed(x).shape == (2, 16) and model(x).shape == (2, 3)
    model(x).sum().backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())
    # GroupNorm only: no batch statistics (contrastive views cannot leak, DDP and DP-SGD need no special casing).
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_depth_sets_the_layer_count():
    def convs(spec):
        return sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in Encoder(spec).modules())

    assert convs(EncoderSpec(width=8, arch="vgg", depth=16)) == 13  # VGG16: 13 convs (+ 3 dense in the original)
    assert convs(EncoderSpec(width=8, arch="vgg")) == 13  # 16 is the default
    assert convs(EncoderSpec(width=8, arch="resnet", depth=18)) == 1 + 2 * 8  # stem + 8 basic blocks
    assert convs(EncoderSpec(width=8, arch="resnet", depth=34)) == 1 + 2 * 16
    assert len(Encoder(EncoderSpec(width=8, arch="resnet")).stages()) == 4
    assert len(Encoder(EncoderSpec(width=8, arch="vgg")).stages()) == 5


def test_old_cnn_artifacts_still_load(tmp_path):
    """The walking skeleton's metadata has no arch/depth and its weights use the original module names."""
    skeleton_keys = {"features.0.weight", "features.1.weight", "features.3.weight", "features.7.weight",
                     "features.10.weight", "features.11.bias", "project.weight", "project.bias"}
    encoder = Encoder(EncoderSpec.from_dict({"in_channels": 1, "image_size": 8, "width": 8, "embed_dim": 16}))
    assert encoder.spec.arch == "cnn" and skeleton_keys <= set(encoder.state_dict())
    from components.core.models import Classifier, save_classifier

    save_classifier(Classifier(TINY, 10), tmp_path, {"class_names": [str(d) for d in range(10)]})
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    meta["encoder"] = {k: meta["encoder"][k] for k in ("in_channels", "image_size", "width", "embed_dim")}
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    model, _ = load_classifier(tmp_path)
    assert model.encoder.spec == TINY


@pytest.mark.parametrize("make, message", [
    (lambda: EncoderSpec(arch="alexnet"), r"arch 'alexnet' is unknown; choose one of \['cnn', 'resnet', 'vgg'\]"),
    (lambda: EncoderSpec(arch="resnet", depth=16), r"depth 16 is not a resnet depth; choose one of \[10, 18, 34\]"),
    (lambda: EncoderSpec(arch="vgg", depth=18), r"depth 18 is not a vgg depth"),
    (lambda: EncoderSpec(width=0), "width must be >= 1"),
    (lambda: EncoderSpec.from_dict({"in_channels": 1, "dropout": 0.1}), r"unknown field\(s\) \['dropout'\]"),
])
def test_bad_encoder_specs_fail_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()
