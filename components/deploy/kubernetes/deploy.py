"""The deploy step on Kubernetes, phase by phase: preflight, publish, apply and wait, recover.

``deploy_kubernetes`` checks the step's inputs, then runs the phases of ``KubernetesDeploy``
on one ``Release``; the package docstring (``components.deploy.kubernetes``) tells the whole
story of a release.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

from components.core.names import MODEL_STORE_ENV, REQUEST_LOG_ENV

# The pipeline's own bearer token for the pods' auth proxy: accepted like a client token, and its
# requests may set X-Request-Source (the smoke test's are marked as such in the request log).
from components.core.names import SERVING_SOURCE_TOKEN_FILE as TOKEN_FILE
from components.core.names import SERVING_SOURCE_TOKEN_SECRET as TOKEN_SECRET
from components.deploy.checks import SmokeTest, archive_settings, model_version_of
from components.deploy.kubernetes.api import KubernetesApi, api_error, api_exception_type
from components.deploy.kubernetes.evidence import fetch_rollout
from components.deploy.kubernetes.release import (
    DEFAULT_NAMESPACE,
    DEPLOYMENT_NAME,
    FETCH_CONTAINER,
    MODEL_URI_ENV,
    SERVER_CONTAINER,
    DeployError,
    Release,
    ReleaseRolledBack,
    RollbackFailed,
    find_named,
    render_release,
    rollback_patch,
    scale_to_zero_patch,
    scale_up_patch,
)
from components.deploy.kubernetes.rollout import previous_release, wait_for_rollout
from components.deploy.kubernetes.staged import StagedRollout, staged_release

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def read_bearer_token(token_file: str | Path) -> str:
    """The first token in a file mounted from the Secret kfp-mlops-serving-source-token (one per line)."""
    path = Path(token_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"no serving token at {path}: mount the Secret {TOKEN_SECRET} there (the pipeline does it for the "
            f"deploy and monitor steps), created with: kubectl -n <namespace> create secret generic {TOKEN_SECRET} "
            "--from-literal=token=\"$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\" "
            "(docs/cluster.md)")
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"the serving token file {path} is empty: put a token in the Secret {TOKEN_SECRET}")
    return tokens[0]


def default_namespace() -> str:
    """The pod's own namespace when running in the cluster, else kfp-mlops."""
    path = Path(IN_CLUSTER_NAMESPACE_FILE)
    return path.read_text().strip() if path.is_file() else DEFAULT_NAMESPACE


def _not_installed(release: Release, what: str) -> str:
    return (f"Deployment {release.deployment} {what}: apply the manifests first (kubectl apply -k "
            f"manifests/overlays/<env>, after creating the Secrets docs/cluster.md lists); the deploy step only "
            "releases models into that Deployment and may not create one")


def _refused_create(err: Exception) -> bool:
    """A 403 for ``create``: a server-side apply found no object to update, and the Role grants no create."""
    return getattr(err, "status", None) == 403 and "cannot create resource" in api_error(err)


def _env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def _served_model(server: dict) -> tuple[str, str]:
    """(model name, .mar file) from the server's ``--models NAME=FILE.mar`` argument."""
    args = server.get("command", []) + server.get("args", [])
    if "--models" not in args or args.index("--models") + 1 >= len(args):
        raise DeployError("the torchserve container has no '--models NAME=FILE.mar' argument; cannot tell what it loads")
    name, _, mar = args[args.index("--models") + 1].partition("=")
    return name, mar


def _service_endpoint(service: dict, model_name: str) -> str:
    ports = service["spec"]["ports"]
    port = next((p for p in ports if p.get("name") == "http-inference"), ports[0])["port"]
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}/predictions/{model_name}"


