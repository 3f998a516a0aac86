"""The model archive (.mar) and its model config, and the tokens clients read to call the endpoint."""

from __future__ import annotations

import json
import re
import zipfile

import pytest

from serving.archive import archive_workers, build_mar, model_config_yaml
from serving.client import read_token


def test_build_mar_packs_weights_metadata_handler_and_model_config(gray_model, tmp_path):
    mar = build_mar(gray_model, tmp_path / "export", "digits", "v-gray", workers=2, batch_size=16, max_batch_delay_ms=4)
    assert mar == (tmp_path / "export" / "digits.mar").resolve()
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        model_yaml = z.read(manifest["model"]["configFile"]).decode()
    assert {"model.safetensors", "metadata.json", "handler.py"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl")) for n in names)
    assert manifest["model"]["serializedFile"] == "model.safetensors"
    assert manifest["model"]["modelVersion"] == "v-gray" and manifest["model"]["handler"] == "handler.py"
    import yaml

    assert yaml.safe_load(model_yaml) == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 16, "maxBatchDelay": 4,
                                          "responseTimeout": 60}
    assert archive_workers(mar) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"workers": 0}, "workers must be an integer from 1"), ({"batch_size": 2000}, "batch_size must be an integer"),
     ({"max_batch_delay_ms": 0}, "max_batch_delay_ms must be an integer from 1"),  # TorchServe: 0 = 100 ms
     ({"batch_size": 2.5}, "batch_size must be")],
)
def test_model_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model_config_yaml(**kwargs)


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing-weights", FileNotFoundError, "model.safetensors missing"),
        ("bad-name", ValueError, "must be letters, digits"),
    ],
)
def test_build_mar_failures(gray_model, tmp_path, case, error, message):
    model_dir, name = gray_model, "digits"
    if case == "missing-weights":
        model_dir = tmp_path / "half"
        model_dir.mkdir()
        (model_dir / "metadata.json").write_text("{}")
    else:
        name = "../evil"
    with pytest.raises(error, match=message):
        build_mar(model_dir, tmp_path / "export", name, "1")


def test_read_token_from_torchserve_key_file(tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "m-key", "expiration time": "x"},
                                    "inference": {"key": "i-key", "expiration time": "x"}, "API": {"key": "a-key"}}))
    assert read_token(key_file) == "i-key"
    assert read_token(key_file, "management") == "m-key" and read_token(key_file, "API") == "a-key"
    with pytest.raises(KeyError, match="no 'nope' key"):
        read_token(key_file, "nope")


@pytest.mark.parametrize("text", ["client-token-0123456789abcdef", "client-token-0123456789abcdef\n",
                                  "\n  client-token-0123456789abcdef  \r\nsecond-token-for-rotation\n",
                                  "client-token-0123456789abcdef\r\n"],
                         ids=["bare", "newline", "blank-line-then-two-tokens", "crlf"])
def test_read_token_from_a_plain_text_secret_file(tmp_path, text):
    """A Kubernetes Secret mounted as a file (the client token on Kubernetes): the first non-empty line."""
    token_file = tmp_path / "token"
    token_file.write_text(text)
    assert read_token(token_file) == "client-token-0123456789abcdef"


def test_read_token_plain_text_that_parses_as_json_is_still_a_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("12345678901234567890\n")  # a JSON number, not a key file
    assert read_token(token_file) == "12345678901234567890"


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n"], ids=["empty", "newline", "whitespace"])
def test_read_token_empty_file_is_a_clear_error(tmp_path, text):
    token_file = tmp_path / "token"
    token_file.write_text(text)
    with pytest.raises(ValueError, match=f"token file {re.escape(str(token_file))} is empty"):
        read_token(token_file)


def test_read_token_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_token(tmp_path / "absent")


