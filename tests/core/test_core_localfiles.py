"""Local writes are atomic and durable: the file and its directory are fsynced, and a failure (a full disk, an
I/O error) keeps the old file and leaves no temporary file; the same for downloads, releases, weights and datasets."""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from pathlib import Path

import pytest
from conftest import SAMPLE_FILES, digits_splits, write_tree

from components.core import blobs, localfiles, releases
from components.core.blobs import Storage
from components.core.data import SPLITS_FILE, load_splits, save_splits
from components.core.releases import Releases


@pytest.fixture
def fsyncs(monkeypatch) -> list[tuple[int, bool]]:
    """Every os.fsync call as (inode, is a directory), in order; the calls still happen."""
    calls = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        calls.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def _assert_durable(calls: list[tuple[int, bool]], path: Path) -> None:
    """The file was fsynced (a rename keeps the inode) and its directory after it."""
    file_sync = (path.stat().st_ino, False)
    assert file_sync in calls, f"{path} was not fsynced"
    later = calls[calls.index(file_sync) + 1:]
    assert (path.parent.stat().st_ino, True) in later, f"the directory of {path} was not fsynced after the rename"


def _save_json(dest: Path, data: bytes) -> None:
    localfiles.atomic_write_json(dest, {"data": data.decode()})


def _save_safetensors(dest: Path, data: bytes) -> None:
    import torch

    from components.core.models import atomic_save_safetensors

    atomic_save_safetensors({"w": torch.tensor(list(data), dtype=torch.uint8)}, dest)


def _put_file(dest: Path, data: bytes) -> None:
    source = dest.parent.parent / f"source-{uuid.uuid4().hex[:6]}"
    source.write_bytes(data)
    blobs.put_file(source, dest)


LOCAL_WRITES = [
    ("write_bytes", lambda dest, data: blobs.write_bytes(str(dest), data)),
    ("put_file", _put_file),
    ("atomic_write_json", _save_json),
    ("atomic_write_text", lambda dest, data: localfiles.atomic_write_text(dest, data.decode())),
    ("atomic_save_safetensors", _save_safetensors),
]


@pytest.mark.parametrize("write", [w[1] for w in LOCAL_WRITES], ids=[w[0] for w in LOCAL_WRITES])
def test_local_writes_fsync_the_file_and_the_directory(tmp_path, fsyncs, write):
    dest = tmp_path / "out" / "file"
    dest.parent.mkdir()
    write(dest, b"old")
    write(dest, b"new")
    _assert_durable(fsyncs, dest)


def test_downloads_publish_and_fetch_fsync_what_they_write(store_base, tmp_path, fsyncs):
    s = Storage()
    r = Releases(s)
    s.write_bytes(blobs.join(store_base, "one/a.bin"), b"a")
    got = s.get_file(blobs.join(store_base, "one/a.bin"), tmp_path / "got" / "a.bin")
    _assert_durable(fsyncs, got)

    release = write_tree(tmp_path / "release", SAMPLE_FILES)
    manifest = r.publish(release, store_base)
    if not blobs.is_s3(store_base):
        _assert_durable(fsyncs, Path(store_base) / releases.POINTER_NAME)
        _assert_durable(fsyncs, Path(store_base) / releases.MANIFESTS_DIR / f"{manifest['version']}.json")
        for entry in manifest["files"]:
            _assert_durable(fsyncs, Path(store_base) / releases.object_key(entry["sha256"]))
    r.fetch(store_base, tmp_path / "serving")
    for rel in SAMPLE_FILES:
        assert ((tmp_path / "serving" / rel).stat().st_ino, False) in fsyncs
    assert (tmp_path.stat().st_ino, True) in fsyncs  # the rename of the fetched directory into place


@pytest.mark.parametrize("write", [w[1] for w in LOCAL_WRITES], ids=[w[0] for w in LOCAL_WRITES])
def test_a_failed_fsync_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, write):
    dest = tmp_path / "out" / "file"
    dest.parent.mkdir()
    write(dest, b"old")
    old = dest.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write(dest, b"new")
    assert dest.read_bytes() == old
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file"]


def test_a_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    localfiles.atomic_write_file(dest, lambda tmp: tmp.write_bytes(b"old weights"))

    def half_then_disk_full(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"new wei")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        localfiles.atomic_write_file(dest, half_then_disk_full)
    assert dest.read_bytes() == b"old weights"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.bin"]


def test_json_and_text_are_written_as_readers_expect(tmp_path):
    localfiles.atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'  # sorted, indented
    localfiles.atomic_write_json(tmp_path / "when.json", {"at": Path("x")}, default=str)
    assert json.loads((tmp_path / "when.json").read_text()) == {"at": "x"}
    localfiles.atomic_write_text(tmp_path / "deep" / "notes.md", "\u00e9t\u00e9\n")
    assert (tmp_path / "deep" / "notes.md").read_bytes() == "\u00e9t\u00e9\n".encode()


def test_the_dataset_artifact_is_written_durably(tmp_path, fsyncs):
    splits = digits_splits()
    path = save_splits(splits, tmp_path / "dataset")
    assert path == tmp_path / "dataset" / SPLITS_FILE
    _assert_durable(fsyncs, path)
    assert sorted(p.name for p in path.parent.iterdir()) == [SPLITS_FILE]  # no temporary file left
    assert load_splits(path.parent).class_names == splits.class_names
