"""The one typed config of kfp-mlops.

Each area is a small dataclass; every field has a default and a one-line
description (``doc``). The same fields are:

* loaded from YAML (``mlops run --config FILE``), nested by area;
* overridable by flags (``--pretrain-epochs 5``), generated from the fields;
* the pipeline's root parameters (``pretrain_epochs``), so the KFP UI run form
  shows each one with its description and default.

``ClusterConfig`` is the exception: it is read at compile time (image, GPU
placement) and never becomes a run parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    source: str = doc("digits", "Where the data comes from: 'digits' (built in), a folder of class-named image folders, an .npz with images and labels, or an s3:// prefix.")
    seed: int = doc(0, "Seed of the shuffled train/val/test/pool split; the same seed gives the same split.")
    test_fraction: float = doc(0.2, "Share of all images held out as the test split.")
    val_fraction: float = doc(0.15, "Share of all images used for early stopping and model selection.")
    pool_fraction: float = doc(0.2, "Share of all images kept as an unlabeled pool for self-supervised pretraining only.")
    image_size: int = doc(0, "Resize every image to this square size in pixels; 0 keeps the native size (8 for digits).")


@dataclass
class PretrainConfig:
    objective: str = doc("contrastive", "Self-supervised objective: 'contrastive' (SimCLR NT-Xent) or 'masked' (masked-image reconstruction).")
    epochs: int = doc(60, "Pretraining epochs over the unlabeled images (pool plus train, labels unused).")
    batch_size: int = doc(128, "Pretraining batch size; contrastive learning sees 2x this many views.")
    learning_rate: float = doc(0.001, "AdamW learning rate for pretraining.")
    temperature: float = doc(0.2, "NT-Xent temperature (contrastive objective only).")
    width: int = doc(32, "Channels of the first encoder block; later blocks double it.")
    embed_dim: int = doc(128, "Size of the encoder's output embedding.")
    arch: str = doc("cnn", "Encoder family: 'cnn' (small 4-conv CNN, the digits default), 'resnet' (basic residual blocks) or 'vgg' (VGG-style 3x3 conv stacks).")
    depth: int = doc(0, "Encoder depth: resnet 10/18/34, vgg 11/13/16/19; 0 = the family's default (cnn 4, resnet 18, vgg 16).")
    compile: bool = doc(False, "Compile the encoder with torch.compile (pays off on GPUs for long runs).")
    num_nodes: int = doc(1, "Nodes to pretrain on; more than 1 runs a Kubeflow Trainer v2 TrainJob (needs exchange_uri).")
    gpus_per_node: int = doc(1, "GPUs per TrainJob node, one DDP process each (num_nodes > 1); 0 = CPU nodes. A single-node step uses every GPU its pod has.")
    exchange_uri: str = doc("", "s3:// prefix where a multi-node TrainJob reads the dataset and writes the encoder and its checkpoints.")
    checkpoint_root: str = doc("", "Durable checkpoint root (s3:// prefix or a mounted volume) so a retried pod resumes; empty = the local temp dir (survives kfp.local retries and container restarts only).")
    checkpoint_every_steps: int = doc(0, "Also checkpoint every N optimizer steps (0 = by epoch only).")
    checkpoint_every_epochs: int = doc(1, "Checkpoint every N epochs (0 = by step only).")


@dataclass
class FinetuneConfig:
    epochs: int = doc(40, "Maximum fine-tuning epochs; early stopping usually ends sooner.")
    batch_size: int = doc(64, "Fine-tuning batch size.")
    learning_rate: float = doc(0.002, "AdamW learning rate for the classification head (the encoder's is encoder_lr_scale times it).")
    patience: int = doc(10, "Stop after this many epochs without a better validation loss.")
    label_fraction: float = doc(1.0, "Share of the labeled train split used for fine-tuning (few-label experiments).")
    mode: str = doc("full", "'full' (everything trains), 'partial' (head + the last unfreeze_blocks encoder stages) or 'linear_probe' (head only, encoder frozen).")
    unfreeze_blocks: int = doc(1, "Encoder stages that train in 'partial' mode, counted from the output.")
    encoder_lr_scale: float = doc(0.3, "Encoder learning rate as a multiple of the head's (keeps what pretraining learned).")
    probe_epochs: int = doc(10, "Linear probe, then fine-tune: epochs that train the head alone before the encoder joins (full/partial modes).")
    min_epoch_samples: int = doc(512, "An epoch draws at least this many labeled samples (a small labeled set is reshuffled and repeated), so few-label runs still take enough optimizer steps.")
    compile: bool = doc(False, "Compile the classifier with torch.compile.")
    checkpoint_root: str = doc("", "Durable checkpoint root (s3:// prefix or a mounted volume) so a retried pod resumes; empty = the local temp dir.")
    checkpoint_every_steps: int = doc(0, "Also checkpoint every N optimizer steps (0 = by epoch only).")
    checkpoint_every_epochs: int = doc(1, "Checkpoint every N epochs (0 = by step only).")
    augment_noise_sigma: float = doc(0.0, "Robust training: add Gaussian pixel noise to every training image, its sigma drawn per image from U(0, this); 0 = off. Raises accuracy under noise.")
    adversarial_epsilon: float = doc(0.0, "Robust training: replace a share of each batch with FGSM examples (random start) of this L-infinity size; 0 = off. Raises accuracy under FGSM/PGD.")
    adversarial_fraction: float = doc(0.5, "Robust training: share of each batch replaced by adversarial examples when adversarial_epsilon > 0.")
    dp_epsilon: float = doc(0.0, "Differential privacy: fine-tune with DP-SGD (Opacus) to this target epsilon; 0 = no DP. Uses the dp_* settings instead of epochs/batch_size/learning_rate/mode.")
    dp_delta: float = doc(1e-5, "Differential privacy: target delta; must be below 1/(number of training images).")
    dp_max_grad_norm: float = doc(1.0, "Differential privacy: per-example gradient clipping norm.")
    dp_batch_size: int = doc(256, "Differential privacy: expected batch size of the Poisson sampling (DP-SGD wants large batches).")
    dp_learning_rate: float = doc(0.25, "Differential privacy: SGD (momentum 0.9) learning rate.")
    dp_epochs: int = doc(30, "Differential privacy: epochs the noise is calibrated for (early stopping may end sooner and spend less).")
    dp_trainable: str = doc("normalization", "Differential privacy: what trains: 'normalization' (GroupNorm scales/shifts + projection + head), 'projection' (projection + head), 'head' or 'all'. The embedding is first standardised with validation-split statistics.")


@dataclass
class GateConfig:
    min_test_accuracy: float = doc(0.9, "Evaluation gate: the lowest test accuracy that may be released.")
    max_regression: float = doc(0.005, "Champion/challenger gate: how much lower than the production model's test accuracy (same test split) the new model's may be; negative demands an improvement.")
    champion_model: str = doc("", "The model in production to compare with: a model dir, a .mar, or a storage release (s3://.../latest); empty = the model served from serving.home; 'none' = no comparison.")
    max_mia_auc: float = doc(0.65, "Privacy gate: the highest membership-inference attack AUC that may be released (0.5 = no leakage).")
    noise_sigma: float = doc(0.1, "Robustness check: standard deviation of the Gaussian pixel noise (pixels are in [0, 1]).")
    fgsm_epsilon: float = doc(0.03, "Robustness check: L-infinity size of the FGSM adversarial perturbation.")
    min_noise_accuracy: float = doc(0.85, "Robustness gate: the lowest accuracy under Gaussian noise that may be released.")
    min_fgsm_accuracy: float = doc(0.7, "Robustness gate: the lowest accuracy under FGSM that may be released.")
    max_dp_epsilon: float = doc(10.0, "Privacy gate: the largest DP epsilon a model fine-tuned with DP-SGD may have spent (ignored without DP).")
    max_leaks: int = doc(0, "Privacy gate: the most test images that may be exact or near duplicates of a train image.")
    near_duplicate_distance: float = doc(0.03, "Privacy check: RMS pixel distance (each image's mean brightness removed; pixels in [0, 1]) at or below which a test and a train image count as near-duplicates.")
    mia_reference_models: int = doc(4, "Privacy check: reference models (trained on the validation split) for the calibrated membership-inference attack; 0 = loss/confidence attacks only.")
    pgd_epsilon: float = doc(0.03, "Robustness check: L-infinity radius of the PGD attack.")
    pgd_steps: int = doc(10, "Robustness check: PGD iterations.")
    pgd_step_size: float = doc(0.0, "Robustness check: PGD step size; 0 = 2.5 * pgd_epsilon / pgd_steps.")
    pgd_random_start: bool = doc(True, "Robustness check: start PGD from a random point in the epsilon ball.")
    min_pgd_accuracy: float = doc(0.5, "Robustness gate: the lowest accuracy under PGD that may be released.")
    corruption_severities: int = doc(5, "Robustness check: common corruptions (noise, blur, contrast, brightness, pixelate) at severities 1..this (at most 5).")
    min_corruption_accuracy: float = doc(0.5, "Robustness gate: the lowest mean accuracy over all corruptions and severities.")
    max_corruption_drop: float = doc(0.5, "Robustness gate: the largest relative drop of the mean corruption accuracy from clean accuracy (0.2 = at most a fifth below it).")
    override: bool = doc(False, "Release even when a gate blocks: the gates still measure and report, and the failure and the override are recorded. Needs override_reason.")
    override_reason: str = doc("", "Who accepts the risk of an override and why (required with override; written into the reports and the run summary).")


@dataclass
class ServingConfig:
    host: str = doc("127.0.0.1", "Address TorchServe binds to; loopback unless you mean to expose it.")
    inference_port: int = doc(8080, "TorchServe inference API port.")
    management_port: int = doc(8081, "TorchServe management API port (model registration through it is disabled).")
    metrics_port: int = doc(8082, "TorchServe metrics API port (Prometheus format).")
    workers: int = doc(1, "TorchServe workers for the model (Python processes; measured best on 2 cores: 1, see README 'Serving').")
    batch_size: int = doc(32, "Dynamic batching: most requests TorchServe hands a worker at once.")
    max_batch_delay_ms: int = doc(1, "Dynamic batching: milliseconds TorchServe waits to fill a batch (a lone request waits this long); at least 1.")
    request_log_dir: str = doc("", "Where the handler logs every request for monitoring: a directory or an s3:// prefix; empty = <home>/requests. Local serving (mlops serve, the deploy step); on Kubernetes: KFP_MLOPS_REQUEST_LOG_DIR in the kfp-mlops-storage ConfigMap.")
    request_log_max_mb: float = doc(16.0, "Start a new request-log file when the current one reaches this many MiB.")
    request_log_max_age_s: float = doc(3600.0, "Start a new request-log file when the current one is this many seconds old (uploaded then, for s3://).")
    model_name: str = doc("digits", "Name the model is served under: /predictions/<model_name>.")
    startup_timeout_s: int = doc(120, "Seconds to wait for TorchServe to answer its health check.")
    home: str = doc("runs/serving", "Local serving directory (model store, logs, key file, request log); relative to the working directory.")
    deploy_target: str = doc("local", "Where deploy serves the model: 'local' (TorchServe on this machine) or 'kubernetes' (rolls out the serving Deployment from manifests/, with rollback).")
    model_store_uri: str = doc("", "Model store the serving pods fetch releases from (s3:// prefix); needed when deploy_target is 'kubernetes'.")
    rollout_timeout_s: int = doc(900, "Kubernetes deploy: seconds to wait for the new pods before rolling back.")


@dataclass
class MonitorConfig:
    drift_share: float = doc(0.5, "Share of drifted features above which the whole window is called drifted.")
    replay_limit: int = doc(0, "Test images the pipeline replays to the endpoint before the drift report; 0 replays all.")
    sample_epsilon: float = doc(0.02, "Large request-log windows are sampled so that each feature's distribution is within this sup-distance (DKW bound) of the whole window's; 0 reads every request.")
    sample_alpha: float = doc(0.01, "Probability that the sampling bound sample_epsilon is exceeded (0.02 and 0.01 mean 6,623 sampled requests).")


@dataclass
class ClusterConfig:
    """Compile-time settings: where the steps run on Kubernetes. Not run parameters."""

    image: str = doc("ghcr.io/kfp-mlops/kfp-mlops:0.1.0", "Container image every step runs in (built from the root Dockerfile).")
    gpu_accelerator: str = doc("nvidia.com/gpu", "Accelerator resource the pretrain step requests.")
    gpu_limit: int = doc(1, "Number of accelerators the pretrain step requests.")
    gpu_node_selector_key: str = doc("nvidia.com/gpu.present", "Node label that selects GPU nodes for pretrain; empty to skip.")
    gpu_node_selector_value: str = doc("true", "Value of that node label.")
    gpu_toleration_key: str = doc("nvidia.com/gpu", "Taint key the pretrain pod tolerates; empty to skip.")
    gpu_toleration_effect: str = doc("NoSchedule", "Effect of the tolerated taint.")
    gpu_finetune: bool = doc(False, "Also place finetune on a GPU (same accelerator, limit, node selector and toleration as pretrain).")
    image_pull_policy: str = doc("IfNotPresent", "imagePullPolicy of every step: IfNotPresent (pinned tag or digest), Always (a moving tag) or Never.")
    run_as_user: int = doc(10001, "UID every step container runs as (non-root; the image's 'mlops' user).")
    run_as_group: int = doc(10001, "GID every step container runs as.")
    s3_secret_name: str = doc("kfp-mlops-s3", "Secret whose S3 keys become env vars of the steps that touch storage (ingest, pretrain, deploy, monitor); empty for workload identity.")
    s3_access_key_id_key: str = doc("AWS_ACCESS_KEY_ID", "Key in that Secret holding the access key id (env AWS_ACCESS_KEY_ID).")
    s3_secret_access_key_key: str = doc("AWS_SECRET_ACCESS_KEY", "Key in that Secret holding the secret access key (env AWS_SECRET_ACCESS_KEY).")
    storage_config_map: str = doc("kfp-mlops-storage", "ConfigMap with the non-secret storage settings (S3_ENDPOINT_URL, AWS_REGION, S3_ADDRESSING_STYLE, AWS_MAX_ATTEMPTS) for the same steps; empty to skip.")
    step_overrides: str = doc("", "Per-step pod settings over the built-in defaults, 'step.setting=value' comma-separated (e.g. 'pretrain.timeout_s=43200,finetune.memory_limit=16Gi'); settings: cpu_request, cpu_limit, memory_request, memory_limit, timeout_s, retries.")
    retry_backoff_s: int = doc(30, "Seconds before the first retry of a failed retryable step (ingest, pretrain, finetune, evaluate, privacy, robustness).")
    retry_backoff_factor: float = doc(2.0, "Each further retry waits this many times longer.")
    retry_backoff_max_s: int = doc(3600, "Upper bound on the retry backoff (KFP backoff_max_duration).")
    kfp_host: str = doc("", "Kubeflow Pipelines API URL for mlops submit/schedule (e.g. http://localhost:8888 after kubectl port-forward); empty = the in-cluster service when run in a pod.")
    namespace: str = doc("kfp-mlops", "Namespace (KFP profile) of experiments, runs and schedules on multi-user KFP; ignored by single-user KFP.")
    service_account: str = doc("kfp-mlops-pipeline", "ServiceAccount the run's pods use; set on the run at submit, not per task.")
    experiment: str = doc("kfp-mlops", "KFP experiment runs and schedules go into (created if missing).")
    pipeline_name: str = doc("kfp-mlops", "Name the pipeline is uploaded under; a changed compile becomes a new version of it.")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# Areas whose fields become pipeline run parameters (cluster is compile-time only).
PARAMETER_AREAS = ("data", "pretrain", "finetune", "gates", "serving", "monitor")


@dataclass(frozen=True)
class Parameter:
    """One flattened config field: ``area_field``."""

    area: str
    name: str
    type: type
    default: Any
    help: str

    @property
    def key(self) -> str:
        return f"{self.area}_{self.name}"


def _area_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def parameters(areas: tuple[str, ...] = PARAMETER_AREAS) -> list[Parameter]:
    """Every config field of the given areas, flattened, in declaration order."""
    out = []
    area_types = _area_types()
    for area in areas:
        cls = area_types[area]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append(Parameter(area, f.name, hints[f.name], f.default, f.metadata["help"]))
    return out


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a Config from a nested dict (as read from YAML), rejecting unknown keys."""
    data = data or {}
    area_types = _area_types()
    unknown = set(data) - set(area_types)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(area_types)}")
    kwargs = {}
    for area, cls in area_types.items():
        values = data.get(area) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section '{area}' must be a mapping, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - names
        if bad:
            raise ValueError(f"unknown key(s) {sorted(bad)} in config section '{area}'; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs[area] = cls(**{k: _coerce(v, hints[k], f"{area}.{k}") for k, v in values.items()})
    return Config(**kwargs)


def _coerce(value: Any, typ: type, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be {typ.__name__}, got {value!r}") from None
    return value


def load(path: str | Path | None) -> Config:
    """Read a YAML config file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    return from_dict(yaml.safe_load(path.read_text()) or {})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_parameters(cfg: Config) -> dict[str, Any]:
    """The run parameters of a config, keyed ``area_field`` as in the pipeline."""
    return {p.key: getattr(getattr(cfg, p.area), p.name) for p in parameters()}


def add_flags(parser: argparse.ArgumentParser, areas: tuple[str, ...] = tuple(_area_types())) -> None:
    """Add one ``--area-field`` flag per config field; each defaults to None (= keep the config's value)."""
    for area in areas:
        group = parser.add_argument_group(f"{area} settings (override --config)")
        for p in parameters((area,)):
            flag = "--" + p.key.replace("_", "-")
            if p.type is bool:
                group.add_argument(flag, dest=p.key, default=None, action=argparse.BooleanOptionalAction,
                                   help=f"{p.help} (default: {p.default})")
            else:
                group.add_argument(flag, dest=p.key, default=None, type=p.type, metavar=p.type.__name__.upper(),
                                   help=f"{p.help} (default: {p.default!r})")


def apply_flags(cfg: Config, args: argparse.Namespace) -> Config:
    """Return a copy of cfg with every flag the user gave applied."""
    cfg = dataclasses.replace(cfg, **{a: dataclasses.replace(getattr(cfg, a)) for a in _area_types()})
    for p in parameters(tuple(_area_types())):
        value = getattr(args, p.key, None)
        if value is not None:
            setattr(getattr(cfg, p.area), p.name, value)
    return cfg
