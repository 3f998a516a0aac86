"""Tests of the report figures (components.core.plots): the numbers in the traces are the numbers given, and a page
holds its figures and plotly.js once, with nothing fetched from the network."""

import numpy as np
import pytest
from report_checks import PLOTLY_BUNDLE, assert_offline_report, external_sources

from components.core import plots


def by_name(fig, name):
    [trace] = [t for t in fig.data if t.name == name]
    return trace


def test_equal_mass_bins_hold_the_minimum_where_equal_width_bins_do_not():
    rng = np.random.default_rng(0)
    confidences = np.concatenate([1 - rng.exponential(0.02, 330).clip(0, 0.5), rng.uniform(0.3, 0.9, 30)])
    correct = rng.random(len(confidences)) < confidences
    width = np.histogram(confidences, bins=15, range=(0, 1))[0]
    assert (width[width > 0] < plots.MIN_BIN_COUNT).any()  # the problem: thin equal-width bins
    bins = plots.equal_mass_bins(confidences, correct, n_bins=10, min_count=plots.MIN_BIN_COUNT)
    counts = [b["count"] for b in bins]
    assert len(bins) == 10 and sum(counts) == len(confidences) and min(counts) >= plots.MIN_BIN_COUNT
    assert max(counts) - min(counts) <= 1
    assert all(a["upper"] <= b["lower"] for a, b in zip(bins, bins[1:]))  # consecutive by confidence
    order = np.argsort(confidences, kind="stable")
    first = order[: counts[0]]
    assert bins[0]["accuracy"] == pytest.approx(correct[first].mean())
    assert bins[0]["confidence"] == pytest.approx(confidences[first].mean())
    # fewer bins when the data cannot fill them, one bin when it cannot fill even one
    assert [b["count"] for b in plots.equal_mass_bins(confidences[:50], correct[:50], 10, 20)] == [25, 25]
    assert [b["count"] for b in plots.equal_mass_bins(confidences[:7], correct[:7], 10, 20)] == [7]


@pytest.mark.parametrize("conf, correct, message", [
    ([0.5, 1.2], [1, 0], r"lie in \[0, 1\]"),
    ([0.5, 0.6], [1], "differ in length"),
    ([], [], "at least one prediction"),
    ([0.5, float("nan")], [1, 0], "NaN"),
])
def test_reliability_input_is_checked(conf, correct, message):
    with pytest.raises(ValueError, match=message):
        plots.reliability_diagram(conf, correct)


def test_reliability_diagram_shows_bins_counts_diagonal_and_legend():
    rng = np.random.default_rng(1)
    confidences = rng.uniform(0.2, 1.0, 400)
    correct = rng.random(400) < confidences
    fig = plots.reliability_diagram(confidences, correct, n_bins=8, min_count=30)
    bins = plots.equal_mass_bins(confidences, correct, 8, 30)
    accuracy, counts = by_name(fig, "accuracy per bin"), by_name(fig, "predictions per bin")
    np.testing.assert_allclose(accuracy.x, [b["confidence"] for b in bins])
    np.testing.assert_allclose(accuracy.y, [b["accuracy"] for b in bins])
    assert list(counts.y) == [b["count"] for b in bins] and counts.yaxis == "y2"  # counts on the second axis
    assert [row[0] for row in accuracy.customdata] == [b["count"] for b in bins]  # and in the hover text
    diagonal = by_name(fig, "perfect calibration")
    assert list(diagonal.x) == [0, 1] and list(diagonal.y) == [0, 1]
    assert fig.layout.showlegend is not False and fig.layout.meta["bins"] == bins