@dataclass
class KubernetesDeploy:
    """What a release on the cluster works with: the API, the archive builder and model store, how long it
    waits for a rollout, and the smoke test through the Service. Each phase takes the ``Release``."""

    api: KubernetesApi
    smoke: SmokeTest
    token: str  # the pipeline's bearer token for the pods' auth proxy
    model_config: dict[str, int]  # the .mar's model config (``checks.archive_settings``)
    rollout_timeout_s: float = 900
    poll_s: float = 5.0
    crashloop_restarts: int = 3
    scale_up_replicas: int = 1
    work_dir: str | Path | None = None
    publish: Callable[[Path, str], dict] | None = None  # components.core.releases.publish
    build_archive: Callable[..., Path] | None = None  # serving.archive.build_mar
    send: Callable[..., Any] | None = None  # serving.client.predict
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def preflight(self, release: Release) -> Release:
        """Read the Deployment, the revision it serves, the Service and the request log's place; check that the
        Deployment loads this model. Changes nothing. Returns ``release`` with what it found."""
        ApiException = api_exception_type()
        try:
            live = self.api.get_deployment(release.namespace, release.deployment_name)
        except ApiException as err:
            if err.status == 404:
                raise DeployError(_not_installed(release, "not found")) from None
            raise DeployError(f"cannot read Deployment {release.deployment}: {api_error(err)}") from None
        pod = live["spec"]["template"]["spec"]
        fetch = find_named(pod.get("initContainers", []), FETCH_CONTAINER, "init container")
        server = find_named(pod["containers"], SERVER_CONTAINER, "container")
        served_name, mar_file = _served_model(server)
        if served_name != release.model_name:
            raise DeployError(f"the Deployment serves model {served_name!r} (--models {served_name}={mar_file}), "
                              f"not {release.model_name!r}: set model_name to {served_name!r} or change the manifests")
        model_uri = release.model_uri or _env_value(fetch, MODEL_URI_ENV) or ""
        if not model_uri:
            raise DeployError(f"no model store: set serving.model_store_uri or {MODEL_STORE_ENV}, or {MODEL_URI_ENV} "
                              "on the init container")
        release = dataclasses.replace(release, live=live, model_uri=model_uri, mar_file=mar_file)
        try:
            previous = previous_release(self.api.list_replicasets(release.namespace, release.selector), live)
            service = self.api.get_service(release.namespace, release.service_name)
        except ApiException as err:
            raise DeployError(f"cannot read the serving objects in {release.namespace}: {api_error(err)}") from None
        return dataclasses.replace(release, previous=previous, endpoint=_service_endpoint(service, release.model_name),
                                   request_log_dir=self._request_log_dir(release.namespace, server))

    def publish_archive(self, release: Release, model_dir: str | Path) -> Release:
        """Pack the model into the .mar the Deployment loads and publish it: the pods fetch exactly these bytes,
        by the release id this returns ``release`` with."""
        from serving import archive

        build_archive = self.build_archive or archive.build_mar
        archive.model_config_yaml(**self.model_config)  # bad values fail here, before anything is published
        publish = self.publish
        if publish is None:
            from components.core.releases import publish
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            release_dir = Path(tmp) / "release"
            mar = build_archive(model_dir, release_dir, release.model_name, release.model_version, **self.model_config)
            if Path(mar).name != release.mar_file:
                raise DeployError(f"the archive is {Path(mar).name} but the Deployment loads {release.mar_file}")
            manifest = publish(release_dir, release.model_uri)
        release = dataclasses.replace(release, release_id=manifest["version"])
        print(f"[deploy] published {release.mar_file} of model v{release.model_version} to {release.model_uri} as "
              f"release {release.release_id[:12]}", flush=True)
        return release

    def report(self, release: Release) -> dict[str, Any]:
        """What is known of a published release before the cluster changes."""
        return {
            "namespace": release.namespace, "deployment": release.deployment_name,
            "model_version": release.model_version, "release_id": release.release_id, "model_uri": release.model_uri,
            "model_config": self.model_config, "previous_revision": release.previous_revision,
            "previous_model_version": release.previous_model_version,
        }

    def apply_and_wait(self, release: Release, report: dict[str, Any]) -> str | None:
        """Server-side apply the release fields (waking a Deployment a failed first release left at zero), watch
        the rollout, then smoke-test through the Service. Returns why the release failed, or None; ``report``
        gets the rollout and the smoke test. Raises ``DeployError`` when the apply is refused (nothing changed)."""
        ApiException = api_exception_type()
        try:
            applied = self.api.apply_deployment(release.namespace, release.deployment_name,
                                                render_release(release.live, release))
            if applied["spec"].get("replicas") == 0:
                print(f"[deploy] the Deployment is at 0 replicas (a failed first release?): scaling to "
                      f"{self.scale_up_replicas}; the HPA takes over from there", flush=True)
                applied = self.api.json_patch_deployment(release.namespace, release.deployment_name,
                                                         scale_up_patch(self.scale_up_replicas))
        except ApiException as err:
            if _refused_create(err):
                raise DeployError(_not_installed(release, "is gone (deleted after it was read)"), report) from None
            raise DeployError(f"server-side apply of release {release.release_id[:12]} to {release.deployment} "
                              f"was refused, so nothing changed: {api_error(err)}", report) from None
        generation = applied["metadata"]["generation"]
        print(f"[deploy] applied: {release.change_cause()} (generation {generation})", flush=True)
        rollout = report["deployment_rollout"] = self._wait(release, generation, release.pods_selector)
        if not rollout["ok"]:
            return f"rollout failed: {rollout['message']}"
        smoke = report["smoke_test"] = self._smoke_test(release, release.model_version)
        if smoke["failed"]:
            return f"smoke test through {release.endpoint} failed: {smoke['summary']}"
        return None

    def recover(self, release: Release, failure: str, report: dict[str, Any]) -> NoReturn:
        """Back to what served before: roll back to the previous revision, or scale a failed first release to
        zero. Raises ``ReleaseRolledBack`` when that worked, ``RollbackFailed`` (with both failures) when not."""
        print(f"[deploy] release of model v{release.model_version} FAILED: {failure}", flush=True)
        report["failure"] = failure
        if release.previous is None:
            self._scale_to_zero(release, failure, report)
        self._roll_back(release, failure, report)

    def _scale_to_zero(self, release: Release, failure: str, report: dict[str, Any]) -> NoReturn:
        first = f"first release of model v{release.model_version}"
        self._recovery_patch(release, report, "scale to 0", scale_to_zero_patch(release, failure), lambda error: (
            f"{first} failed ({failure}), and scaling {release.deployment} to 0 failed too ({error}). Pods of the "
            f"failed release may be serving: scale it down by hand (kubectl -n {release.namespace} scale "
            f"deployment/{release.deployment_name} --replicas=0)"))
        report["recovery"] = {"action": "scale to 0", "ok": True}
        raise ReleaseRolledBack(
            f"{first} failed: {failure}. There is no earlier release to roll back to, so {release.deployment} was "
            "scaled to 0 replicas: the failed model serves nothing. Fix the cause and run the pipeline again (its "
            "deploy step scales the Deployment back up).", report)

    def _roll_back(self, release: Release, failure: str, report: dict[str, Any]) -> NoReturn:
        failed = f"release of model v{release.model_version} failed"
        back = f"revision {release.previous_revision} (model v{release.previous_model_version})"
        patched = self._recovery_patch(release, report, "rollback", rollback_patch(release.previous, release, failure),
                                       lambda error: (
            f"{failed} ({failure}), and the rollback to {back} failed too: {error}. Roll back by hand: "
            f"{release.undo_command()}; then watch: kubectl -n {release.namespace} rollout status "
            f"deployment/{release.deployment_name}"))
        undo = self._wait(release, patched["metadata"]["generation"], None)
        recovery: dict[str, Any] = {"action": "rollback", "to_revision": release.previous_revision, "rollout": undo}
        report["recovery"] = recovery
        if undo["ok"]:
            smoke = recovery["smoke_test"] = self._smoke_test(release, None)
            recovery["ok"] = not smoke["failed"]
            outcome = "smoke test passed" if recovery["ok"] else f"but its smoke test failed: {smoke['summary']}"
        else:
            recovery["ok"] = False
            outcome = f"but its rollout failed: {undo['message']}"
        if not recovery["ok"]:
            raise RollbackFailed(
                f"{failed} ({failure}); rolled back to {back} {outcome}. Check: kubectl -n {release.namespace} "
                f"rollout history deployment/{release.deployment_name}; kubectl -n {release.namespace} get pods -l "
                f"{release.selector}", report)
        raise ReleaseRolledBack(
            f"{failed}: {failure}. Rolled back to {back}, now revision {undo['revision']}: rollout complete in "
            f"{undo['seconds']} s, {outcome}.", report)

    def _recovery_patch(self, release: Release, report: dict[str, Any], action: str, ops: list[dict],
                        failed_too: Callable[[str], str]) -> dict:
        """Send a recovery patch; when the API refuses it, raise ``RollbackFailed`` with ``failed_too(error)``."""
        try:
            return self.api.json_patch_deployment(release.namespace, release.deployment_name, ops)
        except api_exception_type() as err:
            report["recovery"] = {"action": action, "ok": False, "message": api_error(err)}
            raise RollbackFailed(failed_too(api_error(err)), report) from None

    def _wait(self, release: Release, generation: int, pod_selector: str | None) -> dict:
        return wait_for_rollout(self.api, release.namespace, release.deployment_name, generation, pod_selector,
                                self.rollout_timeout_s, self.poll_s, self.crashloop_restarts, self.sleep, self.clock)

    def _smoke_test(self, release: Release, model_version: str | None) -> dict:
        """Smoke test through the Service; a second try after ``poll_s`` (endpoints may lag the rollout a moment).
        ``model_version`` None: any version may answer (after a rollback)."""
        for attempt in (1, 2):
            result = self.smoke.run(release.endpoint, model_version, token=self.token, send=self.send)
            if result["problems"]:
                result["summary"] += f"; {'; '.join(result['problems'][:3])}"
            result["attempts"] = attempt
            if not result["failed"]:
                return result
            if attempt == 1:
                print(f"[deploy] smoke test: {result['summary']}; trying once more", flush=True)
                self.sleep(self.poll_s)
        return result

    def _request_log_dir(self, namespace: str, server: dict) -> str:
        """Where the serving pods log requests: the server's env, or a ConfigMap it takes env from."""
        value = _env_value(server, REQUEST_LOG_ENV)
        if value:
            return value
        for source in server.get("envFrom", []):
            ref = source.get("configMapRef")
            if not ref:
                continue
            try:
                data = self.api.get_configmap(namespace, ref["name"]).get("data", {})
            except api_exception_type() as err:
                print(f"[deploy] cannot read ConfigMap {ref['name']} ({api_error(err)}); request_log_dir unknown",
                      flush=True)
                continue
            if data.get(REQUEST_LOG_ENV):
                return data[REQUEST_LOG_ENV]
        return ""


