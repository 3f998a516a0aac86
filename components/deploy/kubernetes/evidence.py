"""The evidence of a shadow or canary rollout on the cluster: every ready stable pod's auth proxy answers
``GET /rollout`` (with the pipeline's source token) for the requests it saw since its rollout file named the
challenger; the evidence of all of them, summed, is what ``decision.decide`` judges.

Pods come and go while a rollout runs (the HPA, a node drain): the last answer of every pod that ever answered
is kept, so requests a pod saw still count after it is gone; a proxy that restarted (its ``since`` changed)
starts a new tally, added to its old one. A pod that does not answer one poll keeps its last answer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from components.deploy.kubernetes.release import DeployError
from components.deploy.rollout.decision import ArmStats, Evidence

ROLLOUT_PATH = "/rollout"
ARMS = ("champion", "challenger")
COUNTS = ("compared", "agreed", "mirror_dropped")
# Answers that waiting does not change: the proxy refuses the pipeline's token (the Secrets differ), or it
# routes to no challenger whatever its rollout file says (no --rollout-file, or an image older than rollouts).
# A proxy that routes to no challenger (yet) answers 200 with "version": null (serving/rollout_router.py).
HOPELESS_STATUS = {401: "refuses the pipeline's source token (is the Secret kfp-mlops-serving-source-token the one "
                        "the step mounts?)",
                   403: "refuses the pipeline's source token for GET /rollout",
                   404: "has no rollout file (started without --rollout-file, or from an image older than shadow "
                        "and canary rollouts): apply the manifests of this version and rebuild the serving image"}


class ProxyAnswer(Exception):
    """A pod's proxy answered GET /rollout with an HTTP error."""

    def __init__(self, status: int, text: str = ""):
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status


def fetch_rollout(url: str, token: str, timeout_s: float = 5.0) -> dict:
    """``GET url`` with the bearer token; the JSON answer. Never through an HTTP proxy (pod IPs are in-cluster).
    Raises ``ProxyAnswer`` for an HTTP error, ``OSError``/``requests`` errors when the pod does not answer."""
    import requests

    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
    if answer.status_code != 200:
        raise ProxyAnswer(answer.status_code, answer.text)
    return answer.json()


def pod_url(pod: dict, port: int) -> str | None:
    """``http://<pod IP>:<port>/rollout``, or None when the pod has no IP yet."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{ROLLOUT_PATH}"


def is_ready(pod: dict) -> bool:
    """Ready as the endpoints controller sees it: the Ready condition is True and the pod is not being deleted."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _arm(data: Any, where: str) -> ArmStats:
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not an object")
    requests, errors = data.get("requests", 0), data.get("errors", 0)
    if not (isinstance(requests, int) and isinstance(errors, int) and 0 <= errors <= requests):
        raise ValueError(f"{where}: requests {requests!r} and errors {errors!r} are not counts with errors <= requests")
    samples = {}
    for key in ("latencies_ms", "confidences"):
        values = data.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{where}.{key} is not a list of numbers")
        samples[key] = [float(v) for v in values]
    return ArmStats(requests, errors, samples["latencies_ms"], samples["confidences"])


@dataclass
class Tally:
    """One proxy's answer since its rollout file named the challenger."""

    since: Any
    champion: ArmStats
    challenger: ArmStats
    counts: dict[str, int]

    @classmethod
    def parse(cls, answer: Any, version: str, mode: str) -> "Tally | None":
        """The answer as a tally of ``version``; None when the proxy does not route to it (yet, or any more).
        Raises ``ValueError`` for an answer that is not the proxy's evidence."""
        if not isinstance(answer, dict) or answer.get("version") != version:
            return None
        if answer.get("mode") not in (None, mode):
            raise ValueError(f"the proxy routes version {version} as {answer.get('mode')!r}, not {mode!r}")
        counts = {}
        for key in COUNTS:
            value = answer.get(key, 0) or 0
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} {value!r} is not a count")
            counts[key] = value
        if counts["agreed"] > counts["compared"]:
            raise ValueError(f"agreed {counts['agreed']} > compared {counts['compared']}")
        return cls(answer.get("since"), _arm(answer.get("champion", {}), "champion"),
                   _arm(answer.get("challenger", {}), "challenger"), counts)


