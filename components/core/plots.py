"""The figures of the reports, drawn with plotly, and the self-contained HTML page that holds them.

Every builder returns a ``plotly.graph_objects.Figure`` whose traces hold the numbers it was given, so a test (or a
notebook) can read them back. :func:`report_page` turns Markdown text and figures into one HTML page that needs no
network and no file next to it: the KFP UI shows an HTML artifact on its own, and runs/<id>/reports/*.html are
opened from disk. plotly.js is therefore embedded, once per page (:class:`FigureEmbedder`).
"""

from __future__ import annotations

import html
import math
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TEMPLATE = "plotly_white"
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
MIN_BIN_COUNT = 20  # predictions per reliability bin: below that, a bin's accuracy is mostly noise
RELIABILITY_BINS = 10
LOW_FPR = 0.01  # the membership-inference operating point: TPR at 1 % FPR
# Transparent where the model does not look, then yellow to dark red: the digit stays visible under the heat.
SALIENCY_SCALE = [[0.0, "rgba(255, 237, 160, 0)"], [0.3, "rgba(254, 178, 76, 0.35)"],
                  [0.65, "rgba(240, 59, 32, 0.65)"], [1.0, "rgba(165, 0, 38, 0.85)"]]
INK_MAX = 1.6  # grey scale top: full ink shows as mid grey, so the heat on top of it stays visible
PALETTE = ("#0969da", "#bc4c00", "#1a7f37", "#8250df", "#bf3989", "#57606a")
STATUS_COLOURS = {"ok": "#1a7f37", "drift": "#cf222e", "schema_drift": "#8250df", "insufficient_data": "#9a6700"}


