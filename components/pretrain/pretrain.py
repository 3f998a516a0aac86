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
  (``components.train.trainjob``) whose nodes run ``torchrun --module
  components.pretrain.pretrain`` with the same flags, then fetches the encoder.

The command line, the same everywhere (``--dataset``/``--out`` may be local
paths or ``s3://`` URIs)::

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

from pipelines.config import PretrainConfig

_DEFAULTS = PretrainConfig()
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Non-secret storage settings a TrainJob node needs to reach the exchange (credentials come from the Secret).
_STORAGE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "S3_ADDRESSING_STYLE",
                "AWS_MAX_ATTEMPTS")


def _is_s3(uri) -> bool:
    return str(uri).startswith("s3://")






def default_nproc_per_node() -> int:
    """One process per visible GPU; one process on CPU."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def pretrain(dataset_dir: str | Path, out_dir: str | Path, objective: str = _DEFAULTS.objective,
             epochs: int = _DEFAULTS.epochs, batch_size: int = _DEFAULTS.batch_size,
             learning_rate: float = _DEFAULTS.learning_rate, temperature: float = _DEFAULTS.temperature,
             width: int = _DEFAULTS.width, embed_dim: int = _DEFAULTS.embed_dim, seed: int = 0,
             log=print, *, arch: str = _DEFAULTS.arch, depth: int = _DEFAULTS.depth,
             compile: bool = _DEFAULTS.compile, checkpoint_dir: str | Path | None = None,
             checkpoint_every_steps: int = _DEFAULTS.checkpoint_every_steps,
             checkpoint_every_epochs: int = _DEFAULTS.checkpoint_every_epochs,
             nproc_per_node: int = 1, runtime=None, on_step=None) -> dict:
    """Pretrain an encoder on the dataset's unlabeled images and save it to ``out_dir`` (local paths).

    ``checkpoint_dir``: a local directory or an ``s3://`` URI to checkpoint
    into and resume from (None: no checkpoints). ``nproc_per_node`` > 1 runs
    DDP through ``torchrun`` (0 = one process per visible GPU). Under DDP only
    rank 0 writes. Returns a summary: objective, arch, epochs, first and final
    loss, n_images, world_size, resumed_from_step, seconds.
    """
    from components.core.checkpoint import Checkpointer, checkpoint_location
    from components.core.data import load_splits
    from components.core.models import EncoderSpec, save_encoder, state_dict_sha256
    from components.train.training import make_runtime, pretrain_encoder

    if nproc_per_node == 0:
        nproc_per_node = default_nproc_per_node()
    if nproc_per_node > 1 and runtime is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch_torchrun(nproc_per_node, dataset_dir, out_dir, log, **{
            "objective": objective, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "temperature": temperature, "width": width, "embed_dim": embed_dim, "seed": seed, "arch": arch,
            "depth": depth, "compile": compile, "checkpoint_dir": str(checkpoint_dir or ""),
            "checkpoint_every_steps": checkpoint_every_steps, "checkpoint_every_epochs": checkpoint_every_epochs})

    splits = load_splits(dataset_dir)
    images = splits.unlabeled()
    channels, height, width_px = images.shape[1:]
    if height != width_px:
        raise ValueError(f"the encoder expects square images, got {height}x{width_px}; set an image size at ingest")
    spec = EncoderSpec(in_channels=int(channels), image_size=int(height), width=width, embed_dim=embed_dim,
                       arch=arch, depth=depth)
    rt = runtime or make_runtime(compile=compile)
    hyper = {"objective": objective, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
             "temperature": temperature, "seed": seed}
    local_ckpt, mirror = checkpoint_location(checkpoint_dir)
    checkpointer = None
    if local_ckpt is not None:
        checkpointer = Checkpointer(local_ckpt, every_steps=checkpoint_every_steps, every_epochs=checkpoint_every_epochs,
                                    fingerprint={**hyper, "encoder": asdict(spec), "n_images": len(images),
                                                 "world_size": rt.world_size},
                                    writer=rt.is_main, mirror_uri=mirror, log=log)

    t0 = time.perf_counter()
    encoder, history = pretrain_encoder(images, spec, objective, epochs, batch_size, learning_rate, temperature, seed,
                                        log=log, runtime=rt, checkpointer=checkpointer, on_step=on_step)
    seconds = time.perf_counter() - t0
    summary = {
        "objective": objective,
        "arch": spec.arch,
        "depth": spec.resolved_depth,
        "epochs": epochs,
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


def _launch_torchrun(nproc: int, dataset_dir, out_dir, log, **flags) -> dict:
    """Run this module under ``torchrun --standalone`` (DDP on this machine) and return rank 0's summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "components.pretrain.pretrain", "--dataset", str(dataset_dir), "--out", str(out_dir)]
    cmd += cli_flags(flags)
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
    return {k: meta[k] for k in ("objective", "arch", "depth", "epochs", "first_loss", "final_loss", "n_images",
                                 "world_size", "device", "resumed_from_step", "weights_sha256", "seconds")}


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


