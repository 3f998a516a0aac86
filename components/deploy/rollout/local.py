"""Shadow and canary rollouts on one machine: the challenger served beside the champion, promoted or rolled back
on what the champion's auth proxy saw.

When ``rollout.strategy`` is ``shadow`` or ``canary`` and a healthy model already serves from ``serving.home``
(``deploy_local`` decides; otherwise it replaces, as the first release always does):

1. **The challenger** starts as a second local server (TorchServe behind its own auth proxy, ``serving.server``)
   from ``<home>/challenger`` on free loopback ports, with its own tokens and request log
   (``<home>/challenger/requests``), and is smoke-tested like any release. A failed smoke test is a rollback.
2. **The split or mirror**: the champion's proxy is told about it through its rollout file (``<home>/rollout.json``,
   ``serving/rollout_router.py``): the challenger's proxy as ``upstream``, its source token as ``token_file``.
   The controller waits until ``GET /rollout`` (with the champion's source token) names the challenger.
3. **The evidence**: ``GET /rollout`` is polled and ``decision.decide`` asked until it says promote or rollback.
   With ``rollout.replay`` (the default) and no live traffic arriving, the test split is replayed through the
   champion's public endpoint (``components.core.replay``, tagged ``rollout-replay``) so the rollout gets its
   evidence; the replay pauses while live predictions arrive (``LIVE_RATE`` a second or more).
4. **Rollback**: the rollout file is removed and the controller waits until the proxy says there is no
   challenger, then stops the challenger and removes ``<home>/challenger`` (its logs are kept under
   ``<home>/rollouts/<version>-<time>/``): nothing is left in the serving path.
5. **Promote**: the challenger becomes the served model of the usual home and ports without a refused request.
   The rollout file is switched to ``canary`` with share 1 (every prediction answered by the challenger, through
   the champion's proxy, which never restarts); the champion's TorchServe is replaced by one serving the
   challenger's archive on the same loopback ports (``LocalTorchServe.replace_model``), smoke-tested directly,
   and then the rollout file is removed and the challenger's server stopped. The switch costs one TorchServe start
   (the record's ``switch_seconds``), during which predictions take one more proxy hop and explanations, which
   never go to a challenger, wait for the new TorchServe (a 502 while it starts). If the new TorchServe fails,
   the champion's archive is served again and the step fails, saying so.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.deploy.checks import SmokeTest
from components.deploy.rollout.decision import PROMOTE, ROLLBACK, WAIT, CriterionResult, Decision, Evidence, decide

REPLAY_SOURCE = "rollout-replay"  # X-Request-Source of the rollout's replayed traffic (the champion's request log)
POLL_S = 0.5  # how often the proxy's evidence is read (and decided on)
LIVE_RATE = 10.0  # live predictions per second at which the replay pauses
LIVE_QUIET_S = 2.0  # for this long after live traffic was last seen at that rate
TAKEN_TIMEOUT_S = 15.0  # for the champion's proxy to read a changed rollout file (it re-reads at most once a second)
WARM_UP_S = 5.0  # of unmeasured load on the challenger before the evidence starts
PREVIOUS_MAR = "previous.mar"  # under <home>/export during a promotion: the champion's archive, to restore


def refuse_in_containers(settings) -> None:
    """``mlops run --runner docker`` serves the serving Deployment's pod as containers, whose auth proxy has no
    rollout file and beside which no challenger pod runs: a shadow or canary rollout cannot run there."""
    if settings is not None and settings.strategy != "replace":
        raise ValueError(f"rollout.strategy={settings.strategy!r}: shadow and canary rollouts run with the local "
                         "server (mlops run, the subprocess runner) and on Kubernetes, not with the docker runner's "
                         "serving containers; run with --rollout-strategy replace there")


def rollout_blocker(home: Path) -> str | None:
    """Why a shadow or canary rollout cannot run against what serves from ``home`` (None: it can).

    Raises when something serves that a rollout cannot work with (the docker runner's containers), since
    replacing it instead would not be what was asked for."""
    from components.deploy.containers import served_from
    from serving.server import LocalTorchServe

    running = served_from(home)
    if not isinstance(running, LocalTorchServe):
        if running.status().get("running"):
            raise RuntimeError(f"the model serving from {home} runs in containers (mlops run --runner docker): shadow "
                               "and canary rollouts run against the local server only. Stop it ('mlops serve stop') "
                               "and run again (the first release replaces), or use --rollout-strategy replace")
        return "nothing serves from the serving home yet: the first release replaces"
    status = running.status()
    if not status["running"]:
        return "nothing serves from the serving home yet: the first release replaces"
    if not status["healthy"]:
        return f"the model serving now is not healthy ({status['problem']}): nothing to compare with, so it is replaced"
    return None


def _get_evidence(endpoint: str, token: str) -> dict[str, Any]:
    import requests

    base = endpoint.rsplit("/predictions/", 1)[0]
    answer = requests.get(f"{base}/rollout", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    if answer.status_code == 404:
        raise RuntimeError(f"the champion's auth proxy at {base} routes to no challenger (started without "
                           "--rollout-file, by an older version): restart it with 'mlops serve stop' and "
                           "'mlops serve start', then deploy again")
    if answer.status_code != 200:
        raise RuntimeError(f"GET {base}/rollout answered HTTP {answer.status_code}: {answer.text[:200]}")
    return answer.json()


def _wait_until_taken(endpoint: str, token: str, version: str | None, mode: str | None = None,
                      share: float | None = None) -> dict[str, Any]:
    """Poll ``GET /rollout`` until the proxy has read the rollout file naming ``version`` (None: no challenger)."""
    deadline = time.monotonic() + TAKEN_TIMEOUT_S
    while True:
        doc = _get_evidence(endpoint, token)
        if doc.get("version") == version and (mode is None or doc.get("mode") == mode) and \
                (share is None or doc.get("share") == share):
            return doc
        if time.monotonic() > deadline:
            raise RuntimeError(f"the champion's auth proxy did not take the rollout file within {TAKEN_TIMEOUT_S:g} s "
                               f"(it reports challenger {doc.get('version')!r}, expected {version!r})")
        time.sleep(0.2)


def _reference_confidences(model_dir: str | Path) -> list[float] | None:
    from components.core.features import MODEL_REFERENCE_FILE

    path = Path(model_dir) / MODEL_REFERENCE_FILE
    if not path.is_file():
        return None
    import pandas as pd

    column = pd.read_csv(path, usecols=["confidence"])["confidence"].dropna()
    return [float(v) for v in column] or None


class _Replay:
    """The test split replayed through the champion's endpoint in a thread, paused while live traffic arrives."""

    def __init__(self, endpoint: str, token_file: str, images):
        self.done = threading.Event()
        self.live_until = 0.0  # monotonic time until which the replay pauses
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(endpoint, token_file, images), daemon=True)

    def _run(self, endpoint: str, token_file: str, images) -> None:
        from components.core.replay import replay

        def pause() -> float:
            return 0.2 if time.monotonic() < self.live_until else 0.0

        def sent(n: int) -> None:
            self.sent = n

        try:
            replay(endpoint, token_file, images, source=REPLAY_SOURCE, who="rollout", until=self.done.is_set,
                   repeat=True, pause=pause, on_sent=sent)
        except BaseException as err:  # noqa: BLE001 - handed to the controller, which stops the rollout
            self.error = err

    def start(self) -> _Replay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
        self._thread.join(timeout=60)


