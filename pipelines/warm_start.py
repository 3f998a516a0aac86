"""Warm start for the steps of a local run: each kfp.local task is a fork of a pre-imported parent.

kfp.local's ``SubprocessRunner`` starts every task as ``sh -c '... python -m kfp.dsl.executor_main ...'``:
a fresh Python that imports kfp, numpy, torch, pandas, scikit-learn and Evidently before the step starts
its clock, seconds per task. For the duration of a run, ``pipelines.warm_parents`` starts warm parents
(``python -m pipelines.warm_start``; ``mlops run`` first thing, so that their imports overlap its preflight checks
and the pipeline's compile) that import those once (in stages: ``STAGES``), and points kfp.local's
interpreter (``sys.executable``, which kfp.local writes into that command) at a launcher of
``pipelines.warm_client``. kfp.local runs its task command unchanged, the launcher where ``python`` stood:
the launcher hands argv, environment, working directory and the standard streams themselves to a warm
parent, which forks; the child takes them over and runs ``-m kfp.dsl.executor_main`` as ``python -m``
would, and ends as Python ends (exit status, traceback, non-daemon threads joined, atexit handlers, open
files flushed), short of tearing down the modules it inherited. The launcher forwards signals to the child
and ends as the child did.

What a fork cannot give a task, it does not get: a task whose environment differs from the parent's
(other than the shell's own variables) runs in a fresh Python, and so does anything but ``python -m``.
The parents run no step code and no torch operation: they only import (and have plotly validate the reports'
template, which a fresh Python does at its first figure, importing some 500 modules: ``AFTER_IMPORT``). They serve
one run and stop with
it, killing any task still running; a task whose launcher dies is killed, and so is every task when its
parent dies. A cluster sees none of this: the compiled pipeline is the same. Written here, not taken from a
library: the prefork servers (gunicorn, Instagram's uWSGI with ``gc.freeze``) fork for requests, not for
a command line's process with its streams, signals and exit status, which is what kfp.local expects.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import warm_client

# What the warm parents import, in stages, in the order the steps first need them: modules whose import starts
# no Python thread and runs no computation (and not the module a task runs with -m: what kfp.dsl.executor_main
# imports, not itself, which runpy would warn about). Stage 0 imports what the first step needs and takes tasks
# until the next stage is ready and it has started one. Stage 1 is forked at once and imports what the second step
# needs beside it, so that on two cores neither of the first two steps waits for the other's imports (ingest needs
# no torch, pretrain no scikit-learn); each later stage is forked by the one before once that is ready, imports its
# modules and those of the stages before it (the ones it lacks), and takes the tasks that come after, so that no
# later task waits for an import. A module missing here is imported by the task that needs it, as before: each task's
# entry in the run's warm_start.json lists what it imported itself.
STAGES = (
    ("kfp.dsl.executor", "kfp.dsl.kfp_config", "kfp.dsl.utils", "components.core.settings", "numpy", "pandas",
     "sklearn.datasets", "PIL.Image", "components.core.cost", "components.core.data", "components.core.features",
     "components.ingest.ingest"),
    ("kfp.dsl.executor", "kfp.dsl.kfp_config", "kfp.dsl.utils", "components.core.settings", "numpy", "torch",
     "safetensors.torch", "components.core.cost", "components.core.models"),
    ("torch._dynamo", "components.train.loops", "components.pretrain.pretrain", "components.finetune.finetune",
     "scipy.stats", "components.evaluate.gate", "components.evaluate.report", "components.privacy.privacy",
     "components.robustness.robustness", "components.record.record", "requests", "components.deploy.component",
     "components.deploy.local", "serving.server", "components.monitor.monitor", "components.monitor.drift",
     "evidently.presets", "markdown_it", "components.core.plots"),
)


def _reports_plotly_template() -> None:
    import plotly.graph_objects as go

    from components.core.plots import TEMPLATE

    go.Layout(template=TEMPLATE)


# Libraries that defer imports past their own import, to their first use, and what a parent does once it imported them
# to have those imports done too: plotly validates a figure's template at its first use, some 500 modules and 0.5 s
# in each step that writes a report, after its clock stopped.
AFTER_IMPORT = {"components.core.plots": _reports_plotly_template}
SHELL_VARIABLES = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})  # what ``sh`` adds to a task's environment
RUNTIME_ENV = {"_KFP_RUNTIME": "true"}  # kfp's runtime import path, as the task command sets it
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
STATS_FILE = "warm_start.json"


def supported() -> str | None:
    """Why this machine cannot warm-start tasks, or None."""
    if not hasattr(os, "fork") or not hasattr(os, "pidfd_open") or not hasattr(socket, "AF_UNIX"):
        return "needs Linux (fork, pidfd_open, Unix sockets)"
    return None


class TaskToRun:
    """In a forked child: the request it runs in its launcher's place."""

    def __init__(self, request: dict[str, Any], log_fd: int, preloaded: frozenset[str]):
        self.request, self.log_fd, self.preloaded = request, log_fd, preloaded
        self.preloaded_packages = frozenset(name.partition(".")[0] for name in preloaded)

    def run(self) -> None:
        """Run ``python -m MODULE ARGS`` here, as a fresh Python in the launcher's place would, and end this
        process as that Python would end: exit status, traceback, non-daemon threads joined, atexit handlers run,
        open files and the standard streams flushed. Then ``os._exit``, as multiprocessing's forked workers end:
        tearing down the modules inherited from the parent would take longer than the rest of the exit."""
        import atexit
        import runpy

        request = self.request
        atexit.register(self.report_imports)  # registered first, so it runs after the task's own handlers
        sys.argv = ["-m", *request["argv"][2:]]  # runpy puts the module's file in argv[0], as -m does
        sys.path[0] = request["cwd"]
        code, interrupted = 0, False
        try:
            runpy.run_module(request["argv"][1], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException as exc:  # noqa: BLE001 - reported as Python reports an uncaught exception
            sys.excepthook(type(exc), exc, exc.__traceback__)
            code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
        _finish(code, interrupted)

    def report_imports(self) -> None:
        """One line in the parent's log: the top-level packages this task imported itself (missing from STAGES), and
        how many modules in all (submodules of preloaded packages too: a library's imports deferred to first use)."""
        imported = sorted({name.partition(".")[0] for name in sys.modules} - self.preloaded_packages)
        count = len(set(sys.modules) - self.preloaded)
        line = json.dumps({"pid": os.getpid(), "imported": imported, "modules": count}) + "\n"
        with contextlib.suppress(OSError):
            os.write(self.log_fd, line.encode())


class WarmParent:
    """A warm parent: imports its stage, then forks one child per request on its socket until its stdin closes.

    Stage 0 is the process the run started; each stage forks the next (``successor``; stage 0 before its own
    imports), which imports its modules while this one imports or serves, then says it is ready; this one hands
    the listening socket over to it once ready and (stage 0) once it started the first task (``_hand_over``). A
    stage that has handed over keeps its running tasks until they end. Stopping runs down the chain: each stage
    kills its running tasks, writes its part of the statistics, stops its successor and waits for it; the first
    stage then merges the parts."""

    def __init__(self, socket_path: str, stats_path: str, stages: tuple[tuple[str, ...], ...] = STAGES):
        self.socket_path, self.stats_path, self.stages = socket_path, stats_path, stages
        self.stage = 0
        self.env = dict(os.environ)
        self.tasks: dict[int, dict[str, Any]] = {}  # pid -> its record
        self.running: dict[int, tuple[socket.socket, int]] = {}  # pid -> (its launcher's connection, pidfd)
        self.preloaded: list[str] = []
        self.import_seconds = 0.0
        self.successor: tuple[int, int] | None = None  # (pid, read end of its "ready" pipe)
        self.accepting = True
        self.successor_ready = False
        self.let_go: int | None = None  # the pipe that lets the successor take tasks (_hand_over)
        self.held_back: int | None = None  # in a successor: the other end, read before it accepts a connection
        self.stopping = False

    # -- a warm parent -----------------------------------------------------------------------------------
    def serve(self) -> TaskToRun | None:
        """Serve until told to stop (None), or, in a forked child, return the task it is to run."""
        import ctypes  # noqa: F401 - every fork calls prctl through it (_die_with)

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launchers forward Ctrl-C to their tasks
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket_path + ".new")
        self.listener.listen(64)
        self.listener.setblocking(False)  # two stages may both see a connection; one accepts it
        os.rename(self.socket_path + ".new", self.socket_path)  # appears only once it accepts connections
        self._open_loop()
        if len(self.stages) > 1:  # the first successor imports beside this stage, not after it (see STAGES)
            successor = self._fork_successor()
            if successor is not None:
                return successor._loop()
        self._import(self.stages[0])
        return self._loop()

    def _open_loop(self) -> None:
        self.wakeup = os.pipe()  # a signal wakes the loop through it
        os.set_blocking(self.wakeup[1], False)
        signal.set_wakeup_fd(self.wakeup[1])
        signal.signal(signal.SIGTERM, self._stop_on_signal)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
        self.selector.register(self.wakeup[0], selectors.EVENT_READ, "wakeup")

    def _loop(self) -> TaskToRun | None:
        if self.held_back is None:
            self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        else:  # a successor takes tasks only once the stage before hands them over, in order
            self.accepting = False
            self.selector.register(self.held_back, selectors.EVENT_READ, "go")
        if 0 < self.stage < len(self.stages) - 1:
            successor = self._fork_successor()
            if successor is not None:  # this process is the successor, its stage imported
                return successor._loop()
        while not self.stopping:
            for key, _ in self.selector.select():
                task = self._handle(key.data)
                if task is not None:
                    return task
        self._shut_down()
        return None

    def _fork_successor(self) -> WarmParent | None:
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        forker = os.getpid()
        pid = os.fork()
        if pid:
            os.close(ready_write)
            os.close(go_read)
            self.let_go = go_write
            self.successor = (pid, ready_read)
            self.selector.register(ready_read, selectors.EVENT_READ, "successor")
            return None
        # The successor: none of this stage's tasks, its own loop; it imports, then says so.
        _die_with(forker)
        os.close(ready_read)
        os.close(go_write)
        self._close_loop()
        self.held_back = go_read
        self.stage += 1
        self.tasks, self.running, self.successor, self.successor_ready, self.accepting = {}, {}, None, False, True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped while importing: nothing to clean up yet
        earlier = () if self.stage == 1 else tuple(name for stage in self.stages[:self.stage] for name in stage)
        self._import(self.stages[self.stage] + earlier)  # stage 1 has nothing of stage 0's: it forked before
        self._open_loop()
        os.write(ready_write, b"ready")
        os.close(ready_write)
        return self

    def _close_loop(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in self.wakeup:
            os.close(fd)
        for conn, pidfd in self.running.values():
            os.close(pidfd)
            conn.close()
        if self.successor:
            os.close(self.successor[1])
        for fd in (self.let_go, self.held_back):
            if fd is not None:
                os.close(fd)
        self.let_go = self.held_back = None
        self.selector.close()

    def _stop_on_signal(self, _signum, _frame) -> None:
        self.stopping = True

    def _import(self, names) -> None:
        import gc

        started = time.perf_counter()
        for name in names:
            try:
                if name in self.preloaded:
                    continue
                importlib.import_module(name)
                if name in AFTER_IMPORT:
                    AFTER_IMPORT[name]()
                self.preloaded.append(name)
            except Exception as exc:  # noqa: BLE001 - a task that needs it will import it and say what is wrong
                print(f"warm start: stage {self.stage} did not import {name}: {exc!r}", flush=True)
        # What exists now lives as long as the parent: out of the collector's sight, so that a child's collections
        # and exit do not walk (and copy, page by page) the whole inherited heap.
        gc.freeze()
        self.import_seconds += time.perf_counter() - started
        print(f"warm start: stage {self.stage} imported {len(names)} modules in "
              f"{time.perf_counter() - started:.2f} s", flush=True)

    def _handle(self, what: Any) -> TaskToRun | None:
        if what == "accept":
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:  # the other stage took it
                return None
            return self._start(conn)
        if what == "control":
            if not os.read(sys.stdin.fileno(), 4096):
                self.stopping = True
            return None
        if what == "wakeup":
            os.read(self.wakeup[0], 512)
            return None
        if what == "go":  # the stage before hands its tasks over, or is gone
            self.selector.unregister(self.held_back)
            os.close(self.held_back)
            self.held_back, self.accepting = None, True
            self.selector.register(self.listener, selectors.EVENT_READ, "accept")
            self._hand_over()  # to its own successor, when that is ready already
            return None
        if what == "successor":  # ready (it takes the next tasks), or gone (this stage keeps serving)
            if os.read(self.successor[1], 16):
                self.successor_ready = True
                self._hand_over()
            else:
                self.selector.unregister(self.successor[1])
            return None
        kind, pid = what
        if pid not in self.running:  # both of its events came at once, and it is reaped already
            return None
        if kind == "exited":
            self._reap(pid)
        else:  # the launcher's connection: readable only when it went away, since it sends nothing more
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.tasks[pid]["killed"] = "its launcher went away"
            self.selector.unregister(self.running[pid][0])
        return None

    def _hand_over(self) -> None:
        """Leave the next tasks to a ready successor; stage 0 first starts one (it imported for the first step)."""
        if self.successor_ready and self.accepting and (self.stage or self.tasks):
            self.selector.unregister(self.listener)
            self.accepting = False
            if self.let_go is not None:
                os.write(self.let_go, b"go")
                os.close(self.let_go)
                self.let_go = None

    def _read_request(self, conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        conn.settimeout(REQUEST_TIMEOUT_S)
        data, fds, _, _ = socket.recv_fds(conn, warm_client.HEADER.size, 3)
        try:
            while len(data) < warm_client.HEADER.size:
                more = conn.recv(warm_client.HEADER.size - len(data))
                if not more:
                    raise ConnectionError("the launcher closed the connection")
                data += more
            (length,) = warm_client.HEADER.unpack(data)
            body = b""
            while len(body) < length:
                more = conn.recv(min(1 << 20, length - len(body)))
                if not more:
                    raise ConnectionError("the launcher closed the connection")
                body += more
            return json.loads(body), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def _why_not(self, request: dict[str, Any], fds: list[int]) -> str | None:
        if len(fds) != len(request.get("streams", ())):
            return "the standard streams did not arrive"
        env = request["env"]
        differ = sorted(k for k in set(env) ^ set(self.env) | {k for k in env if self.env.get(k, env[k]) != env[k]}
                        if k not in SHELL_VARIABLES)
        if differ:  # modules imported here read the parent's environment; this task's differs
            return "its environment differs from the warm parent's in " + ", ".join(differ[:10])
        if threading_count() > 1:
            return "the warm parent has started a Python thread, which a fork would not carry over"
        return None

    def _start(self, conn: socket.socket) -> TaskToRun | None:
        try:
            request, fds = self._read_request(conn)
        except (OSError, ValueError, ConnectionError) as exc:
            print(f"warm start: a bad request ({exc!r})", flush=True)
            conn.close()
            return None
        why = self._why_not(request, fds)
        if why:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall((json.dumps({"cold": why}) + "\n").encode())
            conn.close()
            print(f"warm start: declined {' '.join(request['argv'][:2])}: {why}", flush=True)
            return None
        forker = os.getpid()
        # Blocked across the fork: a signal the launcher forwards at once waits until the child has a fresh Python's
        # handlers (this process's would swallow it).
        signal.pthread_sigmask(signal.SIG_BLOCK, warm_client.FORWARDED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            _die_with(forker)
            return self._become_task(request, fds, conn)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, warm_client.FORWARDED_SIGNALS)
        for fd in fds:
            os.close(fd)  # the child has them; holding them here would keep kfp.local's pipe open
        pidfd = os.pidfd_open(pid)
        argv = request["argv"]
        step = argv[argv.index("--function_to_execute") + 1] if "--function_to_execute" in argv[:-1] else argv[1]
        self.tasks[pid] = {"task": step, "pid": pid, "stage": self.stage, "started": time.time()}
        self.running[pid] = (conn, pidfd)
        conn.settimeout(None)
        conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
        self.selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("launcher", pid))
        self._hand_over()
        return None

    def _reap(self, pid: int) -> None:
        conn, pidfd = self.running.pop(pid)
        _, status = os.waitpid(pid, 0)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        record = self.tasks[pid]
        record.update({"seconds": round(time.time() - record.pop("started"), 3),
                       "exit_code": os.waitstatus_to_exitcode(status)})
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps({"status": status}) + "\n").encode())
        conn.close()

    def _shut_down(self) -> None:
        """Kill this stage's running tasks, stop the successor, and write this stage's statistics (stage 0:
        all stages', merged into the run's warm_start.json)."""
        for pid in list(self.running):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.tasks[pid].setdefault("killed", "the run ended while it ran")
            self._reap(pid)
        self.listener.close()
        stage_file = Path(f"{self.stats_path}.stage{self.stage}")
        stage_file.write_text(json.dumps({"stage": self.stage, "preloaded": self.preloaded,
                                          "import_seconds": round(self.import_seconds, 3),
                                          "tasks": list(self.tasks.values())}))
        if self.successor:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.successor[0], signal.SIGTERM)
            os.waitpid(self.successor[0], 0)
        if self.stage:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        imports = {}
        with contextlib.suppress(OSError), open(self.stats_path + ".tasks") as lines:
            for line in lines:
                entry = json.loads(line)
                imports[entry["pid"]] = entry
        stages, tasks = [], []
        for index in range(len(self.stages)):
            path = Path(f"{self.stats_path}.stage{index}")
            if path.is_file():
                part = json.loads(path.read_text())
                path.unlink()
                stages.append({k: part[k] for k in ("stage", "preloaded", "import_seconds")})
                tasks += [{**t, "imported_itself": imports.get(t["pid"], {}).get("imported"),
                           "modules_imported": imports.get(t["pid"], {}).get("modules")} for t in part["tasks"]]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.stats_path + ".tasks")
        Path(self.stats_path).write_text(json.dumps({"stages": stages, "tasks": tasks}, indent=1) + "\n")

    # -- a task --------------------------------------------------------------------------------------------
    def _become_task(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> TaskToRun:
        """In the child: drop the parent's sockets, take over the launcher's streams, environment and
        directory, and restore what a fresh Python starts with."""
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._close_loop()
        self.listener.close()
        conn.close()
        log_fd = os.open(self.stats_path + ".tasks", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for target, fd in zip(request["streams"], fds):
            os.dup2(fd, target)
            os.close(fd)
        for missing in {0, 1, 2} - set(request["streams"]):
            with contextlib.suppress(OSError):
                os.close(missing)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _fresh_streams()
        if "numpy" in sys.modules:  # a fresh Python seeds numpy's global generator from the OS, not the parent's
            sys.modules["numpy"].random.seed()
        task = TaskToRun(request, log_fd, frozenset(sys.modules))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, warm_client.FORWARDED_SIGNALS)  # what came meanwhile: delivered now
        return task


def _die_with(parent: int) -> None:
    """In a fork: die when ``parent`` (the process that forked) dies, so that nothing outlives the run."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl
        os._exit(137)


def _exit_code(code: Any) -> int:
    """The exit status of ``SystemExit(code)``, as the interpreter makes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def _finish(code: int, interrupted: bool) -> None:
    """End a task's process the way the interpreter ends, short of tearing its modules down."""
    import atexit
    import gc
    import io
    import threading

    threading._shutdown()  # noqa: SLF001 - the interpreter's own wait for non-daemon threads
    atexit._run_exitfuncs()  # noqa: SLF001 - the interpreter's own atexit call
    for obj in gc.get_objects():  # what the task created (the parent's modules are frozen out of this)
        if isinstance(obj, (io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)):
            with contextlib.suppress(Exception):
                if not obj.closed:
                    obj.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - as the interpreter: a stream that cannot be flushed makes exit 120
            code = code or 120
    if interrupted:  # an uncaught KeyboardInterrupt ends Python by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def threading_count() -> int:
    threading = sys.modules.get("threading")
    return threading.active_count() if threading else 1


def _fresh_streams() -> None:
    """sys.stdin/stdout/stderr on the new 0, 1, 2, buffered as Python buffers them at start."""
    import io

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        try:
            os.fstat(fd)
        except OSError:
            setattr(sys, name, None)
            setattr(sys, f"__{name}__", None)
            continue
        raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
        unbuffered = fd != 0 and isinstance(getattr(old, "buffer", None), io.FileIO)  # python -u, PYTHONUNBUFFERED
        buffered = raw if unbuffered else io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(buffered, encoding=getattr(old, "encoding", None),
                                  errors=getattr(old, "errors", None),
                                  line_buffering=fd == 2 or raw.isatty(),
                                  write_through=bool(getattr(old, "write_through", False)))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def main(argv: list[str]) -> None:
    # The environment is the run's as every task gets it: the process's own (libraries may set variables that
    # os.environ does not show, readline's COLUMNS and LINES for one), plus what the task command sets.
    os.environ.update(RUNTIME_ENV)
    stages = tuple(tuple(stage) for stage in json.loads(argv[2])) if len(argv) > 2 else STAGES
    task = WarmParent(argv[0], argv[1], stages).serve()
    if task is not None:  # a forked child, back at the top level: run the task as ``python -m`` would
        task.run()  # does not return
    sys.stdout.flush()
    os._exit(0)  # a warm parent has nothing to finalize: tearing down its modules would only take seconds


if __name__ == "__main__":
    main(sys.argv[1:])