def _vector(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def equal_mass_bins(confidences: Any, correct: Any, n_bins: int = RELIABILITY_BINS,
                    min_count: int = MIN_BIN_COUNT) -> list[dict[str, float]]:
    """Reliability bins of (nearly) equal size, each holding at least ``min_count`` predictions.

    Equal-mass rather than equal-width: a good classifier puts most of its confidences above 0.9, so equal-width
    bins leave a few crowded bins near 1 and many holding two or three predictions, whose accuracy is noise
    (Nixon et al. 2019, "Measuring Calibration in Deep Learning"). Sorting by confidence and cutting into
    ``min(n_bins, n // min_count)`` consecutive groups gives every bin the same weight of evidence. Ties at a cut may
    fall on both sides of it. With fewer than ``min_count`` predictions there is one bin holding them all.
    Each bin: ``lower`` / ``upper`` (its smallest and largest confidence), ``count``, mean ``confidence``, ``accuracy``.
    """
    conf, hit = _vector("confidences", confidences), _vector("correct", correct)
    if conf.shape != hit.shape:
        raise ValueError(f"confidences ({len(conf)}) and correct ({len(hit)}) differ in length")
    if len(conf) == 0:
        raise ValueError("a reliability diagram needs at least one prediction")
    if conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidences must lie in [0, 1] (they are probabilities)")
    if n_bins < 1 or min_count < 1:
        raise ValueError(f"n_bins and min_count must be at least 1, got {n_bins} and {min_count}")
    order = np.argsort(conf, kind="stable")
    groups = np.array_split(order, max(1, min(n_bins, len(conf) // min_count)))
    return [{"lower": float(conf[g].min()), "upper": float(conf[g].max()), "count": int(len(g)),
             "confidence": float(conf[g].mean()), "accuracy": float(hit[g].mean())} for g in groups]


def reliability_diagram(confidences: Any, correct: Any, n_bins: int = RELIABILITY_BINS,
                        min_count: int = MIN_BIN_COUNT, title: str = "Reliability diagram") -> go.Figure:
    """Accuracy against confidence per equal-mass bin (see :func:`equal_mass_bins`), the diagonal of perfect
    calibration, and the predictions per bin as bars on a second axis. Points below the diagonal: over-confident."""
    bins = equal_mass_bins(confidences, correct, n_bins, min_count)
    x = [b["confidence"] for b in bins]
    detail = [[b["count"], b["lower"], b["upper"]] for b in bins]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=x, y=[b["count"] for b in bins], name="predictions per bin", opacity=0.2,
                         marker={"color": "#57606a", "line": {"color": "white", "width": 1}}, width=[max(b["upper"] - b["lower"], 0.012) for b in bins],
                         hovertemplate="%{y} predictions<extra></extra>"), secondary_y=True)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="perfect calibration", mode="lines",
                             line={"dash": "dash", "color": "#8c959f"}, hoverinfo="skip"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=[b["accuracy"] for b in bins], name="accuracy per bin", mode="lines+markers",
                             marker={"size": 9, "color": "#0969da"}, customdata=detail,
                             hovertemplate="mean confidence %{x:.3f}<br>accuracy %{y:.3f}<br>%{customdata[0]} "
                                           "predictions, confidence %{customdata[1]:.3f}-%{customdata[2]:.3f}"
                                           "<extra></extra>"), secondary_y=False)
    # Both axes from the same floor, so the diagonal stays the diagonal: a confident model's points are not squeezed
    # into the right edge.
    low = max(0.0, math.floor(10 * min(min(b["lower"] for b in bins), min(b["accuracy"] for b in bins))) / 10)
    fig.update_xaxes(title_text="confidence (max softmax probability)", range=[low, 1.01])
    fig.update_yaxes(title_text="accuracy", range=[low, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="predictions per bin", rangemode="tozero", showgrid=False, secondary_y=True)
    fig.update_layout(template=TEMPLATE, title=title, height=420, legend={"orientation": "h", "y": -0.2},
                      meta={"bins": bins, "min_count": min_count})
    return fig


def confusion_heatmap(matrix: Any, class_names: Sequence[str], title: str = "Confusion matrix") -> go.Figure:
    """Counts per (true, predicted) class; colour is the share of the true class, green on the diagonal (correct)
    and red off it (mistakes), so a strong red cell names a confusion; an empty cell is a zero. Class names are shown
    literally."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"a confusion matrix for {k} classes must be {k}x{k}, got shape {counts.shape}")
    names = [html.escape(str(n)) for n in class_names]  # plotly reads tags in text; escaped, a name stays a name
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    diagonal = np.eye(k, dtype=bool)
    fig = go.Figure()
    for name, mask, scale in (("correct", diagonal, "Greens"), ("mistakes", ~diagonal & (counts > 0), "Reds")):
        fig.add_trace(go.Heatmap(z=np.where(mask, share, np.nan), x=names, y=names, colorscale=scale, zmin=0, zmax=1,
                                 showscale=False, name=name, customdata=counts, text=np.where(mask, counts, ""),
                                 texttemplate="%{text}", xgap=1, ygap=1,
                                 hovertemplate="true %{y}, predicted %{x}<br>%{customdata} images, "
                                               "%{z:.1%} of the true class<extra></extra>"))
    fig.update_xaxes(title_text="predicted class", type="category", side="top")
    fig.update_yaxes(title_text="true class", type="category", autorange="reversed")
    fig.update_layout(template=TEMPLATE, title=title, height=max(340, 110 + 42 * k), width=max(400, 160 + 42 * k),
                      plot_bgcolor="white")
    return fig


def _stack(name: str, values: Any) -> np.ndarray:
    """Images as [N, H, W]: one [H, W] image, [N, H, W], or [N, C, H, W] averaged over channels (grey)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 4:
        array = array.mean(axis=1)
    if array.ndim != 3 or array.shape[0] == 0:
        raise ValueError(f"{name} must be an image [H, W] or images [N, H, W] / [N, C, H, W], got shape "
                         f"{np.asarray(values).shape}")
    return array


def saliency_overlay(images: Any, saliencies: Any, titles: Sequence[str] | None = None, columns: int = 4,
                     title: str = "Saliency") -> go.Figure:
    """Each image in grey with its saliency as a heat map on top, in a grid of ``columns``, one shared colour bar.

    Each map is divided by its own maximum, so the colour bar reads "share of the most influential pixel of this
    image": gradient magnitudes differ between images, and the question asked is where, not how much.
    """
    pixels, heat = _stack("images", images), _stack("saliencies", saliencies)
    if pixels.shape != heat.shape:
        raise ValueError(f"images {pixels.shape} and saliencies {heat.shape} differ in shape")
    if titles is not None and len(titles) != len(pixels):
        raise ValueError(f"{len(titles)} titles for {len(pixels)} images")
    top = heat.max(axis=(1, 2), keepdims=True)
    heat = np.divide(heat, top, out=np.zeros_like(heat), where=top > 0)
    columns = max(1, min(columns, len(pixels)))
    rows = math.ceil(len(pixels) / columns)
    height = 70 + 260 * rows
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=list(titles) if titles else None,
                        horizontal_spacing=0.04, vertical_spacing=min(0.3, 60 / height))
    for k, (image, saliency) in enumerate(zip(pixels, heat)):
        row, col = k // columns + 1, k % columns + 1
        fig.add_trace(go.Heatmap(z=image, coloraxis="coloraxis2", hoverinfo="skip", name=f"image {k}"),
                      row=row, col=col)
        fig.add_trace(go.Heatmap(z=saliency, coloraxis="coloraxis", name=f"saliency {k}",
                                 hovertemplate="row %{y}, column %{x}<br>saliency %{z:.2f}<extra></extra>"),
                      row=row, col=col)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", scaleratio=1)
    for k in range(len(pixels)):  # square pixels: each y axis follows its own x axis
        fig.layout[f"yaxis{'' if k == 0 else k + 1}"].scaleanchor = f"x{'' if k == 0 else k + 1}"
    fig.update_layout(template=TEMPLATE, title=title, height=height,
                      coloraxis={"colorscale": SALIENCY_SCALE, "cmin": 0, "cmax": 1,
                                 "colorbar": {"title": {"text": "saliency<br>(share of<br>the image's<br>max)"}}},
                      coloraxis2={"colorscale": "Greys", "cmin": 0, "cmax": INK_MAX, "showscale": False})
    return fig


