"""``mlops doctor`` and the preflight of ``mlops run``: each check fails on what it checks, says how to fix it, and a
failed check stops ``mlops run`` before anything is written."""

import json
import os
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest

from pipelines import config, doctor


def test_python_version():
    assert doctor.python_version((3, 11, 7)).status == doctor.OK
    check = doctor.python_version((3, 10, 12))
    assert check.status == doctor.FAIL and "3.10.12" in check.what and "3.11" in check.what


@pytest.mark.parametrize("stderr, status, major", [
    ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', doctor.OK, "17"),
    ('openjdk version "21" 2023-09-19', doctor.OK, "21"),
    ('openjdk version "11.0.2" 2019-01-15', doctor.FAIL, "11"),
    ('java version "1.8.0_292"', doctor.FAIL, "8"),
])
def test_java_version_reads_java_dash_version(stderr, status, major):
    def run(argv, **kwargs):
        assert argv == ["java", "-version"]
        return subprocess.CompletedProcess(argv, 0, "", stderr)

    check = doctor.java_version(run)
    assert check.status == status and f"Java {major}" in check.what
    if status == doctor.FAIL:
        assert "openjdk-17" in check.fix


def test_java_missing_says_how_to_install_it():
    def run(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    check = doctor.java_version(run)
    assert check.status == doctor.FAIL and "not found" in check.what and "apt-get install" in check.fix
    assert check.line().startswith("FAIL  java not found") and check.line().endswith(")")


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_port_held_by_another_program_fails(taken_port, tmp_path):
    cfg = config.defaults()
    cfg.serving.home = str(tmp_path / "serving")  # no server of ours there
    cfg.serving.inference_port = taken_port
    with socket.socket() as s:  # a free one for the others
        s.bind(("127.0.0.1", 0))
        cfg.serving.management_port = s.getsockname()[1]
    cfg.serving.metrics_port = cfg.serving.management_port + 1 if cfg.serving.management_port < 65535 else 1025
    inference, management, _ = doctor.serving_ports(cfg)
    assert inference.status == doctor.FAIL and str(taken_port) in inference.what
    assert "--serving-inference-port" in inference.fix
    assert management.status == doctor.OK


def test_a_port_held_by_our_own_server_is_fine_and_only_then(taken_port):
    cfg = config.defaults()
    cfg.serving.inference_port = taken_port  # held by this test process
    held = lambda host, port: port == taken_port  # noqa: E731
    # Our server's processes hold it (the real listener lookup names this process).
    checks = doctor.serving_ports(cfg, in_use=held, ours=lambda: {os.getpid()})
    assert [c.status for c in checks] == [doctor.OK] * 3 and "replaces" in checks[0].what
    # Our server runs, but another program holds the port: not ours to replace.
    checks = doctor.serving_ports(cfg, in_use=held, ours=lambda: {os.getpid() + 1_000_000})
    assert [c.status for c in checks] == [doctor.FAIL, doctor.OK, doctor.OK]
    assert doctor._listening_pids(taken_port) == {os.getpid()}
    # No server of ours.
    checks = doctor.serving_ports(cfg, in_use=held, ours=lambda: None)
    assert [c.status for c in checks] == [doctor.FAIL, doctor.OK, doctor.OK]
    # Ours runs in containers (no process ids here), or the system will not name listeners: its running decides.
    assert doctor.serving_ports(cfg, in_use=held, ours=lambda: set())[0].status == doctor.OK
    assert doctor.serving_ports(cfg, in_use=held, ours=lambda: {1}, listeners=lambda port: None)[0].status == doctor.OK


@pytest.mark.parametrize("free, status", [(100 << 20, doctor.FAIL), (3 << 30, doctor.WARN), (50 << 30, doctor.OK)])
def test_free_disk_thresholds(tmp_path, free, status):
    seen = []

    def usage(path):
        seen.append(path)
        return SimpleNamespace(free=free)

    checks = doctor.free_disk({"runs dir": tmp_path / "runs", "serving home": tmp_path / "runs" / "serving"}, usage)
    assert len(checks) == 1, "one line per file system"
    assert checks[0].status == status and "runs dir" in checks[0].what
    assert seen == [str(tmp_path)], "a directory not made yet is measured on its nearest existing parent"


def test_writable(tmp_path):
    assert doctor.writable(tmp_path / "new" / "runs", "runs dir").status == doctor.OK
    assert doctor.writable(tmp_path, "runs dir").status == doctor.OK
    assert list(tmp_path.iterdir()) == [], "the check leaves nothing behind"
    (tmp_path / "file").write_text("x")
    check = doctor.writable(tmp_path / "file" / "runs", "runs dir")
    assert check.status == doctor.FAIL and "not a directory" in check.what


def test_preflight_is_quick_and_checks_java_only_where_torchserve_runs_here(tmp_path):
    cfg = config.defaults()
    cfg.serving.home = str(tmp_path / "serving")
    started = time.monotonic()
    checks = doctor.preflight(cfg, tmp_path / "runs")
    assert time.monotonic() - started < 3  # < 1 s on an idle machine; the bound leaves room for a loaded one
    whats = " | ".join(c.what for c in checks)
    assert "Python" in whats and "torch" in whats and "Java" in whats and "port 8080" in whats and "GiB free" in whats
    cfg.serving.deploy_target = "kubernetes"
    whats = " | ".join(c.what for c in doctor.preflight(cfg, tmp_path / "runs"))
    assert "Java" not in whats and "port" not in whats


def _no_java(monkeypatch, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_mlops_run_stops_before_training_when_a_check_fails(tmp_path, monkeypatch, run_cli):
    import pipelines.local

    ran = []
    monkeypatch.setattr(pipelines.local, "run_local", lambda *a, **k: ran.append(1))
    _no_java(monkeypatch, tmp_path)
    runs = tmp_path / "runs"
    code, out, err = run_cli(["run", "--runs-dir", str(runs), "--serving-home", str(tmp_path / "serving")])
    assert code == 2 and ran == [] and not runs.exists()
    assert "FAIL  java not found" in err and "--skip-doctor" in err


def test_skip_doctor_runs_anyway(tmp_path, monkeypatch, run_cli):
    import pipelines.local

    ran = []
    monkeypatch.setattr(pipelines.local, "run_local", lambda *a, **k: ran.append(1) or {"status": "succeeded"})
    _no_java(monkeypatch, tmp_path)
    code, _, err = run_cli(["run", "--skip-doctor", "--runs-dir", str(tmp_path / "runs")])
    assert code == 0 and ran == [1], err


def test_mlops_doctor_json_and_exit_code(tmp_path, monkeypatch, run_cli):
    args = ["doctor", "--json", "--runs-dir", str(tmp_path / "runs"), "--serving-home", str(tmp_path / "serving")]
    code, out, _ = run_cli(args)
    report = json.loads(out)
    assert {c["status"] for c in report["checks"]} <= {"ok", "warn", "FAIL"}
    assert code == (0 if report["ok"] else 1)
    _no_java(monkeypatch, tmp_path)
    code, out, _ = run_cli(args)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert any(c["status"] == "FAIL" and "java" in c["what"] for c in report["checks"])
    code, out, _ = run_cli(args[:1] + args[2:])
    assert code == 1 and "FAIL  java not found" in out and "would stop before training" in out
