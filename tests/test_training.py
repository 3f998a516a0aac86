"""Tests of the training loops, objectives, augmentations and the pretrain/finetune steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import settings_of

from components.core.data import Splits, load_splits
from components.core.models import (
    ENCODER_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    Encoder,
    EncoderSpec,
    load_classifier,
    load_encoder,
)
from components.finetune.finetune import finetune, weights_hash
from components.pretrain.pretrain import pretrain
from components.train.training import (
    AugmentPolicy,
    augment,
    best_epoch,
    epoch_batches,
    finetune_classifier,
    finetune_policy,
    masked_reconstruction_loss,
    nt_xent_loss,
    predict_logits,
    pretrain_encoder,
    pretrain_policy,
    random_patch_mask,
    subsample_labels,
    validate,
)
from pipelines.config import DataConfig, FinetuneConfig, PretrainConfig

TINY = EncoderSpec(in_channels=1, image_size=8, width=8, embed_dim=16)  # fast enough for unit tests
QUIET = lambda line: None  # noqa: E731


# --- objectives --------------------------------------------------------------------------------

def test_nt_xent_is_lower_for_matching_pairs_than_for_random_ones():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 32, generator=g)
    matching = z1 + 0.05 * torch.randn(64, 32, generator=g)
    unrelated = torch.randn(64, 32, generator=g)
    assert nt_xent_loss(z1, matching, 0.2) < 0.2 * nt_xent_loss(z1, unrelated, 0.2)
    # Random pairs are no better than guessing among the 2N - 1 other views.
    assert nt_xent_loss(z1, unrelated, 1.0).item() == pytest.approx(np.log(127), rel=0.1)


def test_nt_xent_with_one_pair_has_only_the_partner_to_pick():
    z = torch.randn(1, 8)
    assert nt_xent_loss(z, torch.randn(1, 8), 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_loss_counts_only_hidden_pixels():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 8, 8, generator=g)
    mask = random_patch_mask(4, 8, patch=2, ratio=0.5, g=g)
    wrong_where_visible = torch.where(mask.bool(), target, target + 1.0)
    assert masked_reconstruction_loss(wrong_where_visible, target, mask).item() == 0.0
    wrong_where_hidden = torch.where(mask.bool(), target + 0.5, target)
    assert masked_reconstruction_loss(wrong_where_hidden, target, mask).item() == pytest.approx(0.25)


def test_patch_mask_hides_the_ratio_in_whole_patches():
    mask = random_patch_mask(16, 8, patch=2, ratio=0.5, g=torch.Generator().manual_seed(1))
    assert mask.shape == (16, 1, 8, 8)
    assert torch.all(mask.mean(dim=(1, 2, 3)) == 0.5)
    blocks = mask.unfold(2, 2, 2).unfold(3, 2, 2)  # [B, 1, 4, 4, 2, 2]
    assert torch.all(blocks.amin(dim=(-1, -2)) == blocks.amax(dim=(-1, -2)))  # every 2x2 patch all or nothing


# --- augmentations ---------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("make_policy", [pretrain_policy, finetune_policy])
def test_augment_keeps_shape_and_range_and_is_seeded(make_policy, channels, size):
    x = torch.rand(32, channels, size, size, generator=torch.Generator().manual_seed(0))
    policy = make_policy(channels)
    out = augment(x, torch.Generator().manual_seed(3), policy)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(3), policy))


def test_digits_are_never_flipped():
    assert pretrain_policy(1).hflip_prob == 0 and finetune_policy(1).hflip_prob == 0
    # Ink only in the left third: after augmentation the ink must still sit on the left.
    x = torch.zeros(256, 1, 8, 8)
    x[:, :, 1:7, 1:3] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), pretrain_policy(1))
    columns = torch.arange(8).float()
    ink = out.sum(dim=(1, 2))  # [B, W]
    centre = (ink * columns).sum(1) / ink.sum(1).clamp(min=1e-6)
    assert torch.all(centre < 3.5)
    with pytest.raises(ValueError, match="flips are not allowed for grayscale"):
        augment(x, torch.Generator(), AugmentPolicy(hflip_prob=0.5))


def test_elastic_distortion_moves_ink_locally_and_is_seeded():
    from components.train.training import elastic_displacement

    field = elastic_displacement(16, 8, torch.Generator().manual_seed(0), alpha=0.1, grid=3)
    assert field.shape == (16, 8, 8, 2)
    assert 0 < field.abs().max() <= 2 * 0.1 * 1.3  # bicubic may overshoot the lattice values a little
    assert (field[:, 1:] - field[:, :-1]).abs().max() < field.abs().max()  # smooth: neighbours move together
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 2:6, 3:5] = 1.0
    policy = AugmentPolicy(elastic_alpha=0.12)
    out = augment(x, torch.Generator().manual_seed(1), policy)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1), policy))
    assert not torch.allclose(out, x) and out.min() >= 0 and out.max() <= 1
    # A distortion, not a wipe-out: the ink stays roughly where and as much as it was.
    ink = out.sum(dim=(1, 2, 3))
    assert torch.all(ink > 0.4 * 8) and abs(ink.mean().item() - 8) < 0.15 * 8
    assert torch.equal(augment(x, torch.Generator().manual_seed(1), AugmentPolicy(elastic_alpha=0.0)), x)


def test_handwriting_views_are_distorted_elastically_and_photos_are_not():
    """The pretraining recipe: digits get elastic + stroke-width views (they lift few-label accuracy)."""
    assert pretrain_policy(1).elastic_alpha > 0 and pretrain_policy(1).stroke_jitter > 0
    assert pretrain_policy(3).elastic_alpha == 0 and pretrain_policy(3).stroke_jitter == 0
    assert finetune_policy(1).elastic_alpha == 0  # fine-tuning keeps its light policy (both benchmark arms)


def test_stroke_jitter_thickens_some_digits_and_thins_others():
    from components.train.training import random_stroke_width

    x = torch.zeros(256, 1, 8, 8)
    x[:, :, 1:7, 3:5] = 1.0  # a 2-pixel-wide bar
    out = random_stroke_width(x, torch.Generator().manual_seed(0), 0.5)
    ink, before = out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3))
    assert (ink > before).any() and (ink < before).any()
    assert out.min() >= 0 and out.max() <= 1
    # At most half-way to full dilation / erosion.
    thick = torch.nn.functional.max_pool2d(x, 3, 1, 1).sum(dim=(1, 2, 3))
    assert torch.all(ink <= before + 0.5 * (thick - before) + 1e-5)


def test_photos_may_be_flipped():
    assert pretrain_policy(3).hflip_prob > 0
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), AugmentPolicy(hflip_prob=0.5))
    flipped = np.array([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    unchanged = np.array([torch.equal(o, i) for o, i in zip(out, x)])
    assert flipped.any() and unchanged.any() and np.all(flipped | unchanged)


# --- batches -----------------------------------------------------------------------------------

def test_batch_order_is_a_function_of_seed_and_epoch_and_ranks_split_the_data():
    one = torch.cat(epoch_batches(100, 10, seed=3, epoch=2))
    assert torch.equal(one, torch.cat(epoch_batches(100, 10, seed=3, epoch=2)))
    assert sorted(one.tolist()) == list(range(100)) and not torch.equal(one, torch.cat(epoch_batches(100, 10, 3, 1)))
    ranks = [epoch_batches(100, 20, seed=3, epoch=2, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert all(len(b) == 10 for rank in ranks for b in rank)  # the global batch of 20 is split in two
    seen = [set(torch.cat(rank).tolist()) for rank in ranks]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100


def test_small_labeled_sets_are_repeated_up_to_min_samples():
    batches = epoch_batches(40, 16, seed=0, epoch=0, min_samples=100)
    order = torch.cat(batches)
    assert len(order) == 120  # three passes over 40 labeled images
    assert all(sorted(order[i:i + 40].tolist()) == list(range(40)) for i in (0, 40, 80))
    assert len(epoch_batches(400, 16, seed=0, epoch=0, min_samples=100)) == 25  # enough already: one pass


# --- labels, failures ------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.1, 0.001])
def test_label_fraction_is_stratified_with_one_per_class(splits, fraction):
    keep = subsample_labels(splits.train_y, fraction, seed=0)
    assert len(np.unique(keep)) == len(keep)
    for cls in range(10):
        available = int(np.sum(splits.train_y == cls))
        assert int(np.sum(splits.train_y[keep] == cls)) == max(1, round(fraction * available))
    assert np.array_equal(keep, subsample_labels(splits.train_y, fraction, seed=0))
    if fraction < 1:
        assert not np.array_equal(keep, subsample_labels(splits.train_y, fraction, seed=1))


@pytest.mark.parametrize("call,message", [
    (lambda s: pretrain_encoder(s.pool_x, TINY, "jigsaw", 1, 32, 1e-3, 0.2, 0, QUIET), "unknown pretraining objective 'jigsaw'"),
    (lambda s: pretrain_encoder(s.pool_x, TINY, "contrastive", 1, 32, 1e-3, 0.0, 0, QUIET), "temperature must be > 0"),
    (lambda s: pretrain_encoder(s.pool_x, TINY, "contrastive", 0, 32, 1e-3, 0.2, 0, QUIET), "epochs must be > 0"),
    (lambda s: pretrain_encoder(s.pool_x[:, :, :4, :4], TINY, "masked", 1, 32, 1e-3, 0.2, 0, QUIET), "do not fit the encoder spec"),
    (lambda s: pretrain_encoder(s.pool_x[:0], TINY, "masked", 1, 32, 1e-3, 0.2, 0, QUIET), "non-empty array"),
    (lambda s: finetune_classifier(Encoder(TINY), s, 1, 32, 1e-3, 2, 0.0, 0, QUIET), r"label_fraction must be in \(0, 1\]"),
    (lambda s: finetune_classifier(Encoder(TINY), s, 1, 32, 1e-3, 2, 1.5, 0, QUIET), r"label_fraction must be in \(0, 1\]"),
    (lambda s: finetune_classifier(Encoder(TINY), s, 1, 32, 1e-3, 0, 1.0, 0, QUIET), "patience must be > 0"),
    (lambda s: finetune_classifier(Encoder(EncoderSpec(3, 8, 8, 16)), s, 1, 32, 1e-3, 2, 1.0, 0, QUIET), "do not fit the encoder"),
])
def test_bad_arguments_fail_with_a_clear_message(splits, call, message):
    with pytest.raises(ValueError, match=message):
        call(splits)


# --- loops -----------------------------------------------------------------------------------

def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("objective", ["contrastive", "masked"])
def test_pretraining_is_deterministic_and_learns(splits, objective):
    images = splits.pool_x
    lines = []
    enc_a, history = pretrain_encoder(images, TINY, objective, 3, 64, 3e-3, 0.2, seed=0, log=lines.append)
    enc_b, _ = pretrain_encoder(images, TINY, objective, 3, 64, 3e-3, 0.2, seed=0, log=QUIET)
    enc_c, _ = pretrain_encoder(images, TINY, objective, 3, 64, 3e-3, 0.2, seed=1, log=QUIET)
    a, b, c = _weights(enc_a), _weights(enc_b), _weights(enc_c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert sum(line.startswith("pretrain epoch") for line in lines) == 3


@pytest.mark.parametrize("objective", ["contrastive", "masked"])
def test_rgb_photos_train_end_to_end(objective):
    rng = np.random.default_rng(0)
    images = rng.random((48, 3, 32, 32), dtype=np.float32)
    labels = np.repeat(np.arange(3), 16)
    photos = Splits(images, labels, images[:6], labels[::8], images[:6], labels[::8], images, ["a", "b", "c"])
    spec = EncoderSpec(in_channels=3, image_size=32, width=8, embed_dim=16)
    encoder, history = pretrain_encoder(photos.unlabeled(), spec, objective, 1, 32, 1e-3, 0.2, seed=0, log=QUIET)
    assert np.isfinite(history[0]["loss"])
    model, _ = finetune_classifier(encoder, photos, 1, 16, 1e-3, 1, 1.0, seed=0, log=QUIET)
    assert predict_logits(model, images[:5]).shape == (5, 3)


def test_finetune_is_deterministic_and_counts_labels(splits):
    encoder = Encoder(TINY)
    model_a, history = finetune_classifier(encoder, splits, 2, 64, 3e-3, 5, 0.2, seed=0, log=QUIET)
    model_b, _ = finetune_classifier(encoder, splits, 2, 64, 3e-3, 5, 0.2, seed=0, log=QUIET)
    a, b = _weights(model_a), _weights(model_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history[0]["n_train"] == len(subsample_labels(splits.train_y, 0.2, 0))
    assert set(history[0]) >= {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}


def test_early_stopping_stops_and_keeps_the_best_weights(splits):
    # A learning rate this large makes the validation loss jump around, so it stops long before 30 epochs.
    torch.manual_seed(0)
    model, history = finetune_classifier(Encoder(TINY), splits, 30, 64, 5.0, 2, 0.3, seed=0, log=QUIET)
    best = best_epoch(history)
    assert len(history) == best["epoch"] + 2 < 30
    val_loss, val_acc = validate(model, torch.from_numpy(splits.val_x), torch.from_numpy(splits.val_y), torch.device("cpu"))
    assert val_loss == pytest.approx(best["val_loss"], rel=1e-5)
    assert val_acc == pytest.approx(best["val_accuracy"])


# --- the pretrain and finetune steps ---------------------------------------------------------

TINY_PRETRAIN = dict(objective="contrastive", epochs=2, batch_size=128, learning_rate=3e-3, temperature=0.2,
                     width=8, embed_dim=16, seed=0)
TINY_FINETUNE = dict(epochs=3, batch_size=64, learning_rate=5e-3, patience=3, label_fraction=0.5, seed=0)


def pretrain_settings(**values):
    """A pretrain step's cfg: seed in the data area, the rest in pretrain."""
    values = dict(values)
    return settings_of(data=DataConfig(seed=values.pop("seed", 0)), pretrain=PretrainConfig(**values))


