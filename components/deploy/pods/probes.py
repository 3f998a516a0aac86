"""Probes and lifecycle hooks as the kubelet runs them: ``exec`` in the container (the engine's exec), ``httpGet``
and ``tcpSocket`` against the pod's IP, ``sleep``. A pod is ready when every container runs, its startup probe
passed and its readiness probe passed ``successThreshold`` times in a row; ``failureThreshold`` failures of a
liveness or startup probe restart the container, as the kubelet does."""

from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from components.deploy.pods.manifests import PodError

PROBE_KINDS = ("startupProbe", "readinessProbe", "livenessProbe")
LOG_TAIL_LINES = 30
POLL_S = 0.5  # how often container states are read while probes are not due


class PodNotReady(PodError):
    """The pod's containers did not all become ready; the message holds the probes' answers and the logs."""


@dataclass
class ProbeResult:
    container: str
    kind: str  # startupProbe, readinessProbe, livenessProbe, preStop, postStart
    action: str  # what ran, e.g. "exec python ...", "httpGet http://172.18.0.2:8080/healthz"
    success: bool
    detail: str  # exit code and output, HTTP status, or the error
    at: float = field(default_factory=time.time)


def _port(pod, container: Mapping[str, Any], ref: int | str) -> int:
    for p in container.get("ports") or []:  # a probe's named port is its own container's first
        if p.get("name") == ref:
            return int(p["containerPort"])
    return pod.port(ref)


def run_handler(pod, container: Mapping[str, Any], handler: Mapping[str, Any], timeout_s: float,
                kind: str = "") -> ProbeResult:
    """Run one probe or hook handler against ``container`` of ``pod``."""
    name = container["name"]
    if "exec" in handler:
        command = handler["exec"]["command"]
        result = pod.exec(name, command, timeout_s=timeout_s)
        detail = "timed out" if result.timed_out else f"exit {result.exit_code}: {result.output.strip()[-500:]}"
        return ProbeResult(name, kind, "exec " + " ".join(command), result.exit_code == 0, detail)
    if "httpGet" in handler:
        spec = handler["httpGet"]
        host, port = spec.get("host") or pod.ip, _port(pod, container, spec["port"])
        path, scheme = spec.get("path", "/"), spec.get("scheme", "HTTP").upper()
        action = f"httpGet {scheme.lower()}://{host}:{port}{path}"
        connection_type = http.client.HTTPSConnection if scheme == "HTTPS" else http.client.HTTPConnection
        connection = connection_type(host, port, timeout=timeout_s)
        try:
            connection.request("GET", path, headers={h["name"]: h["value"] for h in spec.get("httpHeaders") or []})
            status = connection.getresponse().status
        except OSError as err:
            return ProbeResult(name, kind, action, False, f"{type(err).__name__}: {err}")
        finally:
            connection.close()
        return ProbeResult(name, kind, action, 200 <= status < 400, f"HTTP {status}")
    if "tcpSocket" in handler:
        spec = handler["tcpSocket"]
        host, port = spec.get("host") or pod.ip, _port(pod, container, spec["port"])
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as err:
            return ProbeResult(name, kind, f"tcpSocket {host}:{port}", False, f"{type(err).__name__}: {err}")
        return ProbeResult(name, kind, f"tcpSocket {host}:{port}", True, "connected")
    if "sleep" in handler:
        seconds = min(float(handler["sleep"]["seconds"]), timeout_s)
        time.sleep(seconds)
        return ProbeResult(name, kind, f"sleep {seconds:g}", True, "slept")
    raise PodError(f"container {name!r}: handler {sorted(handler)} is not supported locally (exec, httpGet, "
                   "tcpSocket, sleep)")


