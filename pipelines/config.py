"""The one typed config of kfp-mlops.

Each area is a small dataclass; every field has a default, a one-line
description and, where it has one, its allowed range or choices (``knob``).
The same fields are:

* loaded from YAML (``mlops run --config FILE``), nested by area;
* overridable by flags (``--pretrain-epochs 5``), generated from the fields;
* the pipeline's root parameters (``pretrain_epochs``) locally; on a cluster a box
  of the KFP run form (``form=True``) or a key of its ``other_settings``;
* passed to the steps, each of which receives the areas it uses.

A field can have another default on a cluster (``cluster=``: ``mlops compile`` and
``mlops submit`` use it) and can be local-only (``local_only=True``: loopback
ports and local directories, never in a compiled pipeline's run form).

``ClusterConfig`` is the exception: it is read at compile time (image, GPU
placement) and never becomes a run parameter.

Every value is checked when the config is built (types, ranges, choices and the
rules that tie fields together), before any step runs; ``ConfigError`` lists
every problem at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from components.core import names

LOCAL, CLUSTER = "local", "cluster"
TARGETS = (LOCAL, CLUSTER)


class _SameEverywhere:
    """The cluster default of a field that has no other default there."""

    def __repr__(self) -> str:
        return "SAME"


SAME = _SameEverywhere()


def knob(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         cluster: Any = SAME, local_only: bool = False, form: bool = False) -> Any:
    """A config field: its default, a one-line description, what values it allows, and where it applies.

    ``form=True``: one of the few settings people change first, a box of its own in the compiled pipeline's
    KFP run form; every other run setting is reached through the form's ``other_settings`` (pipelines/pipeline.py).
    """
    return field(default=default, metadata={
        "help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
        "cluster": cluster, "local_only": local_only, "form": form,
    })


PROBABILITY = {"ge": 0.0, "le": 1.0}
PORT = {"ge": 1, "le": 65535}


@dataclass
class DataConfig:
    source: str = knob("digits", "Where the data comes from: 'digits' (built in), a folder of class-named image folders, an .npz with images and labels, or an s3:// prefix.", form=True)
    seed: int = knob(0, "Seed of the shuffled train/val/test/pool split; the same seed gives the same split.", ge=0)
    test_fraction: float = knob(0.2, "Share of all images held out as the test split.", gt=0.0, lt=1.0)
    val_fraction: float = knob(0.15, "Share of all images used for early stopping and model selection.", gt=0.0, lt=1.0)
    pool_fraction: float = knob(0.2, "Share of all images kept as an unlabeled pool for self-supervised pretraining only.", ge=0.0, lt=1.0)
    image_size: int = knob(0, "Resize every image to this square size in pixels; 0 keeps the native size (8 for digits).", ge=0, le=4096)

    def problems(self, target: str) -> list[str]:
        out = []
        total = self.test_fraction + self.val_fraction + self.pool_fraction
        if total >= 1.0:
            out.append(f"data: test_fraction + val_fraction + pool_fraction must be < 1 to leave images for "
                       f"training, got {total:g}")
        source = self.source.strip()
        if not source:
            out.append("data.source is empty: give 'digits', a folder, an .npz file or an s3:// prefix")
        elif source != "digits" and not source.startswith("s3://") and target == LOCAL:
            path = Path(source).expanduser()
            if not path.exists():
                out.append(f"data.source {source!r} does not exist: give 'digits', an existing folder of "
                           "class-named image folders, an .npz file, or an s3:// prefix")
            elif path.is_file() and path.suffix != ".npz":
                out.append(f"data.source {source!r} is a file but not an .npz archive")
        return out


ENCODER_DEPTHS = {"cnn": (4,), "resnet": (10, 18, 34), "vgg": (11, 13, 16, 19)}


@dataclass
class PretrainConfig:
    objective: str = knob("contrastive", "Self-supervised objective: 'contrastive' (SimCLR NT-Xent) or 'masked' (masked-image reconstruction).", choices=("contrastive", "masked"))
    epochs: int = knob(60, "Pretraining epochs over the unlabeled images (pool plus train, labels unused).", ge=1, form=True)
    batch_size: int = knob(128, "Pretraining batch size; contrastive learning sees 2x this many views.", ge=2)
    learning_rate: float = knob(0.001, "AdamW learning rate for pretraining.", gt=0.0)
    temperature: float = knob(0.2, "NT-Xent temperature (contrastive objective only).", gt=0.0)
    width: int = knob(32, "Channels of the first encoder block; later blocks double it.", ge=1)
    embed_dim: int = knob(128, "Size of the encoder's output embedding.", ge=1)
    arch: str = knob("cnn", "Encoder family: 'cnn' (small 4-conv CNN, the digits default), 'resnet' (basic residual blocks) or 'vgg' (VGG-style 3x3 conv stacks).", choices=tuple(ENCODER_DEPTHS))
    depth: int = knob(0, "Encoder depth: resnet 10/18/34, vgg 11/13/16/19; 0 = the family's default (cnn 4, resnet 18, vgg 16).", ge=0)
    compile: bool = knob(False, "Compile the encoder with torch.compile (pays off on GPUs for long runs).")
    num_nodes: int = knob(1, "Nodes to pretrain on; more than 1 runs a Kubeflow Trainer v2 TrainJob (needs exchange_uri).", ge=1)
    gpus_per_node: int = knob(1, "GPUs per TrainJob node, one DDP process each (num_nodes > 1); 0 = CPU nodes. A single-node step uses every GPU its pod has.", ge=0)
    exchange_uri: str = knob("", "s3:// prefix where a multi-node TrainJob reads the dataset and writes the encoder and its checkpoints.")
    checkpoint_root: str = knob("", "Durable checkpoint root (s3:// prefix or a mounted volume) so a retried pod resumes; empty = the local temp dir (survives kfp.local retries and container restarts only).")
    checkpoint_every_steps: int = knob(0, "Also checkpoint every N optimizer steps (0 = by epoch only).", ge=0)
    checkpoint_every_epochs: int = knob(1, "Checkpoint every N epochs (0 = by step only).", ge=0)

    def problems(self, target: str) -> list[str]:
        out = []
        if self.depth and self.depth not in ENCODER_DEPTHS.get(self.arch, ()):
            out.append(f"pretrain.depth {self.depth} is not a depth of arch {self.arch!r}: use "
                       f"{'/'.join(map(str, ENCODER_DEPTHS[self.arch]))} or 0 for its default")
        if self.num_nodes > 1 and not self.exchange_uri.startswith("s3://"):
            out.append(f"pretrain.num_nodes {self.num_nodes} needs pretrain.exchange_uri, an s3:// prefix the "
                       "TrainJob's nodes share")
        return out


@dataclass
class FinetuneConfig:
    epochs: int = knob(40, "Maximum fine-tuning epochs; early stopping usually ends sooner.", ge=1, form=True)
    batch_size: int = knob(64, "Fine-tuning batch size.", ge=1)
    learning_rate: float = knob(0.002, "AdamW learning rate for the classification head (the encoder's is encoder_lr_scale times it).", gt=0.0)
    patience: int = knob(10, "Stop after this many epochs without a better validation loss.", ge=0)
    label_fraction: float = knob(1.0, "Share of the labeled train split used for fine-tuning (few-label experiments).", gt=0.0, le=1.0, form=True)
    mode: str = knob("full", "'full' (everything trains), 'partial' (head + the last unfreeze_blocks encoder stages) or 'linear_probe' (head only, encoder frozen).", choices=("full", "partial", "linear_probe"))
    unfreeze_blocks: int = knob(1, "Encoder stages that train in 'partial' mode, counted from the output.", ge=1)
    encoder_lr_scale: float = knob(0.3, "Encoder learning rate as a multiple of the head's (keeps what pretraining learned).", ge=0.0)
    probe_epochs: int = knob(10, "Linear probe, then fine-tune: epochs that train the head alone before the encoder joins (full/partial modes).", ge=0)
    min_epoch_samples: int = knob(512, "An epoch draws at least this many labeled samples (a small labeled set is reshuffled and repeated), so few-label runs still take enough optimizer steps.", ge=0)
    compile: bool = knob(False, "Compile the classifier with torch.compile.")
    checkpoint_root: str = knob("", "Durable checkpoint root (s3:// prefix or a mounted volume) so a retried pod resumes; empty = the local temp dir.")
    checkpoint_every_steps: int = knob(0, "Also checkpoint every N optimizer steps (0 = by epoch only).", ge=0)
    checkpoint_every_epochs: int = knob(1, "Checkpoint every N epochs (0 = by step only).", ge=0)
    augment_noise_sigma: float = knob(0.0, "Robust training: add Gaussian pixel noise to every training image, its sigma drawn per image from U(0, this); 0 = off. Raises accuracy under noise.", ge=0.0, le=1.0)
    adversarial_epsilon: float = knob(0.0, "Robust training: replace a share of each batch with FGSM examples (random start) of this L-infinity size; 0 = off. Raises accuracy under FGSM/PGD.", ge=0.0, le=1.0)
    adversarial_fraction: float = knob(0.5, "Robust training: share of each batch replaced by adversarial examples when adversarial_epsilon > 0.", gt=0.0, le=1.0)
    dp_epsilon: float = knob(0.0, "Differential privacy: fine-tune with DP-SGD (Opacus) to this target epsilon; 0 = no DP. Uses the dp_* settings instead of epochs/batch_size/learning_rate/mode.", ge=0.0, form=True)
    dp_delta: float = knob(1e-5, "Differential privacy: target delta; must be below 1/(number of training images).", gt=0.0, lt=1.0)
    dp_max_grad_norm: float = knob(1.0, "Differential privacy: per-example gradient clipping norm.", gt=0.0)
    dp_batch_size: int = knob(256, "Differential privacy: expected batch size of the Poisson sampling (DP-SGD wants large batches).", ge=16)
    dp_learning_rate: float = knob(0.25, "Differential privacy: SGD (momentum 0.9) learning rate.", gt=0.0)
    dp_epochs: int = knob(30, "Differential privacy: epochs the noise is calibrated for (early stopping may end sooner and spend less).", ge=1)
    dp_trainable: str = knob("normalization", "Differential privacy: what trains: 'normalization' (GroupNorm scales/shifts + projection + head), 'projection' (projection + head), 'head' or 'all'. The embedding is first standardised with validation-split statistics.", choices=("normalization", "projection", "head", "all"))


@dataclass
class GateConfig:
    min_test_accuracy: float = knob(0.9, "Evaluation gate: the lowest test accuracy that may be released.", **PROBABILITY, form=True)
    max_regression: float = knob(0.005, "Champion/challenger gate: how much lower than the production model's test accuracy (same test split) the new model's may be; negative demands an improvement.", ge=-1.0, le=1.0)
    champion_model: str = knob("serving", "The model in production to compare with: 'serving' (the model the local server in serving.home serves), 'store' (the latest release in the model store, serving.model_store_uri), 'none' (no comparison), or a model dir, a .mar or a storage release (s3://.../latest).", cluster="store")
    max_mia_auc: float = knob(0.65, "Privacy gate: the highest membership-inference attack AUC that may be released (0.5 = no leakage).", ge=0.5, le=1.0, form=True)
    noise_sigma: float = knob(0.1, "Robustness check: standard deviation of the Gaussian pixel noise (pixels are in [0, 1]).", ge=0.0)
    fgsm_epsilon: float = knob(0.03, "Robustness check: L-infinity size of the FGSM adversarial perturbation.", **PROBABILITY)
    min_noise_accuracy: float = knob(0.85, "Robustness gate: the lowest accuracy under Gaussian noise that may be released.", **PROBABILITY)
    min_fgsm_accuracy: float = knob(0.7, "Robustness gate: the lowest accuracy under FGSM that may be released.", **PROBABILITY, form=True)
    max_dp_epsilon: float = knob(10.0, "Privacy gate: the largest DP epsilon a model fine-tuned with DP-SGD may have spent (ignored without DP).", gt=0.0)
    max_leaks: int = knob(0, "Privacy gate: the most test images that may be exact or near duplicates of a train image.", ge=0)
    near_duplicate_distance: float = knob(0.03, "Privacy check: RMS pixel distance (each image's mean brightness removed; pixels in [0, 1]) at or below which a test and a train image count as near-duplicates.", **PROBABILITY)
    mia_reference_models: int = knob(4, "Privacy check: reference models (trained on the validation split) for the calibrated membership-inference attack; 0 = loss/confidence attacks only.", ge=0, le=64)
    pgd_epsilon: float = knob(0.03, "Robustness check: L-infinity radius of the PGD attack.", **PROBABILITY)
    pgd_steps: int = knob(10, "Robustness check: PGD iterations.", ge=1)
    pgd_step_size: float = knob(0.0, "Robustness check: PGD step size; 0 = 2.5 * pgd_epsilon / pgd_steps.", ge=0.0)
    pgd_random_start: bool = knob(True, "Robustness check: start PGD from a random point in the epsilon ball.")
    min_pgd_accuracy: float = knob(0.5, "Robustness gate: the lowest accuracy under PGD that may be released.", **PROBABILITY)
    corruption_severities: int = knob(5, "Robustness check: common corruptions (noise, blur, contrast, brightness, pixelate) at severities 1..this (at most 5).", ge=1, le=5)
    min_corruption_accuracy: float = knob(0.5, "Robustness gate: the lowest mean accuracy over all corruptions and severities.", **PROBABILITY)
    max_corruption_drop: float = knob(0.5, "Robustness gate: the largest relative drop of the mean corruption accuracy from clean accuracy (0.2 = at most a fifth below it).", **PROBABILITY)
    override: bool = knob(False, "Release even when a gate blocks: the gates still measure and report, and the failure and the override are recorded. Needs override_reason.")
    override_reason: str = knob("", "Who accepts the risk of an override and why (required with override; written into the reports and the run summary).")

    def problems(self, target: str) -> list[str]:
        if self.override and not self.override_reason.strip():
            return ["gates.override needs gates.override_reason: who accepts the risk and why"]
        return []


SERVED_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class ServingConfig:
    host: str = knob("127.0.0.1", "Address the local endpoint binds to; loopback unless you mean to expose it.", local_only=True)
    inference_port: int = knob(8080, "Local inference endpoint port (the auth proxy in front of TorchServe).", local_only=True, **PORT)
    management_port: int = knob(8081, "Local TorchServe management API port (model registration through it is disabled).", local_only=True, **PORT)
    metrics_port: int = knob(8082, "Local TorchServe metrics API port (Prometheus format).", local_only=True, **PORT)
    workers: int = knob(1, "TorchServe workers for the model (Python processes).", ge=1)
    batch_size: int = knob(32, "Dynamic batching: most requests TorchServe hands a worker at once.", ge=1)
    max_batch_delay_ms: int = knob(1, "Dynamic batching: milliseconds TorchServe waits to fill a batch (a lone request waits this long); at least 1.", ge=1)
    unbatched_route: bool = knob(True, "Local server: also serve the model with batches of one, which the auth proxy uses for a request that finds no other in flight, so a lone request does not wait max_batch_delay_ms (one more worker process).", local_only=True)
    request_log_dir: str = knob("", "Where the local server logs every request for monitoring: a directory or an s3:// prefix; empty = <home>/requests. On Kubernetes: KFP_MLOPS_REQUEST_LOG_DIR in the kfp-mlops-storage ConfigMap.", local_only=True)
    request_log_max_mb: float = knob(16.0, "Start a new request-log file when the current one reaches this many MiB.", gt=0.0, local_only=True)
    request_log_max_age_s: float = knob(300.0, "Start a new request-log file when the current one is this many seconds old (uploaded then, for s3://).", gt=0.0, local_only=True)
    model_name: str = knob("digits", "Name the model is served under: /predictions/<model_name>.")
    startup_timeout_s: int = knob(120, "Seconds to wait for the local TorchServe to answer its health check.", ge=1, local_only=True)
    home: str = knob("runs/serving", "Local serving directory (model store, logs, key file, request log); relative to the working directory.", local_only=True)
    deploy_target: str = knob("local", "Where deploy serves the model: 'local' (TorchServe on this machine) or 'kubernetes' (rolls out the serving Deployment from manifests/, with rollback).", choices=("local", "kubernetes"), cluster="kubernetes")
    model_store_uri: str = knob("", "Model store the serving pods fetch releases from (s3:// prefix); empty = the cluster's KFP_MLOPS_MODEL_STORE (kfp-mlops-storage ConfigMap), else where the serving Deployment's init container fetches from.")
    rollout_timeout_s: int = knob(900, "Kubernetes deploy: seconds to wait for the new pods before rolling back.", ge=1)
    ledger_uri: str = knob("", "The release ledger (what was trained, gated, released, rolled back, seen drifting): a directory or an s3:// prefix; empty = KFP_MLOPS_LEDGER (kfp-mlops-storage ConfigMap on a cluster), else <home>/ledger.")

    def problems(self, target: str) -> list[str]:
        out = []
        if not SERVED_NAME.fullmatch(self.model_name):
            out.append(f"serving.model_name {self.model_name!r} may only hold letters, digits, '_', '.' and '-'")
        ports = [self.inference_port, self.management_port, self.metrics_port]
        if target == LOCAL and len(set(ports)) != len(ports):
            out.append(f"serving: inference_port, management_port and metrics_port must differ, got {ports}")
        return out


@dataclass
class RolloutConfig:
    """How a new model (the challenger) replaces the one in production (the champion): at once, or after live
    evidence from mirrored (shadow) or split (canary) traffic. The first release is always 'replace'."""

    strategy: str = knob("replace", "'replace' (serve the new model at once), 'shadow' (it gets a mirrored copy of a share of live requests; only the champion answers; answers compared) or 'canary' (it answers a share of live requests).", choices=("replace", "shadow", "canary"), form=True)
    share: float = knob(0.1, "Share of live requests the challenger gets (mirrored or answered).", gt=0.0, le=1.0)
    min_requests: int = knob(200, "Requests the challenger must have seen before a decision (a criterion that fails decides earlier).", ge=1)
    max_wait_s: float = knob(600.0, "Seconds to wait for min_requests; then on_deadline decides.", gt=0.0)
    max_error_rate_increase: float = knob(0.01, "Challenger error rate (5xx and failed predictions) may exceed the champion's by at most this.", ge=0.0, le=1.0)
    max_p99_ratio: float = knob(1.5, "Challenger p99 latency may be at most this multiple of the champion's.", gt=0.0)
    min_agreement: float = knob(0.98, "Shadow: share of mirrored requests on which the challenger predicts the champion's class, at least.", **PROBABILITY)
    max_confidence_drift_p: float = knob(0.01, "The challenger's confidence distribution is judged drifted from its model reference when the monitor's test gives a p-value below this.", gt=0.0, lt=1.0)
    on_deadline: str = knob("rollback", "What happens when max_wait_s passes without min_requests: 'rollback' (the champion stays) or 'promote'.", choices=("rollback", "promote"))
    replay: bool = knob(True, "Local runs: when no live traffic arrives, replay the test split as traffic so the rollout gets its evidence.", local_only=True)


@dataclass
class MonitorConfig:
    drift_share: float = knob(0.5, "Share of drifted features above which the whole window is called drifted.", gt=0.0, le=1.0)
    replay_limit: int = knob(0, "Test images the pipeline replays to the endpoint before the drift report; 0 replays all.", ge=0)
    sample_epsilon: float = knob(0.02, "Large request-log windows are sampled so that each feature's distribution is within this sup-distance (DKW bound) of the whole window's; 0 reads every request.", ge=0.0, lt=1.0)
    sample_alpha: float = knob(0.01, "Probability that the sampling bound sample_epsilon is exceeded (0.02 and 0.01 mean 6,623 sampled requests).", gt=0.0, lt=1.0)
    report: str = knob("always", "When to build Evidently's HTML report of a window, after the verdict: always, on_alert (drift or schema drift only) or never. The verdict, verdict.json and the metrics are the same either way.", choices=("always", "on_alert", "never"))


@dataclass
class ClusterConfig:
    """Compile-time settings: where the steps run on Kubernetes. Not run parameters."""

    image: str = knob("ghcr.io/kfp-mlops/kfp-mlops:0.1.0", "Container image every step runs in (the Dockerfile's pipeline target, make image).")
    serving_image: str = knob("ghcr.io/kfp-mlops/kfp-mlops-serving:0.1.0", "Container image the deploy step sets on the serving Deployment (the Dockerfile's serving target, make image).")
    gpu_accelerator: str = knob("nvidia.com/gpu", "Accelerator resource the pretrain step requests.")
    gpu_limit: int = knob(1, "Number of accelerators the pretrain step requests.", ge=0)
    gpu_node_selector_key: str = knob("nvidia.com/gpu.present", "Node label that selects GPU nodes for pretrain; empty to skip.")
    gpu_node_selector_value: str = knob("true", "Value of that node label.")
    gpu_toleration_key: str = knob("nvidia.com/gpu", "Taint key the pretrain pod tolerates; empty to skip.")
    gpu_toleration_effect: str = knob("NoSchedule", "Effect of the tolerated taint.", choices=("NoSchedule", "PreferNoSchedule", "NoExecute"))
    gpu_finetune: bool = knob(False, "Also place finetune on a GPU (same accelerator, limit, node selector and toleration as pretrain).")
    image_pull_policy: str = knob("IfNotPresent", "imagePullPolicy of every step: IfNotPresent (pinned tag or digest), Always (a moving tag) or Never.", choices=("IfNotPresent", "Always", "Never"))
    run_as_user: int = knob(10001, "UID every step container runs as (non-root; the image's 'mlops' user).", ge=1)
    run_as_group: int = knob(10001, "GID every step container runs as.", ge=1)
    s3_secret_name: str = knob(names.PIPELINE_S3_SECRET, "Secret whose S3 keys become env vars of the steps that touch storage (ingest, pretrain, evaluate, record, deploy, monitor); empty for workload identity.")
    s3_access_key_id_key: str = knob("AWS_ACCESS_KEY_ID", "Key in that Secret holding the access key id (env AWS_ACCESS_KEY_ID).")
    s3_secret_access_key_key: str = knob("AWS_SECRET_ACCESS_KEY", "Key in that Secret holding the secret access key (env AWS_SECRET_ACCESS_KEY).")
    storage_config_map: str = knob(names.STORAGE_CONFIG_MAP, "ConfigMap with the non-secret storage settings (S3_ENDPOINT_URL, AWS_REGION, S3_ADDRESSING_STYLE, AWS_MAX_ATTEMPTS, KFP_MLOPS_MODEL_STORE, KFP_MLOPS_LEDGER) for the same steps; empty to skip.")
    step_overrides: str = knob("", "Per-step pod settings over the built-in defaults, 'step.setting=value' comma-separated (e.g. 'pretrain.timeout_s=43200,finetune.memory_limit=16Gi'); settings: cpu_request, cpu_limit, memory_request, memory_limit, timeout_s, retries.")
    retry_backoff_s: int = knob(30, "Seconds before the first retry of a failed retryable step (ingest, pretrain, finetune, evaluate, privacy, robustness, record).", ge=0)
    retry_backoff_factor: float = knob(2.0, "Each further retry waits this many times longer.", ge=1.0)
    retry_backoff_max_s: int = knob(3600, "Upper bound on the retry backoff (KFP backoff_max_duration).", ge=0)
    kfp_host: str = knob("", "Kubeflow Pipelines API URL for mlops submit/schedule (e.g. http://localhost:8888 after kubectl port-forward); empty = the in-cluster service when run in a pod.")
    namespace: str = knob("kfp-mlops", "Namespace (KFP profile) of experiments, runs and schedules on multi-user KFP; ignored by single-user KFP.")
    service_account: str = knob(names.PIPELINE_SERVICE_ACCOUNT, "ServiceAccount the run's pods use; set on the run at submit, not per task.")
    experiment: str = knob("kfp-mlops", "KFP experiment runs and schedules go into (created if missing).")
    pipeline_name: str = knob("kfp-mlops", "Name the pipeline is uploaded under; a changed compile becomes a new version of it.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Areas whose fields become pipeline run parameters (cluster is compile-time only).
PARAMETER_AREAS = ("data", "pretrain", "finetune", "gates", "serving", "rollout", "monitor")


class ConfigError(ValueError):
    """A config with problems; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str], where: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where} has {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n{lines}")


@dataclass(frozen=True)
class Parameter:
    """One flattened config field: ``area_field``, with what it allows and where it applies."""

    area: str
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    cluster_default: Any = SAME
    local_only: bool = False
    form: bool = False  # a box of its own in the cluster run form

    @property
    def key(self) -> str:
        return f"{self.area}_{self.name}"

    @property
    def dotted(self) -> str:
        return f"{self.area}.{self.name}"

    def default_for(self, target: str) -> Any:
        if target == CLUSTER and self.cluster_default is not SAME:
            return self.cluster_default
        return self.default

    def value_in(self, cfg: Config) -> Any:
        """This field's value in ``cfg``."""
        return getattr(getattr(cfg, self.area), self.name)

    def range_text(self) -> str:
        """The allowed values in words ('' when any value of the type goes)."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if bound is not None]
        return " and ".join(parts)

    def check(self, value: Any) -> str | None:
        """The problem with an already typed value, or None."""
        if self.choices and value not in self.choices:
            return f"{self.dotted} must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        if self.type in (int, float):
            if self.type is float and not math.isfinite(value):
                return f"{self.dotted} must be a finite number, got {value!r}"
            if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)):
                return f"{self.dotted} must be {self.range_text()}, got {value!r}"
        return None


def _area_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _parameters_of(area: str, cls: type) -> list[Parameter]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        out.append(Parameter(area, f.name, hints[f.name], f.default, m["help"], m.get("choices"), m.get("ge"),
                             m.get("gt"), m.get("le"), m.get("lt"), m.get("cluster", SAME),
                             m.get("local_only", False), m.get("form", False)))
    return out


def parameters(areas: tuple[str, ...] = PARAMETER_AREAS, target: str = LOCAL) -> list[Parameter]:
    """Every config field of the given areas that applies on ``target``, flattened, in declaration order."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    area_types = _area_types()
    return [p for area in areas for p in _parameters_of(area, area_types[area])
            if not (target == CLUSTER and p.local_only)]


def coerce(value: Any, typ: type, where: str) -> Any:
    """``value`` as ``typ``, strictly: no silent rounding, no text for numbers, no lists for text."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "yes", "on")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ValueError(f"{where} must be text, got {type(value).__name__} {value!r}{hint}")
        return value
    raise TypeError(f"{where}: unsupported config type {typ!r}")


def defaults(target: str = LOCAL) -> Config:
    """The default config on ``target`` (a cluster differs where a field says ``cluster=``)."""
    cfg = Config(**{area: cls() for area, cls in _area_types().items()})  # the area classes as declared now
    if target == CLUSTER:
        for p in parameters(tuple(_area_types()), CLUSTER):
            if p.cluster_default is not SAME:
                setattr(getattr(cfg, p.area), p.name, p.cluster_default)
    return cfg


def problems(cfg: Config, target: str = LOCAL) -> list[str]:
    """Every problem of a config: each field's type, range and choices, then each area's own rules."""
    out, flawed = [], set()
    for p in parameters(tuple(_area_types()), target):
        value = p.value_in(cfg)
        try:
            value = coerce(value, p.type, p.dotted)
        except ValueError as err:
            out.append(str(err))
            flawed.add(p.area)
            continue
        problem = p.check(value)
        if problem:
            out.append(problem)
            flawed.add(p.area)
    for area in _area_types():
        check: Callable[[str], list[str]] | None = getattr(getattr(cfg, area), "problems", None)
        if check is not None and area not in flawed:  # the area's rules assume valid fields
            out += check(target)
    return out


def validate(cfg: Config, target: str = LOCAL, where: str = "config") -> Config:
    """``cfg`` if it has no problem, else ``ConfigError`` listing them all."""
    found = problems(cfg, target)
    if found:
        raise ConfigError(found, where)
    return cfg


def from_dict(data: dict[str, Any] | None, target: str = LOCAL, where: str = "config") -> Config:
    """Build and validate a Config from a nested dict (as read from YAML) over ``target``'s defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(data).__name__}"], where)
    cfg = defaults(target)
    found = []
    area_types = _area_types()
    for area in data:
        if area not in area_types:
            found.append(f"unknown config section {area!r}; known: {', '.join(area_types)}")
    for area in area_types:
        values = data.get(area)
        if values is None:
            continue
        if not isinstance(values, dict):
            found.append(f"config section '{area}' must be a mapping, got {type(values).__name__}")
            continue
        by_name = {p.name: p for p in _parameters_of(area, area_types[area])}
        for name, value in values.items():
            p = by_name.get(name)
            if p is None:
                found.append(f"unknown key {name!r} in config section '{area}'; known: {', '.join(by_name)}")
                continue
            try:
                setattr(getattr(cfg, area), name, coerce(value, p.type, p.dotted))
            except ValueError as err:
                found.append(str(err))
    found += problems(cfg, target)  # a field that failed to parse kept its (valid) default
    if found:
        raise ConfigError(found, where)
    return cfg


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's numbers: ``1e-5`` is a float (PyYAML's 1.1 rules read it as text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*(?:[eE][-+]?\d+)|\d[\d_]*\.[\d_]*|\.[\d_]+(?:[eE][-+]?\d+)?"
               r"|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def load(path: str | Path | None, target: str = LOCAL) -> Config:
    """Read and validate a YAML config file; ``None`` gives the defaults for ``target``."""
    if path is None:
        return defaults(target)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"not valid YAML{at}: {problem}"], str(path)) from None
    return from_dict(data, target, where=str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_parameters(cfg: Config, target: str = LOCAL) -> dict[str, Any]:
    """The run parameters of a config, keyed ``area_field`` as in the pipeline (local-only fields left out on a cluster)."""
    return {p.key: p.value_in(cfg) for p in parameters(target=target)}


# Settings whose flag is spelled without the area, the same on every command that takes them (the generated
# --cluster-kfp-host form still parses, hidden from the help).
FLAG_SPELLINGS = {"cluster_kfp_host": "--kfp-host", "cluster_namespace": "--namespace",
                  "cluster_experiment": "--experiment", "cluster_pipeline_name": "--pipeline-name",
                  "cluster_service_account": "--service-account"}


def flag_of(p: Parameter) -> str:
    """The command-line flag of a field: ``--area-field``, or its spelling in ``FLAG_SPELLINGS``."""
    return FLAG_SPELLINGS.get(p.key, "--" + p.key.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, areas: tuple[str, ...] = tuple(_area_types()), *,
              only: frozenset[str] | None = None, shown: frozenset[str] | None = None, more: str = "") -> None:
    """Add one flag per config field (``flag_of``); each defaults to None (= keep the config's value).

    ``only``: just these fields (keys ``area_field``). ``shown``: the fields whose flags ``--help`` lists; the others
    parse the same, their help kept in the action's ``full_help``, and their area's group says so with ``more``
    (formatted with ``area`` and ``count``) in its description, the full one kept in ``full_description``.
    """
    for area in areas:
        params = [p for p in parameters((area,)) if only is None or p.key in only]
        if not params:
            continue
        hidden = [p for p in params if shown is not None and p.key not in shown]
        full = f"{area} settings (override --config)"
        description = more.format(area=area, count=len(hidden)) if hidden else None
        group = parser.add_argument_group(full, description)
        group.full_description = None
        for p in params:
            flag = flag_of(p)
            spellings = (flag, "--" + p.key.replace("_", "-")) if flag != "--" + p.key.replace("_", "-") else (flag,)
            if p.type is bool:
                kwargs = dict(action=argparse.BooleanOptionalAction, help=f"{p.help} (default: {p.default})")
            elif p.choices:
                kwargs = dict(type=p.type, choices=p.choices, help=f"{p.help} (default: {p.default!r})")
            else:
                kwargs = dict(type=p.type, metavar=p.type.__name__.upper(), help=f"{p.help} (default: {p.default!r})")
            action = group.add_argument(spellings[0], dest=p.key, default=None, **kwargs)
            if p in hidden:
                action.full_help, action.help = action.help, argparse.SUPPRESS
            for alias in spellings[1:]:  # the generated spelling of a renamed flag: parses, not listed
                group.add_argument(alias, dest=p.key, default=None, **{**kwargs, "help": argparse.SUPPRESS})


def apply_flags(cfg: Config, args: argparse.Namespace, target: str = LOCAL) -> Config:
    """A validated copy of cfg with every flag the user gave applied."""
    cfg = dataclasses.replace(cfg, **{a: dataclasses.replace(getattr(cfg, a)) for a in _area_types()})
    for p in parameters(tuple(_area_types())):
        value = getattr(args, p.key, None)
        if value is not None:
            setattr(getattr(cfg, p.area), p.name, value)
    return validate(cfg, target, "the settings")
