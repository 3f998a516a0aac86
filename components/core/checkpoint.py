"""Checkpoints that a retried step resumes from: atomic, pickle-free, verified.

A training loop hands :class:`Checkpointer` a *state tree*: nested dicts, lists
and tuples of tensors, NumPy arrays and plain values (the model, optimizer and
scheduler ``state_dict()``s, RNG states, loop counters, best weights). The tree
is split in two:

* every tensor goes into one safetensors file under a path-like key
  (``optimizer/state/0/exp_avg``); NumPy arrays too (their dtype is recorded);
* everything else stays in a JSON skeleton where each tensor is replaced by a
  ``{"__tensor__": key}`` marker. Tuples, dicts with non-string keys (the
  optimizer's ``{0: {...}}``) and non-finite floats get markers of their own, so
  the tree comes back exactly as it went in, types included.

Nothing is ever pickled, so loading a checkpoint cannot run code.

Layout of a checkpoint directory::

    step-00000120.safetensors   the tensors
    step-00000120.json          the skeleton + metadata (step, epoch, fingerprint, sha256 of the tensors)
    latest.json                 pointer to the newest complete checkpoint, written last

Each file is written to a temporary name, fsynced and moved into place with
``os.replace``; the pointer moves only after both files are complete, so a
crash at any moment leaves the previous checkpoint intact and readable. The
newest ``keep`` checkpoints are kept.

``fingerprint``: what the run's result depends on (hyperparameters, data
size, world size). A checkpoint written under another fingerprint is refused
with a clear message instead of being silently resumed.

``mirror_uri``: an optional ``s3://`` prefix (or second local directory) the
files are copied to after each save, pointer last, through
``components.core.blobs``; a fresh pod with an empty local directory restores from
it. That is what makes a retried pod on another node resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

POINTER = "latest.json"
FORMAT = "kfp-mlops/checkpoint-v1"
_NAME = re.compile(r"^step-(\d{8,})$")

_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT, _NPSCALAR = (
    "__tensor__", "__ndarray__", "__tuple__", "__items__", "__float__", "__npscalar__")
_MARKERS = {_TENSOR, _NDARRAY, _TUPLE, _ITEMS, _FLOAT, _NPSCALAR}


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, corrupt or belongs to another run."""


# ---------------------------------------------------------------------------
# Tree <-> (JSON skeleton, tensors)
# ---------------------------------------------------------------------------

