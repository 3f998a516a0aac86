"""Monitor step: is production traffic still like the data the model was trained on?

Compares the served requests (the serving request log) with the references saved at
training time, and writes a verdict (JSON), Evidently's HTML report and Prometheus text
metrics. :func:`monitor` reads one window and its references, checks and writes; the
parts it calls:

* ``sampling``: reading a window of the log fast, sampling large ones with a DKW error bound,
  seeded by (model version, window) so a rerun gives the same result;
* ``traffic``: which logged requests count (model version, request source);
* ``guards``: is the window fit for a test (``insufficient_data``, ``schema_drift``);
* ``drift`` and ``stattests``: the three groups of checks (image features, predictions,
  embedding), the verdict (``verdict``), and Evidently's report of the same tests;
* ``report``: verdict.json and drift.prom, written as soon as the verdict is known, then the
  HTML report (Evidently's, as ``cfg.report`` asks: always, on alert only, or never).

Without ``reference_model.csv`` the monitor checks the image features only and says so
in the verdict (``checks``, ``model_reference``).
"""

from __future__ import annotations

import io
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.features import MODEL_REFERENCE_FILE
from components.core.settings import Settings
from components.monitor.drift import drift_verdict, evidently_disagreements, evidently_snapshot
from components.monitor.guards import check_model_reference
from components.monitor.report import wants_report, write_report, write_verdict
from components.monitor.sampling import parse_utc, read_window, window_seed
from components.monitor.traffic import EXCLUDED_SOURCES, traffic_filter


def read_csv(location: str | Path) -> pd.DataFrame:
    """A CSV from a local path or an ``s3://`` URI."""
    if str(location).startswith("s3://"):
        from components.core import blobs

        return pd.read_csv(io.BytesIO(blobs.read_bytes(str(location))))
    return pd.read_csv(location)


def location_exists(location: str | Path) -> bool:
    """Whether a local file or an ``s3://`` object exists."""
    if str(location).startswith("s3://"):
        from components.core import blobs

        return blobs.exists(str(location))
    return Path(location).is_file()


def load_model_reference(location: str | Path | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """The model reference and what the verdict says about it; a missing one degrades to image features only."""
    if location is None:
        return None, {"path": None, "found": False,
                      "note": f"No model reference ({MODEL_REFERENCE_FILE}) given: prediction and embedding drift "
                              "were not checked, image features only. Pass the one finetune wrote into the model "
                              "artifact (--model-reference)."}
    if not location_exists(location):
        return None, {"path": str(location), "found": False,
                      "note": f"Model reference {location} not found: prediction and embedding drift were not "
                              "checked, image features only. Finetune writes it into the model artifact; re-run "
                              "training or call components.core.features.write_model_reference."}
    frame = read_csv(location)
    check_model_reference(frame)
    return frame, {"path": str(location), "found": True, "rows": len(frame)}


def monitor(reference_csv: str | Path, log_dir: str | Path, out_dir: str | Path, cfg: Settings,
            since: datetime | None = None, until: datetime | None = None,
            model_version: str | None = None, source: str | None = None,
            exclude_sources: tuple[str, ...] = EXCLUDED_SOURCES, model_reference_csv: str | Path | None = None,
            log_cache_dir: str | Path | None = None, log_file_max_age_s: float | None = None) -> dict[str, Any]:
    """Compare the request log (one time window / model version / source) with the training references.

    ``cfg`` is the run's ``monitor`` area: ``drift_share`` (share of drifted image features
    that makes that group drift), ``sample_epsilon`` and ``sample_alpha`` (windows larger than
    4 x ``dkw_sample_size(sample_epsilon, sample_alpha)`` requests are sampled; epsilon 0
    reads everything), with a seed from (model version, window): the same inputs give the
    same files, byte for byte. ``cfg.report`` says when to build Evidently's HTML report of the
    same tests (``always``, ``on_alert``, ``never``); the verdict does not depend on it.

    ``reference_csv`` is the image-feature reference (``reference.csv`` from ingest) and
    ``model_reference_csv`` the model's (``reference_model.csv``, prediction + embedding);
    either may be local or ``s3://``, as may ``log_dir``. Without a model reference only the
    image features are checked, and the verdict says so. The deploy step's smoke-test
    requests are excluded by default (``exclude_sources``); ``source`` keeps only one source.
    ``log_file_max_age_s`` is the log writer's rotation age, so rotated files outside the
    window are skipped. Writes ``verdict.json`` and ``drift.prom``, then ``drift_report.html``,
    into ``out_dir``; returns the verdict plus their paths.
    """
    if not location_exists(reference_csv):
        raise FileNotFoundError(f"reference {reference_csv} not found: it is reference.csv in the dataset "
                                "artifact written by ingest")
    reference = read_csv(reference_csv)
    model_reference, model_reference_info = load_model_reference(model_reference_csv)
    lo = parse_utc(since) if since is not None else None
    hi = parse_utc(until) if until is not None else None
    version = None if model_version is None else str(model_version)

    t0 = time.perf_counter()
    window = read_window(log_dir, lo, hi, model_version=version, keep=traffic_filter(source, exclude_sources),
                         epsilon=cfg.sample_epsilon or None, alpha=cfg.sample_alpha, cache_dir=log_cache_dir,
                         max_file_age_s=log_file_max_age_s)
    t_read = time.perf_counter() - t0
    verdict = drift_verdict(reference, window.frame, drift_share=cfg.drift_share, model_reference=model_reference)
    stats = window.stats()
    filtered_out = stats["rows_in_window"] - stats["rows_selected"]
    if verdict["status"] == "insufficient_data" and filtered_out:
        verdict["message"] += (f" ({filtered_out} other requests in the time window were of another model "
                               "version or an excluded source.)")
    if model_reference is None and verdict["status"] in ("ok", "drift"):
        verdict["message"] += " " + model_reference_info["note"]
    verdict["model_version"] = version
    verdict["window"] = {"since": lo.isoformat() if lo else None, "until": hi.isoformat() if hi else None}
    verdict["log"] = {"dir": str(log_dir), "since": verdict["window"]["since"], "until": verdict["window"]["until"],
                      "model_version": version, "source": source, "exclude_sources": list(exclude_sources or ()),
                      **stats}
    verdict["sampling"] = window.sampling()
    verdict["reference_csv"] = str(reference_csv)
    verdict["model_reference"] = model_reference_info

    paths = write_verdict(out_dir, verdict)
    t_check = time.perf_counter() - t0
    snapshot, note = None, None
    if verdict["status"] in ("ok", "drift"):
        if wants_report(cfg.report, verdict):
            snapshot = evidently_snapshot(reference, window.frame, verdict, model_reference)
            differences = evidently_disagreements(verdict, snapshot)
            if differences:
                note = "Evidently's report below differs from the verdict: " + "; ".join(differences)
                print(f"[monitor] WARNING {note}", flush=True)
        else:
            note = (f"Evidently's report was not built for this window (monitor.report = {cfg.report}); "
                    "the verdict above is complete. Set monitor.report to 'always' to get it.")
    paths["report_html"] = write_report(out_dir, verdict, snapshot, window_seed(version, lo, hi), note)
    print(f"[monitor] {verdict['status']}: {verdict['message']} ({verdict['current_rows']} of "
          f"{stats['rows_selected']} requests checked, read in {t_read:.1f}s, verdict in {t_check:.1f}s, "
          f"all in {time.perf_counter() - t0:.1f}s)", flush=True)
    return {**verdict, **{k: str(v) for k, v in paths.items()}}
