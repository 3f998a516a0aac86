"""The browser harness itself: console errors are seen, screenshots are whole pages, every test leaves one."""

from __future__ import annotations

import os
import subprocess
import sys

import browser_support
import pytest

pytestmark = pytest.mark.browser

PAGE_WITH_ERRORS = """<!doctype html><html><head><meta charset="utf-8"><title>errors</title></head><body>
<h1>errors</h1>
<script>console.error("logged on purpose");</script>
<script>undefinedFunctionCalledOnPurpose();</script>
</body></html>"""
CLEAN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>clean</title></head><body>
<h1>clean</h1><script>console.log("only information");</script></body></html>"""


def test_console_errors_and_uncaught_exceptions_are_seen(browser, tmp_path):
    (tmp_path / "errors.html").write_text(PAGE_WITH_ERRORS)
    (tmp_path / "clean.html").write_text(CLEAN_PAGE)

    browser.get((tmp_path / "errors.html").as_uri())
    errors = browser_support.console_errors(browser)
    assert any("logged on purpose" in e for e in errors), errors
    assert any("undefinedFunctionCalledOnPurpose" in e for e in errors), errors

    browser.get((tmp_path / "clean.html").as_uri())
    assert browser_support.console_errors(browser) == [], "an earlier page's errors must not leak into this one"


def test_a_screenshot_holds_the_whole_page_at_the_fixed_width(browser, tmp_path):
    page = tmp_path / "tall.html"
    page.write_text('<!doctype html><html><body style="margin:0"><div style="height:2500px;background:#36c">'
                    "</div></body></html>")
    browser.get(page.as_uri())
    shot = browser_support.screenshot(browser, tmp_path / "tall.png")
    assert browser_support.png_size(shot) == (1280, 2500)
    assert browser.execute_script("return window.innerWidth") == browser_support.WINDOW[0], \
        "the viewport goes back to the fixed window after a screenshot"


def test_every_browser_test_leaves_a_screenshot_of_its_page(tmp_path):
    test = f"{__file__}::test_console_errors_and_uncaught_exceptions_are_seen"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env[browser_support.ARTIFACTS_ENV] = str(tmp_path / "artifacts")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp"), test],
                          cwd=browser_support.ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    shot = tmp_path / "artifacts" / "test_browser_harness__test_console_errors_and_uncaught_exceptions_are_seen.png"
    assert shot.is_file(), sorted(p.name for p in (tmp_path / "artifacts").glob("*"))
    assert browser_support.png_size(shot)[0] == browser_support.WINDOW[0]
