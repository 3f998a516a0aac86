"""The static run browser on fake runs: every page and its stable ids, escaping of user text, reports rendered by
suffix (Markdown without raw HTML, HTML sandboxed), one shared plotly.min.js, an empty runs directory."""

import json
import re
from html.parser import HTMLParser

from runbrowser_support import write_verdict

from components.core.ledger import Ledger
from pipelines.browser.site import build_site

EVIL = '<script>alert("x")</script>'


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of each <script type=application/json>."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.json, self._in_json = [], {}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "script" and attrs.get("type") == "application/json":
            self._in_json = attrs.get("data-chart") or attrs.get("id")

    def handle_data(self, data):
        if self._in_json:
            self.json[self._in_json] = json.loads(data)

    def handle_endtag(self, tag):
        self._in_json = None

    def ids(self):
        return {a["id"] for _, a in self.tags if a.get("id")}

    def with_attr(self, name):
        return [a for _, a in self.tags if name in a]


def test_every_page_with_its_ids(make_run, tmp_path):
    make_run("r-ok", mtime=1_700_000_000,
             reports={"data_card": (".md", "# Data card\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"),
                      "evaluation": (".html", "<html><body>eval</body></html>"),
                      "drift_verdict": (".json", '{"status": "ok"}')})
    make_run("r-blocked", "blocked", mtime=1_700_000_100)
    make_run("r-failed", "failed", mtime=1_700_000_200)
    make_run("r-old", raw={"run_id": "r-old", "status": "succeeded"}, mtime=1_700_000_300)
    write_verdict(make_run.runs / "monitor" / "v1" / "w1", "v1", "2026-01-01T10:00:00+00:00",
                  "2026-01-01T11:00:00+00:00", "drift", 0.75, ["pixel_mean"])
    ledger = Ledger(make_run.runs / "serving" / "ledger")
    ledger.append("trained", {"run_id": "r-ok", "model_version": "v1", "config": {}, "config_sha256": "x"})
    index = build_site(make_run.runs)
    site = make_run.runs / "ui"
    assert index == site / "index.html"

    runs = Elements(index.read_text())
    assert {"page-runs", "runs-table", "chart-accuracy", "compare-selected"} <= runs.ids()
    assert [a["data-run-id"] for a in runs.with_attr("data-run-id")] == ["r-old", "r-failed", "r-blocked", "r-ok"]
    assert runs.json["chart-accuracy"]["data"][0]["y"] == [0.95, 0.95]

    run = Elements((site / "run" / "r-ok.html").read_text())
    assert {"page-run", "steps-table", "gates-table", "metrics-table", "config-table", "chart-steps",
            "report-data_card", "report-evaluation", "report-drift_verdict"} <= run.ids()
    assert len(run.json["chart-steps"]["data"][1]["x"]) == 9, "one node per step"
    page = (site / "run" / "r-ok.html").read_text()
    assert "<table>" in page and "<td>1</td>" in page, "the Markdown report is rendered, its table included"
    frames = [a for tag, a in run.tags if tag == "iframe"]
    assert [f["src"] for f in frames] == ["../../r-ok/reports/evaluation.html"]
    assert frames[0]["sandbox"] == "allow-scripts allow-same-origin", "no forms, popups or top navigation"
    assert "&#34;status&#34;: &#34;ok&#34;" in page, "a JSON report is shown pretty-printed, as text"
    for run_id in ("r-blocked", "r-failed", "r-old"):  # every outcome renders
        assert "page-run" in Elements((site / "run" / f"{run_id}.html").read_text()).ids()
    assert "blocked by\nevaluation" in (site / "run" / "r-blocked.html").read_text()

    compare = Elements((site / "compare.html").read_text())
    assert {"page-compare", "compare-table", "chart-compare", "compare-data"} <= compare.ids()
    assert set(compare.json["compare-data"]["runs"]) == {"r-ok", "r-blocked", "r-failed", "r-old"}
    assert compare.json["compare-data"]["runs"]["r-ok"]["config"] == {"pretrain.epochs": 3, "finetune.epochs": 10}

    releases = Elements((site / "releases.html").read_text())
    assert {"page-releases", "releases-timeline", "chart-releases"} <= releases.ids()
    assert [a["data-record-id"] for a in releases.with_attr("data-record-id")] == ["0000000001"]

    monitoring = Elements((site / "monitoring.html").read_text())
    assert {"page-monitoring", "monitoring-table", "chart-monitoring-trend"} <= monitoring.ids()
    # r-ok's own verdict has no window or numbers: still a row, a gap in the trend
    assert monitoring.json["chart-monitoring-trend"]["data"][1]["y"] == [None, 0.75]
    assert len(monitoring.with_attr("data-window")) == 2
    assert 'href="monitor/v1/w1/drift_report.html"' in (site / "monitoring.html").read_text().replace("../", "")

    scripts = {a["src"] for tag, a in runs.tags + run.tags if tag == "script" and a.get("src")}
    assert scripts == {"assets/plotly.min.js", "assets/site.js", "../assets/plotly.min.js", "../assets/site.js"}
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    assert not list(site.rglob("*plotly*.js"))[1:], "one shared copy of plotly"
    assert "cdn" not in index.read_text().lower()


def test_user_text_is_escaped_and_markdown_cannot_inject_html(make_run):
    run_id = "r&<i onmouseover=1>"  # a directory name may hold any of these
    gates = {"evaluation": {"passed": False, "reason": EVIL}}
    make_run(run_id, "blocked", gates=gates, config={"data": {"source": EVIL}},
             reports={"privacy": (".md", f"# Privacy\n\n{EVIL}\n\n[click](javascript:alert(1))\n")})
    build_site(make_run.runs)
    site = make_run.runs / "ui"
    for page in [site / "index.html", site / "compare.html", *(site / "run").glob("*.html")]:
        text = page.read_text()
        assert EVIL not in text and "<i onmouseover" not in text, page
    page = next((site / "run").glob("*.html")).read_text()
    assert "&lt;script&gt;alert(" in page, "the reason, the config value and the report's raw HTML show as text"
    assert 'href="javascript:' not in page
    assert "\\u003cscript\\u003e" in (site / "compare.html").read_text(), "embedded JSON cannot close its element"
    assert 'data-run-id="r&amp;&lt;i onmouseover=1&gt;"' in (site / "index.html").read_text()


def test_empty_runs_directory_says_how_to_make_a_run(tmp_path):
    index = build_site(tmp_path / "runs", tmp_path / "site")
    text = index.read_text()
    assert 'id="runs-empty"' in text and "mlops run --config examples/quick.yaml" in text
    assert 'id="runs-table"' not in text
    for name in ("compare.html", "releases.html", "monitoring.html"):
        assert re.search(r'<main id="page-\w+"', (tmp_path / "site" / name).read_text())


def test_a_removed_run_loses_its_page(make_run):
    make_run("a")
    run_dir = make_run("b")
    build_site(make_run.runs)
    assert (make_run.runs / "ui" / "run" / "b.html").is_file()
    (run_dir / "summary.json").unlink()
    (run_dir / "config.json").unlink()
    build_site(make_run.runs)
    assert sorted(p.name for p in (make_run.runs / "ui" / "run").iterdir()) == ["a.html"]
