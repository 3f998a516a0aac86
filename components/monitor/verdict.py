"""The monitor's answer for one window: a status, the evidence behind it, and one sentence saying what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("ok", "drift", "insufficient_data", "schema_drift")


@dataclass
class Verdict:
    """The monitor's answer for one window; ``to_dict()`` is what verdict.json holds."""

    status: str  # one of STATUSES
    message: str  # one human sentence saying what was found and what to do
    reference_rows: int
    current_rows: int
    drift_detected: bool = False  # the statistical tests ran and called the window drifted
    drifted_features: list[str] = field(default_factory=list)  # every column (image, prediction) its test flagged
    drift_share: float = 0.0  # observed share of drifted image features
    drift_share_threshold: float = 0.5
    checks: list[str] = field(default_factory=list)  # the groups tested: image_features[, prediction, embedding]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> decision and how it was made
    features: dict[str, dict[str, Any]] = field(default_factory=dict)  # column -> method, score, sample sizes
    nan_share: dict[str, dict[str, float]] = field(default_factory=dict)  # col -> {"reference", "current"}
    schema_problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown verdict status {self.status!r}; expected one of {STATUSES}")

    @property
    def alert(self) -> bool:
        """Whether someone should look: statistical drift or a broken schema."""
        return self.status in ("drift", "schema_drift")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alert": self.alert}


def drift_message(groups: dict[str, dict[str, Any]], features: dict[str, dict[str, Any]], detected: bool,
                  drift_share: float) -> str:
    """The verdict's sentence once the tests ran: which groups drifted, on what evidence, and what to do."""
    image = groups["image_features"]
    k, total, listed = len(image["drifted_columns"]), len(image["columns"]), ", ".join(image["drifted_columns"])
    if detected:
        reasons = []
        if image["drifted"]:
            reasons.append(f"{k} of {total} image features drifted ({listed}), at or above the {drift_share:.0%} threshold")
        if groups.get("prediction", {}).get("drifted"):
            tests = ", ".join(f"{c} p={features[c]['p_value']:.2g}" for c in groups["prediction"]["drifted_columns"])
            reasons.append(f"the predictions drifted ({tests})")
        if groups.get("embedding", {}).get("drifted"):
            e = groups["embedding"]
            reasons.append(f"the embedding drifted (classifier AUC {e['auc']:.3f}, p={e['p_value']:.2g})")
        if not image["drifted"] and k:
            reasons.append(f"{k} of {total} image features drifted ({listed}), below the {drift_share:.0%} threshold")
        return ("Drift: " + "; ".join(reasons) + ". Production inputs no longer look like the training data; "
                "inspect the report and consider retraining.")
    if k:
        message = (f"No drift: {k} of {total} image features drifted ({listed}), below the {drift_share:.0%} "
                   "needed to call the window drifted.")
    else:
        message = f"No drift: none of the {total} image features drifted."
    if "embedding" in groups:
        message += " Predictions and embedding match the model reference."
    return message