def finetune_settings(**values):
    values = dict(values)
    return settings_of(data=DataConfig(seed=values.pop("seed", 0)), finetune=FinetuneConfig(**values))


def test_pretrain_then_finetune_write_artifacts_that_load_back(tmp_path, dataset_dir, splits):
    summary = pretrain(dataset_dir, tmp_path / "encoder", **TINY_PRETRAIN, log=QUIET)
    assert {p.name for p in (tmp_path / "encoder").iterdir()} == {ENCODER_FILE, METADATA_FILE}
    encoder, enc_meta = load_encoder(tmp_path / "encoder")
    assert enc_meta["objective"] == "contrastive" and enc_meta["epochs"] == 2 and enc_meta["seed"] == 0
    assert enc_meta["n_images"] == summary["n_images"] == len(splits.pool_x) + len(splits.train_x)
    assert enc_meta["final_loss"] == summary["final_loss"] and np.isfinite(summary["final_loss"])

    result = finetune(dataset_dir, tmp_path / "encoder", tmp_path / "model", **TINY_FINETUNE, log=QUIET)
    assert {p.name for p in (tmp_path / "model").iterdir()} == {WEIGHTS_FILE, METADATA_FILE}
    model, meta = load_classifier(tmp_path / "model")
    assert meta["class_names"] == splits.class_names
    assert meta["model_version"] == result["model_version"] == weights_hash(model.state_dict())
    assert meta["label_counts"] == {str(c): max(1, round(0.5 * int(np.sum(splits.train_y == c)))) for c in range(10)}
    assert meta["n_labeled"] == sum(meta["label_counts"].values())
    assert 1 <= meta["best_epoch"] <= 3 and 0 <= meta["val_accuracy"] <= 1
    assert meta["pretrain"]["objective"] == "contrastive"

    # The artifact predicts exactly what the in-memory model predicts (same seed, same weights).
    from pipelines.config import FinetuneConfig
    same_settings = {k: getattr(FinetuneConfig(), k)
                     for k in ("min_epoch_samples", "probe_epochs", "encoder_lr_scale")}
    in_memory, _ = finetune_classifier(encoder, load_splits(dataset_dir), **TINY_FINETUNE, **same_settings, log=QUIET)
    assert torch.equal(predict_logits(model, splits.test_x).argmax(1), predict_logits(in_memory, splits.test_x).argmax(1))
    assert torch.allclose(predict_logits(model, splits.test_x), predict_logits(in_memory, splits.test_x))