def _lines(fig: go.Figure, groups: dict[str, list[tuple[float, float]]], col: int, start: tuple[float, float] | None,
           hover: str) -> None:
    for name, points in groups.items():
        points = sorted(points)
        if start is not None and points[0][0] > start[0]:
            points = [start, *points]
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], name=name, mode="lines+markers",
                                 legendgroup=f"panel{col}", hovertemplate=f"{name}<br>{hover}<extra></extra>"),
                      row=1, col=col)


def robustness_curves(corruptions: Iterable[Mapping[str, Any]], attacks: Iterable[Mapping[str, Any]] = (),
                      clean_accuracy: float | None = None, title: str = "Accuracy under corruptions and attacks"
                      ) -> go.Figure:
    """Accuracy against corruption severity (one line per corruption) and against attack strength ε (one line per
    attack), side by side. ``corruptions``: rows with ``corruption``, ``severity``, ``accuracy``; ``attacks``: rows
    with ``attack``, ``epsilon``, ``accuracy``. ``clean_accuracy`` starts every line at severity 0 / ε 0."""
    by_corruption: dict[str, list[tuple[float, float]]] = {}
    for row in corruptions:
        by_corruption.setdefault(str(row["corruption"]), []).append((float(row["severity"]), float(row["accuracy"])))
    by_attack: dict[str, list[tuple[float, float]]] = {}
    for row in attacks:
        by_attack.setdefault(str(row["attack"]), []).append((float(row["epsilon"]), float(row["accuracy"])))
    if not by_corruption and not by_attack:
        raise ValueError("robustness_curves needs corruption or attack rows")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("Common corruptions", "Adversarial attacks (L∞)"))
    start = None if clean_accuracy is None else float(clean_accuracy)
    _lines(fig, by_corruption, 1, None if start is None else (0.0, start), "severity %{x:g}: accuracy %{y:.3f}")
    _lines(fig, by_attack, 2, None if start is None else (0.0, start), "ε %{x:g}: accuracy %{y:.3f}")
    fig.update_xaxes(title_text="severity (0 = clean)", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="attack strength ε (pixels in [0, 1])", row=1, col=2)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02])
    fig.update_layout(template=TEMPLATE, title=title, height=430, legend={"orientation": "h", "y": -0.25})
    return fig


