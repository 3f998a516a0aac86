"""Privacy check: does the model leak which images it was trained on?

A membership-inference audit. A model that memorised its training set is more
sure of itself (lower loss, higher confidence) on training images than on
images it never saw; an attacker who can query the model can exploit that gap
to tell "was this record in the training data?". We run the two standard
black-box attacks that need no shadow models:

* **loss threshold** (Yeom et al. 2018): call an example a member when the
  model's cross-entropy on it is low;
* **confidence threshold**: call it a member when the top softmax probability
  is high (needs no label).

Members are the train split, non-members the test split, subsampled to equal
size so that 0.5 AUC / 50 % accuracy is exactly "no better than a coin". The
gate blocks the release when the stronger attack's ROC AUC exceeds a limit.
"""

# No `from __future__ import annotations`: KFP reads the component's annotations as real types.
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

LOW_FPR = 0.01  # operating point reported as "TPR at 1 % FPR" (Carlini et al. 2022)


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


@torch.no_grad()
def per_example_loss_and_confidence(
    model: nn.Module, x: Any, y: Any, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example cross-entropy, top softmax probability and correctness, in batches."""
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    device = next(model.parameters()).device
    losses, confidences, correct = [], [], []
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device)).float()
        targets = y[i : i + batch_size].to(device)
        # log_softmax keeps tiny losses distinguishable where softmax probabilities round to 1.0
        log_probs = F.log_softmax(logits, dim=1)
        losses.append(F.nll_loss(log_probs, targets, reduction="none").cpu())
        confidences.append(log_probs.max(dim=1).values.exp().cpu())
        correct.append((logits.argmax(dim=1) == targets).cpu())
    return torch.cat(losses).numpy(), torch.cat(confidences).numpy(), torch.cat(correct).numpy()


def _balanced_indices(n_members: int, n_nonmembers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subsample the larger side (without replacement) to the size of the smaller one."""
    n = min(n_members, n_nonmembers)
    rng = np.random.default_rng(seed)
    pick = lambda total: np.sort(rng.choice(total, size=n, replace=False)) if total > n else np.arange(total)
    return pick(n_members), pick(n_nonmembers)


def _tpr_at_fpr(is_member: np.ndarray, score: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(is_member, score)
    return float(tpr[fpr <= max_fpr].max())  # roc_curve always starts at (0, 0)


def _best_balanced_accuracy(is_member: np.ndarray, score: np.ndarray) -> float:
    """Accuracy of the best single threshold; with equal class sizes it is (TPR + TNR) / 2."""
    fpr, tpr, _ = roc_curve(is_member, score)
    return float(((tpr + 1.0 - fpr) / 2.0).max())


def membership_inference_audit(
    model: nn.Module,
    members_x: Any,
    members_y: Any,
    nonmembers_x: Any,
    nonmembers_y: Any,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Run loss- and confidence-threshold membership-inference attacks against ``model``.

    Args:
        model: a classifier returning logits; used as is (put it in eval mode first).
        members_x, members_y: images ``[N, C, H, W]`` and labels the model was trained on.
        nonmembers_x, nonmembers_y: images and labels it never saw (same distribution).
        seed: seed of the subsampling that balances the two sides.
        batch_size: inference batch size.

    Returns:
        A dict with ``loss_attack_auc``, ``confidence_attack_auc``, ``mia_auc`` (the larger of
        the two: the gate's number), ``tpr_at_1pct_fpr`` and ``attack_accuracy`` (of the stronger
        attack), mean loss / confidence / accuracy on each side, and ``n_per_side``.
    """
    if len(members_x) != len(members_y) or len(nonmembers_x) != len(nonmembers_y):
        raise ValueError(
            f"images and labels differ in length: members {len(members_x)} vs {len(members_y)}, "
            f"non-members {len(nonmembers_x)} vs {len(nonmembers_y)}"
        )
    if len(members_x) < 2 or len(nonmembers_x) < 2:
        raise ValueError(
            f"membership inference needs at least 2 members and 2 non-members, got {len(members_x)} and "
            f"{len(nonmembers_x)}; check that the dataset's train and test splits are not empty"
        )
    member_idx, nonmember_idx = _balanced_indices(len(members_x), len(nonmembers_x), seed)
    m_loss, m_conf, m_correct = per_example_loss_and_confidence(
        model, _as_tensor(members_x, torch.float32)[member_idx], _as_tensor(members_y, torch.int64)[member_idx], batch_size
    )
    n_loss, n_conf, n_correct = per_example_loss_and_confidence(
        model, _as_tensor(nonmembers_x, torch.float32)[nonmember_idx], _as_tensor(nonmembers_y, torch.int64)[nonmember_idx], batch_size
    )

    is_member = np.concatenate([np.ones(len(m_loss)), np.zeros(len(n_loss))])
    loss_score = -np.concatenate([m_loss, n_loss])  # lower loss => member, so the score is -loss
    confidence_score = np.concatenate([m_conf, n_conf])
    loss_auc = float(roc_auc_score(is_member, loss_score))
    confidence_auc = float(roc_auc_score(is_member, confidence_score))
    # Report the operating points of whichever attack is stronger: the gate takes the worst case.
    strongest = loss_score if loss_auc >= confidence_auc else confidence_score
    return {
        "loss_attack_auc": loss_auc,
        "confidence_attack_auc": confidence_auc,
        "mia_auc": max(loss_auc, confidence_auc),
        "strongest_attack": "loss" if loss_auc >= confidence_auc else "confidence",
        "tpr_at_1pct_fpr": _tpr_at_fpr(is_member, strongest, LOW_FPR),
        "attack_accuracy": _best_balanced_accuracy(is_member, strongest),
        "member_mean_loss": float(m_loss.mean()),
        "nonmember_mean_loss": float(n_loss.mean()),
        "member_mean_confidence": float(m_conf.mean()),
        "nonmember_mean_confidence": float(n_conf.mean()),
        "member_accuracy": float(m_correct.mean()),
        "nonmember_accuracy": float(n_correct.mean()),
        "n_per_side": int(len(m_loss)),
    }


def validate_privacy_limits(max_mia_auc: float) -> None:
    if not isinstance(max_mia_auc, (int, float)) or isinstance(max_mia_auc, bool) or not math.isfinite(max_mia_auc):
        raise ValueError(f"max_mia_auc must be a number in [0.5, 1], got {max_mia_auc!r}")
    if not 0.5 <= max_mia_auc <= 1.0:
        raise ValueError(
            f"max_mia_auc must be in [0.5, 1] (0.5 = an attack no better than a coin, 1 = any leakage allowed), "
            f"got {max_mia_auc}"
        )


def privacy_check(dataset_dir: str, model_dir: str, max_mia_auc: float, seed: int = 0) -> dict[str, Any]:
    """Audit the model at ``model_dir`` with its train split as members and test split as non-members.

    Returns the audit numbers plus ``max_mia_auc``, ``passed`` and ``reason`` (the limit and the numbers).
    """
    from components.data import load_splits
    from components.models import load_classifier

    validate_privacy_limits(max_mia_auc)
    splits = load_splits(dataset_dir)
    model, _ = load_classifier(model_dir)
    audit = membership_inference_audit(model, splits.train_x, splits.train_y, splits.test_x, splits.test_y, seed=seed)
    passed = audit["mia_auc"] <= max_mia_auc
    reason = (
        f"membership-inference AUC {audit['mia_auc']:.3f} {'<=' if passed else '>'} max {max_mia_auc:.3f} "
        f"({audit['strongest_attack']} attack, {audit['n_per_side']} members vs {audit['n_per_side']} non-members)"
    )
    return {**audit, "max_mia_auc": float(max_mia_auc), "seed": int(seed), "passed": bool(passed), "reason": reason}


def render_privacy_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``privacy_check`` result for the KFP UI."""
    r = result
    verdict = "PASSED" if r["passed"] else "FAILED"
    return f"""# Privacy check: membership inference — {verdict}

**{r['reason']}**

## What was measured
Could an attacker who can query the model tell whether an image was in its training set?
Members are {r['n_per_side']} train images, non-members {r['n_per_side']} test images (the larger side is
subsampled with seed {r['seed']}, so both sides are equal and chance is exactly 0.5). Two threshold attacks:
*loss* (low cross-entropy ⇒ member) and *confidence* (high top softmax probability ⇒ member).
The gate uses the stronger attack's ROC AUC.

| attack | ROC AUC |
|---|---|
| loss threshold | {r['loss_attack_auc']:.3f} |
| confidence threshold | {r['confidence_attack_auc']:.3f} |
| **strongest ({r['strongest_attack']})** | **{r['mia_auc']:.3f}** (max allowed {r['max_mia_auc']:.3f}) |

| strongest attack | value |
|---|---|
| TPR at 1% FPR | {r['tpr_at_1pct_fpr']:.3f} |
| best balanced attack accuracy | {r['attack_accuracy']:.3f} |

| | members (train) | non-members (test) |
|---|---|---|
| mean loss | {r['member_mean_loss']:.4f} | {r['nonmember_mean_loss']:.4f} |
| mean top confidence | {r['member_mean_confidence']:.4f} | {r['nonmember_mean_confidence']:.4f} |
| accuracy | {r['member_accuracy']:.3f} | {r['nonmember_accuracy']:.3f} |

## How to read it
* **AUC 0.5**: the attack is a coin toss — the model behaves the same on seen and unseen images.
* **AUC 0.5–0.6**: the usual small generalisation gap of a well-regularised model.
* **AUC well above 0.6**: the model memorised its training data; members can be picked out.
  A TPR at 1% FPR far above 0.01 means some individual records are confidently exposed.
  Remedies: more data, early stopping, weight decay, augmentation, or differentially private training.
* An attack AUC below 0.5 would mean the model is *worse* on its training data — a sign of a data mix-up.
"""


def privacy_component(
    dataset: Input[Dataset],
    model: Input[Model],
    max_mia_auc: float,
    seed: int,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> bool:
    """Privacy gate: membership-inference audit of the fine-tuned model.

    Args:
        dataset: the dataset artifact from ingest (train split = members, test split = non-members).
        model: the classifier artifact from finetune.
        max_mia_auc: the highest membership-inference attack ROC AUC that may be released (0.5 = no leakage).
        seed: seed of the subsampling that balances members and non-members.
        metrics: attack AUCs, TPR at 1% FPR, attack accuracy, the decision and the step's cost.
        report: Markdown report of the audit and the verdict.

    Returns:
        True when the attack AUC is within the limit.
    """
    import os

    from components.cost import log_metrics, measure
    from components.privacy import privacy_check, render_privacy_report

    print(f"privacy: membership-inference audit of {model.path}", flush=True)
    with measure() as cost:
        result = privacy_check(dataset.path, model.path, max_mia_auc=max_mia_auc, seed=seed)
    log_metrics(metrics, {k: v for k, v in result.items() if k != "seed"})
    log_metrics(metrics, cost.as_metrics())
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    with open(report.path, "w") as f:
        f.write(render_privacy_report(result))
    print(f"privacy: {'PASSED' if result['passed'] else 'FAILED'}: {result['reason']}", flush=True)
    return bool(result["passed"])
