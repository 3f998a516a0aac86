"""The warm start of a local run's tasks: a task forked from the warm parent behaves as the fresh Python it replaces.

Each test runs the same command a kfp.local task runs (``sh -c '... python -m MODULE ARGS'``), once with the real
interpreter and once with the launcher ``warm_started`` puts in its place, and compares what comes out. The warm
parents here import two light stages (``json``; then ``csv``), so that the tests do not wait for torch.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.warm_parents import WarmParents, warm_started
from pipelines.warm_start import STATS_FILE, supported

pytestmark = pytest.mark.skipif(supported() is not None, reason=f"warm start {supported()}")

STAGES = (("json",), ("csv",))
PROBE = '''
import atexit, os, sys, threading, time
mode = sys.argv[1]
print("argv", sys.argv[1:], "cwd", os.getcwd(), "name", __name__, "value", os.environ.get("PROBE_VALUE"),
      "stdout", type(sys.stdout.buffer).__name__, sys.stdout.line_buffering, flush=True)
print("to stderr", file=sys.stderr)
if mode == "exit3":
    sys.exit(3)
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("boom")
if mode == "osexit":
    sys.stdout.flush()
    os._exit(7)
if mode == "kill":
    os.kill(os.getpid(), 9)
if mode == "leftovers":
    leftover = open(sys.argv[2], "w")
    leftover.write("written, never closed")
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
if mode == "stdin":
    print("read", sys.stdin.read().strip())
if mode == "modules":
    print("csv preloaded", "csv" in sys.modules)
if mode == "plotly":
    import plotly.graph_objects as go
    from components.core.plots import TEMPLATE
    go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])).update_layout(template=TEMPLATE, title="t").to_json()
    print("figure made")
if mode == "sleep":
    with open(sys.argv[2], "w") as out:
        out.write(str(os.getpid()))
    time.sleep(120)
'''


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    (tmp_path / "warm_probe.py").write_text(PROBE)
    monkeypatch.setenv("PROBE_VALUE", "from the run")
    return tmp_path


def task(python: str, cwd: Path, *args: str, env: dict | None = None, stdin: str | None = None):
    """What kfp.local runs for a task: a shell that starts ``python -m MODULE``."""
    return subprocess.run(["sh", "-c", '_KFP_RUNTIME=true "$0" -m warm_probe "$@"', python, *args], cwd=cwd,
                          capture_output=True, text=True, env=env, input=stdin, timeout=120)


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def wait_for(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_forked_task_shows_what_a_fresh_python_shows(probe_dir):
    python = sys.executable
    cold = {mode: task(python, probe_dir, mode) for mode in ("ok", "exit3", "message", "raise", "osexit", "kill")}
    cold["stdin"] = task(python, probe_dir, "stdin", stdin="hello\n")
    with warm_started(probe_dir, stages=STAGES) as warm:
        assert sys.executable != python, "kfp.local would start the tasks with the launcher"
        launcher = sys.executable
        hot = {mode: task(launcher, probe_dir, mode) for mode in ("ok", "exit3", "message", "raise", "osexit", "kill")}
        hot["stdin"] = task(launcher, probe_dir, "stdin", stdin="hello\n")
    assert sys.executable == python
    for mode, fresh in cold.items():
        forked = hot[mode]
        assert forked.returncode == fresh.returncode, (mode, forked.stderr)
        assert forked.stdout == fresh.stdout, mode
        if mode == "raise":  # a traceback passes through other frames; its last line, the error, is the same
            assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:], forked.stderr
        else:
            assert forked.stderr == fresh.stderr, mode
    assert hot["kill"].returncode == 137 and hot["exit3"].returncode == 3 and hot["osexit"].returncode == 7
    assert "ValueError: boom" in hot["raise"].stderr and "read hello" in hot["stdin"].stdout
    stats = json.loads((probe_dir / STATS_FILE).read_text())
    assert len(stats["tasks"]) == 7 and warm.as_summary()["enabled"] is True, "every task was forked"
    assert sorted(t["exit_code"] for t in stats["tasks"]) == sorted(-9 if r.returncode == 137 else r.returncode
                                                                     for r in hot.values())


def test_a_forked_task_ends_as_python_ends_flushing_files_joining_threads_running_atexit(probe_dir):
    with warm_started(probe_dir, stages=STAGES):
        done = task(sys.executable, probe_dir, "leftovers", str(probe_dir / "left-open.txt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["thread finished", "atexit ran"]
    assert (probe_dir / "left-open.txt").read_text() == "written, never closed"


def test_the_next_stage_takes_over_with_its_modules_imported(probe_dir, monkeypatch):
    (probe_dir / "slow_stage.py").write_text("import time\ntime.sleep(1.5)\nimport csv\n")
    monkeypatch.chdir(probe_dir)  # the warm parents start here, and import slow_stage from here
    with warm_started(probe_dir, stages=(("json",), ("slow_stage",))) as warm:
        first = task(sys.executable, probe_dir, "modules")
        assert wait_for(lambda: "stage 1 imported" in warm.log_path.read_text())
        time.sleep(0.2)  # the first stage reads "ready" and stops accepting
        later = task(sys.executable, probe_dir, "modules")
    assert "csv preloaded False" in first.stdout and "csv preloaded True" in later.stdout
    stats = json.loads((probe_dir / STATS_FILE).read_text())
    assert [t["stage"] for t in stats["tasks"]] == [0, 1]
    assert [s["preloaded"] for s in stats["stages"]] == [["json"], ["slow_stage"]], "stage 1 imports beside stage 0"
    assert "threading" in stats["tasks"][0]["imported_itself"], "each task lists what it imported itself"
    assert "stage 1 imported" in (probe_dir / "warm_start.log").read_text(), "the log ends in the run's directory"


def test_a_task_whose_environment_differs_runs_in_a_fresh_python_and_says_why(probe_dir):
    with warm_started(probe_dir, stages=STAGES):
        done = task(sys.executable, probe_dir, "ok", env={**os.environ, "PROBE_VALUE": "changed"})
    assert done.returncode == 0 and "value changed" in done.stdout
    why = done.stderr.splitlines()[0]
    assert why.startswith("[warm start] its environment differs from the warm parent's in ") and "PROBE_VALUE" in why
    assert why.endswith(": this task starts a fresh Python") and "changed" not in why, "names, never values"
    assert json.loads((probe_dir / STATS_FILE).read_text())["tasks"] == []


def test_signals_reach_the_task_and_a_killed_launcher_takes_its_task_along(probe_dir, monkeypatch):
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # as the task command sets it
    with warm_started(probe_dir, stages=STAGES):
        results = {}
        for how in ("SIGTERM", "SIGKILL"):
            pid_file = probe_dir / f"{how}.pid"
            launcher = subprocess.Popen([sys.executable, "-m", "warm_probe", "sleep", str(pid_file)], cwd=probe_dir,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert wait_for(lambda: pid_file.is_file() and pid_file.read_text())
            task_pid = int(pid_file.read_text())
            launcher.send_signal(getattr(signal, how))
            results[how] = launcher.wait(30)
            assert wait_for(lambda: not Path(f"/proc/{task_pid}").exists() or
                            Path(f"/proc/{task_pid}/stat").read_text().split()[2] == "Z", 10), f"{how}: task lives"
    assert results == {"SIGTERM": -signal.SIGTERM, "SIGKILL": -signal.SIGKILL}
    assert [t["task"] for t in json.loads((probe_dir / STATS_FILE).read_text())["tasks"]] == ["warm_probe"] * 2
    killed = [t for t in json.loads((probe_dir / STATS_FILE).read_text())["tasks"] if t.get("killed")]
    assert [t["killed"] for t in killed] == ["its launcher went away"]


def test_nothing_outlives_the_run_not_even_a_running_task(probe_dir, monkeypatch):
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # as the task command sets it
    pid_file = probe_dir / "task.pid"
    with warm_started(probe_dir, stages=STAGES) as warm:
        launcher = subprocess.Popen([sys.executable, "-m", "warm_probe", "sleep", str(pid_file)], cwd=probe_dir,
                                    stdout=subprocess.DEVNULL)
        assert wait_for(lambda: pid_file.is_file() and pid_file.read_text())
        launcher_dir = Path(sys.executable).parent
        assert processes_mentioning(str(launcher_dir)), "the warm parents run during the block"
    assert not launcher_dir.exists(), "the launcher and the socket are removed"
    assert launcher.wait(30) == -signal.SIGKILL, "its task was killed when the run ended, and it ends the same way"
    assert processes_mentioning(str(launcher_dir)) == []
    assert not Path(f"/proc/{pid_file.read_text()}").exists()
    assert warm.as_summary()["killed"] == ["warm_probe"]
    assert [p.name for p in probe_dir.iterdir() if p.name.startswith(STATS_FILE + ".")] == []


def test_off_or_unsupported_leaves_kfp_local_as_it_is(tmp_path):
    python = sys.executable
    with warm_started(tmp_path, enabled=False) as warm:
        assert sys.executable == python
    assert warm.as_summary() == {"enabled": False, "reason": "turned off"}


def test_parents_started_ahead_serve_the_run_when_it_sets_the_environment_they_were_started_with(probe_dir,
                                                                                                  monkeypatch):
    parents = WarmParents(stages=STAGES, env={"PROBE_RUN": "r1"}).start()
    assert "PROBE_RUN" not in os.environ, "starting them leaves this process's environment as it was"
    monkeypatch.setenv("PROBE_RUN", "r1")  # what the run sets, later
    with parents, warm_started(probe_dir, parents=parents) as warm:
        done = task(sys.executable, probe_dir, "ok")
        monkeypatch.setenv("PROBE_RUN", "r2")
        other = task(sys.executable, probe_dir, "ok")
    assert done.returncode == 0 and "[warm start]" not in done.stderr, done.stderr
    assert other.returncode == 0 and "differs from the warm parent's in PROBE_RUN" in other.stderr
    assert list(warm.as_summary()["tasks"]) == ["warm_probe"] and warm.ready_seconds is not None
    assert not parents.work.exists() and (probe_dir / "warm_start.log").is_file()


def test_parents_left_before_a_run_used_them_die_at_once_mid_import(probe_dir, monkeypatch):
    (probe_dir / "slow_stage.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.chdir(probe_dir)
    with WarmParents(stages=(("slow_stage",),)) as parents:  # a failed preflight check: the run never starts
        assert wait_for(lambda: processes_mentioning(str(parents.work)))
        started = time.monotonic()
    assert time.monotonic() - started < 5, "not waiting for their imports"
    assert processes_mentioning(str(parents.work)) == [] and not parents.work.exists()


def test_a_parent_has_plotly_validate_the_reports_template_so_a_report_task_does_not(probe_dir):
    with warm_started(probe_dir, stages=(("components.core.plots",),)) as warm:
        done = task(sys.executable, probe_dir, "plotly")
    assert done.returncode == 0 and "figure made" in done.stdout, done.stderr
    imported = warm.as_summary()["tasks"]["warm_probe"]["modules_imported"]
    assert 0 < imported < 100, f"the task imported {imported} modules itself; a fresh figure imports about 500 more"


def test_mlops_run_starts_the_parents_before_its_checks_and_counts_from_the_process_start(tmp_path, monkeypatch,
                                                                                          run_cli):
    import pipelines.doctor
    import pipelines.local

    seen = {}

    def preflight(*_args):
        process = seen["parents"].process
        seen["parents at the preflight"] = process.poll() if process else "not started"
        return []

    def run_local(cfg, **kwargs):
        seen.update(kwargs)
        return {"status": "succeeded"}

    original = WarmParents.start

    def start(self):
        seen["parents"] = self
        return original(self)

    monkeypatch.setattr(WarmParents, "start", start)
    monkeypatch.setattr(pipelines.doctor, "preflight", preflight)
    monkeypatch.setattr(pipelines.local, "run_local", run_local)
    called = time.time()
    code, _, err = run_cli(["run", "--runs-dir", str(tmp_path / "runs"), "--run-id", "r1"])
    assert code == 0, err
    parents = seen["parents"]
    assert seen["parents at the preflight"] is None, "the parents were running when the preflight checks began"
    assert seen["warm_parents"] is parents and seen["run_id"] == "r1" and seen["warm_start"] is True
    assert parents.env == pipelines.local.run_environment("r1"), "started with the run's environment"
    assert seen["started"] == pytest.approx(pipelines.local.process_started(), abs=0.05) and seen["started"] < called
    assert parents.process.poll() is not None and not parents.work.exists(), "stopped when the command ends"
    code, _, err = run_cli(["run", "--runs-dir", str(tmp_path / "runs"), "--no-warm-start"])
    assert code == 0 and seen["warm_start"] is False and seen["warm_parents"].reason_off == "turned off", err
    assert seen["parents at the preflight"] == "not started"


def test_process_started_is_when_this_process_began():
    code = ("import time; time.sleep(1.0); from pipelines.local import process_started; "
            "print(time.time() - process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parents[2]).stdout)
    assert 1.0 <= age < 10.0, age


def test_stage_0_keeps_the_first_task_and_later_stages_import_what_the_ones_before_imported(probe_dir):
    with warm_started(probe_dir, stages=(("json",), ("csv",), ("wave",))) as warm:
        assert wait_for(lambda: "stage 2 imported" in warm.log_path.read_text()), "stage 1 ready before any task"
        time.sleep(0.2)  # stage 1 reads "ready" from stage 2
        runs = [task(sys.executable, probe_dir, "modules") for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    stats = json.loads((probe_dir / STATS_FILE).read_text())
    assert [t["stage"] for t in stats["tasks"]] == [0, 2], "stage 0 imported for the first task; then the newest"
    assert [set(s["preloaded"]) for s in stats["stages"]] == [{"json"}, {"csv"}, {"json", "csv", "wave"}]


def test_ingest_imports_no_torch_so_stage_0_need_not(tmp_path):
    from pipelines.warm_start import STAGES as RUN_STAGES

    code = f"""
