"""Tests of the training loops: batches, labels, determinism, early stopping, fine-tuning modes, the runtime,
and resuming from checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.data import Splits
from components.core.models import Encoder, EncoderSpec
from components.train.loops import (
    best_epoch,
    epoch_batches,
    finetune_classifier,
    predict_logits,
    pretrain_encoder,
    subsample_labels,
    validate,
)
from components.train.runtime import FAIL_AT_STEP_ENV, InjectedFailure, Runtime, fail_at_step_hook, make_runtime

TINY = EncoderSpec(in_channels=1, image_size=8, width=8, embed_dim=16)  # fast enough for unit tests
QUIET = lambda line: None  # noqa: E731


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
    progress = [line for line in lines if line.startswith("pretrain epoch")]
    assert progress[0].startswith("pretrain epoch 1/3 loss ") and "ETA" in progress[0]  # a line per 5 s, first and last
    assert progress[-1].startswith("pretrain epoch 3/3 loss ") and progress[-1].endswith(" done")


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
    eager = Runtime(torch.device("cpu"), compile=True, compile_backend="eager")  # Dynamo without a C++ toolchain
    enc_a, _ = pretrain_encoder(splits.pool_x, TINY, "masked", 1, 64, 3e-3, 0.2, seed=0, log=QUIET, runtime=eager)
    enc_b, _ = pretrain_encoder(splits.pool_x, TINY, "masked", 1, 64, 3e-3, 0.2, seed=0, log=QUIET)
    assert set(enc_a.state_dict()) == set(enc_b.state_dict())  # no _orig_mod. prefixes
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(enc_a.state_dict().values(), enc_b.state_dict().values()))
    model, _ = finetune_classifier(enc_a, splits, 1, 64, 1e-3, 1, 0.2, 0, QUIET, runtime=eager)
    assert "encoder.project.weight" in model.state_dict()


def test_cpu_runtime_has_no_autocast_and_no_process_group(monkeypatch):
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
    assert fail_at_step_hook(0, {}) is None
    hook = fail_at_step_hook(0, {FAIL_AT_STEP_ENV: "3"})
    hook(2)
    with pytest.raises(InjectedFailure, match="injected failure at step 3"):
        hook(3)
    assert fail_at_step_hook(2, {FAIL_AT_STEP_ENV: "3"}) is None  # a resumed run does not fail again