@dataclass
class _Prober:
    kind: str
    probe: dict
    next_due: float
    successes: int = 0
    failures: int = 0

    def setting(self, key: str) -> float:
        defaults = {"initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                    "failureThreshold": 3}
        return float(self.probe.get(key, defaults[key]))


class _Container:
    """One app container's probing state: started, ready, restarts."""

    def __init__(self, pod, name: str, max_restarts: int):
        self.pod, self.name, self.spec, self.max_restarts = pod, name, pod.spec_of(name), max_restarts
        self.restart_count, self.our_restarts, self.started_at_iso = 0, 0, None
        self.reset(pod.started_at.get(name, time.monotonic()))

    def reset(self, start: float) -> None:
        self.start = start
        self.started = "startupProbe" not in self.spec
        self.ready = False
        self.probers = {kind: _Prober(kind, self.spec[kind], start + float(self.spec[kind].get("initialDelaySeconds", 0)))
                        for kind in PROBE_KINDS if kind in self.spec}

    def refresh(self) -> bool:
        """Read the container's state; False while it does not run. Raises when it will not come back."""
        attrs = self.pod.inspect(self.name)
        state, restarts = attrs["State"], attrs.get("RestartCount", 0) + self.our_restarts
        if restarts > self.max_restarts:
            raise PodNotReady(f"container {self.name} of pod {self.pod.name} restarted {restarts} times "
                              f"(CrashLoopBackOff); last lines:\n{self.pod.logs(self.name, LOG_TAIL_LINES)}")
        if state.get("StartedAt") != self.started_at_iso or restarts != self.restart_count:
            if self.started_at_iso is not None:  # a restart: probing starts over, as for a new container
                self.reset(time.monotonic())
            self.started_at_iso, self.restart_count = state.get("StartedAt"), restarts
        if state["Running"]:
            return True
        policy = self.pod.spec.get("restartPolicy", "Always")
        if policy == "Never" or (policy == "OnFailure" and state["ExitCode"] == 0):
            raise PodNotReady(f"container {self.name} of pod {self.pod.name} exited with {state['ExitCode']} and "
                              f"restartPolicy {policy} keeps it down; last lines:\n"
                              f"{self.pod.logs(self.name, LOG_TAIL_LINES)}")
        self.ready = False
        return False

    def step(self, now: float) -> None:
        """Run the probes that are due."""
        kinds = ["startupProbe"] if not self.started else ["readinessProbe", "livenessProbe"]
        for kind in kinds:
            prober = self.probers.get(kind)
            if prober is None or prober.next_due > now:
                continue
            result = run_handler(self.pod, self.spec, prober.probe, prober.setting("timeoutSeconds"), kind)
            self.pod.probe_results.append(result)
            prober.next_due = time.monotonic() + prober.setting("periodSeconds")
            if result.success:
                prober.successes, prober.failures = prober.successes + 1, 0
            else:
                prober.successes, prober.failures = 0, prober.failures + 1
            if kind == "startupProbe" and result.success:
                self.started = True
                for later in ("readinessProbe", "livenessProbe"):
                    if later in self.probers:
                        self.probers[later].next_due = max(self.probers[later].next_due, time.monotonic())
            elif kind == "readinessProbe":
                if prober.successes >= prober.setting("successThreshold"):
                    self.ready = True
                elif prober.failures >= prober.setting("failureThreshold"):
                    self.ready = False
            if kind in ("startupProbe", "livenessProbe") and prober.failures >= prober.setting("failureThreshold"):
                self.restart(f"{kind} failed {prober.failures} times: {result.detail}")
                return
        if "readinessProbe" not in self.probers:
            self.ready = self.started

    def restart(self, why: str) -> None:
        grace = self.pod.spec.get("terminationGracePeriodSeconds", 30)
        self.pod.probe_results.append(ProbeResult(self.name, "restart", "restart", False, why))
        self.pod.container(self.name).restart(timeout=grace)
        self.our_restarts += 1

    def next_due(self) -> float:
        return min((p.next_due for p in self.probers.values()), default=time.monotonic() + POLL_S)

    def explain(self) -> str:
        last = {}
        for r in self.pod.probe_results:
            if r.container == self.name:
                last[r.kind] = r
        answers = "; ".join(f"{k}: {r.action} -> {r.detail}" for k, r in last.items()) or "no probe ran yet"
        return (f"container {self.name}: started={self.started} ready={self.ready} restarts={self.restart_count}; "
                f"{answers}\nlast lines:\n{self.pod.logs(self.name, LOG_TAIL_LINES)}")


def wait_ready(pod, timeout_s: float, max_restarts: int = 2) -> list[ProbeResult]:
    deadline = time.monotonic() + timeout_s
    containers = [_Container(pod, name, max_restarts) for name in pod.containers]
    while True:
        for c in containers:
            if c.refresh():
                c.step(time.monotonic())
        if all(c.ready for c in containers):
            return pod.probe_results
        now = time.monotonic()
        if now >= deadline:
            waiting = [c.explain() for c in containers if not c.ready]
            raise PodNotReady(f"pod {pod.name} not ready after {timeout_s:.0f} s:\n" + "\n".join(waiting))
        time.sleep(max(0.05, min(POLL_S, min(c.next_due() for c in containers) - now, deadline - now)))


def probe_once(pod) -> list[ProbeResult]:
    results = []
    for name in pod.containers:
        spec = pod.spec_of(name)
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in spec:
                results.append(run_handler(pod, spec, spec[kind], float(spec[kind].get("timeoutSeconds", 1)), kind))
    pod.probe_results.extend(results)
    return results
