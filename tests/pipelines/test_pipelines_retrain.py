"""Retrain on drift: where it runs, once per drifted window, the reason recorded on the run and next to
the verdict; through `mlops monitor --retrain-on-drift` against the KFP API stand-in, and (slow) a real
local run of the pipeline with examples/quick.yaml."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pytest
from sklearn.datasets import load_digits

from components.core.features import image_features
from pipelines import config as config_mod
from pipelines.config import Config
from pipelines.retrain import (
    RETRAIN_MARKER,
    TRIGGER_FILE,
    drift_reason,
    reason_text,
    retrain_on_drift,
    retrain_run_id,
    retrain_target,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "good-token"


def drifted_verdict(**changes) -> dict:
    verdict = {
        "status": "drift", "drift_detected": True, "message": "Drift: the embedding drifted (classifier AUC 0.97).",
        "drifted_features": ["pixel_mean", "emb_0"], "model_version": "abc123",
        "groups": {"image_features": {"drifted": False}, "embedding": {"drifted": True}},
        "window": {"since": "2026-01-01T10:00:00+00:00", "until": "2026-01-01T11:00:00+00:00"},
        "verdict_json": "runs/monitor/abc123/20260101T100000.000Z--20260101T110000.000Z/verdict.json",
    }
    return {**verdict, **changes}


@pytest.mark.parametrize("flag, configured, in_pod, expected", [
    (None, "", False, ("local", None)),
    ("http://kfp:8888", "", False, ("cluster", "http://kfp:8888")),
    (None, "http://configured:8888", False, ("cluster", "http://configured:8888")),
    ("http://flag:8888", "http://configured:8888", True, ("cluster", "http://flag:8888")),
    (None, "", True, ("cluster", None)),  # in a pod: the in-cluster KFP service
], ids=["local", "flag", "config", "flag-wins", "in-pod"])
def test_retrain_target(monkeypatch, flag, configured, in_pod, expected):
    if in_pod:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    cfg = Config()
    cfg.cluster.kfp_host = configured
    assert retrain_target(cfg, flag) == expected


def test_the_reason_names_what_drifted_where_and_when():
    reason = drift_reason(drifted_verdict())
    assert reason["drifted_groups"] == ["embedding"] and reason["trigger"] == "drift"
    text = reason_text(reason)
    for part in ("embedding", "pixel_mean, emb_0", "abc123", "2026-01-01T10:00:00+00:00", "2026-01-01T11:00:00+00:00",
                 "verdict.json"):
        assert part in text
    assert retrain_run_id(reason) == "retrain-abc123-20260101T110000Z"
    assert retrain_run_id(drift_reason(drifted_verdict(model_version="a/b c"))).startswith("retrain-a_b_c-")


def test_no_drift_no_retrain(tmp_path):
    with pytest.raises(ValueError, match="found no drift"):
        retrain_on_drift(drifted_verdict(status="ok", drift_detected=False), Config(), tmp_path)
    assert not (tmp_path / RETRAIN_MARKER).exists()


def test_a_claimed_window_starts_nothing(tmp_path, monkeypatch):
    # Another monitor is starting the retrain of this window (or did): its record comes back, nothing starts.
    claim = {"status": "starting", "target": "local", "reason": drift_reason(drifted_verdict())}
    (tmp_path / RETRAIN_MARKER).write_text(json.dumps(claim))
    monkeypatch.setattr("pipelines.retrain.start_local_retrain", lambda *a, **k: pytest.fail("started twice"))
    assert retrain_on_drift(drifted_verdict(), Config(), tmp_path, out=lambda line: None) == claim


# --- through the CLI, against the KFP API stand-in -------------------------------------------------


@pytest.fixture(scope="module")
def drifted_log(tmp_path_factory) -> tuple[Path, list[str]]:
    """An inverted-digits hour in a request log, and the monitor arguments that check it."""
    root = tmp_path_factory.mktemp("drifted")
    images = (load_digits().images / 16.0).astype(np.float32)[:, None]
    image_features(images[:1100]).to_csv(root / "reference.csv", index=False)
    lines = []
    for i, row in enumerate(image_features(1.0 - images[1100:1300]).to_dict(orient="records")):
        lines.append(json.dumps({"timestamp": f"2026-01-01T10:{i // 60:02d}:{i % 60:02d}.000+00:00",
                                 "model_version": "abc123", "source": "client", **row}, separators=(",", ":")))
    (root / "requests").mkdir()
    (root / "requests" / "requests.jsonl").write_text("\n".join(lines) + "\n")
    args = ["monitor", "--json", "--log-dir", str(root / "requests"), "--reference", str(root / "reference.csv"),
            "--serving-home", str(root / "serving"),  # its release ledger: <home>/ledger
            "--model-version", "abc123", "--since", "2026-01-01T10:00:00Z", "--until", "2026-01-01T11:00:00Z"]
    return root, args


def test_retrain_on_drift_starts_one_cluster_run_per_window_with_the_reason(drifted_log, kfp_api, monkeypatch,
                                                                             tmp_path, run_cli):
    root, args = drifted_log
    out = tmp_path / "verdicts"
    argv = [*args, "--out", str(out), "--retrain-on-drift", "--kfp-host", kfp_api.url, "--runs-dir", str(tmp_path)]

    monkeypatch.setenv("KFP_TOKEN", "wrong-token")  # a start that fails: reported, nothing claimed, retried later
    code, stdout, err = run_cli(argv)
    verdict_dir = out / "abc123" / "20260101T100000.000Z--20260101T110000.000Z"
    assert code == 1 and "the retrain did not start" in err, err
    assert json.loads(stdout.splitlines()[-1])["drift_detected"] is True
    assert not (verdict_dir / RETRAIN_MARKER).exists() and not kfp_api.calls("POST", "/runs")

    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    code, stdout, err = run_cli(argv)
    verdict = json.loads(stdout.splitlines()[-1])
    assert code == 2, err  # drift, and the retrain started
    (run,) = [r.body for r in kfp_api.calls("POST", "/runs")]
    retrain = verdict["retrain"]
    assert retrain["target"] == "cluster" and retrain["run_id"] in kfp_api.runs and retrain["status"] == "started"
    assert "retrain" in run["display_name"]
    for part in ("image_features", "pixel_mean", "abc123", "2026-01-01T10:00:00+00:00", str(verdict_dir / "verdict.json")):
        assert part in run["description"], part
    saved = json.loads((verdict_dir / "verdict.json").read_text())
    assert saved["retrain"] == retrain == json.loads((verdict_dir / RETRAIN_MARKER).read_text())
    first_bytes = (verdict_dir / "verdict.json").read_bytes()

    code, _, err = run_cli(argv)  # the same window again: no second run, the same verdict (words on stderr: --json)
    assert code == 2 and len(kfp_api.calls("POST", "/runs")) == 1
    assert "already started for this window" in err
    assert (verdict_dir / "verdict.json").read_bytes() == first_bytes
    code, _, _ = run_cli([*args, "--out", str(out)])  # without the flag, the window's retrain stays in its verdict
    assert (verdict_dir / "verdict.json").read_bytes() == first_bytes
    # The ledger: one drift record for the window (reruns find it), and the retrain it caused, naming the KFP run.
    from components.core.ledger import Ledger

    ledger = Ledger(root / "serving" / "ledger")
    (drift,) = ledger.find("drift", window=verdict["window"])
    assert saved["ledger_record"] == drift.id and drift.data["drift_detected"] is True
    assert drift.data["report"] == str(verdict_dir / "drift_report.html")
    (started,) = ledger.find("retrain_started", run=retrain["run_id"])
    assert started.parents == (drift.id,) and started.data["target"] == "cluster"
    assert retrain["ledger_record"] == started.id


def render_overlay(name: str) -> list[dict]:
    import shutil
    import subprocess

    import yaml

    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed to render the manifests (`kubectl kustomize`), see tests/test_manifests.py")
    path = ROOT / "manifests" / "overlays" / name
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_the_retrain_cronjob_starts_one_run_from_its_pod(drifted_log, kfp_api, monkeypatch, tmp_path, run_cli):
    """`mlops monitor` exactly as the retrain overlay's CronJob runs it (its args, env, mounted config and
    token), as a pod would: KUBERNETES_SERVICE_HOST set, the KFP token in a file, against a multi-user KFP.
    The pod's paths are mapped into tmp_path, the s3:// settings to the local drifted hour."""
    import functools

    from components.monitor import windows
    from pipelines.cluster.connection import IN_CLUSTER_HOST

    root, _ = drifted_log
    objects = render_overlay("retrain")
    one = lambda kind, name: next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)  # noqa: E731
    cronjob = one("CronJob", "kfp-mlops-monitor")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    # The pod's files, here: each mounted ConfigMap key and the projected token under tmp_path.
    pod_files: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        local = tmp_path / "pod" / mount["mountPath"].strip("/")
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:  # /tmp: the working directory, below
            continue
        if "configMap" in volume:
            local.mkdir(parents=True)
            for key, text in one("ConfigMap", volume["configMap"]["name"])["data"].items():
                (local / key).write_text(text)
        elif "projected" in volume:
            local.mkdir(parents=True)
            (source,) = volume["projected"]["sources"]
            assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
            (local / source["serviceAccountToken"]["path"]).write_text("wrong-token\n")
        pod_files[mount["mountPath"].rstrip("/") + "/"] = local

    def local(value: str) -> str:
        for prefix, path in pod_files.items():
            if value.startswith(prefix):
                return str(path / value[len(prefix):])
        return value

    # Env and args as Kubernetes expands them; the object store's paths become the local drifted hour.
    storage = {**one("ConfigMap", "kfp-mlops-storage")["data"],
               "KFP_MLOPS_REQUEST_LOG_DIR": str(root / "requests"), "KFP_MLOPS_REFERENCE": str(root / "reference.csv")}
    argv = [local(re.sub(r"\$\((\w+)\)", lambda m: storage[m.group(1)], a)) for a in container["args"]]
    assert argv[argv.index("--kfp-host") + 1] == IN_CLUSTER_HOST
    argv[argv.index("--kfp-host") + 1] = kfp_api.url  # the in-cluster service, here
    for key in ("KFP_TOKEN", "KUBECONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    for e in container["env"]:
        if "value" in e and e["name"] != "HOME":
            monkeypatch.setenv(e["name"], local(e["value"]))
    # The release ledger comes from the storage ConfigMap (envFrom), an s3:// prefix there, a directory here.
    assert {"configMapRef": {"name": "kfp-mlops-storage"}} in container["envFrom"]
    assert storage["KFP_MLOPS_LEDGER"].startswith("s3://")
    monkeypatch.setenv("KFP_MLOPS_LEDGER", str(tmp_path / "ledger"))
    token_file = Path(os.environ["KF_PIPELINES_SA_TOKEN_PATH"])
    assert token_file.is_file(), "KF_PIPELINES_SA_TOKEN_PATH points into the token volume"
    monkeypatch.chdir(tmp_path)  # the pod's workingDir (/tmp, an emptyDir)
    # --last 1h --settle 10m, run at 11:17: the drifted hour 10:00-11:00.
    monkeypatch.setattr(windows, "last_window", functools.partial(windows.last_window, now="2026-01-01T11:17:00Z"))
    job = cronjob["spec"]["jobTemplate"]["spec"]
    fails_the_job = set(job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"])

    # A token KFP rejects: drift, but no run; exit 1, which the Job retries (backoffLimit), nothing claimed.
    code, stdout, err = run_cli(argv)
    assert code == 1 and code not in fails_the_job and job["backoffLimit"] >= 1
    assert "drift detected but the retrain did not start" in err, err
    assert json.loads(stdout.splitlines()[-1])["drift_detected"] is True and not kfp_api.calls("POST", "/runs")

    token_file.write_text(TOKEN + "\n")  # the kubelet rotated in a good one: the retry starts the run
    code, stdout, err = run_cli(argv)
    verdict = json.loads(stdout.splitlines()[-1])
    assert code == 2 and code in fails_the_job, err  # drift: the Job fails at once, after the run started
    (run,) = [r.body for r in kfp_api.calls("POST", "/runs")]
    assert verdict["retrain"]["run_id"] in kfp_api.runs and verdict["retrain"]["host"] == kfp_api.url
    assert {r.authorization for r in kfp_api.requests} <= {f"Bearer {TOKEN}", "Bearer wrong-token"}
    # The run goes where the config (the mounted ConfigMap) says, the namespace of the monitor's RoleBinding.
    binding = one("RoleBinding", "kfp-mlops-monitor-pipelines")
    (experiment,) = kfp_api.experiments.values()
    assert experiment["namespace"] == binding["metadata"]["namespace"] == "kfp-mlops"
    assert run["service_account"] == "kfp-mlops-pipeline"
    # the ConfigMap's settings that differ from the compiled ones, in the run form's other_settings
    # (and nothing else: the cluster's defaults, e.g. deploy to Kubernetes and the champion from the model store)
    assert run["runtime_config"]["parameters"]["other_settings"] == {"serving": {
        "model_store_uri": "s3://kfp-mlops/models/digits"}}
    assert "drift in" in run["description"]

    code, _, err = run_cli(argv)  # the same window again (a rerun of the Job): no second run
    assert code == 2 and len(kfp_api.calls("POST", "/runs")) == 1 and "already started for this window" in err
    from components.core.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger")
    assert [r.type for r in ledger.records()] == ["drift", "retrain_started"]
    assert ledger.latest("retrain_started").data["run"] == verdict["retrain"]["run_id"]


def test_no_retrain_without_drift(drifted_log, tmp_path, monkeypatch, run_cli):
    root, args = drifted_log
    monkeypatch.setattr("pipelines.retrain.start_local_retrain", lambda *a, **k: pytest.fail("no drift, no retrain"))
    clean = [*args[:-4], "--since", "2026-01-01T11:00:00Z", "--until", "2026-01-01T12:00:00Z"]
    code, stdout, _ = run_cli([*clean, "--out", str(tmp_path), "--retrain-on-drift"])
    verdict = json.loads(stdout.splitlines()[-1])
    assert code == 0 and verdict["status"] == "insufficient_data" and "retrain" not in verdict


# --- a real local retrain ---------------------------------------------------------------------------


@pytest.mark.slow
def test_local_retrain_runs_the_pipeline_and_records_why(tmp_path):
    from serving.processes import free_port
    from serving.server import LocalTorchServe

    cfg = config_mod.load(ROOT / "examples" / "quick.yaml")
    cfg.serving.home = str(tmp_path / "serving")
    cfg.serving.inference_port, cfg.serving.management_port, cfg.serving.metrics_port = free_port(), free_port(), free_port()
    from components.core.ledger import Ledger

    ledger = Ledger(tmp_path / "serving" / "ledger")  # the monitor's drift record of the window
    drift = ledger.append("drift", {"model_version": "abc123", "window": drifted_verdict()["window"],
                                    "drift_detected": True})
    verdict = drifted_verdict(verdict_json=str(tmp_path / "verdict" / "verdict.json"), ledger=ledger.base,
                              ledger_record=drift.id)
    try:
        record = retrain_on_drift(verdict, cfg, tmp_path / "verdict", runs_dir=tmp_path / "runs", wait=True,
                                  serve_after=False, timeout_s=1500)
    finally:
        LocalTorchServe(tmp_path / "serving").stop(quiet=True)
    log = Path(record["log"]).read_text() if Path(record["log"]).is_file() else "(no log)"
    assert record["target"] == "local" and record["status"] == "succeeded", log[-3000:]
    assert record["exit_code"] == 0 and record["run_id"] == "retrain-abc123-20260101T110000Z"
    run_dir = Path(record["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    reason = drift_reason(verdict)
    assert summary["status"] == "succeeded" and summary["trigger"] == reason
    assert json.loads((run_dir / TRIGGER_FILE).read_text()) == reason
    assert json.loads((run_dir / "config.json").read_text())["pretrain"]["epochs"] == 3  # quick.yaml's settings
    assert "because of drift in embedding" in log
    assert json.loads((tmp_path / "verdict" / RETRAIN_MARKER).read_text()) == record
    # The same window again: the record comes back, no second run directory appears.
    assert retrain_on_drift(verdict, cfg, tmp_path / "verdict", runs_dir=tmp_path / "runs", out=lambda line: None) == record
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["retrain", record["run_id"]]
    # The ledger leads from the drift to the retrain, its run and the release that followed.
    forward = Ledger(tmp_path / "serving" / "ledger").descendants(drift)
    assert [r.type for r in forward] == ["retrain_started", "trained", "gated", "released", "drift"]
    assert forward[0].data["run"] == forward[1].data["run_id"] == record["run_id"]
    assert record["ledger_record"] == forward[0].id
