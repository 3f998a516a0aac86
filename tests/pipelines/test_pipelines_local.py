"""The local runner's console: step transitions and the steps' own output, not kfp.local's dumps."""

import io

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
    assert "step 'ingest'" in shown and "finished with status SUCCESS" in shown
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
