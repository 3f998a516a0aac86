"""The run browser's pages: the catalog's dicts (pipelines/browser/catalog.py) rendered with jinja2 (autoescape
on) and plotly figures (drawn by the page's script from JSON embedded in it).

Markdown reports are rendered with markdown-it-py with raw HTML off (a report cannot inject markup or script);
HTML reports are embedded in sandboxed iframes (``allow-scripts allow-same-origin``: no forms, popups, top
navigation or plugins; same-origin because Evidently's report reads localStorage and draws nothing without it, so
a report is trusted as the pipeline's own output, not as foreign content);
JSON reports are shown pretty-printed. Element ids: see pipelines/browser/templates.py.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from pipelines.browser.catalog import GATE_NAMES, flatten
from pipelines.browser.templates import TEMPLATES

MAX_INLINE_REPORT_BYTES = 2_000_000  # a Markdown or JSON report larger than this is linked, not inlined
STATUS_COLORS = {"succeeded": "#11753a", "blocked": "#b3261e", "failed": "#b3261e", "skipped": "#9aa1ad",
                 "unfinished": "#9aa1ad", "unreadable": "#b3261e"}
EVENT_ORDER = ("trained", "gated", "released", "promoted", "rolled_back", "drift", "retrain_started")


@functools.lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = when
    return env


def when(value: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS`` (UTC), for tables; anything else as it is."""
    text = str(value or "")
    if len(text) >= 19 and text[10] == "T":
        return text[:10] + " " + text[11:19]
    return text or "-"


@functools.lru_cache(maxsize=1)
def _markdown():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def render_markdown(text: str):
    """Markdown to HTML with raw HTML disabled (shown as text), as markup the templates insert as it is."""
    from markupsafe import Markup

    return Markup(_markdown().render(text))


def script_json(value: Any):
    """JSON to put inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` escaped, so no text in it
    can close the element."""
    from markupsafe import Markup

    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))


def href(target: str | Path, page_dir: Path) -> str:
    """A link from a page in ``page_dir`` to a file: relative, so it works from disk and from ``mlops ui``."""
    relative = os.path.relpath(Path(target).resolve(), page_dir.resolve())
    return urllib.parse.quote(Path(relative).as_posix())


def _figure_json(figure) -> Any:
    import plotly.io

    figure.update_layout(template="plotly_white")
    return script_json(plotly.io.to_json(figure, validate=False))


# -- figures


def accuracy_figure(runs: list[dict[str, Any]]):
    import plotly.graph_objects as go

    shown = sorted((r for r in runs if r["test_accuracy"] is not None), key=lambda r: r["started_at"] or "")
    figure = go.Figure(go.Scatter(
        x=[r["started_at"] for r in shown], y=[r["test_accuracy"] for r in shown], mode="lines+markers",
        text=[r["run_id"] for r in shown], marker={"color": [STATUS_COLORS.get(r["status"], "#1a56b0") for r in shown],
                                                   "size": 10},
        hovertemplate="%{text}<br>test accuracy %{y:.4f}<extra></extra>"))
    figure.update_layout(title="Test accuracy per run", yaxis_title="test accuracy", margin={"t": 40})
    return _figure_json(figure)


def _layers(steps: list[dict[str, Any]]) -> dict[str, int]:
    """Each step's column in the graph: the length of the longest chain of steps before it."""
    parents = {s["name"]: [p for p in s["parents"]] for s in steps}
    depth: dict[str, int] = {}

    def of(name: str, seen: tuple[str, ...] = ()) -> int:
        if name not in depth:
            known = [p for p in parents.get(name, []) if p in parents and p not in seen]
            depth[name] = 1 + max((of(p, seen + (name,)) for p in known), default=-1)
        return depth[name]

    for name in parents:
        of(name)
    return depth


def steps_figure(steps: list[dict[str, Any]]):
    """The step graph: one node per step (colour: status; hover: time, CPU, why skipped), arrows to its parents."""
    import plotly.graph_objects as go

    layers = _layers(steps)
    columns: dict[int, list[str]] = {}
    for step in steps:
        columns.setdefault(layers[step["name"]], []).append(step["name"])
    where = {name: (layer, (len(names) - 1) / 2 - i) for layer, names in columns.items()
             for i, name in enumerate(names)}
    edge_x: list[Any] = []
    edge_y: list[Any] = []
    for step in steps:
        for parent in step["parents"]:
            if parent in where:
                edge_x += [where[parent][0], where[step["name"]][0], None]
                edge_y += [where[parent][1], where[step["name"]][1], None]

    def hover(step: dict[str, Any]) -> str:
        parts = [f"{step['name']}: {step['status']}"]
        if step["seconds"] is not None:
            parts.append(f"{step['seconds']:.2f} s")
        if step["cost"].get("cpu_seconds") is not None:
            parts.append(f"{step['cost']['cpu_seconds']:.1f} s CPU")
        if step["reason"]:
            parts.append(str(step["reason"]))
        return "<br>".join(parts)

    figure = go.Figure([
        go.Scatter(x=edge_x, y=edge_y, mode="lines", line={"color": "#c3c8d2"}, hoverinfo="skip", showlegend=False),
        go.Scatter(x=[where[s["name"]][0] for s in steps], y=[where[s["name"]][1] for s in steps],
                   mode="markers+text", text=[s["name"] for s in steps], textposition="top center",
                   hovertext=[hover(s) for s in steps], hoverinfo="text", showlegend=False,
                   marker={"size": 22, "color": [STATUS_COLORS.get(s["status"], "#1a56b0") for s in steps]}),
    ])
    figure.update_layout(title="Step graph (green: succeeded, red: failed, grey: skipped)", margin={"t": 40},
                         xaxis={"visible": False}, yaxis={"visible": False}, height=320)
    return _figure_json(figure)


