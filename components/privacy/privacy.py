"""Privacy check: does the model leak which images it was trained on?

Three questions, one gate:

1. **Membership inference.** A model that memorised its training set is more sure
   of itself on training images than on images it never saw; an attacker who can
   query it can exploit that gap to tell "was this record in the training data?".
   Members are the train images the model actually trained on, non-members the
   test split, subsampled to equal size so that 0.5 AUC is exactly "a coin". Attacks:

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

2. **Leakage.** Exact and near-duplicate images shared by train and test: they
   inflate test accuracy and mean the "unseen" test set was seen. Near-duplicates
   are found with a perceptual (average) hash as a cheap pre-filter, then confirmed
   by the RMS pixel distance after removing each image's mean brightness.

3. **Differential privacy.** When the model was fine-tuned with DP-SGD
   (``components.train.dp``), its metadata holds the ε spent; the gate checks it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

LOW_FPR = 0.01  # operating point reported as "TPR at 1 % FPR" (Carlini et al. 2022)
HASH_SIDE = 8  # average hash of an 8x8 grayscale thumbnail: 64 bits
MAX_LISTED_LEAKS = 50  # pairs listed in the report (all are counted)


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


# ---------------------------------------------------------------------------
# 1. Membership inference
# ---------------------------------------------------------------------------

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


@torch.no_grad()
def true_class_logit_margin(model: nn.Module, x: Any, y: Any, batch_size: int = 512) -> np.ndarray:
    """LiRA's statistic: log(p_y / (1 - p_y)) = z_y - logsumexp of the other logits; stable at p_y -> 1."""
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
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
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    models = []
    try:
        for k in range(n_models):
            torch.manual_seed(seed * 1000 + k)
            model = make_model().to(device).train()
            if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < 2_000_000:
                # Small models train fastest on one thread; on a busy machine extra threads make each
                # step tens of times slower (measured 0.015 s vs 0.44 s per step on 2 shared cores).
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
        confidence / accuracy on each side, and ``n_per_side``.
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
    mx, my = _as_tensor(members_x, torch.float32)[member_idx], _as_tensor(members_y, torch.int64)[member_idx]
    nx, ny = _as_tensor(nonmembers_x, torch.float32)[nonmember_idx], _as_tensor(nonmembers_y, torch.int64)[nonmember_idx]
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
    return result


# ---------------------------------------------------------------------------
# 2. Leakage: duplicates shared by train and test
# ---------------------------------------------------------------------------