def test_components_log_metrics_into_kfp_artifacts(tmp_path, dataset_dir):
    from kfp import dsl

    from components.finetune.component import finetune_component
    from components.pretrain.component import pretrain_component

    dataset = dsl.Dataset(uri=str(dataset_dir))
    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    pretrain_metrics = dsl.Metrics(uri=str(tmp_path / "pretrain_metrics"))
    pretrain_component(dataset=dataset, encoder=encoder, metrics=pretrain_metrics, cfg=pretrain_settings(**TINY_PRETRAIN))
    assert (tmp_path / "encoder" / ENCODER_FILE).is_file()
    assert {"pretrain_final_loss", "n_images", "cost_wall_seconds"} <= set(pretrain_metrics.metadata)

    model = dsl.Model(uri=str(tmp_path / "model"))
    finetune_metrics = dsl.Metrics(uri=str(tmp_path / "finetune_metrics"))
    finetune_component(dataset=dataset, encoder=encoder, model=model, metrics=finetune_metrics,
                       cfg=finetune_settings(**TINY_FINETUNE))
    meta = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert finetune_metrics.metadata["val_accuracy"] == pytest.approx(meta["val_accuracy"])
    assert finetune_metrics.metadata["n_labeled"] == meta["n_labeled"]
    assert model.metadata["model_version"] == meta["model_version"]

    # The pipeline builds their KFP components at compile time; they must be valid ones.
    from pipelines.pipeline import step_component

    for step in ("pretrain", "finetune"):
        step_component(step)


