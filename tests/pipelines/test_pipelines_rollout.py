"""`mlops run --rollout-strategy shadow|canary` end to end on this machine: the first run replaces (nothing served
yet), a second run's model is the challenger of a rollout fed by the replayed test split, promoted on its
evidence; the decision is in the deployment record, summary.json, the console and the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.processes import free_port
from serving.server import CHALLENGER_DIR, LocalTorchServe

pytestmark = pytest.mark.slow
QUICK = Path(__file__).resolve().parents[2] / "examples" / "quick.yaml"


@pytest.mark.parametrize("strategy", ["shadow", "canary"])
def test_a_second_run_promotes_a_sound_challenger(tmp_path, run_cli, strategy):
    home = tmp_path / "serving"
    where = ["--config", str(QUICK), "--runs-dir", str(tmp_path / "runs"), "--serving-home", str(home),
             "--serving-inference-port", str(free_port()), "--serving-management-port", str(free_port()),
             "--serving-metrics-port", str(free_port()), "--monitor-replay-limit", "60",
             "--rollout-strategy", strategy, "--rollout-min-requests", "40", "--rollout-share", "0.5",
             # quick.yaml's models (test accuracy 0.85-0.9) disagree on up to an eighth of the digits, and at 40
             # requests the default 0.98 allows no disagreement at all
             "--rollout-min-agreement", "0.8"]
    try:
        code, out, err = run_cli(["run", *where, "--run-id", "first"])
        assert code == 0, out[-3000:] + err[-3000:]
        first = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
        assert "rollout" not in first and first["deployment"]["strategy"] == "replace", "the first release replaces"
        champion = first["deployment"]["model_version"]

        # A different model: two more fine-tuning epochs (the same settings would train the same weights).
        code, out, err = run_cli(["run", *where, "--run-id", "second", "--finetune-epochs", "12"])
        assert code == 0, out[-3000:] + err[-3000:]
        second = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())
        rollout = second["rollout"]
        assert rollout["decision"] == "promote", rollout["reason"]
        assert rollout["strategy"] == strategy and rollout["champion_version"] == champion
        challenger = rollout["challenger_version"]
        assert challenger != champion and second["deployment"]["model_version"] == challenger
        assert rollout["evidence"]["challenger"]["requests"] >= 40 and rollout["requests_replayed"] > 0
        assert rollout["seconds_to_decision"] > 0 and rollout["switch_seconds"] > 0
        assert {c["name"] for c in rollout["criteria"] if c["passed"]} >= {"error_rate", "p99_latency"}
        assert f"Rollout {strategy}: PROMOTE {challenger}" in out, "the decision on the console"
        # What serves now: the challenger on the usual ports; nothing of the rollout left in the serving path.
        status = LocalTorchServe(home).status()
        assert status["healthy"] and status["model_version"] == challenger
        assert status["endpoint"] == first["endpoint"] == second["endpoint"]
        assert not (home / "rollout.json").exists() and not (home / CHALLENGER_DIR).exists()
        assert second["steps"]["monitor"]["status"] == "succeeded"
        # The ledger: released (the challenger, with the strategy), then promoted with the evidence.
        from components.core.ledger import Ledger

        records = Ledger(home / "ledger").records()
        released, promoted = records[-3], records[-2]  # then the second run's drift record
        assert (released.type, promoted.type) == ("released", "promoted"), [r.type for r in records]
        assert released.data["strategy"] == strategy and promoted.data["model_version"] == challenger
        assert promoted.data["evidence"]["challenger"]["requests"] == rollout["evidence"]["challenger"]["requests"]
    finally:
        LocalTorchServe(home).stop(quiet=True)
