"""The evaluate step's release decision: the accuracy floor and the champion/challenger check.

Both are ``components.core.gates`` limits, decided by ``gates.decide`` like the
privacy and robustness limits, so the verdict has the same keys and
``gates.override`` with ``gates.override_reason`` releases a blocked model here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.gates import Limit, decide, validate_override, verdict_metrics
from components.core.settings import Settings
from components.evaluate.evaluate import evaluate, write_result
from components.evaluate.saliency import SALIENCY_EXAMPLES

GATE_EPSILON = 1e-9  # accuracies are k/n fractions: "equal" must compare equal despite float rounding


@dataclass(frozen=True)
class AccuracyFloor(Limit):
    """``min_test_accuracy``: the lowest test accuracy that may be released."""

    def describe(self) -> str:
        return f"{self.what} {self.value:.4f} {'>=' if self.held else '<'} {self.name} {self.limit:.4f}"


@dataclass(frozen=True)
class ChampionLimit(Limit):
    """``max_regression``: the challenger's accuracy (``value``) must reach the champion's minus that margin (``limit``)."""

    champion_accuracy: float = 0.0
    max_regression: float = 0.0
    champion_version: str = "unknown"

    def describe(self) -> str:
        margin = f"champion accuracy {self.champion_accuracy:.4f} - max_regression {self.max_regression:.4f}"
        if self.held:
            return f"challenger accuracy {self.value:.4f} >= {margin} (champion version {self.champion_version})"
        return (f"challenger accuracy {self.value:.4f} is below {margin} = {self.limit:.4f}: "
                f"the model in production (version {self.champion_version}) stays")


def accuracy_floor(test_accuracy: float, min_test_accuracy: float) -> AccuracyFloor:
    return AccuracyFloor("min_test_accuracy", "test accuracy", test_accuracy, min_test_accuracy, "min",
                         tolerance=GATE_EPSILON)


def champion_limit(check: dict[str, Any]) -> ChampionLimit:
    """The limit of a champion check that compared both models (see :func:`compare_with_champion`)."""
    return ChampionLimit("max_regression", "challenger accuracy", check["challenger_accuracy"],
                         check["champion_accuracy"] - check["max_regression"], "min", tolerance=GATE_EPSILON,
                         champion_accuracy=check["champion_accuracy"], max_regression=check["max_regression"],
                         champion_version=check["champion_model_version"])


def compare_with_champion(challenger: dict[str, Any], champion: dict[str, Any] | None, max_regression: float,
                          champion_info: dict[str, Any] | None = None, skip_reason: str = "") -> dict[str, Any]:
    """The champion check: may the challenger replace the model in production?

    ``champion`` is the champion's ``evaluate`` result on the same test split,
    or None (none in production, not comparable, or disabled: ``skip_reason``
    says which). It passes when the challenger's accuracy is at least the
    champion's minus ``max_regression`` (a negative ``max_regression`` demands
    an improvement of at least that much).
    """
    info = champion_info or {}
    check: dict[str, Any] = {"max_regression": float(max_regression),
                             "challenger_accuracy": challenger["test_accuracy"],
                             "challenger_model_version": challenger.get("model_version", "unknown"),
                             "challenger_macro_f1": challenger.get("macro_f1"),
                             "challenger_ece": (challenger.get("calibration") or {}).get("ece")}
    if champion is None:
        return {**check, "status": info.get("status", "no_champion"), "passed": True,
                "reason": skip_reason or "no model in production", **{k: v for k, v in info.items() if k != "status"}}
    check = {
        **check, **info, "status": "compared",
        "champion_accuracy": champion["test_accuracy"], "champion_macro_f1": champion["macro_f1"],
        "champion_ece": champion["calibration"]["ece"], "champion_model_version": champion.get("model_version", "unknown"),
    }
    limit = champion_limit(check)
    return {**check, "passed": limit.held, "reason": limit.describe()}


def release_gate(result: dict[str, Any], min_test_accuracy: float, champion_check: dict[str, Any],
                 override: bool = False, override_reason: str = "") -> dict[str, Any]:
    """The evaluate gate: accuracy >= ``min_test_accuracy`` AND the champion check passed.

    Returns the verdict of ``gates.decide`` plus ``min_test_accuracy``, ``accuracy_passed`` and
    ``champion`` (the check); a champion check that compared nothing passes and says why in ``reason``.
    """
    floor = accuracy_floor(result["test_accuracy"], min_test_accuracy)
    compared = champion_check["status"] == "compared"
    limits = [floor, champion_limit(champion_check)] if compared else [floor]
    verdict = decide(limits, override, override_reason, notes=() if compared else (champion_check["reason"],))
    return {**verdict, "min_test_accuracy": float(min_test_accuracy), "accuracy_passed": floor.held,
            "champion": champion_check}


def serving_home(home: str) -> Path | None:
    """The local serving home of ``serving.home`` (relative to the working directory); None when unset."""
    if not home:
        return None
    path = Path(home)
    return path if path.is_absolute() else Path.cwd() / path


def evaluate_and_gate(dataset_dir: str | Path, model_dir: str | Path, cfg: Settings,
                      out_dir: str | Path | None = None, explain: int = SALIENCY_EXAMPLES) -> dict[str, Any]:
    """Score the challenger, find and score the champion on the same test split, and decide the release.

    ``cfg.gates``: ``min_test_accuracy``, ``max_regression``, ``override``, ``override_reason`` and
    ``champion_model``: ``"serving"`` (the model served from ``cfg.serving.home``), ``"store"``
    (the latest release in ``cfg.serving.model_store_uri``), ``"none"`` to skip the comparison, or a
    model dir, a .mar or a storage release (local dir or ``s3://`` base URI, optionally
    ending in ``/latest``); see :func:`components.evaluate.champion.resolve_champion`.
    Returns the ``evaluate`` result plus ``gate`` (see :func:`release_gate`).
    """
    import tempfile

    from components.core.data import load_splits
    from components.evaluate.champion import ChampionNotComparable, check_comparable, resolve_champion

    gates, serving = cfg.gates, cfg.serving
    if not -1.0 <= gates.max_regression <= 1.0:
        raise ValueError(f"max_regression must be in [-1, 1] (an accuracy difference), got {gates.max_regression}")
    if not 0.0 <= gates.min_test_accuracy <= 1.0:
        raise ValueError(f"min_test_accuracy must be in [0, 1], got {gates.min_test_accuracy}")
    validate_override(gates.override, gates.override_reason)
    max_regression = gates.max_regression
    result = evaluate(dataset_dir, model_dir, explain=explain)
    with tempfile.TemporaryDirectory(prefix="champion-") as work:
        found = resolve_champion(gates.champion_model, serving_home(serving.home), Path(work),
                                 model_store_uri=serving.model_store_uri)
        if found.model_dir is None:
            check = compare_with_champion(result, None, max_regression, found.info(), found.reason)
        else:
            try:
                check_comparable(found.model_dir, load_splits(dataset_dir))
            except ChampionNotComparable as err:
                check = compare_with_champion(result, None, max_regression, {**found.info(), "status": "not_comparable"},
                                              f"champion not comparable, check skipped: {err}")
            else:
                print(f"[evaluate] scoring the champion from {found.source} on the same test split", flush=True)
                champion = evaluate(dataset_dir, found.model_dir, explain=0)
                check = compare_with_champion(result, champion, max_regression, found.info())
    result["gate"] = release_gate(result, gates.min_test_accuracy, check, gates.override, gates.override_reason)
    if out_dir is not None:
        write_result(result, out_dir)
    return result


def evaluate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an ``evaluate_and_gate`` result for KFP Metrics: scores, the gate's settings, the champion
    comparison and the verdict (a champion accuracy of None, when nothing was compared, is not logged)."""
    gate = result["gate"]
    check = gate["champion"]
    return {
        "test_accuracy": result["test_accuracy"], "macro_f1": result["macro_f1"], "n_test": result["n_test"],
        "ece": result["calibration"]["ece"], "min_test_accuracy": gate["min_test_accuracy"],
        "max_regression": check["max_regression"], "challenger_accuracy": check["challenger_accuracy"],
        "champion_accuracy": check.get("champion_accuracy"), "champion_compared": check["status"] == "compared",
        **verdict_metrics(gate),
    }
