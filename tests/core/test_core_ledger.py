"""The release ledger (components/core/ledger.py), on a local directory and on a real S3 API (moto's server with
conditional writes): append and read, parents checked, concurrent writers (threads and processes) never lose a
record, a killed writer leaves no half record, lineage both ways on a realistic chain, what is in production,
version prefixes, and where the ledger lives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from ledger_chain import build_chain, release, rollout, trained_and_gated, version_of

from components.core import blobs
from components.core.ledger import (
    FORMAT,
    LEDGER_ENV,
    Ledger,
    LedgerError,
    config_sha256,
    location,
    record_id,
)

ROOT = Path(__file__).resolve().parents[2]


def test_append_and_read_back(store_base):
    ledger = Ledger(store_base)
    assert ledger.records() == [] and ledger.in_production() is None
    first = ledger.append("retrain_started", {"run": "r1", "target": "local"}, actor="ana@example")
    second = ledger.append("retrain_started", {"run": "r2"}, parents=[first])
    assert (first.id, second.id) == (record_id(1), record_id(2)) == ("0000000001", "0000000002")
    again = Ledger(store_base)  # a fresh reader: everything comes from storage
    assert [r.as_dict() for r in again.records()] == [first.as_dict(), second.as_dict()]
    raw = json.loads(blobs.read_bytes(blobs.join(store_base, "records", "0000000002.json")))
    assert raw["format"] == FORMAT and raw["parents"] == ["0000000001"] and raw["data"] == {"run": "r2"}
    assert again.get("2") == again.get(second.id) == second and first.actor == "ana@example"
    assert "@" in second.actor  # user@host by default
    assert again.find("retrain_started", run="r1") == [first] and again.latest("retrain_started") == second


@pytest.mark.parametrize("type_, data, parents, message", [
    ("deployed", {}, (), "unknown record type 'deployed'"),
    ("released", {"model_name": "digits", "model_version": "v"}, (), "needs target, endpoint, strategy"),
    ("retrain_started", {"run": "r"}, ("0000000042",), r"parents \['0000000042'\] are not records"),
    ("retrain_started", {"run": "r"}, ("latest",), r"parents \['latest'\] are not records"),
    ("retrain_started", {"run": object()}, (), "not JSON serializable"),
])
def test_a_bad_record_is_refused_before_anything_is_written(tmp_path, type_, data, parents, message):
    ledger = Ledger(tmp_path / "ledger")
    with pytest.raises((LedgerError, TypeError), match=message):
        ledger.append(type_, data, parents=parents)
    assert ledger.records() == [] and not (tmp_path / "ledger" / "records").exists()


def test_parents_are_normalised_and_checked(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    first = ledger.append("retrain_started", {"run": "a"})
    child = ledger.append("retrain_started", {"run": "b"}, parents=["1", first, "0000000001"])
    assert child.parents == ("0000000001",)
    with pytest.raises(LedgerError, match="not a record id"):
        ledger.get("first")
    with pytest.raises(LedgerError, match="no record 9"):
        ledger.get(9)


def _append_in_threads(base: str, writers: int, each: int) -> list[str]:
    errors: list[str] = []
    start = threading.Barrier(writers)

    def write(w: int) -> None:
        ledger = Ledger(base)  # each writer its own, as separate steps have
        start.wait()
        for i in range(each):
            try:
                ledger.append("retrain_started", {"run": f"w{w}-{i}"})
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def _assert_every_record_once(base: str, expected: set[str]) -> None:
    records = Ledger(base).records()
    assert [r.seq for r in records] == list(range(1, len(records) + 1)), "numbers are contiguous, none reused"
    runs = [r.data["run"] for r in records]
    assert sorted(runs) == sorted(expected), f"lost: {expected - set(runs)}, twice: {len(runs) - len(set(runs))}"


def test_writers_in_threads_never_lose_a_record(store_base):
    errors = _append_in_threads(store_base, writers=8, each=6)
    assert not errors
    _assert_every_record_once(store_base, {f"w{w}-{i}" for w in range(8) for i in range(6)})


WRITER = """
import sys
from components.core.ledger import Ledger
base, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ledger = Ledger(base)
i = 0
while count < 0 or i < count:
    ledger.append("retrain_started", {"run": f"{name}-{i}"})
    i += 1
