"""The run's side of the warm start (``pipelines.warm_start``): its warm parents started, serving kfp.local's
tasks while the run lasts (``warm_started``), stopped, and what they did (``WarmStart``, into summary.json)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from pipelines import warm_client
from pipelines.warm_start import READY_TIMEOUT_S, STAGES, STATS_FILE, STOP_TIMEOUT_S, supported


class WarmStart:
    """What a run's warm start did (``as_summary`` goes into summary.json)."""

    def __init__(self, reason_off: str | None = None):
        self.reason_off = reason_off
        self.stats: dict[str, Any] = {}
        self.ready_seconds: float | None = None  # from the parents' start until the run found them listening
        self.log_path: Path | None = None  # the parents' log while they run

    def as_summary(self) -> dict[str, Any]:
        if self.reason_off:
            return {"enabled": False, "reason": self.reason_off}
        tasks = self.stats.get("tasks", [])
        return {"enabled": True, "ready_seconds": self.ready_seconds,
                "tasks": {t["task"]: {"stage": t["stage"], "imported_itself": t.get("imported_itself"),
                                      "modules_imported": t.get("modules_imported")} for t in tasks},
                "stage_import_seconds": [s["import_seconds"] for s in self.stats.get("stages", [])],
                "killed": [t["task"] for t in tasks if t.get("killed")]}


def launcher_source(socket_path: str, python: str) -> str:
    """An executable Python file: ``pipelines.warm_client`` plus one call of its ``relay``."""
    source = Path(warm_client.__file__).read_text()
    return (f"#!{python} -IS\n{source}\n\nsys.exit(relay({socket_path!r}, {python!r}, sys.argv[1:]))\n")


class WarmParents:
    """The warm parents of one run, started before the run needs them: ``mlops run`` starts them first, so that their
    imports overlap its preflight checks and the pipeline's compile; ``warm_started`` then serves the run's tasks
    from them and stops them. ``env``: what the run will set in its environment (its tasks must see the parents'
    environment, else they start fresh Pythons). Their log and statistics live in a temporary directory until
    ``stop`` moves them into the run's. As a context manager it kills them on leaving, unless stopped already: a run
    that never started (a failed preflight check) does not wait for their imports."""

    def __init__(self, enabled: bool = True, stages: tuple[tuple[str, ...], ...] = STAGES,
                 env: dict[str, str] | None = None):
        self.reason_off = None if enabled else "turned off"
        self.reason_off = self.reason_off or supported()
        self.stages, self.env = stages, env or {}
        self.process = self.work = None
        self.python = sys.executable

    def __enter__(self) -> WarmParents:
        return self.start()

    def __exit__(self, *_exc) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the later stages die with it
            self.process.wait()
        self._remove_work()

    def start(self) -> WarmParents:
        import subprocess
        import tempfile

        if self.reason_off or self.process is not None:
            return self
        self.work = Path(tempfile.mkdtemp(prefix="kfp-mlops-warm-"))  # a short path: Unix socket paths are limited
        self.socket_path, self.launcher = self.work / "parent.sock", self.work / "python"
        self.stats_path, self.log_path = self.work / STATS_FILE, self.work / "warm_start.log"
        self.launcher.write_text(launcher_source(str(self.socket_path), self.python))
        self.launcher.chmod(0o700)
        before = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)  # through putenv: the parent inherits the C environment, as the tasks will
        try:
            self.started = time.perf_counter()
            with open(self.log_path, "ab") as log:
                # Its own session: Ctrl-C reaches each task once, through its launcher, as it reaches a fresh Python.
                self.process = subprocess.Popen(
                    [self.python, "-m", "pipelines.warm_start", str(self.socket_path), str(self.stats_path),
                     json.dumps(self.stages)],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        return self

    def wait_until_listening(self) -> bool:
        while (not self.socket_path.exists() and self.process.poll() is None
               and time.perf_counter() - self.started < READY_TIMEOUT_S):
            time.sleep(0.01)
        return self.socket_path.exists()

    def stop(self, stats_dir: Path) -> dict[str, Any]:
        """Stop them (they kill what still runs, then write their statistics), move their log and statistics into
        ``stats_dir``, and return the statistics."""
        import shutil
        import subprocess

        self.process.stdin.close()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        stats: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            stats = json.loads(self.stats_path.read_text())
            shutil.move(self.stats_path, Path(stats_dir) / STATS_FILE)
        with contextlib.suppress(OSError), open(Path(stats_dir) / self.log_path.name, "ab") as log:
            log.write(self.log_path.read_bytes())
        self._remove_work()
        return stats

    def _remove_work(self) -> None:
        import shutil

        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def warm_started(stats_dir: Path, enabled: bool = True, stages: tuple[tuple[str, ...], ...] = STAGES,
                 parents: WarmParents | None = None) -> Iterator[WarmStart]:
    """While the block runs, kfp.local's tasks start as forks of a warm parent (see the module doc).

    ``parents``: already started (``WarmParents``), else started here, with ``stages`` (what they import,
    ``STAGES``). ``stats_dir`` gets the parents' log (``warm_start.log``) and, once stopped, ``warm_start.json``.
    When warm start is off or cannot start, the block runs with kfp.local's plain subprocesses and the result says
    why."""
    parents = parents if parents is not None else WarmParents(enabled, stages).start()
    result = WarmStart(parents.reason_off)
    if parents.reason_off:
        yield result
        return
    result.log_path = parents.log_path
    try:
        if not parents.wait_until_listening():  # the run goes on as before, and says why
            result.reason_off = (f"the warm parent did not start (exit status {parents.process.poll()}; see "
                                 f"{Path(stats_dir) / parents.log_path.name})")
            print(f"[warm start] off: {result.reason_off}", flush=True)
            yield result
            return
        result.ready_seconds = round(time.perf_counter() - parents.started, 3)
        sys.executable = str(parents.launcher)  # kfp.local writes sys.executable into each task's command
        try:
            yield result
        finally:
            sys.executable = parents.python
    finally:
        result.stats = parents.stop(stats_dir)
