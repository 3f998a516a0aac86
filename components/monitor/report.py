"""The monitor's three files for a window: Evidently's HTML report (or a page saying why no test ran),
verdict.json and Prometheus text metrics, each written atomically and byte-for-byte reproducible."""

from __future__ import annotations

import hashlib
import html
import math
import re
from pathlib import Path
from typing import Any

from components.core.localfiles import atomic_write_json, atomic_write_text
from components.monitor.sampling import parse_utc
from components.monitor.verdict import STATUSES

REPORT_FILE = "drift_report.html"
VERDICT_FILE = "verdict.json"
METRICS_FILE = "drift.prom"  # Prometheus text format, for node-exporter's textfile collector


REPORT_MODES = ("always", "on_alert", "never")  # when the monitor builds Evidently's HTML report


def write_verdict(out_dir: str | Path, verdict: dict[str, Any]) -> dict[str, Path]:
    """Write verdict.json and drift.prom into ``out_dir`` (what alerts and retraining read); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"verdict_json": out / VERDICT_FILE, "metrics_prom": out / METRICS_FILE}
    atomic_write_json(paths["verdict_json"], verdict, default=str)
    atomic_write_text(paths["metrics_prom"], prometheus_metrics(verdict))
    return paths


def wants_report(mode: str, verdict: dict[str, Any]) -> bool:
    """Whether ``mode`` (one of REPORT_MODES) asks for Evidently's report of this verdict."""
    if mode not in REPORT_MODES:
        raise ValueError(f"unknown report mode {mode!r}; expected one of {REPORT_MODES}")
    return mode == "always" or (mode == "on_alert" and bool(verdict.get("alert")))


def write_report(out_dir: str | Path, verdict: dict[str, Any], snapshot, seed: int, note: str | None = None) -> Path:
    """Write the report page: Evidently's report under the verdict, or the verdict alone (the guards stopped
    the window, or no Evidently report was built). ``note`` is shown under the verdict (why no report, or
    where Evidently's report differs from it); ``seed`` fixes Evidently's element ids."""
    path = Path(out_dir) / REPORT_FILE
    page = report_html(snapshot, verdict, seed, note) if snapshot is not None else verdict_html(verdict, note)
    atomic_write_text(path, page)
    return path


# ---------------------------------------------------------------------------
# HTML


# a uuid4 as Evidently writes it, dashed (8-4-4-4-12) or as 32 hex digits
_RANDOM_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{8}(?:(?:-[0-9a-f]{4}){3}-|[0-9a-f]{12})[0-9a-f]{12}(?![0-9a-f])")


# Evidently's page embeds its JavaScript library (most of the page) between these: no per-report ids in it.
_STATIC_JS = ("<script>var global = globalThis</script>", "<script>")


def stable_ids(text: str, seed: int = 0) -> str:
    """Replace Evidently's random uuid4 element ids by ids derived from their order: same report, same bytes.

    Each distinct id maps to one replacement everywhere, so the page's internal references hold.
    The static library part of the page is skipped: it holds no ids and is most of the text.
    """
    mapping: dict[str, str] = {}

    def replace(match: re.Match) -> str:
        old = match.group(0)
        if old not in mapping:
            new = hashlib.sha256(f"{seed}:{len(mapping)}".encode()).hexdigest()[:32]
            mapping[old] = f"{new[:8]}-{new[8:12]}-{new[12:16]}-{new[16:20]}-{new[20:32]}" if "-" in old else new
        return mapping[old]

    start = text.find(_STATIC_JS[0])
    end = text.rfind(_STATIC_JS[1])
    if 0 <= start < end:
        return _RANDOM_ID.sub(replace, text[:start]) + text[start:end] + _RANDOM_ID.sub(replace, text[end:])
    return _RANDOM_ID.sub(replace, text)


def _summary_html(verdict: dict[str, Any]) -> str:
    """The verdict on top of Evidently's report: the decision per group, sampling and the window."""
    esc = html.escape
    rows = []
    for name, group in verdict.get("groups", {}).items():
        if name == "embedding":
            how = f"classifier AUC {group['auc']:.3f}, p = {group['p_value']:.3g} (drift if p &lt; {group['threshold']})"
        elif name == "prediction":
            how = "; ".join(f"{c}: p = {verdict['features'][c]['p_value']:.3g}" for c in group["columns"]
                            if verdict["features"][c].get("p_value") is not None) + f" (drift if p &lt; {group['threshold']})"
        else:
            how = f"{len(group['drifted_columns'])} of {len(group['columns'])} drifted (drift if &ge; {group['threshold']:.0%})"
        rows.append(f"<tr><td>{esc(name)}</td><td>{'DRIFT' if group['drifted'] else 'ok'}</td><td>{how}</td></tr>")
    sampling = verdict.get("sampling", {})
    window = verdict.get("window", {})
    model_ref = verdict.get("model_reference") or {}
    note = f"<p>{esc(model_ref['note'])}</p>" if model_ref.get("note") else ""
    return f"""<div style="font-family:sans-serif;max-width:60em;margin:1em auto;padding:0.5em 1em;border:1px solid #ccc">
<h2>Drift verdict: {esc(verdict['status'].replace('_', ' '))}</h2>
<p>{esc(verdict['message'])}</p>
<table><tr><th align="left">check</th><th align="left">decision</th><th align="left">how</th></tr>{''.join(rows)}</table>
<p>Model version {esc(str(verdict.get('model_version') or 'all'))}; window {esc(str(window.get('since')))} to
{esc(str(window.get('until')))}; {verdict['current_rows']} requests checked of {sampling.get('window_rows', verdict['current_rows'])}
({esc(str(sampling.get('bound', '')))}; epsilon {sampling.get('epsilon', 0)}, alpha {sampling.get('alpha', '')}).</p>{note}
</div>
"""