@pytest.mark.slow
def test_default_config_reaches_the_accuracy_target(tmp_path, dataset_dir, splits):
    """The hard requirement: with the default settings, digits reach >= 0.95 test accuracy."""
    import time

    from pipelines.config import FinetuneConfig, PretrainConfig

    p, f = PretrainConfig(), FinetuneConfig()
    t0 = time.perf_counter()
    pretrain(dataset_dir, tmp_path / "encoder", objective=p.objective, epochs=p.epochs, batch_size=p.batch_size,
             learning_rate=p.learning_rate, temperature=p.temperature, width=p.width, embed_dim=p.embed_dim, seed=0)
    finetune(dataset_dir, tmp_path / "encoder", tmp_path / "model", epochs=f.epochs, batch_size=f.batch_size,
             learning_rate=f.learning_rate, patience=f.patience, label_fraction=f.label_fraction, seed=0)
    seconds = time.perf_counter() - t0
    model, _ = load_classifier(tmp_path / "model")
    accuracy = (predict_logits(model, splits.test_x).argmax(1).numpy() == splits.test_y).mean()
    print(f"default config: test accuracy {accuracy:.4f} in {seconds:.1f}s")
    assert accuracy >= 0.95



# --- encoders ------------------------------------------------------------------------------------

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


# --- fine-tuning modes ---------------------------------------------------------------------------