def deploy_kubernetes(
    model_dir: str | Path,
    dataset_dir: str | Path,
    serving,
    *,
    namespace: str = "",
    image: str = "",
    run_id: str = "",
    token_file: str | Path = TOKEN_FILE,
    deployment_name: str = DEPLOYMENT_NAME,
    service_name: str = DEPLOYMENT_NAME,
    poll_s: float = 5.0,
    smoke_images: int = 16,
    min_smoke_accuracy: float = 0.5,
    crashloop_restarts: int = 3,
    scale_up_replicas: int = 1,
    work_dir: str | Path | None = None,
    api: KubernetesApi | None = None,
    publish: Callable[[Path, str], dict] | None = None,
    build_archive: Callable[..., Path] | None = None,
    send: Callable[..., Any] | None = None,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] | None = None,
    rollout=None,
    fetch_evidence: Callable[[str, str], Any] | None = None,
    unroute_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Release ``model_dir`` to the serving Deployment; roll back when the rollout or smoke test fails.

    ``rollout`` is the run's rollout settings (``cfg.rollout``; None: replace). With strategy ``shadow`` or
    ``canary`` and a release already serving, the new model first runs as the challenger beside the stable
    Deployment and is promoted or rolled back on the stable pods' live evidence (``staged``); the record then
    holds ``rollout`` (the decision, its reason, criteria and evidence). ``fetch_evidence(url, token)`` asks one
    pod's auth proxy for ``GET /rollout`` (injectable for tests); ``unroute_timeout_s`` bounds the wait for the
    stable pods' proxies to drop the challenger after the rollout file is cleared.

    ``serving`` is the run's serving settings (``cfg.serving``): ``model_name``, ``model_store_uri``
    ("" = ``$KFP_MLOPS_MODEL_STORE``, else where the Deployment's init container fetches from now),
    ``rollout_timeout_s``, and ``workers``, ``batch_size`` and ``max_batch_delay_ms``, which go into
    the .mar's model config (the pods' TorchServe reads it when it loads the model; it wins over the
    ConfigMap). ``namespace`` "" = the pod's own; ``image`` "" = keep the images. ``api``,
    ``publish``, ``build_archive``, ``send``, ``sleep`` and ``clock`` are injectable for tests.

    Returns the deployment record (endpoint, token_file and source_token_file: both the
    pipeline's source token, request_log_dir, model_version, release_id, revision, ...). Raises
    ``ReleaseRolledBack`` (previous version serving again, or scaled to 0 on a first release) or
    ``RollbackFailed``; ``DeployError`` when it fails before anything changed on the cluster.
    """
    # Inputs first: nothing is published or changed when they are wrong.
    model_version = model_version_of(model_dir)
    smoke = SmokeTest.of_dataset(dataset_dir, smoke_images, min_smoke_accuracy)
    token = read_bearer_token(token_file)
    store = serving.model_store_uri or os.environ.get(MODEL_STORE_ENV, "")
    release = Release(serving.model_name, model_version, "", store, image=image, run_id=run_id,
                      namespace=namespace or default_namespace(), deployment_name=deployment_name,
                      service_name=service_name)
    step = KubernetesDeploy(
        api or KubernetesApi.from_environment(), smoke, token, archive_settings(serving),
        rollout_timeout_s=serving.rollout_timeout_s, poll_s=poll_s, crashloop_restarts=crashloop_restarts,
        scale_up_replicas=scale_up_replicas, work_dir=work_dir, publish=publish, build_archive=build_archive,
        send=send, sleep=sleep or time.sleep, clock=clock or time.monotonic)

    release = step.preflight(release)
    staged = None
    if staged_release(rollout, release):
        from components.deploy.kubernetes.evidence import reference_confidences

        staged = StagedRollout(step, rollout, fetch=fetch_evidence or fetch_rollout,
                               unroute_timeout_s=unroute_timeout_s,
                               reference_confidences=reference_confidences(model_dir))
        challenger = staged.preflight(release)
    release = step.publish_archive(release, model_dir)
    report = step.report(release)
    if staged is not None:
        staged.run(release, challenger, report)
    else:
        failure = step.apply_and_wait(release, report)
        if failure is not None:
            step.recover(release, failure, report)
    return _record(release, report, token_file)


def _record(release: Release, report: dict[str, Any], token_file: str | Path) -> dict[str, Any]:
    """The deployment record. After a rolled-back shadow or canary rollout the stable Deployment is unchanged
    (``served_model_version`` is the champion's) and the rollout and smoke-test figures are the challenger's."""
    applied = report.get("deployment_rollout") or report["challenger"]["deployment_rollout"]
    smoke_test = report.get("smoke_test") or report["challenger"]["smoke_test"]
    revision = applied["revision"] if "deployment_rollout" in report else release.previous_revision
    served = report.setdefault("served_model_version", release.model_version)
    print(f"[deploy] model v{served} serves as revision {revision}; smoke test of v{release.model_version}: "
          f"accuracy {smoke_test['accuracy']:.2f} on {smoke_test['images']} images", flush=True)
    # The pipeline holds only its source token here: the monitor's replay uses it too.
    return {
        "target": "kubernetes", "endpoint": release.endpoint, "token_file": str(token_file),
        "source_token_file": str(token_file), "request_log_dir": release.request_log_dir,
        "model_name": release.model_name, **report,
        "revision": revision, "rollout_seconds": applied["seconds"],
        "smoke_test_images": smoke_test["images"], "smoke_test_accuracy": smoke_test["accuracy"],
        "smoke_test_latency_ms_mean": smoke_test["latency_ms_mean"],
    }