def watch(endpoint: str, token: str, strategy: str, settings, version: str,
          reference: list[float] | None, replay: _Replay | None) -> Decision:
    """Read the proxy's evidence every ``POLL_S`` and decide, until promote or rollback."""
    started = time.monotonic()
    live_seen, live_at, last_print = 0, started, 0.0
    while True:
        doc = _get_evidence(endpoint, token)
        if doc.get("version") != version:
            raise RuntimeError(f"the champion's proxy no longer routes to challenger {version} (it reports "
                               f"{doc.get('version')!r}): was the rollout file changed by someone else?")
        elapsed = time.monotonic() - started
        decision = decide(Evidence.from_proxy(doc, strategy, elapsed, reference), settings)
        if replay is not None:
            if replay.error is not None:
                raise RuntimeError(f"the rollout's replay failed: {replay.error}") from replay.error
            now, live = time.monotonic(), int(doc.get("predictions", 0)) - replay.sent
            if live - 1 - live_seen >= LIVE_RATE * (now - live_at):  # (one replayed request may be in flight)
                replay.live_until = now + LIVE_QUIET_S
            live_seen, live_at = live, now
        if decision.action != WAIT:
            return decision
        if elapsed - last_print >= 5:
            last_print = elapsed
            print(f"[rollout] {elapsed:.0f} s: {decision.reason}", flush=True)
        time.sleep(POLL_S)


