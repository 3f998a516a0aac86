"""Tests of the champion lookup: the model in production from a serving home, a .mar, a model directory or a
storage release, and a champion that cannot be compared."""

import json
import uuid

import pytest

from components.core.models import Classifier, EncoderSpec, save_classifier
from components.evaluate.champion import (
    ChampionNotComparable,
    check_comparable,
    extract_mar,
    from_serving_home,
    resolve_champion,
)


def test_champion_is_found_in_a_serving_home_from_its_mar(tmp_path, served_home, known_model):
    found = from_serving_home(served_home, tmp_path)
    assert found.status == "found" and found.source == str(served_home / "model-store" / "digits.mar")
    assert found.serving is False  # recorded, not running: still the champion
    for name in ("model.safetensors", "metadata.json"):
        assert (found.model_dir / name).read_bytes() == (known_model[0] / name).read_bytes()


def test_champion_prefers_the_recorded_model_dir(tmp_path, known_model):
    (tmp_path / "state.json").write_text(json.dumps({"model_name": "digits", "model_dir": str(known_model[0])}))
    found = from_serving_home(tmp_path, tmp_path / "work")
    assert found.model_dir == known_model[0]


def test_mar_extraction_reads_only_the_model(tmp_path, served_home):
    import zipfile

    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(served_home / "model-store" / "digits.mar") as good, zipfile.ZipFile(evil, "w") as out:
        for name in good.namelist():
            out.writestr(name, good.read(name))
        out.writestr("../../escaped.txt", "x")
    extract_mar(evil, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metadata.json", "model.safetensors"]
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_explicit_champion_as_mar_dir_and_storage_release(tmp_path, served_home, known_model):
    from components.core.releases import publish

    mar = served_home / "model-store" / "digits.mar"
    weights = (known_model[0] / "model.safetensors").read_bytes()
    publish(known_model[0], str(tmp_path / "release"))
    for spec in (str(mar), str(known_model[0]), str(served_home / "model-store"), str(tmp_path / "release"),
                 str(tmp_path / "release" / "latest")):
        found = resolve_champion(spec, None, tmp_path / f"work-{uuid.uuid4().hex[:6]}")
        assert found.status == "found", spec
        assert (found.model_dir / "model.safetensors").read_bytes() == weights, spec
    assert resolve_champion("none", served_home, tmp_path).status == "disabled"
    nothing = resolve_champion("", tmp_path / "empty-home", tmp_path)
    assert nothing.status == "no_champion" and nothing.reason.startswith("no model in production")


@pytest.mark.slow
def test_champion_from_an_s3_release(tmp_path, known_model, monkeypatch):
    """The same release lookup against a real S3 API (moto server on loopback)."""
    pytest.importorskip("moto")
    from s3server import MotoServer, s3_env

    from components.core.blobs import Storage
    from components.core.releases import publish

    with MotoServer() as server:
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        Storage().client.create_bucket(Bucket="models")
        publish(known_model[0], "s3://models/digits")
        found = resolve_champion("s3://models/digits/latest", None, tmp_path)
    assert found.status == "found" and found.source.startswith("s3://models/digits (release ")
    assert (found.model_dir / "model.safetensors").read_bytes() == (known_model[0] / "model.safetensors").read_bytes()


def test_champion_for_other_classes_or_images_is_not_comparable(tmp_path, splits):
    save_classifier(Classifier(EncoderSpec(1, 8, width=8, embed_dim=16), 10), tmp_path / "letters",
                    {"class_names": list("abcdefghij")})
    save_classifier(Classifier(EncoderSpec(3, 32, width=8, embed_dim=16), 10), tmp_path / "rgb",
                    {"class_names": splits.class_names})
    with pytest.raises(ChampionNotComparable, match=r"predicts classes \['a', 'b'.*but this test split has \['0'"):
        check_comparable(tmp_path / "letters", splits)
    with pytest.raises(ChampionNotComparable, match="takes 3-channel 32px images but this test split has 1-channel 8px"):
        check_comparable(tmp_path / "rgb", splits)
