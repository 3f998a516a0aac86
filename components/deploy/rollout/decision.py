"""When a challenger is promoted or rolled back: the evidence a shadow or canary rollout gathers, the criteria
(one small registered function each) and the decision.

* A criterion that has **certainly** failed decides at once (``rollback``): more challenger errors, or more
  disagreements with the champion, than the limit allows even if every request still to come up to
  ``min_requests`` went well.
* Otherwise nothing is decided before the challenger has seen ``min_requests``; then it is ``promote`` when
  every criterion holds and ``rollback`` naming each one that does not.
* At ``max_wait_s`` without ``min_requests``, ``on_deadline`` decides (``rollback`` by default).
* ``p99_latency`` fails only when the challenger's p99 is over the limit with 95% confidence (a lower confidence
  bound from the order statistics of its latencies): the sample p99 of a few hundred requests is one of their
  few largest, and one stall of a busy machine would otherwise roll back a sound challenger.

The settings are the ``rollout`` config area (pipelines/config.py): ``strategy``, ``min_requests``,
``max_wait_s``, ``max_error_rate_increase``, ``max_p99_ratio``, ``min_agreement``, ``max_confidence_drift_p``,
``on_deadline``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"
EPSILON = 1e-9  # (1 - 0.9) * 40 is 3.9999999999999996 in floating point: 4 disagreements of 40 are still allowed


@dataclass
class ArmStats:
    """What one served version did with the requests it answered (canary) or was sent (shadow)."""

    requests: int = 0
    errors: int = 0  # 5xx answers, failed or timed-out requests, answers without a prediction
    latencies_ms: list[float] = field(default_factory=list)  # of the answered requests
    confidences: list[float] = field(default_factory=list)

    def add(self, ok: bool, latency_ms: float | None = None, confidence: float | None = None) -> None:
        self.requests += 1
        self.errors += not ok
        if ok and latency_ms is not None:
            self.latencies_ms.append(float(latency_ms))
        if ok and confidence is not None:
            self.confidences.append(float(confidence))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 3)}


@dataclass
class Evidence:
    strategy: str  # shadow or canary
    champion: ArmStats = field(default_factory=ArmStats)
    challenger: ArmStats = field(default_factory=ArmStats)
    compared: int = 0  # shadow: requests both answered, so their classes can be compared
    agreed: int = 0
    reference_confidences: list[float] | None = None  # the challenger's model reference (finetune wrote it)
    elapsed_s: float = 0.0
    mirror_dropped: int = 0  # shadow: copies the proxies dropped (their queue was full)

    def summary(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "elapsed_s": round(self.elapsed_s, 2),
                "champion": self.champion.summary(), "challenger": self.challenger.summary(),
                **({"compared": self.compared, "agreed": self.agreed, "mirror_dropped": self.mirror_dropped}
                   if self.strategy == "shadow" else {})}

    @classmethod
    def from_proxy(cls, doc: dict[str, Any], strategy: str, elapsed_s: float,
                   reference_confidences: list[float] | None = None) -> Evidence:
        """The evidence from a proxy's ``GET /rollout`` answer (or several, summed by ``merge_proxy_evidence``)."""
        def arm(raw: dict[str, Any]) -> ArmStats:
            return ArmStats(int(raw.get("requests", 0)), int(raw.get("errors", 0)),
                            [float(v) for v in raw.get("latencies_ms", ())], [float(v) for v in raw.get("confidences", ())])

        return cls(strategy, arm(doc.get("champion") or {}), arm(doc.get("challenger") or {}),
                   int(doc.get("compared", 0)), int(doc.get("agreed", 0)), reference_confidences, elapsed_s,
                   int(doc.get("mirror_dropped", 0)))


PROXY_COUNTS = ("compared", "agreed", "mirror_dropped", "predictions")