def _changed(before: dict, module: torch.nn.Module) -> dict[str, bool]:
    return {k: not torch.equal(before[k], v) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_modes_train_exactly_what_they_say(splits, arch):
    spec = EncoderSpec(1, 8, width=8, embed_dim=16, arch=arch, depth=10 if arch == "resnet" else 0)
    torch.manual_seed(0)
    encoder = Encoder(spec)
    before = _weights(encoder)
    in_last_stage = {id(p) for p in encoder.stages()[-1].parameters()}
    last_stage = {n for n, p in encoder.named_parameters() if id(p) in in_last_stage}
    assert last_stage and len(last_stage) < len(before) - 2
    common = dict(epochs=1, batch_size=64, learning_rate=1e-2, patience=1, label_fraction=0.2, seed=0, log=QUIET)

    probe, _ = finetune_classifier(encoder, splits, mode="linear_probe", **common)
    assert not any(_changed(before, probe.encoder).values())

    partial, _ = finetune_classifier(encoder, splits, mode="partial", unfreeze_blocks=1, **common)
    changed = _changed(before, partial.encoder)
    for name, did in changed.items():
        assert did == (name in last_stage or name.startswith("project.")), name

    full, _ = finetune_classifier(encoder, splits, mode="full", **common)
    assert all(_changed(before, full.encoder).values())


def test_probe_epochs_train_the_head_alone_first(splits):
    """Linear probe, then fine-tune: the encoder stays put for probe_epochs, then trains."""
    torch.manual_seed(0)
    encoder = Encoder(TINY)
    start = _weights(encoder)
    seen: dict[int, bool] = {}
    holder = []

    def watch(step: int) -> None:
        seen[step] = not any(_changed(start, holder[0].model.encoder).values())

    def keep(parts):
        holder.append(parts)
        return parts

    _, history = finetune_classifier(encoder, splits, 4, 128, 1e-2, 10, 0.3, 0, QUIET, probe_epochs=2,
                                     encoder_lr_scale=1.0, on_step=watch, customize=keep)
    per_epoch = -(-history[0]["n_train"] // 128)
    assert len(history) == 4 and per_epoch >= 2
    assert [seen[s] for s in sorted(seen)] == [True] * 2 * per_epoch + [False] * 2 * per_epoch


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="lora"), r"unknown fine-tuning mode 'lora'; choose one of \['linear_probe', 'partial', 'full'\]"),
    (dict(mode="partial", unfreeze_blocks=3), "unfreeze_blocks must be between 1 and 2"),
    (dict(encoder_lr_scale=0.0), "encoder_lr_scale must be > 0"),
])
def test_bad_finetune_settings_fail_with_a_clear_message(splits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        finetune_classifier(Encoder(TINY), splits, 1, 64, 1e-3, 1, 0.2, 0, QUIET, **kwargs)


def test_compiled_forward_trains_the_same_weights(splits):
    """torch.compile wraps only the forward; state, checkpoints and results are those of the plain model."""
    from components.train.training import Runtime

    eager = Runtime(torch.device("cpu"), compile=True, compile_backend="eager")  # Dynamo without a C++ toolchain
    enc_a, _ = pretrain_encoder(splits.pool_x, TINY, "masked", 1, 64, 3e-3, 0.2, seed=0, log=QUIET, runtime=eager)
    enc_b, _ = pretrain_encoder(splits.pool_x, TINY, "masked", 1, 64, 3e-3, 0.2, seed=0, log=QUIET)
    assert set(enc_a.state_dict()) == set(enc_b.state_dict())  # no _orig_mod. prefixes
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(enc_a.state_dict().values(), enc_b.state_dict().values()))
    model, _ = finetune_classifier(enc_a, splits, 1, 64, 1e-3, 1, 0.2, 0, QUIET, runtime=eager)
    assert "encoder.project.weight" in model.state_dict()


