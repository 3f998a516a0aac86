"""The monitor's own tests against Evidently's: the verdict's numbers and decisions are the ones Evidently's
report shows for the same window, column by column; and when the HTML report is built (monitor.report)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from monitor_traffic import T0, add_noise, invert, log_records, photo_patches, served, write_log

from components.core import stattests
from components.core.data import REFERENCE_FILE
from components.core.features import MODEL_REFERENCE_FILE
from components.monitor.drift import drift_verdict, evidently_disagreements, evidently_snapshot
from components.monitor.monitor import monitor
from components.monitor.report import REPORT_MODES
from pipelines.config import MonitorConfig


def _with_bad_values(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[:7], "edge_strength"] = np.nan
    frame.loc[frame.index[7:9], "confidence"] = np.inf
    frame.loc[frame.index[9:11], "emb_3"] = -np.inf
    return frame


def _unseen_class(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[:40], "predicted_class"] = 11  # a class the reference never predicted
    return frame


# Each window: (images, how they are changed, how the served table is changed). Clean windows of several
# sizes, real shifts, missing and infinite values, a class the reference never saw.
WINDOWS = {
    "clean-60": (slice(0, 60), None, None),
    "clean-500": (slice(60, 560), None, None),
    "inverted": (slice(0, 200), invert, None),
    "noised": (slice(0, 300), add_noise, None),
    "photo-patches": (slice(0, 200), photo_patches, None),
    "nan-and-inf": (slice(100, 400), None, _with_bad_values),
    "unseen-class": (slice(0, 300), None, _unseen_class),
}


@pytest.mark.parametrize("name", list(WINDOWS))
@pytest.mark.parametrize("with_model", [True, False], ids=["with-model-reference", "image-features-only"])
def test_the_verdict_is_what_evidentlys_report_shows(name, with_model, reference, model_reference, model, held_out):
    rows, shift, edit = WINDOWS[name]
    images = held_out[rows]
    if shift is not None:
        images = shift(images, np.random.default_rng(3))
    current = served(model, images)
    if edit is not None:
        current = edit(current)
    verdict = drift_verdict(reference, current, model_reference=model_reference if with_model else None)
    assert verdict["status"] in ("ok", "drift"), verdict["message"]
    snapshot = evidently_snapshot(reference, current, verdict, model_reference if with_model else None)
    assert evidently_disagreements(verdict, snapshot) == []
    if with_model:  # the embedding test's classifier is Evidently's ModelDriftMethod, step for step
        from evidently.legacy.metrics.data_drift.embedding_drift_methods import ModelDriftMethod

        # The same design matrices to both: SGD's early stop makes the AUC move with input changes of 1e-16.
        rng = np.random.default_rng(len(current))
        ref, cur = rng.normal(size=(300, 16)), rng.normal(0.1 * with_model, 1.0, size=(len(current), 16))
        columns = [f"x{i}" for i in range(16)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc, _, _ = ModelDriftMethod(threshold=1.0, bootstrap=False)(pd.DataFrame(cur, columns=columns),
                                                                         pd.DataFrame(ref, columns=columns))
        assert stattests.embedding_classifier.classifier_auc(ref, cur)[0] == float(auc)
    if name.startswith("clean"):
        assert verdict["status"] == "ok", verdict["message"]
    elif name in ("inverted", "photo-patches"):
        assert verdict["status"] == "drift", verdict["message"]


def test_a_wrong_test_is_caught_by_the_comparison_with_evidently(reference, held_out, model):
    current = served(model, held_out[:200])
    verdict = drift_verdict(reference, current)
    snapshot = evidently_snapshot(reference, current, verdict)
    tampered = json.loads(json.dumps(verdict))
    tampered["features"]["pixel_mean"]["p_value"] *= 1.5
    tampered["features"]["pixel_std"]["drifted"] = not tampered["features"]["pixel_std"]["drifted"]
    problems = evidently_disagreements(tampered, snapshot)
    assert [p.split(":")[0] for p in problems] == ["pixel_mean", "pixel_std"]


def test_registry_names_its_tests_and_refuses_unknown_or_duplicate_ones(reference, held_out, model):
    assert {"ks", "chi2_two_sample"} <= set(stattests.registered())
    with pytest.raises(KeyError, match="unknown drift test 'wasserstein'.*chi2_two_sample, ks"):
        drift_verdict(reference, served(model, held_out[:100]), method="wasserstein")
    with pytest.raises(ValueError, match="already registered"):
        stattests.register(stattests.StatTest("ks", "other", "numerical", "p_value", lambda r, c, t: (1.0, False)))
    p_value, drifted = stattests.get_stattest("ks")(np.arange(50.0), np.arange(50.0) + 100, 0.05)
    assert drifted and p_value < 1e-10


def test_report_modes_are_the_configs_choices():
    from dataclasses import fields

    choices = next(f.metadata["choices"] for f in fields(MonitorConfig) if f.name == "report")
    assert tuple(choices) == REPORT_MODES


@pytest.fixture
def logged(tmp_path, reference, model_reference, model, held_out):
    """A clean hour and an inverted hour of served traffic, and the two references on disk."""
    reference.to_csv(tmp_path / REFERENCE_FILE, index=False)
    model_reference.to_csv(tmp_path / MODEL_REFERENCE_FILE, index=False)
    write_log(tmp_path / "requests" / "a.jsonl",
              log_records(served(model, held_out[:200]), T0, step_s=1.0)
              + log_records(served(model, 1.0 - held_out[:200]), T0 + timedelta(hours=2), step_s=1.0))
    return tmp_path


@pytest.mark.parametrize("mode, evidently_for", [("always", {"ok", "drift"}), ("on_alert", {"drift"}),
                                                 ("never", set())])
def test_report_mode_decides_only_whether_evidentlys_report_is_built(logged, mode, evidently_for):
    for status, start in (("ok", T0), ("drift", T0 + timedelta(hours=2))):
        results = {}
        for m in (mode, "always"):
            out = logged / f"out-{m}-{status}"
            results[m] = monitor(logged / REFERENCE_FILE, logged / "requests", out, replace(MonitorConfig(), report=m),
                                 since=start, until=start + timedelta(hours=1), model_version="1",
                                 model_reference_csv=logged / MODEL_REFERENCE_FILE)
        result = results[mode]
        assert result["status"] == status, result["message"]
        # The verdict and its metrics do not depend on the report, byte for byte.
        for name in ("verdict_json", "metrics_prom"):
            assert Path(result[name]).read_bytes() == Path(results["always"][name]).read_bytes()
        page = Path(result["report_html"]).read_text()
        assert f"Drift verdict: {status}" in page
        if status in evidently_for:
            assert "Dataset Drift" in page and "was not built" not in page
        else:
            assert "Dataset Drift" not in page and f"monitor.report = {mode}" in page
