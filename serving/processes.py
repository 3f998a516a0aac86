"""This machine's processes and ports, as the local server and the request log see them (Linux /proc)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True  # no /proc (macOS): the signal said it exists
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False  # gone since the signal
    return "zombie" not in next((line for line in status.splitlines() if line.startswith("State:")), "")


def command_line(pid: int | None) -> list[bytes] | None:
    """The arguments ``pid`` was started with, or None when it is not (or no longer) there."""
    if not pid:
        return None
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """All descendants of pid (the Python workers of the frontend), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def terminate(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (a bind with SO_REUSEADDR fails)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free on host right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` distinct ports free on loopback right now, none of them in ``taken``."""
    found: list[int] = []
    while len(found) < count:
        port = free_port(LOOPBACK)
        if port not in taken and port not in found:
            found.append(port)
    return found
