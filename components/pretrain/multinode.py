"""Pretraining on several nodes: a Kubeflow Trainer v2 TrainJob whose nodes run the pretrain command line.

The step publishes its dataset to the exchange (an ``s3://`` prefix every node
can reach), creates the TrainJob (``components.train.trainjob``), waits for it
and fetches the encoder the nodes wrote back into its own output artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from components.core.settings import Settings
from components.pretrain.pretrain import SUMMARY_KEYS, command_line_values

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Non-secret storage settings a TrainJob node needs to reach the exchange (credentials come from the Secret).
_STORAGE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "S3_ADDRESSING_STYLE",
                "AWS_MAX_ATTEMPTS")


def current_namespace() -> str:
    """The namespace this pod runs in (ServiceAccount file), else $POD_NAMESPACE."""
    path = Path(SERVICE_ACCOUNT_NAMESPACE)
    if path.is_file():
        return path.read_text().strip()
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    raise RuntimeError("cannot tell which namespace to create the TrainJob in: not in a pod (no "
                       f"{SERVICE_ACCOUNT_NAMESPACE}) and POD_NAMESPACE is unset")


def pretrain_multinode(dataset_dir: str | Path, out_dir: str | Path, cfg: Settings, *, run_uri: str, image: str,
                       namespace: str, s3_secret_name: str = "", api=None, timeout_s: float = 6 * 3600,
                       poll_s: float = 15.0, log: Callable[[str], None] = print, **wait_kwargs) -> dict:
    """Pretrain on ``cfg.pretrain.num_nodes`` nodes through a TrainJob; the encoder lands in ``out_dir``.

    The dataset is uploaded to ``<exchange_uri>/pretrain/<key>/dataset`` (key:
    a hash of ``run_uri``, the step's output URI, so a retried step reuses the
    same prefix and adopts the TrainJob it already started); the nodes write
    the encoder to ``.../encoder`` and checkpoint to ``.../checkpoints``.
    """
    from components.core import blobs
    from components.core.checkpoint import run_key
    from components.train.trainjob import TrainJobSpec, run_multinode_pretrain, trainjob_name

    exchange_uri, num_nodes = cfg.pretrain.exchange_uri, cfg.pretrain.num_nodes
    if not blobs.is_s3(exchange_uri):
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
    blobs.put_dir(dataset_dir, dataset_uri)
    entry_args = {**command_line_values(cfg), "checkpoint_dir": f"{base}/checkpoints"}
    spec = TrainJobSpec(
        name=trainjob_name("pretrain", run_uri), namespace=namespace, image=image,
        dataset_uri=dataset_uri, output_uri=output_uri, num_nodes=num_nodes,
        gpus_per_node=cfg.pretrain.gpus_per_node,
        entry_args={k: v for k, v in entry_args.items() if v != ""},
        env={k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)},
        s3_secret_name=s3_secret_name,
    )
    result = run_multinode_pretrain(spec, out_dir, blobs.get_dir, api=api, timeout_s=timeout_s, poll_s=poll_s,
                                    log=log, **wait_kwargs)
    meta = json.loads((Path(out_dir) / "metadata.json").read_text())
    return {**{k: meta.get(k) for k in SUMMARY_KEYS}, "trainjob": result["trainjob"], "num_nodes": num_nodes}