def tpr_at_fpr(fpr: Any, tpr: Any, max_fpr: float = LOW_FPR) -> float:
    """The largest true-positive rate of a ROC curve at a false-positive rate of at most ``max_fpr``."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    within = tpr[fpr <= max_fpr]
    return float(within.max()) if len(within) else 0.0


def roc_curve(curves: Iterable[Mapping[str, Any]], low_fpr: float = LOW_FPR,
              title: str = "Membership inference: ROC") -> go.Figure:
    """ROC curves (``name``, ``fpr``, ``tpr``, ``auc`` each), the chance diagonal, and each curve's TPR at ``low_fpr``.

    A button switches to log-log axes, where the low-FPR region that matters for privacy (Carlini et al. 2022) is
    visible."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="chance (AUC 0.5)", mode="lines",
                             line={"dash": "dash", "color": "#8c959f"}, hoverinfo="skip"))
    count = 0
    for curve in curves:
        fpr, tpr = _vector("fpr", curve["fpr"]), _vector("tpr", curve["tpr"])
        if fpr.shape != tpr.shape or len(fpr) < 2:
            raise ValueError(f"ROC curve {curve['name']!r}: fpr and tpr must be the same length, at least 2 points")
        name, colour = f"{curve['name']} (AUC {float(curve['auc']):.3f})", PALETTE[count % len(PALETTE)]
        fig.add_trace(go.Scatter(x=fpr, y=tpr, name=name, mode="lines", legendgroup=str(curve["name"]),
                                 line={"color": colour},
                                 hovertemplate="FPR %{x:.4f}<br>TPR %{y:.4f}<extra></extra>"))
        point = tpr_at_fpr(fpr, tpr, low_fpr)
        fig.add_trace(go.Scatter(x=[low_fpr], y=[point], name=f"{curve['name']}: TPR {point:.3f} at {low_fpr:.0%} FPR",
                                 mode="markers", legendgroup=str(curve["name"]), showlegend=True,
                                 marker={"symbol": "diamond", "size": 10, "color": colour},
                                 hovertemplate=f"TPR %{{y:.4f}} at FPR {low_fpr:g}<extra></extra>"))
        count += 1
    if not count:
        raise ValueError("roc_curve needs at least one curve")
    floor = 1e-4
    fig.update_layout(
        template=TEMPLATE, title=title, height=460, legend={"orientation": "h", "y": -0.2},
        xaxis={"title": "false-positive rate (non-members called members)", "range": [0, 1]},
        yaxis={"title": "true-positive rate (members found)", "range": [0, 1.01]},
        updatemenus=[{"type": "buttons", "direction": "right", "x": 1, "y": 1.12, "xanchor": "right", "buttons": [
            {"label": "linear", "method": "relayout", "args": [{"xaxis.type": "linear", "yaxis.type": "linear",
                                                               "xaxis.range": [0, 1], "yaxis.range": [0, 1.01]}]},
            {"label": "log-log", "method": "relayout", "args": [{"xaxis.type": "log", "yaxis.type": "log",
                                                                "xaxis.range": [math.log10(floor), 0],
                                                                "yaxis.range": [math.log10(floor), 0.01]}]}]}])
    return fig


