"""Pretrain step: self-supervised pretraining of the encoder on unlabeled images.

Sees the pool plus the train images with their labels unused. Writes an
encoder artifact (``encoder.safetensors`` + ``metadata.json``) that the
finetune step starts from.

One entry point at every scale:

* one process (CPU or one GPU): ``pretrain()`` trains in-process;
* several GPUs in one pod: ``pretrain()`` starts ``torchrun --nproc-per-node N
  -m components.pretrain.pretrain ...`` (DDP, one process per GPU) and waits for it;
* several nodes: ``pretrain_component`` with ``num_nodes > 1`` publishes the
  dataset to ``exchange_uri`` and creates a Kubeflow Trainer v2 ``TrainJob``
  (``components.pretrain.multinode``) whose nodes run ``torchrun --module
  components.pretrain.pretrain`` with the same flags, then fetches the encoder.

The command line, the same everywhere (``--dataset``/``--out`` may be local
paths or ``s3://`` URIs); its flags are the settings ``pretrain()`` reads::

    python -m components.pretrain.pretrain --dataset URI --out URI --objective contrastive --epochs 20 \\
        --batch-size 128 --learning-rate 0.001 --temperature 0.2 --width 32 --embed-dim 128 --seed 0

Checkpoints (see ``components.core.checkpoint``): every ``checkpoint_every_epochs``
epochs and/or ``checkpoint_every_steps`` steps into a directory that is stable
across retries of the same step (derived from the output artifact's URI, under
``checkpoint_root`` when set), so a retried pod resumes instead of starting
over. Without ``checkpoint_root`` the directory is under the local temp dir:
that covers kfp.local retries and restarts of the same container; on a
cluster set ``checkpoint_root`` to an ``s3://`` prefix or a mounted volume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from components.core.settings import Settings

# The pretrain settings the command line carries as flags (``--batch-size`` for ``batch_size``); ``--seed``
# carries the data settings' seed.
FLAG_FIELDS = ("objective", "epochs", "batch_size", "learning_rate", "temperature", "width", "embed_dim", "arch",
               "depth", "compile", "checkpoint_every_steps", "checkpoint_every_epochs")
# What a finished run reports; rank 0 writes it into the encoder's metadata too.
SUMMARY_KEYS = ("objective", "arch", "depth", "epochs", "first_loss", "final_loss", "n_images", "world_size",
                "device", "resumed_from_step", "weights_sha256", "seconds")


def default_nproc_per_node() -> int:
    """One process per visible GPU; one process on CPU."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def pretrain(dataset_dir: str | Path, out_dir: str | Path, cfg: Settings, log: Callable[[str], None] = print, *,
             checkpoint_dir: str | Path | None = None, nproc_per_node: int = 1, runtime=None, on_step=None) -> dict:
    """Pretrain an encoder on the dataset's unlabeled images and save it to ``out_dir`` (local paths).

    ``cfg``: the step's settings, ``cfg.pretrain`` (objective, schedule,
    encoder, checkpoint cadence) and ``cfg.data.seed``. ``checkpoint_dir``: a
    local directory or an ``s3://`` URI to checkpoint into and resume from
    (None: no checkpoints). ``nproc_per_node`` > 1 runs DDP through
    ``torchrun`` (0 = one process per visible GPU). Under DDP only rank 0
    writes. Returns a summary: objective, arch, epochs, first and final loss,
    n_images, world_size, resumed_from_step, seconds.
    """
    from components.core.checkpoint import Checkpointer, checkpoint_location
    from components.core.data import load_splits
    from components.core.models import EncoderSpec, save_encoder, state_dict_sha256
    from components.train.loops import pretrain_encoder
    from components.train.runtime import make_runtime

    p, seed = cfg.pretrain, cfg.data.seed
    if nproc_per_node == 0:
        nproc_per_node = default_nproc_per_node()
    if nproc_per_node > 1 and runtime is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch_torchrun(nproc_per_node, dataset_dir, out_dir, log,
                                {**command_line_values(cfg), "checkpoint_dir": str(checkpoint_dir or "")})

    splits = load_splits(dataset_dir)
    images = splits.unlabeled()
    channels, height, width_px = images.shape[1:]
    if height != width_px:
        raise ValueError(f"the encoder expects square images, got {height}x{width_px}; set an image size at ingest")
    spec = EncoderSpec(in_channels=int(channels), image_size=int(height), width=p.width, embed_dim=p.embed_dim,
                       arch=p.arch, depth=p.depth)
    rt = runtime or make_runtime(compile=p.compile)
    hyper = {"objective": p.objective, "epochs": p.epochs, "batch_size": p.batch_size,
             "learning_rate": p.learning_rate, "temperature": p.temperature, "seed": seed}
    local_ckpt, mirror = checkpoint_location(checkpoint_dir)
    checkpointer = None
    if local_ckpt is not None:
        checkpointer = Checkpointer(local_ckpt, every_steps=p.checkpoint_every_steps,
                                    every_epochs=p.checkpoint_every_epochs,
                                    fingerprint={**hyper, "encoder": asdict(spec), "n_images": len(images),
                                                 "world_size": rt.world_size},
                                    writer=rt.is_main, mirror_uri=mirror, log=log)

    t0 = time.perf_counter()
    encoder, history = pretrain_encoder(images, spec, p.objective, p.epochs, p.batch_size, p.learning_rate,
                                        p.temperature, seed, log=log, runtime=rt, checkpointer=checkpointer,
                                        on_step=on_step)
    seconds = time.perf_counter() - t0
    summary = {
        "objective": p.objective,
        "arch": spec.arch,
        "depth": spec.resolved_depth,
        "epochs": p.epochs,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "n_images": len(images),
        "world_size": rt.world_size,
        "device": str(rt.device.type),
        "resumed_from_step": checkpointer.resumed_from if checkpointer else 0,
        "weights_sha256": state_dict_sha256(encoder.state_dict()),
        "seconds": seconds,
    }
    if rt.is_main:
        save_encoder(encoder, out_dir, {**summary, **hyper, "history": history})
    return summary


