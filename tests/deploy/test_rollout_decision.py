"""When a challenger is promoted or rolled back (components/deploy/rollout/decision.py): one table of evidence and
settings, each row the decision it must give and the criteria that must fail; then the evidence of proxies."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import settings_of

from components.deploy.rollout.decision import (
    PROMOTE,
    ROLLBACK,
    WAIT,
    ArmStats,
    Evidence,
    decide,
    merge_proxy_evidence,
)
from pipelines.config import RolloutConfig

RNG = np.random.default_rng(0)
REFERENCE = list(1 - RNG.beta(1, 20, 400))  # confidences of a good classifier on its validation split
SAME = list(1 - RNG.beta(1, 20, 300))
SHIFTED = list(1 - RNG.beta(4, 6, 300))  # unsure on everything: the challenger sees other data, or is broken
FAST = [2.0 + 0.01 * i for i in range(300)]


def arm(requests: int, errors: int = 0, latency: float = 1.0, confidences=SAME) -> ArmStats:
    answered = requests - errors
    return ArmStats(requests, errors, [v * latency for v in FAST[:answered]], list(confidences[:answered]))


def stray(stats: ArmStats, count: int, ms: float = 40.0) -> ArmStats:
    """``count`` of the latencies made ``ms`` (the machine stalled, or the challenger is slow on some inputs)."""
    stats.latencies_ms[:count] = [ms] * count
    return stats


def evidence(strategy="shadow", champion=None, challenger=None, compared=None, agreed=None, elapsed_s=10.0,
             reference=REFERENCE) -> Evidence:
    champion = champion or arm(200)
    challenger = challenger or arm(200)
    answered = challenger.requests - challenger.errors
    compared = answered if compared is None and strategy == "shadow" else (compared or 0)
    agreed = compared if agreed is None else agreed
    return Evidence(strategy, champion, challenger, compared, agreed, reference, elapsed_s)


# (id, evidence, setting changes, decision, the criteria that must fail)
TABLE = [
    ("shadow-clean-promotes", evidence(), {}, PROMOTE, []),
    ("canary-clean-promotes", evidence("canary", champion=arm(1800)), {}, PROMOTE, []),
    ("too-few-requests-waits", evidence(challenger=arm(50)), {}, WAIT, []),
    ("error-rate-over-the-margin", evidence(challenger=arm(200, errors=4)), {}, ROLLBACK, ["error_rate"]),
    ("error-rate-certain-before-min-requests", evidence(challenger=arm(10, errors=3)), {}, ROLLBACK, ["error_rate"]),
    ("errors-not-yet-certain-wait", evidence(challenger=arm(10, errors=2)), {}, WAIT, []),
    ("the-champions-own-errors-raise-the-limit", evidence(champion=arm(200, errors=10), challenger=arm(200, errors=11)),
     {}, PROMOTE, []),
    ("a-wider-margin-allows-more", evidence(challenger=arm(200, errors=8)), {"max_error_rate_increase": 0.05}, PROMOTE,
     []),
    ("p99-over-the-ratio", evidence(challenger=arm(200, latency=2.0)), {}, ROLLBACK, ["p99_latency"]),
    ("p99-within-the-ratio", evidence(challenger=arm(200, latency=1.4)), {}, PROMOTE, []),
    ("a-few-stray-slow-requests-do-not-decide", evidence(challenger=stray(arm(200), 3)), {}, PROMOTE, []),
    ("a-slow-tail-does", evidence(challenger=stray(arm(200), 8)), {}, ROLLBACK, ["p99_latency"]),
    ("agreement-below-the-threshold", evidence(agreed=190), {}, ROLLBACK, ["agreement"]),
    ("agreement-certain-before-min-requests", evidence(challenger=arm(10), compared=10, agreed=4), {}, ROLLBACK,
     ["agreement"]),
    ("agreement-a-lower-threshold", evidence(agreed=190), {"min_agreement": 0.9}, PROMOTE, []),
    ("disagreements-exactly-at-the-allowance-are-not-certain", evidence(challenger=arm(30), compared=30, agreed=26),
     {"min_agreement": 0.9, "min_requests": 40}, WAIT, []),
    ("errors-exactly-at-the-allowance-are-not-certain", evidence(challenger=arm(30, errors=4)),
     {"max_error_rate_increase": 0.1, "min_requests": 40}, WAIT, []),
    ("agreement-judged-on-the-answered-pairs", evidence(challenger=arm(200, errors=2), compared=198, agreed=198), {},
     PROMOTE, []),
    ("agreement-does-not-apply-to-canary", evidence("canary", compared=0, agreed=0), {}, PROMOTE, []),
    ("confidence-drift-from-the-reference", evidence(challenger=arm(200, confidences=SHIFTED)), {}, ROLLBACK,
     ["confidence_drift"]),
    ("no-reference-no-drift-test", evidence(challenger=arm(200, confidences=SHIFTED), reference=None), {}, PROMOTE, []),
    ("several-criteria-fail-together", evidence(challenger=arm(200, errors=5, latency=3.0), agreed=150), {}, ROLLBACK,
     ["error_rate", "agreement"]),
    ("deadline-rolls-back-by-default", evidence(challenger=arm(50), elapsed_s=700.0), {}, ROLLBACK, []),
    ("deadline-promotes-when-told", evidence(challenger=arm(50), elapsed_s=700.0), {"on_deadline": "promote"}, PROMOTE,
     []),
    ("a-certain-failure-beats-on-deadline-promote", evidence(challenger=arm(10, errors=5), elapsed_s=700.0),
     {"on_deadline": "promote"}, ROLLBACK, ["error_rate"]),
    ("enough-evidence-decides-at-once", evidence(elapsed_s=1.0), {"max_wait_s": 600.0}, PROMOTE, []),
]


@pytest.mark.parametrize("case, data, changes, action, failing", TABLE, ids=[row[0] for row in TABLE])
def test_the_decision(case, data, changes, action, failing):
    settings = settings_of(rollout=RolloutConfig(**{"min_requests": 200, **changes})).rollout
    decision = decide(data, settings)
    assert decision.action == action, decision.reason
    failed = [c.name for c in decision.criteria if c.passed is False]
    assert set(failing) <= set(failed) and (action != ROLLBACK or failed or "deadline" in decision.reason), failed
    if action == PROMOTE and "deadline" not in decision.reason:
        assert failed == [] and decision.reason.startswith("every criterion holds")
    if action == ROLLBACK and failing:
        assert all(name in decision.reason for name in failing), "the failing criterion is named"
    if case.startswith("deadline-"):
        assert decision.reason.startswith("deadline") and f"on_deadline={settings.on_deadline}" in decision.reason
    assert decision.evidence["challenger"]["requests"] == data.challenger.requests
    assert ("compared" in decision.evidence) == (data.strategy == "shadow")


def _proxy_doc(version="v2", champion=(100, 1), challenger=(10, 0), compared=10, agreed=9, since="2026-12-01T10:00:00Z"):
    def side(requests, errors):
        return {"requests": requests, "errors": errors, "latencies_ms": [1.0] * (requests - errors),
                "confidences": [0.9] * (requests - errors)}

    return {"version": version, "mode": "shadow", "share": 0.1, "since": since, "champion": side(*champion),
            "challenger": side(*challenger), "compared": compared, "agreed": agreed, "mirror_dropped": 1,
            "predictions": 100, "sample_limit": 2048}


def test_the_evidence_of_several_proxies_is_their_sum():
    merged = merge_proxy_evidence([_proxy_doc(), _proxy_doc(champion=(50, 0), challenger=(5, 1), compared=4, agreed=4,
                                                            since="2026-12-01T09:59:59Z")])
    assert merged["proxies"] == 2 and merged["since"] == "2026-12-01T09:59:59Z" and merged["version"] == "v2"
    assert (merged["champion"]["requests"], merged["champion"]["errors"]) == (150, 1)
    assert (merged["challenger"]["requests"], merged["challenger"]["errors"]) == (15, 1)
    assert len(merged["challenger"]["latencies_ms"]) == 14
    assert (merged["compared"], merged["agreed"], merged["mirror_dropped"], merged["predictions"]) == (14, 13, 2, 200)
    built = Evidence.from_proxy(merged, "shadow", 3.0, REFERENCE)
    assert (built.challenger.requests, built.challenger.errors, built.compared, built.agreed) == (15, 1, 14, 13)
    assert built.mirror_dropped == 2 and built.elapsed_s == 3.0 and built.reference_confidences == REFERENCE
    with pytest.raises(ValueError, match="different challengers"):
        merge_proxy_evidence([_proxy_doc(), _proxy_doc(version="v3")])
    with pytest.raises(ValueError, match="no proxy evidence"):
        merge_proxy_evidence([])
