"""Saliency: which pixels move the predicted class's logit (SmoothGrad), for a few test images picked for the report.

The images (grey) and their maps travel as small nested lists in the result, and the report draws them with
plotly (``components.core.plots.saliency_overlay``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SALIENCY_EXAMPLES = 8  # test images explained in the report: mistakes first, then correct ones
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15  # noise std as a share of the pixel range [0, 1]


def saliency_maps(model, images, targets=None, samples: int = SMOOTHGRAD_SAMPLES, noise: float = SMOOTHGRAD_NOISE,
                  seed: int = 0) -> np.ndarray:
    """Gradient of the target logit with respect to each input pixel, as |grad| maxed over channels: [N, H, W].

    ``targets`` defaults to the predicted class of each image. ``samples=0`` is
    the vanilla gradient; ``samples>0`` is SmoothGrad (Smilkov et al. 2017):
    the mean gradient over that many copies with Gaussian noise of std
    ``noise`` (pixels are in [0, 1]), which removes most of the speckle of a
    single gradient. Model weights are left untouched (no .grad is written).
    """
    import torch

    device = next(model.parameters()).device
    x = (images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))).float().to(device)
    if x.ndim != 4:
        raise ValueError(f"images must be shaped [N, C, H, W], got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if targets is None:
                targets = model(x).argmax(dim=1)
        targets = torch.as_tensor(targets, dtype=torch.long, device=device)
        n = len(x)
        if samples > 0:
            g = torch.Generator(device="cpu").manual_seed(seed)
            jitter = torch.randn((samples, *x.shape), generator=g).to(device) * noise
            batch = (x.unsqueeze(0) + jitter).reshape(samples * n, *x.shape[1:])
            batch_targets = targets.repeat(samples)
        else:
            batch, batch_targets = x, targets
        batch = batch.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(batch)
            chosen = logits.gather(1, batch_targets[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, batch)
        if samples > 0:
            grad = grad.reshape(samples, n, *x.shape[1:]).mean(dim=0)
        return grad.abs().amax(dim=1).cpu().numpy()
    finally:
        model.train(was_training)


def pick_examples(y_true: np.ndarray, y_pred: np.ndarray, confidences: np.ndarray, n: int = SALIENCY_EXAMPLES) -> list[int]:
    """Test images worth explaining: up to half the most confident mistakes, the rest the most confident correct ones
    of as many different classes as possible. Deterministic."""
    y_true, y_pred, confidences = np.asarray(y_true), np.asarray(y_pred), np.asarray(confidences)
    order = np.argsort(-confidences, kind="stable")
    wrong = [int(i) for i in order if y_true[i] != y_pred[i]]
    right = [int(i) for i in order if y_true[i] == y_pred[i]]
    chosen = wrong[: n // 2]
    seen_classes: set[int] = set()
    for i in right:  # one per class first, then whatever is most confident
        if len(chosen) >= n:
            break
        if int(y_true[i]) not in seen_classes:
            seen_classes.add(int(y_true[i]))
            chosen.append(i)
    for i in right + wrong:
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def saliency_examples(model, x: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str],
                      n: int = SALIENCY_EXAMPLES, seed: int = 0) -> list[dict[str, Any]]:
    """SmoothGrad maps of the predicted logit for ``n`` picked test images, ready for the report: each with its
    ``image`` (grey, channels averaged, [H][W] in [0, 1]) and ``saliency`` ([H][W], the map as computed)."""
    if n <= 0 or len(x) == 0:
        return []
    y_pred, confidences = probabilities.argmax(axis=1), probabilities.max(axis=1)
    chosen = pick_examples(y_true, y_pred, confidences, n)
    maps = saliency_maps(model, x[chosen], targets=y_pred[chosen], seed=seed)
    return [{
        "index": i,
        "true": class_names[int(y_true[i])],
        "predicted": class_names[int(y_pred[i])],
        "confidence": float(confidences[i]),
        "correct": bool(y_true[i] == y_pred[i]),
        "image": np.round(np.asarray(x[i], dtype=np.float64).mean(axis=0), 4).tolist(),
        "saliency": np.asarray(saliency, dtype=np.float64).round(6).tolist(),
    } for i, saliency in zip(chosen, maps)]
