"""The release ledger: an append-only history of what was trained, gated, released, promoted, rolled back, seen
drifting and retrained, each record pointing to the records it follows from.

It lives beside the model store: a local directory (the default, ``<serving.home>/ledger``) or an ``s3://``
prefix (a cluster's, ``KFP_MLOPS_LEDGER`` in the storage ConfigMap); ``location`` says which. Laid out as::

    records/<seq>.json      one record per event; seq = 0000000001, 0000000002, ...

Appending is a conditional create of the next sequence number: on S3 ``Storage.write_if_unchanged`` with nothing
expected (``If-None-Match: *``); locally the record is written to a temporary file, fsynced, and hard-linked to
its name, which fails if the name exists (``link(2)`` is atomic and needs no lock file, so writers of other users
sharing the directory, such as the docker runner's step containers, cannot block each other). Two writers that
pick the same number do not overwrite each other: the loser sees the conflict and takes the next number, so no
record is ever lost, and the order of the numbers is the order of the appends. A crash leaves either a whole
record or none (S3 PUTs are atomic; a local record appears only complete); what a killed writer leaves behind
(``.<seq>.json.tmp-*``) is not a record and readers skip it.

Each record is ``{"format", "seq", "id", "type", "at", "actor", "parents", "data"}``; ``id`` is the zero-padded
sequence number, ``parents`` the ids it follows from (each must already be in the ledger). What ``data`` holds
per type is ``REQUIRED`` below (more keys are allowed): from a released model version one can walk back to its
run, data and gates (``lineage``), and from a drift record forward to the retrain and the release that followed
(``descendants``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from components.core.blobs import Storage, WriteConflictError, is_s3, join
from components.core.localfiles import fsync_directory
from components.core.names import LEDGER_ENV

FORMAT = "kfp-mlops/ledger-v1"
RECORDS_DIR = "records"
SEQ_DIGITS = 10
MAX_APPEND_ATTEMPTS = 1000  # conflicts in a row before giving up: only a runaway writer gets there
PARALLEL_READS = 16  # S3 GETs at once when a reader first loads many records
# Each event type and the keys its data must hold.
REQUIRED: dict[str, tuple[str, ...]] = {
    "trained": ("run_id", "model_version", "config", "config_sha256"),
    "gated": ("run_id", "model_version", "gates", "passed"),
    "released": ("model_name", "model_version", "target", "endpoint", "strategy"),
    "promoted": ("model_version", "reason"),
    "rolled_back": ("model_version", "reason"),
    "drift": ("model_version", "window", "drift_detected"),
    "retrain_started": ("run",),
}
TYPES = tuple(REQUIRED)
# A release with one of these strategies serves at once; a shadow or canary release serves only once promoted.
SERVES_AT_ONCE = ("replace", "rollback", "promote")
# What the pipeline run puts in the environment of its steps, so the ``trained`` record names what ran:
RUN_ID_ENV = "KFP_MLOPS_RUN_ID"  # mlops run's own run id (runs/<run-id>), which kfp.local does not know
IMAGE_ENV = "KFP_MLOPS_IMAGE"  # mlops run --runner docker: the pipeline image the steps run in ...
IMAGE_ID_ENV = "KFP_MLOPS_IMAGE_ID"  # ... and its id on the engine


class LedgerError(RuntimeError):
    """A record that cannot be written or read as the ledger's format says, or a ledger that cannot be found."""


@dataclass(frozen=True)
class Record:
    seq: int
    type: str
    at: str
    actor: str
    parents: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return record_id(self.seq)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "seq": self.seq, "id": self.id, "type": self.type, "at": self.at,
                "actor": self.actor, "parents": list(self.parents), "data": self.data}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Record:
        if (not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("type") not in REQUIRED
                or not isinstance(raw.get("seq"), int) or not isinstance(raw.get("data", {}), dict)):
            raise LedgerError(f"{where} is not a {FORMAT} record")
        return cls(raw["seq"], raw["type"], str(raw.get("at", "")), raw.get("actor", ""),
                   tuple(raw.get("parents", ())), dict(raw.get("data", {})))


def record_id(seq: int) -> str:
    return f"{seq:0{SEQ_DIGITS}d}"


def default_actor() -> str:
    """Who appends: ``user@host`` (a person at the CLI, or the step's pod)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def config_sha256(config: dict[str, Any]) -> str:
    """The hash a ``trained`` record keeps of its config: sha256 of the canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def location(serving: Any, environ: Mapping[str, str] | None = None) -> str:
    """Where the ledger of these serving settings (``cfg.serving``) is: ``serving.ledger_uri``, else
    ``$KFP_MLOPS_LEDGER`` (the storage ConfigMap's on a cluster), else ``<serving.home>/ledger`` for a local
    server. On Kubernetes a pod's own directory would vanish with it, so there one of the first two is needed."""
    environ = os.environ if environ is None else environ
    given = str(getattr(serving, "ledger_uri", "") or "").strip() or environ.get(LEDGER_ENV, "").strip()
    if given:
        return given if is_s3(given) else str(Path(given).expanduser().resolve())
    if getattr(serving, "deploy_target", "local") == "kubernetes":
        raise LedgerError(f"no release ledger: set serving.ledger_uri or {LEDGER_ENV} in the kfp-mlops-storage "
                          "ConfigMap to an s3:// prefix the pipeline may write (docs/releases.md)")
    return str(Path(serving.home).expanduser().resolve() / "ledger")