def _add(total: ArmStats, arm: ArmStats) -> None:
    total.requests += arm.requests
    total.errors += arm.errors
    total.latencies_ms.extend(arm.latencies_ms)
    total.confidences.extend(arm.confidences)


@dataclass
class EvidenceBook:
    """Every proxy's latest tally, by pod uid and ``since``; summed into one ``Evidence``."""

    strategy: str
    version: str
    reference_confidences: list[float] | None = None
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    pod_names: dict[str, str] = field(default_factory=dict)  # uid -> name

    def record(self, pod: dict, answer: Any) -> bool:
        """Keep a pod's answer; True when it routes to this rollout's challenger."""
        tally = Tally.parse(answer, self.version, self.strategy)
        if tally is None:
            return False
        uid = pod["metadata"].get("uid") or pod["metadata"]["name"]
        self.pod_names[uid] = pod["metadata"]["name"]
        self.tallies[(uid, str(tally.since))] = tally
        return True

    def evidence(self, elapsed_s: float) -> Evidence:
        evidence = Evidence(self.strategy, reference_confidences=self.reference_confidences, elapsed_s=elapsed_s)
        for tally in self.tallies.values():
            _add(evidence.champion, tally.champion)
            _add(evidence.challenger, tally.challenger)
            evidence.compared += tally.counts["compared"]
            evidence.agreed += tally.counts["agreed"]
        return evidence

    def per_pod(self) -> dict[str, dict[str, int]]:
        """Requests each pod's proxy counted (all its tallies), for the record."""
        out: dict[str, dict[str, int]] = {}
        for (uid, _), tally in sorted(self.tallies.items()):
            entry = out.setdefault(self.pod_names[uid], {"champion": 0, "challenger": 0, "mirror_dropped": 0})
            entry["champion"] += tally.champion.requests
            entry["challenger"] += tally.challenger.requests
            entry["mirror_dropped"] += tally.counts["mirror_dropped"]
        return out


@dataclass
class PollResult:
    ready: int = 0  # ready stable pods
    routing: int = 0  # of them, answering for this rollout's challenger
    silent: list[str] = field(default_factory=list)  # "pod: why" for those that did not answer


def poll_pods(pods: list[dict], port: int, token: str, book: EvidenceBook,
              fetch: Callable[[str, str], Any]) -> PollResult:
    """Ask every ready pod's proxy for its evidence once and keep what they answer. Raises ``DeployError`` for an
    answer no waiting changes (the token refused)."""
    result = PollResult()
    for pod in pods:
        if not is_ready(pod):
            continue
        url = pod_url(pod, port)
        if url is None:
            continue
        result.ready += 1
        name = pod["metadata"]["name"]
        try:
            answer = fetch(url, token)
        except ProxyAnswer as err:
            if err.status in HOPELESS_STATUS:
                raise DeployError(f"pod {name}'s auth proxy {HOPELESS_STATUS[err.status]}: GET {url} answered "
                                  f"{err}") from None
            result.silent.append(f"{name}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - a pod that does not answer now may answer at the next poll
            result.silent.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
            continue
        try:
            result.routing += book.record(pod, answer)
        except ValueError as err:
            result.silent.append(f"{name}: not the proxy's rollout evidence ({err})")
    return result


def reference_confidences(model_dir: str | Path) -> list[float] | None:
    """The confidences of the challenger's model reference (``reference_model.csv``, written with the model at
    training time), for the confidence-drift criterion; None when the model has none."""
    from components.core.features import MODEL_REFERENCE_FILE

    path = Path(model_dir) / MODEL_REFERENCE_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        values = [float(row["confidence"]) for row in csv.DictReader(f) if row.get("confidence") not in (None, "")]
    return values or None