def test_cpu_runtime_has_no_autocast_and_no_process_group(monkeypatch):
    from components.train.training import make_runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = make_runtime(device="cpu")
    assert (rt.device.type, rt.world_size, rt.is_main, rt.bf16) == ("cpu", 1, True, False)
    with rt.autocast():
        assert not torch.is_autocast_enabled()


# --- checkpoints and resume ----------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(step_to_fail: int):
    def hook(step: int) -> None:
        if step == step_to_fail:
            raise Crash(f"injected at step {step}")
    return hook


def _no_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("objective", ["contrastive", "masked"])
def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, splits, objective):
    from components.core.checkpoint import Checkpointer

    args = (splits.pool_x, TINY, objective, 3, 64, 3e-3, 0.2, 0, QUIET)
    reference, ref_history = pretrain_encoder(*args)
    # 5 batches per epoch: checkpoints at steps 2, 4, 5 (epoch end), 6, 8; the crash at step 7 loses step 7.
    with pytest.raises(Crash):
        pretrain_encoder(*args, checkpointer=Checkpointer(tmp_path, every_steps=2), on_step=crash_at(7))
    resumed = Checkpointer(tmp_path, every_steps=2)
    encoder, history = pretrain_encoder(*args, checkpointer=resumed)
    assert resumed.resumed_from == 6  # mid-epoch
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), encoder.state_dict().values()))
    assert _no_seconds(history) == _no_seconds(ref_history)


def test_interrupted_finetuning_resumes_to_the_same_weights_and_metrics(tmp_path, splits):
    from components.core.checkpoint import Checkpointer

    torch.manual_seed(0)
    encoder = Encoder(TINY)
    args = (encoder, splits, 6, 64, 5e-3, 3, 0.5, 0, QUIET)
    kwargs = dict(mode="partial", probe_epochs=2)  # the encoder joins at epoch 3: resume must restore that too
    reference, ref_history = finetune_classifier(*args, **kwargs)
    # 7 batches per epoch; epoch checkpoints every 2 epochs plus every 5 steps; crash in epoch 4.
    with pytest.raises(Crash):
        finetune_classifier(*args, **kwargs, checkpointer=Checkpointer(tmp_path, every_steps=5, every_epochs=2),
                            on_step=crash_at(26))
    resumed = Checkpointer(tmp_path, every_steps=5, every_epochs=2)
    model, history = finetune_classifier(*args, **kwargs, checkpointer=resumed)
    assert resumed.resumed_from == 25
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))
    assert _no_seconds(history) == _no_seconds(ref_history)


def test_fail_at_step_env_fails_once_and_the_retry_resumes(monkeypatch):
    from components.train.training import FAIL_AT_STEP_ENV, InjectedFailure, fail_at_step_hook

    assert fail_at_step_hook(0, {}) is None
    hook = fail_at_step_hook(0, {FAIL_AT_STEP_ENV: "3"})
    hook(2)
    with pytest.raises(InjectedFailure, match="injected failure at step 3"):
        hook(3)
    assert fail_at_step_hook(2, {FAIL_AT_STEP_ENV: "3"}) is None  # a resumed run does not fail again