import dataclasses, sys
from kfp.dsl import Dataset, Markdown, Metrics
from components.core.settings import Settings
from components.ingest.component import ingest_component
from pipelines.config import DataConfig
out = {str(tmp_path)!r}
cfg = Settings(data=Settings(**dataclasses.asdict(DataConfig(source="digits"))))
ingest_component(cfg=cfg, dataset=Dataset(uri=out + "/d"), data_card=Markdown(uri=out + "/c"),
                 metrics=Metrics(uri=out + "/m"))
print("torch imported:", "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2], env={**os.environ, "_KFP_RUNTIME": "true"})
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    assert "torch" not in RUN_STAGES[0] and "torch" in RUN_STAGES[1]


def test_a_signal_that_comes_before_the_task_started_reaches_the_task(probe_dir, monkeypatch):
    (probe_dir / "slow_stage.py").write_text("import time\ntime.sleep(3)\n")
    monkeypatch.chdir(probe_dir)  # the warm parent imports slow_stage from here
    monkeypatch.setenv("_KFP_RUNTIME", "true")  # as the task command sets it
    with warm_started(probe_dir, stages=(("slow_stage",),)):
        launcher = subprocess.Popen([sys.executable, "-m", "warm_probe", "sleep", str(probe_dir / "task.pid")],
                                    cwd=probe_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # its request sent; the parent is still importing, so no task runs yet
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == -signal.SIGTERM
    tasks = json.loads((probe_dir / STATS_FILE).read_text())["tasks"]
    assert [(t["exit_code"], t.get("killed")) for t in tasks] == [(-signal.SIGTERM, None)], "forwarded, not killed"
