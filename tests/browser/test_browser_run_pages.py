"""The run browser (pipelines/browser) in headless Chromium, from disk (file://) and through `mlops ui`.

Two real pipeline runs on tiny settings (a released one, deployed and monitored, and a blocked one with an
unreachable accuracy floor: the setting the compare page must show differing), then every page: it loads with no
console errors, its plotly charts are drawn, and it shows what summary.json, the reports, the release ledger and
the monitoring window hold. A copy of the site with a report and plotly taken away must fail the same checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import browser_support
import pytest
from conftest import free_ports
from selenium.webdriver.common.by import By

from pipelines import config
from pipelines.local import run_local

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RELEASED, BLOCKED = "released-run", "blocked-run"
BLOCKING_ACCURACY_FLOOR = 0.9999
# Where `mlops ui` prints its address: "Run browser at http://127.0.0.1:PORT/ui/index.html (...)".
UI_URL = re.compile(r"Run browser at (http://127\.0\.0\.1:\d+/ui/index\.html)")
# Docs screenshots: set to a folder (docs/img) to also write ui-<page>.png there.
SCREENSHOTS_ENV = "KFP_MLOPS_SCREENSHOTS"


def tiny_config(serving_home: Path) -> config.Config:
    """examples/quick.yaml cut down to what the pages need (every step runs, every report is written), with
    limits a one-epoch model passes: the pages are under test here, not the model."""
    cfg = config.load(browser_support.ROOT / "examples" / "quick.yaml")
    cfg.serving.inference_port, cfg.serving.management_port, cfg.serving.metrics_port = free_ports(3)
    cfg.serving.home = str(serving_home)
    cfg.pretrain.epochs, cfg.finetune.epochs, cfg.finetune.probe_epochs = 1, 3, 1
    cfg.gates.champion_model = "none"
    cfg.gates.mia_reference_models, cfg.gates.pgd_steps, cfg.gates.corruption_severities = 0, 2, 1
    cfg.gates.min_test_accuracy, cfg.gates.max_mia_auc = 0.2, 1.0
    cfg.gates.min_noise_accuracy = cfg.gates.min_fgsm_accuracy = cfg.gates.min_pgd_accuracy = 0.0
    cfg.gates.min_corruption_accuracy, cfg.gates.max_corruption_drop = 0.0, 1.0
    cfg.monitor.replay_limit = 40
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, chromium):
    """``(work dir, {run id: summary})``: runs under ``<work>/runs``, served from ``<work>/runs/serving`` (the
    layout `mlops run` makes in a working directory). ``chromium`` first: no pipeline runs when no browser does."""
    work = tmp_path_factory.mktemp("browser-runs")
    summaries = {}
    released = tiny_config(work / "runs" / "serving")
    summaries[RELEASED] = run_local(released, runs_dir=work / "runs", run_id=RELEASED, serve_after=False, quiet=True)
    blocked = tiny_config(work / "runs" / "serving")
    blocked.gates.min_test_accuracy = BLOCKING_ACCURACY_FLOOR
    summaries[BLOCKED] = run_local(blocked, runs_dir=work / "runs", run_id=BLOCKED, serve_after=False, quiet=True)
    assert summaries[RELEASED]["status"] == "succeeded", summaries[RELEASED]
    assert summaries[BLOCKED]["status"] == "blocked", summaries[BLOCKED]
    return work, summaries


@pytest.fixture(scope="module")
def disk_site(runs) -> str:
    """The static site written by ``build_site``, as a file:// URL of its folder."""
    from pipelines.browser.site import build_site

    work, _ = runs
    return build_site(work / "runs", work / "site").parent.as_uri()