def test_retried_components_resume_from_their_checkpoints(tmp_path, dataset_dir, monkeypatch):
    """A KFP retry runs the component again with the same output URIs: it must resume, not restart."""
    from kfp import dsl

    from components.core.checkpoint import step_checkpoint_dir
    from components.finetune.component import finetune_component
    from components.pretrain.component import pretrain_component
    from components.train.training import FAIL_AT_STEP_ENV, InjectedFailure

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR

    dataset = dsl.Dataset(uri=str(dataset_dir))
    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "12")  # epoch 2 of pretraining (9 steps per epoch)
    pretrain_args = dict(TINY_PRETRAIN, epochs=3)
    with pytest.raises(InjectedFailure):
        pretrain_component(dataset=dataset, encoder=encoder, metrics=dsl.Metrics(uri=str(tmp_path / "m0")),
                           cfg=pretrain_settings(**pretrain_args))
    metrics = dsl.Metrics(uri=str(tmp_path / "m1"))
    pretrain_component(dataset=dataset, encoder=encoder, metrics=metrics, cfg=pretrain_settings(**pretrain_args))
    assert metrics.metadata["pretrain_resumed_from_step"] == 9
    assert not (tmp_path / "tmp" / "kfp-mlops-checkpoints" / "pretrain").exists() or \
        not any((tmp_path / "tmp" / "kfp-mlops-checkpoints" / "pretrain").iterdir())  # cleaned up after success
    assert step_checkpoint_dir("pretrain", encoder.uri).startswith(str(tmp_path / "tmp"))

    model = dsl.Model(uri=str(tmp_path / "model"))
    n_labeled = len(subsample_labels(load_splits(dataset_dir).train_y, TINY_FINETUNE["label_fraction"], 0))
    per_epoch = len(epoch_batches(n_labeled, TINY_FINETUNE["batch_size"], 0, 0, min_samples=512))
    monkeypatch.setenv(FAIL_AT_STEP_ENV, str(per_epoch + 2))  # early in epoch 2
    with pytest.raises(InjectedFailure):
        finetune_component(dataset=dataset, encoder=encoder, model=model,
                           metrics=dsl.Metrics(uri=str(tmp_path / "m2")),
                           cfg=finetune_settings(**TINY_FINETUNE, min_epoch_samples=512))
    metrics = dsl.Metrics(uri=str(tmp_path / "m3"))
    finetune_component(dataset=dataset, encoder=encoder, model=model, metrics=metrics,
                       cfg=finetune_settings(**TINY_FINETUNE, min_epoch_samples=512))
    assert metrics.metadata["finetune_resumed_from_step"] == per_epoch  # the checkpoint at the end of epoch 1


# --- DDP through torchrun (gloo on CPU) ----------------------------------------------------------

def test_torchrun_with_two_processes_writes_one_encoder(tmp_path, dataset_dir):
    lines = []
    summary = pretrain(dataset_dir, tmp_path / "encoder", **dict(TINY_PRETRAIN, epochs=1), log=lines.append,
                       nproc_per_node=2)
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [ENCODER_FILE, METADATA_FILE]
    meta = json.loads((tmp_path / "encoder" / METADATA_FILE).read_text())
    assert meta["world_size"] == summary["world_size"] == 2 and meta["device"] == "cpu"
    assert any("2 processes (DDP)" in line for line in lines)
    hashes = next(line for line in lines if line.startswith("rank weight hashes:")).split(":")[1].split()
    assert len(hashes) == 2 and hashes[0] == hashes[1] == meta["weights_sha256"][:16]  # ranks stayed in sync
    assert load_encoder(tmp_path / "encoder")[0].spec.width == 8


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_to_the_same_weights(tmp_path, dataset_dir, monkeypatch):
    """torchrun with 2 ranks crashes at step 5, the rerun resumes from step 4 and matches an uninterrupted run."""
    from components.train.training import FAIL_AT_STEP_ENV

    args = dict(TINY_PRETRAIN, epochs=2, batch_size=256)  # 4 steps per epoch
    reference = pretrain(dataset_dir, tmp_path / "reference", **args, log=QUIET, nproc_per_node=2)
    ckpt = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_every_steps=2, checkpoint_every_epochs=0)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    with pytest.raises(RuntimeError, match="torchrun pretraining with 2 processes failed"):
        pretrain(dataset_dir, tmp_path / "encoder", **args, log=QUIET, nproc_per_node=2, **ckpt)
    assert not (tmp_path / "encoder" / ENCODER_FILE).exists()
    resumed = pretrain(dataset_dir, tmp_path / "encoder", **args, log=QUIET, nproc_per_node=2, **ckpt)
    assert resumed["resumed_from_step"] == 4
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["final_loss"] == reference["final_loss"]


GATHER_CHECK = '''
import torch, torch.distributed as dist
from components.train.training import gather_with_grad, nt_xent_loss
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
z1_all, z2_all = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
rows = slice(rank * 4, (rank + 1) * 4)
z1, z2 = z1_all[rows].clone().requires_grad_(), z2_all[rows].clone().requires_grad_()
nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), 0.3).backward()
ref1, ref2 = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
nt_xent_loss(ref1, ref2, 0.3).backward()
# Every rank computes the global loss: its gradient is world x the single-process one; DDP's mean undoes that.
assert torch.allclose(z1.grad / world, ref1.grad[rows], atol=1e-6), (z1.grad / world, ref1.grad[rows])
assert torch.allclose(z2.grad / world, ref2.grad[rows], atol=1e-6)
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
'''


