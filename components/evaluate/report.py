"""The evaluation report: one self-contained HTML page (its figures drawn by plotly, plotly.js embedded once, no
external assets) that the KFP UI shows as the evaluate step's HTML artifact.
"""

from __future__ import annotations

import html
import math
from typing import Any

from components.core.gates import OVERRIDDEN, OVERRIDE_NOT_NEEDED, verdict_word
from components.core.plots import FigureEmbedder, confusion_heatmap, reliability_diagram, saliency_overlay
from components.evaluate.saliency import SMOOTHGRAD_SAMPLES

REPORT_FILE = "report.html"


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def _render_verdict(gate: dict[str, Any]) -> str:
    """The verdict in the words of ``gates.verdict_banner``: loud when an override released a blocked model."""
    esc = html.escape
    reason = f'<p class="reason">{esc(gate["reason"])}</p>'
    if gate["overridden"]:
        return (f'<p class="overridden">⚠️ <b>{OVERRIDDEN}</b> because <code>override=True</code>.<br>'
                f'Reason given: <em>{esc(gate["override_reason"])}</em><br>'
                f'Blocked by: {esc(", ".join(gate["blocked_by"]))}</p>\n{reason}')
    return reason + (f"\n<p>({OVERRIDE_NOT_NEEDED})</p>" if gate["override"] else "")


def _render_gate(gate: dict[str, Any]) -> str:
    esc = html.escape
    check = gate["champion"]
    verdict = verdict_word(gate) if gate["overridden"] else ("PASSED" if gate["passed_checks"] else "BLOCKED")
    rows = [f"<tr><th>minimum test accuracy</th><td>{gate['min_test_accuracy']:.4f}</td>"
            f"<td>{'passed' if gate['accuracy_passed'] else 'FAILED'}</td></tr>",
            f"<tr><th>champion check (max regression {check['max_regression']:.4f})</th>"
            f"<td>{esc(str(check['status']))}</td><td>{'passed' if check['passed'] else 'FAILED'}</td></tr>"]
    details = f'<p>Champion check: {esc(check["reason"])}</p>' if check["reason"] not in gate["reason"] else ""
    out = [f'<h2>Release gate: <span class="{"passed" if gate["passed_checks"] else "blocked"}">{verdict}</span></h2>',
           _render_verdict(gate),
           "<table><caption>Conditions</caption><tr><th>condition</th><th>value</th><th>result</th></tr>",
           *rows, "</table>", details]
    if check["status"] == "compared":
        def row(name: str, champ: Any, chall: Any, fmt: str, higher_is_better: bool = True) -> str:
            if not all(isinstance(v, (int, float)) for v in (champ, chall)):
                return f"<tr><th>{name}</th><td>{_number(champ, fmt)}</td><td>{_number(chall, fmt)}</td><td>–</td></tr>"
            delta = chall - champ
            good = delta >= 0 if higher_is_better else delta <= 0
            return (f"<tr><th>{name}</th><td>{_number(champ, fmt)}</td><td>{_number(chall, fmt)}</td>"
                    f'<td class="{"better" if good else "worse"}">{delta:+.4f}</td></tr>')
        out += [
            "<table><caption>Champion (in production) vs challenger (this run), same test split</caption>",
            "<tr><th></th><th>champion</th><th>challenger</th><th>challenger - champion</th></tr>",
            f"<tr><th>model version</th><td><code>{esc(str(check['champion_model_version']))}</code></td>"
            f"<td><code>{esc(str(check['challenger_model_version']))}</code></td><td></td></tr>",
            row("test accuracy", check["champion_accuracy"], check["challenger_accuracy"], ".4f"),
            row("macro F1", check["champion_macro_f1"], check["challenger_macro_f1"], ".4f"),
            row("ECE (lower is better)", check["champion_ece"], check["challenger_ece"], ".4f",
                higher_is_better=False),
            "</table>",
        ]
    if check.get("source"):
        out.append(f'<p class="note">Champion looked up at <code>{esc(str(check["source"]))}</code>.</p>')
    return "\n".join(out)


