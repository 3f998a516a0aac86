"""Privacy check: does the model leak which images it was trained on?

Three questions, one gate:

1. **Membership inference** (``membership``): can an attacker who queries the model
   tell whether an image was in its training data?
2. **Leakage** (``leakage``): exact and near-duplicate images shared by train and
   test, which mean the "unseen" test set was seen.
3. **Differential privacy.** When the model was fine-tuned with DP-SGD
   (``components.train.dp``), its metadata holds the ε spent; the gate checks it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from components.core.data import Splits, load_splits
from components.core.gates import Limit, decide, validate_override, verdict_metrics
from components.core.models import build_classifier, load_classifier
from components.core.settings import Settings
from components.privacy.leakage import find_leaks
from components.privacy.membership import membership_inference_audit, train_reference_models
from components.train.loops import subsample_labels

REFERENCE_EPOCHS = 20  # training epochs of each reference model of the calibrated attack


def validate_privacy_limits(max_mia_auc: float, max_dp_epsilon: float = 10.0, max_leaks: int = 0,
                            near_duplicate_distance: float = 0.03, reference_models: int = 0) -> None:
    if not isinstance(max_mia_auc, (int, float)) or isinstance(max_mia_auc, bool) or not math.isfinite(max_mia_auc):
        raise ValueError(f"max_mia_auc must be a number in [0.5, 1], got {max_mia_auc!r}")
    if not 0.5 <= max_mia_auc <= 1.0:
        raise ValueError(
            f"max_mia_auc must be in [0.5, 1] (0.5 = an attack no better than a coin, 1 = any leakage allowed), "
            f"got {max_mia_auc}"
        )
    if isinstance(max_dp_epsilon, bool) or not isinstance(max_dp_epsilon, (int, float)) or not max_dp_epsilon > 0:
        raise ValueError(f"max_dp_epsilon must be a number > 0 (the largest DP epsilon a model may have spent), "
                         f"got {max_dp_epsilon!r}")
    if isinstance(max_leaks, bool) or not isinstance(max_leaks, int) or max_leaks < 0:
        raise ValueError(f"max_leaks must be a whole number >= 0 (test images allowed to duplicate a train image), "
                         f"got {max_leaks!r}")
    if isinstance(near_duplicate_distance, bool) or not isinstance(near_duplicate_distance, (int, float)) \
            or not 0 <= near_duplicate_distance <= 1:
        raise ValueError(f"near_duplicate_distance must be an RMS pixel distance in [0, 1], got {near_duplicate_distance!r}")
    if isinstance(reference_models, bool) or not isinstance(reference_models, int) or not 0 <= reference_models <= 64:
        raise ValueError(f"reference_models must be a whole number in 0..64 (0 skips the reference attack), "
                         f"got {reference_models!r}")


def training_members(splits: Splits, metadata: dict[str, Any]) -> np.ndarray:
    """Indices into the train split of the images the model actually trained on.

    Fine-tuning may use a stratified ``label_fraction`` of the train split; the unused train
    images are not members, so auditing them as members would understate the leak.
    """
    if "train_indices" in metadata:
        return np.asarray(metadata["train_indices"], dtype=np.int64)
    fraction = float(metadata.get("label_fraction", 1.0))
    if fraction >= 1.0:
        return np.arange(len(splits.train_y))
    return subsample_labels(splits.train_y, fraction, int(metadata.get("seed", 0)))


def privacy_check(dataset_dir: str, model_dir: str, cfg: Settings) -> dict[str, Any]:
    """Audit the model at ``model_dir``: membership inference, train/test leakage, DP budget.

    ``cfg.gates`` holds the limits, the reference models and the override; ``cfg.data.seed``
    seeds the member subsampling and the reference models. Members are the train images the
    model trained on (see ``training_members``), non-members the test split;
    ``gates.mia_reference_models`` > 0 adds the reference-calibrated attack with that many
    models trained on the validation split. Returns every number, the leak list (``leaks``),
    the DP record (``dp``, or None) and the verdict of ``components.core.gates.decide``.
    """
    gates, seed = cfg.gates, cfg.data.seed
    validate_privacy_limits(gates.max_mia_auc, gates.max_dp_epsilon, gates.max_leaks, gates.near_duplicate_distance,
                            gates.mia_reference_models)
    validate_override(gates.override, gates.override_reason)
    splits = load_splits(dataset_dir)
    model, metadata = load_classifier(model_dir)
    members = training_members(splits, metadata)
    references = None
    if gates.mia_reference_models > 0:
        if len(splits.val_y) < 10:
            raise ValueError(f"the reference attack trains on the validation split, which has only {len(splits.val_y)} "
                             f"images; raise data.val_fraction or set gates.mia_reference_models to 0")
        print(f"privacy: training {gates.mia_reference_models} reference models on {len(splits.val_y)} validation "
              f"images", flush=True)
        references = train_reference_models(lambda: build_classifier(metadata), splits.val_x, splits.val_y,
                                            gates.mia_reference_models, epochs=REFERENCE_EPOCHS, seed=seed)
    audit = membership_inference_audit(model, splits.train_x[members], splits.train_y[members],
                                       splits.test_x, splits.test_y, seed=seed, reference_models=references)
    leaks = find_leaks(splits.train_x, splits.test_x, max_distance=gates.near_duplicate_distance)
    dp = metadata.get("dp")

    limits = [Limit("max_mia_auc", "membership-inference AUC", audit["mia_auc"], gates.max_mia_auc, "max",
                    f"({audit['strongest_attack']} attack, {audit['n_per_side']} members vs "
                    f"{audit['n_per_side']} non-members)"),
              Limit("max_leaks", "train/test duplicates", leaks["n_leaks"], gates.max_leaks, "max",
                    f"({leaks['n_exact_duplicates']} exact, {leaks['n_near_duplicates']} near)")]
    if dp:
        limits.append(Limit("max_dp_epsilon", "DP epsilon spent", float(dp["epsilon"]), gates.max_dp_epsilon, "max",
                            f"(delta {dp['delta']:g})"))
    verdict = decide(limits, gates.override, gates.override_reason)
    return {
        **audit,
        "n_leaks": leaks["n_leaks"],
        "n_exact_duplicates": leaks["n_exact_duplicates"],
        "n_near_duplicates": leaks["n_near_duplicates"],
        "leaks": leaks,
        "dp": dp,
        "dp_trained": bool(dp),
        **({"dp_epsilon": float(dp["epsilon"]), "dp_delta": float(dp["delta"])} if dp else {}),
        "n_members_trained": int(len(members)),
        "max_mia_auc": float(gates.max_mia_auc),
        "max_dp_epsilon": float(gates.max_dp_epsilon),
        "max_leaks": int(gates.max_leaks),
        "near_duplicate_distance": float(gates.near_duplicate_distance),
        "seed": int(seed),
        **verdict,
    }


def privacy_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``privacy_check`` result for KFP Metrics (no lists, no text)."""
    skip = {"seed", "leaks", "dp", "strongest_attack", "reason", "blocked_by", "limits_checked", "override_reason",
            "roc"}
    return {**{k: v for k, v in result.items() if k not in skip}, **verdict_metrics(result)}