"""


def _writer(base: str, name: str, count: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, base, name, str(count)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_writers_in_processes_never_lose_a_record(store_base):
    processes = [_writer(store_base, f"p{p}", 15) for p in range(4)]
    for p in processes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    _assert_every_record_once(store_base, {f"p{p}-{i}" for p in range(4) for i in range(15)})


def test_a_killed_writer_leaves_whole_records_only(store_base, tmp_path):
    writer = _writer(store_base, "doomed", -1)  # appends until killed
    deadline = time.monotonic() + 120
    while len(Ledger(store_base).records()) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    if not blobs.is_s3(store_base):  # what a writer killed between its write and its link leaves behind
        (Path(store_base) / "records" / f".{record_id(99)}.json.tmp-dead0000").write_text('{"format": "kfp-ml')
    records = Ledger(store_base).records()  # every record whole: each parses and has its number
    assert len(records) >= 8 and [r.seq for r in records] == list(range(1, len(records) + 1))
    after = Ledger(store_base).append("retrain_started", {"run": "after"})
    assert after.seq == len(records) + 1


def test_no_record_is_ever_overwritten(tmp_path):
    from components.core.blobs import WriteConflictError

    ledger = Ledger(tmp_path / "ledger")
    record = ledger.append("retrain_started", {"run": "first"})
    with pytest.raises(WriteConflictError):
        ledger._create(ledger._uri(record.seq), b"{}")
    assert Ledger(tmp_path / "ledger").get(1).data == {"run": "first"}
    assert not [p for p in (tmp_path / "ledger" / "records").iterdir() if p.name.startswith(".")], "no temp file left"


def test_lineage_back_and_forward_on_a_realistic_chain(store_base, tmp_path):
    """trained → gated → released → drift → retrain_started → trained → gated → released (shadow) → promoted."""
    c = build_chain(Ledger(store_base), tmp_path)
    ledger = Ledger(store_base)
    back = ledger.lineage(c.released2)
    assert [r.type for r in back] == ["released", "gated", "trained", "retrain_started", "drift", "released",
                                      "gated", "trained"]
    assert [r.id for r in back] == sorted((r.id for r in back), reverse=True)
    # The production model walks back to its run, its data and its gates ...
    trained2 = ledger.run_of(c.released2)
    assert trained2.data["run_id"] == "run2" and trained2.data["data_card_sha256"]
    assert trained2.data["config_sha256"] == config_sha256(trained2.data["config"])
    assert ledger.get(c.gated2.id).data["gates"]["privacy"]["numbers"]["mia_auc"] == 0.53
    # ... and a drift verdict leads forward to its retrain and the release that followed.
    forward = ledger.descendants(c.drift)
    assert [r.type for r in forward] == ["retrain_started", "trained", "gated", "released", "promoted"]
    assert forward[0].data["run"] == "run2" and forward[0].data["drift_record"] == c.drift.id
    assert forward[-1].data["evidence"]["challenger"]["requests"] == 120
    assert ledger.in_production().id == c.released2.id
    assert (ledger.status(c.v1), ledger.status(c.v2)) == ("superseded", "production")


def test_what_is_in_production(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    versions = [version_of(f"m{i}") for i in range(4)]
    gated = [trained_and_gated(ledger, tmp_path, f"r{i}", v)[1] for i, v in enumerate(versions)]
    r0, _ = release(ledger, tmp_path, "r0", versions[0], gated[0])  # the first release: replace
    assert ledger.in_production() == r0 and ledger.status(versions[0]) == "production"
    # A shadow challenger rolled back: the champion stays, the challenger is "rolled back".
    release(ledger, tmp_path, "r1", versions[1], gated[1], rollout("shadow", "rollback", versions[0], versions[1],
                                                                      "agreement 0.91 < min 0.98"))
    assert ledger.in_production() == r0 and ledger.status(versions[1]) == "rolled back"
    # A canary released but not decided yet does not serve.
    ledger.append("released", {"model_name": "digits", "model_version": versions[2], "target": "local",
                               "endpoint": "http://x", "strategy": "canary"}, parents=[gated[2]])
    assert ledger.in_production() == r0 and ledger.status(versions[2]) == "in rollout"
    # ... until promoted.
    canary = ledger.latest("released", model_version=versions[2])
    ledger.append("promoted", {"model_version": versions[2], "reason": "held"}, parents=[canary])
    assert ledger.in_production() == canary and ledger.status(versions[0]) == "superseded"
    # A rollback by hand: the version taken out, and the one serving again.
    ledger.append("rolled_back", {"model_version": versions[2], "reason": "pager"}, parents=[canary])
    back = ledger.append("released", {**r0.data, "strategy": "rollback"}, parents=[r0])
    assert ledger.in_production() == back and ledger.status(versions[2]) == "rolled back"
    assert ledger.in_production("letters") is None


def test_versions_by_unique_prefix(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    for name in ("a", "b"):
        release(ledger, tmp_path, name, name * 3 + "0" + name, trained_and_gated(ledger, tmp_path, name,
                                                                             name * 3 + "0" + name)[1])
    release(ledger, tmp_path, "c", "aaa1c", trained_and_gated(ledger, tmp_path, "c", "aaa1c")[1])
    assert ledger.resolve_version("bbb") == "bbb0b" and ledger.resolve_version("aaa0a") == "aaa0a"
    with pytest.raises(LedgerError, match="'aaa' is the start of 2 released versions"):
        ledger.resolve_version("aaa")
    with pytest.raises(LedgerError, match="no released model version starts with 'ff'"):
        ledger.resolve_version("ff")


def test_where_the_ledger_lives(tmp_path, monkeypatch):
    serving = SimpleNamespace(ledger_uri="", home=str(tmp_path / "home"), deploy_target="local")
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    assert location(serving) == str((tmp_path / "home" / "ledger").resolve())
    monkeypatch.setenv(LEDGER_ENV, "s3://bucket/ledger/digits")
    assert location(serving) == "s3://bucket/ledger/digits"
    serving.ledger_uri = str(tmp_path / "mine")
    assert location(serving) == str(tmp_path / "mine")
    cluster = SimpleNamespace(ledger_uri="", home="runs/serving", deploy_target="kubernetes")
    assert location(cluster) == "s3://bucket/ledger/digits"
    monkeypatch.delenv(LEDGER_ENV)
    with pytest.raises(LedgerError, match="set serving.ledger_uri or KFP_MLOPS_LEDGER"):
        location(cluster)


def test_a_missing_bucket_is_an_error_not_an_empty_ledger(bucket):
    with pytest.raises(blobs.BucketNotFoundError):
        Ledger("s3://no-such-bucket-for-the-ledger/ledger").records()


def test_a_pinned_view_lists_once(store_base, monkeypatch):
    ledger = Ledger(store_base)
    ledger.append("retrain_started", {"run": "a"})
    listings = []
    original = Ledger._stored_seqs
    monkeypatch.setattr(Ledger, "_stored_seqs", lambda self: listings.append(1) or original(self))
    with ledger.pinned():
        Ledger(store_base).append("retrain_started", {"run": "by another writer"})
        ours = ledger.append("retrain_started", {"run": "ours"})
        for _ in range(5):
            seen = [r.data["run"] for r in ledger.records()]
        assert ledger.in_production() is None and ledger.find(run="ours") == [ours]
    assert seen == ["a", "ours"], "the view as pinned, plus its own append"
    assert len(listings) == 3, "one listing for the view, one per append"
    assert [r.data["run"] for r in ledger.records()] == ["a", "by another writer", "ours"]
