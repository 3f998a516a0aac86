"""The monitor's record in the release ledger (components.core.ledger): a ``drift`` record per judged window, whose
parent is the ``released`` record of the model that served it; the pipeline's monitor step and ``mlops monitor``
both append it, and the verdict carries its id (``ledger_record``), so a retrain records which drift caused it.
"""

from __future__ import annotations

from typing import Any

from components.core.ledger import Ledger, LedgerError, Record

KEPT = ("status", "alert", "message", "drift_share", "drifted_features", "current_rows", "reference_rows", "source")


def served_release(ledger: Ledger, released_record: str = "", model_version: str | None = None) -> Record | None:
    """The ``released`` record of the served model: the one named (the deployment record's ``released_record``),
    else the newest release of ``model_version``, else (no version: all traffic) the one in production."""
    if released_record:
        try:
            record = ledger.get(released_record)
        except LedgerError:
            record = None
        if record is not None and record.type == "released":
            return record
    if model_version:
        return ledger.latest("released", model_version=str(model_version))
    return ledger.in_production()


def record_drift(ledger: Ledger, verdict: dict[str, Any], *, released_record: str = "", report: str | None = None,
                 verdict_uri: str | None = None) -> Record:
    """Append the ``drift`` record of one judged window (window, verdict, report location); parent: the served
    model's ``released`` record when the ledger has it. A window judged again (a rerun rewrites the same verdict)
    gets its first record back, not a second one."""
    version = verdict.get("model_version")
    window = verdict.get("window") or {}
    for earlier in reversed(ledger.find("drift", all_versions=version is None, window=window)):
        if version is None or earlier.data.get("model_version") == version:
            return earlier
    parent = served_release(ledger, released_record, version)
    groups = {name: bool(info.get("drifted")) for name, info in (verdict.get("groups") or {}).items()}
    data = {"model_version": version if version is not None else (parent.data["model_version"] if parent else None),
            "window": window, "drift_detected": bool(verdict.get("drift_detected")),
            "groups": groups, "report": report or verdict.get("report_html"),
            "verdict": verdict_uri or verdict.get("verdict_json"),
            "all_versions": version is None,
            **{k: verdict[k] for k in KEPT if k in verdict}}
    return ledger.append("drift", data, parents=[parent] if parent else [])