def test_saliency_overlay_draws_grey_images_under_normalised_heat_with_a_colour_bar():
    rng = np.random.default_rng(2)
    images, maps = rng.random((5, 8, 8)), rng.random((5, 8, 8)) * np.arange(1, 6)[:, None, None]
    maps[3] = 0  # a flat map stays zero instead of dividing by zero
    fig = plots.saliency_overlay(images, maps, titles=[f"#{i}" for i in range(5)], columns=3)
    assert len(fig.data) == 10
    for k in range(5):
        grey, heat = by_name(fig, f"image {k}"), by_name(fig, f"saliency {k}")
        np.testing.assert_allclose(np.asarray(grey.z), images[k])
        expected = maps[k] / maps[k].max() if maps[k].max() > 0 else maps[k]
        np.testing.assert_allclose(np.asarray(heat.z), expected)
        assert grey.coloraxis == "coloraxis2" and heat.coloraxis == "coloraxis"
    assert fig.layout.coloraxis.showscale is not False and fig.layout.coloraxis.colorbar.title.text
    assert fig.layout.coloraxis2.showscale is False and fig.layout.coloraxis2.colorscale[0][1] == "rgb(255,255,255)"
    assert [a.text for a in fig.layout.annotations] == [f"#{i}" for i in range(5)]
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 on top, as in the image
    assert len(plots.saliency_overlay(rng.random((8, 8)), rng.random((8, 8))).data) == 2  # one image alone
    rgb = plots.saliency_overlay(rng.random((2, 3, 8, 8)), rng.random((2, 8, 8)))  # colour images shown in grey
    assert np.asarray(rgb.data[0].z).shape == (8, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        plots.saliency_overlay(images, maps[:4])


def test_robustness_curves_start_at_clean_accuracy_one_line_per_corruption_and_attack():
    corruptions = [{"corruption": c, "severity": s, "accuracy": a} for c, base in (("blur", 0.9), ("contrast", 0.8))
                   for s, a in ((2, base - 0.1), (1, base))]
    attacks = [{"attack": "FGSM", "epsilon": 0.05, "accuracy": 0.7}, {"attack": "PGD", "epsilon": 0.05, "accuracy": 0.5},
               {"attack": "FGSM", "epsilon": 0.1, "accuracy": 0.4}]
    fig = plots.robustness_curves(corruptions, attacks, clean_accuracy=0.97)
    blur = by_name(fig, "blur")
    assert list(blur.x) == [0, 1, 2] and list(blur.y) == [0.97, 0.9, pytest.approx(0.8)] and blur.xaxis == "x"
    fgsm = by_name(fig, "FGSM")
    assert list(fgsm.x) == [0, 0.05, 0.1] and list(fgsm.y) == [0.97, 0.7, 0.4] and fgsm.xaxis == "x2"
    assert list(by_name(fig, "PGD").y) == [0.97, 0.5]
    with pytest.raises(ValueError, match="needs corruption or attack rows"):
        plots.robustness_curves([], [])


def test_roc_curve_has_the_points_the_chance_line_and_tpr_at_low_fpr():
    fpr, tpr = [0.0, 0.004, 0.01, 0.3, 1.0], [0.0, 0.05, 0.08, 0.7, 1.0]
    fig = plots.roc_curve([{"name": "loss", "fpr": fpr, "tpr": tpr, "auc": 0.71},
                           {"name": "confidence", "fpr": [0, 0.5, 1], "tpr": [0, 0.5, 1], "auc": 0.5}])
    curve = by_name(fig, "loss (AUC 0.710)")
    assert list(curve.x) == fpr and list(curve.y) == tpr
    point = by_name(fig, "loss: TPR 0.080 at 1% FPR")
    assert list(point.x) == [0.01] and list(point.y) == [0.08]
    assert by_name(fig, "confidence: TPR 0.000 at 1% FPR").marker.color == by_name(fig, "confidence (AUC 0.500)").line.color
    chance = by_name(fig, "chance (AUC 0.5)")
    assert list(chance.x) == [0, 1] and list(chance.y) == [0, 1]
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == ["linear", "log-log"]
    with pytest.raises(ValueError, match="at least one curve"):
        plots.roc_curve([])
    with pytest.raises(ValueError, match="same length"):
        plots.roc_curve([{"name": "x", "fpr": [0, 1], "tpr": [0, 0.5, 1], "auc": 0.5}])


def test_drift_trend_orders_windows_in_time_and_draws_the_threshold():
    windows = [{"end": "2026-12-07T12:00:00+00:00", "drift_share": 0.6, "n_drifted": 9, "status": "drift"},
               {"end": "2026-12-07T10:00:00+00:00", "drift_share": 0.1, "n_drifted": 2, "status": "ok"},
               {"end": "2026-12-07T11:00:00+00:00", "drift_share": 0.2, "n_drifted": 3, "status": "ok"}]
    fig = plots.drift_trend(windows, threshold=0.5)
    share = by_name(fig, "drift share")
    assert [x.hour for x in share.x] == [10, 11, 12] and list(share.y) == [0.1, 0.2, 0.6]
    assert list(by_name(fig, "drifted features").y) == [2, 3, 9]
    assert list(by_name(fig, "drift").y) == [0.6] and list(by_name(fig, "ok").y) == [0.1, 0.2]
    threshold = by_name(fig, "threshold 0.5")
    assert list(threshold.y) == [0.5, 0.5] and [x.hour for x in threshold.x] == [10, 12]
    empty = plots.drift_trend([], 0.5)
    assert not empty.data and empty.layout.annotations[0].text == "no monitoring windows yet"
    with pytest.raises(ValueError, match=r"window 0 lacks \['n_drifted'\]"):
        plots.drift_trend([{"end": "2026-12-07T10:00:00", "drift_share": 0.1, "status": "ok"}], 0.5)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        plots.drift_trend([{**windows[0], "end": "yesterday"}], 0.5)


def test_confusion_heatmap_counts_and_literal_class_names():
    fig = plots.confusion_heatmap([[5, 1], [0, 4]], ["cat", "<b>dog</b>"])
    right, wrong = by_name(fig, "correct"), by_name(fig, "mistakes")
    assert np.asarray(right.customdata).tolist() == [[5, 1], [0, 4]]  # every count in the hover text
    assert np.asarray(right.text).tolist() == [["5", ""], ["", "4"]] and right.texttemplate == "%{text}"
    assert np.asarray(wrong.text).tolist() == [["", "1"], ["", ""]]  # a zero off the diagonal stays blank
    assert list(right.x) == ["cat", "&lt;b&gt;dog&lt;/b&gt;"]  # plotly reads tags in text: escaped, shown as typed
    correct, mistakes = np.asarray(right.z, float), np.asarray(wrong.z, float)
    assert correct[0, 0] == pytest.approx(5 / 6) and np.isnan(correct[0, 1])
    assert mistakes[0, 1] == pytest.approx(1 / 6) and np.isnan(mistakes[1, 0])  # no mistake, no red
    with pytest.raises(ValueError, match="must be 2x2"):
        plots.confusion_heatmap([[1, 2, 3]], ["a", "b"])


def test_report_page_renders_markdown_and_embeds_plotly_once_with_nothing_external():
    roc = plots.roc_curve([{"name": "loss", "fpr": [0, 1], "tpr": [0, 1], "auc": 0.5}])
    trend = plots.drift_trend([{"end": "2026-12-07T10:00:00", "drift_share": 0.1, "n_drifted": 1, "status": "ok"}], 0.5)
    page = plots.report_page("A <report>", ["# Title\n\n| a | b |\n|---|---|\n| 1 | <script>alert(1)</script> |",
                                            ("roc", roc), "Between *them*.", ("trend", trend)])
    assert_offline_report(page, ["roc", "trend"])
    assert "<title>A &lt;report&gt;</title>" in page and "<h1>Title</h1>" in page and "<em>them</em>" in page
    assert "<td>&lt;script&gt;alert(1)&lt;/script&gt;</td>" in page  # raw HTML in the text is inert
    assert page.count(PLOTLY_BUNDLE) == 1  # the library once, however many figures
    assert page.index('id="roc"') < page.index("<p>Between <em>") < page.index('id="trend"')  # blocks in order
    assert external_sources('<p>x</p><script src="https://cdn.plot.ly/plotly.min.js"></script>') == [
        "https://cdn.plot.ly/plotly.min.js"]  # the check sees what it must refuse
    with pytest.raises(ValueError, match="share the id"):
        plots.report_page("x", [("a", roc), ("a", trend)])
