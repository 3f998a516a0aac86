"""Storage: local paths and s3:// against a real S3-compatible HTTP server (moto's standalone
server on loopback, started here), multipart uploads, content-addressed publish/fetch with
checksums and a conditionally written ``latest`` pointer, failures mid-upload, clear errors,
and ingest from s3://."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import re
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3server import FailingProxy, MotoServer, s3_env
from sklearn.datasets import load_digits

from components.core import storage
from components.core.data import DataValidationError, load_splits
from components.core.storage import (
    BucketNotFoundError,
    ChecksumMismatchError,
    EndpointUnreachableError,
    InvalidURIError,
    ObjectNotFoundError,
    PointerConflictError,
    PointerDamagedError,
    S3Settings,
    Storage,
    StorageAuthError,
    UnsafeSourceError,
)

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def moto_server():
    with MotoServer() as server:
        yield server


def _use_endpoint(monkeypatch, endpoint: str, **extra: str) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = s3_env(endpoint, S3_MULTIPART_THRESHOLD_MB="5", S3_MULTIPART_CHUNKSIZE_MB="5", **extra)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(moto_server, monkeypatch) -> str:
    """A fresh bucket on the moto server, with the environment pointing at it."""
    _use_endpoint(monkeypatch, moto_server.endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    Storage().client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path) -> str:
    """The same tests on a local directory and on an s3:// prefix."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('bucket')}/store"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {
    "model.safetensors": os.urandom(3000),
    "metadata.json": b'{"class_names": ["0", "1"]}',
    "nested/deeper/empty.bin": b"",
    "nested/notes \u00e9t\u00e9.txt": "Unicode names survive".encode(),
}


def _temp_leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".*") if ".tmp-" in p.name or ".fetch-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def test_settings_come_from_the_environment():
    assert S3Settings.from_env({}) == S3Settings()  # AWS defaults
    s = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://seaweedfs.kubeflow:8333", "AWS_DEFAULT_REGION": "eu-west-1",
                             "S3_MULTIPART_THRESHOLD_MB": "16", "AWS_MAX_ATTEMPTS": "5"})
    assert s.endpoint_url == "http://seaweedfs.kubeflow:8333" and s.region == "eu-west-1"
    assert s.addressing_style == "path"  # a custom endpoint has no wildcard DNS
    assert s.multipart_threshold == 16 * MiB and s.max_attempts == 5
    s = S3Settings.from_env({"S3_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL": "http://other",
                             "S3_ADDRESSING_STYLE": "virtual", "AWS_REGION": "us-west-2"})
    assert (s.endpoint_url, s.addressing_style, s.region) == ("http://minio:9000", "virtual", "us-west-2")
    client = Storage(s).client
    assert client.meta.endpoint_url == "http://minio:9000" and client.meta.region_name == "us-west-2"
    assert client.meta.config.retries["mode"] == "standard"


BAD_SETTINGS = [
    ({"S3_ADDRESSING_STYLE": "dns"}, "S3_ADDRESSING_STYLE must be path, virtual or auto"),
    ({"S3_MULTIPART_CHUNKSIZE_MB": "1"}, "S3_MULTIPART_CHUNKSIZE_MB must be >= 5"),
    ({"S3_MULTIPART_THRESHOLD_MB": "lots"}, "S3_MULTIPART_THRESHOLD_MB='lots' is not a number"),
    ({"S3_ENDPOINT_URL": "minio:9000"}, "must start with http:// or https://"),
    ({"S3_CONDITIONAL_WRITES": "maybe"}, "S3_CONDITIONAL_WRITES must be auto, on or off"),
]


