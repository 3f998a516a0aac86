"""Tests of the training loops, objectives, augmentations and the pretrain/finetune steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from components.data import Splits, load_splits, save_splits
from components.finetune import finetune, weights_hash
from components.models import ENCODER_FILE, METADATA_FILE, WEIGHTS_FILE, Encoder, EncoderSpec, load_classifier, load_encoder
from components.pretrain import pretrain
from components.training import (
    AugmentPolicy,
    augment,
    best_epoch,
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

TINY = EncoderSpec(in_channels=1, image_size=8, width=8, embed_dim=16)  # fast enough for unit tests
QUIET = lambda line: None  # noqa: E731


def digits_splits(seed: int = 0, test: float = 0.2, val: float = 0.15, pool: float = 0.2) -> Splits:
    """The digits split the way ingest makes it (shuffled, stratified), without depending on ingest."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    n = len(y)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=round(test * n), stratify=y, random_state=seed)
    rest_x, val_x, rest_y, val_y = train_test_split(rest_x, rest_y, test_size=round(val * n), stratify=rest_y, random_state=seed)
    train_x, pool_x, train_y, _ = train_test_split(rest_x, rest_y, test_size=round(pool * n), stratify=rest_y, random_state=seed)
    return Splits(train_x, train_y, val_x, val_y, test_x, test_y, pool_x, [str(d) for d in range(10)])


@pytest.fixture(scope="module")
def splits() -> Splits:
    return digits_splits()


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("digits")
    save_splits(splits, out)
    return out


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


def test_photos_may_be_flipped():
    assert pretrain_policy(3).hflip_prob > 0
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(0), AugmentPolicy(hflip_prob=0.5))
    flipped = np.array([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    unchanged = np.array([torch.equal(o, i) for o, i in zip(out, x)])
    assert flipped.any() and unchanged.any() and np.all(flipped | unchanged)


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
    # A learning rate this large makes the validation loss blow up after the first epochs.
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
    in_memory, _ = finetune_classifier(encoder, load_splits(dataset_dir), **TINY_FINETUNE, log=QUIET)
    assert torch.equal(predict_logits(model, splits.test_x).argmax(1), predict_logits(in_memory, splits.test_x).argmax(1))
    assert torch.allclose(predict_logits(model, splits.test_x), predict_logits(in_memory, splits.test_x))


def test_components_log_metrics_into_kfp_artifacts(tmp_path, dataset_dir):
    from kfp import dsl

    from components.finetune import finetune_component
    from components.pretrain import pretrain_component

    dataset = dsl.Dataset(uri=str(dataset_dir))
    encoder = dsl.Model(uri=str(tmp_path / "encoder"))
    pretrain_metrics = dsl.Metrics(uri=str(tmp_path / "pretrain_metrics"))
    pretrain_component(dataset=dataset, encoder=encoder, metrics=pretrain_metrics, **TINY_PRETRAIN)
    assert (tmp_path / "encoder" / ENCODER_FILE).is_file()
    assert {"pretrain_final_loss", "n_images", "cost_wall_seconds"} <= set(pretrain_metrics.metadata)

    model = dsl.Model(uri=str(tmp_path / "model"))
    finetune_metrics = dsl.Metrics(uri=str(tmp_path / "finetune_metrics"))
    finetune_component(dataset=dataset, encoder=encoder, model=model, metrics=finetune_metrics, **TINY_FINETUNE)
    meta = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert finetune_metrics.metadata["val_accuracy"] == pytest.approx(meta["val_accuracy"])
    assert finetune_metrics.metadata["n_labeled"] == meta["n_labeled"]
    assert model.metadata["model_version"] == meta["model_version"]

    # The pipeline decorates them at compile time; they must be valid KFP components.
    for func in (pretrain_component, finetune_component):
        dsl.component(func, base_image="python:3.11", install_kfp_package=False)


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

