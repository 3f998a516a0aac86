"""Releases: content-addressed publish/fetch with checksums and a conditionally written ``latest`` pointer,
on a local directory and against a real S3-compatible HTTP server (moto's standalone server on loopback):
failures mid-upload, damaged objects and pointers, symbolic links, and the fetch command of the serving pods."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_FILES, leftover_temp_files, read_tree, write_tree
from s3server import FailingProxy

from components.core import blobs, releases
from components.core.blobs import (
    EndpointUnreachableError,
    ObjectNotFoundError,
    Storage,
    StorageError,
    UnsafeSourceError,
)
from components.core.releases import (
    ChecksumMismatchError,
    PointerConflictError,
    PointerDamagedError,
    Releases,
)

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]


def test_publish_and_fetch(store_base, tmp_path):
    s = Storage()
    r = Releases(s)
    src = write_tree(tmp_path / "model", SAMPLE_FILES)
    v1 = r.publish(src, store_base)
    assert v1["kind"] == "dir" and v1["file_count"] == len(SAMPLE_FILES)
    for entry in v1["files"]:
        data = SAMPLE_FILES[entry["path"]]
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    manifest_bytes = s.read_bytes(blobs.join(store_base, "manifests", f"{v1['version']}.json"))
    assert hashlib.sha256(manifest_bytes).hexdigest() == v1["version"]  # the version id is the manifest's hash
    pointer = r.read_pointer(store_base)
    assert pointer["version"] == v1["version"] and pointer["previous"] is None

    fetched = r.fetch(store_base, tmp_path / "serving")
    assert fetched["version"] == v1["version"] and read_tree(tmp_path / "serving") == SAMPLE_FILES

    # A second release: one file changed, one added; unchanged content is stored once.
    (src / "model.safetensors").write_bytes(b"new weights")
    (src / "extra.txt").write_bytes(b"added")
    v2 = r.publish(src, store_base)
    assert v2["version"] != v1["version"]
    pointer = r.read_pointer(store_base)
    assert pointer["version"] == v2["version"] and pointer["previous"] == v1["version"]
    objects = s.list(blobs.join(store_base, releases.OBJECTS_DIR))
    assert len(objects) == len(SAMPLE_FILES) + 2  # 4 of v1, the new weights, the added file

    # fetch replaces the directory as a whole; an old version stays fetchable by id.
    r.fetch(store_base, tmp_path / "serving")
    assert read_tree(tmp_path / "serving") == read_tree(src)
    r.fetch(store_base, tmp_path / "serving", version=v1["version"])
    assert read_tree(tmp_path / "serving") == SAMPLE_FILES  # extra.txt is gone again

    # Same content, same version id; a single file publishes as a one-file release.
    assert r.publish(src, store_base)["version"] == v2["version"]
    single = r.publish(src / "extra.txt", blobs.join(store_base, "single"))
    assert single["kind"] == "file"
    r.fetch(blobs.join(store_base, "single"), tmp_path / "single")
    assert read_tree(tmp_path / "single") == {"extra.txt": b"added"}
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("conditional", ["auto", "off"])
def test_pointer_moved_by_someone_else_is_a_conflict(store_base, tmp_path, monkeypatch, conditional):
    monkeypatch.setenv("S3_CONDITIONAL_WRITES", conditional)  # off = compare-then-write
    r = Releases()
    src = write_tree(tmp_path / "a", {"w.bin": b"one"})
    v1 = r.publish(src, store_base)
    state = r._read_pointer(store_base)  # what a slow publisher read when it started
    (src / "w.bin").write_bytes(b"two")
    v2 = r.publish(src, store_base)  # a second publisher moves the pointer
    stale = {"version": v1["version"], "manifest": "x", "published_at": "x", "previous": None}
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        r.update_pointer(store_base, stale, state[1])
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        r.update_pointer(store_base, stale, None)  # "first release", but a pointer exists
    assert r.read_pointer(store_base)["version"] == v2["version"]


def test_server_without_conditional_writes_falls_back_to_compare_then_write(moto_server, bucket, tmp_path, monkeypatch, capsys):
    def no_conditional_puts(method, path, headers):
        conditional = any(h.lower() in ("if-match", "if-none-match") for h in headers)
        return "not-implemented" if method == "PUT" and conditional else None

    with FailingProxy(moto_server.endpoint, no_conditional_puts) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        src = write_tree(tmp_path / "a", {"w.bin": b"one"})
        r = Releases()
        v1 = r.publish(src, f"s3://{bucket}/m")
        assert "compare-then-write" in capsys.readouterr().out
        assert [a for a, _, _ in proxy.refused] == ["not-implemented"]
        (src / "w.bin").write_bytes(b"two")
        v2 = r.publish(src, f"s3://{bucket}/m")  # learned: no second conditional attempt
        assert len(proxy.refused) == 1
        assert r.read_pointer(f"s3://{bucket}/m")["previous"] == v1["version"]
        assert r.fetch(f"s3://{bucket}/m", tmp_path / "out")["version"] == v2["version"]
        monkeypatch.setenv("S3_CONDITIONAL_WRITES", "on")  # "on" never falls back
        with pytest.raises(StorageError, match="501 NotImplemented"):
            Releases().publish(src, f"s3://{bucket}/m")


def _part_number(path: str) -> int:
    match = re.search(r"[?&]partNumber=(\d+)", path)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["part 2 dropped", "server dies after part 1"])
def test_failed_upload_leaves_no_partial_object_and_does_not_move_latest(moto_server, bucket, tmp_path, monkeypatch, failure):
    store_base = f"s3://{bucket}/model"
    s = Storage()
    r = Releases(s)
    v1 = r.publish(write_tree(tmp_path / "v1", {"weights.bin": b"version one"}), store_base)

    big = np.random.default_rng(1).bytes(12 * MiB)  # 3 parts of 5 MiB
    release = write_tree(tmp_path / "v2", {"a-small.txt": b"uploaded before the failure", "weights.bin": big})
    parts_seen = []

    def rule(method, path, headers):
        if failure == "part 2 dropped":
            return "drop" if method == "PUT" and _part_number(path) == 2 else None
        if parts_seen:  # the server is gone: nothing after the first part gets an answer
            return "drop"
        if method == "PUT" and _part_number(path):
            parts_seen.append(path)
        return None

    with FailingProxy(moto_server.endpoint, rule) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # retried once, then given up
        with pytest.raises(EndpointUnreachableError, match="dropped the connection"):
            Releases().publish(release, store_base)
        assert proxy.refused, "the proxy never failed a request: the test would prove nothing"

    client = s.client  # straight to moto
    big_key = f"model/{releases.object_key(hashlib.sha256(big).hexdigest())}"
    assert not s.exists(f"s3://{bucket}/{big_key}")  # no partial object visible
    keys = [u.split("/", 3)[3] for u in s.list(f"s3://{bucket}/model")]
    assert big_key not in keys
    assert [k for k in keys if k.startswith("model/manifests/")] == [f"model/manifests/{v1['version']}.json"]
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    if failure == "part 2 dropped":
        assert uploads == []  # the client aborted the multipart upload
    else:
        assert [u["Key"] for u in uploads] == [big_key]  # left unfinished (a lifecycle rule cleans these), invisible
    assert r.read_pointer(store_base)["version"] == v1["version"]  # latest did not move
    assert read_tree(tmp_path / "v1") == {"weights.bin": b"version one"}
    r.fetch(store_base, tmp_path / "serving")
    assert read_tree(tmp_path / "serving") == {"weights.bin": b"version one"}

    v2 = r.publish(release, store_base)  # once the server is back, the same publish completes
    r.fetch(store_base, tmp_path / "serving")
    assert r.read_pointer(store_base)["version"] == v2["version"] and read_tree(tmp_path / "serving") == read_tree(release)


def _corrupt_content_same_size(s, store_base, manifest):
    entry = next(e for e in manifest["files"] if e["path"] == "model.safetensors")
    uri = blobs.join(store_base, releases.object_key(entry["sha256"]))
    data = bytearray(s.read_bytes(uri))
    data[100] ^= 0xFF  # one flipped byte
    s.write_bytes(uri, bytes(data))
    return "model.safetensors of version"


def _truncate_content(s, store_base, manifest):
    entry = next(e for e in manifest["files"] if e["path"] == "metadata.json")
    uri = blobs.join(store_base, releases.object_key(entry["sha256"]))
    s.write_bytes(uri, s.read_bytes(uri)[:-3])
    return "metadata.json of version"


def _edit_manifest(s, store_base, manifest):
    uri = blobs.join(store_base, "manifests", f"{manifest['version']}.json")
    edited = json.loads(s.read_bytes(uri))
    edited["files"][0]["size"] += 1
    s.write_bytes(uri, json.dumps(edited, indent=2, sort_keys=True).encode() + b"\n")
    return "its sha256 is not its version id"


def _delete_content(s, store_base, manifest):
    digest = manifest["files"][-1]["sha256"]
    uri = blobs.join(store_base, releases.object_key(digest))
    if blobs.is_s3(uri):
        bucket, key = blobs.split_s3(uri)
        s.client.delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink()
    return digest  # the message names the missing object


CORRUPTIONS = [
    ("one byte flipped", _corrupt_content_same_size, ChecksumMismatchError),
    ("truncated", _truncate_content, ChecksumMismatchError),
    ("manifest edited", _edit_manifest, ChecksumMismatchError),
    ("object deleted", _delete_content, ObjectNotFoundError),
]


@pytest.mark.parametrize("corrupt, error", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corruption_is_detected_on_fetch_and_leaves_nothing_behind(store_base, tmp_path, corrupt, error):
    s = Storage()
    r = Releases(s)
    old = write_tree(tmp_path / "old", {"served.txt": b"the version being served"})
    r.fetch(r.publish(old, blobs.join(store_base, "old"))["uri"], tmp_path / "serving")
    manifest = r.publish(write_tree(tmp_path / "model", SAMPLE_FILES), store_base)
    message = corrupt(s, store_base, manifest)
    with pytest.raises(error, match=re.escape(message)):
        r.fetch(store_base, tmp_path / "serving")
    assert read_tree(tmp_path / "serving") == {"served.txt": b"the version being served"}  # untouched
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("corrupt", [c[1] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_publishing_the_same_files_again_repairs_a_damaged_release(store_base, tmp_path, corrupt, capsys):
    s = Storage()
    r = Releases(s)
    src = write_tree(tmp_path / "model", SAMPLE_FILES)
    manifest = r.publish(src, store_base)
    corrupt(s, store_base, manifest)
    with pytest.raises(StorageError, match="publish the same files again to repair it"):
        r.fetch(store_base, tmp_path / "serving")

    assert r.publish(src, store_base)["version"] == manifest["version"]
    assert r.fetch(store_base, tmp_path / "serving")["version"] == manifest["version"]
    assert read_tree(tmp_path / "serving") == SAMPLE_FILES
    if corrupt is not _delete_content:
        assert "does not match its sha256" in capsys.readouterr().out  # the repair is reported


def test_republish_verifies_s3_objects_by_their_stored_sha256(moto_server, bucket, tmp_path, monkeypatch):
    big = np.random.default_rng(2).bytes(6 * MiB)  # above the 5 MiB multipart threshold: no whole-object sha256
    src = write_tree(tmp_path / "model", {**SAMPLE_FILES, "big.bin": big})
    store_base = f"s3://{bucket}/store"
    with FailingProxy(moto_server.endpoint, lambda method, path, headers: None) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        s = Storage()
        r = Releases(s)
        manifest = r.publish(src, store_base)
        digests = {e["path"]: e["sha256"] for e in manifest["files"]}
        keys = {path: f"store/{releases.object_key(digest)}" for path, digest in digests.items()}
        small_key, big_key = keys["model.safetensors"], keys["big.bin"]
        head = s.client.head_object(Bucket=bucket, Key=small_key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digests["model.safetensors"])).decode()

        # All intact: small objects are checked by a HEAD, only the multipart one is read back.
        proxy.requests.clear()
        r.publish(src, store_base)
        object_gets = [path for method, path in proxy.requests if method == "GET" and "/objects/" in path]
        assert object_gets == [f"/{bucket}/{big_key}"]
        assert [path for method, path in proxy.requests if method == "PUT"] == [f"/{bucket}/store/latest"]

        # Same-size damage the size cannot show: a small object rewritten with its own (other) checksum,
        # and the multipart object with one byte flipped.
        damaged = bytearray(SAMPLE_FILES["model.safetensors"])
        damaged[7] ^= 0x01
        s.client.put_object(Bucket=bucket, Key=small_key, Body=bytes(damaged), ChecksumAlgorithm="SHA256")
        damaged_big = bytearray(big)
        damaged_big[-1] ^= 0x01
        s.client.upload_fileobj(io.BytesIO(bytes(damaged_big)), bucket, big_key)
        with pytest.raises(ChecksumMismatchError):
            r.fetch(store_base, tmp_path / "serving")
        r.publish(src, store_base)
        r.fetch(store_base, tmp_path / "serving")
        assert read_tree(tmp_path / "serving") == read_tree(src)


TORN_POINTERS = [
    ("cut short", lambda good: good[: len(good) // 2]),
    ("empty", lambda good: b""),
    ("zeros", lambda good: b"\0" * len(good)),  # what some filesystems leave after a crash
    ("no version", lambda good: b'{"manifest": "manifests/x.json"}\n'),
]


@pytest.mark.parametrize("tear", [t[1] for t in TORN_POINTERS], ids=[t[0] for t in TORN_POINTERS])
def test_damaged_pointer_fails_fetch_clearly_and_publish_replaces_it(store_base, tmp_path, tear, capsys):
    s = Storage()
    r = Releases(s)
    src = write_tree(tmp_path / "model", {"w.bin": b"one"})
    v1 = r.publish(src, store_base)
    pointer_uri = blobs.join(store_base, releases.POINTER_NAME)
    s.write_bytes(pointer_uri, tear(s.read_bytes(pointer_uri)))

    with pytest.raises(PointerDamagedError, match=re.escape(f"{pointer_uri} is damaged")) as raised:
        r.fetch(store_base, tmp_path / "serving")
    assert "Publish a release again to replace it, or fetch a version by its id" in str(raised.value)
    assert not (tmp_path / "serving").exists() and leftover_temp_files(tmp_path) == []
    with pytest.raises(PointerDamagedError):
        r.read_pointer(store_base)
    r.fetch(store_base, tmp_path / "by-id", version=v1["version"])  # the releases themselves are fine
    assert read_tree(tmp_path / "by-id") == {"w.bin": b"one"}

    (src / "w.bin").write_bytes(b"two")
    v2 = r.publish(src, store_base)
    assert "is damaged" in capsys.readouterr().out
    pointer = r.read_pointer(store_base)
    assert pointer["version"] == v2["version"] and pointer["previous"] is None  # nothing known before it
    r.fetch(store_base, tmp_path / "serving")
    assert read_tree(tmp_path / "serving") == {"w.bin": b"two"}


@pytest.mark.parametrize("conditional", ["auto", "off"])
def test_damaged_pointer_replaced_by_someone_else_is_still_a_conflict(store_base, tmp_path, monkeypatch, conditional):
    monkeypatch.setenv("S3_CONDITIONAL_WRITES", conditional)
    s = Storage()
    r = Releases(s)
    src = write_tree(tmp_path / "model", {"w.bin": b"one"})
    v1 = r.publish(src, store_base)
    pointer_uri = blobs.join(store_base, releases.POINTER_NAME)
    s.write_bytes(pointer_uri, b'{"version": "')
    _, damaged_tag = r._read_pointer(store_base, replacing=True)  # what a slow publisher read when it started
    (src / "w.bin").write_bytes(b"two")
    v2 = r.publish(src, store_base)  # a faster publisher replaced the damaged pointer first
    slow = {"version": v1["version"], "manifest": "x", "published_at": "x", "previous": None}
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        r.update_pointer(store_base, slow, damaged_tag)
    assert r.read_pointer(store_base)["version"] == v2["version"]


# ---------------------------------------------------------------------------
# Symbolic links are never followed on upload
# ---------------------------------------------------------------------------


SECRET = b"[default]\naws_secret_access_key = do-not-upload-me\n"


def _link_in(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A release with a link (or one that is a link); returns (what to publish, the link's name in the error)."""
    credentials = tmp_path / "home" / ".aws" / "credentials"
    credentials.parent.mkdir(parents=True)
    credentials.write_bytes(SECRET)
    release = write_tree(tmp_path / "release", {"model.bin": b"weights", "config/settings.json": b"{}"})
    if case == "link to a file outside":
        (release / "config" / "credentials").symlink_to(credentials)
        return release, "config/credentials"
    if case == "link to a directory":
        (release / "aws").symlink_to(credentials.parent, target_is_directory=True)
        return release, "aws"
    if case == "dangling link":
        (release / "gone.bin").symlink_to(tmp_path / "nothing-here")
        return release, "gone.bin"
    if case == "release is a link":
        (tmp_path / "release-link").symlink_to(credentials.parent, target_is_directory=True)
        return tmp_path / "release-link", "release-link"
    assert case == "single file is a link"
    (tmp_path / "model.bin").symlink_to(credentials)
    return tmp_path / "model.bin", "model.bin"


