"""The local runner: its console (step transitions and the steps' own output, not kfp.local's dumps), and on a
real run the orchestration block of the summary and the warm start against kfp.local's plain subprocesses."""

import io
import json
from pathlib import Path

import pytest

from pipelines.local import ConsoleFilter

KFP_OUTPUT = """\
12:00:00.000 - INFO - Executing task \x1b[96m'ingest'\x1b[0m
12:00:00.001 - INFO - Streamed logs:

    [KFP Executor 2026-11-30 12:00:00,000 INFO]: Looking for component `ingest_component`
    [KFP Executor 2026-11-30 12:00:00,000 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {"seed": 0}
        }
    }
    ingest: loaded 1797 images
    Traceback (most recent call last):
      File "x.py", line 1, in <module>
    ValueError: boom
    [KFP Executor 2026-11-30 12:00:01,000 INFO]: Wrote executor output file to /x.
12:00:01.000 - INFO - Task \x1b[96m'ingest'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
12:00:01.000 - INFO - Task \x1b[96m'ingest'\x1b[0m outputs:
    dataset: Dataset( name='dataset',
                      uri='/x/ingest/dataset',
                      metadata={} )
--------------------------------------------------------------------------------
12:00:02.000 - ERROR - Pipeline 'kfp-mlops' finished with status FAILURE.
"""


def test_console_shows_steps_and_step_output_but_not_dumps():
    log, console = io.StringIO(), io.StringIO()
    f = ConsoleFilter(log, console)
    for chunk in (KFP_OUTPUT[:100], KFP_OUTPUT[100:]):  # writes arrive in arbitrary pieces
        f.write(chunk)
    shown = console.getvalue()
    assert log.getvalue() == KFP_OUTPUT, "the log file keeps everything"
    assert "] 1/9 ingest started" in shown and "] 1/9 ingest succeeded in " in shown  # its place and its time
    assert "ingest: loaded 1797 images" in shown
    assert "ValueError: boom" in shown and 'File "x.py"' in shown, "errors from a step must reach the console"
    assert "parameterValues" not in shown and "KFP Executor" not in shown and "uri=" not in shown
    assert "Pipeline 'kfp-mlops' finished with status FAILURE" in shown
    assert "\x1b[" not in shown


# The executor-input dump as kfp.local prints it (json.dumps, indent 4, under its 4-space log indent),
# followed by lines the steps print that look like JSON or start with "[".
DUMP_THEN_BRACKETS = """\
12:00:00.000 - INFO - Executing task 'deploy'
    [KFP Executor 2026-11-30 12:00:00,000 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {
                "config": {"values": {"serving": {"home": "{odd} [path]"}}}
            }
        },
        "outputs": [
            1,
            2
        ]
    }
    [serve] TorchServe is up (pid 123): http://127.0.0.1:8080/predictions/digits
    [deploy] smoke test passed: accuracy 1.00 on 16 images
    ["a", "list", "a step printed"]
    {"status": "ok", "a step printed": "a dict"}
    [monitor] verdict ok written to /x/verdict
    [KFP Executor 2026-11-30 12:00:01,000 INFO]: Wrote executor output file to /x.
12:00:01.000 - INFO - Task 'deploy' finished with status SUCCESS
"""


def test_console_keeps_every_line_a_step_prints_even_when_it_starts_like_json():
    console = io.StringIO()
    ConsoleFilter(io.StringIO(), console).write(DUMP_THEN_BRACKETS)
    shown = console.getvalue()
    for line in ("[serve] TorchServe is up", "[deploy] smoke test passed", '["a", "list"',
                 '{"status": "ok"', "[monitor] verdict ok"):
        assert line in shown, f"{line!r} was hidden from the console:\n{shown}"
    assert "parameterValues" not in shown and '"outputs"' not in shown and "{odd}" not in shown


# -- a real run, warm-started and not: the orchestration block, the same outputs, nothing left behind ----------

