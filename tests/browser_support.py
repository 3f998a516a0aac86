"""What the browser tests (tests/browser/) need: headless Chromium driven by Selenium, its console, screenshots.

The browser is Debian's ``chromium`` with its ``chromedriver`` (``scripts/browser.sh ensure`` installs both), found on
PATH or named by KFP_MLOPS_CHROMIUM / KFP_MLOPS_CHROMEDRIVER; Selenium gets both paths, so Selenium Manager never
looks for (or downloads) a driver. KFP_MLOPS_BROWSER_TESTS, set by the Makefile from BROWSER, says how strictly:
``require`` (CI) turns every skip of a test under tests/browser into a failure with the skip's reason; ``auto`` (the
default) skips them, saying what to do, when no browser runs; ``off`` skips them. Every browser test leaves a
screenshot of its last page in build/test-artifacts/browser/ (KFP_MLOPS_BROWSER_ARTIFACTS), kept by CI.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

MODE_ENV = "KFP_MLOPS_BROWSER_TESTS"
CHROMIUM_ENV = "KFP_MLOPS_CHROMIUM"
CHROMEDRIVER_ENV = "KFP_MLOPS_CHROMEDRIVER"
ARTIFACTS_ENV = "KFP_MLOPS_BROWSER_ARTIFACTS"
ROOT = Path(__file__).resolve().parents[1]
BROWSER_TESTS = Path(__file__).resolve().parent / "browser"
HOW_TO_GET_A_BROWSER = "`sudo scripts/browser.sh ensure` installs Debian's chromium and chromium-driver"
# A fixed viewport: screenshots and layouts are comparable from run to run.
WINDOW = (1280, 900)
PAGE_LOAD_TIMEOUT_S = 30


def mode() -> str:
    return os.environ.get(MODE_ENV, "auto")


def artifacts_dir() -> Path:
    return Path(os.environ.get(ARTIFACTS_ENV, ROOT / "build" / "test-artifacts" / "browser"))


def binaries() -> tuple[str, str]:
    """The paths of chromium and chromedriver; a skip that says what to do when one is missing or tests are off."""
    if mode() == "off":
        pytest.skip(f"{MODE_ENV}=off (make test BROWSER=off): the browser tests are turned off")
    found = []
    for env, name, package in ((CHROMIUM_ENV, "chromium", "chromium"),
                               (CHROMEDRIVER_ENV, "chromedriver", "chromium-driver")):
        wanted = os.environ.get(env, name)
        path = shutil.which(wanted)
        if path is None:
            pytest.skip(f"no {wanted} to run (Debian package {package}; or name one in {env}): {HOW_TO_GET_A_BROWSER}")
        found.append(path)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed: `pip install -e '.[dev]'` (make install does)")
    return found[0], found[1]


def start_chromium():
    """A headless Chromium session that keeps every console message (read them with ``console_errors``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; /dev/shm is small in containers.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    return driver


def console_entries(driver) -> list[dict]:
    """The console messages since the last call (reading them empties the browser's buffer)."""
    return driver.get_log("browser")


def console_errors(driver) -> list[str]:
    """The console's errors (level SEVERE: uncaught exceptions, console.error, failed loads) since the last read."""
    return [entry["message"] for entry in console_entries(driver) if entry["level"] == "SEVERE"]


def open_page(driver, url: str, page: str, timeout_s: float = PAGE_LOAD_TIMEOUT_S) -> list[str]:
    """Load ``url``, wait until it shows ``<main id="page-PAGE">`` and every plotly chart on it is drawn (or
    ``timeout_s`` passes); return the console errors it logged."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    console_entries(driver)  # the pages before this one
    driver.get(url)
    try:
        WebDriverWait(driver, timeout_s).until(lambda d: d.execute_script(
            "return document.readyState === 'complete' && document.getElementById(arguments[0]) !== null",
            f"page-{page}"))
        WebDriverWait(driver, timeout_s).until(lambda d: all(charts(d).values()))
    except TimeoutException:
        pass  # the caller's assertions say what is missing
    return console_errors(driver)


def charts(driver) -> dict[str, bool]:
    """``{chart div id: drawn}`` for every ``div.chart`` on the page: drawn means plotly put its SVG in it."""
    return driver.execute_script(
        "var out = {}; document.querySelectorAll('div.chart').forEach(function (c) {"
        " out[c.id] = c.querySelector('svg.main-svg') !== null; }); return out;")


def artifact_name(nodeid: str) -> str:
    """``tests/browser/test_x.py::test_y[file]`` -> ``test_x__test_y-file``: one file name per test."""
    module, _, test = nodeid.partition("::")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(module).stem}__{test}").strip("-")


def screenshot(driver, path: Path, width: int = WINDOW[0], max_height: int = 6000) -> Path:
    """A PNG of the whole page (not only the viewport), ``width`` pixels wide, at most ``max_height`` tall."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(
        "return Math.max(document.body ? document.body.scrollHeight : 0, document.documentElement.scrollHeight)")
    metrics = {"width": width, "height": max(min(int(height or 0), max_height), 1), "deviceScaleFactor": 1,
               "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        if not driver.save_screenshot(str(path)):
            raise RuntimeError(f"Chromium saved no screenshot to {path}")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def is_browser_test(path: Path) -> bool:
    return BROWSER_TESTS in Path(path).resolve().parents


def fail_instead_of_skip(report, path: Path) -> None:
    """Under KFP_MLOPS_BROWSER_TESTS=require, turn a skipped report (a test's or a module's collection) of a browser
    test into a failure that keeps the skip's reason. Expected failures (xfail) stay as they are."""
    if not (report.skipped and mode() == "require" and is_browser_test(path)) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{MODE_ENV}=require: a browser test may not skip, and this one did: {reason}"
