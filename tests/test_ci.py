"""How CI runs the container and browser tests, checked without a Docker engine or a browser.

.ci/run calls `make test CONTAINERS=require`: the Makefile installs and starts an engine, builds the images and sets
KFP_MLOPS_CONTAINER_TESTS=require, under which a container test that skips fails (tests/container_support.py).
Here: that rule on a real container test whose engine is absent, the line `make test` prints when no engine
answers, and scripts/container_engine.sh's refusal to stop a daemon it did not start. The same for BROWSER=require
and the browser tests (tests/browser_support.py, scripts/browser.sh), with a browser that is not there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import container_support
import pytest

ROOT = Path(__file__).resolve().parents[1]
# A container test that needs the engine and both images (through the session fixtures of tests/conftest.py).
CONTAINER_TEST = "tests/containers/test_containers_images.py::test_pipeline_image_runs_mlops_and_imports_every_step"


# Settings of the run around this one (`make test`'s own, pytest's) that must not reach the runs started here.
OUTER_SETTINGS = ("PYTEST_ADDOPTS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", container_support.MODE_ENV,
                  "KFP_MLOPS_BROWSER_TESTS")


def no_engine_env(**extra: str) -> dict[str, str]:
    """This environment, with DOCKER_HOST at a socket that does not exist: no engine answers, whatever this machine
    runs."""
    env = {k: v for k, v in os.environ.items() if k not in OUTER_SETTINGS}
    return {**env, "DOCKER_HOST": "unix:///nonexistent/kfp-mlops-no-engine.sock", **extra}


def run_pytest(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), CONTAINER_TEST],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env=no_engine_env(**{container_support.MODE_ENV: mode}))


def test_ci_runs_make_test_with_the_container_and_browser_tests_required():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test CONTAINERS=require BROWSER=require" in lines


def test_without_an_engine_a_container_test_skips_saying_how_to_get_one(tmp_path):
    done = run_pytest(tmp_path, "auto")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 skipped" in out and "no container engine answers" in out, out
    assert "scripts/container_engine.sh ensure" in out, out


def test_when_required_a_skipped_container_test_fails_with_the_skips_reason(tmp_path):
    done = run_pytest(tmp_path, "require")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "skipped" not in out.splitlines()[-1], out
    assert f"{container_support.MODE_ENV}=require: a container test may not skip" in out, out
    assert "no container engine answers" in out, out


def skipped_report(reason: str) -> pytest.CollectReport:
    return pytest.CollectReport("x", "skipped", (str(ROOT / "x.py"), 1, f"Skipped: {reason}"), [])


@pytest.mark.parametrize("mode", ["require", "auto", "off"])
def test_only_required_container_tests_turn_a_skip_into_a_failure(monkeypatch, mode):
    monkeypatch.setenv(container_support.MODE_ENV, mode)
    inside = container_support.CONTAINER_TESTS / "test_containers_images.py"
    report = skipped_report("no engine")
    container_support.fail_instead_of_skip(report, inside)
    assert report.outcome == ("failed" if mode == "require" else "skipped")
    if mode == "require":
        assert "Skipped: no engine" in report.longrepr

    elsewhere = skipped_report("kubectl missing")
    container_support.fail_instead_of_skip(elsewhere, ROOT / "tests" / "test_manifests.py")
    assert elsewhere.outcome == "skipped", "only tests under tests/containers are required"

    expected_failure = skipped_report("known bug")
    expected_failure.wasxfail = "known bug"
    container_support.fail_instead_of_skip(expected_failure, inside)
    assert expected_failure.outcome == "skipped"


def test_make_test_says_in_one_line_why_the_container_tests_will_be_skipped():
    done = subprocess.run(["make", "--no-print-directory", "containers", "CONTAINERS=auto"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False, env=no_engine_env())
    assert done.returncode == 0, done.stdout + done.stderr
    line, = done.stdout.splitlines()
    assert "no Docker engine answers" in line and "container tests (tests/containers) will be skipped" in line


def test_an_unknown_containers_mode_is_refused():
    done = subprocess.run(["make", "--no-print-directory", "containers", "CONTAINERS=sometimes"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False, env=no_engine_env())
    assert done.returncode != 0 and "use require, auto or off" in done.stderr


def engine_script(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "container_engine.sh"), command], capture_output=True, text=True,
                          timeout=60, check=False, env=no_engine_env(STATE_DIR=str(tmp_path)))


def test_the_engine_script_stops_only_a_dockerd_it_started(tmp_path):
    check = engine_script(tmp_path, "check")
    assert check.returncode == 1 and "no Docker engine answers" in check.stdout

    assert engine_script(tmp_path, "stop").returncode == 0, "nothing started, nothing to stop"
    # A recorded pid that is no dockerd (stale, or reused since) is left alone.
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "dockerd.pid").write_text(f"{other.pid}\n")
        assert engine_script(tmp_path, "stop").returncode == 0
        assert other.poll() is None, "the script stopped a process that is not its dockerd"
        assert not (tmp_path / "dockerd.pid").exists()
    finally:
        other.kill()
        other.wait()


# ---------------------------------------------------------------- the browser tests (tests/browser)
# A browser test that needs only the browser (no pipeline run), and a browser that is not there.
BROWSER_TEST = "tests/browser/test_browser_harness.py::test_console_errors_and_uncaught_exceptions_are_seen"
NO_BROWSER = {"KFP_MLOPS_CHROMIUM": "/nonexistent/kfp-mlops/chromium"}


def run_browser_test(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), BROWSER_TEST],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env=no_engine_env(KFP_MLOPS_BROWSER_TESTS=mode, **NO_BROWSER))


def test_without_a_browser_a_browser_test_skips_saying_how_to_get_one(tmp_path):
    done = run_browser_test(tmp_path, "auto")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 skipped" in out and "no /nonexistent/kfp-mlops/chromium to run" in out, out
    assert "scripts/browser.sh ensure" in out, out


def test_when_required_a_skipped_browser_test_fails_with_the_skips_reason(tmp_path):
    done = run_browser_test(tmp_path, "require")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "KFP_MLOPS_BROWSER_TESTS=require: a browser test may not skip" in out, out
    assert "no /nonexistent/kfp-mlops/chromium to run" in out, out


def test_browser_tests_turned_off_skip_even_with_a_browser(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), BROWSER_TEST],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env=no_engine_env(KFP_MLOPS_BROWSER_TESTS="off"))
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "1 skipped" in out and "BROWSER=off" in out, out


def test_make_test_says_in_one_line_why_the_browser_tests_will_be_skipped():
    done = subprocess.run(["make", "--no-print-directory", "browser", "BROWSER=auto"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False, env=no_engine_env(**NO_BROWSER))
    assert done.returncode == 0, done.stdout + done.stderr
    line, = done.stdout.splitlines()
    assert "no /nonexistent/kfp-mlops/chromium" in line and "browser tests (tests/browser) will be skipped" in line


def test_an_unknown_browser_mode_is_refused():
    done = subprocess.run(["make", "--no-print-directory", "browser", "BROWSER=sometimes"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False, env=no_engine_env())
    assert done.returncode != 0 and "use require, auto or off" in done.stderr


def test_the_browser_script_names_a_driver_that_does_not_match_the_browser(tmp_path):
    """chromedriver drives only its own major version of Chromium: check says so instead of a test failing later."""
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\necho 'Chromium 156.0.8078.129 built on Debian GNU/Linux 12 (bookworm)'\n")
    driver = tmp_path / "chromedriver"
    driver.write_text("#!/bin/sh\necho 'ChromeDriver 131.0.6778.85 (abc-refs/branch-heads/6778@{#1})'\n")
    for path in (chromium, driver):
        path.chmod(0o755)
    done = subprocess.run([str(ROOT / "scripts" / "browser.sh"), "check"], capture_output=True, text=True,
                          timeout=60, check=False,
                          env=no_engine_env(KFP_MLOPS_CHROMIUM=str(chromium), KFP_MLOPS_CHROMEDRIVER=str(driver)))
    assert done.returncode == 1 and "is version 156 but" in done.stdout and "drives version 131" in done.stdout

    driver.write_text("#!/bin/sh\necho 'ChromeDriver 156.0.8078.129 (abc-refs/branch-heads/8078@{#2497})'\n")
    done = subprocess.run([str(ROOT / "scripts" / "browser.sh"), "check"], capture_output=True, text=True,
                          timeout=60, check=False,
                          env=no_engine_env(KFP_MLOPS_CHROMIUM=str(chromium), KFP_MLOPS_CHROMEDRIVER=str(driver)))
    assert done.returncode == 0, done.stdout + done.stderr
