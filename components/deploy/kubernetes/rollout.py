"""Watching a rollout the way ``kubectl rollout status`` does, and finding the revision to roll back to."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from components.deploy.kubernetes.api import KubernetesApi, api_error, api_exception_type
from components.deploy.kubernetes.release import MODEL_VERSION_LABEL, REVISION, UNRELEASED

# Waiting reasons that no amount of waiting fixes (CrashLoopBackOff counts after some restarts).
HOPELESS_WAITING = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                    "CreateContainerError")


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(deployment: dict, generation: int) -> RolloutState:
    """Where the rollout of ``generation`` stands, by the rules of ``kubectl rollout status``."""
    status, spec = deployment.get("status", {}), deployment["spec"]
    if status.get("observedGeneration", 0) < generation:
        return RolloutState(False, False, f"waiting for the controller to see generation {generation}")
    progressing = next((c for c in status.get("conditions", []) if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return RolloutState(False, True, f"ProgressDeadlineExceeded: {progressing.get('message', '')}")
    want = spec.get("replicas", 1)
    updated, total = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < want:
        return RolloutState(False, False, f"{updated} of {want} new replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{total - updated} old replicas pending termination")
    if available < updated:
        return RolloutState(False, False, f"{available} of {updated} updated replicas available")
    return RolloutState(True, False, f"{available} of {want} replicas available")


def pod_problems(pods: list[dict], crashloop_restarts: int = 3) -> list[str]:
    """Why pods of a rollout will not become ready however long one waits (empty: keep waiting)."""
    problems = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status", {})
        kinds = [("init container", s) for s in status.get("initContainerStatuses", [])]
        kinds += [("container", s) for s in status.get("containerStatuses", [])]
        for kind, cs in kinds:
            waiting = cs.get("state", {}).get("waiting") or {}
            reason, restarts = waiting.get("reason", ""), cs.get("restartCount", 0)
            hopeless = reason in HOPELESS_WAITING or (reason == "CrashLoopBackOff" and restarts >= crashloop_restarts)
            if not hopeless:
                continue
            last = (cs.get("lastState") or {}).get("terminated") or {}
            detail = waiting.get("message") or ""
            if last:
                detail = f"last exit {last.get('exitCode')} ({last.get('reason', '')}): {last.get('message', '').strip()}"
            problems.append(f"pod {name}: {kind} {cs['name']} {reason} after {restarts} restarts; {detail}"[:600])
    return problems


def wait_for_rollout(api: KubernetesApi, namespace: str, name: str, generation: int, pod_selector: str | None,
                     timeout_s: float, poll_s: float, crashloop_restarts: int = 3,
                     sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> dict:
    """Poll until the rollout of ``generation`` is complete, has failed, or ``timeout_s`` passed.

    Returns ``{"ok", "message", "seconds", "polls", "revision"}``. API errors while
    polling are retried until the timeout (the API server may blink during a rollout).
    ``pod_selector``: the new pods, checked for problems no waiting fixes (None: not checked).
    """
    ApiException = api_exception_type()
    start, polls, last_message = clock(), 0, None
    while True:
        polls += 1
        try:
            deployment = api.get_deployment(namespace, name)
            state = rollout_state(deployment, generation)
            if not state.done and not state.failed and pod_selector:
                problems = pod_problems(api.list_pods(namespace, pod_selector), crashloop_restarts)
                if problems:
                    state = RolloutState(False, True, "; ".join(problems[:3]))
        except ApiException as err:
            deployment, state = None, RolloutState(False, False, f"API error while watching: {api_error(err)}")
        elapsed = clock() - start
        if state.message != last_message:
            print(f"[deploy] rollout of generation {generation}: {state.message}", flush=True)
            last_message = state.message
        if state.done or state.failed:
            revision = (deployment or {}).get("metadata", {}).get("annotations", {}).get(REVISION)
            return {"ok": state.done, "message": state.message, "seconds": round(elapsed, 1), "polls": polls,
                    "revision": revision}
        if elapsed >= timeout_s:
            return {"ok": False, "message": f"timed out after {timeout_s:.0f} s ({state.message})",
                    "seconds": round(elapsed, 1), "polls": polls, "revision": None}
        sleep(poll_s)


def previous_release(replicasets: list[dict], deployment: dict) -> dict | None:
    """The ReplicaSet of the revision serving now, if it holds a real release (else None: first release)."""
    revision = deployment["metadata"].get("annotations", {}).get(REVISION)
    uid = deployment["metadata"].get("uid")
    for rs in replicasets:
        owners = {o.get("uid") for o in rs["metadata"].get("ownerReferences", []) if o.get("kind") == "Deployment"}
        if uid and uid not in owners:
            continue  # same labels, another owner: not ours
        if revision is not None and rs["metadata"].get("annotations", {}).get(REVISION) == revision:
            labels = rs["spec"]["template"]["metadata"].get("labels", {})
            return None if labels.get(MODEL_VERSION_LABEL, UNRELEASED) == UNRELEASED else rs
    return None
