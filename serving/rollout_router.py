"""The auth proxy's challenger: canary routing, shadow mirroring, and the evidence a rollout decides on.

``python -m serving.auth_proxy ... --rollout-file PATH`` names a JSON file, re-read when it changes (at most
once a second, like the token files); absent or ``{}`` means no challenger::

    {"challenger": {"version": "<model version>", "mode": "shadow" | "canary", "share": 0.1,
                    "upstream": "http://HOST:PORT", "token_file": "/path/to/token"}}

``upstream`` is the challenger's own auth proxy (in front of its TorchServe). Requests for it are written anew
from the checked parts of the client's request, like every request the proxy forwards, with
``Authorization: Bearer <first line of token_file>`` and ``X-Request-Source: shadow`` or ``canary``: the
challenger's proxy must accept that token as a source token, and its request log tells the two apart from
client traffic. Only ``POST /predictions/...`` takes part; explanations and pings always go to the champion.

* **canary**: each prediction is answered by the challenger with probability ``share``. A challenger that fails
  (no answer, a 5xx, a time-out) is counted as an error, and the request is then answered by the champion.
* **shadow**: every answer comes from the champion. With probability ``share`` a copy of the request leaves for
  the challenger with it, as a task of its own on the proxy's event loop: the client's answer never waits for
  the copy, and both versions answer the request under the same load of the machine (a copy sent after the
  champion's answer would meet the client's next request, and the challenger alone would be timed under
  contention). At most ``MIRROR_IN_FLIGHT`` copies and ``MIRROR_IN_FLIGHT_BYTES`` of bodies are on their way at
  once; beyond, a copy is dropped and counted. Each mirrored pair is compared: the champion's and the
  challenger's ``class_index``.

The champion's answers never depend on the challenger: in shadow nothing it does reaches a client; in canary
its failures are answered by the champion.

``GET /rollout`` (only with a source token) answers the evidence for the current challenger version since the
rollout file named it; summing the numbers (and joining the samples) of several proxies gives the evidence of
them all::

    {"version", "mode", "share", "since", "champion": {"requests", "errors", "latencies_ms": [...],
     "confidences": [...]}, "challenger": {...}, "compared", "agreed", "mirror_dropped", "predictions",
     "sample_limit"}

``requests`` are the prediction requests an arm answered (canary) or was sent (shadow; the champion's arm then
counts the mirrored requests only, so both arms cover the same requests); ``errors`` are failed or timed-out
requests, 5xx answers, 200 answers without a ``class_index`` and, in shadow, a non-2xx answer where the champion
answered 2xx; ``predictions`` counts every prediction request the proxy took while the challenger was named.
Latencies are TorchServe's time as its own proxy saw it, in ms: the champion's proxy times its TorchServe, and
the challenger's proxy reports its own in ``Server-Timing: upstream;dur=...`` (every proxy adds that field to
its answers for source tokens; it never reaches a client from the challenger), so the hop between the proxies
does not count against the challenger; without the field, the round trip counts. Latencies and confidences are
uniform samples of at most ``SAMPLE_LIMIT`` per arm (reservoir sampling), so memory stays bounded however long
a rollout runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import httptools

from components.core.localfiles import atomic_write_json
from serving.http_framing import Response, Upstream, encode_request
from serving.proxy_files import MIN_TOKEN_CHARS

ROLLOUT_PATH = "/rollout"  # the evidence, for a source token
MODES = ("shadow", "canary")
SOURCE_FIELD = "x-request-source"
SAMPLE_LIMIT = 2048  # latencies and confidences kept per arm
MIRROR_IN_FLIGHT = 64  # mirrored copies on their way to the challenger at once; more are dropped and counted
MIRROR_IN_FLIGHT_BYTES = 16 * 1024 * 1024  # and their bodies, at most
_UPSTREAM_TIMING = re.compile(r"(?:^|,)\s*upstream\s*;\s*dur=([0-9]+(?:\.[0-9]+)?)")
IDLE_CHALLENGER_CONNECTIONS = 32
FAILED = object()  # the champion failed a mirrored request  # kept-alive canary connections to the challenger, at most


def log(message: str) -> None:
    print(f"[auth-proxy] {message}", flush=True)


@dataclass(frozen=True)
class Challenger:
    version: str
    mode: str
    share: float
    upstream: str
    token_file: str
    host: str
    port: int
    token: str


def _read_token(path: str) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read the challenger's token file {path}: {err}") from None
    token = next((line.strip() for line in lines if line.strip()), "")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the challenger's token file {path} holds no token of at least {MIN_TOKEN_CHARS} characters")
    return token


def parse_rollout(doc: Any, where: str) -> Challenger | None:
    """The challenger a rollout file names (None for ``{}``); ValueError saying what is wrong otherwise."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    if not doc or doc.get("challenger") is None:
        if set(doc) - {"challenger"}:
            raise ValueError(f"{where}: unknown keys {sorted(set(doc) - {'challenger'})}; expected 'challenger'")
        return None
    spec = doc["challenger"]
    keys = {"version", "mode", "share", "upstream", "token_file"}
    if not isinstance(spec, dict) or set(spec) != keys:
        raise ValueError(f"{where}: 'challenger' must be an object with exactly {sorted(keys)}")
    version, mode, share, upstream, token_file = (spec[k] for k in ("version", "mode", "share", "upstream", "token_file"))
    if not isinstance(version, str) or not version or len(version) > 128:
        raise ValueError(f"{where}: 'version' must be a non-empty string")
    if mode not in MODES:
        raise ValueError(f"{where}: 'mode' must be one of {MODES}, got {mode!r}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ValueError(f"{where}: 'share' must be a number in (0, 1], got {share!r}")
    parts = urlsplit(upstream) if isinstance(upstream, str) else None
    if parts is None or parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{where}: 'upstream' must be http://HOST:PORT (the challenger's auth proxy), got {upstream!r}")
    if not isinstance(token_file, str) or not token_file:
        raise ValueError(f"{where}: 'token_file' must be a path")
    return Challenger(version, mode, float(share), upstream, token_file, parts.hostname, parts.port or 80,
                      _read_token(token_file))


class RolloutFile:
    """The rollout file, re-read when its identity (inode, size, mtime) changes, at most once per ``check_every_s``.

    Absent means no challenger. A broken update keeps the challenger read last (and says why), as a broken token
    update keeps the tokens; at start a broken file is an error (the proxy does not start)."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0):
        self.path, self.check_every_s = Path(path), check_every_s
        self._stamp: tuple | None = None
        self._checked_at = -float("inf")
        self.challenger: Challenger | None = None
        self.current(strict=True)

    def current(self, strict: bool = False) -> Challenger | None:
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            return self.challenger
        self._checked_at = now
        try:
            st = self.path.stat()
            stamp: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as err:
            if strict:
                raise ValueError(f"cannot read the rollout file {self.path}: {err}") from None
            return self.challenger
        if stamp == self._stamp:
            return self.challenger
        try:
            challenger = None if stamp is None else parse_rollout(json.loads(self.path.read_text() or "{}"),
                                                                  str(self.path))
        except (OSError, ValueError) as err:
            if strict:
                raise ValueError(str(err)) from None
            log(f"keeping the previous challenger: {err}")
            self._stamp = stamp  # said once; the next change is read again
            return self.challenger
        self._stamp = stamp
        if challenger != self.challenger:
            log(f"challenger: {challenger.mode} of model version {challenger.version} at {challenger.share:g} of the "
                f"predictions via {challenger.upstream}" if challenger else "no challenger")
        self.challenger = challenger
        return challenger


class Arm:
    """What one served version did: counts, and reservoir samples of its latencies and confidences."""

    __slots__ = ("requests", "errors", "latencies_ms", "confidences", "_latency_seen", "_confidence_seen", "_random")

    def __init__(self, rng: random.Random):
        self.requests = self.errors = self._latency_seen = self._confidence_seen = 0
        self.latencies_ms: list[float] = []
        self.confidences: list[float] = []
        self._random = rng

    def _keep(self, sample: list[float], seen: int, value: float) -> None:
        if len(sample) < SAMPLE_LIMIT:
            sample.append(value)
        else:
            slot = self._random.randrange(seen)
            if slot < SAMPLE_LIMIT:
                sample[slot] = value

    def add(self, ok: bool, latency_ms: float | None = None, confidence: float | None = None) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
            return
        if latency_ms is not None:
            self._latency_seen += 1
            self._keep(self.latencies_ms, self._latency_seen, round(latency_ms, 3))
        if confidence is not None:
            self._confidence_seen += 1
            self._keep(self.confidences, self._confidence_seen, round(confidence, 6))

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "latencies_ms": list(self.latencies_ms),
                "confidences": list(self.confidences)}


class Evidence:
    """The evidence for one challenger version (and mode), from when the rollout file named it."""

    def __init__(self, challenger: Challenger):
        rng = random.Random()
        self.version, self.mode, self.share = challenger.version, challenger.mode, challenger.share
        self.since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.champion, self.challenger = Arm(rng), Arm(rng)
        self.compared = self.agreed = self.mirror_dropped = self.predictions = 0

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "mode": self.mode, "share": self.share, "since": self.since,
                "champion": self.champion.as_dict(), "challenger": self.challenger.as_dict(),
                "compared": self.compared, "agreed": self.agreed, "mirror_dropped": self.mirror_dropped,
                "predictions": self.predictions, "sample_limit": SAMPLE_LIMIT}


def no_evidence() -> dict[str, Any]:
    empty = {"requests": 0, "errors": 0, "latencies_ms": [], "confidences": []}
    return {"version": None, "mode": None, "share": None, "since": None, "champion": dict(empty),
            "challenger": dict(empty), "compared": 0, "agreed": 0, "mirror_dropped": 0, "predictions": 0,
            "sample_limit": SAMPLE_LIMIT}


def prediction_of(answer: Response | None) -> tuple[bool, int | None, float | None]:
    """(whether the answer is a good prediction, its class_index, its confidence)."""
    if answer is None or answer.status >= 500:
        return False, None, None
    if answer.status != 200:
        return True, None, None  # the client's mistake (4xx): answered, no prediction to compare
    try:
        doc = json.loads(answer.body)
        index, confidence = doc["class_index"], doc.get("confidence")
        if isinstance(index, bool) or not isinstance(index, int):
            return False, None, None
        return True, index, float(confidence) if isinstance(confidence, (int, float)) else None
    except (ValueError, KeyError, TypeError):
        return False, None, None


def _upstream_ms(answer: Response | None, started: float) -> float:
    """How long the answer took its TorchServe: the ``Server-Timing: upstream;dur=`` a proxy adds for source tokens
    (the champion's proxy measures its own TorchServe the same way), else the time since ``started`` (then it
    includes the hop to the challenger's proxy). The field is removed: a client never sees the challenger's."""
    if answer is not None:
        for value in answer.drop("server-timing") if answer.upstream_ms is None else ():
            match = _UPSTREAM_TIMING.search(value)
            if match:
                return float(match.group(1))
        if answer.upstream_ms is not None:
            return answer.upstream_ms
    return (time.perf_counter() - started) * 1000


def json_response(status: int, doc: dict[str, Any]) -> Response:
    """An answer of the proxy's own, shaped like an upstream's (so the proxy relays it the same way)."""
    answer = Response()
    answer.status, answer.complete, answer.http_1_1 = status, True, True
    answer.headers, answer.names = [("Content-Type", "application/json")], ["content-type"]
    answer.body_parts = [json.dumps(doc, separators=(",", ":")).encode()]
    return answer


@dataclass
class _Mirrored:
    evidence: Evidence
    challenger: Challenger
    request: bytes
    champion: asyncio.Future  # (its answer, its latency); (FAILED, None): it failed; (None, None): client gone


class RolloutRouter:
    """The challenger side of one proxy: routing, mirroring and evidence. Lives on the proxy's event loop."""

    def __init__(self, path: str | Path, timeout_s: float, check_every_s: float = 1.0):
        self.file = RolloutFile(path, check_every_s)
        self.timeout_s = timeout_s
        self._evidence: Evidence | None = None
        self._tasks: set[asyncio.Task] = set()  # mirrored copies in flight
        self._in_flight = self._in_flight_bytes = 0
        self._idle: list[Upstream] = []  # kept-alive connections to the challenger (canary)
        self._random = random.Random()

    def challenger(self) -> Challenger | None:
        challenger = self.file.current()
        if self._idle and (challenger is None or (self._idle[0].host, self._idle[0].port) != (challenger.host,
                                                                                            challenger.port)):
            for upstream in self._idle:  # kept-alive connections to a challenger no longer named
                upstream.close()
            self._idle = []
        if challenger is None:
            self._evidence = None
        elif self._evidence is None or (self._evidence.version, self._evidence.mode) != (challenger.version,
                                                                                       challenger.mode):
            self._evidence = Evidence(challenger)
        elif self._evidence.share != challenger.share:
            self._evidence.share = challenger.share
        return challenger

    def evidence(self) -> dict[str, Any]:
        self.challenger()
        return self._evidence.as_dict() if self._evidence is not None else no_evidence()

    @staticmethod
    def _request_for(challenger: Challenger, method: str, target: str, fields: list[tuple[str, str]],
                     body: bytes) -> bytes:
        host = f"[{challenger.host}]" if ":" in challenger.host else challenger.host
        host = f"{host}:{challenger.port}"
        kept = [(name, value) for name, value in fields if name.lower() != SOURCE_FIELD]
        return encode_request(method, target, host, [*kept, ("Authorization", f"Bearer {challenger.token}"),
                                                     ("X-Request-Source", challenger.mode)], body)

    async def answer(self, method: str, target: str, fields: list[tuple[str, str]], body: bytes,
                     champion: Callable[[], Awaitable[Response]]) -> Response:
        """The client's answer to one prediction request; ``champion`` forwards it to the champion's TorchServe."""
        challenger = self.challenger()
        if challenger is None:
            return await champion()
        evidence = self._evidence
        evidence.predictions += 1
        chosen = self._random.random() < challenger.share
        if challenger.mode == "canary" and chosen:
            started = time.perf_counter()
            answer = await self._exchange(challenger, self._request_for(challenger, method, target, fields, body))
            ok, _, confidence = prediction_of(answer)
            evidence.challenger.add(ok, _upstream_ms(answer, started), confidence)
            if ok:
                return answer
        # shadow: the copy leaves with the request, so both versions answer it under the same load of the machine
        pair = self._mirror(evidence, challenger, self._request_for(challenger, method, target, fields, body)) \
            if challenger.mode == "shadow" and chosen else None
        started, answer = time.perf_counter(), None
        try:
            answer = await champion()
        except Exception:
            if challenger.mode == "canary":
                evidence.champion.add(False)
            if pair is not None:
                pair.set_result((FAILED, None))
            raise
        finally:  # the copy's task waits for this answer (None: the client went away, no pair)
            if pair is not None and not pair.done():
                pair.set_result((answer, _upstream_ms(answer, started)) if answer is not None else (None, None))
        if challenger.mode == "canary":
            ok, _, confidence = prediction_of(answer)
            evidence.champion.add(ok, _upstream_ms(answer, started), confidence)
        return answer

    async def _exchange(self, challenger: Challenger, request: bytes) -> Response | None:
        """The challenger's answer, or None when it gave none in time (a kept-alive connection is reused)."""
        upstream = next((u for u in self._idle if (u.host, u.port) == (challenger.host, challenger.port)), None)
        if upstream is not None:
            self._idle.remove(upstream)
        else:
            upstream = Upstream(challenger.host, challenger.port)
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await upstream.exchange(request, self.timeout_s)
        except (OSError, TimeoutError, httptools.HttpParserError, httptools.HttpParserUpgrade):
            upstream.close()
            return None
        if len(self._idle) < IDLE_CHALLENGER_CONNECTIONS:
            self._idle.append(upstream)
        else:
            upstream.close()
        return answer

    # -- shadow: the copies, sent in the background
    def _mirror(self, evidence: Evidence, challenger: Challenger, request: bytes) -> asyncio.Future | None:
        """Send a copy to the challenger as a task of its own; the future takes the champion's answer for the
        comparison. None when too many copies are on their way (the copy is dropped and counted)."""
        if self._in_flight >= MIRROR_IN_FLIGHT or self._in_flight_bytes + len(request) > MIRROR_IN_FLIGHT_BYTES:
            evidence.mirror_dropped += 1
            return None
        self._in_flight += 1
        self._in_flight_bytes += len(request)
        loop = asyncio.get_running_loop()
        pair = loop.create_future()
        task = loop.create_task(self._send_mirrored(_Mirrored(evidence, challenger, request, pair)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pair

    async def _send_mirrored(self, item: _Mirrored) -> None:
        try:
            started = time.perf_counter()
            answer = await self._exchange(item.challenger, item.request)
            elapsed_ms = _upstream_ms(answer, started)
            champion, champion_ms = await item.champion
            if champion is not None and self._evidence is item.evidence:  # else: no pair, or the file changed
                self._record_pair(item.evidence, None if champion is FAILED else champion, champion_ms, answer,
                                  elapsed_ms)
        except Exception as err:  # noqa: BLE001 - one copy must not take anything else down
            log(f"a mirrored request failed in the proxy: {type(err).__name__}: {err}")
        finally:
            self._in_flight -= 1
            self._in_flight_bytes -= len(item.request)

    @staticmethod
    def _record_pair(evidence: Evidence, champion: Response | None, champion_ms: float | None,
                     answer: Response | None, elapsed_ms: float) -> None:
        """One mirrored request's two outcomes (``champion`` None: the champion failed it)."""
        ok_a, class_a, confidence_a = prediction_of(champion)
        ok_b, class_b, confidence_b = prediction_of(answer)
        if ok_b and answer is not None and champion is not None and 200 <= champion.status < 300 and \
                not 200 <= answer.status < 300:
            ok_b = False  # the champion answered it: a refusal is the challenger's failure
        evidence.champion.add(ok_a, champion_ms, confidence_a)
        evidence.challenger.add(ok_b, elapsed_ms, confidence_b)
        if class_a is not None and class_b is not None:
            evidence.compared += 1
            evidence.agreed += class_a == class_b

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for upstream in self._idle:
            upstream.close()
        self._idle = []


def write_rollout_file(path: str | Path, challenger: dict[str, Any] | None) -> None:
    """Write a rollout file atomically (a reader never sees half of it); None writes ``{}`` (no challenger)."""
    doc = {} if challenger is None else {"challenger": challenger}
    if challenger is not None:
        parse_rollout(doc, str(path))  # refuse to write what the proxy would refuse to read
    atomic_write_json(path, doc)