def warm_up(endpoint: str, token_file: str, images) -> dict[str, int]:
    """Load on the challenger for ``WARM_UP_S``, not counted: its Java frontend compiles its hot paths under load,
    and a cold one's slow first requests would count against its p99 (the champion's has long been warm). The
    answers are not judged here (the live evidence is); how many failed goes into the record."""
    import requests

    from serving.client import encode_png, read_token

    bodies = [encode_png(image) for image in images[:256]]
    headers = {"Authorization": f"Bearer {read_token(token_file)}", "Content-Type": "image/png",
               "X-Request-Source": "warm-up"}
    sent = failed = 0
    deadline = time.monotonic() + WARM_UP_S
    with requests.Session() as session:
        while time.monotonic() < deadline:
            try:
                failed += session.post(endpoint, data=bodies[sent % len(bodies)], headers=headers,
                                       timeout=30).status_code != 200
            except requests.RequestException:
                failed += 1
            sent += 1
    print(f"[rollout] warmed the challenger up with {sent} requests in {WARM_UP_S:g} s ({failed} failed)", flush=True)
    return {"requests": sent, "failed": failed}


def _keep_logs(home: Path, challenger_home: Path, version: str) -> Path | None:
    logs = challenger_home / "logs"
    if not logs.is_dir():
        return None
    kept = home / "rollouts" / f"{version}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(logs), str(kept))
    return kept


def _end_challenger(home: Path, champion, endpoint: str, token: str, version: str) -> None:
    """Out of the serving path: the rollout file removed (and the proxy seen to have read that), the challenger's
    server stopped, its home removed (its logs kept under <home>/rollouts/)."""
    from serving.server import CHALLENGER_DIR, LocalTorchServe

    champion.rollout_file.unlink(missing_ok=True)
    try:
        _wait_until_taken(endpoint, token, None)
    finally:
        challenger_home = home / CHALLENGER_DIR
        LocalTorchServe(challenger_home).stop(quiet=True)
        kept = _keep_logs(home, challenger_home, version)
        shutil.rmtree(challenger_home, ignore_errors=True)
        if kept:
            print(f"[rollout] the challenger's logs: {kept}", flush=True)


def run_rollout(model_dir: str | Path, dataset_dir: str | Path, serving, settings, mar: Path, version: str,
                smoke: SmokeTest, request_log: dict[str, Any]) -> dict[str, Any]:
    """A shadow or canary rollout of the archive ``mar`` (model ``version``) against the champion serving from
    ``serving.home``; returns the deployment record of what serves afterwards, with ``rollout``.
    ``request_log``: the request log's rotation (``request_log_max_bytes``, ``request_log_max_age_s``)."""
    from components.core.data import load_splits
    from serving.client import read_token
    from serving.processes import LOOPBACK, free_ports
    from serving.rollout_router import write_rollout_file
    from serving.server import CHALLENGER_DIR, LocalTorchServe

    home = Path(serving.home).resolve()
    champion = LocalTorchServe(home)
    state = champion.status()
    endpoint, champion_version = state["endpoint"], state["model_version"]
    token = read_token(state["source_token_file"])
    strategy = settings.strategy
    _get_evidence(endpoint, token)  # a proxy that cannot route to a challenger fails here, before anything starts
    print(f"[rollout] {strategy}: challenger {version} beside champion {champion_version} at {settings.share:g} of "
          f"the predictions (at least {settings.min_requests} requests, at most {settings.max_wait_s:g} s)", flush=True)

    reference = _reference_confidences(model_dir)
    if reference:  # the drift test's imports (Evidently) take seconds: not while the evidence is timed
        from components.core.stattests import confidence_drift

        confidence_drift(reference[:50], reference[-50:])
    challenger_home = home / CHALLENGER_DIR
    LocalTorchServe(challenger_home).stop(quiet=True)  # what a crashed rollout left
    shutil.rmtree(challenger_home, ignore_errors=True)
    inference, management, metrics = free_ports(3, set())
    started = time.monotonic()
    challenger = LocalTorchServe(challenger_home)
    result: dict[str, Any] = {"strategy": strategy, "share": settings.share, "champion_version": champion_version,
                              "challenger_version": version}
    replay = None
    try:
        record_c = challenger.start(mar, serving.model_name, host=LOOPBACK, inference_port=inference,
                                    management_port=management, metrics_port=metrics, workers=serving.workers,
                                    timeout_s=serving.startup_timeout_s, request_log_dir=challenger_home / "requests",
                                    model_version=version, model_dir=model_dir, dataset_dir=dataset_dir,
                                    **request_log)
        smoked = smoke.run(record_c["endpoint"], version, token_file=record_c["source_token_file"])
        result.update(smoke_test_images=smoke.count, smoke_test_accuracy=smoked["accuracy"],
                      smoke_test_latency_ms_mean=smoked["latency_ms_mean"] or 0.0)
        if smoked["failed"]:
            decision = Decision(ROLLBACK, f"failed: smoke_test ({smoked['summary']})",
                                [CriterionResult("smoke_test", False, smoked["accuracy"], smoke.min_accuracy,
                                                 smoked["summary"] + "; " + "; ".join(smoked["problems"][:3]), True)],
                                Evidence(strategy).summary())
        else:
            result["warm_up"] = warm_up(record_c["endpoint"], record_c["source_token_file"],
                                        load_splits(dataset_dir).test_x)
            write_rollout_file(champion.rollout_file, {
                "version": version, "mode": strategy, "share": settings.share,
                "upstream": f"http://{LOOPBACK}:{inference}", "token_file": record_c["source_token_file"]})
            _wait_until_taken(endpoint, token, version, strategy)
            if settings.replay:
                replay = _Replay(endpoint, state["source_token_file"], load_splits(dataset_dir).test_x).start()
            decision = watch(endpoint, token, strategy, settings, version, reference, replay)
    except BaseException:
        if replay is not None:
            replay.stop()
        _end_challenger(home, champion, endpoint, token, version)
        raise
    finally:
        if replay is not None:
            replay.stop()
            result["requests_replayed"] = replay.sent
    result.update(decision=decision.action, reason=decision.reason, criteria=[asdict(c) for c in decision.criteria],
                  evidence=decision.evidence, seconds_to_decision=round(time.monotonic() - started, 2))
    print(f"[rollout] {decision.action.upper()} challenger {version} after {result['seconds_to_decision']:.1f} s: "
          f"{decision.reason}", flush=True)
    if decision.action == ROLLBACK:
        _end_challenger(home, champion, endpoint, token, version)
        print(f"[rollout] the champion {champion_version} serves on, unchanged: {endpoint}", flush=True)
        return {**_state_record(champion), **_smoke_fields(result), "strategy": strategy, "rollout": result}
    assert decision.action == PROMOTE
    record = promote(home, champion, endpoint, token, mar, version, model_dir, dataset_dir, serving, smoke,
                     request_log, result)
    return {**record, **_smoke_fields(result), "strategy": strategy, "rollout": result}


