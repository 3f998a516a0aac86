"""The privacy step's report: Markdown text, and the HTML page (that text plus the ROC figure) the step writes."""

from __future__ import annotations

from typing import Any

from components.core.gates import verdict_banner, verdict_word

MAX_LISTED_LEAKS = 50  # pairs listed in the report (all are counted)


ATTACK_NAMES = {"loss": "loss threshold", "confidence": "confidence threshold", "reference": "reference-calibrated"}


def render_privacy_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``privacy_check`` result."""
    return "\n".join(_sections(result))


def render_privacy_html(result: dict[str, Any]) -> str:
    """The step's report: a self-contained HTML page, the Markdown text with the attacks' ROC curves after the
    membership-inference tables (no figure when the result holds no ROC points)."""
    from components.core.plots import report_page, roc_curve

    head, tail = _sections(result)
    curves = [{"name": ATTACK_NAMES.get(name, name), **points} for name, points in (result.get("roc") or {}).items()]
    figure = [("membership-roc", roc_curve(curves))] if curves else []
    return report_page(f"Privacy check — {verdict_word(result)}", [head, *figure, tail])


def _sections(result: dict[str, Any]) -> tuple[str, str]:
    """The report up to the membership-inference tables, and the rest."""
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
    head = f"""# Privacy check — {verdict_word(r)}

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
"""
    tail = f"""## Leakage: train/test duplicates
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
    return head, tail