LINK_CASES = ["link to a file outside", "link to a directory", "dangling link", "release is a link",
              "single file is a link"]


@pytest.mark.parametrize("case", LINK_CASES)
def test_publish_and_put_dir_refuse_symbolic_links(store_base, tmp_path, case):
    s = Storage()
    r = Releases(s)
    source, link_name = _link_in(tmp_path, case)
    with pytest.raises(UnsafeSourceError, match=re.escape(link_name) + r".*is a symbolic link"):
        r.publish(source, store_base)
    with pytest.raises(UnsafeSourceError, match=re.escape(link_name) + r".*is a symbolic link"):
        s.put_dir(source, blobs.join(store_base, "copy"))
    assert s.list(store_base) == []  # nothing uploaded, the pointer included


def test_publish_refuses_special_files_and_links_swapped_in_after_listing(tmp_path, monkeypatch):
    r = Releases()
    release = write_tree(tmp_path / "release", {"model.bin": b"weights"})
    os.mkfifo(release / "pipe")  # reading it would block the publish for ever
    with pytest.raises(UnsafeSourceError, match="pipe is not a regular file"):
        r.publish(release, tmp_path / "store")
    (release / "pipe").unlink()

    listing = blobs.regular_files(release, "publish")
    (release / "model.bin").unlink()
    (release / "model.bin").symlink_to(write_tree(tmp_path / "home", {"secret": SECRET}) / "secret")
    monkeypatch.setattr(releases, "regular_files", lambda source, action: listing)
    with pytest.raises(UnsafeSourceError, match="became a symbolic link"):
        r.publish(release, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_link_in_a_local_store_is_replaced_not_trusted(tmp_path):
    r = Releases()
    release = write_tree(tmp_path / "release", {"model.bin": b"weights"})
    manifest = r.publish(release, tmp_path / "store")
    stored = tmp_path / "store" / releases.object_key(manifest["files"][0]["sha256"])
    elsewhere = write_tree(tmp_path / "elsewhere", {"model.bin": b"weights"}) / "model.bin"
    stored.unlink()
    stored.symlink_to(elsewhere)  # same bytes, but the store would depend on a file outside it
    r.publish(release, tmp_path / "store")
    assert not stored.is_symlink() and stored.read_bytes() == b"weights"
    assert elsewhere.read_bytes() == b"weights"  # the link's target was not written through


# ---------------------------------------------------------------------------
# The fetch command of the serving pods' init container
# ---------------------------------------------------------------------------


def test_the_fetch_command_puts_a_release_in_place_or_says_what_is_wrong(tmp_path, capsys):
    manifest = releases.publish(write_tree(tmp_path / "model", SAMPLE_FILES), str(tmp_path / "store"))
    assert releases.main(["fetch", str(tmp_path / "store"), str(tmp_path / "served"), "--version", "latest"]) == 0
    assert read_tree(tmp_path / "served") == SAMPLE_FILES and manifest["version"] in capsys.readouterr().out
    assert releases.main(["fetch", str(tmp_path / "store"), str(tmp_path / "served"), "--version", "abc"]) == 1
    assert "version abc is not published" in capsys.readouterr().err  # what the deploy step quotes on a rollback
    assert read_tree(tmp_path / "served") == SAMPLE_FILES  # untouched


def test_the_fetch_command_runs_as_a_module(tmp_path):
    """The init container runs ``python -m components.core.releases fetch ...``."""
    manifest = releases.publish(write_tree(tmp_path / "model", {"digits.mar": b"archive"}), str(tmp_path / "store"))
    done = subprocess.run([sys.executable, "-m", "components.core.releases", "fetch", str(tmp_path / "store"),
                           str(tmp_path / "models" / "store"), "--version", manifest["version"]],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert read_tree(tmp_path / "models" / "store") == {"digits.mar": b"archive"}
