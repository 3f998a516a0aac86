"""Checkpoints: exact round trips without pickle, atomic writes, verification, pruning, mirrors."""

import json
import math
import random

import numpy as np
import pytest
import torch

from components.core import checkpoint as ckpt_module
from components.core.checkpoint import (
    POINTER,
    Checkpointer,
    CheckpointError,
    flatten,
    load_checkpoint,
    save_checkpoint,
    unflatten,
)


def assert_same(a, b, path="root"):
    """Deep equality that also checks types (a tuple must come back a tuple, an int key an int)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{path}: key {k!r}"
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n, g):
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_every_kind_of_state_comes_back_exactly_with_its_types():
    tree = {
        "weights": {"a": torch.randn(3, 2), "bf16": torch.randn(4).to(torch.bfloat16), "step": torch.tensor(7.0),
                    "ints": torch.arange(5)},
        "numpy_rng": np.random.get_state(),  # ('MT19937', uint32[624], int, int, float)
        "python_rng": random.getstate(),  # (3, tuple of 625 ints, None)
        "torch_rng": torch.get_rng_state(),
        "int_keys": {0: {"exp_avg": torch.ones(2)}, 1: {"exp_avg": torch.zeros(2)}},
        "floats": [math.inf, -math.inf, float("nan"), 0.1 + 0.2, 1e-310],
        "scalars": (np.float64(0.5), np.int32(3), None, True, "text"),
        "nested": [[{"betas": (0.9, 0.999)}]],
        "tricky_key": {"__tensor__": "not a marker"},
    }
    skeleton, tensors = flatten(tree)
    json.dumps(skeleton, allow_nan=False)  # strict JSON: non-finite floats are encoded
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert_same(unflatten(json.loads(json.dumps(skeleton)), tensors), tree)


def test_objects_that_would_need_pickle_are_refused():
    with pytest.raises(TypeError, match=r"cannot checkpoint a object at /opt/x: .*no pickling"):
        flatten({"opt": {"x": object()}})


def test_optimizer_scheduler_and_rng_resume_exactly(tmp_path):
    """Save mid-training, restore into fresh objects, continue: bit-identical to never stopping."""
    model, optimizer, scheduler = model_and_optimizer()
    g = torch.Generator().manual_seed(1)
    train_steps(model, optimizer, scheduler, 5, g)
    tree = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "g": g.get_state()}
    save_checkpoint(tmp_path, tree, step=5, epoch=0)
    train_steps(model, optimizer, scheduler, 5, g)

    model2, optimizer2, scheduler2 = model_and_optimizer(seed=99)  # different weights on purpose
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 5 and loaded.metadata["epoch"] == 0
    model2.load_state_dict(loaded.tree["model"])
    optimizer2.load_state_dict(loaded.tree["optimizer"])
    scheduler2.load_state_dict(loaded.tree["scheduler"])
    g2 = torch.Generator()
    g2.set_state(loaded.tree["g"])
    train_steps(model2, optimizer2, scheduler2, 5, g2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_files_are_json_and_safetensors_only(tmp_path):
    save_checkpoint(tmp_path, {"w": torch.ones(2), "n": 3}, step=1, epoch=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER, "step-00000001.json", "step-00000001.safetensors"]
    doc = json.loads((tmp_path / "step-00000001.json").read_text())
    assert doc["state"] == {"w": {"__tensor__": "/w"}, "n": 3}
    assert doc["metadata"]["tensor_count"] == 1 and len(doc["metadata"]["tensor_sha256"]) == 64


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, {"step": torch.tensor(step)}, step=step, epoch=0, keep=2)
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    assert names == ["step-00000006.json", "step-00000006.safetensors", "step-00000008.json", "step-00000008.safetensors"]
    assert load_checkpoint(tmp_path).tree["step"].item() == 8


def test_no_checkpoint_yet_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "missing") is None
    assert Checkpointer(tmp_path).restore() is None


@pytest.mark.parametrize("failing_write", ["tensors", "json", "pointer"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failing_write):
    save_checkpoint(tmp_path, {"w": torch.zeros(3)}, step=1, epoch=0)
    real_replace = ckpt_module.os.replace

    def crash_on(src, dst):
        target = {"tensors": ".safetensors", "json": "step-00000002.json", "pointer": POINTER}[failing_write]
        if str(dst).endswith(target):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", crash_on)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, {"w": torch.ones(3)}, step=2, epoch=0)
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded.step == 1 and torch.equal(loaded.tree["w"], torch.zeros(3))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def _corrupt_tensors(d):
    f = d / "step-00000001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _edit_json(d, change):
    f = d / "step-00000001.json"
    doc = json.loads(f.read_text())
    change(doc)
    f.write_text(json.dumps(doc))


@pytest.mark.parametrize("damage, message", [
    (_corrupt_tensors, "do not match their sha256"),
    (lambda d: (d / "step-00000001.safetensors").unlink(), "are missing or do not match"),
    (lambda d: (d / "step-00000001.json").unlink(), "unreadable or names a missing file"),
    (lambda d: (d / POINTER).write_text("{not json"), "unreadable or names a missing file"),
    (lambda d: _edit_json(d, lambda doc: doc["metadata"].update(format="other/v9")), "is not a kfp-mlops/checkpoint-v1"),
], ids=["flipped-bit", "missing-tensors", "missing-json", "bad-pointer", "wrong-format"])
def test_damaged_checkpoints_are_refused_with_a_clear_message(tmp_path, damage, message):
    save_checkpoint(tmp_path, {"w": torch.arange(10.0)}, step=1, epoch=0)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    Checkpointer(tmp_path, fingerprint={"epochs": 5, "lr": 0.1, "seed": 0}).save({"w": torch.ones(1)}, 3, 1)
    with pytest.raises(CheckpointError, match=r"belongs to a different run: epochs, lr differ"):
        Checkpointer(tmp_path, fingerprint={"epochs": 9, "lr": 0.2, "seed": 0}).restore()
    same = Checkpointer(tmp_path, fingerprint={"epochs": 5, "lr": 0.1, "seed": 0})
    assert same.restore().step == 3 and same.resumed_from == 3


@pytest.mark.parametrize("every_steps, every_epochs, step, epoch, epoch_end, due", [
    (0, 1, 7, 1, True, True),
    (0, 1, 7, 1, False, False),
    (0, 2, 7, 1, True, False),
    (0, 2, 14, 2, True, True),
    (5, 0, 10, 1, False, True),
    (5, 0, 11, 1, True, False),
    (5, 1, 11, 1, True, True),
    (0, 0, 10, 1, True, False),
])
def test_when_a_checkpoint_is_due(tmp_path, every_steps, every_epochs, step, epoch, epoch_end, due):
    assert Checkpointer(tmp_path, every_steps=every_steps, every_epochs=every_epochs).due(step, epoch, epoch_end) is due


def test_non_writers_never_write(tmp_path):
    Checkpointer(tmp_path, writer=False).save({"w": torch.ones(1)}, 1, 0)
    assert not tmp_path.joinpath(POINTER).exists()


def test_a_fresh_pod_restores_from_the_mirror_which_keeps_two_slots(tmp_path):
    mirror = str(tmp_path / "mirror")  # a local directory stands in for s3:// (same storage API)
    writer = Checkpointer(tmp_path / "pod1", every_steps=1, mirror_uri=mirror, fingerprint={"run": 1})
    for step in (1, 2, 3):
        writer.save({"w": torch.full((2,), float(step))}, step, 0)
    assert sorted(p.name for p in (tmp_path / "mirror").iterdir()) == [
        POINTER, "slot-0.json", "slot-0.safetensors", "slot-1.json", "slot-1.safetensors"]

    fresh, lines = Checkpointer(tmp_path / "pod2", mirror_uri=mirror, fingerprint={"run": 1}, log=None), []
    fresh.log = lines.append
    restored = fresh.restore()
    assert restored.step == 3 and torch.equal(restored.tree["w"], torch.full((2,), 3.0))
    assert lines == [f"checkpoint: pulled step-00000003 from {mirror}"]
    # The restored pod keeps writing into the slot the pointer does not name.
    fresh.save({"w": torch.full((2,), 4.0)}, 4, 0)
    again = Checkpointer(tmp_path / "pod3", mirror_uri=mirror, fingerprint={"run": 1}, log=lambda _: None).restore()
    assert again.step == 4
