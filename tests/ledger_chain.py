"""A realistic release ledger for the tests, written by the project's own writers (the record step's logic, the
deploy step's release records, the monitor's drift record, the retrain's record), as a run, a drift and the
retrain it caused leave it: trained → gated → released → drift → retrain_started → trained → gated → released
(shadow) → promoted.

``write_run`` makes the model and dataset artifacts a run leaves (metadata.json with the model version,
data_card.json) so that every record names files that exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.core.ledger import Ledger, Record
from components.deploy.ledger import record_release
from components.monitor.ledger import record_drift
from components.record.record import record_run
from pipelines.retrain import record_retrain

GATE_METRICS = {
    "evaluate": {"test_accuracy": 0.97, "min_test_accuracy": 0.9, "macro_f1": 0.969, "passed": 1.0,
                 "passed_checks": 1.0, "override": 0.0, "overridden": 0.0, "blocked_by_min_test_accuracy": 0.0,
                 "reason": "test accuracy 0.970 >= min 0.900", "cost_wall_seconds": 2.5, "cost_cpu_seconds": 2.0},
    "privacy": {"mia_auc": 0.53, "max_mia_auc": 0.65, "passed": 1.0, "passed_checks": 1.0, "override": 0.0,
                "overridden": 0.0, "blocked_by_max_mia_auc": 0.0, "reason": "membership-inference AUC 0.530 <= max 0.650",
                "cost_wall_seconds": 4.0},
    "robustness": {"noise_accuracy": 0.95, "min_noise_accuracy": 0.85, "passed": 1.0, "passed_checks": 1.0,
                   "override": 0.0, "overridden": 0.0, "blocked_by_min_noise_accuracy": 0.0,
                   "reason": "accuracy under noise 0.950 >= min 0.850", "cost_wall_seconds": 3.0},
}
TRAINING_METRICS = {"ingest": {"n_train": 800, "cost_wall_seconds": 1.0},
                    "pretrain": {"pretrain_final_loss": 2.1, "cost_wall_seconds": 20.0},
                    "finetune": {"val_accuracy": 0.96, "cost_wall_seconds": 10.0}}


def version_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def write_run(root: Path, run_id: str, version: str) -> tuple[Path, Path]:
    """The model and dataset artifacts of a run (only the files the ledger's writers read)."""
    model, dataset = root / run_id / "model", root / run_id / "dataset"
    model.mkdir(parents=True)
    dataset.mkdir(parents=True)
    (model / "metadata.json").write_text(json.dumps({"model_version": version, "class_names": list("0123456789")}))
    (dataset / "data_card.json").write_text(json.dumps({"source": "digits", "counts": {"train": 800}, "run": run_id}))
    return model, dataset


def config_of(epochs: int, home: str = "runs/serving") -> dict:
    return {"data": {"source": "digits", "seed": 0}, "pretrain": {"epochs": epochs},
            "serving": {"model_name": "digits", "home": home}, "gates": {"min_test_accuracy": 0.9}}


def trained_and_gated(ledger: Ledger, root: Path, run_id: str, version: str, *, epochs: int = 3,
                      gates: dict | None = None, passed: dict | None = None) -> tuple[Record, Record]:
    model, dataset = write_run(root, run_id, version)
    metrics = {**TRAINING_METRICS, **(gates or GATE_METRICS)}
    return record_run(ledger, run_id=run_id, kfp_run_id=f"kfp-{run_id}", model_dir=model, dataset_dir=dataset,
                      model_uri=str(model), dataset_uri=str(dataset), config=config_of(epochs), image="",
                      step_metrics=metrics, passed=passed or {"evaluate": True, "privacy": True, "robustness": True},
                      environ={})


def release(ledger: Ledger, root: Path, run_id: str, version: str, gated: Record, rollout: dict | None = None):
    record = {"endpoint": "http://127.0.0.1:8080/predictions/digits", "model_version": version,
              "model_dir": str(root / run_id / "model"), "dataset_dir": str(root / run_id / "dataset"),
              "smoke_test_images": 16, "smoke_test_accuracy": 1.0, "smoke_test_latency_ms_mean": 3.0,
              **({"rollout": rollout} if rollout else {})}
    return record_release(ledger, record, model_name="digits", model_version=version, target="local",
                          gated_record=gated.id, run_id=run_id)


def rollout(strategy: str, decision: str, champion: str, challenger: str, reason: str) -> dict:
    return {"strategy": strategy, "share": 0.5, "decision": decision, "reason": reason,
            "criteria": [{"name": "agreement", "held": decision == "promote"}],
            "evidence": {"champion": {"requests": 240, "errors": 0}, "challenger": {"requests": 120, "errors": 0},
                         "compared": 120, "agreed": 119},
            "seconds_to_decision": 4.2, "champion_version": champion, "challenger_version": challenger}


def drifted(ledger: Ledger, version: str, released: Record) -> Record:
    verdict = {"status": "drift", "drift_detected": True, "alert": True, "drift_share": 0.6,
               "drifted_features": ["mean", "std", "edges"], "model_version": version,
               "groups": {"image_features": {"drifted": True}, "prediction": {"drifted": False}},
               "window": {"since": "2026-12-01T10:00:00+00:00", "until": "2026-12-01T11:00:00+00:00"},
               "message": "Drift: 3 of 5 image features drifted"}
    return record_drift(ledger, verdict, released_record=released.id, report="/runs/monitor/v1/drift_report.html",
                        verdict_uri="/runs/monitor/v1/verdict.json")


@dataclass
class Chain:
    ledger: Ledger
    v1: str
    v2: str
    trained1: Record
    gated1: Record
    released1: Record
    drift: Record
    retrain: Record
    trained2: Record
    gated2: Record
    released2: Record
    promoted2: Record


def build_chain(ledger: Ledger, root: Path) -> Chain:
    """run1 released at once; its traffic drifts; the retrain (run2) is released as a shadow challenger and
    promoted on its evidence."""
    v1, v2 = version_of("model one"), version_of("model two")
    trained1, gated1 = trained_and_gated(ledger, root, "run1", v1)
    released1, _ = release(ledger, root, "run1", v1, gated1)
    drift = drifted(ledger, v1, released1)
    reason = {"ledger": ledger.base, "drift_record": drift.id, "model_version": v1, "window": drift.data["window"],
              "drifted_groups": ["image_features"]}
    retrain = record_retrain(reason, {"run_id": "run2", "target": "local"})
    trained2, gated2 = trained_and_gated(ledger, root, "run2", v2, epochs=5)
    released2, promoted2 = release(ledger, root, "run2", v2, gated2,
                                   rollout("shadow", "promote", v1, v2, "every criterion held"))
    return Chain(ledger, v1, v2, trained1, gated1, released1, drift, retrain, trained2, gated2, released2, promoted2)
