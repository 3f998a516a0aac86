"""The record step (components/record/): the run's trained and gated records in the release ledger, from the
gates' outputs and every step's metrics; safe to retry; outside the gates' conditions in the compiled pipeline,
its output the parent deploy records under; cheap (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import settings_of
from kfp.dsl import Dataset, Metrics, Model
from ledger_chain import GATE_METRICS, TRAINING_METRICS, version_of, write_run

from components.core.ledger import IMAGE_ENV, IMAGE_ID_ENV, RUN_ID_ENV, Ledger, config_sha256
from components.record.component import record_component
from pipelines.config import DataConfig, GateConfig, ServingConfig

ROOT = Path(__file__).resolve().parents[2]


def metrics_artifact(name: str, values: dict) -> Metrics:
    artifact = Metrics(name=name, uri=f"/tmp/unused/{name}")
    artifact.metadata.update(values)
    return artifact


def run_record(tmp_path, monkeypatch, *, passed=(True, True, True), gates=GATE_METRICS, run_id="kfp-mlops-abc12",
               env: dict | None = None, version: str | None = None):
    version = version or version_of("the model")
    if not (tmp_path / "run" / "model").exists():
        write_run(tmp_path, "run", version)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    cfg = settings_of(data=DataConfig(), gates=GateConfig(), serving=ServingConfig(home=str(tmp_path / "home")))
    out = Metrics(name="metrics", uri=str(tmp_path / "out" / "metrics"))
    gated_id = record_component(
        model=Model(name="model", uri=str(tmp_path / "run" / "model")),
        dataset=Dataset(name="dataset", uri=str(tmp_path / "run" / "dataset")),
        **{f"{step}_metrics": metrics_artifact(step, values) for step, values in {**TRAINING_METRICS, **gates}.items()},
        passed_evaluate=passed[0], passed_privacy=passed[1], passed_robustness=passed[2],
        cfg=cfg, metrics=out, run_id=run_id, kfp_run_id="0f3c-run-uuid", image="registry.example.com/kfp-mlops:1.2")
    return gated_id, out, Ledger(tmp_path / "home" / "ledger"), version


def test_the_step_records_what_was_trained_and_how_the_gates_decided(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    gated_id, out, ledger, version = run_record(tmp_path, monkeypatch)
    trained, gated = ledger.records()
    assert gated.id == gated_id and gated.parents == (trained.id,) and trained.parents == ()
    d = trained.data
    assert (d["run_id"], d["kfp_run_id"], d["model_version"]) == ("kfp-mlops-abc12", "0f3c-run-uuid", version)
    assert d["config"]["gates"]["min_test_accuracy"] == 0.9 and d["config_sha256"] == config_sha256(d["config"])
    card = (tmp_path / "run" / "dataset" / "data_card.json").read_bytes()
    import hashlib

    assert d["data_card_sha256"] == hashlib.sha256(card).hexdigest()
    assert d["code"]["image"] == "registry.example.com/kfp-mlops:1.2" and d["code"]["package_version"]
    assert d["cost"]["steps"]["pretrain"]["wall_seconds"] == 20.0
    assert d["cost"]["total"]["wall_seconds"] == pytest.approx(1 + 20 + 10 + 2.5 + 4 + 3)
    assert d["training"]["finetune"] == {"val_accuracy": 0.96}
    g = gated.data
    assert g["passed"] is True and g["blocked_by"] == [] and set(g["gates"]) == {"evaluation", "privacy", "robustness"}
    assert g["gates"]["privacy"] == {"passed": True, "passed_checks": True, "override": False, "overridden": False,
                                     "reason": "membership-inference AUC 0.530 <= max 0.650", "override_reason": "", "remedy": "",
                                     "blocked_by": [], "numbers": {"mia_auc": 0.53, "max_mia_auc": 0.65}}
    assert out.metadata["released_by_gates"] == 1.0 and out.metadata["cost_wall_seconds"] > 0


def test_a_blocked_and_an_overridden_gate_are_recorded(tmp_path, monkeypatch):
    gates = json.loads(json.dumps(GATE_METRICS))
    gates["privacy"].update(mia_auc=0.71, passed=0.0, passed_checks=0.0, blocked_by_max_mia_auc=1.0,
                            reason="membership-inference AUC 0.710 > max 0.650")
    gates["robustness"].update(passed_checks=0.0, override=1.0, overridden=1.0, blocked_by_min_noise_accuracy=1.0,
                               reason="accuracy under noise 0.700 < min 0.850", override_reason="ana: demo only")
    _, out, ledger, _ = run_record(tmp_path, monkeypatch, passed=(True, False, True), gates=gates)
    gated = ledger.latest("gated").data
    assert gated["passed"] is False and gated["blocked_by"] == ["privacy"] and gated["overridden"] == ["robustness"]
    assert gated["gates"]["privacy"]["blocked_by"] == ["max_mia_auc"]
    assert gated["gates"]["robustness"]["override_reason"] == "ana: demo only"
    assert out.metadata["released_by_gates"] == 0.0


def test_a_retry_finds_its_records_and_a_retrain_is_the_parent(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path / "home" / "ledger")
    cause = ledger.append("retrain_started", {"run": "retrain-v1-20261201T110000Z", "target": "local"})
    env = {RUN_ID_ENV: "retrain-v1-20261201T110000Z", IMAGE_ENV: "ghcr.io/kfp-mlops/kfp-mlops:0.1.0",
           IMAGE_ID_ENV: "sha256:" + "ab" * 32}
    first, _, _, _ = run_record(tmp_path, monkeypatch, env=env)
    again, _, ledger, _ = run_record(tmp_path, monkeypatch, env=env)
    assert first == again and [r.type for r in ledger.records()] == ["retrain_started", "trained", "gated"]
    trained = ledger.latest("trained")
    assert trained.parents == (cause.id,) and trained.data["run_id"] == "retrain-v1-20261201T110000Z"
    assert trained.data["code"]["image_id"] == "sha256:" + "ab" * 32
    assert trained.data["code"]["image"] == "ghcr.io/kfp-mlops/kfp-mlops:0.1.0"


def test_the_record_step_imports_no_torch():
    code = ("import sys; import components.record.component, components.record.record, components.core.ledger; "
            "from components.core.cost import measure\nwith measure(gpu=False): pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_pipeline_records_outside_the_gates_and_deploy_follows_the_gated_record():
    from pipelines.pipeline import build_pipeline

    spec = build_pipeline(retries=False).pipeline_spec
    root_tasks = spec.root.dag.tasks
    assert "record" in root_tasks, "record runs when a gate blocks too: outside the conditions"
    record = root_tasks["record"]
    assert set(record.dependent_tasks) == {"settings", "ingest", "pretrain", "finetune", "evaluate", "privacy",
                                           "robustness"}
    assert {f"passed_{g}" for g in ("evaluate", "privacy", "robustness")} <= set(record.inputs.parameters)
    assert not record.trigger_policy.condition

    def find(component_spec, name):
        for task_name, task in component_spec.dag.tasks.items():
            if task_name == name:
                return task
            sub = spec.components[task.component_ref.name]
            if sub.HasField("dag"):
                found = find(sub, name)
                if found is not None:
                    return found
        return None

    deploy = find(spec.root, "deploy")
    assert deploy is not None and "gated_record" in deploy.inputs.parameters