# ---------------------------------------------------------------------------
# The command line (what torchrun and the TrainJob nodes run)
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = argparse.ArgumentParser(prog="python -m components.pretrain.pretrain",
                                description="Self-supervised pretraining of the encoder (one process, or one rank "
                                            "of torchrun). --dataset/--out: local paths or s3:// URIs.")
    p.add_argument("--dataset", required=True, help="dataset directory written by ingest (local or s3://)")
    p.add_argument("--out", required=True, help="where the encoder artifact goes (local or s3://); rank 0 writes")
    p.add_argument("--objective", default=d.objective, choices=["contrastive", "masked"])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split across ranks")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--embed-dim", type=int, default=d.embed_dim)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default=d.arch, choices=["cnn", "resnet", "vgg"])
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--checkpoint-dir", default="", help="local dir or s3:// URI to checkpoint into and resume from")
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps)
    p.add_argument("--checkpoint-every-epochs", type=int, default=d.checkpoint_every_epochs)
    p.add_argument("--nproc-per-node", type=int, default=0,
                   help="outside torchrun: processes to start (0 = one per visible GPU)")
    return p


@contextmanager
def _staged(dataset: str, out: str, rt):
    """Local paths for --dataset/--out: an s3:// dataset is downloaded once per node (local rank 0),
    an s3:// output is written locally and uploaded by rank 0 when training succeeded."""
    from components.core import storage
    from components.core.checkpoint import run_key

    work = Path(tempfile.gettempdir()) / "kfp-mlops-pretrain"
    dataset_dir = Path(dataset)
    if _is_s3(dataset):
        dataset_dir = work / "datasets" / run_key(dataset)
        if rt is None or rt.local_rank == 0:
            storage.get_dir(dataset, dataset_dir)
    if rt is not None and rt.distributed:
        import torch.distributed as dist

        dist.barrier()  # the other ranks of this node wait for the download
    out_dir = work / "out" / run_key(out, str(os.getpid())) if _is_s3(out) else Path(out)
    yield dataset_dir, out_dir
    if _is_s3(out) and (rt is None or rt.is_main):
        storage.put_dir(out_dir, out)
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from components.train.training import make_runtime

    rt = make_runtime(compile=args.compile) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    log = (lambda line: print(line, flush=True)) if rt is None or rt.is_main else (lambda line: None)
    try:
        with _staged(args.dataset, args.out, rt) as (dataset_dir, out_dir):
            summary = pretrain(dataset_dir, out_dir, objective=args.objective, epochs=args.epochs,
                               batch_size=args.batch_size, learning_rate=args.learning_rate,
                               temperature=args.temperature, width=args.width, embed_dim=args.embed_dim,
                               seed=args.seed, log=log, arch=args.arch, depth=args.depth, compile=args.compile,
                               checkpoint_dir=args.checkpoint_dir or None,
                               checkpoint_every_steps=args.checkpoint_every_steps,
                               checkpoint_every_epochs=args.checkpoint_every_epochs,
                               nproc_per_node=args.nproc_per_node, runtime=rt)
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


