"""Shadow and canary rollouts on the cluster: the new model (the challenger) runs beside the one in production
(the champion) and is promoted or rolled back on live evidence.

When ``rollout.strategy`` is ``shadow`` or ``canary`` and a release already serves (the first release is always
``replace``), ``deploy_kubernetes`` runs these phases after its preflight and publish:

1. **Preflight** (``StagedRollout.preflight``, before anything is published): the stable pods' auth proxy reads
   its ``--rollout-file`` from the ConfigMap ``kfp-mlops-serving-rollout``; the challenger Deployment and Service
   exist (the manifests create them); no other rollout holds them (the challenger at 0 replicas, the rollout
   file ``{}``), else the step stops and says how to clean up after an interrupted one.
2. **Start**: server-side apply the challenger Deployment (``challenger.render_challenger``: the live stable pod
   spec, the new release, 1 replica), wait for it as ``kubectl rollout status`` does, smoke-test it through its
   Service. A challenger that never becomes ready or fails its smoke test is scaled back to 0 and the step fails
   (``ReleaseRolledBack``): the champion was never touched, no traffic ever went to the challenger.
3. **Route**: patch the rollout file (a JSON patch that tests it still holds what the preflight read) with the
   mode, share, the challenger Service's URL and the source token's path in the proxy container. Each stable
   pod's proxy re-reads it when the kubelet updates the ConfigMap volume (about a minute at most by default).
4. **Observe**: every ``poll_s``, ask every ready stable pod's proxy (its IP from the API) for ``GET /rollout``
   with the pipeline's source token, sum their evidence (``evidence.EvidenceBook``) and ``decide()``: rollback as
   soon as a criterion has certainly failed, promote or rollback at ``min_requests``, ``on_deadline`` at
   ``max_wait_s`` (counted from the routing patch; the kubelet's delay is inside it). Only live client traffic
   counts: ``rollout.replay`` is for local runs, the cluster's clients are the traffic.
5. **Promote** (decision ``promote``): the release goes to the stable Deployment through the very phases of a
   ``replace`` (``KubernetesDeploy.apply_and_wait``: server-side apply, rollout wait, smoke test), and
   ``recover`` when that fails (the previous revision back, the step fails).
6. **End**, on every path once traffic was routed (promote, rollback, an error, an interruption): clear the
   rollout file (only if it still names this challenger), wait until every ready stable pod's proxy has dropped
   the challenger (``unroute_timeout_s``), then scale the challenger to 0: a rolled-back challenger leaves no
   trace in the serving path. When the file cannot be cleared the challenger keeps running (canary traffic may
   still go to it) and the step fails with the kubectl commands that finish by hand.

The deploy step returns the deployment record with ``rollout`` (strategy, share, decision, reason, criteria,
evidence, seconds_to_decision, champion_version, challenger_version); a rollback on the evidence is a success of
the step: the champion serves on, and the record says why the challenger lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from components.core.names import ROLLOUT_CONFIG_MAP, ROLLOUT_FILE_KEY, SERVING_CHALLENGER
from components.deploy.kubernetes.api import api_error, api_exception_type
from components.deploy.kubernetes.challenger import (
    EMPTY_ROLLOUT,
    clear_command,
    clear_patch,
    encode,
    proxy_port,
    render_challenger,
    rollout_document,
    rollout_volume,
    route_patch,
    routed_version,
    scale_patch,
)
from components.deploy.kubernetes.evidence import EvidenceBook, Tally, fetch_rollout, is_ready, pod_url, poll_pods
from components.deploy.kubernetes.release import DeployError, Release, ReleaseRolledBack, RollbackFailed
from components.deploy.rollout.decision import PROMOTE, WAIT, Decision, decide


def service_url(service: dict) -> str:
    """``http://<service>.<namespace>.svc.cluster.local:<port>`` of a Service's inference port."""
    ports = service["spec"]["ports"]
    port = next((p for p in ports if p.get("name") == "http-inference"), ports[0])["port"]
    meta = service["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


@dataclass(frozen=True)
class Challenger:
    """What the rollout's preflight read: the challenger (a ``Release`` of the challenger Deployment, without the
    new model yet), its Service's URL, the stable pods' proxy port and the rollout file as it was."""

    release: Release
    upstream: str
    proxy_port: int
    rollout_file: str


@dataclass
class StagedRollout:
    """A shadow or canary rollout through ``step`` (the release's ``KubernetesDeploy``); ``settings`` is the run's
    ``rollout`` config area. ``fetch`` asks one pod's proxy for its evidence (injectable for tests)."""

    step: Any  # deploy.KubernetesDeploy (not imported: deploy imports this module)
    settings: Any
    challenger_name: str = SERVING_CHALLENGER
    config_map: str = ROLLOUT_CONFIG_MAP
    fetch: Callable[[str, str], Any] = fetch_rollout
    unroute_timeout_s: float = 300.0
    reference_confidences: list[float] | None = None

    @property
    def api(self):
        return self.step.api

    def _clock(self) -> float:
        return self.step.clock()

    # ------------------------------------------------------------ 1. preflight

    def preflight(self, release: Release) -> Challenger:
        """Read the challenger's objects and the rollout file; refuse when the cluster cannot run a rollout or
        another one holds it. Changes nothing."""
        ns = release.namespace
        volume = rollout_volume(release.live["spec"]["template"]["spec"])
        if volume["configMap"]["name"] != self.config_map:
            raise DeployError(f"the serving pods read their rollout file from ConfigMap {volume['configMap']['name']}, "
                              f"not {self.config_map}: apply the manifests of this version")
        ApiException = api_exception_type()
        try:
            live = self.api.get_deployment(ns, self.challenger_name)
            service = self.api.get_service(ns, self.challenger_name)
            config_map = self.api.get_configmap(ns, self.config_map)
        except ApiException as err:
            if err.status == 404:
                raise DeployError(
                    f"a {self.settings.strategy} rollout needs the challenger Deployment and Service "
                    f"{self.challenger_name} and the ConfigMap {self.config_map} in {ns}, and one of them is missing "
                    f"({api_error(err)}): apply the manifests of this version (kubectl apply -k "
                    "manifests/overlays/<env>), or run with --rollout-strategy replace") from None
            raise DeployError(f"cannot read the rollout objects in {ns}: {api_error(err)}") from None
        text = (config_map.get("data") or {}).get(ROLLOUT_FILE_KEY, EMPTY_ROLLOUT)
        routed = routed_version(text)
        replicas = live["spec"].get("replicas", 1)
        if routed is not None or replicas:
            busy = (f"the rollout file routes traffic to challenger v{routed}" if routed is not None else
                    f"the challenger Deployment {self.challenger_name} runs {replicas} replica(s)")
            raise DeployError(
                f"another rollout is in progress, or one was interrupted: {busy}. Nothing was changed. If no deploy "
                f"step is rolling out now, end it by hand: {clear_command(ns)}; wait a minute (the kubelet updates "
                f"the pods' rollout file); kubectl -n {ns} scale deployment/{self.challenger_name} --replicas=0")
        challenger = dataclasses.replace(
            release, deployment_name=self.challenger_name, service_name=self.challenger_name, live=live,
            previous=None, endpoint=f"{service_url(service)}/predictions/{release.model_name}")
        return Challenger(challenger, service_url(service), proxy_port(release.live["spec"]["template"]["spec"]), text)

    # ------------------------------------------------------------ the whole rollout

    def run(self, release: Release, challenger: Challenger, report: dict[str, Any]) -> dict[str, Any]:
        """Start, route, observe, then promote or roll back, and end. Returns the record's ``rollout``; ``report``
        gets the challenger's details. Raises as a ``replace`` release does when the promotion fails, and
        ``ReleaseRolledBack`` when the challenger never served."""
        ours = self.start(release, challenger, report)
        document = rollout_document(ours, self.settings.strategy, self.settings.share, challenger.upstream)
        self.route(ours, challenger, document, report)
        routed_at = self._clock()
        try:
            decision, book = self.observe(release, challenger, ours, routed_at)
            rollout = report["rollout"] = self.outcome(release, decision, book, self._clock() - routed_at)
            print(f"[deploy] {self.settings.strategy} rollout decided {decision.action.upper()} after "
                  f"{rollout['seconds_to_decision']} s: {decision.reason}", flush=True)
            if decision.action == PROMOTE:
                failure = self.step.apply_and_wait(release, report)
                if failure is not None:  # what happened is a rollback: the champion comes back and serves on
                    rollout.update(decision="rollback", evidence_decision=PROMOTE,
                                   reason=f"the evidence said promote ({decision.reason}), but the promotion "
                                          f"failed: {failure}")
                    self.step.recover(release, failure, report)
        except BaseException as err:
            if "rollout" not in report:  # the rollout failed before a decision: the challenger is rolled back
                report["rollout"] = self.failed(release, f"the rollout failed: {type(err).__name__}: {err}")
            if isinstance(err, DeployError) and not err.report:
                err.report = report  # what was done, for the ledger (the error came from below, without it)
            problem = self.end(release, ours, document, report)
            if problem and isinstance(err, DeployError):
                raise RollbackFailed(f"{err}; and ending the rollout failed too: {problem}", report) from None
            raise
        problem = self.end(release, ours, document, report)
        if problem:
            raise RollbackFailed(f"the {self.settings.strategy} rollout decided {rollout['decision']}, but ending it "
                                 f"failed: {problem}", report)
        if rollout["decision"] != PROMOTE:
            report["served_model_version"] = release.previous_model_version
        return rollout

    # ------------------------------------------------------------ 2. start

    def start(self, release: Release, challenger: Challenger, report: dict[str, Any]) -> Release:
        """The challenger runs the new release on one ready, smoke-tested pod. Returns its ``Release``."""
        ours = dataclasses.replace(challenger.release, model_version=release.model_version,
                                   release_id=release.release_id, model_uri=release.model_uri, image=release.image,
                                   run_id=release.run_id, mar_file=release.mar_file)
        info = report["challenger"] = {"deployment": ours.deployment, "endpoint": ours.endpoint,
                                       "upstream": challenger.upstream}
        try:
            applied = self.api.apply_deployment(ours.namespace, ours.deployment_name,
                                                render_challenger(release.live, ours.live, ours, replicas=1))
        except api_exception_type() as err:
            raise DeployError(f"server-side apply of the challenger {ours.deployment} was refused, so nothing "
                              f"changed: {api_error(err)}", report) from None
        generation = applied["metadata"]["generation"]
        print(f"[deploy] challenger applied: model v{ours.model_version} on 1 pod of {ours.deployment} "
              f"(generation {generation}); the champion v{release.previous_model_version} serves every client",
              flush=True)
        try:
            wait = info["deployment_rollout"] = self.step._wait(ours, generation, ours.pods_selector)
            failure = None
            if not wait["ok"]:
                failure = f"never became ready: {wait['message']}"
            else:
                smoke = info["smoke_test"] = self.step._smoke_test(ours, ours.model_version)
                if smoke["failed"]:
                    failure = f"failed its smoke test through {ours.endpoint}: {smoke['summary']}"
        except BaseException:
            self.park(ours, report)  # interrupted (or an error): no challenger left running
            raise
        if failure is None:
            return ours
        report["failure"] = f"challenger {failure}"
        report["rollout"] = self.failed(release, f"challenger {failure}")
        parked = self.park(ours, report)
        failed = f"the challenger model v{release.model_version} {failure}. No traffic was routed to it"
        if parked:
            raise RollbackFailed(f"{failed}, but {parked}", report)
        raise ReleaseRolledBack(f"{failed}; it was scaled back to 0. The champion v{release.previous_model_version} "
                                "serves unchanged.", report)

    # ------------------------------------------------------------ 3. route

    def route(self, ours: Release, challenger: Challenger, document: dict, report: dict[str, Any]) -> None:
        """The rollout file names the challenger. Refused (another rollout claimed it since the preflight): the
        challenger is parked and the step fails."""
        try:
            self.api.json_patch_configmap(ours.namespace, self.config_map,
                                          route_patch(challenger.rollout_file, document))
        except api_exception_type() as err:
            refused = (f"routing traffic to the challenger was refused ({api_error(err)}): another rollout may have "
                       "started since the preflight")
            parked = self.park(ours, report)
            if parked:
                raise RollbackFailed(f"{refused}; and {parked}", report) from None
            raise DeployError(f"{refused}; the challenger was scaled back to 0. The champion serves unchanged.",
                              report) from None
        report["challenger"]["rollout_file"] = document
        print(f"[deploy] routing: {self.settings.strategy}, share {self.settings.share:g}, to {challenger.upstream} "
              f"(ConfigMap {self.config_map}; the kubelet updates the pods' file within about a minute)", flush=True)

    # ------------------------------------------------------------ 4. observe

    def observe(self, release: Release, challenger: Challenger, ours: Release,
                routed_at: float) -> tuple[Decision, EvidenceBook]:
        """Poll the stable pods' evidence until ``decide`` says promote or rollback."""
        ApiException = api_exception_type()
        book = EvidenceBook(self.settings.strategy, ours.model_version, self.reference_confidences)
        last_line = None
        while True:
            try:
                poll = poll_pods(self.api.list_pods(release.namespace, release.selector), challenger.proxy_port,
                                 self.step.token, book, self.fetch)
                status = f"{poll.routing} of {poll.ready} ready pods route to it"
                if poll.silent:
                    status += f"; no answer from {'; '.join(poll.silent[:3])}"
            except ApiException as err:
                status = f"API error listing the pods: {api_error(err)}"
            elapsed = self._clock() - routed_at
            decision = decide(book.evidence(elapsed), self.settings)
            if decision.action != WAIT and not book.tallies:
                decision.reason += f" (no stable pod's proxy ever reported this challenger; last poll: {status})"
            line = f"[deploy] {self.settings.strategy}: {decision.reason}; {status}"
            if line != last_line:
                print(line, flush=True)
                last_line = line
            if decision.action != WAIT:
                return decision, book
            self.step.sleep(self.step.poll_s)

    def outcome(self, release: Release, decision: Decision, book: EvidenceBook, elapsed: float) -> dict[str, Any]:
        """The record's ``rollout``."""
        decided = decision.as_dict()
        return {"strategy": self.settings.strategy, "share": self.settings.share, "decision": decision.action,
                "reason": decision.reason, "criteria": decided["criteria"],
                "evidence": {**decided["evidence"], "pods": book.per_pod()},
                "seconds_to_decision": round(elapsed, 1), "champion_version": release.previous_model_version,
                "challenger_version": release.model_version}

    def failed(self, release: Release, reason: str) -> dict[str, Any]:
        """The record's ``rollout`` when no evidence decided: a rollback, for ``reason``."""
        return {"strategy": self.settings.strategy, "share": self.settings.share, "decision": "rollback",
                "reason": reason, "criteria": [], "evidence": {}, "seconds_to_decision": None,
                "champion_version": release.previous_model_version, "challenger_version": release.model_version}

    # ------------------------------------------------------------ 6. end

    def end(self, release: Release, ours: Release, document: dict, report: dict[str, Any]) -> str | None:
        """Clear the rollout file, wait until the stable pods' proxies dropped the challenger, scale it to 0.
        Returns what could not be done (with the commands to do it by hand), or None."""
        ns = release.namespace
        ended: dict[str, Any] = report["challenger"].setdefault("end", {})
        try:
            self.api.json_patch_configmap(ns, self.config_map, clear_patch(document))
            ended["cleared"] = True
        except api_exception_type() as err:
            ended["cleared"] = False
            print(f"[deploy] clearing the rollout file failed: {api_error(err)}", flush=True)
            if getattr(err, "status", None) != 422:  # 422: its test failed: it no longer names our challenger
                return (f"the rollout file could not be cleared ({api_error(err)}), so the challenger keeps running "
                        f"(the stable pods still send it traffic). By hand: {clear_command(ns)}; wait a minute; "
                        f"kubectl -n {ns} scale deployment/{ours.deployment_name} --replicas=0")
            ended["note"] = "the rollout file no longer named this challenger (someone changed it): left as it was"
        ended.update(self.await_unrouted(release, ours))
        parked = self.park(ours, report)
        return parked

    def await_unrouted(self, release: Release, ours: Release) -> dict[str, Any]:
        """Poll the ready stable pods until none reports this challenger (their proxies re-read the cleared file)."""
        start, still = self._clock(), ["(not polled yet)"]
        port = proxy_port(release.live["spec"]["template"]["spec"])
        while True:
            try:
                still = [p["metadata"]["name"] for p in self.api.list_pods(release.namespace, release.selector)
                         if self._routes(p, port, ours)]
            except api_exception_type() as err:
                still = [f"(API error: {api_error(err)})"]
            elapsed = round(self._clock() - start, 1)
            if not still:
                print(f"[deploy] every stable pod dropped the challenger after {elapsed} s", flush=True)
                return {"unrouted": True, "unrouted_after_s": elapsed}
            if elapsed >= self.unroute_timeout_s:
                print(f"[deploy] after {elapsed} s these pods still route to the challenger or do not answer: "
                      f"{', '.join(still[:5])}; scaling it to 0 anyway", flush=True)
                return {"unrouted": False, "still_routing": still, "unrouted_after_s": elapsed}
            self.step.sleep(self.step.poll_s)

    def _routes(self, pod: dict, port: int, ours: Release) -> bool:
        """Whether a ready pod's proxy still routes to ``ours`` (or does not answer, so it may)."""
        url = pod_url(pod, port)
        if url is None or not is_ready(pod):
            return False  # out of the Service: no client traffic reaches it
        try:
            answer = self.fetch(url, self.step.token)
        except Exception:  # noqa: BLE001 - not answering: it may still route
            return True
        try:
            return Tally.parse(answer, ours.model_version, self.settings.strategy) is not None
        except ValueError:
            return True

    def park(self, ours: Release, report: dict[str, Any]) -> str | None:
        """The challenger to 0 replicas (only while it runs this release). Returns what failed, or None."""
        ended = report["challenger"].setdefault("end", {})
        try:
            self.api.json_patch_deployment(ours.namespace, ours.deployment_name, scale_patch(ours, 0))
            ended["scaled_to_zero"] = True
            print(f"[deploy] challenger {ours.deployment} scaled to 0", flush=True)
            return None
        except api_exception_type() as err:
            ended["scaled_to_zero"] = False
            return (f"scaling the challenger to 0 failed ({api_error(err)}): kubectl -n {ours.namespace} scale "
                    f"deployment/{ours.deployment_name} --replicas=0")


def staged_release(rollout, release: Release) -> bool:
    """Whether this release is a shadow or canary rollout: asked for, and a release already serves."""
    if rollout is None or rollout.strategy == "replace":
        return False
    if release.previous is None:
        print(f"[deploy] strategy {rollout.strategy} asked for, but nothing serves yet: the first release is a "
              "replace", flush=True)
        return False
    return True


__all__ = ["Challenger", "StagedRollout", "encode", "service_url", "staged_release"]