def test_contrastive_negatives_span_ranks_with_exact_gradients(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "gather_check.py"
    script.write_text(GATHER_CHECK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout


def test_the_command_line_trains_from_local_paths(tmp_path, dataset_dir, capsys):
    from components.pretrain.pretrain import main

    code = main(["--dataset", str(dataset_dir), "--out", str(tmp_path / "enc"), "--epochs", "1", "--batch-size",
                 "128", "--width", "8", "--embed-dim", "16", "--arch", "vgg", "--depth", "11",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--nproc-per-node", "1"])
    assert code == 0
    encoder, meta = load_encoder(tmp_path / "enc")
    assert (encoder.spec.arch, encoder.spec.depth, meta["depth"]) == ("vgg", 11, 11)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pretrain_summary"]["world_size"] == 1
    assert (tmp_path / "ckpt" / "latest.json").is_file()


# --- several nodes: the TrainJob branch of the pretrain component --------------------------------

class SimulatedTrainer:
    """Stands in for CustomObjectsApi and the Trainer controller.

    create: records the TrainJob and runs its node command in this process (one node, one rank),
    reading the dataset from and writing the encoder to S3 exactly as a node would;
    get: returns the object with the Complete condition the controller sets.
    """

    def __init__(self):
        self.created: dict | None = None

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        from components.pretrain.pretrain import main

        self.created = json.loads(json.dumps(body))
        trainer = body["spec"]["trainer"]
        assert trainer["command"] == ["torchrun", "--module", "components.pretrain.pretrain"]
        assert main(trainer["args"] + ["--nproc-per-node", "1"]) == 0
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        assert self.created is not None and name == self.created["metadata"]["name"]
        return {**self.created, "status": {"conditions": [
            {"type": "Complete", "status": "True", "reason": "AllJobsCompleted", "message": "jobset completed"}]}}


@pytest.fixture(scope="module")
def moto_server():
    from s3server import MotoServer

    with MotoServer() as server:
        yield server


def test_multinode_pretraining_runs_a_trainjob_through_the_exchange(tmp_path, dataset_dir, moto_server, monkeypatch):
    from kfp import dsl
    from s3server import s3_env

    import components.train.trainjob as trainjob
    from components.core.storage import Storage, list_uris
    from components.pretrain.component import pretrain_component

    for name, value in s3_env(moto_server.endpoint).items():
        monkeypatch.setenv(name, value)
    Storage().client.create_bucket(Bucket="exchange")
    fake = SimulatedTrainer()
    monkeypatch.setattr(trainjob, "load_custom_objects_api", lambda: fake)
    monkeypatch.setenv("POD_NAMESPACE", "team-a")

    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    metrics = dsl.Metrics(uri=str(tmp_path / "metrics"))
    pretrain_component(dataset=dsl.Dataset(uri=str(dataset_dir)), encoder=encoder, metrics=metrics,
                       cfg=pretrain_settings(**dict(TINY_PRETRAIN, epochs=1), num_nodes=3, gpus_per_node=2,
                                             exchange_uri="s3://exchange/x"),
                       trainjob_image="registry.example/kfp-mlops:1.2-cuda", trainjob_s3_key_source="s3-keys")

    job = fake.created
    trainer = job["spec"]["trainer"]
    assert job["metadata"]["namespace"] == "team-a"
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 2, "registry.example/kfp-mlops:1.2-cuda")
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
    args = trainer["args"]
    flag = lambda name: args[args.index(name) + 1]  # noqa: E731
    assert flag("--dataset").startswith("s3://exchange/x/pretrain/") and flag("--out").endswith("/encoder")
    assert flag("--checkpoint-dir").endswith("/checkpoints") and flag("--width") == "8"
    assert {"name": "S3_ENDPOINT_URL", "value": moto_server.endpoint} in trainer["env"]
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "s3-keys" for e in trainer["env"])
    assert any(u.endswith("/dataset/train_x.npy") or "/dataset/" in u for u in list_uris(flag("--dataset")))
    # The encoder the "node" uploaded came back into the step's output artifact.
    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == [ENCODER_FILE, METADATA_FILE]
    assert metrics.metadata["pretrain_final_loss"] == load_encoder(tmp_path / "encoder")[1]["final_loss"]


def test_multinode_without_an_exchange_says_what_to_configure(tmp_path, dataset_dir, monkeypatch):
    from kfp import dsl

    from components.pretrain.component import pretrain_component

    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    with pytest.raises(ValueError, match=r"pretrain.num_nodes=2 needs pretrain.exchange_uri: an s3:// prefix"):
        pretrain_component(dataset=dsl.Dataset(uri=str(dataset_dir)), encoder=dsl.Model(uri=str(tmp_path / "e")),
                           metrics=dsl.Metrics(uri=str(tmp_path / "m")),
                           cfg=pretrain_settings(**TINY_PRETRAIN, num_nodes=2), trainjob_image="img")