def drift_trend(windows: Iterable[Mapping[str, Any]], threshold: float, title: str = "Drift per monitoring window"
                ) -> go.Figure:
    """Drift share per monitoring window over time, coloured by the window's status, the drifted-feature count as
    bars on a second axis, and the threshold above which a window counts as drift.

    ``windows``: dicts with ``end`` (ISO 8601 time), ``drift_share`` (0..1), ``n_drifted`` and ``status``; any order.
    No windows gives an empty chart that says so."""
    rows = []
    for k, w in enumerate(windows):
        missing = [key for key in ("end", "drift_share", "n_drifted", "status") if key not in w]
        if missing:
            raise ValueError(f"monitoring window {k} lacks {missing}; each needs end, drift_share, n_drifted, status")
        try:
            end = datetime.fromisoformat(str(w["end"]))
        except ValueError as err:
            raise ValueError(f"monitoring window {k}: end {w['end']!r} is not an ISO 8601 time") from err
        rows.append((end, float(w["drift_share"]), int(w["n_drifted"]), str(w["status"])))
    if not 0 <= float(threshold) <= 1:
        raise ValueError(f"threshold must be a drift share in [0, 1], got {threshold}")
    rows.sort(key=lambda r: r[0])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.update_layout(template=TEMPLATE, title=title, height=400, legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="drift share (drifted features / all)", range=[0, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="drifted features", rangemode="tozero", showgrid=False, secondary_y=True)
    if not rows:
        fig.add_annotation(text="no monitoring windows yet", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
        return fig
    ends = [r[0] for r in rows]
    fig.add_trace(go.Bar(x=ends, y=[r[2] for r in rows], name="drifted features", opacity=0.25,
                         marker_color="#57606a", hovertemplate="%{y} drifted features<extra></extra>"),
                  secondary_y=True)
    fig.add_trace(go.Scatter(x=ends, y=[r[1] for r in rows], name="drift share", mode="lines",
                             line={"color": "#0969da"}, hoverinfo="skip"), secondary_y=False)
    for status in dict.fromkeys(r[3] for r in rows):
        mine = [r for r in rows if r[3] == status]
        fig.add_trace(go.Scatter(x=[r[0] for r in mine], y=[r[1] for r in mine], name=status, mode="markers",
                                 marker={"size": 10, "color": STATUS_COLOURS.get(status, "#57606a")},
                                 hovertemplate=f"%{{x}}<br>{html.escape(status)}: drift share %{{y:.3f}}<extra></extra>"),
                      secondary_y=False)
    fig.add_trace(go.Scatter(x=[ends[0], ends[-1]], y=[float(threshold)] * 2, name=f"threshold {float(threshold):g}",
                             mode="lines", line={"dash": "dash", "color": "#cf222e"}, hoverinfo="skip"),
                  secondary_y=False)
    return fig


class FigureEmbedder:
    """Figures as ``<div>`` plus script, plotly.js embedded in the first one only: one copy per page."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def embed(self, figure: go.Figure, div_id: str) -> str:
        if div_id in self.ids:
            raise ValueError(f"two figures on one page share the id {div_id!r}")
        first = not self.ids
        self.ids.append(div_id)
        return figure.to_html(full_html=False, include_plotlyjs=first, div_id=div_id, config=PLOTLY_CONFIG)


def render_markdown(text: str) -> str:
    """Markdown (CommonMark plus tables) as HTML; raw HTML in the text is escaped, so names and reasons are inert."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; max-width: 1100px; }
table { border-collapse: collapse; margin-bottom: 1.2rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; }
th { background: #f6f8fa; }
code { background: #f6f8fa; padding: 0 0.2rem; }
blockquote { background: #fff8c5; border: 1px solid #d4a72c; margin: 0; padding: 0.3rem 0.8rem; }
"""


def report_page(title: str, blocks: Iterable[str | tuple[str, go.Figure]]) -> str:
    """One self-contained HTML page: each block is Markdown text or an ``(id, figure)`` pair, in order."""
    embedder, body = FigureEmbedder(), []
    for block in blocks:
        if isinstance(block, str):
            body.append(render_markdown(block))
        else:
            div_id, figure = block
            body.append(embedder.embed(figure, div_id))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{chr(10).join(body)}\n</body>\n</html>\n")