def _launch_torchrun(nproc: int, dataset_dir, out_dir, log, values: dict[str, Any]) -> dict:
    """Run this module under ``torchrun --standalone`` (DDP on this machine) and return rank 0's summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "components.pretrain.pretrain", "--dataset", str(dataset_dir), "--out", str(out_dir)]
    cmd += cli_flags(values)
    log(f"pretrain: starting {nproc} processes with torchrun (DDP)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        log(line)
    if proc.wait() != 0:
        raise RuntimeError(f"torchrun pretraining with {nproc} processes failed (exit {proc.returncode}); "
                           "last lines:\n" + "\n".join(tail))
    meta = json.loads((Path(out_dir) / "metadata.json").read_text())
    return {k: meta[k] for k in SUMMARY_KEYS}


# ---------------------------------------------------------------------------
# The command line (what torchrun and the TrainJob nodes run)
# ---------------------------------------------------------------------------

def command_line_values(cfg: Settings) -> dict[str, Any]:
    """The settings ``pretrain()`` reads, keyed by flag name (``cli_flags`` turns them into the command line)."""
    return {**{name: getattr(cfg.pretrain, name) for name in FLAG_FIELDS}, "seed": cfg.data.seed}


def cli_flags(values: dict) -> list[str]:
    """``{"batch_size": 64, "compile": True}`` -> ``["--batch-size", "64", "--compile"]`` (False/"" omitted)."""
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        elif value != "":
            out += [flag, str(value)]
    return out


def build_parser() -> argparse.ArgumentParser:
    """The flags; their defaults are those of the pipeline's pretrain settings (a test keeps them equal)."""
    p = argparse.ArgumentParser(prog="python -m components.pretrain.pretrain",
                                description="Self-supervised pretraining of the encoder (one process, or one rank "
                                            "of torchrun). --dataset/--out: local paths or s3:// URIs.")
    p.add_argument("--dataset", required=True, help="dataset directory written by ingest (local or s3://)")
    p.add_argument("--out", required=True, help="where the encoder artifact goes (local or s3://); rank 0 writes")
    p.add_argument("--objective", default="contrastive", choices=["contrastive", "masked"])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split across ranks")
    p.add_argument("--learning-rate", type=float, default=0.001)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="cnn", choices=["cnn", "resnet", "vgg"])
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--checkpoint-dir", default="", help="local dir or s3:// URI to checkpoint into and resume from")
    p.add_argument("--checkpoint-every-steps", type=int, default=0)
    p.add_argument("--checkpoint-every-epochs", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="outside torchrun: processes to start (0 = one per visible GPU)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The step settings the parsed flags carry: ``pretrain`` (``FLAG_FIELDS``) and ``data.seed``."""
    return Settings(data=Settings(seed=args.seed),
                    pretrain=Settings(**{name: getattr(args, name) for name in FLAG_FIELDS}))


@contextmanager
def _staged(dataset: str, out: str, rt):
    """Local paths for --dataset/--out: an s3:// dataset is downloaded once per node (local rank 0),
    an s3:// output is written locally and uploaded by rank 0 when training succeeded."""
    from components.core import blobs
    from components.core.checkpoint import run_key

    work = Path(tempfile.gettempdir()) / "kfp-mlops-pretrain"
    dataset_dir = Path(dataset)
    if blobs.is_s3(dataset):
        dataset_dir = work / "datasets" / run_key(dataset)
        if rt is None or rt.local_rank == 0:
            blobs.get_dir(dataset, dataset_dir)
    if rt is not None and rt.distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks of this node wait for the download
    out_dir = work / "out" / run_key(out, str(os.getpid())) if blobs.is_s3(out) else Path(out)
    yield dataset_dir, out_dir
    if blobs.is_s3(out) and (rt is None or rt.is_main):
        blobs.put_dir(out_dir, out)
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from components.train.runtime import make_runtime

    rt = make_runtime(compile=args.compile) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    log = (lambda line: print(line, flush=True)) if rt is None or rt.is_main else (lambda line: None)
    try:
        with _staged(args.dataset, args.out, rt) as (dataset_dir, out_dir):
            summary = pretrain(dataset_dir, out_dir, settings_from_args(args), log,
                               checkpoint_dir=args.checkpoint_dir or None, nproc_per_node=args.nproc_per_node,
                               runtime=rt)
        if rt is not None and rt.distributed:
            # DDP must leave every rank with the same weights; print them side by side.
            import torch.distributed as dist

            hashes: list = [None] * rt.world_size
            dist.all_gather_object(hashes, summary["weights_sha256"][:16])
            log(f"rank weight hashes: {' '.join(hashes)}")
        log(json.dumps({"pretrain_summary": summary}))
    finally:
        if rt is not None and rt.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