@pytest.fixture(scope="module")
def served_site(runs):
    """`mlops ui` on a free loopback port, run as a user runs it (in the working directory of the runs); the URL
    of the site's folder."""
    work, _ = runs
    mlops = Path(sys.executable).with_name("mlops")
    command = [str(mlops)] if mlops.is_file() else [sys.executable, "-m", "pipelines.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*command, "ui", "--runs-dir", "runs", "--port", "0"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line, deadline = "", time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
            if found := UI_URL.search(line):
                break
        else:
            raise AssertionError(f"mlops ui did not say where it serves (exit {server.poll()}): {line!r}")
        yield found.group(1).rsplit("/", 1)[0]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(params=["file", "http"])
def site(request) -> str:
    """The site's base URL: from disk, then through `mlops ui`."""
    return request.getfixturevalue("disk_site" if request.param == "file" else "served_site")


def assert_loaded(browser, url: str, page: str) -> None:
    errors = browser_support.open_page(browser, url, page)
    assert browser.find_elements(By.ID, f"page-{page}"), f"{url} shows no <main id=page-{page}>"
    assert errors == [], f"console errors on {url}: {errors}"
    undrawn = [chart for chart, drawn in browser_support.charts(browser).items() if not drawn]
    assert not undrawn, f"charts not drawn on {url}: {undrawn}"


def column(table, name: str) -> int:
    headers = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert name in headers, headers
    return headers.index(name)


def check_runs_page(browser, base: str, summaries: dict) -> None:
    assert_loaded(browser, f"{base}/index.html", "runs")
    assert browser_support.charts(browser).get("chart-accuracy"), "the accuracy chart is missing"
    table = browser.find_element(By.ID, "runs-table")
    accuracy, status = column(table, "test accuracy"), column(table, "status")
    rows = {row.get_attribute("data-run-id"): row.find_elements(By.TAG_NAME, "td")
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr[data-run-id]")}
    assert set(rows) == set(summaries), f"the runs table lists {sorted(rows)}"
    for run_id, summary in summaries.items():
        assert float(rows[run_id][accuracy].text) == pytest.approx(summary["metrics"]["test_accuracy"], abs=5e-5)
        assert rows[run_id][status].text.startswith(summary["status"])


def check_report(browser, run_page: str, name: str, path: Path) -> None:
    """One report on a run page, rendered as its kind asks: Markdown as HTML, HTML in its frame (with its images
    loaded), JSON pretty-printed."""
    sections = browser.find_elements(By.ID, f"report-{name}")
    assert sections, f"{run_page} has no section for the {name} report"
    section = sections[0]
    assert not section.find_elements(By.CLASS_NAME, "problem"), f"{name}: {section.text}"
    if path.suffix == ".md":
        rendered = section.find_elements(By.CLASS_NAME, "markdown")
        assert rendered, f"{name}: a Markdown report not rendered: {section.text[:200]!r}"
        body = rendered[0]
        assert body.find_elements(By.CSS_SELECTOR, "h1, h2"), f"{name}: no headings rendered"
        assert body.find_elements(By.CSS_SELECTOR, "table td"), f"{name}: no table rendered"
        raw = [line for line in body.text.splitlines() if line.startswith("#") or line.startswith("|")]
        assert not raw, f"{name} shows raw Markdown: {raw[:3]}"
    elif path.suffix == ".html":
        frame = section.find_element(By.TAG_NAME, "iframe")
        browser.execute_script("arguments[0].scrollIntoView()", frame)  # the frames load lazily
        browser.switch_to.frame(frame)
        try:
            deadline = time.monotonic() + browser_support.PAGE_LOAD_TIMEOUT_S
            while time.monotonic() < deadline and not browser.execute_script(
                    "return document.readyState === 'complete' && document.body !== null "
                    "&& document.body.innerText.trim().length > 0 "
                    "&& Array.from(document.images).every(function (i) { return i.complete; })"):
                time.sleep(0.2)
            text = browser.execute_script("return document.body ? document.body.innerText : ''")
            assert text.strip(), f"the {name} report's frame is empty"
            widths = browser.execute_script("return Array.from(document.images).map(function (i) {"
                                            " return i.naturalWidth; })")
            assert all(width > 0 for width in widths), f"{name}: images that did not load: {widths}"
            undrawn = browser.execute_script(
                "return Array.from(document.querySelectorAll('.plotly-graph-div')).filter(function (d) {"
                " return !d.querySelector('svg.main-svg'); }).map(function (d) { return d.id; })")
            assert not undrawn, f"{name}: figures not drawn: {undrawn}"
            if name == "evaluation":  # saliency maps: a plotly figure, or images
                assert browser.execute_script(
                    "return document.querySelector('#saliency svg.main-svg, img[alt*=saliency]') !== null"), \
                    "the evaluation report shows no saliency maps"
        finally:
            browser.switch_to.default_content()
    elif path.suffix == ".json":
        assert section.find_element(By.TAG_NAME, "pre").text.strip().startswith("{"), f"{name}: no JSON shown"


def check_run_page(browser, base: str, summary: dict) -> None:
    url = f"{base}/run/{summary['run_id']}.html"
    assert_loaded(browser, url, "run")
    assert browser_support.charts(browser).get("chart-steps"), f"{url} shows no step graph"
    steps = {row.get_attribute("data-step"): row.find_element(By.CLASS_NAME, "status").text
             for row in browser.find_elements(By.CSS_SELECTOR, "#steps-table tr[data-step]")}
    assert steps == {name: info["status"] for name, info in summary["steps"].items()}
    for name, path in summary["reports"].items():
        check_report(browser, url, name, Path(path))
    assert browser_support.console_errors(browser) == [], f"console errors in {url}'s reports"


def test_the_runs_page_lists_both_runs_with_their_test_accuracy(browser, runs, site):
    check_runs_page(browser, site, runs[1])


def test_a_released_run_shows_its_step_graph_reports_and_saliency_images(browser, runs, site):
    summary = runs[1][RELEASED]
    assert {"data_card", "evaluation", "privacy", "robustness", "drift"} <= set(summary["reports"])
    check_run_page(browser, site, summary)
    assert "in production" in browser.find_element(By.ID, "run-status").text


def test_a_blocked_run_says_which_gate_blocked_it(browser, runs, site):
    summary = runs[1][BLOCKED]
    check_run_page(browser, site, summary)
    assert "blocked by evaluation" in " ".join(browser.find_element(By.ID, "run-status").text.split())
    gate = browser.find_element(By.CSS_SELECTOR, "#gates-table tr[data-gate=evaluation]")
    assert "BLOCKED" in gate.text and "test accuracy" in gate.text


def test_compare_shows_both_runs_and_the_setting_that_differs(browser, runs, site):
    assert_loaded(browser, f"{site}/compare.html?runs={RELEASED},{BLOCKED}", "compare")
    table = browser.find_element(By.ID, "compare-table")
    assert [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")][2:] == [RELEASED, BLOCKED]
    floor = table.find_element(By.CSS_SELECTOR, 'tr[data-section=config][data-key="gates.min_test_accuracy"]')
    assert "differs" in floor.get_attribute("class").split()
    assert [td.text for td in floor.find_elements(By.TAG_NAME, "td")][2:] == ["0.2", str(BLOCKING_ACCURACY_FLOOR)]
    same = table.find_element(By.CSS_SELECTOR, 'tr[data-section=config][data-key="pretrain.epochs"]')
    assert "same" in same.get_attribute("class").split()
    accuracy = table.find_element(By.CSS_SELECTOR, 'tr[data-section=metrics][data-key="test_accuracy"]')
    shown = [float(td.text) for td in accuracy.find_elements(By.TAG_NAME, "td")[2:]]
    expected = [runs[1][run_id]["metrics"]["test_accuracy"] for run_id in (RELEASED, BLOCKED)]
    assert shown == pytest.approx(expected, abs=1e-6)


def test_releases_lists_every_ledger_record(browser, runs, site):
    from components.core.ledger import Ledger

    work, _ = runs
    records = Ledger(work / "runs" / "serving" / "ledger").records()
    assert [r.type for r in records] == ["trained", "gated", "released", "drift", "trained", "gated"]
    assert_loaded(browser, f"{site}/releases.html", "releases")
    rows = browser.find_elements(By.CSS_SELECTOR, "#releases-timeline tr[data-record-id]")
    assert sorted(row.get_attribute("data-record-id") for row in rows) == sorted(r.id for r in records)
    assert browser_support.charts(browser).get("chart-releases"), "the ledger chart is missing"


def test_monitoring_lists_the_released_runs_window(browser, runs, site):
    import json

    work, summaries = runs
    verdict = json.loads(Path(summaries[RELEASED]["reports"]["drift_verdict"]).read_text())
    assert_loaded(browser, f"{site}/monitoring.html", "monitoring")
    rows = browser.find_elements(By.CSS_SELECTOR, "#monitoring-table tr[data-window]")
    ours = [row for row in rows if RELEASED in row.text]
    assert len(ours) == 1, [row.text for row in rows]
    assert ours[0].find_element(By.CLASS_NAME, "verdict").text == ("drift" if verdict["drift_detected"] else "ok")
    assert browser_support.charts(browser).get("chart-monitoring-trend"), "the drift trend chart is missing"


def test_a_site_with_a_report_gone_or_plotly_missing_fails_these_checks(browser, runs, tmp_path):
    """The checks above can fail: a report file that disappeared, and charts whose script cannot load."""
    from pipelines.browser.site import build_site

    work, summaries = runs
    summary = summaries[RELEASED]
    privacy = Path(summary["reports"]["privacy"])
    hidden = tmp_path / privacy.name
    shutil.move(privacy, hidden)
    try:
        broken = build_site(work / "runs", tmp_path / "site").parent
    finally:
        shutil.move(hidden, privacy)
    with pytest.raises(AssertionError, match="privacy"):
        check_run_page(browser, broken.as_uri(), summary)

    (broken / "assets" / "plotly.min.js").unlink()
    with pytest.raises(AssertionError, match="console errors|not drawn"):
        check_runs_page(browser, broken.as_uri(), summaries)


PAGES = {"runs": "index.html", "run": f"run/{RELEASED}.html", "compare": f"compare.html?runs={RELEASED},{BLOCKED}",
         "releases": "releases.html", "monitoring": "monitoring.html"}


def test_a_whole_page_screenshot_of_every_page(browser, disk_site):
    """One PNG per page, 1280 px wide, in the test artifacts; with KFP_MLOPS_SCREENSHOTS=docs/img also there as
    ui-<page>.png (the README and docs/browser.md show those)."""
    folders = [browser_support.artifacts_dir() / "pages"]
    if os.environ.get(SCREENSHOTS_ENV):
        folders.append(Path(os.environ[SCREENSHOTS_ENV]))
    for page, path in PAGES.items():
        assert_loaded(browser, f"{disk_site}/{path}", page)
        for folder in folders:
            shot = browser_support.screenshot(browser, folder / f"ui-{page}.png", max_height=2400)
            width, height = browser_support.png_size(shot)
            assert width == browser_support.WINDOW[0] and height > 300, (shot, width, height)
