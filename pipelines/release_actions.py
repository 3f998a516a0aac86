"""``mlops releases rollback`` and ``promote``: serve a released model again, then record who did it and why.

The release ledger (components.core.ledger) says where every released model is, so both targets serve it again
with the machinery that released it the first time:

* ``serving.deploy_target = "local"``: the local server (``components.deploy.local.deploy_local``, as
  ``mlops serve start``) packs the released record's ``model_dir`` and smoke-tests it with its ``dataset_dir``;
* ``"kubernetes"``: the phases of the deploy step (``components.deploy.kubernetes``: preflight, apply and wait,
  recover) apply the release the record names (``model_uri``, ``release_id``: already published, so nothing is
  packed or published again) to the serving Deployment, smoke-test it through the Service and roll back to what
  served before when that fails.

Only once the model serves is it recorded: a rollback appends ``rolled_back`` (the version taken out) and
``released`` (strategy ``rollback``, the version serving again); a promotion appends ``released`` (strategy
``promote``) and ``promoted``. Each names its actor (``user@host``) and the reason given.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.core.ledger import SERVES_AT_ONCE, Ledger, LedgerError, Record, default_actor
from components.core.localfiles import atomic_write_json
from components.deploy.ledger import released_data


@dataclass
class KubernetesTarget:
    """How ``mlops releases`` reaches the serving Deployment (``serving.deploy_target = "kubernetes"``)."""

    namespace: str = ""  # "" = the pod's own, else kfp-mlops
    token_file: str = ""  # a token the serving pods' auth proxy accepts, for the smoke test
    dataset: str = ""  # the dataset whose test split smoke-tests the release; "" = the released record's
    api: Any = None  # a KubernetesApi; None = from the environment (in a pod, else the kubeconfig)
    poll_s: float = 5.0
    send: Callable[..., Any] | None = None  # injectable for tests, like the deploy step's
    sleep: Callable[[float], None] | None = None
    clock: Callable[[], float] | None = None


def previous_production(ledger: Ledger, current: Record) -> Record:
    """The release that served before ``current``: the newest earlier release of another version that served
    (at once, or once promoted) and was not rolled back since."""
    promoted = {r.data["model_version"] for r in ledger.find("promoted")}
    for r in reversed(ledger.records()):
        if r.seq >= current.seq or r.type != "released" or r.data["model_version"] == current.data["model_version"]:
            continue
        version = r.data["model_version"]
        if (r.data.get("strategy") in SERVES_AT_ONCE or version in promoted) and ledger.status(version) != "rolled back":
            return r
    raise LedgerError(f"nothing served before model v{current.data['model_version'][:12]} (released "
                      f"{current.id}): name the version to return to with --to VERSION")


def _dataset_dir(released: Record, given: str, tmp: str) -> str:
    """A local copy of the released model's dataset (its test split is the smoke test)."""
    from components.core import blobs

    for candidate in (given, released.data.get("dataset_dir"), released.data.get("dataset_uri")):
        if not candidate:
            continue
        if blobs.is_s3(candidate):
            blobs.get_dir(candidate, Path(tmp) / "dataset")
            return str(Path(tmp) / "dataset")
        if Path(candidate).is_dir():
            return str(candidate)
    raise LedgerError(f"the dataset of model v{released.data['model_version'][:12]} is not on this machine "
                      f"({released.data.get('dataset_dir') or released.data.get('dataset_uri')}): pass --dataset DIR "
                      "(a dataset artifact; its test split smoke-tests the release)")


def serve_on_kubernetes(released: Record, serving, k8s: KubernetesTarget) -> dict[str, Any]:
    """Apply an already published release to the serving Deployment with the deploy step's phases; returns the
    deployment record. Raises ``ReleaseRolledBack`` / ``RollbackFailed`` / ``DeployError`` as the step does."""
    import time

    from components.deploy.checks import SmokeTest, archive_settings
    from components.deploy.kubernetes import KubernetesApi, KubernetesDeploy, Release
    from components.deploy.kubernetes.deploy import TOKEN_FILE, default_namespace, read_bearer_token

    data = released.data
    if not data.get("release_id") or not data.get("model_uri"):
        raise LedgerError(f"released record {released.id} names no published release (model_uri, release_id): "
                          f"model v{data['model_version'][:12]} was served by a {data.get('target')} server, not "
                          "from a model store; release it with the pipeline on Kubernetes first")
    token_file = k8s.token_file or TOKEN_FILE
    with tempfile.TemporaryDirectory(prefix="mlops-releases-") as tmp:
        smoke = SmokeTest.of_dataset(_dataset_dir(released, k8s.dataset, tmp))
    step = KubernetesDeploy(
        k8s.api or KubernetesApi.from_environment(), smoke, read_bearer_token(token_file),
        data.get("model_config") or archive_settings(serving), rollout_timeout_s=serving.rollout_timeout_s,
        poll_s=k8s.poll_s, send=k8s.send, sleep=k8s.sleep or time.sleep, clock=k8s.clock or time.monotonic)
    release = Release(data["model_name"], data["model_version"], data["release_id"], data["model_uri"],
                      run_id=data.get("run_id", ""), namespace=k8s.namespace or default_namespace())
    release = step.preflight(release)
    report = step.report(release)
    failure = step.apply_and_wait(release, report)
    if failure is not None:
        step.recover(release, failure, report)
    smoke_test = report["smoke_test"]
    applied = report.get("deployment_rollout") or report["rollout"]  # the Deployment's rollout (not shadow/canary)
    return {"target": "kubernetes", "endpoint": release.endpoint, "token_file": str(token_file),
            "request_log_dir": release.request_log_dir, **report, "revision": applied["revision"],
            "smoke_test_images": smoke_test["images"], "smoke_test_accuracy": smoke_test["accuracy"],
            "smoke_test_latency_ms_mean": smoke_test["latency_ms_mean"]}


