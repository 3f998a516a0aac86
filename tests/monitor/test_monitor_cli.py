"""`mlops monitor`: the verdict on stdout, idempotent results per model version and window, valid
Prometheus text, contradictory windows refused, and logs, references and results on s3://."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import MONITOR_REFERENCE_ROWS
from monitor_traffic import T0, log_records, rotate_90, served, write_log

from components.core.features import FEATURE_COLUMNS, MODEL_REFERENCE_FILE
from components.core.stattests import PREDICTION_METHOD
from components.monitor.report import prometheus_metrics
from components.monitor.verdict import STATUSES


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, run_cli, reference, model_dir, model, held_out):
    """`mlops monitor --json` on a clean hour (twice) and a drifted hour of a log with model columns."""
    root = tmp_path_factory.mktemp("cli")
    reference.to_csv(root / "reference.csv", index=False)
    # Published next to the feature reference, the model reference is found without a flag.
    (root / MODEL_REFERENCE_FILE).write_bytes((model_dir / MODEL_REFERENCE_FILE).read_bytes())
    logs = root / "requests"
    write_log(logs / "requests-host-1-20250101T120000Z-0001.jsonl",
              log_records(served(model, held_out[:300]), T0, step_s=10, model_version="m1")
              + log_records(served(model, rotate_90(held_out[300:600], None)), T0 + timedelta(hours=1), step_s=10,
                            model_version="m1"), compact=True)
    common = ["monitor", "--json", "--log-dir", str(logs), "--reference", str(root / "reference.csv"),
              "--model-version", "m1", "--out", str(root / "out"), "--serving-home", str(root / "serving")]
    clean = ["--since", "2025-01-01T12:00:00Z", "--until", "2025-01-01T13:00:00Z"]
    drifted = ["--since", "2025-01-01T13:00:00Z", "--until", "2025-01-01T14:00:00Z"]
    runs = {"clean": run_cli(common + clean)}
    runs["clean_files"] = {p.name: p.read_bytes() for p in (root / "out" / "m1").glob("*/*")}
    runs["rerun"] = run_cli(common + clean)
    runs["drifted"] = run_cli(common + drifted)
    return root, runs


def _last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_cli_prints_the_verdict_as_its_last_line(cli_runs):
    root, runs = cli_runs
    (code, stdout, _), (drift_code, drift_stdout, _) = runs["clean"], runs["drifted"]
    clean, drifted = _last_json_line(stdout), _last_json_line(drift_stdout)
    assert code == 0 and clean["drift_detected"] is False and clean["status"] == "ok", clean["message"]
    assert drift_code == 2 and drifted["drift_detected"] is True and drifted["status"] == "drift"
    assert {"predicted_class", "confidence"} <= set(drifted["drifted_features"])
    assert drifted["model_reference"] == {"path": str(root / MODEL_REFERENCE_FILE), "found": True, "rows": 300}
    for verdict in (clean, drifted):
        assert verdict["checks"] == ["image_features", "prediction", "embedding"]
        assert verdict["model_version"] == "m1" and verdict["current_rows"] == 300
        for column, result in verdict["features"].items():  # per feature: the method and the sample sizes
            assert result["method"] in ("ks", PREDICTION_METHOD) and result["current_rows"] == 300, column
            assert result["reference_rows"] == (MONITOR_REFERENCE_ROWS if column in FEATURE_COLUMNS else 300)
        assert verdict["groups"]["embedding"]["method"].startswith("Evidently ModelDriftMethod")


def test_results_are_idempotent_per_model_version_and_window(cli_runs):
    root, runs = cli_runs
    first, second = _last_json_line(runs["clean"][1]), _last_json_line(runs["rerun"][1])
    assert first == second
    window_dirs = sorted(p.relative_to(root / "out").as_posix() for p in (root / "out").glob("*/*"))
    assert window_dirs == ["m1/20250101T120000.000Z--20250101T130000.000Z",
                           "m1/20250101T130000.000Z--20250101T140000.000Z"]  # a rerun adds nothing
    clean_dir = root / "out" / window_dirs[0]
    assert Path(first["verdict_json"]).parent == clean_dir
    rerun_files = {p.name: p.read_bytes() for p in clean_dir.iterdir()}
    assert set(rerun_files) == {"drift_report.html", "verdict.json", "drift.prom"}
    for name, content in rerun_files.items():  # byte for byte, the Evidently HTML included
        assert content == runs["clean_files"][name], name


PROM_SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)")
PROM_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """A strict reader of the text exposition format: HELP/TYPE before a family's samples, valid names,
    labels and values, one family in one block, a final newline."""
    assert text.endswith("\n") and "\n\n" not in text
    samples, typed, helped, seen_families = {}, {}, set(), []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind == "gauge" and name not in typed
            typed[name] = kind
            seen_families.append(name)
        else:
            match = PROM_SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name == seen_families[-1], f"{name} outside its family's block"
            labels = match["labels"] or ""
            pairs = PROM_LABEL.findall(labels)
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, f"bad labels: {labels!r}"
            unescaped = {k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\") for k, v in pairs}
            value = match["value"]
            assert value in ("NaN", "+Inf", "-Inf") or re.fullmatch(r"-?\d+(\.\d+)?(e[-+]?\d+)?", value), value
            key = (name, frozenset(unescaped.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = float(value)
    assert set(typed) == helped
    return samples


def test_prometheus_metrics_are_valid_text_format(cli_runs):
    root, runs = cli_runs
    drifted = _last_json_line(runs["drifted"][1])
    samples = parse_prometheus(Path(drifted["metrics_prom"]).read_text())
    version = ("model_version", "m1")

    def value(name, **labels):
        return samples[(f"kfp_mlops_drift_{name}", frozenset({version, *labels.items()}))]

    assert value("detected") == 1 and value("alert") == 1
    assert value("status", status="drift") == 1 and sum(value("status", status=s) for s in STATUSES) == 1
    assert value("group_drifted", group="embedding") == 1 and value("group_drifted", group="prediction") == 1
    assert value("feature_drifted", feature="predicted_class", method=PREDICTION_METHOD) == 1
    assert value("feature_p_value", feature="pixel_std", method="ks") == pytest.approx(
        drifted["features"]["pixel_std"]["p_value"])
    assert value("embedding_auc") == pytest.approx(drifted["groups"]["embedding"]["auc"])
    assert value("checked_requests") == 300 and value("window_requests") == 300
    assert value("window_end_timestamp_seconds") == datetime(2025, 1, 1, 14, tzinfo=timezone.utc).timestamp()
    # Label values are escaped: quotes, backslashes and newlines survive the round trip.
    odd = dict(drifted, model_version='v"1\\x\ny')
    assert ("kfp_mlops_drift_detected", frozenset({("model_version", 'v"1\\x\ny')})) in parse_prometheus(
        prometheus_metrics(odd))


@pytest.mark.parametrize("argv, message", [
    (["--last", "1h", "--since", "2025-01-01T00:00:00Z"], "give --last, or --since/--until, not both"),
    (["--settle", "1h"], "--settle only applies to --last"),
    (["--last", "an hour"], "not a duration: 'an hour'"),
], ids=["last-and-since", "settle-alone", "bad-duration"])
def test_cli_rejects_contradictory_windows(tmp_path, run_cli, argv, message):
    code, _, err = run_cli(["monitor", "--log-dir", str(tmp_path), "--reference", str(tmp_path / "r.csv"),
                            "--serving-home", str(tmp_path / "serving"), *argv])
    assert code == 1 and message in err, err


@pytest.mark.slow
def test_monitor_reads_logs_and_references_from_s3_and_writes_results_there(bucket, cli_runs, run_cli, monkeypatch,
                                                                           tmp_path):
    from components.core import blobs

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the downloaded-log cache
    root, runs = cli_runs
    blobs.put_dir(root / "requests", f"s3://{bucket}/request-logs")
    blobs.put_file(root / "reference.csv", f"s3://{bucket}/monitoring/reference.csv")
    blobs.put_file(root / MODEL_REFERENCE_FILE, f"s3://{bucket}/monitoring/{MODEL_REFERENCE_FILE}")
    argv = ["monitor", "--json", "--log-dir", f"s3://{bucket}/request-logs",
            "--reference", f"s3://{bucket}/monitoring/reference.csv", "--model-version", "m1",
            "--since", "2025-01-01T13:00:00Z", "--until", "2025-01-01T14:00:00Z", "--serving-home", str(root / "serving")]
    code, stdout, err = run_cli(argv)
    verdict = _last_json_line(stdout)
    local = _last_json_line(runs["drifted"][1])
    assert code == 2 and verdict["status"] == "drift", err
    key = f"s3://{bucket}/monitoring/verdicts/m1/20250101T130000.000Z--20250101T140000.000Z"
    assert verdict["verdict_json"] == f"{key}/verdict.json"  # results next to the s3:// reference by default
    assert verdict["model_reference"]["found"] is True  # found next to the reference
    same = ("features", "groups", "drifted_features", "current_rows", "sampling", "nan_share")
    assert {k: verdict[k] for k in same} == {k: local[k] for k in same}  # the same answer as from local files
    assert json.loads(blobs.read_bytes(f"{key}/verdict.json"))["status"] == "drift"
    first = sorted(blobs.list_uris(f"s3://{bucket}/monitoring/verdicts"))
    assert first == [f"{key}/{name}" for name in ("drift.prom", "drift_report.html", "verdict.json")]
    assert run_cli(argv)[0] == 2 and sorted(blobs.list_uris(f"s3://{bucket}/monitoring/verdicts")) == first