@pytest.mark.parametrize("env, message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_settings_fail_with_a_clear_message(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        S3Settings.from_env(env)


# ---------------------------------------------------------------------------
# Round trips, local and s3
# ---------------------------------------------------------------------------


def test_round_trips(base, tmp_path):
    s = Storage()
    # bytes
    s.write_bytes(storage.join(base, "small/hello.txt"), b"hello")
    assert s.read_bytes(storage.join(base, "small/hello.txt")) == b"hello"
    assert s.exists(storage.join(base, "small/hello.txt"))
    assert not s.exists(storage.join(base, "small/absent.txt"))

    # one file
    src = _write_tree(tmp_path / "src", FILES)
    s.put_file(src / "model.safetensors", storage.join(base, "one/model.safetensors"))
    back = s.get_file(storage.join(base, "one/model.safetensors"), tmp_path / "back" / "model.safetensors")
    assert back.read_bytes() == FILES["model.safetensors"]

    # a directory: relative paths, empty and unicode-named files kept
    uris = s.put_dir(src, storage.join(base, "data"))
    assert len(uris) == len(FILES)
    s.write_bytes(storage.join(base, "data2/other.txt"), b"a sibling prefix must not leak into data/")
    s.get_dir(storage.join(base, "data"), tmp_path / "copy")
    assert _tree(tmp_path / "copy") == FILES
    assert s.list(storage.join(base, "data")) == sorted(storage.join(base, "data", rel) for rel in FILES)
    assert storage.list_uris(storage.join(base, "nothing-here")) == []
    assert _temp_leftovers(tmp_path) == []


def test_large_file_goes_multipart_and_round_trips_byte_exact(bucket, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(20 * MiB))
    storage.put_file(big, f"s3://{bucket}/big.bin")
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    storage.put_file(small, f"s3://{bucket}/small.bin")
    client = Storage().client
    # A multipart object's ETag ends in "-<parts>": 20 MiB in 5 MiB parts.
    assert client.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"').endswith("-4")
    assert "-" not in client.head_object(Bucket=bucket, Key="small.bin")["ETag"]
    back = storage.get_file(f"s3://{bucket}/big.bin", tmp_path / "back.bin")
    assert storage.sha256_file(back) == storage.sha256_file(big) and back.stat().st_size == 20 * MiB


# ---------------------------------------------------------------------------
# Publish / fetch
# ---------------------------------------------------------------------------


def test_publish_and_fetch(base, tmp_path):
    s = Storage()
    src = _write_tree(tmp_path / "model", FILES)
    v1 = s.publish(src, base)
    assert v1["kind"] == "dir" and v1["file_count"] == len(FILES)
    for entry in v1["files"]:
        data = FILES[entry["path"]]
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    manifest_bytes = s.read_bytes(storage.join(base, "manifests", f"{v1['version']}.json"))
    assert hashlib.sha256(manifest_bytes).hexdigest() == v1["version"]  # the version id is the manifest's hash
    pointer = s.read_pointer(base)
    assert pointer["version"] == v1["version"] and pointer["previous"] is None

    fetched = s.fetch(base, tmp_path / "serving")
    assert fetched["version"] == v1["version"] and _tree(tmp_path / "serving") == FILES

    # A second release: one file changed, one added; unchanged content is stored once.
    (src / "model.safetensors").write_bytes(b"new weights")
    (src / "extra.txt").write_bytes(b"added")
    v2 = s.publish(src, base)
    assert v2["version"] != v1["version"]
    pointer = s.read_pointer(base)
    assert pointer["version"] == v2["version"] and pointer["previous"] == v1["version"]
    objects = s.list(storage.join(base, storage.OBJECTS_DIR))
    assert len(objects) == len(FILES) + 2  # 4 of v1, the new weights, the added file

    # fetch replaces the directory as a whole; an old version stays fetchable by id.
    s.fetch(base, tmp_path / "serving")
    assert _tree(tmp_path / "serving") == _tree(src)
    s.fetch(base, tmp_path / "serving", version=v1["version"])
    assert _tree(tmp_path / "serving") == FILES  # extra.txt is gone again

    # Same content, same version id; a single file publishes as a one-file release.
    assert s.publish(src, base)["version"] == v2["version"]
    single = s.publish(src / "extra.txt", storage.join(base, "single"))
    assert single["kind"] == "file"
    s.fetch(storage.join(base, "single"), tmp_path / "single")
    assert _tree(tmp_path / "single") == {"extra.txt": b"added"}
    assert _temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("conditional", ["auto", "off"])
def test_pointer_moved_by_someone_else_is_a_conflict(base, tmp_path, monkeypatch, conditional):
    monkeypatch.setenv("S3_CONDITIONAL_WRITES", conditional)  # off = compare-then-write
    s = Storage()
    src = _write_tree(tmp_path / "a", {"w.bin": b"one"})
    v1 = s.publish(src, base)
    state = s._read_pointer(base)  # what a slow publisher read when it started
    (src / "w.bin").write_bytes(b"two")
    v2 = s.publish(src, base)  # a second publisher moves the pointer
    stale = {"version": v1["version"], "manifest": "x", "published_at": "x", "previous": None}
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        s.update_pointer(base, stale, state[1])
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        s.update_pointer(base, stale, None)  # "first release", but a pointer exists
    assert s.read_pointer(base)["version"] == v2["version"]


def test_server_without_conditional_writes_falls_back_to_compare_then_write(moto_server, bucket, tmp_path, monkeypatch, capsys):
    def no_conditional_puts(method, path, headers):
        conditional = any(h.lower() in ("if-match", "if-none-match") for h in headers)
        return "not-implemented" if method == "PUT" and conditional else None

    with FailingProxy(moto_server.endpoint, no_conditional_puts) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        src = _write_tree(tmp_path / "a", {"w.bin": b"one"})
        s = Storage()
        v1 = s.publish(src, f"s3://{bucket}/m")
        assert "compare-then-write" in capsys.readouterr().out
        assert [a for a, _, _ in proxy.refused] == ["not-implemented"]
        (src / "w.bin").write_bytes(b"two")
        v2 = s.publish(src, f"s3://{bucket}/m")  # learned: no second conditional attempt
        assert len(proxy.refused) == 1
        assert s.read_pointer(f"s3://{bucket}/m")["previous"] == v1["version"]
        assert s.fetch(f"s3://{bucket}/m", tmp_path / "out")["version"] == v2["version"]
        monkeypatch.setenv("S3_CONDITIONAL_WRITES", "on")  # "on" never falls back
        with pytest.raises(storage.StorageError, match="501 NotImplemented"):
            Storage().publish(src, f"s3://{bucket}/m")


def _part_number(path: str) -> int:
    match = re.search(r"[?&]partNumber=(\d+)", path)
    return int(match.group(1)) if match else 0


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["part 2 dropped", "server dies after part 1"])
def test_failed_upload_leaves_no_partial_object_and_does_not_move_latest(moto_server, bucket, tmp_path, monkeypatch, failure):
    base = f"s3://{bucket}/model"
    s = Storage()
    v1 = s.publish(_write_tree(tmp_path / "v1", {"weights.bin": b"version one"}), base)

    big = np.random.default_rng(1).bytes(12 * MiB)  # 3 parts of 5 MiB
    release = _write_tree(tmp_path / "v2", {"a-small.txt": b"uploaded before the failure", "weights.bin": big})
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
            Storage().publish(release, base)
        assert proxy.refused, "the proxy never failed a request: the test would prove nothing"

    client = s.client  # straight to moto
    big_key = f"model/{storage.object_key(hashlib.sha256(big).hexdigest())}"
    assert not s.exists(f"s3://{bucket}/{big_key}")  # no partial object visible
    keys = [u.split("/", 3)[3] for u in s.list(f"s3://{bucket}/model")]
    assert big_key not in keys
    assert [k for k in keys if k.startswith("model/manifests/")] == [f"model/manifests/{v1['version']}.json"]
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    if failure == "part 2 dropped":
        assert uploads == []  # the client aborted the multipart upload
    else:
        assert [u["Key"] for u in uploads] == [big_key]  # left unfinished (a lifecycle rule cleans these), invisible
    assert s.read_pointer(base)["version"] == v1["version"]  # latest did not move
    assert _tree(tmp_path / "v1") == {"weights.bin": b"version one"}
    s.fetch(base, tmp_path / "serving")
    assert _tree(tmp_path / "serving") == {"weights.bin": b"version one"}

    v2 = s.publish(release, base)  # once the server is back, the same publish completes
    s.fetch(base, tmp_path / "serving")
    assert s.read_pointer(base)["version"] == v2["version"] and _tree(tmp_path / "serving") == _tree(release)


