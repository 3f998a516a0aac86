"""What every release gate shares: limits that block, the verdict, and the explicit override.

A gate measures numbers, compares each with its limit and blocks the release
when any limit is crossed. ``Limit`` is one such comparison; ``decide`` turns a
list of them into the verdict every gate reports the same way:

* ``passed_checks``: the real result (every limit held);
* ``passed``: what the gate returns to the pipeline, ``passed_checks or override``;
* ``overridden``: the override changed the outcome (a failed gate released anyway);
* ``blocked_by``: the names of the limits that failed, ``reason``: each with its numbers;
* ``remedy``: for a failed gate, what to try (the settings that move each failed number, from ``REMEDIES``).

The override exists for the human who has read the report and accepts the risk;
it never hides the failure: metrics keep ``passed_checks = 0`` and the report
opens with a banner naming the reason given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limit:
    """One gate limit: ``value`` must be ``<=`` (kind "max") or ``>=`` (kind "min") ``limit``."""

    name: str  # the config field, e.g. "max_mia_auc"
    what: str  # what was measured, in words, e.g. "membership-inference AUC"
    value: float
    limit: float
    kind: str  # "max" or "min"
    detail: str = ""  # context for the reason, e.g. "(loss attack, 359 vs 359)"
    tolerance: float = 0.0  # float rounding slack: a value this close to the limit holds

    @property
    def held(self) -> bool:
        if self.kind == "max":
            return self.value <= self.limit + self.tolerance
        return self.value >= self.limit - self.tolerance

    def describe(self) -> str:
        op = ("<=" if self.held else ">") if self.kind == "max" else (">=" if self.held else "<")
        whole = float(self.value).is_integer() and float(self.limit).is_integer()  # counts read as counts
        fmt = (lambda v: f"{int(v)}") if whole else (lambda v: f"{v:.3f}")
        text = f"{self.what} {fmt(self.value)} {op} {self.kind} {fmt(self.limit)}"
        return f"{text} {self.detail}" if self.detail else text


# What to try when a limit fails: the settings (``area.field`` of the run config) that move its number.
# One table, so every gate's console line, report and summary give the same advice.
REMEDIES: dict[str, str] = {
    "min_test_accuracy": "try more pretrain.epochs or finetune.epochs, a larger finetune.label_fraction, "
                         "or check the data card for label problems",
    "max_regression": "the production model is better on the same test split: train longer or keep the champion "
                      "(gates.max_regression sets the tolerance)",
    "max_mia_auc": "try finetune.dp_epsilon (DP-SGD), fewer finetune.epochs, or a smaller finetune.patience",
    "max_leaks": "remove the duplicated images from the data (the report lists the pairs) or raise gates.max_leaks",
    "max_dp_epsilon": "lower finetune.dp_epsilon, or raise gates.max_dp_epsilon if the privacy budget allows",
    "min_noise_accuracy": "try finetune.augment_noise_sigma (e.g. 0.2) to train under noise",
    "min_fgsm_accuracy": "try finetune.adversarial_epsilon (e.g. 0.03) for adversarial training",
    "min_pgd_accuracy": "try finetune.adversarial_epsilon (e.g. 0.03) for adversarial training",
    "min_corruption_accuracy": "try finetune.augment_noise_sigma, or pretraining longer (pretrain.epochs)",
    "max_corruption_drop": "try finetune.augment_noise_sigma, or pretraining longer (pretrain.epochs)",
}


def remedy(failed_limits: list[str]) -> str:
    """What to try for these failed limits, each piece of advice once, in order."""
    advice = [REMEDIES[name] for name in failed_limits if name in REMEDIES]
    return "; ".join(dict.fromkeys(advice))


def validate_override(override: bool, override_reason: str) -> None:
    if not isinstance(override, bool):
        raise ValueError(f"override must be true or false, got {override!r}")
    if override and not str(override_reason or "").strip():
        raise ValueError("override=True needs an override_reason: say who accepts the risk and why "
                         "(it is written into the gate's report and the run summary)")


def decide(limits: list[Limit], override: bool = False, override_reason: str = "",
           notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The verdict of a gate from its limits (see the module docstring for the keys).

    ``notes``: checks that did not apply, each saying why; a passing verdict's reason ends with them.
    """
    validate_override(override, override_reason)
    failed = [lim for lim in limits if not lim.held]
    passed_checks = not failed
    if failed:
        reason = "; ".join(lim.describe() for lim in failed)
    else:
        reason = "; ".join([" and ".join(lim.describe() for lim in limits) or "no limits set", *notes])
    return {
        "passed": passed_checks or override,
        "passed_checks": passed_checks,
        "override": bool(override),
        "overridden": bool(override and not passed_checks),
        "override_reason": str(override_reason or "") if override else "",
        "blocked_by": [lim.name for lim in failed],
        "limits_checked": [lim.name for lim in limits],
        "reason": reason,
        "remedy": remedy([lim.name for lim in failed]),
    }