def report_html(snapshot, verdict: dict[str, Any], seed: int = 0, note: str | None = None) -> str:
    """Evidently's report with stable element ids, the verdict summary (and ``note``) on top."""
    page = stable_ids(snapshot.get_html_str(as_iframe=False), seed)
    at = page.find("<body>")
    summary = _summary_html(verdict)
    if note:
        summary += f'<p style="font-family:sans-serif;max-width:60em;margin:1em auto;color:#a00">{html.escape(note)}</p>'

    return page[:at + 6] + summary + page[at + 6:] if at >= 0 else summary + page


def verdict_html(verdict: dict[str, Any], note: str | None = None) -> str:
    """A small stand-alone page: for a window the guards stopped (no test ran), or a tested window whose
    Evidently report was not built (``note`` says why)."""
    esc = html.escape
    if verdict["status"] in ("ok", "drift"):
        return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift monitor: {esc(verdict['status'])}</title></head><body>
{_summary_html(verdict)}<p style="font-family:sans-serif;max-width:60em;margin:1em auto">{esc(note or '')}</p>
</body></html>
"""
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{s['reference']:.1%}</td><td>{s['current']:.1%}</td></tr>"
        for c, s in verdict.get("nan_share", {}).items()
    )
    problems = "".join(f"<li>{esc(p)}</li>" for p in verdict.get("schema_problems", []))
    log = verdict.get("log", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift monitor: {esc(verdict['status'])}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}td,th{{padding:2px 12px;text-align:left}}</style>
</head><body>
<h1>Drift monitor: {esc(verdict['status'].replace('_', ' '))}</h1>
<p>{esc(verdict['message'])}</p>
<p>No drift test was run for this window. Reference rows: {verdict['reference_rows']};
current rows: {verdict['current_rows']}; request log: {esc(str(log.get('dir', '')))}
(window {esc(str(log.get('since')))} to {esc(str(log.get('until')))}).</p>
{f'<h2>Problems</h2><ul>{problems}</ul>' if problems else ''}
{f'<h2>Missing values per feature</h2><table><tr><th>feature</th><th>reference</th><th>current</th></tr>{rows}</table>' if rows else ''}
</body></html>
"""


# ---------------------------------------------------------------------------
# Prometheus


def _prom_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_value(value: Any) -> str:
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(x) if not x.is_integer() or abs(x) >= 1e15 else str(int(x))


def prometheus_metrics(verdict: dict[str, Any]) -> str:
    """The verdict as Prometheus text exposition (node-exporter textfile collector): gauges labelled by model version.

    No window labels (one series per window would grow without bound): the window's ends are
    values (``..._window_start_timestamp_seconds``), so the file describes the latest check.
    """
    base = {"model_version": verdict.get("model_version") or "all"}
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[dict[str, Any], Any]]) -> None:
        samples = [(labels, value) for labels, value in samples if value is not None]
        if not samples:
            return
        full = f"kfp_mlops_drift_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_prom_label(v)}"' for k, v in {**base, **labels}.items())
            lines.append(f"{full}{{{text}}} {_prom_value(value)}")

    features = verdict.get("features", {})
    groups = verdict.get("groups", {})
    log, sampling, window = verdict.get("log", {}), verdict.get("sampling", {}), verdict.get("window", {})
    gauge("detected", "1 if the drift tests called the last checked window drifted.", [({}, verdict["drift_detected"])])
    gauge("alert", "1 if the last check needs a person: drift or schema drift.", [({}, verdict["alert"])])
    gauge("status", "Outcome of the last check, one series per possible status.",
          [({"status": s}, verdict["status"] == s) for s in STATUSES])
    gauge("image_feature_share", "Share of image features whose own test drifted.", [({}, verdict["drift_share"])])
    gauge("group_drifted", "1 if the group's test called it drifted.",
          [({"group": g}, info["drifted"]) for g, info in groups.items()])
    gauge("feature_drifted", "1 if the column's own test flagged it.",
          [({"feature": c, "method": r["method"]}, r["drifted"]) for c, r in features.items()])
    gauge("feature_p_value", "p-value of the column's test (small = drift).",
          [({"feature": c, "method": r["method"]}, r.get("p_value")) for c, r in features.items()])
    gauge("feature_score", "Distance of the column's test (large = drift).",
          [({"feature": c, "method": r["method"]}, r.get("score")) for c, r in features.items()])
    gauge("embedding_auc", "ROC AUC of the classifier telling window from reference embeddings (0.5 = alike).",
          [({}, groups.get("embedding", {}).get("auc"))])
    gauge("embedding_p_value", "p-value of the embedding classifier test.", [({}, groups.get("embedding", {}).get("p_value"))])
    gauge("window_requests", "Requests logged in the window (any version or source).", [({}, log.get("rows_in_window"))])
    gauge("selected_requests", "Requests of the model version and sources (estimated when sampled).",
          [({}, log.get("rows_selected"))])
    gauge("checked_requests", "Requests the tests used (the sample).", [({}, verdict["current_rows"])])
    gauge("reference_rows", "Rows of the image-feature reference.", [({}, verdict["reference_rows"])])
    gauge("sample_epsilon", "DKW bound on each feature's CDF error from sampling (0 = whole window).",
          [({}, sampling.get("epsilon"))])
    gauge("window_start_timestamp_seconds", "Start of the checked window (Unix time).",
          [({}, parse_utc(window["since"]).timestamp() if window.get("since") else None)])
    gauge("window_end_timestamp_seconds", "End of the checked window (Unix time).",
          [({}, parse_utc(window["until"]).timestamp() if window.get("until") else None)])
    return "\n".join(lines) + "\n"