def _render_saliency(examples: list[dict[str, Any]], embedder: FigureEmbedder) -> str:
    if not examples:
        return ""
    esc = html.escape
    titles = [f"<span style='color:{'#1a7f37' if e['correct'] else '#cf222e'}'>{'✓' if e['correct'] else '✗'} "
              f"#{e['index']}</span>: true {esc(str(e['true']))}<br>predicted {esc(str(e['predicted']))} "
              f"({e['confidence']:.0%})" for e in examples]
    figure = saliency_overlay([e["image"] for e in examples], [e["saliency"] for e in examples], titles,
                              title="SmoothGrad saliency over the test image")
    return ("<h2>Saliency</h2>\n<p>SmoothGrad: how strongly each pixel moves the predicted class's logit "
            f"(mean |gradient| over {SMOOTHGRAD_SAMPLES} noisy copies), drawn over the image in grey: the darker the "
            "red, the more influential the pixel. ✗ marks a mistake, ✓ a correct prediction; the most confident "
            "mistakes come first.</p>\n" + embedder.embed(figure, "saliency"))


def render_report_html(result: dict[str, Any]) -> str:
    """A self-contained HTML page (no external assets) showing an ``evaluate`` / ``evaluate_and_gate`` result."""
    esc = html.escape
    names = [str(n) for n in result["class_names"]]
    calib = result.get("calibration")
    embedder = FigureEmbedder()

    class_rows = "\n".join(
        f"<tr><th>{esc(str(c['class']))}</th><td>{c['precision']:.3f}</td><td>{c['recall']:.3f}</td>"
        f"<td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for c in result["per_class"]
    )
    confusion_html = ("<h2>Confusion matrix</h2>\n<p>Rows: true class, columns: predicted; colour: share of the true "
                      "class, green where right, red where wrong.</p>\n"
                      + embedder.embed(confusion_heatmap(result["confusion_matrix"], names), "confusion-matrix"))
    gate_html = _render_gate(result["gate"]) if result.get("gate") else ""
    ece_box = f'<div>ECE ({calib["n_bins"]} bins)<b>{calib["ece"]:.4f}</b></div>' if calib else ""
    calibration_html = ""
    if calib and calib.get("confidences"):
        figure = reliability_diagram(calib["confidences"], calib["correct"])
        bins = figure.layout.meta["bins"]
        calibration_html = (
            "<h2>Calibration</h2>\n"
            f"<p>Expected calibration error {calib['ece']:.4f} over {calib['n_bins']} equal-width confidence bins "
            f"(mean confidence {calib['mean_confidence']:.3f}, accuracy {result['test_accuracy']:.3f}). "
            f"The diagram bins the predictions by rank into {len(bins)} bins of about {bins[0]['count']} each, so "
            "every point rests on the same evidence. Points below the dashed diagonal: over-confident; above: "
            "under-confident.</p>\n" + embedder.embed(figure, "reliability-diagram"))
    saliency_html = _render_saliency(result.get("saliency") or [], embedder)

    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
.headline {{ display: flex; gap: 2rem; margin-bottom: 1.5rem; flex-wrap: wrap; }}
.headline div {{ border: 1px solid #d0d7de; border-radius: 6px; padding: 0.8rem 1.2rem; }}
.headline b {{ display: block; font-size: 1.8rem; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
th, td {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: right; }}
th {{ background: #f6f8fa; }}
caption {{ text-align: left; font-weight: bold; padding-bottom: 0.4rem; }}
.passed, .better {{ color: #1a7f37; }}
.blocked, .worse {{ color: #cf222e; }}
.reason {{ font-family: ui-monospace, monospace; background: #f6f8fa; padding: 0.5rem; }}
.overridden {{ background: #fff8c5; border: 1px solid #d4a72c; padding: 0.5rem; }}
</style>
</head>
<body>
<h1>Evaluation report</h1>
<p>Model version <code>{esc(str(result.get("model_version", "unknown")))}</code>, scored on the held-out test split.</p>
<div class="headline">
<div>Test accuracy<b>{result["test_accuracy"]:.2%}</b></div>
<div>Macro F1<b>{result["macro_f1"]:.3f}</b></div>
{ece_box}
<div>Test images<b>{result["n_test"]}</b></div>
</div>
{gate_html}
<h2>Per class</h2>
<table>
<caption>Precision, recall and F1 per class</caption>
<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{class_rows}
</table>
{confusion_html}
{calibration_html}
{saliency_html}
</body>
</html>
"""
