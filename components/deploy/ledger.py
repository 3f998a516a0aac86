"""What a release writes into the release ledger (components.core.ledger): the deploy step's ``released`` record
and, after a shadow or canary rollout, its ``promoted`` or ``rolled_back``; ``mlops releases rollback`` and
``promote`` and ``mlops serve start`` write the same records.

A ``released`` record says what serves where and how it got there (model name and version, target, endpoint,
strategy, run), and where its model is, so that ``mlops releases rollback`` / ``promote`` can serve it again:
``model_dir`` and ``dataset_dir`` (the artifacts a local server packs and smoke-tests), and on Kubernetes the
published release (``model_uri``, ``release_id``) the pods fetch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from components.core.ledger import Ledger, Record

# Deployment-record keys a released record keeps: where the model is, how it serves, how its smoke test went.
KEPT = ("model_dir", "dataset_dir", "model_uri", "release_id", "model_config", "namespace", "deployment", "revision",
        "request_log_dir", "runner", "smoke_test_images", "smoke_test_accuracy", "smoke_test_latency_ms_mean")
DECISIONS = {"promote": "promoted", "rollback": "rolled_back"}


def released_data(record: dict[str, Any], *, model_name: str, model_version: str, target: str, strategy: str,
                  run_id: str = "", **extra: Any) -> dict[str, Any]:
    """The ``released`` record's data from a deployment record."""
    return {"model_name": model_name, "model_version": model_version, "target": target,
            "endpoint": record.get("endpoint"), "strategy": strategy, "run_id": run_id,
            **{k: record[k] for k in KEPT if record.get(k) is not None}, **extra}


def decision_data(rollout: dict[str, Any]) -> dict[str, Any]:
    """A ``promoted`` / ``rolled_back`` record's data from a rollout's outcome (the deployment record's
    ``rollout``): the version decided on, the reason, the criteria and the online evidence."""
    return {"model_version": rollout.get("challenger_version"), "reason": rollout.get("reason", ""),
            "decision": rollout.get("decision"), "automatic": True,
            **{k: rollout[k] for k in ("strategy", "share", "criteria", "evidence", "seconds_to_decision",
                                        "champion_version", "challenger_version") if k in rollout}}


def record_release(ledger: Ledger, record: dict[str, Any], *, model_name: str, model_version: str, target: str,
                   gated_record: str = "", run_id: str = "", **extra: Any) -> tuple[Record, Record | None]:
    """Append a deployment's ``released`` record (parent: its ``gated`` record, or else the newest ``gated`` record
    of the version) and, when a shadow or canary rollout decided, its ``promoted`` or ``rolled_back`` (parent: that
    released record). Returns (released, decision or None)."""
    rollout = record.get("rollout") or None
    strategy = rollout.get("strategy", "replace") if rollout else "replace"
    gated = gated_record or getattr(ledger.latest("gated", model_version=model_version), "id", "")
    released = ledger.append("released", released_data(
        record, model_name=model_name, model_version=model_version, target=target, strategy=strategy, run_id=run_id,
        **extra), parents=[gated] if gated else [])
    decision = None
    if rollout:
        kind = DECISIONS.get(rollout.get("decision"))
        if kind is None:
            raise ValueError(f"the rollout's decision is {rollout.get('decision')!r}, not promote or rollback")
        decision = ledger.append(kind, {**decision_data(rollout), "model_version": model_version}, parents=[released])
    return released, decision


@contextlib.contextmanager
def recorded_if_rolled_back(ledger: Ledger, serving: Any, gated_record: str, run_id: str) -> Iterator[None]:
    """A deploy that fails after its shadow or canary rollout decided (an error whose ``report`` holds the
    ``rollout``, e.g. a challenger that never became ready) is still recorded: ``released`` and ``rolled_back``,
    with the reason; then the error goes on."""
    try:
        yield
    except Exception as err:
        report = getattr(err, "report", None) or {}
        rollout = report.get("rollout")
        if rollout and rollout.get("challenger_version"):
            released, decision = record_release(
                ledger, {**report, "endpoint": report.get("endpoint")}, model_name=serving.model_name,
                model_version=rollout["challenger_version"], target=serving.deploy_target,
                gated_record=gated_record, run_id=run_id)
            print(f"[deploy] ledger {ledger.base}: released {released.id}, {decision.type} {decision.id}", flush=True)
        raise


def serving_record(ledger: Ledger, released: Record, decision: Record | None) -> Record | None:
    """The ``released`` record of what serves after this release: itself, unless its rollout rolled it back
    (then the champion's, the version in production)."""
    if decision is not None and decision.type == "rolled_back":
        return ledger.in_production(released.data.get("model_name"))
    return released


def rollout_metrics(rollout: dict[str, Any] | None) -> dict[str, float]:
    """A rollout's outcome as KFP metrics (the run's UI shows them): promoted 1 / rolled back 0, seconds to the
    decision, requests the challenger saw."""
    if not rollout:
        return {}
    challenger = (rollout.get("evidence") or {}).get("challenger") or {}
    out = {"rollout_promoted": float(rollout.get("decision") == "promote")}
    if rollout.get("seconds_to_decision") is not None:
        out["rollout_seconds_to_decision"] = float(rollout["seconds_to_decision"])
    if challenger.get("requests") is not None:
        out["rollout_challenger_requests"] = float(challenger["requests"])
    return out