def average_hash(images: Any) -> np.ndarray:
    """64-bit average hash per image: grey 8x8 thumbnail, one bit per pixel above the thumbnail's mean.

    Robust to brightness/contrast changes, small noise and resizing; two images whose hashes
    differ in few bits *may* be near-duplicates (to be confirmed by pixel distance).
    """
    x = _as_tensor(images, torch.float32)
    grey = x.mean(dim=1, keepdim=True)
    thumb = F.adaptive_avg_pool2d(grey, (HASH_SIDE, HASH_SIDE)).flatten(1)
    bits = (thumb > thumb.mean(dim=1, keepdim=True)).numpy().astype(np.uint64)
    weights = (np.uint64(1) << np.arange(HASH_SIDE * HASH_SIDE, dtype=np.uint64))
    return (bits * weights).sum(axis=1, dtype=np.uint64)


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between every hash in ``a`` and every hash in ``b``: ``[len(a), len(b)]``."""
    xor = a[:, None] ^ b[None, :]
    return np.bitwise_count(xor).astype(np.int64)


def find_leaks(train_x: Any, test_x: Any, max_distance: float = 0.03, max_hash_bits: int = 12,
               chunk: int = 256) -> dict[str, Any]:
    """Exact and near-duplicate images shared by train and test.

    * **exact**: identical after rounding to 8-bit pixels (what a re-saved PNG keeps);
    * **near**: average hashes within ``max_hash_bits`` of 64 (the pre-filter that keeps this
      cheap on large sets) and RMS pixel distance, after subtracting each image's mean (so a
      brightness shift does not hide a copy), at most ``max_distance`` (pixels in [0, 1]).

    Each test image is counted once, with its closest train match. Returns ``n_exact``,
    ``n_near``, ``n_leaks`` (their sum), ``pairs`` (sorted by distance: ``test_index``,
    ``train_index``, ``distance``, ``hash_bits``, ``kind``), the thresholds, and
    ``nearest_distance`` (the smallest train-test distance among hash candidates, to show
    the margin when nothing leaks).
    """
    if not max_distance >= 0:
        raise ValueError(f"near-duplicate distance must be >= 0 (RMS pixel distance, pixels in [0, 1]), got {max_distance}")
    if not 0 <= max_hash_bits <= HASH_SIDE * HASH_SIDE:
        raise ValueError(f"max_hash_bits must be in 0..{HASH_SIDE * HASH_SIDE}, got {max_hash_bits}")
    train = _as_tensor(train_x, torch.float32)
    test = _as_tensor(test_x, torch.float32)
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(f"train and test images differ in shape: {tuple(train.shape[1:])} vs {tuple(test.shape[1:])}")
    pairs: list[dict[str, Any]] = []
    nearest = math.inf
    if len(train) and len(test):
        # exact: byte-identical after 8-bit rounding
        as_bytes = lambda t: [row.tobytes() for row in (t.clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).numpy()]
        first_in_train: dict[bytes, int] = {}
        for i, key in enumerate(as_bytes(train)):
            first_in_train.setdefault(key, i)
        exact = {i: first_in_train[key] for i, key in enumerate(as_bytes(test)) if key in first_in_train}

        train_hash, test_hash = average_hash(train), average_hash(test)
        centred = lambda t: (t - t.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)
        train_c, test_c = centred(train), centred(test)
        dims = train_c.shape[1]
        for start in range(0, len(test), chunk):
            bits = _hamming(test_hash[start : start + chunk], train_hash)
            rows, cols = np.nonzero(bits <= max_hash_bits)
            if len(rows) == 0:
                continue
            # distances of candidate pairs only, in blocks to bound memory on large sets
            dist = np.empty(len(rows), dtype=np.float64)
            for b in range(0, len(rows), 65536):
                r, c = rows[b : b + 65536], cols[b : b + 65536]
                diff = test_c[start + torch.from_numpy(r)] - train_c[torch.from_numpy(c)]
                dist[b : b + 65536] = (diff.pow(2).sum(dim=1) / dims).sqrt().numpy()
            nearest = min(nearest, float(dist.min()))
            order = np.lexsort((dist, rows))  # by test image, closest candidate first
            first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
            for j in first:
                i = rows[j]
                t = start + int(i)
                if t in exact or dist[j] <= max_distance:
                    kind = "exact" if t in exact else "near"
                    train_index = exact[t] if t in exact else int(cols[j])
                    pairs.append({"test_index": t, "train_index": train_index,
                                  "distance": 0.0 if kind == "exact" else float(dist[j]),
                                  "hash_bits": int(bits[i, train_index]), "kind": kind})
        # An exact copy (after 8-bit rounding) can still miss the hash pre-filter when rounding flips
        # bits close to the thumbnail mean: list every exact match regardless.
        listed = {p["test_index"] for p in pairs}
        for t, j in exact.items():
            if t not in listed:
                bits_apart = int(np.bitwise_count(test_hash[t] ^ train_hash[j]))
                pairs.append({"test_index": t, "train_index": j, "distance": 0.0, "hash_bits": bits_apart, "kind": "exact"})
    pairs.sort(key=lambda p: (p["distance"], p["test_index"]))
    n_exact = sum(p["kind"] == "exact" for p in pairs)
    return {
        "n_exact_duplicates": n_exact,
        "n_near_duplicates": len(pairs) - n_exact,
        "n_leaks": len(pairs),
        "pairs": pairs,
        "near_duplicate_distance": float(max_distance),
        "max_hash_bits": int(max_hash_bits),
        "nearest_distance": nearest if math.isfinite(nearest) else None,
        "n_train": int(len(train)),
        "n_test": int(len(test)),
    }


# ---------------------------------------------------------------------------
# 3. The check and the gate
# ---------------------------------------------------------------------------

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


def training_members(splits, metadata: dict[str, Any]) -> np.ndarray:
    """Indices into the train split of the images the model actually trained on.

    Fine-tuning may use a stratified ``label_fraction`` of the train split; the unused train
    images are not members, so auditing them as members would understate the leak.
    """
    if "train_indices" in metadata:
        return np.asarray(metadata["train_indices"], dtype=np.int64)
    fraction = float(metadata.get("label_fraction", 1.0))
    if fraction >= 1.0:
        return np.arange(len(splits.train_y))
    from components.train.training import subsample_labels

    return subsample_labels(splits.train_y, fraction, int(metadata.get("seed", 0)))


def privacy_check(dataset_dir: str, model_dir: str, max_mia_auc: float, seed: int = 0, *,
                  max_dp_epsilon: float = 10.0, max_leaks: int = 0, near_duplicate_distance: float = 0.03,
                  reference_models: int = 0, reference_epochs: int = 20,
                  override: bool = False, override_reason: str = "") -> dict[str, Any]:
    """Audit the model at ``model_dir``: membership inference, train/test leakage, DP budget.

    Members are the train images the model trained on (see ``training_members``), non-members
    the test split; ``reference_models`` > 0 adds the reference-calibrated attack with that many
    models trained on the validation split. Returns every number, the leak list (``leaks``), the
    DP record (``dp``, or None) and the verdict of ``components.core.gates.decide``.
    """
    from components.core.data import load_splits
    from components.core.gates import Limit, decide, validate_override
    from components.core.models import build_classifier, load_classifier

    validate_privacy_limits(max_mia_auc, max_dp_epsilon, max_leaks, near_duplicate_distance, reference_models)
    validate_override(override, override_reason)
    splits = load_splits(dataset_dir)
    model, metadata = load_classifier(model_dir)
    members = training_members(splits, metadata)
    references = None
    if reference_models > 0:
        if len(splits.val_y) < 10:
            raise ValueError(f"the reference attack trains on the validation split, which has only {len(splits.val_y)} "
                             f"images; raise data.val_fraction or set gates.mia_reference_models to 0")
        print(f"privacy: training {reference_models} reference models on {len(splits.val_y)} validation images", flush=True)
        references = train_reference_models(lambda: build_classifier(metadata), splits.val_x, splits.val_y, reference_models,
                                            epochs=reference_epochs, seed=seed)
    audit = membership_inference_audit(model, splits.train_x[members], splits.train_y[members],
                                       splits.test_x, splits.test_y, seed=seed, reference_models=references)
    leaks = find_leaks(splits.train_x, splits.test_x, max_distance=near_duplicate_distance)
    dp = metadata.get("dp")

    limits = [Limit("max_mia_auc", "membership-inference AUC", audit["mia_auc"], max_mia_auc, "max",
                    f"({audit['strongest_attack']} attack, {audit['n_per_side']} members vs "
                    f"{audit['n_per_side']} non-members)"),
              Limit("max_leaks", "train/test duplicates", leaks["n_leaks"], max_leaks, "max",
                    f"({leaks['n_exact_duplicates']} exact, {leaks['n_near_duplicates']} near)")]
    if dp:
        limits.append(Limit("max_dp_epsilon", "DP epsilon spent", float(dp["epsilon"]), max_dp_epsilon, "max",
                            f"(delta {dp['delta']:g})"))
    verdict = decide(limits, override, override_reason)
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
        "max_mia_auc": float(max_mia_auc),
        "max_dp_epsilon": float(max_dp_epsilon),
        "max_leaks": int(max_leaks),
        "near_duplicate_distance": float(near_duplicate_distance),
        "seed": int(seed),
        **verdict,
    }


def privacy_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``privacy_check`` result for KFP Metrics (no lists, no text)."""
    from components.core.gates import verdict_metrics

    skip = {"seed", "leaks", "dp", "strongest_attack", "reason", "blocked_by", "limits_checked", "override_reason"}
    return {**{k: v for k, v in result.items() if k not in skip}, **verdict_metrics(result)}