def serve_locally(released: Record, serving) -> dict[str, Any]:
    """Serve a released model from the local serving home again (``mlops serve start``'s machinery)."""
    from components.deploy.local import deploy_local

    data = released.data
    model_dir, dataset_dir = data.get("model_dir"), data.get("dataset_dir")
    missing = [p for p in (model_dir, dataset_dir) if not p or not Path(p).is_dir()]
    if missing:
        raise LedgerError(f"model v{data['model_version'][:12]} (released {released.id}) cannot be served here: "
                          f"{', '.join(map(str, missing))} not found (a run's artifacts under runs/<run-id>/kfp; "
                          "was the run directory removed?)")
    record = deploy_local(model_dir, dataset_dir, serving)
    return {"target": "local", **record}


def note_served(home: str | Path, ledger: Ledger, released: Record) -> None:
    """Which release the local server serves: the serving state (``state.json``) points to its ledger record."""
    state_file = Path(home) / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    state.update(run_id=released.data.get("run_id"), ledger=ledger.base, released_record=released.id)
    atomic_write_json(state_file, state)


def serve_again(released: Record, serving, k8s: KubernetesTarget | None, current: Record | None) -> dict[str, Any]:
    """Serve ``released`` on the configured target. Locally, when it fails (the server stops a model whose smoke
    test fails), ``current`` (what served before) is served again, as the deploy step's rollback does on
    Kubernetes; the error says both outcomes."""
    if serving.deploy_target == "kubernetes":
        return serve_on_kubernetes(released, serving, k8s or KubernetesTarget())
    if serving.deploy_target != "local":
        raise ValueError(f"serving.deploy_target must be 'local' or 'kubernetes', got {serving.deploy_target!r}")
    try:
        return serve_locally(released, serving)
    except (RuntimeError, TimeoutError) as err:
        if current is None or isinstance(err, LedgerError):
            raise
        failed = f"serving model v{released.data['model_version'][:12]} failed ({err})"
        try:
            serve_locally(current, serving)
        except (RuntimeError, TimeoutError) as again:
            raise RuntimeError(f"{failed}, and serving v{current.data['model_version'][:12]} again failed too "
                               f"({again}): nothing serves; start it with 'mlops serve start'") from err
        raise RuntimeError(f"{failed}; v{current.data['model_version'][:12]} serves again, nothing recorded") from err


def rollback(ledger: Ledger, serving, reason: str, *, to: str | None = None, k8s: KubernetesTarget | None = None,
             actor: str | None = None) -> tuple[Record, Record]:
    """Take the model in production out and serve ``to`` (a version or unique prefix; default: what served before
    it). Returns the (rolled_back, released) records."""
    if not reason.strip():
        raise ValueError("a rollback needs --reason: say why (it is recorded with who asked)")
    current = ledger.in_production(serving.model_name)
    if current is None:
        raise LedgerError(f"no model of {serving.model_name!r} is in production according to {ledger.base}: "
                          "nothing to roll back")
    target = ledger.released(ledger.resolve_version(to)) if to else previous_production(ledger, current)
    if target.data["model_version"] == current.data["model_version"]:
        raise LedgerError(f"model v{current.data['model_version'][:12]} is the one in production: roll back to "
                          "another version")
    record = serve_again(target, serving, k8s, current)
    actor = actor or default_actor()
    out = ledger.append("rolled_back", {"model_version": current.data["model_version"], "reason": reason,
                                        "automatic": False, "to_version": target.data["model_version"]},
                        parents=[current], actor=actor)
    back = _append_released(ledger, record, target, "rollback", reason, actor, parents=[target, out])
    return out, back


def promote(ledger: Ledger, serving, version: str, reason: str, *, k8s: KubernetesTarget | None = None,
            actor: str | None = None) -> tuple[Record, Record]:
    """Serve the released model ``version`` (a version or unique prefix) in production, e.g. a challenger its
    rollout rolled back. Returns the (released, promoted) records."""
    if not reason.strip():
        raise ValueError("a promotion needs --reason: say why (it is recorded with who asked)")
    earlier = ledger.released(ledger.resolve_version(version))
    current = ledger.in_production(serving.model_name)
    if current is not None and current.data["model_version"] == earlier.data["model_version"]:
        raise LedgerError(f"model v{earlier.data['model_version'][:12]} is already in production (released "
                          f"{current.id})")
    record = serve_again(earlier, serving, k8s, current)
    actor = actor or default_actor()
    released = _append_released(ledger, record, earlier, "promote", reason, actor, parents=[earlier])
    promoted = ledger.append("promoted", {
        "model_version": earlier.data["model_version"], "reason": reason, "automatic": False,
        "replaced_version": current.data["model_version"] if current else None}, parents=[released], actor=actor)
    return released, promoted


def _append_released(ledger: Ledger, record: dict[str, Any], earlier: Record, strategy: str, reason: str,
                     actor: str, parents: list[Record]) -> Record:
    """The ``released`` record of a model served again: what serves where now, and where its model is (kept from
    the earlier release); parents: the earlier release and what caused this one."""
    data = earlier.data
    kept = {k: data[k] for k in ("model_dir", "dataset_dir", "dataset_uri", "model_uri", "release_id", "model_config")
            if data.get(k) is not None}
    return ledger.append("released", released_data(
        {**kept, **record}, model_name=data["model_name"], model_version=data["model_version"],
        target=record.get("target") or data.get("target"), strategy=strategy, run_id=data.get("run_id", ""),
        reason=reason), parents=parents, actor=actor)