def _tiny_config(tmp_path):
    import socket

    from pipelines import config

    cfg = config.load(Path(__file__).resolve().parents[2] / "examples" / "quick.yaml")
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cfg.serving.inference_port, cfg.serving.management_port, cfg.serving.metrics_port = (
        s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    cfg.serving.home = str(tmp_path / "serving")
    cfg.pretrain.epochs, cfg.finetune.epochs, cfg.monitor.replay_limit = 1, 2, 40
    gates = cfg.gates  # a run this short is not robust: the gates must let it through to deploy and monitor
    gates.min_test_accuracy, gates.min_noise_accuracy, gates.min_fgsm_accuracy, gates.min_pgd_accuracy = 0.3, 0.0, 0.0, 0.0
    gates.min_corruption_accuracy, gates.max_corruption_drop = 0.0, 1.0
    return cfg


@pytest.fixture(scope="module")
def warm_and_cold_runs(tmp_path_factory):
    import time

    from pipelines.local import run_environment, run_local
    from pipelines.warm_parents import WarmParents

    runs = {}
    for name, warm in (("warm", True), ("cold", False)):
        tmp_path = tmp_path_factory.mktemp(name)
        started = time.time() - 3.0  # as if the command had started 3 s before
        with WarmParents(enabled=warm, env=run_environment(name)) as parents:  # started ahead, as mlops run does
            runs[name] = run_local(_tiny_config(tmp_path), runs_dir=tmp_path / "runs", run_id=name,
                                   serve_after=False, quiet=True, warm_start=warm, warm_parents=parents,
                                   started=started)
    return runs


@pytest.mark.slow
def test_the_summary_says_how_much_of_the_run_was_spent_outside_the_steps(warm_and_cold_runs):
    from pipelines.local import format_summary

    for name, summary in warm_and_cold_runs.items():
        assert summary["status"] == "succeeded", (name, summary.get("failed_step"), summary.get("blocked_by"))
        block = summary["orchestration"]
        steps = sum(info["seconds"] for info in summary["steps"].values())
        assert block["steps_seconds"] == pytest.approx(steps, abs=0.02), name
        assert block["seconds"] == pytest.approx(summary["seconds"] - steps, abs=0.06), name
        assert block["share"] == pytest.approx(block["seconds"] / summary["seconds"], abs=0.002), name
        assert 3.0 < block["seconds"] < summary["seconds"], "the run's seconds count from when its wait started"
        assert block["before_first_task"] > 3.0 and block["after_last_task"] >= 0 and block["around_steps"] > 0, name
        assert block["before_first_task"] + block["around_steps"] + block["after_last_task"] <= block["seconds"] + 0.05
        assert f"Orchestration: {block['seconds']:.1f} s outside the steps ({block['share']:.0%} of the run" in \
            format_summary(summary)
        on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
        assert on_disk["orchestration"] == block


@pytest.mark.slow
def test_a_warm_run_forks_every_task_and_a_cold_one_none(warm_and_cold_runs):
    warm, cold = warm_and_cold_runs["warm"]["warm_start"], warm_and_cold_runs["cold"]["warm_start"]
    assert warm["enabled"] is True and warm["killed"] == []
    assert set(warm["tasks"]) == set(warm_and_cold_runs["warm"]["steps"]), "every step ran as a fork"
    assert cold == {"enabled": False, "reason": "turned off"}
    pipeline_log = (Path(warm_and_cold_runs["warm"]["run_dir"]) / "pipeline.log").read_text()
    assert "[warm start]" not in pipeline_log, "no task fell back to a fresh Python"
    assert "found in sys.modules after import of package" not in pipeline_log, "runpy's warning: -m of a preloaded module"


@pytest.mark.slow
def test_a_warm_run_writes_what_a_cold_run_writes(warm_and_cold_runs):
    warm, cold = warm_and_cold_runs["warm"], warm_and_cold_runs["cold"]
    for name in ("dataset", "encoder", "model"):
        warm_files = {p.relative_to(warm["artifacts"][name]): p.read_bytes()
                      for p in sorted(Path(warm["artifacts"][name]).rglob("*")) if p.suffix in (".npz", ".safetensors")}
        cold_files = {p.relative_to(cold["artifacts"][name]): p.read_bytes()
                      for p in sorted(Path(cold["artifacts"][name]).rglob("*")) if p.suffix in (".npz", ".safetensors")}
        assert warm_files and warm_files == cold_files, name
    assert warm["metrics"]["test_accuracy"] == cold["metrics"]["test_accuracy"]
    assert {g: v["passed"] for g, v in warm["gates"].items()} == {g: v["passed"] for g, v in cold["gates"].items()}


@pytest.mark.slow
def test_a_warm_run_leaves_no_process_behind(warm_and_cold_runs):
    run_dir = warm_and_cold_runs["warm"]["run_dir"]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            assert run_dir.encode() not in cmdline, cmdline
    assert not list(Path(run_dir).glob("warm_start.json.*")), "the warm parents' partial statistics are merged"
