"""The robustness step's report: Markdown text, and the HTML page (that text plus the accuracy curves) the step
writes."""

from __future__ import annotations

from typing import Any

from components.core.gates import verdict_banner, verdict_word


def render_robustness_report(result: dict[str, Any]) -> str:
    """A Markdown report of a ``robustness_check`` result."""
    return "\n".join(_sections(result))


def render_robustness_html(result: dict[str, Any]) -> str:
    """The step's report: a self-contained HTML page, the Markdown text with accuracy against corruption severity
    and against attack strength drawn after the summary table."""
    from components.core.plots import report_page, robustness_curves

    head, tail = _sections(result)
    corruptions, attacks = result.get("corruptions") or [], result.get("attack_curve") or []
    figure = [("robustness-curves", robustness_curves(corruptions, attacks, result["clean_accuracy"]))] \
        if corruptions or attacks else []
    return report_page(f"Robustness check — {verdict_word(result)}", [head, *figure, tail])


def _sections(result: dict[str, Any]) -> tuple[str, str]:
    """The report up to the summary table, and the rest."""
    r = result

    def row(name: str, acc: float, drop: float | None, limit: float | None) -> str:
        ok = "" if limit is None else (" ✅" if acc >= limit else " ❌")
        return (
            f"| {name} | {acc:.3f} | {'—' if drop is None else f'{100 * drop:.1f}%'} | "
            f"{'—' if limit is None else f'{limit:.3f}'}{ok} |"
        )

    corruption_rows = "\n".join(
        f"| {c['corruption']} | {c['severity']} | {c['level']:g} | {c['accuracy']:.3f} | {100 * c['relative_drop']:.1f}% |"
        for c in r.get("corruptions", [])
    )
    drop_ok = "✅" if r["corruption_relative_drop"] <= r["max_corruption_drop"] else "❌"
    head = f"""# Robustness check — {verdict_word(r)}

{verdict_banner(r)}

Accuracy on the {r['n_test']} test images, clean and perturbed (pixels stay in [0, 1]):

| input | accuracy | relative drop | min allowed |
|---|---|---|---|
{row('clean', r['clean_accuracy'], None, None)}
{row(f"Gaussian noise (sigma {r['noise_sigma']})", r['noise_accuracy'], r['noise_relative_drop'], r['min_noise_accuracy'])}
{row(f"FGSM (L∞ epsilon {r['fgsm_epsilon']})", r['fgsm_accuracy'], r['fgsm_relative_drop'], r['min_fgsm_accuracy'])}
{row(f"PGD (L∞ epsilon {r['pgd_epsilon']}, {r['pgd_steps']} steps of {r['pgd_step_size']:.4f}{', random start' if r['pgd_random_start'] else ''})", r['pgd_accuracy'], r['pgd_relative_drop'], r['min_pgd_accuracy'])}
{row(f"common corruptions (mean of {len(r.get('corruptions', []))})", r['corruption_accuracy'], r['corruption_relative_drop'], r['min_corruption_accuracy'])}

Mean corruption relative drop {100 * r['corruption_relative_drop']:.1f}% (max allowed {100 * r['max_corruption_drop']:.1f}%) {drop_ok}
"""
    tail = f"""## Common corruptions by severity

| corruption | severity | parameter | accuracy | relative drop |
|---|---|---|---|---|
{corruption_rows}

Parameters: noise and brightness in pixel units, blur sigma in pixels, contrast as the factor kept,
pixelate as the share of the side the image is averaged down to.

## How to read it
* **Gaussian noise** and the **corruptions** model what cameras, scanners and compression do; a good
  model loses little at severity 1-2. A steep fall at one corruption names what to augment with.
* **FGSM** is a one-step worst case within the epsilon budget; **PGD** iterates it from a random start
  and is the standard strong first-order attack, so its accuracy is at most about FGSM's. Both are
  white-box *lower bounds* on the damage a real adversary can do.
* A blocked model can be retrained with `finetune.augment_noise_sigma` (noise) or
  `finetune.adversarial_epsilon` (FGSM adversarial training).
"""
    return head, tail