# ---------------------------------------------------------------------------
# Several nodes: a Kubeflow Trainer v2 TrainJob running the command line above
# ---------------------------------------------------------------------------

def current_namespace() -> str:
    """The namespace this pod runs in (ServiceAccount file), else $POD_NAMESPACE."""
    path = Path(SERVICE_ACCOUNT_NAMESPACE)
    if path.is_file():
        return path.read_text().strip()
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    raise RuntimeError("cannot tell which namespace to create the TrainJob in: not in a pod (no "
                       f"{SERVICE_ACCOUNT_NAMESPACE}) and POD_NAMESPACE is unset")


def pretrain_multinode(dataset_dir: str | Path, out_dir: str | Path, *, run_uri: str, exchange_uri: str,
                       num_nodes: int, gpus_per_node: int, image: str, namespace: str, s3_secret_name: str = "",
                       flags: dict | None = None, api=None, timeout_s: float = 6 * 3600, poll_s: float = 15.0,
                       log=print, **wait_kwargs) -> dict:
    """Pretrain on ``num_nodes`` nodes through a TrainJob; the encoder lands in ``out_dir``.

    The dataset is uploaded to ``<exchange_uri>/pretrain/<key>/dataset`` (key:
    a hash of ``run_uri``, the step's output URI, so a retried step reuses the
    same prefix and adopts the TrainJob it already started); the nodes write
    the encoder to ``.../encoder`` and checkpoint to ``.../checkpoints``.
    """
    from components.core import storage
    from components.core.checkpoint import run_key
    from components.train.trainjob import TrainJobSpec, run_multinode_pretrain, trainjob_name

    if not _is_s3(exchange_uri):
        raise ValueError(
            f"pretrain.num_nodes={num_nodes} needs pretrain.exchange_uri: an s3:// prefix that this step and every "
            f"TrainJob node can reach (e.g. s3://mlpipeline/kfp-mlops/exchange), got {exchange_uri!r}; the nodes "
            "cannot read this pod's local dataset. Set it with --pretrain-exchange-uri or in the config file, and "
            "give the pretrain step S3 credentials (ClusterConfig.s3_secret_name).")
    if not image:
        raise ValueError(f"pretrain.num_nodes={num_nodes} needs the image the TrainJob's nodes run (the pipeline "
                         "passes its own image as trainjob_image)")
    key = run_key("pretrain", run_uri)
    base = f"{exchange_uri.rstrip('/')}/pretrain/{key}"
    dataset_uri, output_uri = f"{base}/dataset", f"{base}/encoder"
    log(f"[trainjob] publishing the dataset to {dataset_uri}")
    storage.put_dir(dataset_dir, dataset_uri)
    entry_args = {**(flags or {}), "checkpoint_dir": f"{base}/checkpoints"}
    spec = TrainJobSpec(
        name=trainjob_name("pretrain", run_uri), namespace=namespace, image=image,
        dataset_uri=dataset_uri, output_uri=output_uri, num_nodes=num_nodes, gpus_per_node=gpus_per_node,
        entry_args={k: v for k, v in entry_args.items() if v != ""},
        env={k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)},
        s3_secret_name=s3_secret_name,
    )
    result = run_multinode_pretrain(spec, out_dir, storage.get_dir, api=api, timeout_s=timeout_s, poll_s=poll_s,
                                    log=log, **wait_kwargs)
    meta = json.loads((Path(out_dir) / "metadata.json").read_text())
    summary = {k: meta.get(k) for k in ("objective", "arch", "depth", "epochs", "first_loss", "final_loss",
                                         "n_images", "world_size", "device", "resumed_from_step", "weights_sha256",
                                         "seconds")}
    return {**summary, "trainjob": result["trainjob"], "num_nodes": num_nodes}


if __name__ == "__main__":
    sys.exit(main())