def flatten(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a state tree into a JSON-able skeleton and a flat ``{key: tensor}`` dict."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def key_for(path: str) -> str:
        key, n = path or "root", 1
        while key in tensors:  # {1: a, "1": b} would share a path; keep both
            key, n = f"{path}#{n}", n + 1
        return key

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            key = key_for(path)
            t = obj.detach().cpu().contiguous()  # no copy for what is already a dense CPU tensor
            # safetensors refuses tensors that share memory (tied weights, views of a larger buffer): copy those.
            storage = t.untyped_storage()
            if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[key] = t
            return {_TENSOR: key}
        if isinstance(obj, np.ndarray):
            key = key_for(path)
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "ui" else obj.dtype))
            return {_NDARRAY: key, "dtype": obj.dtype.str}
        if isinstance(obj, np.generic):
            return {_NPSCALAR: obj.dtype.str, "value": enc(obj.item(), path)}
        if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
        if isinstance(obj, tuple):
            return {_TUPLE: [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in obj):
                return {k: enc(v, f"{path}/{k}") for k, v in obj.items()}
            return {_ITEMS: [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}")] for k, v in obj.items()]}
        raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or 'the root'}: only tensors, NumPy "
                        "arrays, numbers, strings, None and lists/tuples/dicts of them (no pickling)")

    return enc(tree, ""), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _NDARRAY in obj:
            return tensors[obj[_NDARRAY]].numpy().astype(np.dtype(obj["dtype"]))
        if _NPSCALAR in obj:
            return np.dtype(obj[_NPSCALAR]).type(dec(obj["value"]))
        if _FLOAT in obj:
            return float(obj[_FLOAT])
        if _TUPLE in obj:
            return tuple(dec(v) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {_hashable(dec(k)): dec(v) for k, v in obj[_ITEMS]}
        return {k: dec(v) for k, v in obj.items()}

    return dec(skeleton)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)``, fsync, then ``os.replace`` onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    tree: Any
    metadata: dict[str, Any]  # step, epoch, fingerprint, created_at, ...

    @property
    def step(self) -> int:
        return int(self.metadata["step"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(directory: str | Path, tree: Any, *, step: int, epoch: int,
                    metadata: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write one checkpoint atomically, move the pointer to it, drop all but the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    skeleton, tensors = flatten(tree)
    weights = directory / f"{name}.safetensors"
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "step": step,
        "epoch": epoch,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
        "tensor_file": weights.name,
        "tensor_sha256": _sha256(weights),
        "tensor_count": len(tensors),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    _write_json(directory / f"{name}.json", {"metadata": meta, "state": skeleton})
    _write_json(directory / POINTER, {"name": name, "step": step, "epoch": epoch})
    _prune(directory, keep)
    return directory / f"{name}.json"


def _prune(directory: Path, keep: int) -> None:
    names = sorted({p.name.split(".")[0] for p in directory.glob("step-*") if _NAME.match(p.name.split(".")[0])})
    for old in names[:-keep] if keep > 0 else []:
        for suffix in (".json", ".safetensors"):
            (directory / f"{old}{suffix}").unlink(missing_ok=True)


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or None when there is none yet."""
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["name"]
        doc = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint pointer {pointer} is unreadable or names a missing file ({exc}); "
                              f"delete {directory} to start over") from exc
    meta = doc["metadata"]
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / name}.json is not a {FORMAT} checkpoint (format {meta.get('format')!r})")
    weights = directory / meta["tensor_file"]
    if not weights.is_file() or _sha256(weights) != meta["tensor_sha256"]:
        raise CheckpointError(f"checkpoint tensors {weights} are missing or do not match their sha256; "
                              f"the files were changed after writing; delete {directory} to start over")
    return Checkpoint(unflatten(doc["state"], load_file(str(weights))), meta)


# ---------------------------------------------------------------------------
# What a loop uses
# ---------------------------------------------------------------------------

class Checkpointer:
    """When to checkpoint, where, and whether this process writes (rank 0 only under DDP).

    ``every_steps``: save after every N optimizer steps (0 = never by step);
    ``every_epochs``: save after every N completed epochs (0 = never by epoch).
    """

    def __init__(self, directory: str | Path, *, every_steps: int = 0, every_epochs: int = 1,
                 fingerprint: dict[str, Any] | None = None, writer: bool = True, keep: int = 2,
                 mirror_uri: str = "", log: Callable[[str], None] = print):
        if every_steps < 0 or every_epochs < 0:
            raise ValueError(f"checkpoint intervals must be >= 0, got every_steps={every_steps}, "
                             f"every_epochs={every_epochs}")
        self.directory = Path(directory)
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))  # as it will read back
        self.writer, self.keep, self.mirror_uri, self.log = writer, keep, mirror_uri, log
        self.saved_steps: list[int] = []
        self._mirror_slot: str | None = None  # the remote slot the mirror's pointer names
        self.resumed_from = 0  # the step restore() returned, 0 when starting fresh

    def due(self, step: int, epoch: int, epoch_end: bool) -> bool:
        by_step = self.every_steps > 0 and step % self.every_steps == 0
        by_epoch = epoch_end and self.every_epochs > 0 and epoch % self.every_epochs == 0
        return by_step or by_epoch

    def save(self, tree: Any, step: int, epoch: int) -> None:
        if not self.writer:
            return
        save_checkpoint(self.directory, tree, step=step, epoch=epoch,
                        metadata={"fingerprint": self.fingerprint}, keep=self.keep)
        self.saved_steps.append(step)
        if self.mirror_uri:
            self._push(checkpoint_name(step))

    def pull(self) -> None:
        """Copy the mirror's newest checkpoint into the local directory when that has none (a fresh pod)."""
        if self.mirror_uri and not (self.directory / POINTER).is_file():
            self._pull()

    def restore(self, pull: bool = True) -> Checkpoint | None:
        """The checkpoint to resume from (pulled from the mirror first unless ``pull`` is False)."""
        if pull:
            self.pull()
        ckpt = load_checkpoint(self.directory)
        if ckpt is None:
            return None
        saved = ckpt.metadata.get("fingerprint", {})
        if saved != self.fingerprint:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise CheckpointError(
                f"the checkpoint in {self.directory} belongs to a different run: {', '.join(changed)} differ "
                f"({ {k: saved.get(k) for k in changed} } there, { {k: self.fingerprint.get(k) for k in changed} } now); "
                "use another checkpoint directory or delete it to start over")
        self.resumed_from = ckpt.step
        return ckpt

    # Mirror: files first, pointer last, so a reader never sees a pointer to a half-copied checkpoint.
    # Remote files alternate between two slots (the one the pointer does not name is overwritten),
    # so the mirror holds at most two checkpoints without needing deletes.
    def _push(self, name: str) -> None:
        from components.core import blobs

        if self._mirror_slot is None:  # first push of this process: which slot does the remote pointer name?
            pointer_uri = blobs.join(self.mirror_uri, POINTER)
            self._mirror_slot = json.loads(blobs.read_bytes(pointer_uri)).get("slot", "") \
                if blobs.exists(pointer_uri) else ""
        slot = "slot-1" if self._mirror_slot == "slot-0" else "slot-0"
        for suffix in (".safetensors", ".json"):
            blobs.put_file(self.directory / f"{name}{suffix}", blobs.join(self.mirror_uri, slot + suffix))
        pointer = {**json.loads((self.directory / POINTER).read_text()), "slot": slot}
        blobs.write_bytes(blobs.join(self.mirror_uri, POINTER), json.dumps(pointer, sort_keys=True).encode())
        self._mirror_slot = slot

    def _pull(self) -> None:
        from components.core import blobs

        pointer_uri = blobs.join(self.mirror_uri, POINTER)
        if not blobs.exists(pointer_uri):
            return
        pointer = json.loads(blobs.read_bytes(pointer_uri))
        self.directory.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            blobs.get_file(blobs.join(self.mirror_uri, pointer["slot"] + suffix),
                             self.directory / f"{pointer['name']}{suffix}")
        _write_json(self.directory / POINTER, {k: pointer[k] for k in ("name", "step", "epoch")})
        self._mirror_slot = pointer["slot"]
        self.log(f"checkpoint: pulled {pointer['name']} from {self.mirror_uri}")


def run_key(*parts: str) -> str:
    """A short stable key for a checkpoint directory (e.g. from an output artifact URI)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def checkpoint_location(dir_or_uri: str | Path | None) -> tuple[Path | None, str]:
    """(local checkpoint directory, mirror URI): an ``s3://`` URI is mirrored from a local temp directory."""
    if not dir_or_uri:
        return None, ""
    if str(dir_or_uri).startswith("s3://"):
        return Path(tempfile.gettempdir()) / "kfp-mlops-checkpoints" / run_key(str(dir_or_uri)), str(dir_or_uri)
    return Path(dir_or_uri), ""


def step_checkpoint_dir(step: str, artifact_uri: str, root: str = "") -> str:
    """The checkpoint directory (or ``s3://`` URI) of a pipeline step, stable across its retries.

    Keyed by the output artifact's URI, which KFP keeps the same when it retries
    the step. ``root`` empty: under the local temp dir.
    """
    key = run_key(step, artifact_uri)
    if not root:
        return str(Path(tempfile.gettempdir()) / "kfp-mlops-checkpoints" / step / key)
    if root.startswith("s3://"):
        return f"{root.rstrip('/')}/{step}/{key}"
    return str(Path(root) / step / key)
