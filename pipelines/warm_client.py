"""The command kfp.local runs for each task of a warm-started local run (``pipelines.warm_start``).

It stands where ``python`` stood: it hands its argv, environment, working directory and standard streams
(the file descriptors themselves) to the warm parent, which forks a child that runs the task in this
process's place; it forwards the signals it gets to that child and ends as the child ended (its exit code,
or killed by the same signal), so kfp.local sees what a fresh Python would have shown it. Anything it
cannot relay (not ``python -m MODULE``, a parent that does not answer or declines) runs as before, in a
fresh Python, with one line on stderr saying why.

Standard library only and no site packages (it runs with ``python -I -S``): its start costs milliseconds.
``pipelines.warm_start`` writes this file's source, plus one call of ``relay``, into an executable launcher.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
HEADER = struct.Struct("!I")  # the request's length, sent with the standard streams attached


def open_streams() -> list[int]:
    """Which of 0, 1, 2 are open here (a closed one stays closed in the child, as in a fresh Python)."""
    out = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            pass
    return out


def cold(python: str, argv: list[str], why: str | None) -> int:
    """Run the task in a fresh Python after all: this process becomes it."""
    if why:
        print(f"[warm start] {why}: this task starts a fresh Python", file=sys.stderr, flush=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # a fresh Python starts with none blocked
    os.execv(python, [python, *argv])
    return 1  # not reached


def relay(socket_path: str, python: str, argv: list[str]) -> int:
    """Have the warm parent run ``python ARGV`` as a fork of itself; return (or die by) the child's status."""
    if len(argv) < 2 or argv[0] != "-m":
        return cold(python, argv, None)  # only ``python -m MODULE`` is relayed; anything else was never warm
    # Held until the task's pid is known, then forwarded to it: a signal that came sooner would end this launcher
    # and leave its task to be killed, not signalled.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        return cold(python, argv, f"the warm parent at {socket_path} does not answer ({exc.strerror or exc})")
    streams = open_streams()
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "streams": streams}).encode()
    sock.sendmsg([HEADER.pack(len(request))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", streams))])
    sock.sendall(request)
    replies = sock.makefile("rb")
    first = json.loads(replies.readline() or b'{"cold": "the warm parent closed the connection"}')
    if "cold" in first:
        sock.close()
        return cold(python, argv, first["cold"])
    pid = first["pid"]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    line = replies.readline()
    if not line:
        print(f"[warm start] the warm parent went away while task process {pid} ran", file=sys.stderr, flush=True)
        return 1
    status = json.loads(line)["status"]
    if os.WIFSIGNALED(status):  # die the same way, so that the shell and kfp.local see the same status
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    return os.waitstatus_to_exitcode(status)