def render_privacy_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``privacy_check`` result for the KFP UI."""
    from components.core.gates import verdict_banner, verdict_word

    r = result
    attack_rows = [f"| loss threshold | {r['loss_attack_auc']:.3f} | {r.get('loss_attack_tpr_at_1pct_fpr', float('nan')):.3f} |",
                   f"| confidence threshold | {r['confidence_attack_auc']:.3f} | "
                   f"{r.get('confidence_attack_tpr_at_1pct_fpr', float('nan')):.3f} |"]
    if "reference_attack_auc" in r:
        attack_rows.append(f"| reference-calibrated (offline LiRA, {r['reference_models']} reference models) | "
                           f"{r['reference_attack_auc']:.3f} | {r['reference_attack_tpr_at_1pct_fpr']:.3f} |")
    leaks = r.get("leaks") or {"pairs": [], "n_leaks": r.get("n_leaks", 0), "n_exact_duplicates": 0,
                               "n_near_duplicates": 0, "nearest_distance": None}
    listed = leaks["pairs"][:MAX_LISTED_LEAKS]
    leak_rows = "\n".join(f"| {p['test_index']} | {p['train_index']} | {p['kind']} | {p['distance']:.4f} | {p['hash_bits']} |"
                          for p in listed)
    leak_table = (f"| test index | train index | kind | RMS distance | hash bits differing |\n|---|---|---|---|---|\n{leak_rows}"
                  + (f"\n\n({leaks['n_leaks'] - len(listed)} more not listed)" if leaks["n_leaks"] > len(listed) else "")
                  if listed else "No test image duplicates a train image.")
    nearest = leaks.get("nearest_distance")
    dp = r.get("dp")
    if dp:
        dp_text = (f"Fine-tuned with DP-SGD: **ε = {dp['epsilon']:.2f}** spent at δ = {dp['delta']:g} (target ε "
                   f"{dp['target_epsilon']:g}; max allowed {r['max_dp_epsilon']:g}). Noise multiplier "
                   f"{dp['noise_multiplier']:.3f}, clipping norm {dp['max_grad_norm']:g}, Poisson sampling rate "
                   f"{dp['sample_rate']:.3f}, {dp['steps']} steps, {dp['accountant'].upper()} accountant; trained: "
                   f"{dp['trainable']}. Scope: {dp['scope']}.")
    else:
        dp_text = ("Not trained with differential privacy (set `finetune.dp_epsilon` to fine-tune with DP-SGD); "
                   "the ε limit does not apply.")
    return f"""# Privacy check — {verdict_word(r)}