def releases_figure(events: list[dict[str, Any]]):
    import plotly.graph_objects as go

    figure = go.Figure()
    for kind in EVENT_ORDER:
        shown = [e for e in events if e["type"] == kind]
        if shown:
            figure.add_trace(go.Scatter(
                x=[e["at"] for e in shown], y=[kind] * len(shown), mode="markers", name=kind,
                text=[f"{e['id']} v{(e['model_version'] or '-')[:12]} run {e['run_id'] or '-'}<br>{e['summary']}"
                      for e in shown], hovertemplate="%{x}<br>%{text}<extra></extra>", marker={"size": 11}))
    figure.update_layout(title="Release ledger over time", margin={"t": 40},
                         yaxis={"categoryorder": "array", "categoryarray": list(EVENT_ORDER)})
    return _figure_json(figure)


def trend_figure(windows: list[dict[str, Any]]):
    """Drift share (line) and number of drifted features (dotted, right axis) per window, by the window's end."""
    import plotly.graph_objects as go

    x = [w["until"] or w["since"] for w in windows]
    text = [f"v{(w['model_version'] or 'all')[:12]} {w['status']}" for w in windows]
    figure = go.Figure([
        go.Scatter(x=x, y=[w["n_drifted"] for w in windows], name="drifted features", yaxis="y2",
                   mode="lines+markers", line={"dash": "dot", "color": "#7c8594"}, marker={"symbol": "square"},
                   text=text, hovertemplate="%{x}<br>%{text}<br>%{y} drifted<extra></extra>"),
        go.Scatter(x=x, y=[w["drift_share"] for w in windows], name="drift share", mode="lines+markers", text=text,
                   hovertemplate="%{x}<br>%{text}<br>drift share %{y:.3f}<extra></extra>",
                   marker={"color": ["#b3261e" if w["drift_detected"] else "#11753a" for w in windows], "size": 9}),
    ])
    thresholds = {w["drift_share_threshold"] for w in windows if w["drift_share_threshold"] is not None}
    if len(thresholds) == 1:
        figure.add_hline(y=thresholds.pop(), line_dash="dot", annotation_text="drift threshold")
    figure.update_layout(title="Drift per monitoring window", margin={"t": 40},
                         yaxis={"title": "drift share", "rangemode": "tozero"},
                         yaxis2={"title": "drifted features", "overlaying": "y", "side": "right",
                                 "rangemode": "tozero"}, legend={"orientation": "h"})
    return _figure_json(figure)


# -- pages


def _context(cat: dict[str, Any], root: str, charts: bool, built_at: str) -> dict[str, Any]:
    return {"root": root, "charts": charts, "built_at": built_at, "runs_dir": cat["runs_dir"],
            "problems": cat["problems"], "production": cat["production"], "gate_names": GATE_NAMES,
            "known_runs": set(cat["details"])}


def runs_page(cat: dict[str, Any], built_at: str) -> str:
    runs = cat["runs"]
    charts = any(r["test_accuracy"] is not None for r in runs)
    return environment().get_template("runs").render(
        **_context(cat, "", charts, built_at), runs=runs, accuracy_figure=accuracy_figure(runs) if charts else None)


def _report_view(report: dict[str, Any], page_dir: Path) -> dict[str, Any]:
    view = {**report, "href": href(report["path"], page_dir) if report["exists"] else None, "body": None}
    if not report["exists"] or report["kind"] not in ("markdown", "json"):
        return view
    path = Path(report["path"])
    if path.stat().st_size > MAX_INLINE_REPORT_BYTES:
        view["kind"] = "other"  # linked only
        return view
    text = path.read_text(errors="replace")
    if report["kind"] == "markdown":
        view["body"] = render_markdown(text)
    else:
        try:
            view["body"] = json.dumps(json.loads(text), indent=2, sort_keys=True, default=str)
        except ValueError:
            view["body"] = text
    return view


def run_page(cat: dict[str, Any], run_id: str, page_dir: Path, built_at: str) -> str:
    run = cat["details"][run_id]
    reports = [_report_view(r, page_dir) for r in run["reports"]]
    return environment().get_template("run").render(
        **_context(cat, "../", bool(run["steps"]), built_at), run=run, reports=reports,
        steps_figure=steps_figure(run["steps"]) if run["steps"] else None,
        config={k: json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(run["config"]).items()})


def compare_page(cat: dict[str, Any], built_at: str) -> str:
    from pipelines.browser.catalog import compare_values

    data = {"sections": ["run", "metrics", "gates", "config"],
            "runs": {run_id: compare_values(detail) for run_id, detail in cat["details"].items()}}
    return environment().get_template("compare").render(**_context(cat, "", True, built_at),
                                                         compare_data=script_json(data))


def releases_page(cat: dict[str, Any], page_dir: Path, built_at: str) -> str:
    events = [{**e, "href": href(e["report"], page_dir) if e["report"] else None} for e in cat["releases"]]
    return environment().get_template("releases").render(
        **_context(cat, "", bool(events), built_at), events=events, ledger=cat["ledger"],
        releases_figure=releases_figure(events) if events else None)


def monitoring_page(cat: dict[str, Any], page_dir: Path, built_at: str) -> str:
    windows = cat["windows"]
    rows = [{**w, "href": href(w["report"], page_dir) if w["report"] else None} for w in reversed(windows)]
    return environment().get_template("monitoring").render(
        **_context(cat, "", bool(windows), built_at), windows=rows,
        trend_figure=trend_figure(windows) if windows else None)