def prepare_directory(serving: Any, owner: tuple[int, int] | None = None) -> Path | None:
    """Make a local ledger's directories (handed to ``owner``, a uid and gid, when given), e.g. before they are
    mounted into the step containers of ``mlops run --runner docker``; None for an ``s3://`` ledger."""
    where = location(serving)
    if is_s3(where):
        return None
    path = Path(where)
    (path / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for directory in (path, path / RECORDS_DIR):
            os.chown(directory, *owner)
    return path


class Ledger:
    """The ledger at ``base`` (a directory or an ``s3://`` prefix)."""

    def __init__(self, base: str | os.PathLike, storage: Storage | None = None):
        self.base = str(base)
        self.storage = storage or Storage()
        self._cache: dict[int, Record] = {}
        self._pinned: list[int] | None = None  # the listing reads use inside ``pinned()``

    def __repr__(self) -> str:
        return f"Ledger({self.base!r})"

    def _uri(self, seq: int) -> str:
        return join(self.base, RECORDS_DIR, f"{record_id(seq)}.json")

    def _stored_seqs(self) -> list[int]:
        prefix = join(self.base, RECORDS_DIR)
        if not is_s3(self.base) and not os.path.isdir(prefix):
            return []
        # On S3 a missing bucket raises (BucketNotFoundError): an empty ledger must not hide a wrong address.
        names = [uri.rsplit("/", 1)[-1] for uri in self.storage.list(prefix)]
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    # -- writing

    def append(self, type: str, data: dict[str, Any], parents: Iterable[str | Record] = (),
               actor: str | None = None) -> Record:
        """Append one record; returns it with its sequence number. Raises ``LedgerError`` on a bad record."""
        if type not in REQUIRED:
            raise LedgerError(f"unknown record type {type!r}; one of {', '.join(TYPES)}")
        missing = [key for key in REQUIRED[type] if key not in data]
        if missing:
            raise LedgerError(f"a {type} record needs {', '.join(missing)}")
        raw_parents = [p.id if isinstance(p, Record) else str(p) for p in parents]
        json.dumps(data)  # fail here, not halfway through a write, when data is not JSON
        seqs = self._stored_seqs()
        seq = (seqs[-1] if seqs else 0) + 1
        stored = set(seqs)
        unknown = [p for p in raw_parents if not p.isdigit() or int(p) not in stored]
        if unknown:
            raise LedgerError(f"parents {unknown} are not records of {self.base}")
        parent_ids = tuple(dict.fromkeys(record_id(int(p)) for p in raw_parents))
        for _ in range(MAX_APPEND_ATTEMPTS):
            record = Record(seq, type, _now(), actor or default_actor(), parent_ids, data)
            body = json.dumps(record.as_dict(), indent=1, sort_keys=True).encode() + b"\n"
            try:
                self._create(self._uri(seq), body)
            except WriteConflictError:  # another writer took this number: ours is the next one
                seq += 1
                continue
            self._cache[seq] = record
            if self._pinned is not None:
                self._pinned = sorted({*self._pinned, seq})
            return record
        raise LedgerError(f"could not append to {self.base}: {MAX_APPEND_ATTEMPTS} numbers taken in a row")

    def _create(self, uri: str, body: bytes) -> None:
        """Create ``uri`` with ``body`` unless it exists (``WriteConflictError``); all or nothing."""
        if is_s3(uri):
            self.storage.write_if_unchanged(uri, body, None)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise WriteConflictError(f"{uri} exists") from None
        finally:
            tmp.unlink(missing_ok=True)
        fsync_directory(path.parent)

    # -- reading

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Ledger]:
        """Reads inside the block see the ledger as listed when it began (plus this object's own appends): one
        listing for a view that reads it many times, instead of one per read."""
        outer = self._pinned
        if outer is None:
            self._pinned = self._stored_seqs()
        try:
            yield self
        finally:
            self._pinned = outer

    def _read(self, seq: int) -> Record:
        uri = self._uri(seq)
        try:
            raw = json.loads(self.storage.read_bytes(uri))
        except ValueError as err:
            raise LedgerError(f"{uri} is not JSON ({err})") from None
        record = Record.from_dict(raw, uri)
        if record.seq != seq:
            raise LedgerError(f"{uri} holds record {record.seq}")
        return record

    def records(self) -> list[Record]:
        """Every record, oldest first."""
        seqs = self._stored_seqs() if self._pinned is None else self._pinned
        missing = [seq for seq in seqs if seq not in self._cache]
        if len(missing) > 1 and is_s3(self.base):  # records are immutable: fetch them in parallel, cache them
            with ThreadPoolExecutor(max_workers=PARALLEL_READS) as pool:
                self._cache.update(zip(missing, pool.map(self._read, missing)))
        for seq in missing:
            if seq not in self._cache:
                self._cache[seq] = self._read(seq)
        return [self._cache[seq] for seq in seqs]

    def get(self, record: str | int) -> Record:
        if not str(record).isdigit():
            raise LedgerError(f"{record!r} is not a record id (a number such as {record_id(1)})")
        found = {r.seq: r for r in self.records()}.get(int(record))
        if found is None:
            raise LedgerError(f"no record {record} in {self.base}")
        return found

    def find(self, type: str | None = None, **data: Any) -> list[Record]:
        """Records of ``type`` (any when None) whose data has every given key at that value, oldest first."""
        return [r for r in self.records()
                if (type is None or r.type == type) and all(r.data.get(k) == v for k, v in data.items())]

    def latest(self, type: str | None = None, **data: Any) -> Record | None:
        found = self.find(type, **data)
        return found[-1] if found else None

    def lineage(self, record: str | int | Record) -> list[Record]:
        """The record and everything it follows from, newest first (each once)."""
        by_id = {r.id: r for r in self.records()}
        start = record if isinstance(record, Record) else self.get(record)
        seen: dict[str, Record] = {}
        queue = [start]
        while queue:
            current = queue.pop()
            if current.id not in seen:
                seen[current.id] = current
                queue.extend(by_id[p] for p in current.parents if p in by_id)
        return sorted(seen.values(), key=lambda r: r.seq, reverse=True)

    def descendants(self, record: str | int | Record) -> list[Record]:
        """Everything that follows from the record, oldest first."""
        start = record if isinstance(record, Record) else self.get(record)
        reached, out = {start.id}, []
        for r in self.records():
            if r.seq > start.seq and reached.intersection(r.parents):
                reached.add(r.id)
                out.append(r)
        return out

    # -- releases

    def in_production(self, model_name: str | None = None) -> Record | None:
        """The ``released`` record of the version serving now: the newest release that serves at once
        (``SERVES_AT_ONCE``) or promotion that no later rollback undid (a ``rolled_back`` record names the version
        it took out of production)."""
        rolled_back: set[str] = set()
        named = {"model_name": model_name} if model_name else {}
        for r in reversed(self.records()):
            version = r.data.get("model_version")
            if r.type == "rolled_back":
                rolled_back.add(version)
            elif r.type == "released" and version not in rolled_back and r.data.get("strategy") in SERVES_AT_ONCE:
                if all(r.data.get(k) == v for k, v in named.items()):
                    return r
            elif r.type == "promoted" and version not in rolled_back:
                released = [p for p in self.find("released", model_version=version, **named) if p.seq < r.seq]
                if released:
                    return released[-1]
        return None

    def released_versions(self) -> list[str]:
        """Every released model version, in the order of its first release."""
        return list(dict.fromkeys(r.data["model_version"] for r in self.records() if r.type == "released"))

    def resolve_version(self, prefix: str) -> str:
        """The released model version that ``prefix`` starts (a whole version, or enough of it to be unique)."""
        prefix = str(prefix).strip()
        versions = self.released_versions()
        if prefix in versions:
            return prefix
        matches = [v for v in versions if prefix and v.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(v[:12] for v in versions[-5:]) or "none yet"
            raise LedgerError(f"no released model version starts with {prefix!r} in {self.base} (latest: {known})")
        raise LedgerError(f"{prefix!r} is the start of {len(matches)} released versions "
                          f"({', '.join(v[:16] for v in matches)}): give more of it")

    def released(self, version: str) -> Record:
        """The newest ``released`` record of a model version."""
        found = self.latest("released", model_version=version)
        if found is None:
            raise LedgerError(f"model version {version} was never released (ledger {self.base})")
        return found

    def status(self, version: str) -> str:
        """A released version now: ``production``, ``rolled back``, ``in rollout`` (a shadow or canary release not
        decided yet) or ``superseded``."""
        production = self.in_production()
        if production is not None and production.data["model_version"] == version:
            return "production"
        events = [r for r in self.records() if r.type in ("released", "promoted", "rolled_back")
                  and r.data.get("model_version") == version]
        last = events[-1] if events else None
        if last is not None and last.type == "rolled_back":
            return "rolled back"
        if last is not None and last.type == "released" and last.data.get("strategy") not in SERVES_AT_ONCE:
            return "in rollout"
        return "superseded"

    def run_of(self, record: Record) -> Record | None:
        """The ``trained`` record a record follows from (itself if it is one)."""
        return next((r for r in self.lineage(record) if r.type == "trained"), None)