def _corrupt_content_same_size(s, base, manifest):
    entry = next(e for e in manifest["files"] if e["path"] == "model.safetensors")
    uri = storage.join(base, storage.object_key(entry["sha256"]))
    data = bytearray(s.read_bytes(uri))
    data[100] ^= 0xFF  # one flipped byte
    s.write_bytes(uri, bytes(data))
    return "model.safetensors of version"


def _truncate_content(s, base, manifest):
    entry = next(e for e in manifest["files"] if e["path"] == "metadata.json")
    uri = storage.join(base, storage.object_key(entry["sha256"]))
    s.write_bytes(uri, s.read_bytes(uri)[:-3])
    return "metadata.json of version"


def _edit_manifest(s, base, manifest):
    uri = storage.join(base, "manifests", f"{manifest['version']}.json")
    edited = json.loads(s.read_bytes(uri))
    edited["files"][0]["size"] += 1
    s.write_bytes(uri, json.dumps(edited, indent=2, sort_keys=True).encode() + b"\n")
    return "its sha256 is not its version id"


def _delete_content(s, base, manifest):
    digest = manifest["files"][-1]["sha256"]
    uri = storage.join(base, storage.object_key(digest))
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
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
def test_corruption_is_detected_on_fetch_and_leaves_nothing_behind(base, tmp_path, corrupt, error):
    s = Storage()
    old = _write_tree(tmp_path / "old", {"served.txt": b"the version being served"})
    s.fetch(s.publish(old, storage.join(base, "old"))["uri"], tmp_path / "serving")
    manifest = s.publish(_write_tree(tmp_path / "model", FILES), base)
    message = corrupt(s, base, manifest)
    with pytest.raises(error, match=re.escape(message)):
        s.fetch(base, tmp_path / "serving")
    assert _tree(tmp_path / "serving") == {"served.txt": b"the version being served"}  # untouched
    assert _temp_leftovers(tmp_path) == []


