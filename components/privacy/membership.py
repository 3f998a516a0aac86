"""Membership inference: can an attacker who queries the model tell which images it trained on?

A model that memorised its training set is more sure of itself on training images
than on images it never saw; the attacks below exploit that gap. Members are the
train images the model actually trained on, non-members the test split, subsampled
to equal size so that 0.5 AUC is exactly "a coin". Attacks:

* **loss threshold** (Yeom et al. 2018): low cross-entropy => member;
* **confidence threshold**: high top softmax probability => member (needs no label);
* **reference-calibrated** (offline LiRA, Carlini et al. 2022, with a shared
  variance): a few reference models trained on the validation split (never
  training data of the audited model) tell how confident a model *typically*
  is on each image; an image on which the audited model is much more confident
  than that is likely a member. It catches memorisation of hard, atypical
  images that plain thresholds miss, at the cost of training the references.

Each attack gives a ROC AUC and a TPR at 1% FPR (how many members are exposed
with few false accusations); the gate takes the largest AUC.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from components.train.adversarial import as_tensor, model_device

LOW_FPR = 0.01  # operating point reported as "TPR at 1 % FPR" (Carlini et al. 2022)


@torch.no_grad()
def per_example_loss_and_confidence(
    model: nn.Module, x: Any, y: Any, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example cross-entropy, top softmax probability and correctness, in batches."""
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    device = model_device(model)
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