{verdict_banner(r)}

| limit | measured | allowed |
|---|---|---|
| membership-inference AUC (strongest attack) | {r['mia_auc']:.3f} | <= {r['max_mia_auc']:.3f} |
| train/test duplicates | {r['n_leaks']} | <= {r['max_leaks']} |
| DP ε spent | {f"{dp['epsilon']:.2f}" if dp else "— (no DP)"} | <= {r['max_dp_epsilon']:g} when DP is on |

## Membership inference
Could an attacker who can query the model tell whether an image was in its training set?
Members are {r['n_per_side']} of the {r['n_members_trained']} train images the model trained on, non-members
{r['n_per_side']} test images (the larger side is subsampled with seed {r['seed']}, so chance is exactly 0.5).

| attack | ROC AUC | TPR at 1% FPR |
|---|---|---|
{chr(10).join(attack_rows)}
| **strongest ({r['strongest_attack']})** | **{r['mia_auc']:.3f}** (max allowed {r['max_mia_auc']:.3f}) | **{r['tpr_at_1pct_fpr']:.3f}** |

Best balanced attack accuracy of the strongest attack: {r['attack_accuracy']:.3f}.

| | members (train) | non-members (test) |
|---|---|---|
| mean loss | {r['member_mean_loss']:.4f} | {r['nonmember_mean_loss']:.4f} |
| mean top confidence | {r['member_mean_confidence']:.4f} | {r['nonmember_mean_confidence']:.4f} |
| accuracy | {r['member_accuracy']:.3f} | {r['nonmember_accuracy']:.3f} |

## Leakage: train/test duplicates
{leaks['n_exact_duplicates']} exact and {leaks['n_near_duplicates']} near-duplicate test images (RMS pixel distance after
removing mean brightness <= {r['near_duplicate_distance']:g}, average-hash pre-filter).
{f"Closest train/test pair among hash candidates: {nearest:.4f}." if nearest is not None else ""}

{leak_table}

## Differential privacy
{dp_text}

## How to read it
* **AUC 0.5**: the attack is a coin toss — the model behaves the same on seen and unseen images.
* **AUC 0.5–0.6**: the usual small generalisation gap of a well-regularised model.
* **AUC well above 0.6**: the model memorised its training data; members can be picked out.
  A TPR at 1% FPR far above 0.01 means some individual records are confidently exposed.
  Remedies: more data, early stopping, weight decay, augmentation, or DP-SGD (`finetune.dp_epsilon`).
* An attack AUC below 0.5 would mean the model is *worse* on its training data — a sign of a data mix-up.
* **Duplicates** between train and test mean the test accuracy is partly measured on training data;
  remove them at ingest (exact copies are already dropped there) or split by source.
"""