@pytest.mark.parametrize("corrupt", [c[1] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_publishing_the_same_files_again_repairs_a_damaged_release(base, tmp_path, corrupt, capsys):
    s = Storage()
    src = _write_tree(tmp_path / "model", FILES)
    manifest = s.publish(src, base)
    corrupt(s, base, manifest)
    with pytest.raises(storage.StorageError, match="publish the same files again to repair it"):
        s.fetch(base, tmp_path / "serving")

    assert s.publish(src, base)["version"] == manifest["version"]
    assert s.fetch(base, tmp_path / "serving")["version"] == manifest["version"]
    assert _tree(tmp_path / "serving") == FILES
    if corrupt is not _delete_content:
        assert "does not match its sha256" in capsys.readouterr().out  # the repair is reported


def test_republish_verifies_s3_objects_by_their_stored_sha256(moto_server, bucket, tmp_path, monkeypatch):
    big = np.random.default_rng(2).bytes(6 * MiB)  # above the 5 MiB multipart threshold: no whole-object sha256
    src = _write_tree(tmp_path / "model", {**FILES, "big.bin": big})
    base = f"s3://{bucket}/store"
    with FailingProxy(moto_server.endpoint, lambda method, path, headers: None) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        s = Storage()
        manifest = s.publish(src, base)
        digests = {e["path"]: e["sha256"] for e in manifest["files"]}
        keys = {path: f"store/{storage.object_key(digest)}" for path, digest in digests.items()}
        small_key, big_key = keys["model.safetensors"], keys["big.bin"]
        head = s.client.head_object(Bucket=bucket, Key=small_key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digests["model.safetensors"])).decode()

        # All intact: small objects are checked by a HEAD, only the multipart one is read back.
        proxy.requests.clear()
        s.publish(src, base)
        object_gets = [path for method, path in proxy.requests if method == "GET" and "/objects/" in path]
        assert object_gets == [f"/{bucket}/{big_key}"]
        assert [path for method, path in proxy.requests if method == "PUT"] == [f"/{bucket}/store/latest"]

        # Same-size damage the size cannot show: a small object rewritten with its own (other) checksum,
        # and the multipart object with one byte flipped.
        damaged = bytearray(FILES["model.safetensors"])
        damaged[7] ^= 0x01
        s.client.put_object(Bucket=bucket, Key=small_key, Body=bytes(damaged), ChecksumAlgorithm="SHA256")
        damaged_big = bytearray(big)
        damaged_big[-1] ^= 0x01
        s.client.upload_fileobj(io.BytesIO(bytes(damaged_big)), bucket, big_key)
        with pytest.raises(ChecksumMismatchError):
            s.fetch(base, tmp_path / "serving")
        s.publish(src, base)
        s.fetch(base, tmp_path / "serving")
        assert _tree(tmp_path / "serving") == _tree(src)


TORN_POINTERS = [
    ("cut short", lambda good: good[: len(good) // 2]),
    ("empty", lambda good: b""),
    ("zeros", lambda good: b"\0" * len(good)),  # what some filesystems leave after a crash
    ("no version", lambda good: b'{"manifest": "manifests/x.json"}\n'),
]


@pytest.mark.parametrize("tear", [t[1] for t in TORN_POINTERS], ids=[t[0] for t in TORN_POINTERS])
def test_damaged_pointer_fails_fetch_clearly_and_publish_replaces_it(base, tmp_path, tear, capsys):
    s = Storage()
    src = _write_tree(tmp_path / "model", {"w.bin": b"one"})
    v1 = s.publish(src, base)
    pointer_uri = storage.join(base, storage.POINTER_NAME)
    s.write_bytes(pointer_uri, tear(s.read_bytes(pointer_uri)))

    with pytest.raises(PointerDamagedError, match=re.escape(f"{pointer_uri} is damaged")) as raised:
        s.fetch(base, tmp_path / "serving")
    assert "Publish a release again to replace it, or fetch a version by its id" in str(raised.value)
    assert not (tmp_path / "serving").exists() and _temp_leftovers(tmp_path) == []
    with pytest.raises(PointerDamagedError):
        s.read_pointer(base)
    s.fetch(base, tmp_path / "by-id", version=v1["version"])  # the releases themselves are fine
    assert _tree(tmp_path / "by-id") == {"w.bin": b"one"}

    (src / "w.bin").write_bytes(b"two")
    v2 = s.publish(src, base)
    assert "is damaged" in capsys.readouterr().out
    pointer = s.read_pointer(base)
    assert pointer["version"] == v2["version"] and pointer["previous"] is None  # nothing known before it
    s.fetch(base, tmp_path / "serving")
    assert _tree(tmp_path / "serving") == {"w.bin": b"two"}


@pytest.mark.parametrize("conditional", ["auto", "off"])
def test_damaged_pointer_replaced_by_someone_else_is_still_a_conflict(base, tmp_path, monkeypatch, conditional):
    monkeypatch.setenv("S3_CONDITIONAL_WRITES", conditional)
    s = Storage()
    src = _write_tree(tmp_path / "model", {"w.bin": b"one"})
    v1 = s.publish(src, base)
    pointer_uri = storage.join(base, storage.POINTER_NAME)
    s.write_bytes(pointer_uri, b'{"version": "')
    _, damaged_tag = s._read_pointer(base, replacing=True)  # what a slow publisher read when it started
    (src / "w.bin").write_bytes(b"two")
    v2 = s.publish(src, base)  # a faster publisher replaced the damaged pointer first
    slow = {"version": v1["version"], "manifest": "x", "published_at": "x", "previous": None}
    with pytest.raises(PointerConflictError, match="moved while publishing"):
        s.update_pointer(base, slow, damaged_tag)
    assert s.read_pointer(base)["version"] == v2["version"]


# ---------------------------------------------------------------------------
# Symbolic links are never followed on upload
# ---------------------------------------------------------------------------


SECRET = b"[default]\naws_secret_access_key = do-not-upload-me\n"


def _link_in(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A release with a link (or one that is a link); returns (what to publish, the link's name in the error)."""
    credentials = tmp_path / "home" / ".aws" / "credentials"
    credentials.parent.mkdir(parents=True)
    credentials.write_bytes(SECRET)
    release = _write_tree(tmp_path / "release", {"model.bin": b"weights", "config/settings.json": b"{}"})
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
def test_publish_and_put_dir_refuse_symbolic_links(base, tmp_path, case):
    s = Storage()
    source, link_name = _link_in(tmp_path, case)
    with pytest.raises(UnsafeSourceError, match=re.escape(link_name) + r".*is a symbolic link"):
        s.publish(source, base)
    with pytest.raises(UnsafeSourceError, match=re.escape(link_name) + r".*is a symbolic link"):
        s.put_dir(source, storage.join(base, "copy"))
    assert s.list(base) == []  # nothing uploaded, the pointer included


def test_publish_refuses_special_files_and_links_swapped_in_after_listing(tmp_path, monkeypatch):
    s = Storage()
    release = _write_tree(tmp_path / "release", {"model.bin": b"weights"})
    os.mkfifo(release / "pipe")  # reading it would block the publish for ever
    with pytest.raises(UnsafeSourceError, match="pipe is not a regular file"):
        s.publish(release, tmp_path / "store")
    (release / "pipe").unlink()

    listing = storage._regular_files(release, "publish")
    (release / "model.bin").unlink()
    (release / "model.bin").symlink_to(_write_tree(tmp_path / "home", {"secret": SECRET}) / "secret")
    monkeypatch.setattr(storage, "_regular_files", lambda source, action: listing)
    with pytest.raises(UnsafeSourceError, match="became a symbolic link"):
        s.publish(release, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_link_in_a_local_store_is_replaced_not_trusted(tmp_path):
    s = Storage()
    release = _write_tree(tmp_path / "release", {"model.bin": b"weights"})
    manifest = s.publish(release, tmp_path / "store")
    stored = tmp_path / "store" / storage.object_key(manifest["files"][0]["sha256"])
    elsewhere = _write_tree(tmp_path / "elsewhere", {"model.bin": b"weights"}) / "model.bin"
    stored.unlink()
    stored.symlink_to(elsewhere)  # same bytes, but the store would depend on a file outside it
    s.publish(release, tmp_path / "store")
    assert not stored.is_symlink() and stored.read_bytes() == b"weights"
    assert elsewhere.read_bytes() == b"weights"  # the link's target was not written through


# ---------------------------------------------------------------------------
# Local writes are atomic and durable
# ---------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch) -> list[tuple[int, bool]]:
    """Every os.fsync call as (inode, is a directory), in order; the calls still happen."""
    calls = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        calls.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return calls


def _assert_durable(calls: list[tuple[int, bool]], path: Path) -> None:
    """The file was fsynced (a rename keeps the inode) and its directory after it."""
    file_sync = (path.stat().st_ino, False)
    assert file_sync in calls, f"{path} was not fsynced"
    later = calls[calls.index(file_sync) + 1:]
    assert (path.parent.stat().st_ino, True) in later, f"the directory of {path} was not fsynced after the rename"


def _save_json(dest: Path, data: bytes) -> None:
    from components.core.models import atomic_write_json

    atomic_write_json(dest, {"data": data.decode()})


def _save_safetensors(dest: Path, data: bytes) -> None:
    import torch

    from components.core.models import atomic_save_safetensors

    atomic_save_safetensors({"w": torch.tensor(list(data), dtype=torch.uint8)}, dest)


def _put_file(dest: Path, data: bytes) -> None:
    source = dest.parent.parent / f"source-{uuid.uuid4().hex[:6]}"
    source.write_bytes(data)
    storage.put_file(source, dest)


LOCAL_WRITES = [
    ("write_bytes", lambda dest, data: storage.write_bytes(str(dest), data)),
    ("put_file", _put_file),
    ("atomic_write_json", _save_json),
    ("atomic_save_safetensors", _save_safetensors),
]


@pytest.mark.parametrize("write", [w[1] for w in LOCAL_WRITES], ids=[w[0] for w in LOCAL_WRITES])
def test_local_writes_fsync_the_file_and_the_directory(tmp_path, fsyncs, write):
    dest = tmp_path / "out" / "file"
    dest.parent.mkdir()
    write(dest, b"old")
    write(dest, b"new")
    _assert_durable(fsyncs, dest)


def test_downloads_publish_and_fetch_fsync_what_they_write(base, tmp_path, fsyncs):
    s = Storage()
    s.write_bytes(storage.join(base, "one/a.bin"), b"a")
    got = s.get_file(storage.join(base, "one/a.bin"), tmp_path / "got" / "a.bin")
    _assert_durable(fsyncs, got)

    release = _write_tree(tmp_path / "release", FILES)
    manifest = s.publish(release, base)
    if not storage.is_s3(base):
        _assert_durable(fsyncs, Path(base) / storage.POINTER_NAME)
        _assert_durable(fsyncs, Path(base) / storage.MANIFESTS_DIR / f"{manifest['version']}.json")
        for entry in manifest["files"]:
            _assert_durable(fsyncs, Path(base) / storage.object_key(entry["sha256"]))
    s.fetch(base, tmp_path / "serving")
    for rel in FILES:
        assert ((tmp_path / "serving" / rel).stat().st_ino, False) in fsyncs
    assert (tmp_path.stat().st_ino, True) in fsyncs  # the rename of the fetched directory into place


@pytest.mark.parametrize("write", [w[1] for w in LOCAL_WRITES], ids=[w[0] for w in LOCAL_WRITES])
def test_a_failed_fsync_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, write):
    dest = tmp_path / "out" / "file"
    dest.parent.mkdir()
    write(dest, b"old")
    old = dest.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write(dest, b"new")
    assert dest.read_bytes() == old
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file"]


def test_a_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    storage.atomic_write_file(dest, lambda tmp: tmp.write_bytes(b"old weights"))

    def half_then_disk_full(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b"new wei")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        storage.atomic_write_file(dest, half_then_disk_full)
    assert dest.read_bytes() == b"old weights"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.bin"]


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def _no_credentials(monkeypatch, bucket, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return lambda: storage.read_bytes(f"s3://{bucket}/x")


def _unreachable(monkeypatch, bucket, tmp_path):
    from s3server import free_port

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return lambda: storage.get_file(f"s3://{bucket}/x", tmp_path / "x")


S3_ERRORS = [
    ("missing bucket, download", lambda m, b, t: lambda: storage.get_file("s3://no-such-bucket-here/k", t / "k"),
     BucketNotFoundError, "bucket 'no-such-bucket-here' does not exist on this endpoint"),
    ("missing bucket, list", lambda m, b, t: lambda: storage.list_uris("s3://no-such-bucket-here/"),
     BucketNotFoundError, "does not exist on this endpoint"),
    ("missing bucket, exists", lambda m, b, t: lambda: storage.exists("s3://no-such-bucket-here/k"),
     BucketNotFoundError, "does not exist on this endpoint"),
    ("missing key, download", lambda m, b, t: lambda: storage.get_file(f"s3://{b}/absent.bin", t / "k"),
     ObjectNotFoundError, "absent.bin (endpoint: http://127.0.0.1:"),
    ("missing key, read", lambda m, b, t: lambda: storage.read_bytes(f"s3://{b}/absent.bin"),
     ObjectNotFoundError, "no such object"),
    ("empty prefix", lambda m, b, t: lambda: storage.get_dir(f"s3://{b}/photos/", t / "d"),
     ObjectNotFoundError, "no objects under s3://"),
    ("nothing published", lambda m, b, t: lambda: storage.fetch(f"s3://{b}/model", t / "d"),
     ObjectNotFoundError, "nothing published at"),
    ("unknown version", lambda m, b, t: lambda: storage.fetch(f"s3://{b}/model", t / "d", version="abc"),
     ObjectNotFoundError, "version abc is not published"),
    ("no credentials", _no_credentials, StorageAuthError, "no usable S3 credentials found"),
    ("unreachable endpoint", _unreachable, EndpointUnreachableError, "check S3_ENDPOINT_URL"),
    ("no bucket in URI", lambda m, b, t: lambda: storage.read_bytes("s3:///key"), InvalidURIError, "has no bucket name"),
    ("missing local file", lambda m, b, t: lambda: storage.put_file(t / "nope.bin", f"s3://{b}/x"),
     ObjectNotFoundError, "nope.bin: no such file"),
]


@pytest.mark.parametrize("setup, error, message", [e[1:] for e in S3_ERRORS], ids=[e[0] for e in S3_ERRORS])
def test_errors_say_what_to_check(bucket, tmp_path, monkeypatch, setup, error, message):
    action = setup(monkeypatch, bucket, tmp_path)
    with pytest.raises(error) as raised:
        action()
    assert message in str(raised.value)
    assert list(tmp_path.iterdir()) == []  # no partial download


@pytest.fixture
def iam_keys(moto_server, bucket):
    """Two IAM users (one may use S3, one may not), then moto checks every request's signature."""
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    keys = {}
    for user, may_use_s3 in (("writer", True), ("nobody", False)):
        name = f"{user}-{uuid.uuid4().hex[:6]}"
        iam.create_user(UserName=name)
        keys[user] = iam.create_access_key(UserName=name)["AccessKey"]
        if may_use_s3:
            policy = {"Version": "2012-10-17",
                      "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    storage.write_bytes(f"s3://{bucket}/data.bin", b"secret data")
    moto_server.set_auth(True)
    try:
        yield keys
    finally:
        moto_server.set_auth(False)


CREDENTIALS = [
    ("unknown access key", lambda k: ("AKIAUNKNOWNKEY000000", "whatever"), "InvalidAccessKeyId", "check AWS_ACCESS_KEY_ID"),
    ("wrong secret", lambda k: (k["writer"]["AccessKeyId"], "wrong-secret"), "SignatureDoesNotMatch", "check AWS_SECRET_ACCESS_KEY"),
    ("no permission", lambda k: (k["nobody"]["AccessKeyId"], k["nobody"]["SecretAccessKey"]), "AccessDenied", "lack the permission"),
]


@pytest.mark.parametrize("make_key, code, hint", [c[1:] for c in CREDENTIALS], ids=[c[0] for c in CREDENTIALS])
def test_bad_credentials_give_a_clear_error(iam_keys, bucket, tmp_path, monkeypatch, make_key, code, hint):
    key_id, secret = make_key(iam_keys)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    for action in (lambda: storage.read_bytes(f"s3://{bucket}/data.bin"),
                   lambda: storage.get_file(f"s3://{bucket}/data.bin", tmp_path / "data.bin"),
                   lambda: storage.write_bytes(f"s3://{bucket}/new.bin", b"x")):
        with pytest.raises(StorageAuthError) as raised:
            action()
        message = str(raised.value)
        assert ("access refused" in message) and (code in message or "403" in message)
        assert "AWS_ACCESS_KEY_ID" in message  # says where credentials come from
    with pytest.raises(StorageAuthError, match=re.escape(hint)):
        storage.read_bytes(f"s3://{bucket}/data.bin")  # a GET carries the reason
    assert not (tmp_path / "data.bin").exists()


def test_good_credentials_work_with_auth_on(iam_keys, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_keys["writer"]["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_keys["writer"]["SecretAccessKey"])
    assert storage.read_bytes(f"s3://{bucket}/data.bin") == b"secret data"
    storage.write_bytes(f"s3://{bucket}/new.bin", b"x")
    assert storage.exists(f"s3://{bucket}/new.bin")


# ---------------------------------------------------------------------------
# Ingest from s3://
# ---------------------------------------------------------------------------


def _digit_pngs(root: Path, per_class: int = 12) -> Path:
    digits = load_digits()
    for label in (0, 1, 7):
        (root / f"digit-{label}").mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for i, image in enumerate(images):
            Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(root / f"digit-{label}" / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_ingest_from_s3_image_folders_and_npz(bucket, tmp_path):
    from components.ingest.ingest import ingest

    folder = _digit_pngs(tmp_path / "photos")
    storage.put_dir(folder, f"s3://{bucket}/raw/photos")
    card = ingest(f"s3://{bucket}/raw/photos/", tmp_path / "from-folders", seed=0)
    splits = load_splits(tmp_path / "from-folders")
    assert splits.class_names == ["digit-0", "digit-1", "digit-7"] and splits.image_shape == (1, 8, 8)
    assert sum(card["counts"].values()) == 36 and card["source"] == f"s3://{bucket}/raw/photos/"

    digits = load_digits()
    np.savez(tmp_path / "data.npz", images=np.round(digits.images[:300] * 255 / 16).astype(np.uint8),
             labels=digits.target[:300])
    storage.put_file(tmp_path / "data.npz", f"s3://{bucket}/raw/data.npz")
    card = ingest(f"s3://{bucket}/raw/data.npz", tmp_path / "from-npz", seed=0)
    assert sum(card["counts"].values()) == 300 and load_splits(tmp_path / "from-npz").class_names == [str(d) for d in range(10)]

    # Errors about the data name the s3:// URI, not the temporary download directory.
    storage.write_bytes(f"s3://{bucket}/raw/photos/digit-7/broken.png", b"\x89PNG not really")
    with pytest.raises(DataValidationError, match=re.escape(f"s3://{bucket}/raw/photos/digit-7/broken.png")):
        ingest(f"s3://{bucket}/raw/photos", tmp_path / "broken")
    with pytest.raises(ObjectNotFoundError, match="no objects under"):
        ingest(f"s3://{bucket}/raw/nothing/", tmp_path / "nothing")