@torch.no_grad()
def true_class_logit_margin(model: nn.Module, x: Any, y: Any, batch_size: int = 512) -> np.ndarray:
    """LiRA's statistic: log(p_y / (1 - p_y)) = z_y - logsumexp of the other logits; stable at p_y -> 1."""
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device)).float()
        target = y[i : i + batch_size].to(device)
        true = logits.gather(1, target[:, None]).squeeze(1)
        others = logits.scatter(1, target[:, None], float("-inf")).logsumexp(dim=1)
        out.append((true - others).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def _balanced_indices(n_members: int, n_nonmembers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subsample the larger side (without replacement) to the size of the smaller one."""
    n = min(n_members, n_nonmembers)
    rng = np.random.default_rng(seed)
    pick = lambda total: np.sort(rng.choice(total, size=n, replace=False)) if total > n else np.arange(total)
    return pick(n_members), pick(n_nonmembers)


def _tpr_at_fpr(is_member: np.ndarray, score: np.ndarray, max_fpr: float) -> float:
    fpr, tpr, _ = roc_curve(is_member, score)
    return float(tpr[fpr <= max_fpr].max())  # roc_curve always starts at (0, 0)


def _roc_points(is_member: np.ndarray, score: np.ndarray, auc: float) -> dict[str, Any]:
    """The ROC curve's corners (sklearn drops the collinear points in between) for the report's figure."""
    fpr, tpr, _ = roc_curve(is_member, score)
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr], "auc": auc}


def _best_balanced_accuracy(is_member: np.ndarray, score: np.ndarray) -> float:
    """Accuracy of the best single threshold; with equal class sizes it is (TPR + TNR) / 2."""
    fpr, tpr, _ = roc_curve(is_member, score)
    return float(((tpr + 1.0 - fpr) / 2.0).max())


def train_reference_models(make_model: Callable[[], nn.Module], x: Any, y: Any, n_models: int, epochs: int = 20,
                           batch_size: int = 128, learning_rate: float = 3e-3, seed: int = 0) -> list[nn.Module]:
    """``n_models`` fresh models from ``make_model()``, each trained from scratch with its own seed.

    They are the audit's "OUT" models: trained on data the audited model never trained on, so
    their confidence on an image measures how easy that image is, not whether it was memorised.
    Plain AdamW with weight decay; a different seed per model gives different initialisations
    and batch orders (the spread LiRA's variance estimate needs).
    """
    x, y = as_tensor(x, torch.float32), as_tensor(y, torch.int64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    models = []
    try:
        for k in range(n_models):
            torch.manual_seed(seed * 1000 + k)
            model = make_model().to(device).train()
            if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 2_000_000:
                # Small models train fastest on one thread; on a busy machine extra threads make each
                # step many times slower.
                torch.set_num_threads(1)
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
            g = torch.Generator().manual_seed(seed * 1000 + k)
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=g).split(batch_size):
                    loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            models.append(model.cpu().eval())
    finally:
        torch.set_num_threads(threads)
    return models


def reference_attack_scores(target_margin: np.ndarray, reference_margins: np.ndarray) -> np.ndarray:
    """Offline LiRA with a global variance: how far above the OUT models' mean each image's statistic lies.

    ``reference_margins`` is ``[n_models, n_images]``. Per-image variances from a handful of
    models are too noisy, so one spread is shared (Carlini et al. do the same for few models).
    """
    mean_out = reference_margins.mean(axis=0)
    spread = float(reference_margins.std(axis=0, ddof=1).mean()) if len(reference_margins) > 1 else 1.0
    return (target_margin - mean_out) / max(spread, 1e-6)


def membership_inference_audit(
    model: nn.Module,
    members_x: Any,
    members_y: Any,
    nonmembers_x: Any,
    nonmembers_y: Any,
    seed: int = 0,
    batch_size: int = 512,
    reference_models: list[nn.Module] | None = None,
) -> dict[str, Any]:
    """Run loss-, confidence- and (given ``reference_models``) reference-calibrated attacks against ``model``.

    Args:
        model: a classifier returning logits; used as is (put it in eval mode first).
        members_x, members_y: images ``[N, C, H, W]`` and labels the model was trained on.
        nonmembers_x, nonmembers_y: images and labels it never saw (same distribution).
        seed: seed of the subsampling that balances the two sides.
        batch_size: inference batch size.
        reference_models: models trained on other data (see ``train_reference_models``); none
            skips the reference attack.

    Returns:
        A dict with ``loss_attack_auc``, ``confidence_attack_auc``, ``reference_attack_auc`` (when
        run), ``mia_auc`` (the largest: the gate's number), ``strongest_attack``, TPR at 1% FPR
        per attack and ``tpr_at_1pct_fpr`` / ``attack_accuracy`` of the strongest, mean loss /
        confidence / accuracy on each side, ``n_per_side``, and ``roc``: per attack its ROC curve
        (``fpr``, ``tpr``, ``auc``).
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
    mx, my = as_tensor(members_x, torch.float32)[member_idx], as_tensor(members_y, torch.int64)[member_idx]
    nx, ny = as_tensor(nonmembers_x, torch.float32)[nonmember_idx], as_tensor(nonmembers_y, torch.int64)[nonmember_idx]
    m_loss, m_conf, m_correct = per_example_loss_and_confidence(model, mx, my, batch_size)
    n_loss, n_conf, n_correct = per_example_loss_and_confidence(model, nx, ny, batch_size)

    is_member = np.concatenate([np.ones(len(m_loss)), np.zeros(len(n_loss))])
    scores = {
        "loss": -np.concatenate([m_loss, n_loss]),  # lower loss => member, so the score is -loss
        "confidence": np.concatenate([m_conf, n_conf]),
    }
    if reference_models:
        x_all, y_all = torch.cat([mx, nx]), torch.cat([my, ny])
        target_margin = true_class_logit_margin(model, x_all, y_all, batch_size)
        reference_margins = np.stack([true_class_logit_margin(r, x_all, y_all, batch_size) for r in reference_models])
        scores["reference"] = reference_attack_scores(target_margin, reference_margins)
    aucs = {name: float(roc_auc_score(is_member, score)) for name, score in scores.items()}
    tprs = {name: _tpr_at_fpr(is_member, score, LOW_FPR) for name, score in scores.items()}
    # The gate takes the worst case: report the operating points of whichever attack is strongest.
    strongest = max(aucs, key=lambda name: aucs[name])
    result = {
        "loss_attack_auc": aucs["loss"],
        "confidence_attack_auc": aucs["confidence"],
        "mia_auc": aucs[strongest],
        "strongest_attack": strongest,
        "tpr_at_1pct_fpr": tprs[strongest],
        "attack_accuracy": _best_balanced_accuracy(is_member, scores[strongest]),
        "loss_attack_tpr_at_1pct_fpr": tprs["loss"],
        "confidence_attack_tpr_at_1pct_fpr": tprs["confidence"],
        "member_mean_loss": float(m_loss.mean()),
        "nonmember_mean_loss": float(n_loss.mean()),
        "member_mean_confidence": float(m_conf.mean()),
        "nonmember_mean_confidence": float(n_conf.mean()),
        "member_accuracy": float(m_correct.mean()),
        "nonmember_accuracy": float(n_correct.mean()),
        "n_per_side": int(len(m_loss)),
        "reference_models": len(reference_models or []),
    }
    if "reference" in aucs:
        result["reference_attack_auc"] = aucs["reference"]
        result["reference_attack_tpr_at_1pct_fpr"] = tprs["reference"]
    result["roc"] = {name: _roc_points(is_member, score, aucs[name]) for name, score in scores.items()}
    return result
