"""Blob storage: local paths and s3:// against a real S3-compatible HTTP server (moto's standalone server on
loopback, started here), settings from the environment, multipart uploads, conditional writes, clear errors, and
ingest from s3://."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_FILES, leftover_temp_files, read_tree, settings_of, write_tree
from PIL import Image
from sklearn.datasets import load_digits

from components.core import blobs, localfiles, releases
from components.core.blobs import (
    BucketNotFoundError,
    EndpointUnreachableError,
    InvalidURIError,
    ObjectNotFoundError,
    Storage,
    StorageAuthError,
    WriteConflictError,
)
from components.core.data import DataValidationError, load_splits
from components.core.s3_client import S3Settings
from pipelines.config import DataConfig

MiB = 1024 * 1024


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


def test_round_trips(store_base, tmp_path):
    s = Storage()
    # bytes
    s.write_bytes(blobs.join(store_base, "small/hello.txt"), b"hello")
    assert s.read_bytes(blobs.join(store_base, "small/hello.txt")) == b"hello"
    assert s.exists(blobs.join(store_base, "small/hello.txt"))
    assert not s.exists(blobs.join(store_base, "small/absent.txt"))

    # one file
    src = write_tree(tmp_path / "src", SAMPLE_FILES)
    s.put_file(src / "model.safetensors", blobs.join(store_base, "one/model.safetensors"))
    back = s.get_file(blobs.join(store_base, "one/model.safetensors"), tmp_path / "back" / "model.safetensors")
    assert back.read_bytes() == SAMPLE_FILES["model.safetensors"]

    # a directory: relative paths, empty and unicode-named files kept
    uris = s.put_dir(src, blobs.join(store_base, "data"))
    assert len(uris) == len(SAMPLE_FILES)
    s.write_bytes(blobs.join(store_base, "data2/other.txt"), b"a sibling prefix must not leak into data/")
    s.get_dir(blobs.join(store_base, "data"), tmp_path / "copy")
    assert read_tree(tmp_path / "copy") == SAMPLE_FILES
    assert s.list(blobs.join(store_base, "data")) == sorted(blobs.join(store_base, "data", rel) for rel in SAMPLE_FILES)
    assert blobs.list_uris(blobs.join(store_base, "nothing-here")) == []
    assert leftover_temp_files(tmp_path) == []


def test_large_file_goes_multipart_and_round_trips_byte_exact(bucket, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(20 * MiB))
    blobs.put_file(big, f"s3://{bucket}/big.bin")
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    blobs.put_file(small, f"s3://{bucket}/small.bin")
    client = Storage().client
    # A multipart object's ETag ends in "-<parts>": 20 MiB in 5 MiB parts.
    assert client.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"').endswith("-4")
    assert "-" not in client.head_object(Bucket=bucket, Key="small.bin")["ETag"]
    back = blobs.get_file(f"s3://{bucket}/big.bin", tmp_path / "back.bin")
    assert localfiles.sha256_file(back) == localfiles.sha256_file(big) and back.stat().st_size == 20 * MiB



@pytest.mark.parametrize("conditional", ["auto", "off"])
def test_a_conditional_write_refuses_what_changed_since_it_was_read(store_base, monkeypatch, conditional):
    monkeypatch.setenv("S3_CONDITIONAL_WRITES", conditional)  # off = compare-then-write
    s = Storage()
    uri = blobs.join(store_base, "pointer")
    assert s.read_tagged(uri) == (None, None)
    s.write_if_unchanged(uri, b"one", None)
    data, tag = s.read_tagged(uri)
    assert data == b"one" and tag
    with pytest.raises(WriteConflictError, match="changed since it was read"):
        s.write_if_unchanged(uri, b"two", None)  # written as new, but it exists
    s.write_bytes(uri, b"someone else")
    with pytest.raises(WriteConflictError, match="changed since it was read"):
        s.write_if_unchanged(uri, b"two", tag)
    assert s.read_bytes(uri) == b"someone else"
    s.write_if_unchanged(uri, b"two", s.read_tagged(uri)[1])
    assert s.read_bytes(uri) == b"two"


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------


def _no_credentials(monkeypatch, bucket, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    return lambda: blobs.read_bytes(f"s3://{bucket}/x")


def _unreachable(monkeypatch, bucket, tmp_path):
    from s3server import free_port

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return lambda: blobs.get_file(f"s3://{bucket}/x", tmp_path / "x")


S3_ERRORS = [
    ("missing bucket, download", lambda m, b, t: lambda: blobs.get_file("s3://no-such-bucket-here/k", t / "k"),
     BucketNotFoundError, "bucket 'no-such-bucket-here' does not exist on this endpoint"),
    ("missing bucket, list", lambda m, b, t: lambda: blobs.list_uris("s3://no-such-bucket-here/"),
     BucketNotFoundError, "does not exist on this endpoint"),
    ("missing bucket, exists", lambda m, b, t: lambda: blobs.exists("s3://no-such-bucket-here/k"),
     BucketNotFoundError, "does not exist on this endpoint"),
    ("missing key, download", lambda m, b, t: lambda: blobs.get_file(f"s3://{b}/absent.bin", t / "k"),
     ObjectNotFoundError, "absent.bin (endpoint: http://127.0.0.1:"),
    ("missing key, read", lambda m, b, t: lambda: blobs.read_bytes(f"s3://{b}/absent.bin"),
     ObjectNotFoundError, "no such object"),
    ("empty prefix", lambda m, b, t: lambda: blobs.get_dir(f"s3://{b}/photos/", t / "d"),
     ObjectNotFoundError, "no objects under s3://"),
    ("nothing published", lambda m, b, t: lambda: releases.fetch(f"s3://{b}/model", t / "d"),
     ObjectNotFoundError, "nothing published at"),
    ("unknown version", lambda m, b, t: lambda: releases.fetch(f"s3://{b}/model", t / "d", version="abc"),
     ObjectNotFoundError, "version abc is not published"),
    ("no credentials", _no_credentials, StorageAuthError, "no usable S3 credentials found"),
    ("unreachable endpoint", _unreachable, EndpointUnreachableError, "check S3_ENDPOINT_URL"),
    ("no bucket in URI", lambda m, b, t: lambda: blobs.read_bytes("s3:///key"), InvalidURIError, "has no bucket name"),
    ("missing local file", lambda m, b, t: lambda: blobs.put_file(t / "nope.bin", f"s3://{b}/x"),
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
    blobs.write_bytes(f"s3://{bucket}/data.bin", b"secret data")
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
    for action in (lambda: blobs.read_bytes(f"s3://{bucket}/data.bin"),
                   lambda: blobs.get_file(f"s3://{bucket}/data.bin", tmp_path / "data.bin"),
                   lambda: blobs.write_bytes(f"s3://{bucket}/new.bin", b"x")):
        with pytest.raises(StorageAuthError) as raised:
            action()
        message = str(raised.value)
        assert ("access refused" in message) and (code in message or "403" in message)
        assert "AWS_ACCESS_KEY_ID" in message  # says where credentials come from
    with pytest.raises(StorageAuthError, match=re.escape(hint)):
        blobs.read_bytes(f"s3://{bucket}/data.bin")  # a GET carries the reason
    assert not (tmp_path / "data.bin").exists()


def test_good_credentials_work_with_auth_on(iam_keys, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_keys["writer"]["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_keys["writer"]["SecretAccessKey"])
    assert blobs.read_bytes(f"s3://{bucket}/data.bin") == b"secret data"
    blobs.write_bytes(f"s3://{bucket}/new.bin", b"x")
    assert blobs.exists(f"s3://{bucket}/new.bin")


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

    cfg = settings_of(data=DataConfig(seed=0))
    folder = _digit_pngs(tmp_path / "photos")
    blobs.put_dir(folder, f"s3://{bucket}/raw/photos")
    card = ingest(f"s3://{bucket}/raw/photos/", tmp_path / "from-folders", cfg)
    splits = load_splits(tmp_path / "from-folders")
    assert splits.class_names == ["digit-0", "digit-1", "digit-7"] and splits.image_shape == (1, 8, 8)
    assert sum(card["counts"].values()) == 36 and card["source"] == f"s3://{bucket}/raw/photos/"

    digits = load_digits()
    np.savez(tmp_path / "data.npz", images=np.round(digits.images[:300] * 255 / 16).astype(np.uint8),
             labels=digits.target[:300])
    blobs.put_file(tmp_path / "data.npz", f"s3://{bucket}/raw/data.npz")
    card = ingest(f"s3://{bucket}/raw/data.npz", tmp_path / "from-npz", cfg)
    assert sum(card["counts"].values()) == 300 and load_splits(tmp_path / "from-npz").class_names == [str(d) for d in range(10)]

    # Errors about the data name the s3:// URI, not the temporary download directory.
    blobs.write_bytes(f"s3://{bucket}/raw/photos/digit-7/broken.png", b"\x89PNG not really")
    with pytest.raises(DataValidationError, match=re.escape(f"s3://{bucket}/raw/photos/digit-7/broken.png")):
        ingest(f"s3://{bucket}/raw/photos", tmp_path / "broken", cfg)
    with pytest.raises(ObjectNotFoundError, match="no objects under"):
        ingest(f"s3://{bucket}/raw/nothing/", tmp_path / "nothing", cfg)