def _state_record(server) -> dict[str, Any]:
    return json.loads(server.state_file.read_text())


def _smoke_fields(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("smoke_test_images", "smoke_test_accuracy", "smoke_test_latency_ms_mean")}


def promote(home: Path, champion, endpoint: str, token: str, mar: Path, version: str, model_dir, dataset_dir,
            serving, smoke: SmokeTest, request_log: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Make the challenger the model served from ``home`` on the usual ports (see the module's docstring)."""
    from serving.rollout_router import write_rollout_file

    switch_started = time.monotonic()
    state = _state_record(champion)
    previous = home / "export" / PREVIOUS_MAR
    previous.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(champion.model_store / f"{state['model_name']}.mar", previous)
    spec = json.loads(champion.rollout_file.read_text())["challenger"]
    write_rollout_file(champion.rollout_file, {**spec, "mode": "canary", "share": 1.0})
    _wait_until_taken(endpoint, token, version, "canary", 1.0)
    time.sleep(0.5)  # predictions the champion's TorchServe still answers finish
    try:
        record = champion.replace_model(mar, model_version=version, model_dir=model_dir, dataset_dir=dataset_dir,
                                        timeout_s=serving.startup_timeout_s, **request_log)
        smoked = smoke.run(record["torchserve_endpoint"], version, token_file=record["key_file"])
        if smoked["failed"]:
            raise RuntimeError(f"smoke test of the promoted model on TorchServe's own port failed: {smoked['summary']}")
    except BaseException as err:
        print(f"[rollout] promotion failed ({err}); serving the champion {result['champion_version']} again", flush=True)
        try:
            champion.replace_model(previous, model_version=state["model_version"], model_dir=state.get("model_dir"),
                                   dataset_dir=state.get("dataset_dir"), timeout_s=serving.startup_timeout_s,
                                   **request_log)
        finally:
            _end_challenger(home, champion, endpoint, token, version)
        raise RuntimeError(f"the challenger {version} was to be promoted but its server did not come up on the "
                           f"usual ports: {err}. The champion {result['champion_version']} serves again.") from err
    _end_challenger(home, champion, endpoint, token, version)
    previous.unlink(missing_ok=True)
    result["switch_seconds"] = round(time.monotonic() - switch_started, 2)
    print(f"[rollout] promoted: {version} serves at {endpoint} (switch {result['switch_seconds']:.1f} s, every "
          f"prediction answered meanwhile by the challenger)", flush=True)
    return _state_record(champion)