def merge_proxy_evidence(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several proxies' ``GET /rollout`` answers (several serving pods) as one: counts summed, samples joined.

    Each proxy keeps a uniform sample of at most ``sample_limit`` latencies and confidences per arm; joined, the
    samples over-represent a proxy that saw fewer requests, which is fine for pods behind one Service (they get
    alike shares). Every answer must be about the same challenger version (ValueError otherwise)."""
    if not docs:
        raise ValueError("no proxy evidence to merge")
    versions = {d.get("version") for d in docs}
    if len(versions) != 1:
        raise ValueError(f"the proxies report different challengers: {sorted(map(str, versions))}; wait until every "
                         "pod has read the same rollout file")
    merged: dict[str, Any] = {k: docs[0].get(k) for k in ("version", "mode", "share")}
    merged["since"] = min((d["since"] for d in docs if d.get("since")), default=None)
    for name in ("champion", "challenger"):
        arms = [d.get(name) or {} for d in docs]
        merged[name] = {"requests": sum(int(a.get("requests", 0)) for a in arms),
                        "errors": sum(int(a.get("errors", 0)) for a in arms),
                        "latencies_ms": [v for a in arms for v in a.get("latencies_ms", ())],
                        "confidences": [v for a in arms for v in a.get("confidences", ())]}
    for key in PROXY_COUNTS:
        merged[key] = sum(int(d.get(key, 0)) for d in docs)
    merged["proxies"] = len(docs)
    return merged


@dataclass
class CriterionResult:
    name: str
    passed: bool | None  # None: not decidable yet, or does not apply
    value: float | None
    limit: float | None
    detail: str
    certain: bool = False  # failed whatever the requests still to come do


@dataclass
class Decision:
    action: str  # promote, rollback or wait
    reason: str
    criteria: list[CriterionResult]
    evidence: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "criteria": [asdict(c) for c in self.criteria],
                "evidence": self.evidence}


CRITERIA: dict[str, Callable[[Evidence, Any], CriterionResult]] = {}


def criterion(name: str):
    def register(function):
        CRITERIA[name] = function
        return function
    return register


@criterion("error_rate")
def error_rate(evidence: Evidence, settings) -> CriterionResult:
    limit = evidence.champion.error_rate + settings.max_error_rate_increase
    arm = evidence.challenger
    # The fewest errors over min_requests that break the limit: if the challenger has them already, it is over.
    certain = arm.errors > limit * max(settings.min_requests, arm.requests) + EPSILON
    if arm.requests < settings.min_requests and not certain:
        return CriterionResult("error_rate", None, arm.error_rate, limit, f"{arm.errors} errors in {arm.requests}")
    rate = arm.error_rate
    return CriterionResult("error_rate", not certain and rate <= limit, rate, limit,
                           f"challenger {arm.errors}/{arm.requests} = {rate:.4f}, champion "
                           f"{evidence.champion.errors}/{evidence.champion.requests} = {evidence.champion.error_rate:.4f}"
                           f" + {settings.max_error_rate_increase}", certain=certain)


P99_CONFIDENCE = 0.95  # p99_latency fails only when the challenger's p99 is over the limit with this confidence


def p99_lower_bound(latencies_ms: list[float], confidence: float = P99_CONFIDENCE) -> float | None:
    """A one-sided lower confidence bound on the 99th percentile: the k-th smallest latency, k the largest with
    P(Binomial(n, 0.99) >= k) >= ``confidence`` (at least k of n requests fall below the true p99 that often).
    For 100 latencies it is the 4th largest, for 200 the 6th: a few stray slow requests do not decide."""
    from scipy.stats import binom

    if not latencies_ms:
        return None
    ordered = sorted(latencies_ms)
    k = max(1, int(binom.ppf(1 - confidence, len(ordered), 0.99)))
    return ordered[k - 1]


@criterion("p99_latency")
def p99_latency(evidence: Evidence, settings) -> CriterionResult:
    """The challenger's p99 over the champion's, at most ``max_p99_ratio``. Judged on the challenger's lower
    confidence bound (``p99_lower_bound``): on a few hundred latencies the sample p99 is one of the largest few,
    and one stall of the machine would roll back a sound challenger; the value shown is the plain ratio."""
    ours, theirs = evidence.challenger.p99_ms, evidence.champion.p99_ms
    if evidence.challenger.requests < settings.min_requests or ours is None or theirs is None:
        return CriterionResult("p99_latency", None, None, settings.max_p99_ratio, "not enough answers yet")
    bound = p99_lower_bound(evidence.challenger.latencies_ms)
    ratio, bound_ratio = ours / max(theirs, 1e-6), bound / max(theirs, 1e-6)
    return CriterionResult("p99_latency", bound_ratio <= settings.max_p99_ratio, ratio, settings.max_p99_ratio,
                           f"challenger p99 {ours:.1f} ms (at least {bound:.1f} ms with {P99_CONFIDENCE:.0%} "
                           f"confidence) / champion p99 {theirs:.1f} ms")


@criterion("agreement")
def agreement(evidence: Evidence, settings) -> CriterionResult:
    if evidence.strategy != "shadow":
        return CriterionResult("agreement", None, None, settings.min_agreement, "canary: no paired answers")
    disagreed = evidence.compared - evidence.agreed
    certain = disagreed > (1 - settings.min_agreement) * max(settings.min_requests, evidence.compared) + EPSILON
    # Undecided until the challenger has seen min_requests (its failed answers cannot be compared; the
    # error_rate criterion judges those), then judged on the pairs there are.
    if evidence.challenger.requests < settings.min_requests and not certain:
        return CriterionResult("agreement", None, None, settings.min_agreement,
                               f"{evidence.agreed}/{evidence.compared} agreed so far")
    share = evidence.agreed / evidence.compared if evidence.compared else 0.0
    return CriterionResult("agreement", not certain and share >= settings.min_agreement, share,
                           settings.min_agreement, f"{evidence.agreed}/{evidence.compared} same class as the champion",
                           certain=certain)


@criterion("confidence_drift")
def confidence_drift(evidence: Evidence, settings) -> CriterionResult:
    from components.core.stattests import confidence_drift as ks

    current = evidence.challenger.confidences
    if not evidence.reference_confidences:
        return CriterionResult("confidence_drift", None, None, settings.max_confidence_drift_p,
                               "no model reference to compare with")
    if evidence.challenger.requests < settings.min_requests or len(current) < 2:
        return CriterionResult("confidence_drift", None, None, settings.max_confidence_drift_p, "not enough answers")
    result = ks(evidence.reference_confidences, current, settings.max_confidence_drift_p)
    return CriterionResult("confidence_drift", not result["drifted"], result["p_value"],
                           settings.max_confidence_drift_p,
                           f"{result['method']} {result['p_value']:.4g} on {len(current)} confidences against the "
                           f"model reference's {len(evidence.reference_confidences)}")


def decide(evidence: Evidence, settings) -> Decision:
    """The decision now: ``rollback`` as soon as a criterion has certainly failed, else ``wait`` until
    ``min_requests`` (or ``on_deadline`` at ``max_wait_s``), then ``promote`` only if every criterion holds."""
    results = [check(evidence, settings) for check in CRITERIA.values()]
    failed = [r for r in results if r.passed is False]
    summary = evidence.summary()
    if any(r.certain for r in failed):
        return Decision(ROLLBACK, _failing(failed), results, summary)
    if evidence.challenger.requests >= settings.min_requests:
        if failed:
            return Decision(ROLLBACK, _failing(failed), results, summary)
        return Decision(PROMOTE, "every criterion holds: " + ", ".join(r.name for r in results if r.passed), results,
                        summary)
    if evidence.elapsed_s >= settings.max_wait_s:
        action = PROMOTE if settings.on_deadline == "promote" else ROLLBACK
        return Decision(action, f"deadline: {evidence.challenger.requests} of {settings.min_requests} requests after "
                                f"{settings.max_wait_s:g} s (on_deadline={settings.on_deadline})", results, summary)
    return Decision(WAIT, f"{evidence.challenger.requests} of {settings.min_requests} requests", results, summary)


def _failing(failed: list[CriterionResult]) -> str:
    return "failed: " + "; ".join(f"{r.name} ({r.detail}; limit {r.limit})" for r in failed)
