"""The static run browser: ``build_site(runs_dir)`` writes ``<runs>/ui/`` (entry ``index.html``), which opens from
disk or through ``mlops ui``.

Layout: ``index.html`` (runs), ``run/<run-id>.html``, ``compare.html`` (``?runs=a,b,c``, compared in the page
from the data embedded in it), ``releases.html``, ``monitoring.html``, ``assets/`` (``site.css``, ``site.js`` and
one shared ``plotly.min.js`` from the installed plotly package: no CDN). Reports are linked where they are (a
relative link from the page), never copied: an Evidently report is megabytes.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from components.core.localfiles import atomic_write_text
from pipelines.browser import pages
from pipelines.browser.assets import CSS, JS
from pipelines.browser.catalog import CONFIG_FILE, MONITOR_DIR, VERDICT_FILE, catalog, run_dirs
from pipelines.local import SUMMARY_FILE

SITE_DIR = "ui"  # under the runs directory
ASSETS = "assets"
PLOTLY_JS = "plotly.min.js"


def default_serving_home(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / "serving"


def default_ledger(serving_home: str | Path) -> str:
    from components.core.ledger import location

    class _Serving:  # location() reads these two attributes of cfg.serving
        ledger_uri, deploy_target = "", "local"
        home = str(serving_home)

    return location(_Serving())


def _write_if_changed(path: Path, text: str) -> None:
    if not (path.is_file() and path.read_text(errors="replace") == text):
        atomic_write_text(path, text)


def _write_plotly(assets: Path) -> None:
    import plotly.offline

    script = plotly.offline.get_plotlyjs()
    target = assets / PLOTLY_JS
    if not (target.is_file() and target.stat().st_size == len(script.encode())):
        atomic_write_text(target, script)


def build(runs_dir: str | Path = "runs", out_dir: str | Path | None = None, *, serving_home: str | Path | None = None,
          ledger_uri: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the site; return (its index.html, the catalog it shows)."""
    runs_dir = Path(runs_dir)
    out = Path(out_dir) if out_dir is not None else runs_dir / SITE_DIR
    serving_home = Path(serving_home) if serving_home is not None else default_serving_home(runs_dir)
    ledger_uri = ledger_uri if ledger_uri is not None else default_ledger(serving_home)
    cat = catalog(runs_dir, serving_home, ledger_uri)
    built_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    (out / "run").mkdir(parents=True, exist_ok=True)
    (out / ASSETS).mkdir(exist_ok=True)
    _write_if_changed(out / ASSETS / "site.css", CSS)
    _write_if_changed(out / ASSETS / "site.js", JS)
    _write_plotly(out / ASSETS)
    atomic_write_text(out / "index.html", pages.runs_page(cat, built_at))
    atomic_write_text(out / "compare.html", pages.compare_page(cat, built_at))
    atomic_write_text(out / "releases.html", pages.releases_page(cat, out, built_at))
    atomic_write_text(out / "monitoring.html", pages.monitoring_page(cat, out, built_at))
    written = set()
    for run_id in cat["details"]:
        page = out / "run" / f"{run_id}.html"
        atomic_write_text(page, pages.run_page(cat, run_id, page.parent, built_at))
        written.add(page.name)
    for page in (out / "run").glob("*.html"):  # a run directory removed since the last build
        if page.name not in written:
            page.unlink()
    return out / "index.html", cat


def build_site(runs_dir: str | Path = "runs", out_dir: str | Path | None = None, *,
               serving_home: str | Path | None = None, ledger_uri: str | None = None) -> Path:
    """Write the static site for ``runs_dir`` (default ``<runs_dir>/ui``) and return its ``index.html``.

    ``serving_home`` (default ``<runs_dir>/serving``) says which model serves; ``ledger_uri`` (default: that
    home's ledger, as components.core.ledger.location finds it) is the release ledger."""
    return build(runs_dir, out_dir, serving_home=serving_home, ledger_uri=ledger_uri)[0]


def report_files(cat: dict[str, Any]) -> set[Path]:
    """Every report file the site links to (what ``mlops ui`` may serve besides the site itself)."""
    paths = [r["path"] for d in cat["details"].values() for r in d["reports"] if r["exists"]]
    paths += [w["report"] for w in cat["windows"] if w["report"]]
    paths += [e["report"] for e in cat["releases"] if e["report"]]
    return {Path(p).resolve() for p in paths}


def inputs_fingerprint(runs_dir: str | Path, serving_home: str | Path | None = None,
                       ledger_uri: str | None = None) -> tuple:
    """What the site is built from, cheaply: names, sizes and times of the summaries, configs, verdicts, serving
    state and ledger records. A change means the site is stale."""
    runs_dir = Path(runs_dir)
    serving_home = Path(serving_home) if serving_home is not None else default_serving_home(runs_dir)
    files = [d / name for d in run_dirs(runs_dir) for name in (SUMMARY_FILE, CONFIG_FILE)]
    monitor = runs_dir / MONITOR_DIR
    files += sorted(monitor.glob(f"*/*/{VERDICT_FILE}")) if monitor.is_dir() else []
    files.append(serving_home / "state.json")
    ledger_uri = ledger_uri if ledger_uri is not None else default_ledger(serving_home)
    records = Path(ledger_uri) / "records" if ledger_uri and "://" not in ledger_uri else None
    if records is not None and records.is_dir():
        files.append(records)  # appending a record changes the directory's time
    out = []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:
            continue
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)