def verdict_metrics(result: dict[str, Any]) -> dict[str, bool]:
    """The verdict as KFP metrics: passed, passed_checks, override, overridden, blocked_by_<limit> (booleans; KFP
    stores them as numbers and ``log_metrics`` records that they are booleans)."""
    out = {k: bool(result[k]) for k in ("passed", "passed_checks", "override", "overridden")}
    for name in result["limits_checked"]:
        out[f"blocked_by_{name}"] = name in result["blocked_by"]
    return out


def console_line(step: str, result: dict[str, Any]) -> str:
    """The verdict in one line, e.g. ``privacy BLOCKED: membership-inference AUC 0.853 > max 0.650 (try ...)``."""
    if result["overridden"]:
        return f"{step} OVERRIDDEN: {result['reason']} (released anyway: {result['override_reason']})"
    if result["passed_checks"]:
        return f"{step} PASSED: {result['reason']}"
    advice = f" ({result['remedy']})" if result.get("remedy") else ""
    return f"{step} BLOCKED: {result['reason']}{advice}"


OVERRIDDEN = "OVERRIDDEN — the checks FAILED but the gate let the release through"
OVERRIDE_NOT_NEEDED = "override was set but not needed: every limit held"


def verdict_banner(result: dict[str, Any]) -> str:
    """The first lines of a gate report: the verdict, loudly when an override released a failed gate."""
    if result["overridden"]:
        return (f"> **⚠️ {OVERRIDDEN}** because `override=True`.\n> Reason given: *{result['override_reason']}*\n"
                f"> Blocked by: {', '.join(result['blocked_by'])}\n\n**{result['reason']}**")
    note = f"\n\n({OVERRIDE_NOT_NEEDED})" if result["override"] else ""
    return f"**{result['reason']}**{note}"


def verdict_word(result: dict[str, Any]) -> str:
    if result["overridden"]:
        return "FAILED (OVERRIDDEN)"
    return "PASSED" if result["passed_checks"] else "FAILED"


def publish_verdict(step: str, result: dict[str, Any], metrics: dict[str, float], cost_metrics: dict[str, float],
                    metrics_artifact: Any, report_path: str, report_text: str) -> bool:
    """What a gate component does with its verdict: KFP metrics (the numbers, and the reason in words), the report
    file, a console line; returns ``passed``."""
    import os

    from components.core.cost import log_metrics

    log_metrics(metrics_artifact, metrics)
    log_metrics(metrics_artifact, cost_metrics)
    # In words too, for the ledger's gated record (the record step reads this artifact's metadata).
    metrics_artifact.metadata["reason"] = result["reason"]
    if result.get("remedy"):
        metrics_artifact.metadata["remedy"] = result["remedy"]
    if result["override"]:
        metrics_artifact.metadata["override_reason"] = result["override_reason"]
    os.makedirs(os.path.dirname(report_path) or ".", exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(report_text)
    print(console_line(step, result), flush=True)
    if result["overridden"]:
        print(f"{step}: WARNING released despite failed checks; override reason: {result['override_reason']}",
              flush=True)
    return bool(result["passed"])
